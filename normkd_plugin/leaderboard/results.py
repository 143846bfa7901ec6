"""Find mdistiller run folders and read them: ``worklog.txt``, plus ``config.yaml`` when present.

Needs neither mdistiller nor a GPU. A run's identity (dataset, method, teacher, student, seed)
comes from ``config.yaml`` (written by normkd-train) or, failing that, from the folder name the
host's tools/train.py writes: ``<PROJECT>/<method>,<teacher>,<student>[,KEY:VALUE...]``.
"""

from __future__ import annotations

import errno
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import worklog
from ..config import UNTRAINED_KEYS, flatten
from ..pairs import find_pair
from ..worklog import Worklog, WorklogError
from ..worklog import parse as parse_worklog

__all__ = ["Worklog", "Run", "WorklogError", "parse_worklog", "read_run", "run_folders", "discover_runs"]


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

    @functools.cached_property
    def finished(self) -> bool:
        """Whether the worklog is finished (``worklog.finished``: every epoch up to the planned last, then best_acc)."""
        return worklog.finished(self.log, self.epochs_planned)

    @functools.cached_property
    def invalid(self) -> str | None:
        """Why the worklog's numbers cannot be a run's (``worklog.invalid``), else None."""
        return worklog.invalid(self.log, self.epochs_planned)

    @property
    def problem(self) -> str | None:
        """Why the run must not be counted: its numbers are invalid, or its ``failed`` reason; else None."""
        if self.invalid is not None:
            return self.invalid
        return f"failed: {self.log.failed}" if self.log.failed is not None else None

    @property
    def status(self) -> str:
        """One of "invalid", "failed", "finished", "unfinished"."""
        if self.invalid is not None:
            return "invalid"
        if self.log.failed is not None:
            return "failed"
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

_READ = ("DATASET", "DISTILLER", "EXPERIMENT", "SOLVER")  # the sections the leaderboard reads, + the method's own


def load_config_text(text: str) -> dict:
    """The sections of a config.yaml the leaderboard reads (DATASET, DISTILLER, EXPERIMENT, SOLVER and the
    method's own node), parsed alone: a dump holds every method's node, and the rest is not read. A file
    that does not split into top-level sections (or uses an alias across them) is parsed whole."""
    sections = {}
    for piece in re.split(r"\n(?=\S)", text):
        name = piece.split(":", 1)[0]
        if name.isidentifier():
            sections.setdefault(name, []).append(piece)
    try:
        out = {}
        for name in _READ:
            for piece in sections.get(name, []):
                out.update(yaml.load(piece, Loader=_LOADER) or {})
        own = str((out.get("DISTILLER") or {}).get("TYPE", ""))
        for piece in sections.get(own, []) if own not in _READ else []:
            out.update(yaml.load(piece, Loader=_LOADER) or {})
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
    epochs = cfg.get("SOLVER", {}).get("EPOCHS")
    return dict(
        dataset=cfg.get("DATASET", {}).get("TYPE", "cifar100"),
        method=str(cfg["DISTILLER"]["TYPE"]).lower(),
        teacher=cfg["DISTILLER"]["TEACHER"],
        student=cfg["DISTILLER"]["STUDENT"],
        seed=seed if seed is not None and seed >= 0 else None,
        epochs_planned=epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None,
        trainer=cfg.get("SOLVER", {}).get("TRAINER", "base"),
        settings=trained_settings(cfg),
    )


_ALIASES = {"normkd_w_dkd": "normdkd"}


def read_run(folder: Path) -> Run:
    """Read one run folder (raises WorklogError, OSError or yaml.YAMLError on unreadable files)."""
    folder = Path(folder)
    log = worklog.read(folder / worklog.WORKLOG)
    config = folder / "config.yaml"
    ident = _identity_from_config(config) if config.is_file() else _identity_from_name(folder)
    ident["method"] = _ALIASES.get(ident["method"], ident["method"])
    ident["trainer"] = str(ident["trainer"] or "base")
    return Run(path=folder, log=log, **ident)


def _why(exc: OSError, path: Path) -> str:
    """An OS error on ``path`` in words: a dangling or looping symbolic link says so."""
    if os.path.islink(path) and exc.errno in (errno.ENOENT, errno.ELOOP):
        what = "loops" if exc.errno == errno.ELOOP else "is dangling"
        return f"a symbolic link to {os.readlink(path)} that {what}"
    name = errno.errorcode.get(exc.errno or 0)
    return f"{exc.strerror or exc}" + (f" ({name})" if name else "")


def run_folders(root: Path, skipped: list[tuple[Path, str]]) -> list[Path]:
    """The folders at and below ``root`` holding a worklog.txt, by path, following symbolic links to folders
    (each real folder once, so a link loop ends); each path that cannot be read (a folder that cannot be
    listed, a dangling or looping link, a worklog.txt that is not a file) is added to ``skipped`` as (path, why)."""
    found, seen, todo = [], set(), [root]
    while todo:
        folder = todo.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skipped.append((folder, _why(exc, folder)))
            continue
        below = []
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_symlink():
                    os.stat(path)  # the link's target: raises when it is dangling or loops
                is_dir = entry.is_dir()
            except OSError as exc:
                skipped.append((path, _why(exc, path)))
                continue
            if entry.name == worklog.WORKLOG:
                if entry.is_file():
                    found.append(folder)
                else:
                    skipped.append((path, "not a file"))
            elif is_dir:
                below.append(path)
        todo += reversed(below)
    return sorted(found, key=lambda p: (p != root, p.parts))


def discover_runs(paths) -> tuple[list[Run], list[tuple[Path, str]]]:
    """(runs, skipped): every folder below ``paths`` (or of a worklog.txt given) holding a worklog.txt, through
    symbolic links, each real folder once; what cannot be read (see ``run_folders``) or is not a run's
    worklog is in ``skipped`` as (path, why), by path, not fatal. Failed and invalid runs are runs (see Run.problem)."""
    runs, problems = [], []
    seen = set()
    for root in map(Path, paths):
        if not root.exists():
            problems.append((root, "no such file or directory"))
            continue
        if root.is_file():
            candidates = [root.parent] if root.name == worklog.WORKLOG else []
        else:
            candidates = run_folders(root, problems)
        for folder in candidates:
            if os.path.realpath(folder) in seen:
                continue
            seen.add(os.path.realpath(folder))
            try:
                runs.append(read_run(folder))
            except (OSError, WorklogError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
                why = " ".join(str(exc).split())
                problems.append((folder, f"{type(exc).__name__}: {why[:300]}{'...' if len(why) > 300 else ''}"))
    return runs, sorted(problems, key=lambda p: p[0].parts)
