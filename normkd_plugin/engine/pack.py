"""A pack: several runs of one teacher trained side by side in one process (a solo run is a pack of one).

Each run keeps its own student, optimizer, learning-rate schedule, warm-up epoch, data generator
and run folder, so a packed run trains exactly what the same config trains alone. :meth:`Pack.run_epoch`
trains and validates the runs of one epoch and returns what each run did; it writes no file (the run
folders are written by :mod:`.fit`'s hooks). A run whose loss turns non-finite is found from the
epoch's sums, marked failed with the epoch and step, and dropped; the others go on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from yacs.config import CfgNode as CN

from ..run_folder import RunFolder
from ..worklog import NONFINITE_CAUSES, epoch_record
from .source import DeviceSplit, LoaderSource
from .step import PackStep
from .teacher import SharedTeacher

log = logging.getLogger(__name__)

__all__ = ["PackRun", "Pack", "EpochResult"]


@dataclass(eq=False)
class PackRun:
    """One run of a pack: its config and folder, its distiller (student + shared teacher) and optimizer."""

    name: str
    cfg: CN
    folder: RunFolder
    distiller: nn.Module
    optimizer: torch.optim.Optimizer
    seed: int  # data-order and augmentation seed (EXPERIMENT.SEED, or drawn when that is < 0)
    writer: object = None  # tensorboardX SummaryWriter of the run folder (rank 0)
    generator: torch.Generator | None = None
    epoch: int = 0  # last completed epoch
    best_acc: float = -1.0
    status: str = "active"  # active, finished, failed
    failure: str = ""


@dataclass
class EpochResult:
    """What one run did in one epoch: its record (the worklog block's values) or why it failed."""

    run: PackRun
    epoch: int
    lr: float
    record: dict | None = None  # epoch_record(...) when the epoch trained and validated
    saved_best: bool = False  # the host writes ``best`` (ties too)
    failure: str = ""  # why the run stopped, when it did


def _scores(logits: Tensor, target: Tensor) -> Tensor:
    """(top-1 hits, top-5 hits, summed cross-entropy, images) of one model's logits on a batch, as float64."""
    hit = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(target.unsqueeze(1))
    ce = F.cross_entropy(logits.float(), target, reduction="sum")
    n = torch.full_like(ce, target.shape[0], dtype=torch.float64)
    return torch.stack([hit[:, 0].sum().double(), hit.any(dim=1).sum().double(), ce.double(), n])


class Pack:
    """The runs of a pack, their batches and their shared teacher; trains and validates an epoch of any of them."""

    def __init__(self, runs: list[PackRun], source: DeviceSplit | LoaderSource, teacher: SharedTeacher | None):
        self.runs = runs
        self.cfg = runs[0].cfg  # the keys of PACK_KEYS, shared by all runs
        self.source = source
        self.teacher = teacher
        self.device = source.device
        self.ranks = source.ranks
        self.epochs = int(self.cfg.SOLVER.EPOCHS)
        self.iters = int(self.cfg.SOLVER.FAST.ITERS_PER_EPOCH)
        if self.cfg.SOLVER.FAST.CHANNELS_LAST:
            for run in runs:
                run.distiller.to(memory_format=torch.channels_last)
        source.check(self.iters)
        self.step = PackStep(self.cfg, source, teacher)
        for run in runs:
            if run.generator is None:
                run.generator = torch.Generator(device=self.device)
                run.generator.manual_seed(run.seed)

    def behind(self) -> list[PackRun]:
        """The active runs furthest behind (a kill may leave some an epoch behind: they catch up first)."""
        active = [r for r in self.runs if r.status == "active" and r.epoch < self.epochs]
        first = min((r.epoch for r in active), default=None)
        return [r for r in active if r.epoch == first]

    def run_epoch(self, runs: list[PackRun], epoch: int, on_batch: Callable[[int], None] | None = None):
        """Set each run's LR for ``epoch``, train the epoch, validate; each run's EpochResult. No file is written."""
        from mdistiller.engine.utils import adjust_learning_rate

        lrs = []
        for run in runs:
            # The host returns a numpy float after a decay; keep a Python float in the optimizer state.
            lr = float(adjust_learning_rate(epoch, run.cfg, run.optimizer))
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            lrs.append(lr)
        steps = self.step.train_steps(runs, epoch, self.iters, on_batch)
        sums, first_bad = self.step.sums.tolist(), self.step.first_bad.tolist()
        trained = [math.isfinite(loss_sum) and bad < 0 for (loss_sum, _, _), bad in zip(sums, first_bad)]
        scores = iter(self.validate([run for run, ok in zip(runs, trained) if ok]))
        results = []
        for run, lr, (loss_sum, top1, n), bad, ok in zip(runs, lrs, sums, first_bad, trained):
            result = EpochResult(run, epoch, lr)
            results.append(result)
            if not ok:
                self._fail(
                    result, f"epoch {epoch} step {bad if bad >= 0 else '?'} of {steps}: non-finite training loss"
                )
                continue
            test_acc, test_top5, test_loss = next(scores)
            if not math.isfinite(test_loss):
                self._fail(result, f"epoch {epoch}: non-finite validation loss")
                continue
            result.record = epoch_record(100.0 * top1 / n, loss_sum / n, test_acc, test_top5, test_loss)
            log.info("%s epoch %d: train loss %.4f, test acc %.2f", run.name, epoch, loss_sum / n, test_acc)
            result.saved_best = test_acc >= run.best_acc  # the host saves `best` on ties too
            run.best_acc = max(run.best_acc, test_acc)
            run.epoch = epoch
        return results

    @staticmethod
    def _fail(result: EpochResult, where: str) -> None:
        log.error("%s: %s; stopped (%s). Its last good checkpoint is kept.", result.run.name, where, NONFINITE_CAUSES)
        result.failure = where
        result.run.status, result.run.failure = "failed", where

    @torch.no_grad()
    def validate(self, runs: list[PackRun]) -> list[tuple[float, float, float]]:
        """(top-1 %, top-5 %, mean CE) of each run's student on the validation split; a fused group at once.

        ``runs``: runs of the epoch just trained (a part of the step's units; the others are skipped).
        """
        plan = self.step.plan
        wanted = {id(run) for run in runs}
        units = [(idx, fused) for idx, fused in plan.units if any(id(plan.runs[i]) in wanted for i in idx)]
        sums = [torch.zeros(len(idx), 4, device=self.device, dtype=torch.float64) for idx, _ in units]
        for idx, fused in units:
            if fused is None:
                plan.runs[idx[0]].distiller.eval()
        for images, y in self.source.val_batches():  # each rank its part; the sums cover the whole split
            x = self.step.layout(images)
            for (idx, fused), total in zip(units, sums):
                # float32 even under SOLVER.AMP, as the host validates
                logits = fused.evaluate(x) if fused is not None else [plan.runs[idx[0]].distiller(image=x)]
                for row in range(len(idx)):
                    total[row] += _scores(logits[row], y)
        scores = {}
        for (idx, _), total in zip(units, sums):
            self.ranks.sum_(total)
            scores.update({id(plan.runs[i]): row for i, row in zip(idx, total.tolist())})
        return [(100.0 * top1 / n, 100.0 * top5 / n, ce / n) for top1, top5, ce, n in (scores[id(r)] for r in runs)]

    def close(self) -> None:
        """Unfuse the students (each keeps its own weights) and stop the source's workers."""
        self.step.unfuse()
        self.source.close()
