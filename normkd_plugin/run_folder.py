"""One run folder: its files, its checkpoints and worklog, and how an epoch is committed and resumed.

Everything a run of this plugin's engine (solo or packed) writes goes through :class:`RunFolder` (and
every decision about it through :class:`~.lifecycle.RunLife`), so a kill at any moment leaves a folder
that resumes exactly:

* files are written atomically and the folder is locked (:mod:`.run_files`);
* an epoch is committed in a fixed order: ``latest`` (the commit point, holding the epoch's log
  record), the other checkpoints, then the worklog block. Resume loads ``latest`` and redoes
  what follows it, so files and worklog end as an uninterrupted run leaves them; worklog lines
  past the checkpoint's epoch are cut;
* every state knows whose it is and what it learned from (:mod:`.run_identity`): ``--resume`` refuses a
  state of another run, config, teacher or data, rewrites a missing ``config.yaml`` from it and rebuilds
  a cut, damaged or deleted worklog from the records of all its epochs;
* SIGINT/SIGTERM are held back while an epoch commits, so a stop never half-writes one.

The worklog keeps the host's format, written and read by :mod:`.worklog` (which also says when a run
is finished); a run that stops on a non-finite loss ends with ``failed<TAB><reason>`` instead.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from . import worklog
from .errors import RunError
from .run_files import FolderError, atomic_write, held_signals, os_errors, serialize, take_lock
from .run_identity import check_learned_from, check_owner, identity, saved_config_problem

log = logging.getLogger(__name__)

__all__ = ["RunFolder", "FolderError"]

WORKLOG = worklog.WORKLOG
CONFIG = "config.yaml"
PROVENANCE = "provenance.yaml"  # what the run learns from; config.yaml stays the host's config (loadable with --cfg)
LOCK = ".lock"
# Full training states a run can resume from, newest first among those readable.
_STATE_FILE = re.compile(r"^(latest|best|epoch_\d+)$")


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
        self._lock_fd = take_lock(
            self.path / LOCK,
            f"{self.path} is in use by another run (PID {{pid}}); wait for it or pick another EXPERIMENT.NAME",
        )
        with os_errors(self.path, "write in the run folder"):
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
        with os_errors(self.path / name, "read it"):
            try:
                return (self.path / name).read_bytes().decode("utf-8", errors="replace")
            except FileNotFoundError:
                return None

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
        """RunError unless this run's teacher and data are the ``recorded`` ones (``check_learned_from``)."""
        check_learned_from(recorded, self.provenance, source)

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
        """RunError unless ``cfg_text`` trains what the folder's config.yaml trained (``saved_config_problem``).

        A missing, empty or damaged config.yaml is not an error here: the state's own config is then
        checked (``load_state``) and config.yaml rewritten from it.
        """
        self._config_gone = saved_config_problem(self._read_text(CONFIG), cfg_text, self.path)

    _config_gone: str | None = None

    def identity(self, seed: int) -> dict:
        """Whose a state is (``run_identity.identity``): this run's name, seed, config and what it learns from."""
        return identity(self.name, seed, self.config or "", self.provenance)

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
        check_owner(theirs, source, self.name, self.config)
        # provenance.yaml stands in for a state written before its teacher and data were recorded
        self.check_provenance(theirs.get("learned_from") or self.recorded_provenance(), source)
        if self._config_gone and theirs.get("config"):
            log.warning("%s: config.yaml was %s; rewritten from %s", self.path, self._config_gone, source.name)
            self.write_text(CONFIG, theirs["config"])
            self._config_gone = None

    def append(self, text: str) -> None:
        """Append ``text`` to worklog.txt (fsync'ed)."""
        with os_errors(self.path / WORKLOG, "append to it"), open(self.path / WORKLOG, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def append_epoch(self, epoch: int, lr: float, record: dict[str, float]) -> None:
        """Append the epoch's block to worklog.txt (fsync'ed)."""
        self.append(worklog.block(epoch, lr, record))

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
            self._after_latest(state, blob, serialize(student), save_freq)
            self.append_epoch(state["epoch"], state["lr"], state["record"])

    def redo_epoch(self, state: dict, student: dict, save_freq: int) -> None:
        """On resume from ``state``: bring the worklog back to its epoch (rebuilt from the state's records when
        it disagrees with them) and redo what follows ``latest``."""
        with held_signals():
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
            self.append(worklog.best_line(best_acc))

    def fail(self, reason: str) -> None:
        """End the worklog with ``failed<TAB>reason``; no checkpoint is touched."""
        self.append(worklog.failed_line(reason))

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
