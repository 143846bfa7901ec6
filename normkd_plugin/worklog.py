"""The host's ``worklog.txt``: written and read here, with the one meaning of a finished run.

mdistiller's ``BaseTrainer`` writes, per epoch, a block of dashed lines around ``key: value``
lines (``epoch``, ``lr`` and its log_dict, each value with two decimals, every line ending in
``os.linesep``), and once the last epoch is done ``best_acc<TAB>NN.NN`` without a newline. A run
of this package that stops on a non-finite loss ends it with ``failed<TAB>reason`` instead.

A worklog is **finished** when its epoch blocks are epochs 1 to the run's last epoch (its
``SOLVER.EPOCHS``; the last logged one when that is unknown), followed by a ``best_acc`` line whose
value is the best logged ``test_acc`` to the printed two decimals. The run folder, the sweep and
the leaderboard all decide it with :func:`finished`. Its numbers are **invalid** when one is not
finite, when an accuracy lies outside [0, 100], or when a ``best_acc`` line ends a log that is not
finished (:func:`invalid`).
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "WORKLOG",
    "NONFINITE_CAUSES",
    "Worklog",
    "epoch_record",
    "WorklogError",
    "block",
    "best_line",
    "failed_line",
    "blocks_through",
    "records",
    "parse",
    "decode",
    "read",
    "finished",
    "invalid",
    "status",
    "last_epoch",
]

WORKLOG = "worklog.txt"
ACCURACIES = ("train_acc", "test_acc", "test_acc_top5", "best_acc")  # the percentages of a worklog
_DASHES = "-" * 25
# What a worklog's ``failed`` line suggests after a non-finite loss (both trainers).
NONFINITE_CAUSES = (
    "likely causes: a learning rate or loss weight too large, a temperature near 0, "
    "or non-finite teacher weights or data"
)


# -- writing ------------------------------------------------------------------------------------


def epoch_record(train_acc: float, train_loss: float, test_acc: float, test_top5: float, test_loss: float) -> dict:
    """The host's per-epoch log_dict, in its order: the values of a worklog block and tensorboard."""
    return OrderedDict(
        train_acc=train_acc, train_loss=train_loss, test_acc=test_acc, test_acc_top5=test_top5, test_loss=test_loss
    )


def block(epoch: int, lr: float, record: dict[str, float]) -> str:
    """One epoch as BaseTrainer.log writes it: dashes, ``epoch: N``, ``lr: 0.05``, each value ``key: %.2f``, dashes."""
    lines = [_DASHES, f"epoch: {epoch}", f"lr: {float(lr):.2f}"]
    lines += [f"{key}: {value:.2f}" for key, value in record.items()]
    lines.append(_DASHES)
    return "".join(line + os.linesep for line in lines)


def best_line(best_acc: float) -> str:
    """The host's last line, ``best_acc<TAB>%.2f`` with no newline (BaseTrainer.train)."""
    return f"best_acc\t{float(best_acc):.2f}"


def failed_line(reason: str) -> str:
    """The last line of a run that gave up: ``failed<TAB>reason`` and a newline."""
    return f"failed\t{reason}{os.linesep}"


# -- the repair view: complete blocks, whatever else the file holds ------------------------------


def blocks_through(text: str, epoch: int) -> str:
    """The complete blocks of epochs <= ``epoch``, as written; partial blocks and end lines dropped.

    A block of epoch k that comes again replaces the earlier blocks from k on: mdistiller's trainer writes
    an epoch's block before its checkpoint, so a run killed between the two writes that epoch again when
    it resumes, and the later block is the one its checkpoints continue."""
    kept: list[tuple[int, list[str]]] = []
    lines = None
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped and set(stripped) == {"-"} and (lines is None or line.endswith("\n")):
            if lines is None:
                lines = [line]
                continue
            lines.append(line)
            number = next((b.split(":", 1)[1] for b in lines if b.startswith("epoch:")), None)
            if number is not None and number.strip().isdigit() and int(number) <= epoch:
                kept = [(n, block) for n, block in kept if n < int(number)]
                kept.append((int(number), lines))
            lines = None
        elif lines is not None:
            lines.append(line)
    return "".join(line for _, block in kept for line in block)


def records(text: str) -> list[dict]:
    """{"epoch", "lr", "record"} of each complete, readable block (values as written: two decimals)."""
    out = []
    for chunk in re.findall(r"^-+\n(epoch: \d+\n.*?)^-+\n", blocks_through(text, 1 << 62), re.M | re.S):
        pairs = [line.split(": ", 1) for line in chunk.splitlines() if ": " in line]
        try:
            values = OrderedDict((k, float(v)) for k, v in pairs if k not in ("epoch", "lr"))
            head = dict(pairs[:2])
            out.append({"epoch": int(head["epoch"]), "lr": float(head["lr"]), "record": values})
        except (KeyError, ValueError):  # a damaged block: not a record
            continue
    return out


# -- reading ------------------------------------------------------------------------------------


class WorklogError(ValueError):
    """A worklog.txt that does not follow the host's format; the message names the line."""


@dataclass
class Worklog:
    """The epoch blocks of a worklog ({"epoch": N, key: value, ...}), its final best_acc (None while
    unfinished) and the reason of a final ``failed`` line (None unless the run gave up)."""

    epochs: list[dict] = field(default_factory=list)
    best_acc: float | None = None
    failed: str | None = None

    @functools.cached_property
    def key(self) -> str:
        """The epoch records and best_acc as one string (runs that hold the same are copies); computed once."""
        return f"{self.epochs!r}|{self.best_acc!r}"


_NUMBER = r"[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"
_BEST = re.compile(rf"best_acc\t({_NUMBER})(.*)")
_FAILED = re.compile(r"failed\t(.*)")
QUOTE_MAX = 200  # characters of a malformed line quoted in a message


def _quote(raw: str) -> str:
    """``raw`` as repr, at most QUOTE_MAX characters of it (a junk worklog must not flood the output)."""
    if len(raw) <= QUOTE_MAX:
        return repr(raw)
    return f"{raw[:QUOTE_MAX]!r}... ({len(raw)} characters)"


# The host's own blocks (its log_dict keys, in its order), matched whole by one regex: the fast path.
_HOST_KEYS = ("lr", "train_acc", "train_loss", "test_acc", "test_acc_top5", "test_loss")
_VALUE = r"([-+0-9.eEnaif]+)"
_HOST_BLOCK = r"-+\nepoch: (\d+)\n" + "".join(rf"{k}: {_VALUE}\n" for k in _HOST_KEYS) + r"-+\n"
_HOST_LOG = re.compile(rf"(?:{_HOST_BLOCK})*(?:best_acc\t{_VALUE})?\s*")
_HOST_BLOCKS = re.compile(_HOST_BLOCK)


def _parse_host_worklog(text: str) -> Worklog | None:
    """The worklog when it is exactly the host's blocks (and a best_acc line), else None (the general parser)."""
    whole = _HOST_LOG.fullmatch(text)
    if whole is None:
        return None
    best = whole.group(whole.re.groups)
    try:
        keys = ("epoch", *_HOST_KEYS)
        epochs = [dict(zip(keys, (int(e), *map(float, rest)))) for e, *rest in _HOST_BLOCKS.findall(text)]
        best = float(best) if best is not None else None
    except ValueError:
        return None
    if any(a["epoch"] >= b["epoch"] for a, b in zip(epochs, epochs[1:])):
        return None  # the general parser names the line
    return Worklog(epochs=epochs, best_acc=best)


def parse(text: str) -> Worklog:
    """The host's worklog: dashed blocks of ``key: value`` lines with strictly increasing ``epoch``, then at
    most one final ``best_acc\\tNN.NN`` or ``failed\\t<reason>`` line; WorklogError naming the line otherwise.
    A block cut off at the end (a kill while it was written) is left out."""
    fast = _parse_host_worklog(text)
    if fast is not None:
        return fast
    out = Worklog()
    lines: dict | None = None  # the open block
    epoch_line = 0  # line of the open block's epoch line
    final: tuple[int, str] | None = None  # (line, "best_acc" | "failed") of the line that must end the log
    for lineno, raw in enumerate(text.splitlines(), 1):
        raw = raw.rstrip("\r")
        line = raw.strip()
        if not line:
            continue
        if final is not None:
            raise WorklogError(
                f"line {lineno}: {_quote(raw)} after the {final[1]} line (line {final[0]}), which must end the log"
            )
        if line.startswith("best_acc") or (lines is None and line.startswith("failed")):
            word = "best_acc" if line.startswith("best_acc") else "failed"
            if lines is not None:
                raise WorklogError(f"line {lineno}: {word} line inside an unterminated block")
            m = (_BEST if word == "best_acc" else _FAILED).fullmatch(raw.lstrip())
            if not m:
                raise WorklogError(f"line {lineno}: malformed {word} line {_quote(raw)}")
            if word == "failed":
                out.failed = m.group(1).strip() or "no reason given"
            elif m.group(2).strip():
                raise WorklogError(f"line {lineno}: text after the best_acc value: {_quote(m.group(2).strip())}")
            else:
                out.best_acc = float(m.group(1))
            final = (lineno, word)
            continue
        if set(line) == {"-"}:
            if lines is None:
                lines = {}
            else:
                if "epoch" not in lines:
                    raise WorklogError(f"line {lineno}: block without an epoch line")
                if out.epochs and lines["epoch"] <= out.epochs[-1]["epoch"]:
                    previous = out.epochs[-1]["epoch"]
                    how = "repeats" if lines["epoch"] == previous else f"goes back (previous epoch {previous})"
                    raise WorklogError(f"line {epoch_line}: epoch {lines['epoch']} {how}")
                out.epochs.append(lines)
                lines = None
            continue
        if lines is None:
            raise WorklogError(f"line {lineno}: {_quote(raw)} outside a dashed block")
        key, sep, value = line.partition(": ")
        if not sep:
            raise WorklogError(f"line {lineno}: expected 'key: value', got {_quote(raw)}")
        try:
            lines[key] = int(value) if key == "epoch" else float(value)
        except ValueError as exc:
            raise WorklogError(f"line {lineno}: {key[:QUOTE_MAX]} has non-numeric value {_quote(value)}") from exc
        if key == "epoch":
            epoch_line = lineno
    return out


def decode(data: bytes) -> str:
    """``data`` as UTF-8 text; WorklogError naming the first byte that is not (a binary or damaged file)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WorklogError(f"not a text file: byte {exc.start} (0x{data[exc.start]:02x}) is not UTF-8") from None


def read(path: str | os.PathLike) -> Worklog:
    """The parsed worklog file at ``path``; OSError when it cannot be read, WorklogError when it is not one."""
    return parse(decode(Path(path).read_bytes()))


# -- what a worklog says about its run -----------------------------------------------------------


def _not_finished(log: Worklog, last_epoch: int | None) -> str | None:
    """Why ``log`` is not finished (see the module's docstring), or None when it is."""
    if log.failed is not None:
        return f"failed: {log.failed}"
    if log.best_acc is None:
        return "no best_acc line"
    numbers = [e["epoch"] for e in log.epochs]
    if not numbers:
        return "a best_acc line without any epoch block before it"
    last = numbers[-1] if last_epoch is None else last_epoch
    if numbers != list(range(1, last + 1)):
        return f"best_acc after epochs {numbers[0]}-{numbers[-1]} ({len(numbers)} blocks), not after epochs 1-{last}"
    logged = [e["test_acc"] for e in log.epochs if "test_acc" in e]
    if not logged:
        return "best_acc after epoch blocks without a test_acc"
    best = max(logged)
    if f"{log.best_acc:.2f}" != f"{best:.2f}":
        return f"best_acc {log.best_acc:.2f} is not the best logged test_acc ({best:.2f})"
    return None


def finished(log: Worklog, last_epoch: int | None = None) -> bool:
    """Blocks of epochs 1..``last_epoch`` (the last logged when None), then best_acc == max test_acc to 2 decimals."""
    return _not_finished(log, last_epoch) is None


def _bad_value(key: str, value: float) -> str | None:
    if not math.isfinite(value):
        return f"non-finite {key} ({value})"
    if key in ACCURACIES and not 0.0 <= value <= 100.0:
        return f"{key} {value:g} is outside [0, 100]"
    return None


def invalid(log: Worklog, last_epoch: int | None = None) -> str | None:
    """Why ``log``'s numbers cannot be a run's (a value not finite, an accuracy outside [0, 100], a best_acc line
    ending a log that is not finished), or None."""
    for e in log.epochs:
        for key, value in e.items():
            if not 0.0 <= value <= 100.0 and key != "epoch":  # (nan fails the comparison too)
                bad = _bad_value(key, value)
                if bad is not None:
                    return f"{bad} at epoch {e['epoch']}"
    if log.best_acc is not None:
        return _bad_value("best_acc", log.best_acc) or _not_finished(log, last_epoch)
    return None


def status(text: str, last_epoch: int | None = None) -> str:
    """'new' (nothing written), 'finished' (see finished), 'failed' (a final failed line) or 'started' (anything
    else, a damaged worklog included)."""
    if not text.strip():
        return "new"
    try:
        log = parse(text)
    except WorklogError:
        return "started"
    if finished(log, last_epoch):
        return "finished"
    return "failed" if log.failed is not None else "started"


def last_epoch(config_text: str | None) -> int | None:
    """SOLVER.EPOCHS of a config dump (a run's config.yaml), None when it gives no whole number."""
    import yaml

    try:
        cfg = yaml.load(config_text or "", Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return None
    solver = cfg.get("SOLVER") if isinstance(cfg, dict) else None
    epochs = solver.get("EPOCHS") if isinstance(solver, dict) else None
    return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0 else None
