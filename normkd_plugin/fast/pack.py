"""A pack: several runs of one teacher trained side by side in one process (a solo run is a pack of one).

One step reads as one line: per seed group (runs that share a seed share the batches) a uint8
batch -> normalise -> the teacher once on the distinct batches together -> every student's
forward and loss -> one backward -> each run's own SGD step -> per-run metric sums. Each run keeps
its own student, optimizer, learning-rate schedule, warm-up epoch, data generator, run folder and
checkpoints, so a packed run trains exactly what the same config trains alone.

On CUDA the whole packed step is captured as one CUDA graph, again only when what it bakes in
changes (:func:`graph_key`; see :mod:`.graph`); on a CPU it runs eagerly. A run whose loss turns
non-finite is found from the epoch's sums (no host sync per step), marked failed in its worklog with
the epoch and step, and dropped; the others go on.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from yacs.config import CfgNode as CN

from ..dist import from_rank0
from ..errors import RunError, RunsFailed
from ..progress import QUIET, JobProgress
from ..runs import NONFINITE_CAUSES, RunFolder, epoch_record
from ..timelimit import TimeLimit, Unfinished
from .fuse_speed import FuseChoice
from .graph import StepGraph
from .layout import FusedStudents, fusion_key, student_output
from .source import DeviceSplit, LoaderSource

log = logging.getLogger(__name__)

__all__ = ["PackRun", "Pack", "SharedTeacher", "RunsFailed", "check_pack", "decide_starts", "graph_key"]

STATE_FORMAT = 1
# Keys every run of a pack must agree on: the data, the batches and the shape of the schedule.
PACK_KEYS = (
    "DATASET.TYPE",
    "DATASET.ROOT",
    "DATASET.DECODE",
    "SOLVER.TRAINER",
    "SOLVER.BATCH_SIZE",
    "SOLVER.EPOCHS",
    "SOLVER.AMP",
    "SOLVER.FAST.CUDA_GRAPH",
    "SOLVER.FAST.CHANNELS_LAST",
    "SOLVER.FAST.EVAL_BATCH_SIZE",
    "SOLVER.FAST.ITERS_PER_EPOCH",
    "SOLVER.FAST.PACK_BRANCHES",
    "SOLVER.FAST.FUSE",
)
_NOTHING = contextlib.nullcontext()
TEACHER_KEYS = ("DISTILLER.TEACHER", "DISTILLER.TEACHER_CKPT")


def _get(cfg: CN, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_pack(cfgs: list[CN], names: list[str], device: torch.device | None = None) -> None:
    """ConfigError unless the configs can train together: same data, batches, schedule length, teacher."""
    from ..config import ConfigError
    from ..imagenet import check_decode
    from .source import source_kind

    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"pack: two runs would write the same run folder {dup!r}; give them different seeds or names")
    if len(cfgs) > 1 and any(c.LOG.WANDB for c in cfgs):
        raise ConfigError(
            "pack: LOG.WANDB True: one process logs to one wandb run; train packs with LOG.WANDB False "
            "(each run's tensorboard scalars and worklog.txt are written as usual)"
        )
    for cfg, name in zip(cfgs, names):
        kind = source_kind(cfg)
        if kind is None:
            raise ConfigError(
                f"pack: {name} has SOLVER.TRAINER {cfg.SOLVER.TRAINER!r}, mdistiller's own trainer; packs need "
                "fast (CIFAR on the device) or ddp (a data loader; base too under torchrun or with DATASET.DECODE)"
            )
        if kind == "device" and cfg.DATASET.TYPE != "cifar100":
            raise ConfigError(
                f"SOLVER.TRAINER fast holds CIFAR splits on the device; DATASET.TYPE {cfg.DATASET.TYPE!r} trains with "
                "SOLVER.TRAINER ddp (batches from a data loader)"
            )
        if kind == "loader" and cfg.DISTILLER.TYPE == "CRD":
            raise ConfigError("DISTILLER.TYPE CRD needs its contrastive sampler: use SOLVER.TRAINER crd (one process)")
        if device is not None:
            check_decode(cfg, device)
    if device is not None:
        FuseChoice.of(cfgs[0], device)  # the fused-speed tables SOLVER.FAST.FUSE auto reads, before any folder
    first, first_name = cfgs[0], names[0]
    distilled = [(c, n) for c, n in zip(cfgs, names) if c.DISTILLER.TYPE != "NONE"]
    for cfg, name in zip(cfgs[1:], names[1:]):
        for key in PACK_KEYS:
            if _get(cfg, key) != _get(first, key):
                raise ConfigError(
                    f"pack: {key} differs: {_get(first, key)!r} in {first_name} but {_get(cfg, key)!r} in {name}; "
                    "runs of a pack share data, batch size and schedule length"
                )
    for cfg, name in distilled[1:]:
        for key in TEACHER_KEYS:
            if _get(cfg, key) != _get(distilled[0][0], key):
                raise ConfigError(
                    f"pack: {key} differs: {_get(distilled[0][0], key)!r} in {distilled[0][1]} but "
                    f"{_get(cfg, key)!r} in {name}; the runs of a pack share one teacher"
                )


class SharedTeacher(nn.Module):
    """The teacher of a pack: run once per step on the distinct batches; a distiller's call gets its slice.

    :meth:`precompute` stores the outputs for given input tensors; calling the module with one of
    those very tensors returns the stored output, any other input runs the network.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self._outputs: list[tuple[Tensor, object]] = []

    def precompute(self, batches: list[Tensor]) -> None:
        """Run the network once on ``batches`` (concatenated) without gradient and keep each one's output."""
        with torch.no_grad():
            if not batches:
                outputs = []
            elif len(batches) == 1:
                outputs = [self.net(batches[0])]
            else:
                joint = self.net(torch.cat(batches))
                bounds = list(itertools.accumulate(b.shape[0] for b in batches))
                outputs = [
                    tree_map(lambda t, lo=lo, hi=hi: t[lo:hi] if isinstance(t, Tensor) else t, joint)
                    for lo, hi in zip([0, *bounds[:-1]], bounds)
                ]
        self._outputs = list(zip(batches, outputs))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # the teacher's own methods (get_stage_channels, ...) for the distillers
            return getattr(super().__getattr__("net"), name)

    def forward(self, x: Tensor):
        for batch, output in self._outputs:
            if batch is x:
                return output
        return self.net(x)


@dataclass(eq=False)
class PackRun:
    """One run of a pack: its config and folder, its distiller (student + shared teacher) and optimizer."""

    name: str
    cfg: CN
    folder: RunFolder
    distiller: nn.Module
    optimizer: torch.optim.Optimizer
    seed: int  # data-order and augmentation seed (EXPERIMENT.SEED, or drawn when that is < 0)
    writer: object = None  # tensorboardX SummaryWriter of the run folder
    generator: torch.Generator | None = None
    epoch: int = 0  # last completed epoch
    best_acc: float = -1.0
    status: str = "active"  # active, finished, failed
    failure: str = ""


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


def graph_key(runs: list[PackRun], epoch: int) -> tuple:
    """What a captured step of ``runs`` bakes in: per run its identity, learning rates and warm-up factor.

    Equal keys, equal graphs: the step is captured again only at an LR decay, in each epoch of a
    warm-up, and when the set of runs changes.
    """
    return tuple((id(run), tuple(g["lr"] for g in run.optimizer.param_groups), _epoch_term(run, epoch)) for run in runs)


def _epoch_term(run: PackRun, epoch: int):
    kind = run.cfg.DISTILLER.TYPE
    if kind in EPOCH_FREE_TYPES:
        return None
    if kind in WARMUP_ATTRIBUTES:  # the distiller's own expression, to the bit
        return min(epoch / getattr(run.distiller, WARMUP_ATTRIBUTES[kind]), 1.0)
    return ("epoch", epoch)


def host_optimizer(cfg: CN, distiller: nn.Module) -> torch.optim.Optimizer:
    """The optimizer mdistiller's BaseTrainer.init_optimizer builds for ``distiller``."""
    from types import SimpleNamespace

    from mdistiller.engine.trainer import BaseTrainer

    return BaseTrainer.init_optimizer(SimpleNamespace(distiller=SimpleNamespace(module=distiller)), cfg)


def _params(run: PackRun) -> list[Tensor]:
    return [p for group in run.optimizer.param_groups for p in group["params"]]


def _student(run: PackRun) -> dict:
    """The student-only checkpoint (tools/eval.py reads it)."""
    return own_storage({"model": run.distiller.student.state_dict()})


def own_storage(tree):
    """``tree`` with every tensor that views a larger storage (a fused slice) copied: torch.save writes whole storages."""

    def own(t):
        if isinstance(t, Tensor) and t.untyped_storage().nbytes() > t.numel() * t.element_size():
            return t.clone()
        return t

    return tree_map(own, tree)


def _buffers(run: PackRun) -> list[Tensor]:
    """The run's BatchNorm running statistics and counters (the shared teacher's excluded)."""
    return [b for name, b in run.distiller.named_buffers() if not name.startswith("teacher.")]


def _scores(logits: Tensor, target: Tensor) -> Tensor:
    """(top-1 hits, top-5 hits, summed cross-entropy, images) of one model's logits on a batch, as float64."""
    hit = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(target.unsqueeze(1))
    ce = F.cross_entropy(logits.float(), target, reduction="sum")
    n = torch.full_like(ce, target.shape[0], dtype=torch.float64)
    return torch.stack([hit[:, 0].sum().double(), hit.any(dim=1).sum().double(), ce.double(), n])


def model_state(distiller: nn.Module) -> dict[str, Tensor]:
    """The distiller's state dict as the host saves it (``module.`` prefix), without the teacher."""
    return {f"module.{k}": v for k, v in distiller.state_dict().items() if not k.startswith("teacher.")}


def load_model_state(distiller: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load a saved model state (with or without the teacher's weights) into ``distiller``."""
    own = {k.removeprefix("module."): v for k, v in state.items()}
    own = {k: v for k, v in own.items() if not k.startswith("teacher.")}
    missing, unexpected = distiller.load_state_dict(own, strict=False)
    missing = [k for k in missing if not k.startswith("teacher.")]
    if missing or unexpected:
        raise RunError(
            f"{source}: the checkpoint does not fit this run's model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def _epoch_scalars(run: PackRun):
    """The distiller's per-epoch device sums for tensorboard (``epoch_scalars``: reset, sums, scalars), or None."""
    return getattr(run.distiller, "epoch_scalars", None)


def _close_writer(run: PackRun) -> None:
    """Close the run's tensorboard writer (its thread ends); a failure is a warning, never the job's error."""
    if run.writer is not None:
        try:
            run.writer.close()
        except OSError as exc:
            log.warning("%s: tensorboard events not closed: %s", run.name, exc)


class Pack:
    """Train the runs of a pack together; each writes its own run folder as a solo run does."""

    progress: JobProgress = QUIET  # Pack.train's bar (per step, from the host) and per-epoch line

    def __init__(self, runs: list[PackRun], source: DeviceSplit | LoaderSource, teacher: SharedTeacher | None):
        self.runs = runs
        self.cfg = runs[0].cfg  # the keys of PACK_KEYS, shared by all runs
        self.source = source
        self.teacher = teacher
        self.device = source.device
        fast = self.cfg.SOLVER.FAST
        self.amp = bool(self.cfg.SOLVER.AMP)
        self.channels_last = bool(fast.CHANNELS_LAST)
        self.batch_size = int(self.cfg.SOLVER.BATCH_SIZE)
        if self.channels_last:
            for run in runs:
                run.distiller.to(memory_format=torch.channels_last)
        # Students on parallel branches: forked CUDA streams, captured as parallel branches of the graph.
        self.branches = bool(fast.PACK_BRANCHES) and self.device.type == "cuda"
        self.ranks = source.ranks
        self._weight = 1.0  # this rank's share of the current global batch
        if self.branches and self.ranks.world > 1:
            from ..config import ConfigError

            raise ConfigError("SOLVER.FAST.PACK_BRANCHES True is not supported on several processes (torchrun)")
        source.check(int(fast.ITERS_PER_EPOCH))
        self._cuda_streams: list = []
        self.fuse = FuseChoice.of(self.cfg, self.device)
        self._units: list[tuple[list[int], FusedStudents | None]] = []
        self._units_key = None
        self.graph = StepGraph(
            self._step, self._zero_grad, enabled=bool(fast.CUDA_GRAPH) and self.device.type == "cuda"
        )
        self._sums = self._first_bad = self._step_no = None
        for run in runs:
            if run.generator is None:
                run.generator = torch.Generator(device=self.device)
                run.generator.manual_seed(run.seed)

    # -- the step ----------------------------------------------------------------------------
    def _autocast(self):
        # The autocast weight cache must stay off: graph replays re-read the fp32 weights.
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False)

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _step(self, images: list[Tensor], targets: list[Tensor], epoch: int) -> None:
        """One training step of every active run on its seed group's (uint8 images, targets); no host sync."""
        xs = [self._layout(self.source.prepare(x)) for x in images]
        if self.teacher is not None:
            with self._autocast():
                self.teacher.precompute([xs[g] for g in self._taught])
        losses: list = [None] * len(self._active)
        top1s: list = [None] * len(self._active)
        for (indices, fused), branch in zip(self._units, self._branches()):
            with branch:
                logits = self._fused_logits(indices, fused, xs) if fused is not None else None
                for j, i in enumerate(indices):
                    run, s = self._active[i], self._group_of[i]
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
                self.ranks.reduce_grads([p for unit in self._units for p in self._unit_params(*unit)], self._weight)
            for unit in self._units:
                self._optimize(*unit)
            if self.ranks.world > 1:
                self.ranks.follow_rank0([b for unit in self._units for b in self._unit_buffers(*unit)])
        loss = torch.stack([v.detach() for v in losses])
        n = targets[0].shape[0]
        count = torch.full_like(loss, n)  # a fill kernel: capturable, unlike a host-to-device copy
        metrics = [loss * n, torch.stack(top1s), count]
        self._sums += torch.stack([m.double() for m in metrics], dim=1)
        self._step_no += 1
        newly_bad = (self._first_bad < 0) & ~torch.isfinite(loss)
        self._first_bad.copy_(torch.where(newly_bad, self._step_no, self._first_bad))  # in place: graph-safe
        if self.teacher is not None:
            self.teacher.precompute([])  # drop this step's batches and outputs

    def _fused_logits(self, indices: list[int], fused: FusedStudents, xs: list[Tensor]) -> Tensor:
        """The fused group's logits (K, B, classes), each slice on its own seed group's batch."""
        seeds = [self._group_of[i] for i in indices]
        x = xs[seeds[0]] if len(set(seeds)) == 1 else torch.stack([xs[s] for s in seeds])
        with self._autocast():
            return fused(x, batched=len(set(seeds)) > 1)

    def _unit_params(self, indices: list[int], fused: FusedStudents | None) -> list[Tensor]:
        return fused.parameters() if fused is not None else _params(self._active[indices[0]])

    def _unit_buffers(self, indices: list[int], fused: FusedStudents | None) -> list[Tensor]:
        return fused.buffer_list() if fused is not None else _buffers(self._active[indices[0]])

    def _optimize(self, indices: list[int], fused: FusedStudents | None) -> None:
        if fused is not None:
            fused.step()
        else:
            self._active[indices[0]].optimizer.step()

    def _lay_out(self, runs: list[PackRun]) -> None:
        """Units of the step: runs of one fusable architecture as one fused group (SOLVER.FAST.FUSE), others alone."""
        key = tuple(id(r) for r in runs)
        if self._units_key == key:
            return
        self._unfuse()
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
        self._units, self._units_key = sorted(units, key=lambda unit: unit[0][0]), key

    def _unfuse(self) -> None:
        for _, fused in self._units:
            if fused is not None:
                fused.unfuse()
        self._units, self._units_key = [], None

    def _branches(self) -> list:
        """A context per unit of the step: its own CUDA stream forked from the current one, or nothing."""
        if not self.branches:
            return [contextlib.nullcontext()] * len(self._units)
        while len(self._cuda_streams) < len(self._units):
            self._cuda_streams.append(torch.cuda.Stream(self.device))
        main = torch.cuda.current_stream(self.device)
        for stream in self._cuda_streams[: len(self._units)]:
            stream.wait_stream(main)  # the batches and the teacher's outputs are ready
        return [torch.cuda.stream(stream) for stream in self._cuda_streams[: len(self._units)]]

    def _join(self) -> None:
        main = torch.cuda.current_stream(self.device)
        for stream in self._cuda_streams[: len(self._units)]:
            main.wait_stream(stream)

    def _zero_grad(self) -> None:
        for indices, fused in self._units:
            if fused is not None:
                fused.zero_grad()
            else:
                self._active[indices[0]].optimizer.zero_grad(set_to_none=True)

    def _eager_step(self, images: list[Tensor], targets: list[Tensor], epoch: int) -> None:
        self._zero_grad()
        self._step(images, targets, epoch)

    # -- an epoch ----------------------------------------------------------------------------
    def _seed_groups(self, runs: list[PackRun]) -> list[list[PackRun]]:
        """Runs grouped by data seed: one generator draws each group's batches."""
        groups: dict[int, list[PackRun]] = {}
        for run in runs:
            groups.setdefault(run.seed, []).append(run)
        return list(groups.values())

    def train_iterations(self, runs: list[PackRun], epoch: int, iters: int = 0) -> int:
        """Train ``runs`` on a fresh epoch per seed group (``iters`` > 0: its first ``iters`` steps); returns steps run."""
        self._active = runs
        self._lay_out(runs)
        groups = self._seed_groups(runs)
        self._group_of = [next(i for i, g in enumerate(groups) if run in g) for run in runs]
        distilled = {g for g, run in zip(self._group_of, runs) if run.cfg.DISTILLER.TYPE != "NONE"}
        self._taught = sorted(distilled)  # seed groups whose batches the teacher sees
        batches = self.source.epoch([(group[0].seed, group[0].generator) for group in groups], epoch, iters)
        for group in groups:
            for run in group[1:]:  # same seed, same epoch: the same state, kept in step
                run.generator.set_state(group[0].generator.get_state())
        k = len(runs)
        if self._sums is None or self._sums.shape[0] != k:  # kept in place: a captured graph reads them
            self._sums = torch.zeros(k, 3, device=self.device, dtype=torch.float64)  # loss*n, top-1 hits, n
            self._first_bad = torch.zeros(k, device=self.device, dtype=torch.long)
            self._step_no = torch.zeros((), device=self.device, dtype=torch.long)
        self._sums.zero_()
        self._first_bad.fill_(-1)
        self._step_no.zero_()
        for run in runs:
            run.distiller.train()
            if _epoch_scalars(run) is not None:
                _epoch_scalars(run).reset(self.device)

        def batch(step: int):
            images, targets, self._weight = batches.batch(step)  # weight: this rank's share of the batch mean
            self.progress.step()  # once per step, from the host: no device sync
            return images, targets

        self.graph.run(self._eager_step, batch, batches.full, epoch, key=graph_key(runs, epoch))
        for step in range(batches.full, batches.steps):  # the last, smaller batch
            self._eager_step(*batch(step), epoch)
        self.ranks.sum_(self._sums)
        self.ranks.first_(self._first_bad)
        for run in runs:
            if _epoch_scalars(run) is not None:
                self.ranks.sum_(_epoch_scalars(run).sums)
        for run in runs:
            run.distiller.train(False)
        return batches.steps

    @torch.no_grad()
    def validate(self, runs: list[PackRun]) -> list[tuple[float, float, float]]:
        """(top-1 %, top-5 %, mean CE) of each run's student on the validation split; a fused group at once.

        ``runs``: runs of the epoch just trained (a part of the step's units; the others are skipped).
        """
        wanted = {id(run) for run in runs}
        units = [(idx, fused) for idx, fused in self._units if any(id(self._active[i]) in wanted for i in idx)]
        sums = [torch.zeros(len(idx), 4, device=self.device, dtype=torch.float64) for idx, _ in units]
        for idx, fused in units:
            if fused is None:
                self._active[idx[0]].distiller.eval()
        for images, y in self.source.val_batches():  # each rank its part; the sums cover the whole split
            x = self._layout(images)
            for (idx, fused), total in zip(units, sums):
                # float32 even under SOLVER.AMP, as the host validates
                logits = fused.evaluate(x) if fused is not None else [self._active[idx[0]].distiller(image=x)]
                for row in range(len(idx)):
                    total[row] += _scores(logits[row], y)
        scores = {}
        for (idx, _), total in zip(units, sums):
            self.ranks.sum_(total)
            scores.update({id(self._active[i]): row for i, row in zip(idx, total.tolist())})
        return [(100.0 * top1 / n, 100.0 * top5 / n, ce / n) for top1, top5, ce, n in (scores[id(r)] for r in runs)]

    def train_epoch(self, runs: list[PackRun], epoch: int) -> None:
        """Set each run's LR for ``epoch``, train the epoch, then validate and commit (or fail) each run."""
        from mdistiller.engine.utils import adjust_learning_rate

        lrs = []
        for run in runs:
            # The host returns a numpy float after a decay; keep a Python float in the optimizer state.
            lr = float(adjust_learning_rate(epoch, run.cfg, run.optimizer))
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            lrs.append(lr)
        steps = self.train_iterations(runs, epoch, int(self.cfg.SOLVER.FAST.ITERS_PER_EPOCH))
        sums, first_bad = self._sums.tolist(), self._first_bad.tolist()
        trained = [math.isfinite(loss_sum) and bad < 0 for (loss_sum, _, _), bad in zip(sums, first_bad)]
        scores = iter(self.validate([run for run, ok in zip(runs, trained) if ok]))
        for run, lr, (loss_sum, top1, n), bad, ok in zip(runs, lrs, sums, first_bad, trained):
            if not ok:
                self._fail(run, f"epoch {epoch} step {bad if bad >= 0 else '?'} of {steps}: non-finite training loss")
                continue
            test_acc, test_top5, test_loss = next(scores)
            if not math.isfinite(test_loss):
                self._fail(run, f"epoch {epoch}: non-finite validation loss")
                continue
            record = epoch_record(100.0 * top1 / n, loss_sum / n, test_acc, test_top5, test_loss)
            log.info("%s epoch %d: train loss %.4f, test acc %.2f", run.name, epoch, record["train_loss"], test_acc)
            self._commit(run, epoch, lr, record)

    def _fail(self, run: PackRun, where: str) -> None:
        log.error("%s: %s; stopped (%s). Its last good checkpoint is kept.", run.name, where, NONFINITE_CAUSES)
        if self.ranks.main:
            run.folder.fail(f"{where}; {NONFINITE_CAUSES}")
        run.status, run.failure = "failed", where

    # -- run folder I/O ----------------------------------------------------------------------
    def _state(self, run: PackRun, epoch: int, lr: float, record: dict, saved_best: bool) -> dict:
        return {
            "epoch": epoch,
            "model": own_storage(model_state(run.distiller)),
            "optimizer": own_storage(run.optimizer.state_dict()),
            "best_acc": run.best_acc,
            "format": STATE_FORMAT,
            "lr": lr,
            "record": dict(record),
            "saved_best": saved_best,
            "seed": run.seed,
            "generator": run.generator.get_state(),
        }

    def _commit(self, run: PackRun, epoch: int, lr: float, record: dict) -> None:
        """Rank 0 commits the epoch (RunFolder.commit_epoch), then tensorboard and W&B."""
        test_acc = record["test_acc"]
        saved_best = test_acc >= run.best_acc  # the host saves `best` on ties too
        run.best_acc = max(run.best_acc, test_acc)
        run.epoch = epoch
        if not self.ranks.main:  # every rank holds the same run; rank 0 writes it
            return
        state = self._state(run, epoch, lr, record, saved_best)
        run.folder.commit_epoch(state, _student(run), run.cfg.LOG.SAVE_CHECKPOINT_FREQ)
        if run.writer is not None:
            extra = _epoch_scalars(run).scalars() if _epoch_scalars(run) is not None else {}
            for key, value in {**record, **extra}.items():
                run.writer.add_scalar(key, value, epoch)
            run.writer.flush()
        if run.cfg.LOG.WANDB:  # a solo run (packs refuse LOG.WANDB), as the host logs it
            import wandb

            wandb.log({"current lr": lr, **record})
            wandb.run.summary["best_acc"] = run.best_acc

    def _resume(self, run: PackRun) -> None:
        """Load the run's newest readable state, cut its worklog back to it and redo the epoch's other files."""

        def read() -> dict:
            run.folder.check_config(run.cfg.dump())
            if run.folder.status() == "failed":
                log.warning("%s: resuming a run that failed; it restarts from its last good checkpoint", run.name)
            state = run.folder.load_state()  # refused if another run's, or of another config, teacher or data
            run.folder.write_provenance()
            return state

        state = from_rank0(read)  # rank 0's file (or its refusal), on every rank
        source = f"{run.folder.path}/latest (epoch {state['epoch']})"
        load_model_state(run.distiller, state["model"], source)
        run.optimizer.load_state_dict(state["optimizer"])
        run.epoch, run.best_acc = int(state["epoch"]), float(state["best_acc"])
        if state.get("format") != STATE_FORMAT:
            raise RunError(
                f"{source}: not a state of this trainer (format {state.get('format')}); it cannot resume exactly"
            )
        run.seed = int(state["seed"])
        try:
            run.generator.set_state(state["generator"])
        except RuntimeError:
            raise RunError(
                f"{source}: its data generator belongs to another device type; resume with the same --device"
            ) from None
        if self.ranks.main:
            run.folder.redo_epoch(state, _student(run), run.cfg.LOG.SAVE_CHECKPOINT_FREQ)
        log.info("%s: resumed after epoch %d (best %.2f)", run.name, run.epoch, run.best_acc)

    # -- the whole schedule ------------------------------------------------------------------
    def start(self, resume: bool, new_ok: bool = True, modes: list[str] | None = None) -> None:
        """Lock every run folder, refuse clobbering starts, load resume states, write config.yaml.

        ``new_ok``: under --resume, runs with an empty folder start fresh (``RunFolder.check_start``).
        ``modes``: the caller's decisions per run (``RunFolder.check_start``), when already taken.
        """
        if modes is None:
            modes = decide_starts([run.folder for run in self.runs], resume, new_ok)
        for run, mode in zip(self.runs, modes):
            if mode == "skip":
                run.status = "finished"
            elif mode == "resume":
                try:
                    self._resume(run)
                except RunError as exc:
                    if len(self.runs) == 1:
                        raise
                    log.error("%s: %s", run.name, exc)  # the pack goes on without it
                    run.status, run.failure = "failed", str(exc)
            else:
                if self.ranks.main:
                    run.folder.start_fresh(run.cfg.dump())  # a run that never completed an epoch starts again
                if self.ranks.world > 1:  # a fresh run starts from rank 0's initialisation and data seed
                    run.seed = self.ranks.same_int(run.seed, self.device)
                    run.generator.manual_seed(run.seed)
                    self.ranks.follow_rank0(list(model_state(run.distiller).values()))

    def train(
        self,
        resume: bool = False,
        new_ok: bool = True,
        modes: list[str] | None = None,
        time_limit: TimeLimit | None = None,
    ) -> list[PackRun]:
        """Train every run to SOLVER.EPOCHS; returns the runs. RunsFailed if any stopped on a NaN/inf or could
        not resume; Unfinished if ``time_limit`` ended the job first (every run then resumes exactly)."""
        stopped = False
        try:
            self.start(resume, new_ok, modes)
            epochs = int(self.cfg.SOLVER.EPOCHS)
            self.progress = self._job_progress(epochs)
            while True:
                active = [r for r in self.runs if r.status == "active" and r.epoch < epochs]
                if not active:
                    break
                epoch = min(r.epoch for r in active) + 1  # runs left behind by a kill catch up first
                behind = [r for r in active if r.epoch + 1 == epoch]
                if time_limit is not None and not from_rank0(functools.partial(time_limit.allows_epoch, len(behind))):
                    stopped = True
                    break
                if time_limit is not None:
                    time_limit.epoch_started()
                self.progress.start_epoch(epoch)
                self.train_epoch(behind, epoch)
                self.progress.end_epoch()
                if time_limit is not None:
                    time_limit.epoch_ended(len(behind))
            for run in self.runs:
                if run.status == "active" and run.epoch >= epochs:
                    if self.ranks.main:
                        run.folder.finish(run.best_acc)
                    run.status = "finished"
                    log.info("%s: best accuracy %.2f", run.name, run.best_acc)
        finally:
            self._unfuse()
            self.progress.close()
            self.progress = QUIET
            self.source.close()
            for run in self.runs:
                _close_writer(run)
                run.folder.unlock()
        # torchrun stops every rank once one exits with an error: none raises before rank 0 has written all ends.
        self.ranks.wait_for_all(self.device)
        left = [r for r in self.runs if r.status == "active"]
        unfinished = None
        if stopped and left:
            done = sorted({r.epoch for r in left})
            at = f"epoch {done[0]}" if len(done) == 1 else f"epochs {done[0]}-{done[-1]}"
            unfinished = time_limit.stopped(f"{len(left)} of {len(self.runs)} run(s) at {at} of {epochs}")
        failed = [r for r in self.runs if r.status == "failed"]
        if failed:
            raise RunsFailed(
                "; ".join(f"{r.folder.path}: {r.failure}" for r in failed)
                + f" ({len(failed)} of {len(self.runs)} runs failed)"
                + (f"; the others {unfinished}" if unfinished else ""),
                unfinished=unfinished,
            )
        if unfinished:
            raise Unfinished(unfinished)
        return self.runs

    def _job_progress(self, epochs: int) -> JobProgress:
        """The progress of what is left of the job: epochs after the furthest-behind active run."""
        active = [r.epoch for r in self.runs if r.status == "active"]
        steps = self.source.steps(int(self.cfg.SOLVER.FAST.ITERS_PER_EPOCH))
        return JobProgress(epochs, min(active, default=epochs), steps, show=self.ranks.main, device=self.device)


def decide_starts(folders: list[RunFolder], resume: bool, new_ok: bool = True) -> list[str]:
    """Rank 0 locks the folders and decides each run's start ('start', 'resume', 'skip') for every rank.

    The other ranks never read the run folders; a refused start raises the same RunError on every rank.
    """

    def decide() -> list[str]:
        for folder in folders:
            folder.lock()
        return [folder.check_start(resume, new_ok) for folder in folders]

    return from_rank0(decide)


def data_seed(cfg: CN) -> int:
    """EXPERIMENT.SEED when >= 0, else a fresh random seed (recorded in the checkpoints)."""
    return int(cfg.EXPERIMENT.SEED) if cfg.EXPERIMENT.SEED >= 0 else int.from_bytes(os.urandom(4), "little")
