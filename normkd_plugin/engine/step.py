"""The packed training step, and one epoch of steps.

One step reads as one line: per seed group (runs that share a seed share the batches) a uint8
batch -> normalise -> the teacher once on the distinct batches together -> every student's
forward and loss -> one backward -> each run's own SGD step -> per-run metric sums. On CUDA the
whole step is captured as one CUDA graph, again only when what it bakes in changes
(:func:`graph_key`; see :mod:`.graph`); on a CPU it runs eagerly. A non-finite loss is found from
the epoch's sums (no host sync per step).

What one epoch's steps read is set once, before its first step, in :attr:`PackStep.plan` (an
:class:`EpochPlan`): the runs it trains, their units (a fused group or a run alone) and seed groups.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .fuse_speed import FuseChoice
from .graph import StepGraph
from .layout import FusedStudents, fusion_key, student_output
from .source import DeviceSplit, LoaderSource
from .teacher import SharedTeacher

__all__ = ["PackStep", "EpochPlan", "graph_key", "WARMUP_ATTRIBUTES", "EPOCH_FREE_TYPES"]

log = logging.getLogger(__name__)
_NOTHING = contextlib.nullcontext()
Unit = tuple[list[int], FusedStudents | None]  # (indices of the plan's runs, their fused students or None)

# What a distiller's loss reads of ``epoch``: these scale a loss by min(epoch / warm-up, 1), the warm-up
# in the named attribute (mdistiller's DKD and ReviewKD, NormDKD, DKD_LS); those do not read it. Any
# other distiller keys the graph on the epoch itself.
WARMUP_ATTRIBUTES = {
    "DKD": "warmup",
    "REVIEWKD": "warmup_epochs",
    "NORMDKD": "warmup",
    "NormKD_W_DKD": "warmup",
    "DKD_LS": "warmup",
}
EPOCH_FREE_TYPES = frozenset(
    {"NONE", "KD", "AT", "OFD", "RKD", "FITNET", "KDSVD", "CRD", "NST", "PKT", "SP", "VID", "NORMKD", "NormKD", "KD_LS"}
)


def graph_key(runs: list, epoch: int) -> tuple:
    """What a captured step of ``runs`` bakes in: per run its identity, learning rates and warm-up factor.

    Equal keys, equal graphs: the step is captured again only at an LR decay, in each epoch of a
    warm-up, and when the set of runs changes.
    """
    return tuple((id(run), tuple(g["lr"] for g in run.optimizer.param_groups), _epoch_term(run, epoch)) for run in runs)


def _epoch_term(run, epoch: int):
    kind = run.cfg.DISTILLER.TYPE
    if kind in EPOCH_FREE_TYPES:
        return None
    if kind in WARMUP_ATTRIBUTES:  # the distiller's own expression, to the bit
        return min(epoch / getattr(run.distiller, WARMUP_ATTRIBUTES[kind]), 1.0)
    return ("epoch", epoch)


def _params(run) -> list[Tensor]:
    return [p for group in run.optimizer.param_groups for p in group["params"]]


def _buffers(run) -> list[Tensor]:
    """The run's BatchNorm running statistics and counters (the shared teacher's excluded)."""
    return [b for name, b in run.distiller.named_buffers() if not name.startswith("teacher.")]


def _epoch_scalars(run):
    """The distiller's per-epoch device sums for tensorboard (``epoch_scalars``: reset, sums, scalars), or None."""
    return getattr(run.distiller, "epoch_scalars", None)


@dataclass
class EpochPlan:
    """What every step of one epoch reads: its runs, their units, each run's seed group, the groups the teacher sees."""

    runs: list = field(default_factory=list)
    units: list[Unit] = field(default_factory=list)
    group_of: list[int] = field(default_factory=list)
    taught: list[int] = field(default_factory=list)


class PackStep:
    """The training step of a pack's runs, eager or as a CUDA graph, with its per-run device sums."""

    def __init__(self, cfg, source: DeviceSplit | LoaderSource, teacher: SharedTeacher | None):
        """``cfg``: the keys every run of the pack shares (SOLVER.AMP, SOLVER.FAST.*)."""
        fast = cfg.SOLVER.FAST
        self.source = source
        self.teacher = teacher
        self.device = source.device
        self.amp = bool(cfg.SOLVER.AMP)
        self.channels_last = bool(fast.CHANNELS_LAST)
        # Students on parallel branches: forked CUDA streams, captured as parallel branches of the graph.
        self.branches = bool(fast.PACK_BRANCHES) and self.device.type == "cuda"
        self.ranks = source.ranks
        self.batch_share = 1.0  # this rank's share of the current global batch
        if self.branches and self.ranks.world > 1:
            from ..config import ConfigError

            raise ConfigError("SOLVER.FAST.PACK_BRANCHES True is not supported on several processes (torchrun)")
        self._cuda_streams: list = []
        self.fuse = FuseChoice.of(cfg, self.device)
        self.plan = EpochPlan()
        self._units_key = None
        self.graph = StepGraph(
            self._step, self._zero_grad, enabled=bool(fast.CUDA_GRAPH) and self.device.type == "cuda"
        )
        self.sums = self.first_bad = self._step_no = None

    def _autocast(self):
        # The autocast weight cache must stay off: graph replays re-read the fp32 weights.
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False)

    def layout(self, x: Tensor) -> Tensor:
        """``x`` in the memory format of the students (channels_last under SOLVER.FAST.CHANNELS_LAST)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _step(self, images: list[Tensor], targets: list[Tensor], epoch: int) -> None:
        """One training step of every active run on its seed group's (uint8 images, targets); no host sync."""
        xs = [self.layout(self.source.prepare(x)) for x in images]
        if self.teacher is not None:
            with self._autocast():
                self.teacher.precompute([xs[g] for g in self.plan.taught])
        losses: list = [None] * len(self.plan.runs)
        top1s: list = [None] * len(self.plan.runs)
        for (indices, fused), branch in zip(self.plan.units, self._branches()):
            with branch:
                logits = self._fused_logits(indices, fused, xs) if fused is not None else None
                for j, i in enumerate(indices):
                    run, s = self.plan.runs[i], self.plan.group_of[i]
                    with student_output(run.distiller.student, logits[j]) if fused is not None else _NOTHING:
                        with self._autocast():
                            preds, terms = run.distiller(image=xs[s], target=targets[s], epoch=epoch)
                    losses[i] = sum(value.mean() for value in terms.values())
                    top1s[i] = preds.detach().argmax(dim=1).eq(targets[s]).sum()
                if self.branches:  # each unit's backward and step on its own branch
                    sum(losses[i] for i in indices).backward()
                    self._optimize(indices, fused)
        if self.branches:
            self._join()
        else:
            sum(losses).backward()
            if self.ranks.world > 1:  # one flat all-reduce of every run's gradients
                self.ranks.reduce_grads(
                    [p for unit in self.plan.units for p in self._unit_params(*unit)], self.batch_share
                )
            for unit in self.plan.units:
                self._optimize(*unit)
            if self.ranks.world > 1:
                self.ranks.follow_rank0([b for unit in self.plan.units for b in self._unit_buffers(*unit)])
        loss = torch.stack([v.detach() for v in losses])
        n = targets[0].shape[0]
        count = torch.full_like(loss, n)  # a fill kernel: capturable, unlike a host-to-device copy
        metrics = [loss * n, torch.stack(top1s), count]
        self.sums += torch.stack([m.double() for m in metrics], dim=1)
        self._step_no += 1
        newly_bad = (self.first_bad < 0) & ~torch.isfinite(loss)
        self.first_bad.copy_(torch.where(newly_bad, self._step_no, self.first_bad))  # in place: graph-safe
        if self.teacher is not None:
            self.teacher.precompute([])  # drop this step's batches and outputs

    def _fused_logits(self, indices: list[int], fused: FusedStudents, xs: list[Tensor]) -> Tensor:
        """The fused group's logits (K, B, classes), each slice on its own seed group's batch."""
        seeds = [self.plan.group_of[i] for i in indices]
        x = xs[seeds[0]] if len(set(seeds)) == 1 else torch.stack([xs[s] for s in seeds])
        with self._autocast():
            return fused(x, batched=len(set(seeds)) > 1)

    def _unit_params(self, indices: list[int], fused: FusedStudents | None) -> list[Tensor]:
        return fused.parameters() if fused is not None else _params(self.plan.runs[indices[0]])

    def _unit_buffers(self, indices: list[int], fused: FusedStudents | None) -> list[Tensor]:
        return fused.buffer_list() if fused is not None else _buffers(self.plan.runs[indices[0]])

    def _optimize(self, indices: list[int], fused: FusedStudents | None) -> None:
        if fused is not None:
            fused.step()
        else:
            self.plan.runs[indices[0]].optimizer.step()

    def _lay_out(self, runs: list) -> list[Unit]:
        """Units of the step: runs of one fusable architecture as one fused group (SOLVER.FAST.FUSE), others alone."""
        key = tuple(id(r) for r in runs)
        if self._units_key == key:
            return self.plan.units
        self.unfuse()
        groups: dict[object, list[int]] = {}
        for i, run in enumerate(runs):
            arch = fusion_key(run) if self.fuse.considered() else None
            groups.setdefault(arch if arch is not None else ("alone", i), []).append(i)
        units = []
        for indices in groups.values():
            if len(indices) == 1:
                units.append((indices, None))
                continue
            fuse, why = self.fuse.fuses(runs[indices[0]].cfg.DISTILLER.STUDENT, len(indices))
            names = ", ".join(runs[i].name for i in indices)
            if fuse:
                units.append((indices, FusedStudents([runs[i] for i in indices])))
                log.info("fused %d students: %s (%s)", len(indices), names, why)
            else:
                units += [([i], None) for i in indices]
                log.info("%d students of one architecture not fused: %s (%s)", len(indices), names, why)
        self._units_key = key
        return sorted(units, key=lambda unit: unit[0][0])

    def unfuse(self) -> None:
        """Give each fused student its own parameters back (their values and optimizer states)."""
        for _, fused in self.plan.units:
            if fused is not None:
                fused.unfuse()
        self.plan, self._units_key = EpochPlan(), None

    def _branches(self) -> list:
        """A context per unit of the step: its own CUDA stream forked from the current one, or nothing."""
        if not self.branches:
            return [contextlib.nullcontext()] * len(self.plan.units)
        while len(self._cuda_streams) < len(self.plan.units):
            self._cuda_streams.append(torch.cuda.Stream(self.device))
        main = torch.cuda.current_stream(self.device)
        for stream in self._cuda_streams[: len(self.plan.units)]:
            stream.wait_stream(main)  # the batches and the teacher's outputs are ready
        return [torch.cuda.stream(stream) for stream in self._cuda_streams[: len(self.plan.units)]]

    def _join(self) -> None:
        main = torch.cuda.current_stream(self.device)
        for stream in self._cuda_streams[: len(self.plan.units)]:
            main.wait_stream(stream)

    def _zero_grad(self) -> None:
        for indices, fused in self.plan.units:
            if fused is not None:
                fused.zero_grad()
            else:
                self.plan.runs[indices[0]].optimizer.zero_grad(set_to_none=True)

    def _eager_step(self, images: list[Tensor], targets: list[Tensor], epoch: int) -> None:
        self._zero_grad()
        self._step(images, targets, epoch)

    # -- an epoch ----------------------------------------------------------------------------
    def train_steps(self, runs: list, epoch: int, iters: int = 0, on_batch: Callable[[int], None] | None = None) -> int:
        """Train ``runs`` on a fresh epoch per seed group (``iters`` > 0: its first ``iters`` steps); returns steps
        run. ``on_batch(k)`` is called on the host as step k's batch is taken (no device sync)."""
        groups = _seed_groups(runs)
        group_of = [next(i for i, g in enumerate(groups) if run in g) for run in runs]
        taught = sorted({g for g, run in zip(group_of, runs) if run.cfg.DISTILLER.TYPE != "NONE"})  # the teacher's
        self.plan = EpochPlan(runs, self._lay_out(runs), group_of, taught)
        batches = self.source.epoch([(group[0].seed, group[0].generator) for group in groups], epoch, iters)
        for group in groups:
            for run in group[1:]:  # same seed, same epoch: the same state, kept in step
                run.generator.set_state(group[0].generator.get_state())
        k = len(runs)
        if self.sums is None or self.sums.shape[0] != k:  # kept in place: a captured graph reads them
            self.sums = torch.zeros(k, 3, device=self.device, dtype=torch.float64)  # loss*n, top-1 hits, n
            self.first_bad = torch.zeros(k, device=self.device, dtype=torch.long)
            self._step_no = torch.zeros((), device=self.device, dtype=torch.long)
        self.sums.zero_()
        self.first_bad.fill_(-1)
        self._step_no.zero_()
        for run in runs:
            run.distiller.train()
            if _epoch_scalars(run) is not None:
                _epoch_scalars(run).reset(self.device)

        def batch(step: int):
            images, targets, self.batch_share = batches.batch(step)  # this rank's share of the batch mean
            if on_batch is not None:
                on_batch(step)
            return images, targets

        self.graph.run(self._eager_step, batch, batches.full_steps, epoch, key=graph_key(runs, epoch))
        for step in range(batches.full_steps, batches.steps):  # the last, smaller batch
            self._eager_step(*batch(step), epoch)
        self.ranks.sum_(self.sums)
        self.ranks.earliest_step_(self.first_bad)
        for run in runs:
            if _epoch_scalars(run) is not None:
                self.ranks.sum_(_epoch_scalars(run).sums)
        for run in runs:
            run.distiller.train(False)
        return batches.steps


def _seed_groups(runs: list) -> list[list]:
    """Runs grouped by data seed: one generator draws each group's batches."""
    groups: dict[int, list] = {}
    for run in runs:
        groups.setdefault(run.seed, []).append(run)
    return list(groups.values())
