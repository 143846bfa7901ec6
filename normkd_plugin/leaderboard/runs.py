"""Find mdistiller run folders and read them: ``worklog.txt``, plus ``config.yaml`` when present.

Needs neither mdistiller nor a GPU. A run's identity (dataset, method, teacher, student, seed)
comes from ``config.yaml`` (written by normkd-train) or, failing that, from the folder name the
host's tools/train.py writes: ``<PROJECT>/<method>,<teacher>,<student>[,KEY:VALUE...]``.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import UNTRAINED_KEYS, flatten
from ..pairs import find_pair

log = logging.getLogger(__name__)

__all__ = ["Worklog", "Run", "WorklogError", "parse_worklog", "read_run", "discover_runs"]


class WorklogError(ValueError):
    """A worklog.txt that does not follow the host's format."""


@dataclass
class Worklog:
    """The per-epoch records of a worklog, its final best_acc line (None while unfinished) and the
    reason of a final ``failed`` line (None unless the training code gave up on the run)."""

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
        keys, number = ("epoch", *_HOST_KEYS), float
        epochs = [dict(zip(keys, (int(e), *map(number, rest)))) for e, *rest in _HOST_BLOCKS.findall(text)]
        best = float(best) if best is not None else None
    except ValueError:
        return None
    if any(a["epoch"] >= b["epoch"] for a, b in zip(epochs, epochs[1:])):
        return None  # the general parser names the line
    return Worklog(epochs=epochs, best_acc=best)


def parse_worklog(text: str) -> Worklog:
    """Parse the host's worklog.txt: dashed blocks of ``key: value`` lines with strictly increasing
    ``epoch``, then at most one final ``best_acc\\tNN.NN`` or ``failed\\t<reason>`` line."""
    fast = _parse_host_worklog(text)
    if fast is not None:
        return fast
    out = Worklog()
    block: dict | None = None
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
        if line.startswith("best_acc") or (block is None and line.startswith("failed")):
            word = "best_acc" if line.startswith("best_acc") else "failed"
            if block is not None:
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
            if block is None:
                block = {}
            else:
                if "epoch" not in block:
                    raise WorklogError(f"line {lineno}: block without an epoch line")
                if out.epochs and block["epoch"] <= out.epochs[-1]["epoch"]:
                    previous = out.epochs[-1]["epoch"]
                    how = "repeats" if block["epoch"] == previous else f"goes back (previous epoch {previous})"
                    raise WorklogError(f"line {epoch_line}: epoch {block['epoch']} {how}")
                out.epochs.append(block)
                block = None
            continue
        if block is None:
            raise WorklogError(f"line {lineno}: {_quote(raw)} outside a dashed block")
        key, sep, value = line.partition(": ")
        if not sep:
            raise WorklogError(f"line {lineno}: expected 'key: value', got {_quote(raw)}")
        try:
            block[key] = int(value) if key == "epoch" else float(value)
        except ValueError as exc:
            raise WorklogError(f"line {lineno}: {key[:QUOTE_MAX]} has non-numeric value {_quote(value)}") from exc
        if key == "epoch":
            epoch_line = lineno
    if block:  # a block cut off mid-write by an interrupted run
        log.debug("ignoring an unterminated block at the end of the worklog")
    return out


_ACCURACIES = ("test_acc", "test_acc_top5")


@dataclass
class Run:
    """One run folder: its identity, its per-epoch accuracies and whether it finished."""

    path: Path
    dataset: str
    method: str
    teacher: str
    student: str
    seed: int | None
    epochs_planned: int | None
    log: Worklog
    trainer: str = "base"
    settings: dict = field(default_factory=dict)  # what was trained: config keys (or folder overrides) but the seed

    @property
    def pair(self) -> str:
        """The benchmark's pair stem when known (res32x4_res8x4), else teacher_student."""
        p = find_pair(self.dataset, self.teacher, self.student)
        return p.stem if p else f"{self.teacher}_{self.student}"

    @property
    def finished(self) -> bool:
        """True once the best_acc line is written."""
        return self.log.best_acc is not None

    @functools.cached_property
    def problem(self) -> str | None:
        """Why the run must not be counted: its ``failed`` reason or its first non-finite accuracy; else None."""
        if self.log.failed is not None:
            return f"failed: {self.log.failed}"
        for e in self.log.epochs:
            for key in _ACCURACIES:
                if key in e and not math.isfinite(e[key]):
                    return f"non-finite {key} ({e[key]}) at epoch {e['epoch']}"
        if self.log.best_acc is not None and not math.isfinite(self.log.best_acc):
            return f"non-finite best_acc ({self.log.best_acc})"
        return None

    @property
    def status(self) -> str:
        """One of "failed", "non-finite", "finished", "unfinished"."""
        if self.log.failed is not None:
            return "failed"
        if self.problem is not None:
            return "non-finite"
        return "finished" if self.finished else "unfinished"

    @property
    def epochs_done(self) -> int:
        """Number of complete epoch blocks in the worklog."""
        return len(self.log.epochs)

    @property
    def best_acc(self) -> float | None:
        """The host's best_acc when finished, else the maximum so far."""
        if self.log.best_acc is not None:
            return self.log.best_acc
        return max((e["test_acc"] for e in self.log.epochs), default=None)

    @property
    def last_acc(self) -> float | None:
        """Test top-1 of the last logged epoch (None before the first)."""
        return self.log.epochs[-1]["test_acc"] if self.log.epochs else None

    @property
    def last_top5(self) -> float | None:
        """Test top-5 of the last logged epoch, when logged."""
        return self.log.epochs[-1].get("test_acc_top5") if self.log.epochs else None

    def curve(self) -> list[tuple[int, float]]:
        """(epoch, test top-1) per logged epoch."""
        return [(e["epoch"], e["test_acc"]) for e in self.log.epochs]


# mdistiller's tools/train.py appends its first override tag to the TAG without a comma
# ("kd,res32x4,res8x4SOLVER.LR:0.1"); split such a glued tag off again.
_GLUED = re.compile(r"(?<=[a-z0-9_])(?=[A-Z][A-Z0-9_]*\.[A-Z0-9_.]+:)")


def _identity_from_name(folder: Path) -> dict:
    tokens = [t for tok in folder.name.split(",") for t in _GLUED.split(tok)]
    if len(tokens) < 3:
        raise WorklogError(f"{folder}: no config.yaml and the folder name is not method,teacher,student[,...]")
    seed, trainer, epochs, settings = None, "base", None, {}
    for tok in tokens[3:]:
        key, sep, value = tok.partition(":")
        if sep and key != "seed":  # a KEY:VALUE override of the host's run name
            settings[key] = value
        if key == "seed":
            seed = int(value)
        elif key == "SOLVER.TRAINER":
            trainer = value
        elif key == "SOLVER.EPOCHS":
            epochs = int(value)
    dataset = "imagenet" if "imagenet" in folder.parent.name.lower() else "cifar100"
    return dict(
        dataset=dataset, method=tokens[0].lower(), teacher=tokens[1], student=tokens[2],
        seed=seed, epochs_planned=epochs, trainer=trainer, settings=settings,
    )  # fmt: skip


SHARED_SECTIONS = ("DATASET", "DISTILLER", "SOLVER")  # what every method of a comparison shares


def trained_settings(cfg: dict) -> dict:
    """The config keys that change what is trained: the shared sections and the method's own node
    (``cfg[DISTILLER.TYPE]``), without the method's name, the seed, paths and how it is run (UNTRAINED_KEYS)."""
    own = str(cfg.get("DISTILLER", {}).get("TYPE", ""))
    sections = {k: v for k, v in cfg.items() if k in SHARED_SECTIONS or k == own}
    return {k: v for k, v in flatten(sections).items() if not k.startswith(UNTRAINED_KEYS) and k != "DISTILLER.TYPE"}


# libyaml's parser where PyYAML was built with it (about 10x the pure-Python one); the same safe constructor.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.lru_cache(maxsize=4096)
def _section(text: str):
    return yaml.load(text, Loader=_LOADER)


_READ = ("DATASET", "DISTILLER", "EXPERIMENT", "SOLVER")  # the sections the leaderboard reads, + the method's own


def load_config_text(text: str) -> dict:
    """The sections of a config.yaml the leaderboard reads (DATASET, DISTILLER, EXPERIMENT, SOLVER and the
    method's own node), each parsed once per distinct text: runs of a grid share all but EXPERIMENT. A file
    that does not split into top-level sections (or uses an alias across them) is parsed whole.
    Do not mutate the result: sections are shared between runs."""
    sections = {}
    for piece in re.split(r"\n(?=\S)", text):
        name = piece.split(":", 1)[0]
        if name.isidentifier():
            sections.setdefault(name, []).append(piece)
    try:
        out = {}
        for name in _READ:
            for piece in sections.get(name, []):
                out.update(_section(piece) or {})
        own = str((out.get("DISTILLER") or {}).get("TYPE", ""))
        for piece in sections.get(own, []) if own not in _READ else []:
            out.update(_section(piece) or {})
        if all(isinstance(v, dict) for v in out.values()):
            return out
    except (yaml.YAMLError, TypeError, ValueError, AttributeError):
        pass
    whole = yaml.load(text, Loader=_LOADER)
    return whole if isinstance(whole, dict) else {}


def _identity_from_config(path: Path) -> dict:
    cfg = load_config_text(path.read_text())
    if not isinstance(cfg, dict):
        raise WorklogError(f"{path}: not a mapping of config keys")
    seed = cfg.get("EXPERIMENT", {}).get("SEED", -1)
    return dict(
        dataset=cfg.get("DATASET", {}).get("TYPE", "cifar100"),
        method=str(cfg["DISTILLER"]["TYPE"]).lower(),
        teacher=cfg["DISTILLER"]["TEACHER"],
        student=cfg["DISTILLER"]["STUDENT"],
        seed=seed if seed is not None and seed >= 0 else None,
        epochs_planned=cfg.get("SOLVER", {}).get("EPOCHS"),
        trainer=cfg.get("SOLVER", {}).get("TRAINER", "base"),
        settings=trained_settings(cfg),
    )


_ALIASES = {"normkd_w_dkd": "normdkd"}


def read_run(folder: Path) -> Run:
    """Read one run folder (raises WorklogError, OSError or yaml.YAMLError on unreadable files)."""
    folder = Path(folder)
    text = (folder / "worklog.txt").read_text()
    worklog = parse_worklog(text)
    config = folder / "config.yaml"
    ident = _identity_from_config(config) if config.is_file() else _identity_from_name(folder)
    ident["method"] = _ALIASES.get(ident["method"], ident["method"])
    ident["trainer"] = str(ident["trainer"] or "base")
    return Run(path=folder, log=worklog, **ident)


def discover_runs(paths) -> tuple[list[Run], list[tuple[Path, str]]]:
    """(runs, problems): every folder below ``paths`` (or of a worklog.txt given) holding a worklog.txt;
    unreadable or malformed ones are reported as problems, not fatal. Failed runs are runs (see Run.problem)."""
    runs, problems = [], []
    seen = set()
    for root in map(Path, paths):
        if not root.exists():
            problems.append((root, "no such file or directory"))
            continue
        if root.is_file():
            candidates = [root.parent] if root.name == "worklog.txt" else []
        else:
            candidates = [root] if (root / "worklog.txt").is_file() else []
            candidates += sorted(p.parent for p in root.rglob("worklog.txt") if p.parent != root)
        for folder in candidates:
            if folder.resolve() in seen:
                continue
            seen.add(folder.resolve())
            try:
                runs.append(read_run(folder))
            except (OSError, WorklogError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
                why = " ".join(str(exc).split())
                problems.append((folder, f"{type(exc).__name__}: {why[:300]}{'...' if len(why) > 300 else ''}"))
    return runs, problems
