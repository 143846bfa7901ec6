"""Leaderboard output: Markdown, CSV, JSON, a grouped bar chart and accuracy curves."""

from __future__ import annotations

import csv
import io
import json

from .runs import Run
from .table import Row, published

__all__ = ["markdown", "to_csv", "to_json", "plot_bars", "plot_curves"]


def _num(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _pm(mean: float | None, std: float | None) -> str:
    return _num(mean) if std is None else f"{_num(mean)} ± {_num(std)}"


def markdown(rows: list[Row], problems=()) -> str:
    """A Markdown table (best and last-epoch top-1 side by side), published baselines, problems."""
    lines = [
        "| dataset | pair | method | runs | best top-1 | last-epoch top-1 | last top-5 | vs KD | vs DKD | published | Δ published |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        runs = f"{r.runs}" if not r.progress else f"{r.runs} ({r.runs - r.finished} unfinished: {r.progress})"
        lines.append(
            f"| {r.dataset} | {r.pair} | {r.method} | {runs} | {_pm(r.best_mean, r.best_std)} | "
            f"{_pm(r.last_mean, r.last_std)} | {_num(r.top5_mean)} | {_num(r.gain_vs_kd, signed=True)} | "
            f"{_num(r.gain_vs_dkd, signed=True)} | {_num(r.published)} | {_num(r.diff_vs_published, signed=True)} |"
        )
    pub = published()
    pairs = sorted({(r.dataset, r.pair) for r in rows if (r.dataset, r.pair) in pub})
    if pairs:
        lines += [
            "",
            "Published top-1 on these pairs:",
            "",
            "| dataset | pair | teacher | student alone | KD | DKD | source |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for key in pairs:
            p = pub[key]
            lines.append(
                f"| {p['dataset']} | {p['pair']} | {p['teacher_acc']:.2f} | {p['student_acc']:.2f} | "
                f"{p['kd']:.2f} | {p['dkd']:.2f} | {p['source']} |"
            )
    if problems:
        lines += ["", "Skipped (unreadable):", ""] + [f"- `{path}`: {why}" for path, why in problems]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[Row]) -> str:
    """One CSV line per row, all fields."""
    buf = io.StringIO()
    fields = list(rows[0].as_dict()) if rows else list(Row.__dataclass_fields__)
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(r.as_dict())
    return buf.getvalue()


def to_json(rows: list[Row], problems=()) -> str:
    """{"rows": [...], "skipped": [{"path", "error"}]}."""
    return json.dumps(
        {"rows": [r.as_dict() for r in rows], "skipped": [{"path": str(p), "error": w} for p, w in problems]},
        indent=2,
    )


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit('plots need matplotlib: pip install "normkd-plugin[plot]"') from exc
    return plt


def plot_bars(rows: list[Row], path: str) -> None:
    """Grouped bars: pairs on x, one bar per method (mean best top-1, error bar = std over seeds);
    published KD/DKD numbers as markers."""
    plt = _pyplot()
    pairs = sorted({(r.dataset, r.pair) for r in rows})
    methods = list(dict.fromkeys(r.method for r in rows))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(pairs) * max(1, len(methods)) / 2), 4.5))
    index = {key: i for i, key in enumerate(pairs)}
    for j, method in enumerate(methods):
        sel = [r for r in rows if r.method == method and r.best_mean is not None]
        xs = [index[(r.dataset, r.pair)] + (j - (len(methods) - 1) / 2) * width for r in sel]
        ax.bar(xs, [r.best_mean for r in sel], width, yerr=[r.best_std or 0 for r in sel], capsize=3, label=method)
    pub = published()
    values = [r.best_mean for r in rows if r.best_mean is not None]
    for name, marker in (("kd", "v"), ("dkd", "^")):
        pts = [(index[k], pub[k][name]) for k in pairs if k in pub]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color="black", zorder=3, label=f"published {name.upper()}")
            values += [y for _, y in pts]
    ax.set_xticks(range(len(pairs)), [p for _, p in pairs], rotation=20)
    ax.set_ylabel("top-1 (%)")
    if values:
        ax.set_ylim(max(0, min(values) - 5), min(100, max(values) + 5))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(runs: list[Run], path: str) -> None:
    """Test top-1 per epoch, one line per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        curve = run.curve()
        if curve:
            label = f"{run.pair} {run.method} ({run.trainer})" + (f" seed {run.seed}" if run.seed is not None else "")
            ax.plot(*zip(*curve), label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
