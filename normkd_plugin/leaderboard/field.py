"""The published field: every method the benchmark's sources report on a pair, each with its protocol, and a
pair's runs placed among them.

The numbers are in ``field/*.csv``, one file per source, each transcribed from what it names:

* ``mdistiller.csv``: mdistiller's README (a08d46f): KD and DKD on every CIFAR-100 and ImageNet pair, KD+DOT
  (its DOT tables, Tiny-ImageNet included), OFD and ReviewKD (the table in its figure, resnet32x4 → resnet8x4).
* ``crd.csv``: the CRD benchmark's README (HobbitLong/RepDistiller): teacher, student alone, FitNet, AT, RKD, CRD,
  and KD on the two pairs mdistiller's README has not.
* ``lskd.csv``: logit standardization's README (sunshangquan/logit-standardization-KD): KD+LS, CTKD, CTKD+LS,
  DKD+LS, MLKD, MLKD+LS, and KD/DKD on its pairs mdistiller's README has not.

One row per (dataset, pair, method). Columns: ``dataset, pair`` (the plugin's stem, else ``teacher_student`` as
the leaderboard names other pairs), ``teacher, student`` (mdistiller model keys), ``method`` (the leaderboard's
name: DISTILLER.TYPE in lower case, ``none`` for the student alone, ``teacher``, ``kd_dot`` for KD under the DOT
trainer), ``label``, ``top1`` (%), ``epochs`` (empty: not stated), ``metric`` (``best``: the best epoch's
accuracy; empty: not stated), ``runs`` (a count, ``several``: averaged, count not stated; empty: not stated),
``augmentation`` (``standard``: random crop and flip; ``strong``: MLKD's extra RandAugment view), ``source``,
``note``.

Protocol facts beyond the tables: mdistiller's trainer reports ``best_acc``, the best epoch, and LSKD follows it
(its issue #23); LSKD's README reports averages over runs ("average operation"); MLKD and MLKD+LS train 480 epochs
with a RandAugment view (LSKD's MLKD configs and tools/train.py, and its issue #3 quoting the paper: "the epoch
number is 240, except for MLKD being 480"); the CRD benchmark trains 240 epochs (``train_student.py``).
"""

from __future__ import annotations

import csv
import difflib
import functools
import importlib.resources
from dataclasses import dataclass, field

from ..errors import UserError
from .table import Row

__all__ = [
    "Entry", "Placed", "Protocol", "Table", "FieldError", "entries", "field_of", "protocol_of", "placed_row", "place",
    "tables", "find",
]  # fmt: skip

COLUMNS = (
    "dataset", "pair", "teacher", "student", "method", "label", "top1", "epochs", "metric", "runs",
    "augmentation", "source", "note",
)  # fmt: skip


class FieldError(UserError, ValueError):
    """A pair with no published field, or a malformed field file; the message names it."""


@dataclass(frozen=True)
class Entry:
    """One published number: a method on a pair, with the protocol it was obtained under."""

    dataset: str
    pair: str
    teacher: str
    student: str
    method: str
    label: str
    top1: float
    epochs: int | None
    metric: str  # "best" or "" (not stated)
    runs: str  # "3", "several" (averaged, count not stated) or "" (not stated)
    augmentation: str  # "standard" or "strong"
    source: str
    note: str

    @property
    def source_name(self) -> str:
        """The source's short name: mdistiller, CRD, LSKD."""
        return self.source.split()[0]


def _parse(name: str, lineno: int, raw: dict) -> Entry:
    where = f"field/{name}, line {lineno}"
    if set(raw) != set(COLUMNS) or None in raw.values():
        raise FieldError(f"{where}: expected the columns {', '.join(COLUMNS)}")
    try:
        top1 = float(raw["top1"])
        epochs = int(raw["epochs"]) if raw["epochs"] else None
    except ValueError as exc:
        raise FieldError(f"{where}: {exc}") from None
    if not 0 <= top1 <= 100 or raw["metric"] not in ("best", "") or raw["augmentation"] not in ("standard", "strong"):
        raise FieldError(f"{where}: top1 must be a percentage, metric best or empty, augmentation standard or strong")
    return Entry(**{**raw, "top1": top1, "epochs": epochs})


@functools.cache
def entries() -> tuple[Entry, ...]:
    """Every row of the packaged field files (read once); FieldError for a malformed row or a (dataset, pair, method)
    twice."""
    folder = importlib.resources.files("normkd_plugin.leaderboard").joinpath("field")
    out, seen = [], {}
    for res in sorted(folder.iterdir(), key=lambda r: r.name):
        if not res.name.endswith(".csv"):
            continue
        for lineno, raw in enumerate(csv.DictReader(res.read_text().splitlines()), 2):
            entry = _parse(res.name, lineno, raw)
            key = (entry.dataset, entry.pair, entry.method)
            if key in seen:
                raise FieldError(f"field/{res.name}, line {lineno}: {'/'.join(key)} is already in {seen[key]}")
            seen[key] = f"field/{res.name}"
            out.append(entry)
    return tuple(out)


def field_of(dataset: str, pair: str) -> list[Entry]:
    """The published entries of one pair, best top-1 first."""
    return sorted((e for e in entries() if (e.dataset, e.pair) == (dataset, pair)), key=lambda e: -e.top1)


@dataclass(frozen=True)
class Protocol:
    """How runs were trained, as far as the comparison needs: epochs, and whether an epoch saw the whole split."""

    epochs: int | None
    partial: bool = False  # SOLVER.FAST.ITERS_PER_EPOCH: epochs of a few steps

    def text(self) -> str:
        """ "240 epochs" / "2 epochs of a few steps" / "epochs not recorded"."""
        if self.epochs is None:
            return "epochs not recorded"
        return f"{self.epochs} epochs" + (" of a few steps (SOLVER.FAST.ITERS_PER_EPOCH)" if self.partial else "")


def protocol_of(row: Row) -> Protocol:
    """The protocol of a leaderboard row's runs (the plugin's trainers all use standard augmentation)."""
    planned = {r.epochs_planned for r in row.members}
    epochs = planned.pop() if len(planned) == 1 else None
    return Protocol(epochs, any(r.settings.get("SOLVER.FAST.ITERS_PER_EPOCH") for r in row.members))


def differences(entry: Entry, protocol: Protocol) -> list[str]:
    """How an entry was obtained unlike runs of ``protocol``; the first items are those that bar ranking it."""
    out = []
    if entry.method == "teacher":
        return ["the teacher"]
    if entry.epochs is None:
        out.append("epochs not stated")
    elif protocol.partial or entry.epochs != protocol.epochs:
        out.append(f"{entry.epochs} epochs")
    if entry.augmentation == "strong":
        out.append("strong augmentation (RandAugment view)")
    if not entry.metric:
        out.append("best or last epoch not stated")
    return out


def _ranked(entry: Entry, protocol: Protocol) -> bool:
    return (
        entry.method != "teacher"
        and not protocol.partial
        and entry.epochs is not None
        and entry.epochs == protocol.epochs
        and entry.augmentation == "standard"
    )


@dataclass
class Placed:
    """One line of a pair's field: a published entry or one of the user's rows, with its rank when ranked."""

    label: str
    method: str
    best: float | None
    best_std: float | None
    last: float | None
    last_std: float | None
    runs: str
    epochs: int | None
    augmentation: str
    metric: str
    source: str  # the full citation; "" for the user's rows
    differs: list[str] = field(default_factory=list)
    rank: int | None = None
    yours: bool = False

    @property
    def source_name(self) -> str:
        """The source's short name (mdistiller, CRD, LSKD), "yours" for the user's rows."""
        return self.source.split()[0] if self.source else "yours"

    def as_dict(self) -> dict:
        """Every field, for JSON."""
        return dict(self.__dict__)


@dataclass
class Table:
    """A pair's field placed against one protocol: the user's rows trained under it, and every published entry."""

    dataset: str
    pair: str
    teacher: str
    student: str
    protocol: Protocol
    lines: list[Placed]
    sources: list[str]  # full citations, in the order of their first line

    def as_dict(self) -> dict:
        """The table for JSON."""
        return {
            "dataset": self.dataset,
            "pair": self.pair,
            "teacher": self.teacher,
            "student": self.student,
            "protocol": self.protocol.text(),
            "lines": [line.as_dict() for line in self.lines],
            "sources": self.sources,
        }


NAMES = {"normkd": "NormKD", "normdkd": "NormDKD", "kd_ls": "KD+LS", "dkd_ls": "DKD+LS", "none": "student alone"}


def display_name(method: str) -> str:
    """A method's name as papers write it: NormKD, DKD+LS, KD+DOT, ... (the method key when none is known)."""
    known = {e.method: e.label for e in entries()}
    return NAMES.get(method) or known.get(method) or method


def placed_row(row: Row, protocol: Protocol) -> Placed:
    """A leaderboard row as a line of the field: mean ± std over its finished seeds, unranked while unfinished."""
    label = row.method + (f" [{row.setting}]" if row.setting else "")
    differs = [] if row.finished else ["unfinished" + (f": {row.progress}" if row.progress else "")]
    return Placed(
        label, row.base_method, row.best_mean, row.best_std, row.last_mean, row.last_std,
        f"{row.finished} seed{'s' if row.finished != 1 else ''}" if row.finished else f"{row.runs} unfinished",
        protocol.epochs, "standard", "best and last", "", differs, yours=True,
    )  # fmt: skip


def place(dataset: str, pair: str, rows: list[Row], protocol: Protocol | None = None) -> Table:
    """The pair's published entries and ``rows`` (the user's rows of that pair, all of ``protocol``), best first;
    the user's finished rows and the entries of the same epochs with standard augmentation ranked by best top-1
    (competition ranking: ties share a rank), every other entry shown unranked with what differs named.
    Without rows, the protocol is the epochs most of the pair's entries have."""
    published = field_of(dataset, pair)
    if protocol is None:
        if rows:
            protocol = protocol_of(rows[0])
        else:
            counts = [e.epochs for e in published if e.epochs is not None and e.method != "teacher"]
            protocol = Protocol(max(set(counts), key=counts.count) if counts else None)
    lines = [placed_row(r, protocol) for r in rows]
    for e in published:
        lines.append(
            Placed(
                e.label, e.method, e.top1, None, None, None, e.runs, e.epochs, e.augmentation, e.metric,
                e.source, differences(e, protocol),
            )
        )  # fmt: skip
    ranked = [
        line
        for line, r in zip(lines, [*rows, *published])
        if line.best is not None and (line.yours and not line.differs or not line.yours and _ranked(r, protocol))
    ]
    for line in ranked:
        line.rank = 1 + sum(other.best > line.best for other in ranked)
    lines.sort(key=lambda line: (line.best is None, -(line.best or 0.0), not line.yours))
    sources = list(dict.fromkeys(e.source for e in published))
    first = published[0] if published else rows[0].members[0]
    return Table(dataset, pair, first.teacher, first.student, protocol, lines, sources)


def _pairs_with_a_field() -> list[tuple[str, str]]:
    return sorted({(e.dataset, e.pair) for e in entries()})


def find(name: str) -> tuple[str, str]:
    """(dataset, pair) of ``pair`` or ``dataset/pair`` among the pairs with a published field; FieldError otherwise."""
    known = _pairs_with_a_field()
    dataset, _, pair = name.rpartition("/")
    hits = [k for k in known if k[1] == pair and dataset in ("", k[0])]
    if len(hits) == 1:
        return hits[0]
    names = [f"{d}/{p}" for d, p in known]
    near = difflib.get_close_matches(name, names + [p for _, p in known], n=3, cutoff=0.5)
    if len(hits) > 1:
        raise FieldError(
            f"--field {name!r}: several datasets have this pair; name one of {', '.join(f'{d}/{p}' for d, p in hits)}"
        )
    hint = f"did you mean {', '.join(near)}?" if near else f"pairs with one: {', '.join(names)}"
    raise FieldError(f"--field {name!r}: no published field for this pair; {hint}")


def tables(rows: list[Row], names: list[str] = ()) -> list[Table]:
    """The fields of the pairs of ``rows`` that have one (a table per protocol of their runs), then of ``names``
    (pair or dataset/pair) that have no row; FieldError for a name with no published field."""
    wanted = [find(n) for n in names]
    known = set(_pairs_with_a_field())
    out = []
    by_pair: dict[tuple[str, str], dict[Protocol, list[Row]]] = {}
    for row in rows:
        if (row.dataset, row.pair) in known:
            by_pair.setdefault((row.dataset, row.pair), {}).setdefault(protocol_of(row), []).append(row)
    for (dataset, pair), groups in sorted(by_pair.items()):
        for protocol, members in groups.items():
            out.append(place(dataset, pair, members, protocol))
    for key in dict.fromkeys(wanted):
        if key not in by_pair:
            out.append(place(*key, []))
    return out
