"""Find mdistiller run folders and read them: ``worklog.txt``, plus ``config.yaml`` when present.

Needs neither mdistiller nor a GPU. A run's identity (dataset, method, teacher, student, seed)
comes from ``config.yaml`` (written by normkd-train) or, failing that, from the folder name the
host's tools/train.py writes: ``<PROJECT>/<method>,<teacher>,<student>[,KEY:VALUE...]``.
"""

from __future__ import annotations

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


_NUMBER = r"[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"
_BEST = re.compile(rf"best_acc\t({_NUMBER})(.*)")
_FAILED = re.compile(r"failed\t(.*)")


def parse_worklog(text: str) -> Worklog:
    """Parse the host's worklog.txt: dashed blocks of ``key: value`` lines with strictly increasing
    ``epoch``, then at most one final ``best_acc\\tNN.NN`` or ``failed\\t<reason>`` line."""
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
                f"line {lineno}: {raw!r} after the {final[1]} line (line {final[0]}), which must end the log"
            )
        if line.startswith("best_acc") or (block is None and line.startswith("failed")):
            word = "best_acc" if line.startswith("best_acc") else "failed"
            if block is not None:
                raise WorklogError(f"line {lineno}: {word} line inside an unterminated block")
            m = (_BEST if word == "best_acc" else _FAILED).fullmatch(raw.lstrip())
            if not m:
                raise WorklogError(f"line {lineno}: malformed {word} line {raw!r}")
            if word == "failed":
                out.failed = m.group(1).strip() or "no reason given"
            elif m.group(2).strip():
                raise WorklogError(f"line {lineno}: text after the best_acc value: {m.group(2).strip()!r}")
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
            raise WorklogError(f"line {lineno}: {raw!r} outside a dashed block")
        key, sep, value = line.partition(": ")
        if not sep:
            raise WorklogError(f"line {lineno}: expected 'key: value', got {raw!r}")
        try:
            block[key] = int(value) if key == "epoch" else float(value)
        except ValueError as exc:
            raise WorklogError(f"line {lineno}: {key} has non-numeric value {value!r}") from exc
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

    @property
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


def _identity_from_config(path: Path) -> dict:
    cfg = yaml.safe_load(path.read_text()) or {}
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
                problems.append((folder, f"{type(exc).__name__}: {exc}"))
    return runs, problems
