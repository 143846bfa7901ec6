"""Aggregate runs per (dataset, pair, method) and put published numbers beside them."""

from __future__ import annotations

import csv
import importlib.resources
import statistics
from dataclasses import asdict, dataclass

from .runs import Run

__all__ = ["Row", "published", "aggregate", "mean_std"]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample std); std is None for fewer than two values, both None for none."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def published() -> dict[tuple[str, str], dict]:
    """{(dataset, pair): row} from the packaged published.csv (teacher, student, KD, DKD, source)."""
    text = importlib.resources.files("normkd_plugin.leaderboard").joinpath("published.csv").read_text()
    out = {}
    for row in csv.DictReader(text.splitlines()):
        for key in ("teacher_acc", "student_acc", "kd", "dkd"):
            row[key] = float(row[key])
        out[(row["dataset"], row["pair"])] = row
    return out


@dataclass
class Row:
    """One (dataset, pair, method) cell of the leaderboard."""

    dataset: str
    pair: str
    method: str
    runs: int
    finished: int
    progress: str  # epochs done / planned per unfinished run, "" when all finished
    best_mean: float | None
    best_std: float | None
    last_mean: float | None
    last_std: float | None
    top5_mean: float | None
    gain_vs_kd: float | None
    gain_vs_dkd: float | None
    published: float | None
    published_source: str
    diff_vs_published: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def _counted(group: list[Run]) -> list[Run]:
    """The runs a mean is taken over: the finished ones, or all while none has finished."""
    finished = [r for r in group if r.finished]
    return finished or group


def method_label(run: Run) -> str:
    """The method name, with the trainer when it is not the host's base trainer."""
    return run.method if run.trainer in ("", "base") else f"{run.method} ({run.trainer})"


def aggregate(runs: list[Run]) -> list[Row]:
    """Leaderboard rows, pairs and methods in a stable order (KD and DKD first)."""
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.dataset, run.pair, method_label(run)), []).append(run)
    best_means = {
        k: mean_std([r.best_acc for r in _counted(v) if r.best_acc is not None])[0] for k, v in groups.items()
    }
    pub = published()
    order = {"kd": 0, "dkd": 1, "normkd": 2, "normdkd": 3}
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], order.get(k[2].split()[0], 9), k[2])):
        dataset, pair, method = key
        group = groups[key]
        counted = _counted(group)
        best_m, best_s = mean_std([r.best_acc for r in counted if r.best_acc is not None])
        last_m, last_s = mean_std([r.last_acc for r in counted if r.last_acc is not None])
        top5_m, _ = mean_std([r.last_top5 for r in counted if r.last_top5 is not None])
        kd, dkd = best_means.get((dataset, pair, "kd")), best_means.get((dataset, pair, "dkd"))
        ref = pub.get((dataset, pair), {})
        ref_value = ref.get(method) if method in ("kd", "dkd") else None
        unfinished = [r for r in group if not r.finished]
        rows.append(
            Row(
                dataset=dataset,
                pair=pair,
                method=method,
                runs=len(group),
                finished=len(group) - len(unfinished),
                progress=", ".join(f"{r.epochs_done}/{r.epochs_planned or '?'}" for r in unfinished),
                best_mean=best_m,
                best_std=best_s,
                last_mean=last_m,
                last_std=last_s,
                top5_mean=top5_m,
                gain_vs_kd=None if kd is None or best_m is None or method == "kd" else best_m - kd,
                gain_vs_dkd=None if dkd is None or best_m is None or method == "dkd" else best_m - dkd,
                published=ref_value,
                published_source=ref.get("source", "") if ref_value is not None else "",
                diff_vs_published=None if ref_value is None or best_m is None else best_m - ref_value,
            )
        )
    return rows
