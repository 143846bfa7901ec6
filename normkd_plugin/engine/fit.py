"""A pack's training from its first epoch to its last: :func:`fit`, and the hooks that carry everything else.

:func:`fit` reads top to bottom: while some run is behind, ask the hooks whether to start the next
epoch, train and validate it (:meth:`~.pack.Pack.run_epoch`), hand the results to the hooks. What the
run folders, a time limit, the progress bar and tensorboard need happens in a hook (detectron2's
``HookBase``); a test injects a fault through the same seam (``normkd_plugin.train.main(argv, hooks=...)``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

from ..distributed import from_rank0
from ..errors import RunError, RunsFailed
from ..lifecycle import RunLife
from ..progress import JobProgress
from ..timelimit import TimeLimit, Unfinished
from ..worklog import NONFINITE_CAUSES
from .pack import EpochResult, Pack, PackRun
from .state import model_state, restore, student_state, training_state

log = logging.getLogger(__name__)

__all__ = ["Hook", "fit", "train_runs", "RunFolders", "Tensorboard", "Progress", "TimeLimitHook"]


class Hook:
    """A seam of :func:`fit`. Every method does nothing here; a hook overrides those it needs."""

    def before_fit(self, pack: Pack) -> None:
        """Before the first epoch (the runs' folders are locked and decided)."""

    def stops_before(self, epoch: int, runs: list[PackRun]) -> bool:
        """True to end the job before ``epoch`` of ``runs`` starts."""
        return False

    def before_epoch(self, epoch: int, runs: list[PackRun]) -> None:
        """Before ``epoch`` of ``runs`` (the runs furthest behind)."""

    def before_step(self, epoch: int, step: int) -> None:
        """On the host as step ``step``'s batch is taken, before the step runs (no device sync)."""

    def after_epoch(self, epoch: int, results: list[EpochResult]) -> None:
        """After ``epoch`` trained and validated: each run's record, or why it failed."""

    def after_fit(self, finished: list[PackRun]) -> None:
        """After the last epoch or a stop; ``finished``: the runs that completed their last epoch in this fit."""

    def close(self) -> None:
        """Always called last, also after an error."""


def fit(pack: Pack, hooks: Sequence[Hook] = ()) -> None:
    """Train every active run of ``pack`` to SOLVER.EPOCHS, epoch by epoch, the hooks around each epoch."""
    try:
        for hook in hooks:
            hook.before_fit(pack)
        while runs := pack.behind():
            epoch = runs[0].epoch + 1
            if any([hook.stops_before(epoch, runs) for hook in hooks]):  # each asked: a hook may be collective
                break
            for hook in hooks:
                hook.before_epoch(epoch, runs)
            results = pack.run_epoch(runs, epoch, on_batch=functools.partial(_before_step, hooks, epoch))
            for hook in hooks:
                hook.after_epoch(epoch, results)
        finished = [run for run in pack.runs if run.status == "active" and run.epoch >= pack.epochs]
        for run in finished:
            run.status = "finished"
            log.info("%s: best accuracy %.2f", run.name, run.best_acc)
        for hook in hooks:
            hook.after_fit(finished)
    finally:
        pack.close()
        for hook in reversed(hooks):
            hook.close()


def _before_step(hooks: Sequence[Hook], epoch: int, step: int) -> None:
    for hook in hooks:
        hook.before_step(epoch, step)


def train_runs(pack: Pack, lives: list[RunLife], time_limit: TimeLimit | None = None, hooks: Sequence[Hook] = ()):
    """Start or resume each run as its life decided, fit, and end as the runs did: the runs; RunsFailed if any
    stopped on a NaN/inf or could not resume; Unfinished if ``time_limit`` ended the job first."""
    limit = TimeLimitHook(time_limit) if time_limit is not None else None
    fit(pack, [RunFolders(lives), Tensorboard(pack.runs), Progress(), *([limit] if limit else []), *hooks])
    # torchrun stops every rank once one exits with an error: none raises before rank 0 has written all ends.
    pack.ranks.wait_for_all(pack.device)
    left = [r for r in pack.runs if r.status == "active"]
    unfinished = None
    if limit is not None and limit.stopped and left:
        done = sorted({r.epoch for r in left})
        at = f"epoch {done[0]}" if len(done) == 1 else f"epochs {done[0]}-{done[-1]}"
        unfinished = time_limit.stopped(f"{len(left)} of {len(pack.runs)} run(s) at {at} of {pack.epochs}")
    failed = [r for r in pack.runs if r.status == "failed"]
    if failed:
        raise RunsFailed(
            "; ".join(f"{r.folder.path}: {r.failure}" for r in failed)
            + f" ({len(failed)} of {len(pack.runs)} runs failed)"
            + (f"; the others {unfinished}" if unfinished else ""),
            unfinished=unfinished,
        )
    if unfinished:
        raise Unfinished(unfinished)
    return pack.runs


class RunFolders(Hook):
    """The runs' lives in their folders: each starts or resumes, commits every epoch (rank 0), finishes or fails."""

    def __init__(self, lives: list[RunLife]):
        self.lives = lives

    def before_fit(self, pack: Pack) -> None:
        by_folder = {id(life.folder): life for life in self.lives}
        self.life = {id(run): by_folder[id(run.folder)] for run in pack.runs}
        for run in pack.runs:
            life = self.life[id(run)]
            try:
                self._begin(pack, run, life)
            except RunError as exc:
                if len(pack.runs) == 1:
                    raise
                log.error("%s: %s", run.name, exc)  # the pack goes on without it
                run.status, run.failure = "failed", str(exc)

    @staticmethod
    def _begin(pack: Pack, run: PackRun, life: RunLife) -> None:
        state = life.resume_or_start()  # (a run skipped as finished is not in the pack)
        if state is None:  # a run that never completed an epoch starts again
            if pack.ranks.world > 1:  # a fresh run starts from rank 0's initialisation and data seed
                run.seed = pack.ranks.same_int(run.seed, pack.device)
                run.generator.manual_seed(run.seed)
                pack.ranks.follow_rank0(list(model_state(run.distiller).values()))
            return
        restore(run, state, f"{run.folder.path}/latest (epoch {state['epoch']})")
        life.redo(state, student_state(run) if life.main else {}, run.cfg.LOG.SAVE_CHECKPOINT_FREQ)
        log.info("%s: resumed after epoch %d (best %.2f)", run.name, run.epoch, run.best_acc)

    def after_epoch(self, epoch: int, results: list[EpochResult]) -> None:
        for result in results:
            run, life = result.run, self.life[id(result.run)]
            if result.failure:
                life.fail(f"{result.failure}; {NONFINITE_CAUSES}")
            else:  # every rank holds the same run; rank 0 writes it
                files = functools.partial(_files, run, result)
                life.commit(epoch, files, run.cfg.LOG.SAVE_CHECKPOINT_FREQ)

    def after_fit(self, finished: list[PackRun]) -> None:
        for run in finished:
            self.life[id(run)].finish(run.best_acc)


def _files(run: PackRun, result: EpochResult) -> tuple[dict, dict]:
    """(the full training state, the student-only checkpoint) of ``run`` after ``result``'s epoch."""
    state = training_state(run, result.epoch, result.lr, result.record, result.saved_best)
    return state, student_state(run)


class Tensorboard(Hook):
    """Each run's epoch record (and its distiller's epoch scalars) to its tensorboard writer, and to W&B."""

    def __init__(self, runs: list[PackRun]):
        self.runs = runs  # whose writers close() closes, whatever happened before

    def after_epoch(self, epoch: int, results: list[EpochResult]) -> None:
        for result in results:
            run = result.run
            if result.record is None or run.writer is None:  # (rank 0 alone has writers)
                continue
            sums = getattr(run.distiller, "epoch_scalars", None)
            for key, value in {**result.record, **(sums.scalars() if sums is not None else {})}.items():
                run.writer.add_scalar(key, value, epoch)
            run.writer.flush()
            if run.cfg.LOG.WANDB:  # a solo run (packs refuse LOG.WANDB), as the host logs it
                import wandb

                wandb.log({"current lr": result.lr, **result.record})
                wandb.run.summary["best_acc"] = run.best_acc

    def close(self) -> None:
        for run in self.runs:
            if run.writer is not None:
                try:  # its thread ends; a failure is a warning, never the job's error
                    run.writer.close()
                except OSError as exc:
                    log.warning("%s: tensorboard events not closed: %s", run.name, exc)


class Progress(Hook):
    """The job's progress bar (per step, from the host) and per-epoch line, on rank 0."""

    bar: JobProgress | None = None

    def before_fit(self, pack: Pack) -> None:
        active = [r.epoch for r in pack.runs if r.status == "active"]
        steps = pack.source.steps(pack.iters)
        self.bar = JobProgress(
            pack.epochs, min(active, default=pack.epochs), steps, show=pack.ranks.main, device=pack.device
        )

    def before_epoch(self, epoch: int, runs: list[PackRun]) -> None:
        self.bar.start_epoch(epoch)

    def before_step(self, epoch: int, step: int) -> None:
        self.bar.step()

    def after_epoch(self, epoch: int, results: list[EpochResult]) -> None:
        self.bar.end_epoch()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TimeLimitHook(Hook):
    """Start an epoch only if it should end within the time limit (rank 0 decides for every rank)."""

    def __init__(self, limit: TimeLimit):
        self.limit, self.stopped = limit, False

    def stops_before(self, epoch: int, runs: list[PackRun]) -> bool:
        self.stopped = not from_rank0(functools.partial(self.limit.allows_epoch, len(runs)))
        return self.stopped

    def before_epoch(self, epoch: int, runs: list[PackRun]) -> None:
        self.limit.epoch_started()

    def after_epoch(self, epoch: int, results: list[EpochResult]) -> None:
        self.limit.epoch_ended(len(results))
