"""One run folder: its lock, atomic writes, the host's worklog format, checkpoints and resume.

Everything a ``fast`` run (solo or packed) writes goes through :class:`RunFolder`, so a kill at
any moment leaves a folder that resumes exactly:

* every file is written to a temporary file in the same folder, flushed, fsync'ed and moved over
  the old one with ``os.replace`` (a reader sees the old file or the new one, never half of one);
* an epoch is committed in a fixed order: ``latest`` (the commit point, holding the epoch's log
  record), the other checkpoints, then the worklog block. Resume loads ``latest`` and redoes
  what follows it, so files and worklog end as an uninterrupted run leaves them; worklog lines
  past the checkpoint's epoch are cut;
* ``fcntl.flock`` on ``.lock`` (holder's PID inside) keeps a second process out of the folder.

The worklog keeps the host's format (dashed ``key: value`` blocks, a last ``best_acc<TAB>NN.NN``
line); a run that stops on a non-finite loss ends with ``failed<TAB><reason>`` instead.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import tempfile
from collections import OrderedDict
from pathlib import Path

from .errors import RunError

log = logging.getLogger(__name__)

__all__ = ["RunFolder", "atomic_write", "epoch_record", "serialize", "worklog_block"]

WORKLOG = "worklog.txt"
CONFIG = "config.yaml"
LOCK = ".lock"
# Full training states a run can resume from, newest first among those readable.
_STATE_FILE = re.compile(r"^(latest|best|epoch_\d+)$")


# What a worklog's ``failed`` line suggests after a non-finite loss (both trainers).
NONFINITE_CAUSES = (
    "likely causes: a learning rate or loss weight too large, a temperature near 0, "
    "or non-finite teacher weights or data"
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write ``path`` by calling ``write(file_object)`` on a temporary sibling, fsync, then os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the files are as readable as the host's
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def serialize(state: dict) -> bytes:
    """``torch.save`` of ``state`` into bytes (written to several files without serialising again)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def epoch_record(train_acc: float, train_loss: float, test_acc: float, test_top5: float, test_loss: float) -> dict:
    """The host's per-epoch log_dict, in its order: the values of a worklog block and tensorboard."""
    return OrderedDict(
        train_acc=train_acc, train_loss=train_loss, test_acc=test_acc, test_acc_top5=test_top5, test_loss=test_loss
    )


def worklog_block(epoch: int, lr: float, record: dict[str, float]) -> str:
    """One epoch of the host's worklog.txt: dashes, epoch, lr, each value with two decimals, dashes."""
    lines = ["-" * 25, f"epoch: {epoch}", f"lr: {float(lr):.2f}"]
    lines += [f"{key}: {value:.2f}" for key, value in record.items()]
    lines.append("-" * 25)
    return "".join(line + os.linesep for line in lines)


def _blocks_through(text: str, epoch: int) -> str:
    """The complete worklog blocks of epochs <= ``epoch``; partial blocks and end lines dropped."""
    kept, block = [], None
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped and set(stripped) == {"-"}:
            if block is None:
                block = [line]
                continue
            block.append(line)
            number = next((b.split(":", 1)[1] for b in block if b.startswith("epoch:")), None)
            if number is not None and int(number) <= epoch:
                kept.extend(block)
            block = None
        elif block is not None:
            block.append(line)
    return "".join(kept)


class RunFolder:
    """The folder ``LOG.PREFIX/<run name>`` of one run."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._made: list[Path] = []  # the folders lock() created (this one and missing parents)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- lock ------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the folder's lock (idempotent); RunError naming the holder's PID if another process has it."""
        if self._lock_fd is not None:
            return
        self._made = [p for p in [self.path, *self.path.parents] if not p.exists()]  # removed again if left empty
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunError(
                    f"{self.path} is in use by another run (PID {holder}); wait for it or pick another EXPERIMENT.NAME"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        for stale in self.path.glob(".*.tmp"):  # left by a write that a kill interrupted; ours now
            stale.unlink()

    def unlock(self) -> None:
        """Release the lock (the kernel also releases it when the process dies); a folder in which nothing
        else was written (a refused or failed start) is removed."""
        if self._lock_fd is not None:
            try:
                if [p.name for p in self.path.iterdir()] == [LOCK]:
                    (self.path / LOCK).unlink()
                    self.path.rmdir()
                    for parent in self._made[1:]:  # LOG.PREFIX/<dataset>/ made for it, if empty
                        parent.rmdir()
            except OSError:  # another process came in meanwhile, or a parent holds other runs: kept
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- state of the folder ---------------------------------------------------------------
    def worklog_text(self) -> str:
        try:
            return (self.path / WORKLOG).read_text()
        except FileNotFoundError:
            return ""

    def status(self) -> str:
        """'new', 'started', 'finished' (a best_acc line) or 'failed' (a failed line)."""
        text = self.worklog_text()
        if re.search(r"^best_acc\t", text, re.M):
            return "finished"
        if re.search(r"^failed\t", text, re.M):
            return "failed"
        if text.strip() or self.has_state():
            return "started"
        return "new"

    def has_state(self) -> bool:
        """Whether a full training state (latest, best or epoch_N) is in the folder."""
        return any(_STATE_FILE.match(p.name) for p in self._files())

    def _files(self) -> list[Path]:
        return [p for p in self.path.iterdir() if p.is_file()] if self.path.is_dir() else []

    def check_start(self, resume: bool, new_ok: bool = True) -> str:
        """'start', 'resume' or 'skip' (a finished run under --resume); RunError for a start that would clobber.

        --resume is "resume or start" (detectron2's ``resume_or_load``): a folder with no run yet starts
        fresh, a run that never completed an epoch (no checkpoint) starts again from scratch, a finished
        run is skipped. So one command starts a job, continues it after a kill and is a no-op once it is
        done (the one command of a requeued scheduler job). ``new_ok=False`` keeps the old refusal of a
        --resume with nothing to resume.
        """
        status = self.status()
        if resume and status in ("started", "failed") and not self.has_state():
            log.warning("%s: %s run without a checkpoint; starting it again", self.path, status)
            return "start"
        if resume and status == "new":
            if new_ok:
                log.info("%s: no run to resume yet; starting it", self.path)
                return "start"
            raise RunError(f"--resume: {self.path} holds no run to resume; run the same command without --resume")
        if resume and status == "finished":
            log.info("%s is finished (its worklog ends with best_acc); nothing to do", self.path)
            return "skip"
        if not resume and status == "finished":
            raise RunError(
                f"{self.path} already holds a finished run; set EXPERIMENT.NAME (or LOG.PREFIX) to train it again"
            )
        if not resume and status != "new":
            raise RunError(
                f"{self.path} already holds a {status} run; add --resume to continue it, "
                "or set EXPERIMENT.NAME (or LOG.PREFIX) to start a new one"
            )
        return "resume" if resume else "start"

    def begin(self, resume: bool, cfg_text: str) -> str:
        """check_start, plus: a resume must be under the same config; a run that starts (again) gets a
        fresh worklog and this config.yaml. Returns 'start', 'resume' or 'skip'."""
        mode = self.check_start(resume)
        if mode == "resume":
            self.check_config(cfg_text)
        elif mode == "start":
            self.cut_worklog(0)
            self.write_text(CONFIG, cfg_text)
        return mode

    # -- writing ---------------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> None:
        """Atomically replace ``name`` in the folder with ``text``."""
        atomic_write(self.path / name, lambda f: f.write(text.encode()))

    def save(self, name: str, state: dict) -> None:
        """Atomically torch.save ``state`` as ``name``."""
        self.write_bytes(name, serialize(state))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomically replace ``name`` in the folder with ``data``."""
        atomic_write(self.path / name, lambda f: f.write(data))

    def check_config(self, cfg_text: str) -> None:
        """RunError unless ``cfg_text`` trains what the folder's config.yaml trained: keys of UNTRAINED_KEYS
        may change, and keys the saved file does not have (added by a later version) are not compared."""
        import yaml

        from .config import UNTRAINED_KEYS, flatten

        try:
            saved = yaml.safe_load((self.path / CONFIG).read_text())
        except FileNotFoundError:
            return
        before, after = flatten(saved), flatten(yaml.safe_load(cfg_text))
        changed = [
            k for k in sorted(before) if not k.startswith(UNTRAINED_KEYS) and before[k] != after.get(k, before[k])
        ]
        if changed:
            diffs = ", ".join(f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in changed[:3])
            raise RunError(
                f"--resume: {self.path} was started with another config ({diffs}{', ...' if len(changed) > 3 else ''}); "
                "resume with the same config, or start a new run with another EXPERIMENT.NAME"
            )

    def _append(self, text: str) -> None:
        with open(self.path / WORKLOG, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def append_epoch(self, epoch: int, lr: float, record: dict[str, float]) -> None:
        """Append the epoch's block to worklog.txt (fsync'ed)."""
        self._append(worklog_block(epoch, lr, record))

    def has_epoch(self, epoch: int) -> bool:
        """Whether the worklog holds a complete block for ``epoch``."""
        text = _blocks_through(self.worklog_text(), epoch)
        return re.search(rf"^epoch: {epoch}\s*$", text, re.M) is not None

    def commit_epoch(self, state: dict, student: dict, save_freq: int) -> None:
        """An epoch's files in crash-safe order: ``latest`` (the commit point) holding ``state`` (epoch, lr,
        record, saved_best, ...), the other checkpoints, then the worklog block. ``student``: {"model": ...}."""
        blob = serialize(state)
        self.write_bytes("latest", blob)
        self._after_latest(state, blob, serialize(student), save_freq)
        self.append_epoch(state["epoch"], state["lr"], state["record"])

    def redo_epoch(self, state: dict, student: dict, save_freq: int) -> None:
        """On resume from ``state``: cut the worklog back to its epoch and redo what follows ``latest``."""
        self.cut_worklog(state["epoch"])
        self._after_latest(state, serialize(state), serialize(student), save_freq)
        if not self.has_epoch(state["epoch"]):
            self.append_epoch(state["epoch"], state["lr"], state["record"])

    def _after_latest(self, state: dict, blob: bytes, student: bytes, save_freq: int) -> None:
        """student_latest; epoch_N and student_N every ``save_freq`` epochs; best and student_best when saved_best."""
        epoch = state["epoch"]
        self.write_bytes("student_latest", student)
        if epoch % save_freq == 0:
            self.write_bytes(f"epoch_{epoch}", blob)
            self.write_bytes(f"student_{epoch}", student)
        if state["saved_best"]:
            self.write_bytes("best", blob)
            self.write_bytes("student_best", student)

    def finish(self, best_acc: float) -> None:
        """The host's last worklog line: ``best_acc<TAB>NN.NN`` (no newline, as the host writes it)."""
        self._append(f"best_acc\t{float(best_acc):.2f}")

    def fail(self, reason: str) -> None:
        """End the worklog with ``failed<TAB>reason``; no checkpoint is touched."""
        self._append(f"failed\t{reason}{os.linesep}")

    def cut_worklog(self, epoch: int) -> None:
        """Keep only complete blocks of epochs <= ``epoch`` (drops later blocks, half blocks and end lines)."""
        text = self.worklog_text()
        kept = _blocks_through(text, epoch)
        if kept != text:
            dropped = text[len(kept) :] if text.startswith(kept) else text
            log.warning("%s: cutting worklog back to epoch %d (dropped %d characters)", self.path, epoch, len(dropped))
            self.write_text(WORKLOG, kept)

    # -- reading ---------------------------------------------------------------------------
    def load_state(self) -> dict:
        """The newest readable full training state: ``latest``, else ``epoch_N``/``best`` by epoch.

        Unreadable files are reported by name and skipped; RunError when none is readable.
        """
        import torch

        from .checkpoints import allow_release_types

        candidates = [p for p in self._files() if _STATE_FILE.match(p.name)]
        candidates.sort(key=lambda p: (p.name == "latest", p.stat().st_mtime), reverse=True)
        problems, states = [], []
        for path in candidates:
            try:
                with allow_release_types():
                    state = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(state, dict) or "epoch" not in state or "model" not in state:
                    raise ValueError("not a training state (no epoch/model)")
            except Exception as exc:  # any unreadable file: report it and try the next one
                problems.append(f"{path.name} ({type(exc).__name__}: {exc})")
                log.warning("%s: unreadable checkpoint %s: %s", self.path, path.name, exc)
                continue
            if path.name == "latest":
                return state
            states.append(state)
        if states:
            best = max(states, key=lambda s: s["epoch"])
            log.warning("%s: resuming from epoch %d, the newest readable checkpoint", self.path, best["epoch"])
            return best
        found = "; ".join(problems) or "no latest, best or epoch_N file"
        raise RunError(f"--resume: no readable checkpoint in {self.path}: {found}")
