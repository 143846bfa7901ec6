"""A run's life in its folder: decided, started or resumed, committed epoch by epoch, finished or failed.

:class:`RunLife` is the one place that decides whether a run starts, resumes, is skipped as finished
or is refused (:func:`decision`), and it holds the run folder's lock from that decision to its end.
The sweep asks :func:`decision` too, so what it plans is what ``normkd-train --resume`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .errors import RunError
from .run_folder import RunFolder

log = logging.getLogger(__name__)

__all__ = ["RunLife", "decision", "decide_all"]


def decision(folder: RunFolder, resume: bool) -> str:
    """What a command does with ``folder``: 'start', 'resume' or 'skip' (a finished run under --resume); RunError
    for a start that would clobber a run. It reads the folder and says nothing (:meth:`RunLife.decide` says it).

    --resume is "resume or start" (detectron2's ``resume_or_load``): a folder with no run yet starts
    fresh, a run that never completed an epoch (no checkpoint) starts again from scratch, a finished
    run is skipped. So one command starts a job, continues it after a kill and is a no-op once it is
    done (the one command of a requeued scheduler job).
    """
    return _decide(folder, resume)[0]


def _decide(folder: RunFolder, resume: bool) -> tuple[str, int, str]:
    """(the decision, the log level and line that tell it, '' for none)."""
    status = folder.status()
    if resume and status in ("started", "failed") and not folder.has_state():
        return "start", logging.WARNING, f"{folder.path}: {status} run without a checkpoint; starting it again"
    if resume and status == "new":
        return "start", logging.INFO, f"{folder.path}: no run to resume yet; starting it"
    if resume and status == "finished":
        return "skip", logging.INFO, f"{folder.path} is finished (its worklog ends with best_acc); nothing to do"
    if not resume and status == "finished":
        raise RunError(
            f"{folder.path} already holds a finished run; set EXPERIMENT.NAME (or LOG.PREFIX) to train it again"
        )
    if not resume and status != "new":
        raise RunError(
            f"{folder.path} already holds a {status} run; add --resume to continue it, "
            "or set EXPERIMENT.NAME (or LOG.PREFIX) to start a new one"
        )
    return ("resume" if resume else "start"), logging.INFO, ""


class RunLife:
    """One run's life in its folder: decided, started or resumed, committed epoch by epoch, finished or failed.

    The only place that decides whether a run starts, resumes, is skipped as finished or is refused
    (:func:`decision`); it holds the folder's lock from that decision until :meth:`close`. Under torchrun
    rank 0 (``main``) decides, reads and writes; the other ranks receive its decisions and states.
    """

    def __init__(self, folder: RunFolder, resume: bool, main: bool = True):
        self.folder, self.resume, self.main = folder, resume, main
        self.mode: str | None = None  # 'start', 'resume' or 'skip' once decided
        self.epoch: int | None = None  # the last epoch committed, or resumed from, in this process

    def __repr__(self) -> str:
        return f"RunLife({str(self.folder.path)!r}, mode={self.mode!r})"

    def decide(self) -> str:
        """Lock the folder and decide (rank 0): 'start', 'resume' or 'skip'; RunError for a refused start."""
        self.folder.lock()
        self.mode, level, line = _decide(self.folder, self.resume)
        if line:
            log.log(level, "%s", line)
        return self.mode

    def resume_or_start(self, load: bool = True) -> dict | None:
        """Begin the run as decided. 'start': a fresh worklog, config.yaml and provenance.yaml; None. 'resume':
        RunError unless this config trains what the folder's did; with ``load``, the newest readable state,
        checked to be this run's (on every rank: rank 0 reads it)."""
        from .distributed import from_rank0

        if self.mode == "start":
            if self.main:
                self.folder.start_fresh(self.folder.config or "")
            return None

        def read() -> dict | None:
            self.folder.check_config(self.folder.config or "")
            if self.folder.status() == "failed":
                log.warning(
                    "%s: resuming a run that failed; it restarts from its last good checkpoint", self.folder.name
                )
            if not load:
                return None
            state = self.folder.load_state()  # refused if another run's, or of another config, teacher or data
            self.folder.write_provenance()
            return state

        return from_rank0(read)

    def redo(self, state: dict, student: dict, save_freq: int) -> None:
        """After the run took ``state``: its worklog brought back to the state's epoch, the files after latest redone."""
        self.epoch = int(state["epoch"])
        if self.main:
            self.folder.redo_epoch(state, student, save_freq)

    def commit(self, epoch: int, files: Callable[[], tuple[dict, dict]], save_freq: int) -> None:
        """``epoch`` committed on every rank; rank 0 writes ``files()`` = (state, student) (``RunFolder.commit_epoch``).
        ``epoch`` names it from its ``latest`` on, also when a stop cuts the files after it (resume redoes them)."""
        if not self.main:
            self.epoch = epoch
            return
        try:
            self.folder.commit_epoch(*files(), save_freq)
        finally:
            if self.folder.records and self.folder.records[-1]["epoch"] == epoch:
                self.epoch = epoch

    def fail(self, reason: str) -> None:
        """The worklog ends with ``failed<TAB>reason``; every checkpoint is kept."""
        if self.main:
            self.folder.fail(reason)

    def finish(self, best_acc: float) -> None:
        """The worklog ends with the host's ``best_acc`` line: the run is finished."""
        if self.main:
            self.folder.finish(best_acc)

    def close(self) -> None:
        """Release the folder's lock (a folder in which nothing was written is removed)."""
        self.folder.unlock()


def decide_all(lives: list[RunLife]) -> list[str]:
    """Rank 0 locks every folder and decides each run (before anything is built); the decisions on every rank,
    or the same RunError on every rank (the other ranks never read the run folders)."""
    from .distributed import from_rank0

    modes = from_rank0(lambda: [life.decide() for life in lives])
    for life, mode in zip(lives, modes):
        life.mode = mode
    return modes
