"""One run folder: its lock, atomic writes, the host's worklog format, checkpoints and resume.

Everything a ``fast`` run (solo or packed) writes goes through :class:`RunFolder`, so a kill at
any moment leaves a folder that resumes exactly:

* every file is written to a temporary file in the same folder, flushed, fsync'ed and moved over
  the old one with ``os.replace`` (a reader sees the old file or the new one, never half of one);
* an epoch is committed in a fixed order: ``latest`` (the commit point, holding the epoch's log
  record), the other checkpoints, then the worklog block. Resume loads ``latest`` and redoes
  what follows it, so files and worklog end as an uninterrupted run leaves them; worklog lines
  past the checkpoint's epoch are cut;
* ``fcntl.flock`` on ``.lock`` (holder's PID inside) keeps a second process out of the folder;
* every state knows whose it is: the run's name, seed and config (``identity``) and the records
  of all its epochs (``records``). ``--resume`` refuses a state of another run or config, rewrites
  a missing ``config.yaml`` from it and rebuilds a cut, damaged or deleted worklog from the records;
* every state, and ``provenance.yaml``, records what the run learns from: its teacher file's SHA-256
  and its data's identity (:mod:`normkd_plugin.provenance`). ``--resume`` refuses another teacher or
  other data, by content (a moved or copied file is the same one);
* an OS error while reading or writing the folder is a :class:`FolderError` naming the path and
  the cause; SIGINT/SIGTERM are held back while an epoch commits, so a stop never half-writes one.

The worklog keeps the host's format, written and read by :mod:`.worklog` (which also says when a run
is finished); a run that stops on a non-finite loss ends with ``failed<TAB><reason>`` instead.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import signal
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import worklog
from .errors import RunError

log = logging.getLogger(__name__)

__all__ = [
    "RunFolder",
    "FolderError",
    "atomic_write",
    "epoch_record",
    "serialize",
    "committed_epochs",
    "config_digest",
]

WORKLOG = worklog.WORKLOG
CONFIG = "config.yaml"
PROVENANCE = "provenance.yaml"  # what the run learns from; config.yaml stays the host's config (loadable with --cfg)
LOCK = ".lock"
# Full training states a run can resume from, newest first among those readable.
_STATE_FILE = re.compile(r"^(latest|best|epoch_\d+)$")


# What a worklog's ``failed`` line suggests after a non-finite loss (both trainers).
NONFINITE_CAUSES = (
    "likely causes: a learning rate or loss weight too large, a temperature near 0, "
    "or non-finite teacher weights or data"
)


# The last epoch each run folder of this process committed (or resumed from), for the line a stop prints.
_COMMITTED: dict[str, int] = {}


def committed_epochs(clear: bool = False) -> dict[str, int]:
    """{run folder: last epoch committed or resumed from} for the folders this process trained; ``clear``
    forgets them (a command line starting)."""
    out = dict(_COMMITTED)
    if clear:
        _COMMITTED.clear()
    return out


class FolderError(RunError, OSError):
    """An OS error (disk full, read-only, permissions, a dangling link, a name too long) on a run folder's file."""


def _reason(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0)
    return f"{exc.strerror or exc}" + (f" ({name})" if name else "")


@contextmanager
def os_errors(path: str | os.PathLike, doing: str) -> Iterator[None]:
    """Turn an OSError inside into a FolderError ``PATH: cannot DOING: CAUSE (ERRNO)``."""
    try:
        yield
    except FolderError:
        raise
    except OSError as exc:
        where = Path(path)
        if exc.errno == errno.EEXIST and where.is_symlink() and not where.exists():
            cause = f"a dangling symbolic link to {os.readlink(where)} stands there"
        else:
            cause = _reason(exc)
        raise FolderError(f"{where}: cannot {doing}: {cause}") from None


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def held_signals() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends (an epoch's commit is never cut in two by a stop)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def trained_config(cfg_text: str | None) -> dict:
    """The flattened config without the keys that do not change what is trained (UNTRAINED_KEYS)."""
    import yaml

    from .config import UNTRAINED_KEYS, flatten

    tree = yaml.load(cfg_text or "", Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return {
        k: v for k, v in flatten(tree if isinstance(tree, dict) else {}).items() if not k.startswith(UNTRAINED_KEYS)
    }


def config_digest(cfg_text: str) -> str:
    """A short digest of what ``cfg_text`` trains (the keys of ``trained_config``)."""
    blob = json.dumps(sorted(trained_config(cfg_text).items()), default=repr).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _config_changes(before: dict, after: dict) -> str:
    """'KEY old -> new, ...' of the trained keys that differ (keys one side lacks are not compared), or ''."""
    changed = [k for k in sorted(before) if k in after and before[k] != after[k]]
    diffs = ", ".join(f"{k} {before[k]!r} -> {after[k]!r}" for k in changed[:3])
    return diffs + (", ..." if len(changed) > 3 else "")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write ``path`` by calling ``write(file_object)`` on a temporary sibling, fsync, then os.replace."""
    path = Path(path)
    with os_errors(path, "write it"):
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


class RunFolder:
    """The folder ``LOG.PREFIX/<run name>`` of one run."""

    def __init__(self, path: str | os.PathLike, name: str | None = None, config: str | None = None):
        """``name``: the run's name under LOG.PREFIX; ``config``: its config dump. Both go into every state."""
        self.path = Path(path)
        self.name = name or self.path.name
        self.config = config
        self.records: list[dict] = []  # {"epoch", "lr", "record"} of every committed epoch, the worklog's source
        self.provenance: dict | None = None  # what the run learns from (provenance.learned_from), known to rank 0
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
        with os_errors(self.path, "create the run folder"):
            self.path.mkdir(parents=True, exist_ok=True)
        with os_errors(self.path / LOCK, "open the run folder's lock"):
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
            raise FolderError(f"{self.path / LOCK}: cannot lock: {_reason(exc)}") from None
        self._lock_fd = fd
        with os_errors(self.path, "write in the run folder"):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
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
        """worklog.txt ('' when there is none); bytes that are not UTF-8 (a damaged file) read as U+FFFD."""
        return self._read_text(WORKLOG) or ""

    def _read_text(self, name: str) -> str | None:
        """The file ``name`` as text (undecodable bytes replaced), None when absent; FolderError if unreadable."""
        try:
            return (self.path / name).read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FolderError(f"{self.path / name}: cannot read it: {_reason(exc)}") from None

    def status(self) -> str:
        """The worklog's ``worklog.status`` ('new', 'started', 'finished', 'failed') against this run's
        SOLVER.EPOCHS (this command's config, else config.yaml's); 'started' when only a state is there."""
        config = self.config if self.config is not None else self._read_text(CONFIG)
        status = worklog.status(self.worklog_text(), worklog.last_epoch(config))
        return "started" if status == "new" and self.has_state() else status

    def has_state(self) -> bool:
        """Whether a full training state (latest, best or epoch_N) is in the folder."""
        return any(_STATE_FILE.match(p.name) for p in self._files())

    def _files(self) -> list[Path]:
        with os_errors(self.path, "list the run folder"):
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
            self.start_fresh(cfg_text)
        return mode

    def start_fresh(self, cfg_text: str) -> None:
        """A run that starts (again): an empty worklog, no records, this config.yaml and provenance.yaml."""
        self.records = []
        self.cut_worklog(0)
        self.write_text(CONFIG, cfg_text)
        self.write_provenance()

    # -- what the run learns from ----------------------------------------------------------
    def write_provenance(self) -> None:
        """provenance.yaml := ``self.provenance`` (removed while that is unknown: it would speak of an earlier start)."""
        import yaml

        if self.provenance is None:
            with os_errors(self.path / PROVENANCE, "remove it"):
                (self.path / PROVENANCE).unlink(missing_ok=True)
            return
        head = "# What this run learns from, checked by --resume (contents, not paths, must agree)\n"
        self.write_text(PROVENANCE, head + yaml.safe_dump(self.provenance, sort_keys=False))

    def recorded_provenance(self) -> dict | None:
        """What provenance.yaml records (None when it is missing, damaged or not a mapping)."""
        import yaml

        try:
            saved = yaml.safe_load(self._read_text(PROVENANCE) or "")
        except yaml.YAMLError:
            return None
        return saved if isinstance(saved, dict) else None

    def check_provenance(self, recorded: dict | None, source: str | os.PathLike) -> None:
        """RunError unless this run's teacher and data (``self.provenance``) are the ``recorded`` ones by content,
        naming both; nothing recorded (a folder from before the records) resumes with a warning and is recorded."""
        from .provenance import differences

        if self.provenance is None:
            return
        if not recorded:
            log.warning(
                "%s: no record of the teacher and data it learned from (written before they were recorded); "
                "resuming unchecked, recorded from now on",
                source,
            )
            return
        diffs = differences(recorded, self.provenance)
        if diffs:
            teacher, data = (any(d.startswith(k) for d in diffs) for k in ("teacher", "data"))
            what = " and ".join(["with another teacher"] * teacher + ["on other data"] * data)
            raise RunError(
                f"--resume: {source} was trained {what} than this command's ({'; '.join(diffs)}); resume with the "
                "files it started with (moved or copied is fine), or start a new run with another EXPERIMENT.NAME"
            )

    def learn_from(self, provenance: dict, resume: bool) -> None:
        """For mdistiller's trainers (their checkpoints do not record it): on a resume, RunError unless
        ``provenance`` is what provenance.yaml recorded; then provenance.yaml records it."""
        self.provenance = provenance
        if resume:
            self.check_provenance(self.recorded_provenance(), self.path)
        self.write_provenance()

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
        may change, and keys the saved file does not have (added by a later version) are not compared.

        A missing, empty or damaged config.yaml is not an error here: the state's own config is then
        checked (``load_state``) and config.yaml rewritten from it.
        """
        import yaml

        text = self._read_text(CONFIG)
        try:
            saved = yaml.load(text or "", Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError:
            saved = None
        if not isinstance(saved, dict) or not saved:
            self._config_gone = "missing" if text is None else "empty" if not text.strip() else "damaged"
            return
        self._config_gone = None
        diffs = _config_changes(trained_config(text), trained_config(cfg_text))
        if diffs:
            raise RunError(
                f"--resume: {self.path} was started with another config ({diffs}); "
                "resume with the same config, or start a new run with another EXPERIMENT.NAME"
            )

    _config_gone: str | None = None

    def identity(self, seed: int) -> dict:
        """Whose a state is: the run's name under LOG.PREFIX, its data seed, its config and that config's digest,
        and what it learns from (``learned_from``: teacher and data, when known)."""
        config = self.config or ""
        identity = {"run": self.name, "seed": int(seed), "config": config, "digest": config_digest(config)}
        if self.provenance is not None:
            identity["learned_from"] = self.provenance
        return identity

    def _check_identity(self, state: dict, source: Path) -> None:
        """RunError unless ``state`` is this folder's run under this config, teacher and data (a state without
        identity: a warning)."""
        theirs = state.get("identity")
        if not isinstance(theirs, dict):
            log.warning(
                "%s: a state from before identities (no run name, seed or config inside): resuming it unchecked; "
                "its next epoch writes them",
                source,
            )
            recorded = self.recorded_provenance()
            if recorded:  # written by a resume of this state that stopped before its next epoch
                self.check_provenance(recorded, source)
            if self._config_gone and self.config is not None:
                log.warning(
                    "%s: config.yaml was %s; rewritten from this command's config", self.path, self._config_gone
                )
                self.write_text(CONFIG, self.config)
            return
        seed = self._cfg_seed()
        if theirs.get("run") != self.name or (seed is not None and seed >= 0 and int(theirs.get("seed", -1)) != seed):
            mine = f"seed {seed}" if seed is not None and seed >= 0 else "any seed"
            raise RunError(
                f"--resume: {source} is a state of run {theirs.get('run')!r} (seed {theirs.get('seed')}), not of this "
                f"folder's run {self.name!r} ({mine}); put back this run's own checkpoint, or resume that run "
                "in its own folder"
            )
        if self.config is not None and theirs.get("digest") != config_digest(self.config):
            diffs = _config_changes(trained_config(theirs.get("config")), trained_config(self.config))
            if diffs:  # (digests of configs that differ only in keys one side lacks: a later version's keys)
                raise RunError(
                    f"--resume: {source} was trained with another config than this command's ({diffs}); "
                    "resume with the same config, or start a new run with another EXPERIMENT.NAME"
                )
        # provenance.yaml stands in for a state written before its teacher and data were recorded
        self.check_provenance(theirs.get("learned_from") or self.recorded_provenance(), source)
        if self._config_gone and theirs.get("config"):
            log.warning("%s: config.yaml was %s; rewritten from %s", self.path, self._config_gone, source.name)
            self.write_text(CONFIG, theirs["config"])
            self._config_gone = None

    def _cfg_seed(self) -> int | None:
        from .config import flatten

        if self.config is None:
            return None
        import yaml

        seed = flatten(yaml.load(self.config, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))).get(
            "EXPERIMENT.SEED"
        )
        return int(seed) if isinstance(seed, int) else None

    def _append(self, text: str) -> None:
        with os_errors(self.path / WORKLOG, "append to it"), open(self.path / WORKLOG, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def append_epoch(self, epoch: int, lr: float, record: dict[str, float]) -> None:
        """Append the epoch's block to worklog.txt (fsync'ed)."""
        self._append(worklog.block(epoch, lr, record))

    def has_epoch(self, epoch: int) -> bool:
        """Whether the worklog holds a complete block for ``epoch``."""
        text = worklog.blocks_through(self.worklog_text(), epoch)
        return re.search(rf"^epoch: {epoch}\s*$", text, re.M) is not None

    def commit_epoch(self, state: dict, student: dict, save_freq: int) -> None:
        """An epoch's files in crash-safe order: ``latest`` (the commit point) holding ``state`` (epoch, lr,
        record, saved_best, seed, ...) plus the run's identity and all epoch records, the other checkpoints,
        then the worklog block. ``student``: {"model": ...}. SIGINT/SIGTERM wait until it is done."""
        entry = {"epoch": int(state["epoch"]), "lr": float(state["lr"]), "record": dict(state["record"])}
        records = [r for r in self.records if r["epoch"] < entry["epoch"]] + [entry]
        state = {**state, "identity": self.identity(state.get("seed", -1)), "records": records}
        with held_signals():
            blob = serialize(state)
            self.write_bytes("latest", blob)
            self.records = records
            _COMMITTED[str(self.path)] = entry["epoch"]
            self._after_latest(state, blob, serialize(student), save_freq)
            self.append_epoch(state["epoch"], state["lr"], state["record"])

    def redo_epoch(self, state: dict, student: dict, save_freq: int) -> None:
        """On resume from ``state``: bring the worklog back to its epoch (rebuilt from the state's records when
        it disagrees with them) and redo what follows ``latest``."""
        with held_signals():
            _COMMITTED[str(self.path)] = int(state["epoch"])
            records = state.get("records")
            if isinstance(records, list) and [r.get("epoch") for r in records] == list(range(1, state["epoch"] + 1)):
                self._rebuild_worklog(records)
            else:  # a state from before records: keep the complete blocks up to it; they seed the records
                self.cut_worklog(state["epoch"])
                self.records = worklog.records(self.worklog_text())
            self._after_latest(state, serialize(state), serialize(student), save_freq)
            if not self.has_epoch(state["epoch"]):
                self.append_epoch(state["epoch"], state["lr"], state["record"])

    def _rebuild_worklog(self, records: list[dict]) -> None:
        """Make worklog.txt the blocks of ``records``: later lines are cut, a block lost between ``latest`` and
        the worklog is appended, anything else that disagrees (cut, damaged, deleted) is rebuilt with a warning."""
        self.records = list(records)
        expected = "".join(worklog.block(r["epoch"], r["lr"], r["record"]) for r in records)
        text = self.worklog_text()
        if text == expected:
            return
        last = worklog.block(records[-1]["epoch"], records[-1]["lr"], records[-1]["record"])
        if text.startswith(expected):
            self.cut_worklog(records[-1]["epoch"])
        elif text == expected[: len(expected) - len(last)]:  # stopped between latest and the worklog block
            self.write_text(WORKLOG, expected)
        else:
            what = "missing" if not (self.path / WORKLOG).exists() else "cut or damaged"
            log.warning(
                "%s: worklog.txt was %s (it disagreed with the checkpoint); rebuilt from the checkpoint's records "
                "of epochs 1-%d",
                self.path,
                what,
                records[-1]["epoch"],
            )
            self.write_text(WORKLOG, expected)

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
        with held_signals():
            self._append(worklog.best_line(best_acc))

    def fail(self, reason: str) -> None:
        """End the worklog with ``failed<TAB>reason``; no checkpoint is touched."""
        self._append(worklog.failed_line(reason))

    def cut_worklog(self, epoch: int) -> None:
        """Keep only complete blocks of epochs <= ``epoch`` (drops later blocks, half blocks and end lines)."""
        text = self.worklog_text()
        kept = worklog.blocks_through(text, epoch)
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
                self._check_identity(state, path)
                return state
            states.append((state, path))
        if states:
            best, path = max(states, key=lambda s: s[0]["epoch"])
            self._check_identity(best, path)
            log.warning("%s: resuming from epoch %d, the newest readable checkpoint", self.path, best["epoch"])
            return best
        found = "; ".join(problems) or "no latest, best or epoch_N file"
        raise RunError(f"--resume: no readable checkpoint in {self.path}: {found}")
