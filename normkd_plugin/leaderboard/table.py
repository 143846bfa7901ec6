"""Aggregate runs per (dataset, pair, method) and put published numbers beside them."""

from __future__ import annotations

import csv
import importlib.resources
import math
import statistics
from dataclasses import asdict, dataclass, field, fields, replace

from .results import SHARED_SECTIONS, Run
from .stats import Diff, compare

__all__ = [
    "Row", "published", "aggregate", "mean_std", "method_label", "samples", "compare_rows", "baseline_row",
    "groups", "split_duplicates",
]  # fmt: skip


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample std); std is None for fewer than two values, both None for none; non-finite values raise."""
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"non-finite value among {values}")
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def published() -> dict[tuple[str, str], dict]:
    """{(dataset, pair): row} from the packaged published.csv (teacher, student, KD, DKD, the schedule's epochs, source)."""
    text = importlib.resources.files("normkd_plugin.leaderboard").joinpath("published.csv").read_text()
    out = {}
    for row in csv.DictReader(text.splitlines()):
        for key in ("teacher_acc", "student_acc", "kd", "dkd"):
            row[key] = float(row[key])
        row["epochs"] = int(row["epochs"])
        out[(row["dataset"], row["pair"])] = row
    return out


@dataclass
class Row:
    """One (dataset, pair, method, trainer) cell of the leaderboard.

    Means and stds are over the finished usable runs (all usable runs while none has finished);
    failed runs are counted in ``failed``, runs whose numbers cannot be a run's (``Run.invalid``) in
    ``invalid``, and neither is ever averaged; a duplicate (see
    ``split_duplicates``) is counted once, the others in ``duplicates``. ``vs_kd_best`` and the
    like are the difference of this method to KD / DKD (same trainer when it has runs, else the host's)
    in best or last-epoch top-1, paired over shared seeds or else Welch (see stats.compare).
    """

    dataset: str
    pair: str
    method: str  # with the trainer when it is not the host's: "normkd (fast)"
    trainer: str
    setting: str  # the keys that set these runs apart from others of the method ("SOLVER.EPOCHS=2"), or ""
    runs: int  # usable runs (finished or not)
    finished: int
    failed: int  # failed runs, listed apart
    invalid: int  # runs with numbers that cannot be a run's (not finite, not an accuracy, best_acc that disagrees)
    duplicates: int  # copies of a counted run (identical worklog), listed apart
    progress: str  # epochs done / planned per unfinished run, "" when all finished
    best_mean: float | None
    best_std: float | None
    last_mean: float | None
    last_std: float | None
    top5_mean: float | None
    gain_vs_kd: float | None  # best_mean − the KD row's best_mean
    gain_vs_dkd: float | None
    vs_kd_best: Diff | None
    vs_kd_last: Diff | None
    vs_dkd_best: Diff | None
    vs_dkd_last: Diff | None
    published: float | None
    published_source: str
    diff_vs_published: float | None  # best_mean − published, only for runs of the published schedule
    members: list[Run] = field(default_factory=list, repr=False, compare=False)  # every run of the cell but copies
    copies: list[tuple[Run, Run]] = field(default_factory=list, repr=False, compare=False)  # (copy, run it repeats)

    @property
    def base_method(self) -> str:
        """The method without its trainer: "normkd" for "normkd (fast)"."""
        suffix = f" ({self.trainer})"
        return self.method[: -len(suffix)] if self.method.endswith(suffix) else self.method

    @property
    def failed_runs(self) -> list[Run]:
        """The cell's failed runs (a final ``failed`` line, valid numbers)."""
        return [r for r in self.members if r.status == "failed"]

    @property
    def invalid_runs(self) -> list[Run]:
        """The cell's invalid runs."""
        return [r for r in self.members if r.invalid is not None]

    def as_dict(self) -> dict:
        """Every field but ``members`` and ``copies``; the vs_* differences as nested dicts (None when absent)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in ("members", "copies")}

    def flat(self) -> dict:
        """as_dict with the vs_* differences spread into ``vs_kd_best_mean``-style keys, plus
        ``failed_runs`` and ``invalid_runs``: "path: reason" of each failed or invalid run and ``duplicate_runs``:
        "path: duplicate of path" of each copy, joined by "; " (for CSV)."""
        out = {}
        for key, value in self.as_dict().items():
            if key.startswith("vs_"):
                for sub in Diff.__dataclass_fields__:
                    out[f"{key}_{sub}"] = None if value is None else value[sub]
            else:
                out[key] = value
        out["failed_runs"] = "; ".join(f"{r.path}: {r.problem}" for r in self.failed_runs)
        out["invalid_runs"] = "; ".join(f"{r.path}: {r.problem}" for r in self.invalid_runs)
        out["duplicate_runs"] = "; ".join(f"{copy.path}: duplicate of {run.path}" for copy, run in self.copies)
        return out


def _plain(value):
    return asdict(value) if isinstance(value, Diff) else value


def _published_schedule(runs: list[Run], epochs: int) -> bool:
    """Whether no run is known to differ from the published schedule (its epochs, whole epochs of data)."""
    return all(r.epochs_planned in (None, epochs) and not r.settings.get("SOLVER.FAST.ITERS_PER_EPOCH") for r in runs)


def _usable(group: list[Run]) -> list[Run]:
    return [r for r in group if r.problem is None]


def _counted(group: list[Run]) -> list[Run]:
    """The runs a mean is taken over: the finished usable ones, or all usable ones while none has finished."""
    usable = _usable(group)
    return [r for r in usable if r.finished] or usable


def method_label(run: Run) -> str:
    """The method name, with the trainer when it is not the host's base trainer."""
    return run.method if run.trainer in ("", "base") else f"{run.method} ({run.trainer})"


def samples(row: Row, metric: str = "best") -> list[tuple[int | None, float]]:
    """(seed, best or last-epoch top-1) of the row's finished usable runs."""
    if metric not in ("best", "last"):
        raise ValueError(f"metric must be 'best' or 'last', not {metric!r}")
    runs = [r for r in _usable(row.members) if r.finished]
    return [(r.seed, r.best_acc if metric == "best" else r.last_acc) for r in runs]


def compare_rows(ours: Row, base: Row, metric: str = "best") -> Diff:
    """ours − base in best or last-epoch top-1 over finished usable runs: paired over the seeds both have
    when both rows use one trainer, else Welch (stats.compare)."""
    a, b = samples(ours, metric), samples(base, metric)
    if not a or not b:
        empty = ours if not a else base
        return Diff("", len(a), len(b), None, None, None, None, f"no finished {empty.method} runs", base.method)
    return replace(compare(a, b, pairable=ours.trainer == base.trainer), baseline=base.method)


def shared(row: Row) -> dict:
    """The settings of the shared sections (not the method's own node, nor the trainer) that every run of
    the row has with one value: what a baseline row must agree with."""
    runs = row.members
    keys = set.intersection(*(set(r.settings) for r in runs)) if runs else set()
    keys = {k for k in keys if k.split(".")[0] in SHARED_SECTIONS and k != "SOLVER.TRAINER"}
    return {k: runs[0].settings[k] for k in keys if len({repr(r.settings[k]) for r in runs}) == 1}


def compatible(a: Row, b: Row) -> bool:
    """Whether rows a and b were trained alike in the shared settings both record."""
    sa, sb = shared(a), shared(b)
    return all(sa[k] == sb[k] for k in sa.keys() & sb.keys())


def baseline_row(rows: list[Row], row: Row, method: str, trainer: str | None = None) -> Row | None:
    """The ``method`` row on row's dataset and pair trained alike (``compatible``): of ``trainer`` when given,
    else of row's trainer, else of the host's; None when there is none, or several, to choose from."""
    cands = [
        r for r in rows if (r.dataset, r.pair, r.base_method) == (row.dataset, row.pair, method) and compatible(r, row)
    ]
    for want in [trainer] if trainer else [row.trainer, "base"]:
        found = [r for r in cands if r.trainer == want]
        if found:
            return found[0] if len(found) == 1 else None
    return None


def _split_by_settings(group: list[Run]) -> dict[str, list[Run]]:
    """{label: runs} of runs trained alike: the keys that every run records and whose values differ name each
    part ("SOLVER.EPOCHS=2"); one part labelled "" when all runs were trained alike."""
    keys = set.intersection(*(set(r.settings) for r in group))
    varying = sorted(k for k in keys if len({repr(r.settings[k]) for r in group}) > 1)
    parts: dict[str, list[Run]] = {}
    for run in group:
        label = ", ".join(f"{k}={run.settings[k]}" for k in varying)
        parts.setdefault(label, []).append(run)
    return parts


def split_duplicates(group: list[Run]) -> tuple[list[Run], list[tuple[Run, Run]]]:
    """(runs, copies) of runs of one cell and settings: usable runs of one seed whose worklogs hold the same
    epoch records and best_acc are one run, the first by path counted (in ``runs``, in the group's order)
    and each other listed as (copy, the counted run). Unseeded, failed and non-finite runs, and runs with no
    epoch yet, are never copies."""
    first: dict[tuple, Run] = {}
    copies = []
    for run in sorted(group, key=lambda r: r.path.parts):
        if run.seed is None or run.problem is not None or not run.log.epochs:
            continue
        key = (run.seed, run.log.key)
        if key in first:
            copies.append((run, first[key]))
        else:
            first[key] = run
    copied = {id(copy) for copy, _ in copies}
    return [r for r in group if id(r) not in copied], copies


def groups(runs: list[Run]) -> dict[tuple[str, str, str, str], list[Run]]:
    """{(dataset, pair, method label, settings label): runs}: the runs each leaderboard row is made of,
    the settings label naming what sets them apart from other runs of the method ("" when nothing does)."""
    cells: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        cells.setdefault((run.dataset, run.pair, method_label(run)), []).append(run)
    out: dict[tuple[str, str, str, str], list[Run]] = {}  # runs with other settings are never averaged
    for key, cell in cells.items():
        for setting, part in _split_by_settings(cell).items():
            out[(*key, setting)] = part
    return out


def aggregate(runs: list[Run]) -> list[Row]:
    """Leaderboard rows, pairs and methods in a stable order (KD and DKD first)."""
    parts = groups(runs)
    pub = published()
    order = {"kd": 0, "dkd": 1, "normkd": 2, "normdkd": 3}
    rows = []
    for key in sorted(parts, key=lambda k: (k[0], k[1], order.get(k[2].split()[0], 9), k[2], k[3])):
        dataset, pair, method, setting = key
        group, copies = split_duplicates(parts[key])
        counted = _counted(group)
        best_m, best_s = mean_std([r.best_acc for r in counted if r.best_acc is not None])
        last_m, last_s = mean_std([r.last_acc for r in counted if r.last_acc is not None])
        top5_m, _ = mean_std([r.last_top5 for r in counted if r.last_top5 is not None])
        ref = pub.get((dataset, pair), {})
        base_method = group[0].method
        ref_value = ref.get(base_method) if base_method in ("kd", "dkd") else None
        usable = _usable(group)
        invalid = [r for r in group if r.invalid is not None]
        unfinished = [r for r in usable if not r.finished]
        rows.append(
            Row(
                dataset=dataset,
                pair=pair,
                method=method,
                trainer=group[0].trainer or "base",
                setting=setting,
                runs=len(usable),
                finished=len(usable) - len(unfinished),
                failed=len(group) - len(usable) - len(invalid),
                invalid=len(invalid),
                duplicates=len(copies),
                progress=", ".join(f"{r.epochs_done}/{r.epochs_planned or '?'}" for r in unfinished),
                best_mean=best_m,
                best_std=best_s,
                last_mean=last_m,
                last_std=last_s,
                top5_mean=top5_m,
                gain_vs_kd=None,
                gain_vs_dkd=None,
                vs_kd_best=None,
                vs_kd_last=None,
                vs_dkd_best=None,
                vs_dkd_last=None,
                published=ref_value,
                published_source=ref.get("source", "") if ref_value is not None else "",
                diff_vs_published=(
                    best_m - ref_value
                    if ref_value is not None and best_m is not None and _published_schedule(counted, ref["epochs"])
                    else None
                ),
                members=group,
                copies=copies,
            )
        )
    for row in rows:
        for name in ("kd", "dkd"):
            base = None if row.base_method == name else baseline_row(rows, row, name)
            if base is None:
                continue
            if row.best_mean is not None and base.best_mean is not None:
                setattr(row, f"gain_vs_{name}", row.best_mean - base.best_mean)
            setattr(row, f"vs_{name}_best", compare_rows(row, base, "best"))
            setattr(row, f"vs_{name}_last", compare_rows(row, base, "last"))
    return rows
