"""Leaderboard output: Markdown, CSV, JSON, a grouped bar chart and accuracy curves."""

from __future__ import annotations

import csv
import io
import json

from .field import Placed, Table, display_name, placed_row, protocol_of
from .results import Run
from .stats import Diff
from .table import Row, _published_schedule, groups, method_label, published, split_duplicates

__all__ = [
    "markdown",
    "to_csv",
    "to_json",
    "failed_runs",
    "invalid_runs",
    "duplicate_runs",
    "plot_bars",
    "curves_figure",
    "plot_curves",
    "field_markdown",
    "field_json",
    "latex",
    "tex",
]


def _num(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _pm(mean: float | None, std: float | None) -> str:
    return _num(mean) if std is None else f"{_num(mean)} ± {_num(std)}"


def _diff(diff) -> str:
    return "–" if diff is None else diff.text()


def _runs(r: Row) -> str:
    notes = []
    if r.progress:
        notes.append(f"{r.runs - r.finished} unfinished: {r.progress}")
    if r.failed:
        notes.append(f"{r.failed} failed")
    if r.invalid:
        notes.append(f"{r.invalid} invalid")
    if r.duplicates:
        notes.append(f"{r.duplicates} duplicate{'s' if r.duplicates > 1 else ''}")
    return f"{r.runs}" + (f" ({'; '.join(notes)})" if notes else "")


HEADER = (
    "| dataset | pair | method | runs | best top-1 | last-epoch top-1 | last top-5 "
    "| vs KD (best, 95 % CI) | vs DKD (best, 95 % CI) | published | Δ published |"
)

LEGEND = (
    "vs KD / vs DKD: this method − KD / DKD in best top-1 (same trainer when it has runs), finished runs only. "
    "*paired*: mean of per-seed differences over the seeds both have, Student's t with n−1 dof; "
    "*welch*: difference of means when no seed is shared, Welch–Satterthwaite dof (n = method/baseline runs); "
    "no CI below 2 pairs (or 2 runs a side)."
)


def failed_runs(rows: list[Row]) -> list[Run]:
    """Every failed run of the rows, in row order."""
    return [run for r in rows for run in r.failed_runs]


def invalid_runs(rows: list[Row]) -> list[Run]:
    """Every invalid run of the rows (numbers that cannot be a run's), in row order."""
    return [run for r in rows for run in r.invalid_runs]


def duplicate_runs(rows: list[Row]) -> list[tuple[Run, Run]]:
    """(copy, the run it repeats) of every duplicate run of the rows, in row order."""
    return [pair for r in rows for pair in r.copies]


def markdown(rows: list[Row], problems=()) -> str:
    """A Markdown table (best and last-epoch top-1, differences to KD and DKD with 95 % intervals),
    published baselines, then failed runs, duplicate runs and unreadable folders."""
    lines = [HEADER, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.dataset} | {r.pair} | {r.method}{f' [{r.setting}]' if r.setting else ''} | {_runs(r)} | {_pm(r.best_mean, r.best_std)} | "
            f"{_pm(r.last_mean, r.last_std)} | {_num(r.top5_mean)} | {_diff(r.vs_kd_best)} | "
            f"{_diff(r.vs_dkd_best)} | {_num(r.published)} | {_num(r.diff_vs_published, signed=True)} |"
        )
    if any(r.vs_kd_best or r.vs_dkd_best for r in rows):
        lines += ["", LEGEND]
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
    invalid = invalid_runs(rows)
    if invalid:
        lines += ["", "Invalid runs (numbers no run can have; in no mean or difference; --check fails):", ""]
        lines += [f"- `{run.path}` ({_identity(run)}): {run.problem}" for run in invalid]
    failed = failed_runs(rows)
    if failed:
        lines += ["", "Failed runs (not in any mean or difference):", ""]
        lines += [f"- `{run.path}` ({_identity(run)}): {run.problem}" for run in failed]
    copies = duplicate_runs(rows)
    if copies:
        lines += ["", "Duplicate runs (the same worklog as a counted run; counted once):", ""]
        lines += [f"- `{copy.path}` ({_identity(copy)}): duplicate of `{run.path}`" for copy, run in copies]
    if problems:
        lines += ["", "Skipped (could not be read):", ""] + [f"- `{path}`: {why}" for path, why in problems]
    return "\n".join(lines) + "\n"


def _identity(run: Run) -> str:
    seed = "" if run.seed is None else f", seed {run.seed}"
    return f"{run.dataset}/{run.pair}/{method_label(run)}{seed}"


def to_csv(rows: list[Row]) -> str:
    """One CSV line per row: every field, the vs_* differences spread into columns
    (vs_kd_best_mean, _low, _high, _kind, _n, ...), failed_runs and invalid_runs ("path: reason; ...")."""
    buf = io.StringIO()
    fields = list(rows[0].flat()) if rows else _flat_fields()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(r.flat())
    return buf.getvalue()


def _flat_fields() -> list[str]:
    out = []
    for name in Row.__dataclass_fields__:
        if name in ("members", "copies"):
            continue
        out += [f"{name}_{sub}" for sub in Diff.__dataclass_fields__] if name.startswith("vs_") else [name]
    return out + ["failed_runs", "invalid_runs", "duplicate_runs"]


def to_json(rows: list[Row], problems=()) -> str:
    """{"rows": [...], "failed" and "invalid": [{"path", "dataset", "pair", "method", "seed", "status", "reason"}],
    "duplicates": [{"path", "dataset", "pair", "method", "seed", "duplicate_of"}], "skipped": [{"path", "error"}]};
    a row's vs_* differences are nested objects."""

    def listed(run: Run) -> dict:
        return {
            "path": str(run.path),
            "dataset": run.dataset,
            "pair": run.pair,
            "method": method_label(run),
            "seed": run.seed,
            "status": run.status,
            "reason": run.problem,
        }

    duplicates = [
        {
            "path": str(copy.path),
            "dataset": copy.dataset,
            "pair": copy.pair,
            "method": method_label(copy),
            "seed": copy.seed,
            "duplicate_of": str(run.path),
        }
        for copy, run in duplicate_runs(rows)
    ]
    return json.dumps(
        {
            "rows": [r.as_dict() for r in rows],
            "failed": [listed(run) for run in failed_runs(rows)],
            "invalid": [listed(run) for run in invalid_runs(rows)],
            "duplicates": duplicates,
            "skipped": [{"path": str(p), "error": w} for p, w in problems],
        },
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


def bars_figure(rows: list[Row]):
    """Grouped bars: pairs on x, one bar per method and settings (mean best top-1, error bar = std over seeds);
    the published KD/DKD numbers as markers at the pairs whose runs all follow the published schedule.

    Rows of a method split by settings ("normkd (fast) [SOLVER.EPOCHS=2]") get bars of their own. The
    published markers (240 epochs on CIFAR-100) are left out beside shorter runs, which they would
    only flatten; the title says so.
    """
    plt = _pyplot()
    pairs = sorted({(r.dataset, r.pair) for r in rows})
    labels = list(dict.fromkeys(_bar_label(r) for r in rows))
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(pairs) * max(1, len(labels)) / 2), 4.5))
    index = {key: i for i, key in enumerate(pairs)}
    for j, label in enumerate(labels):
        sel = [r for r in rows if _bar_label(r) == label and r.best_mean is not None]
        xs = [index[(r.dataset, r.pair)] + (j - (len(labels) - 1) / 2) * width for r in sel]
        ax.bar(xs, [r.best_mean for r in sel], width, yerr=[r.best_std or 0 for r in sel], capsize=3, label=label)
    pub = published()
    values = [r.best_mean for r in rows if r.best_mean is not None]
    alike = [
        k
        for k in pairs
        if k in pub and all(_published_schedule(r.members, pub[k]["epochs"]) for r in rows if (r.dataset, r.pair) == k)
    ]
    for name, marker in (("kd", "v"), ("dkd", "^")):
        pts = [(index[k], pub[k][name]) for k in alike if pub[k].get(name) is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color="black", zorder=3, label=f"published {name.upper()}")
            values += [y for _, y in pts]
    left_out = [p for k in pairs if k in pub and k not in alike for p in [k[1]]]
    if left_out:
        ax.set_title(
            f"published KD/DKD not drawn for {', '.join(left_out)}: its runs are not of the published schedule",
            fontsize=8,
        )
    ax.set_xticks(range(len(pairs)), [p for _, p in pairs], rotation=20)
    ax.set_ylabel("top-1 (%)")
    if values:
        ax.set_ylim(max(0, min(values) - 5), min(100, max(values) + 5))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _bar_label(row: Row) -> str:
    return row.method + (f" [{row.setting}]" if row.setting else "")


def plot_bars(rows: list[Row], path: str) -> None:
    """Save bars_figure(rows) to path."""
    plt = _pyplot()
    fig = bars_figure(rows)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves_figure(runs: list[Run]):
    """A figure of test top-1 per epoch (whole-epoch ticks), one line per run but duplicates, each labelled
    "pair method (trainer) seed N", with the table's settings label ("[SOLVER.EPOCHS=2]") when runs of the
    method differ in settings."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (_, _, _, setting), group in groups(runs).items():
        for run in split_duplicates(group)[0]:
            curve = run.curve()
            if curve:
                label = f"{run.pair} {run.method} ({run.trainer})" + (f" [{setting}]" if setting else "")
                ax.plot(*zip(*curve), label=label + (f" seed {run.seed}" if run.seed is not None else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_curves(runs: list[Run], path: str) -> list[str]:
    """Save curves_figure(runs) to path; returns its legend's labels."""
    plt = _pyplot()
    fig = curves_figure(runs)
    legend = fig.axes[0].get_legend()
    labels = [text.get_text() for text in legend.get_texts()] if legend else []
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return labels


# ---- the published field and LaTeX ----------------------------------------------------------------------------


def _field_header(t: Table) -> str:
    yours = any(line.yours for line in t.lines)
    basis = f"rows of {t.protocol.text()} with standard augmentation" if t.protocol.epochs else "rows of one protocol"
    who = f"your runs: {t.protocol.text()}" if yours else "no runs of yours on this pair"
    return f"Published field, {t.dataset}/{t.pair} ({who}; rank: best-epoch top-1 among the {basis}):"


def field_markdown(tables: list[Table]) -> str:
    """Each pair's published field with the user's rows placed in it: rank (or – with what differs named),
    best and last-epoch top-1, runs and protocol, source; then the sources in full."""
    lines: list[str] = []
    for t in tables:
        lines += [
            "",
            _field_header(t),
            "",
            "| rank | method | best top-1 | last-epoch top-1 | runs | epochs | augmentation | source | unlike your runs |",
            "|---:|---|---:|---:|---|---:|---|---|---|",
        ]
        for p in t.lines:
            label = f"**{p.label}**" if p.yours else p.label
            lines.append(
                f"| {p.rank or '–'} | {label} | {_pm(p.best, p.best_std)} | {_pm(p.last, p.last_std)} | "
                f"{p.runs or 'not stated'} | {p.epochs or '–'} | {p.augmentation} | {p.source_name} | "
                f"{'; '.join(p.differs)} |"
            )
        lines += ["", "Sources: " + "; ".join(t.sources) + "."]
    return "\n".join(lines) + ("\n" if lines else "")


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}  # fmt: skip


def tex(text: str) -> str:
    """``text`` with LaTeX's special characters escaped."""
    return "".join(_TEX.get(c, c) for c in str(text))


def _tex_pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "--"
    return f"{mean:.2f}" if std is None else f"${mean:.2f} \\pm {std:.2f}$"


def latex(rows: list[Row], tables: list[Table]) -> str:
    """A booktabs tabular: per pair, the user's rows (mean ± sample std over seeds of best and last-epoch top-1)
    and the published field (best top-1, marked by a source letter; † strong augmentation, * best or last
    epoch not stated), then a legend of the sources. Needs ``\\usepackage{booktabs}``."""
    blocks: list[tuple[str, list[Placed]]] = [(_title(t.dataset, t.teacher, t.student), t.lines) for t in tables]
    alone: dict[str, list[Placed]] = {}  # pairs without a published field: the user's rows alone
    for r in rows:
        if not any((t.dataset, t.pair) == (r.dataset, r.pair) for t in tables):
            title = _title(r.dataset, r.members[0].teacher, r.members[0].student)
            alone.setdefault(title, []).append(placed_row(r, protocol_of(r)))
    blocks += list(alone.items())
    letters: dict[str, str] = {}
    for t in tables:
        for source in t.sources:
            letters.setdefault(source, chr(ord("a") + len(letters)))
    out = [
        "% normkd-leaderboard --format latex (needs \\usepackage{booktabs})",
        "\\begin{tabular}{lrrrrl}",
        "\\toprule",
        "Method & Runs & Best top-1 (\\%) & Last top-1 (\\%) & Epochs & Source \\\\",
    ]
    marks = set()
    for title, lines in blocks:
        out += ["\\midrule", f"\\multicolumn{{6}}{{l}}{{\\textit{{{title}}}}} \\\\"]
        for p in lines:
            epochs = "--" if p.epochs is None else str(p.epochs)
            if p.augmentation == "strong":
                epochs += "$^\\dagger$"
                marks.add("strong")
            best = _tex_pm(p.best, p.best_std)
            if not p.yours and not p.metric and p.method != "teacher":
                best += "$^\\ast$"
                marks.add("metric")
            runs = tex(p.runs.replace(" seeds", "").replace(" seed", "")) if p.runs else "--"
            source = "ours" if p.yours else letters[p.source]
            out.append(
                f"{tex(_paper_label(p))} & {runs} & {best} & {_tex_pm(p.last, p.last_std)} & {epochs} & {source} \\\\"
            )
    out.append("\\bottomrule")
    notes = [f"{letter}: {tex(source)}" for source, letter in letters.items()]
    notes.append("ours: mean $\\pm$ sample std over seeds of the best and of the last epoch's top-1")
    if "strong" in marks:
        notes.append("$^\\dagger$ 480 epochs with a RandAugment view (strong augmentation)")
    if "metric" in marks:
        notes.append("$^\\ast$ best or last epoch not stated")
    out += [f"\\multicolumn{{6}}{{l}}{{\\footnotesize {note}}} \\\\" for note in notes]
    out.append("\\end{tabular}")
    return "\n".join(out) + "\n"


def _title(dataset: str, teacher: str, student: str) -> str:
    names = {"cifar100": "CIFAR-100", "imagenet": "ImageNet", "tiny_imagenet": "Tiny-ImageNet"}
    return f"{tex(names.get(dataset, dataset))}: {tex(teacher)} $\\rightarrow$ {tex(student)}"


def _paper_label(p: Placed) -> str:
    """The user's rows by the method's paper name, with their trainer and settings ("NormKD (fast)")."""
    return display_name(p.method) + p.label[len(p.method) :] if p.yours else p.label


def field_json(tables: list[Table]) -> list[dict]:
    """The field tables as JSON-ready dicts."""
    return [t.as_dict() for t in tables]
