"""``SOLVER.TRAINER ddp``: mdistiller's base trainer on torchrun + DistributedDataParallel.

The host's ``base`` semantics (SGD on the distiller's learnable parameters, step learning-rate
schedule, loss = sum of the distiller's losses, the worklog, ``latest``/``best``/``epoch_N`` and
``student_*`` checkpoints, ``--resume``) with one process per device:

* ``SOLVER.BATCH_SIZE`` stays the global batch; each rank takes ``BATCH_SIZE / world`` samples of
  every global batch through a ``DistributedSampler`` seeded from EXPERIMENT.SEED (``set_epoch``
  each epoch), so the global batches are the same for any number of ranks. When the training set
  size is not a multiple of the world size, the sampler repeats up to ``world - 1`` samples;
* a training sample's random augmentation is drawn from a seed hashed from (seed, epoch, sample
  index) (:class:`~.data.SeededSamples`), and the tensor pipeline's (``DATASET.DECODE gpu|cpu``)
  from one hashed per batch from (seed, epoch, step, rank): it does not depend on the loader's
  workers, and a resumed run draws what the uninterrupted run draws;
* the distiller is wrapped in ``DistributedDataParallel`` (gradients averaged over the ranks,
  buffers broadcast from rank 0 before each forward); the teacher is frozen so DDP ignores it;
  ``SOLVER.SYNC_BN True`` converts the student's BatchNorm to SyncBatchNorm (CUDA only);
* validation is split over the ranks without padding; correct counts and loss sums are summed
  over the ranks, so every rank sees the metrics of the whole validation split;
* only rank 0 writes (worklog.txt, tensorboard, checkpoints), atomically, the worklog block of an
  epoch after its checkpoints; states hold no rank-specific data, so a run resumes on any number
  of ranks. Rank 0 reads the state on resume and broadcasts it. With ``EXPERIMENT.SEED < 0`` rank 0
  draws the seed; the state stores it and a resume uses it again (the host's states, which lack it,
  draw a new one), so on a CPU a resumed run ends bitwise equal to the uninterrupted one;
* a training loss that turns non-finite is found after the epoch (each rank records its first bad
  step on the device, no host sync per step; the ranks take the earliest): the epoch is neither
  validated nor committed, rank 0 ends the worklog with ``failed<TAB>epoch E step S of N:
  non-finite training loss; likely causes ...`` and every rank raises :class:`RunsFailed`, as the
  ``fast`` engine does; a non-finite validation loss stops the run alike. The previous epoch's
  checkpoints stay as they were and ``--resume`` restarts from them.

It also runs on CPU (gloo) and in a single process without torchrun; with ``DATASET.DECODE
gpu|cpu`` the ImageNet batches are decoded and augmented on the device (:mod:`.imagenet`).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections import OrderedDict

import torch
import torch.distributed
import torch.nn.functional as F
from mdistiller.engine.trainer import BaseTrainer
from mdistiller.engine.utils import adjust_learning_rate, log_msg
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from yacs.config import CfgNode as CN

from . import dist
from .config import ConfigError
from .data import SampleKeys, SeededSamples, position_seed, worker_options
from .errors import RunsFailed
from .fast.ranks import Ranks
from .imagenet import DevicePipeline, HostAugment, check_decode, decode, jpeg_loader
from .progress import JobProgress
from .runs import NONFINITE_CAUSES, RunFolder, epoch_record
from .timelimit import TimeLimit, Unfinished

log = logging.getLogger(__name__)

__all__ = ["DDPTrainer", "wants_ddp", "train_ddp"]


def wants_ddp(cfg) -> bool:
    """Whether train() should use this module: SOLVER.TRAINER ddp, or base under torchrun or with DATASET.DECODE."""
    _, world_size, _, _ = dist.env_world()
    trainer, decode_mode = cfg.SOLVER.TRAINER, cfg.DATASET.get("DECODE", "host")
    if trainer == "ddp":
        return True
    if trainer == "base":
        return world_size > 1 or decode_mode != "host"
    if world_size > 1:
        raise ConfigError(
            f"SOLVER.TRAINER {trainer!r} has no multi-process version (WORLD_SIZE={world_size} under torchrun); "
            "use SOLVER.TRAINER base (DistributedDataParallel) or launch one process without torchrun"
        )
    if decode_mode != "host":
        raise ConfigError(f"DATASET.DECODE {decode_mode!r} needs SOLVER.TRAINER base or ddp, not {trainer!r}")
    return False


def _state_model(module: nn.Module) -> dict[str, Tensor]:
    """The distiller's state dict keyed as mdistiller saves it (through DataParallel: ``module.`` prefix)."""
    return OrderedDict((f"module.{k}", v) for k, v in module.state_dict().items())


def _load_model(module: nn.Module, state: dict[str, Tensor]) -> None:
    prefix = "module."
    module.load_state_dict({k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()})


def _correct(output: Tensor, target: Tensor, k: int) -> Tensor:
    top = output.topk(min(k, output.shape[1]), dim=1).indices
    return (top == target.unsqueeze(1)).any(dim=1).sum()


class DDPTrainer(BaseTrainer):
    """mdistiller's BaseTrainer with DistributedDataParallel, sharded data and rank-0-only writes."""

    @classmethod
    def cfg_defaults(cls) -> CN:
        """SOLVER.SYNC_BN and DATASET.DECODE (host | cpu | gpu)."""
        cfg = CN()
        cfg.SOLVER = CN()
        cfg.SOLVER.SYNC_BN = False  # student BatchNorm -> SyncBatchNorm (CUDA)
        cfg.DATASET = CN()
        cfg.DATASET.DECODE = "host"  # ImageNet: host = PIL in workers; gpu = nvJPEG; cpu = same code on CPU
        return cfg

    def __init__(self, experiment_name, distiller, train_loader, val_loader, cfg):
        self.cfg = cfg
        self.rank, self.world = dist.rank(), dist.world()
        self.main = self.rank == 0
        model = distiller.module if isinstance(distiller, (nn.DataParallel, DistributedDataParallel)) else distiller
        self.device = next(model.parameters()).device
        dist.check_world(cfg, self.device)
        self.decode = check_decode(cfg, self.device)
        if cfg.DISTILLER.TYPE == "CRD":
            raise ConfigError("DISTILLER.TYPE CRD needs its contrastive sampler: use SOLVER.TRAINER crd (one process)")
        teacher = getattr(model, "teacher", None)
        if teacher is not None:
            teacher.requires_grad_(False)  # frozen: DDP neither hooks nor reduces it
        if cfg.SOLVER.get("SYNC_BN", False) and self.world > 1:
            model.student = nn.SyncBatchNorm.convert_sync_batchnorm(model.student)
        self.model = model
        self.distiller = model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.distiller = DistributedDataParallel(model, device_ids=ids)
        self.optimizer = self.init_optimizer(cfg)
        self.best_acc = -1.0
        self.time_limit: TimeLimit | None = None  # set by the caller: train() may stop early with Unfinished
        self.log_path = os.path.join(cfg.LOG.PREFIX, experiment_name)
        self.folder = RunFolder(self.log_path, experiment_name, cfg.dump())
        self.tf_writer = None
        if self.main:
            from tensorboardX import SummaryWriter

            os.makedirs(self.log_path, exist_ok=True)
            self.tf_writer = SummaryWriter(os.path.join(self.log_path, "train.events"))
        self.seed = self._shared_seed()
        self._build_loaders(train_loader, val_loader)
        self._position = (0, 0)  # (epoch, step) of the training batch in hand: the tensor pipeline seeds from it
        self._step_no = torch.zeros((), dtype=torch.long, device=self.device)  # steps of this epoch so far
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)  # first non-finite step, -1: none
        epochs, steps = cfg.SOLVER.EPOCHS, len(self.train_loader)
        self.progress = JobProgress(epochs, 0, steps, show=self.main, device=self.device)  # train() sets the job's

    # -- set-up ----------------------------------------------------------------------------
    def init_optimizer(self, cfg):
        """The host's SGD on the distiller's learnable parameters."""
        if cfg.SOLVER.TYPE != "SGD":
            raise ConfigError(f"SOLVER.TYPE {cfg.SOLVER.TYPE!r}: mdistiller's base trainer only builds SGD")
        return torch.optim.SGD(
            self.model.get_learnable_parameters(),
            lr=cfg.SOLVER.LR,
            momentum=cfg.SOLVER.MOMENTUM,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )

    def _shared_seed(self) -> int:
        """EXPERIMENT.SEED, or rank 0's fresh draw when it is < 0 (the same on every rank)."""
        seed = self.cfg.EXPERIMENT.get("SEED", -1)
        if seed < 0:  # every rank must shuffle alike: rank 0 draws, the others receive
            seed = dist.broadcast_object(random.SystemRandom().randrange(2**31) if self.main else None)
        return int(seed)

    def _build_loaders(self, train_loader: DataLoader, val_loader: DataLoader) -> None:
        train_set, val_set = train_loader.dataset, val_loader.dataset
        per_rank = self.cfg.SOLVER.BATCH_SIZE // self.world
        val_per_rank = max(1, math.ceil(self.cfg.DATASET.TEST.BATCH_SIZE / self.world))
        if len(train_set) % self.world and self.main:
            log.warning(
                "%d training samples over %d ranks: DistributedSampler repeats %d sample(s) per epoch",
                len(train_set),
                self.world,
                self.world - len(train_set) % self.world,
            )
        self.train_sampler = DistributedSampler(
            train_set, num_replicas=self.world, rank=self.rank, shuffle=True, seed=self.seed, drop_last=False
        )
        val_indices = dist.shard(range(len(val_set)), self.rank, self.world)
        workers, val_workers = train_loader.num_workers, val_loader.num_workers
        self.pipeline: DevicePipeline | None = None
        # The tensor pipeline's draws (reseeded per batch); the host's loader takes its workers' base seeds from
        # it rather than from the global RNG (SeededSamples then seeds every sample itself).
        g = torch.Generator().manual_seed(self.seed * 1000 + self.rank)
        self._generator = g
        if self.decode != "host":
            for what, ds in (("train", train_set), ("val", val_set)):
                if not hasattr(ds, "samples"):
                    raise ConfigError(f"DATASET.DECODE {self.decode!r} needs an ImageFolder {what} set, not {ds!r}")
            where = self.device if self.decode == "gpu" else torch.device("cpu")
            self.pipeline = DevicePipeline(HostAugment.from_host(), where, g)
            self.train_loader = jpeg_loader(train_set.samples, per_rank, self.train_sampler, workers)
            self.val_loader = jpeg_loader(val_set.samples, val_per_rank, val_indices, val_workers)
            self._names = [p for p, _ in train_set.samples], [p for p, _ in val_set.samples]
            return
        pin = self.device.type == "cuda"
        self.train_loader = DataLoader(
            SeededSamples(train_set, restore=workers == 0),  # the main process's RNGs stay as they were
            batch_size=per_rank,
            sampler=SampleKeys(self.train_sampler),
            num_workers=workers,
            generator=g,
            pin_memory=pin,
            **worker_options(workers),
        )
        self.val_loader = DataLoader(
            val_set,
            batch_size=val_per_rank,
            sampler=val_indices,
            num_workers=val_workers,
            pin_memory=pin,
            **worker_options(val_workers),
        )

    def _use_seed(self, seed: int) -> None:
        """Shuffle and augment from ``seed`` from now on (a resumed run's stored seed)."""
        self.seed = seed
        self.train_sampler.seed = seed  # SampleKeys passes it on to the augmentation

    # -- batches ---------------------------------------------------------------------------
    def _batch(self, data, train: bool) -> tuple[Tensor, Tensor]:
        """(images, targets) on the device from a loader batch."""
        if self.pipeline is None:
            image, target = data[0], data[1]
            return image.float().to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)
        encoded, target, index = data
        names = [self._names[0 if train else 1][i] for i in index.tolist()]
        images = decode(encoded, self.pipeline.device, names)
        if train:
            self._generator.manual_seed(position_seed(self.seed, *self._position, self.rank))
        image = self.pipeline.train(images)[0] if train else self.pipeline.val(images)
        return image.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)

    # -- training --------------------------------------------------------------------------
    def train(self, resume: bool = False) -> None:
        """Train to SOLVER.EPOCHS; with ``resume``, continue from the run folder's state (read by rank 0)."""
        epoch = 1
        if resume:
            if self.main:
                self.folder.check_config(self.cfg.dump())  # a missing config.yaml is rewritten from the state
            state = dist.broadcast_object(self.folder.load_state() if self.main else None)
            _load_model(self.model, state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.best_acc = float(state["best_acc"])
            epoch = int(state["epoch"]) + 1
            if "seed" in state:  # this trainer's own state: the data order of the uninterrupted run
                self._use_seed(int(state["seed"]))
            if self.main and self.folder.status() == "failed":
                log.warning(
                    "%s: resuming a run that failed; it restarts from epoch %d's checkpoint", self.log_path, epoch - 1
                )
            if self.main and "saved_best" in state:  # this trainer's own state: redo what follows `latest`
                student = {"model": self.model.student.state_dict()}
                self.folder.redo_epoch(state, student, self.cfg.LOG.SAVE_CHECKPOINT_FREQ)
            elif self.main:
                self.folder.cut_worklog(epoch - 1)
        limit = self.time_limit
        self.progress = JobProgress(
            self.cfg.SOLVER.EPOCHS, epoch - 1, len(self.train_loader), show=self.main, device=self.device
        )
        try:
            while epoch <= self.cfg.SOLVER.EPOCHS:
                if limit is not None and not dist.from_rank0(limit.allows_epoch):
                    raise Unfinished(
                        limit.stopped(f"{self.folder.path} at epoch {epoch - 1} of {self.cfg.SOLVER.EPOCHS}")
                    )
                if limit is not None:
                    limit.epoch_started()
                self.train_epoch(epoch)
                if limit is not None:
                    limit.epoch_ended()
                epoch += 1
            if self.main:
                print(log_msg(f"Best accuracy:{self.best_acc}", "EVAL"))
                self.folder.finish(self.best_acc)
        finally:
            self.progress.close()
            if self.main:
                self.tf_writer.close()

    def train_epoch(self, epoch: int) -> None:
        """Schedule, one pass over this rank's shard, validation, then (rank 0) checkpoints and the worklog.

        RunsFailed on every rank, with nothing committed, if the training or validation loss is non-finite.
        """
        lr = adjust_learning_rate(epoch, self.cfg, self.optimizer)
        self.train_sampler.set_epoch(epoch)
        self.distiller.train()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss * n, top-1, top-5, n
        self._step_no.zero_()
        self._first_bad.fill_(-1)
        progress = self.progress
        progress.start_epoch(epoch, len(self.train_loader))
        start = time.time()
        for step, data in enumerate(self.train_loader):
            self._position = (epoch, step)
            self.train_iter(data, epoch, sums)
            progress.step()
            if progress.bar is not None and (step % 20 == 0 or step + 1 == len(self.train_loader)):  # a bar only
                s = sums.tolist()
                rate = s[3] * self.world / max(time.time() - start, 1e-9)
                msg = f"Epoch:{epoch}| Loss:{s[0] / s[3]:.4f}| Top-1:{100 * s[1] / s[3]:.3f}| img/s:{rate:.0f}"
                progress.set_description(log_msg(msg, "TRAIN"))
        loss_sum, top1, top5, n = dist.all_reduce_sum(sums).tolist()
        bad = int(Ranks().first_(self._first_bad).item())  # the earliest over the ranks: all ranks agree
        if bad >= 0 or not math.isfinite(loss_sum):
            steps = len(self.train_loader)
            self._fail(f"epoch {epoch} step {bad if bad >= 0 else '?'} of {steps}: non-finite training loss")
        self.sync_buffers()
        test_acc, test_acc_top5, test_loss = self.validate()
        if not math.isfinite(test_loss):  # summed over the ranks: all ranks agree
            self._fail(f"epoch {epoch}: non-finite validation loss")
        record = epoch_record(100.0 * top1 / n, loss_sum / n, test_acc, test_acc_top5, test_loss)
        saved_best = test_acc >= self.best_acc  # the host saves `best` on ties too
        self.best_acc = max(self.best_acc, test_acc)
        if self.main:
            self.commit(epoch, float(lr), record, saved_best)
        progress.end_epoch()

    def train_iter(self, data, epoch: int, sums: Tensor) -> None:
        """One step on this rank's share of the global batch; adds (loss * n, top-1, top-5, n) to ``sums``."""
        image, target = self._batch(data, train=True)
        preds, losses = self.distiller(image=image, target=target, epoch=epoch)
        loss = sum(value.mean() for value in losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            sums += _stats(loss.detach(), preds, target, sums.dtype)
            self._step_no += 1
            newly_bad = (self._first_bad < 0) & ~torch.isfinite(loss.detach())
            self._first_bad.copy_(torch.where(newly_bad, self._step_no, self._first_bad))  # no host sync

    def _fail(self, where: str) -> None:
        """Stop the run on every rank: rank 0 ends the worklog with a ``failed`` line; no checkpoint is written."""
        log.error("%s: %s; stopped (%s). Its last good checkpoint is kept.", self.log_path, where, NONFINITE_CAUSES)
        # A collective: no rank exits (and has torchrun stop rank 0) before the line is written.
        dist.from_rank0(lambda: self.folder.fail(f"{where}; {NONFINITE_CAUSES}"))
        raise RunsFailed(f"{self.log_path}: {where} (1 of 1 runs failed)")

    def sync_buffers(self) -> None:
        """Rank 0's BatchNorm statistics on every rank (DDP broadcasts them only before a training forward)."""
        if self.world > 1:
            for buf in self.model.buffers():
                torch.distributed.broadcast(buf, src=0)

    @torch.no_grad()
    def validate(self) -> tuple[float, float, float]:
        """(top-1 %, top-5 %, mean loss) of the whole validation split; each rank evaluates its share."""
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        shown = self.main and self.progress.interactive  # a bar on a terminal only
        for data in tqdm(self.val_loader, disable=not shown, desc=log_msg("validation", "EVAL")):
            image, target = self._batch(data, train=False)
            output = self.model(image=image)
            loss_sum = F.cross_entropy(output, target, reduction="sum")
            sums += _stats(loss_sum, output, target, sums.dtype, mean=False)
        loss_sum, top1, top5, n = dist.all_reduce_sum(sums).tolist()
        return 100.0 * top1 / n, 100.0 * top5 / n, loss_sum / n

    # -- writing (rank 0) ------------------------------------------------------------------
    def commit(self, epoch: int, lr: float, record: dict[str, float], saved_best: bool) -> None:
        """The epoch's files (RunFolder.commit_epoch: checkpoints, then the worklog block), tensorboard, W&B."""
        state = {
            "epoch": epoch,
            "model": _state_model(self.model),
            "optimizer": self.optimizer.state_dict(),
            "best_acc": self.best_acc,
            "record": dict(record),
            "lr": lr,
            "saved_best": saved_best,
            "seed": self.seed,  # shuffle and augmentation seed, drawn when EXPERIMENT.SEED < 0: a resume reuses it
        }
        self.folder.commit_epoch(state, {"model": self.model.student.state_dict()}, self.cfg.LOG.SAVE_CHECKPOINT_FREQ)
        for key, value in record.items():
            self.tf_writer.add_scalar(key, value, epoch)
        self.tf_writer.flush()
        if self.cfg.LOG.WANDB:
            import wandb

            wandb.log({"current lr": lr})
            wandb.log(dict(record))
            wandb.run.summary["best_acc"] = self.best_acc


def _stats(loss: Tensor, output: Tensor, target: Tensor, dtype: torch.dtype, mean: bool = True) -> Tensor:
    """(loss sum, top-1 count, top-5 count, n) of one batch; ``loss`` is a mean when ``mean``."""
    n = target.shape[0]
    loss_sum = loss.double() * n if mean else loss.double()
    parts = [loss_sum, _correct(output, target, 1), _correct(output, target, 5), torch.tensor(n, device=loss.device)]
    return torch.stack([p.to(dtype) for p in parts])


def train_ddp(
    cfg, experiment_name: str, device: torch.device, resume: bool = False, time_limit: TimeLimit | None = None
) -> DDPTrainer | None:
    """One run of the host's base trainer on every rank of torchrun's job (or one process without it);
    Unfinished when ``time_limit`` ends it before SOLVER.EPOCHS."""
    check_decode(cfg, device)
    with dist.job([cfg], device) as rank_device:
        return _train(cfg, experiment_name, rank_device, resume, time_limit)


def _train(cfg, experiment_name: str, device: torch.device, resume: bool, time_limit) -> DDPTrainer | None:
    from mdistiller.engine.cfg import show_cfg

    from .build import build_distiller, build_models
    from .checkpoints import allow_release_types
    from .data import get_dataset, seed_everything, seed_run
    from .train import _init_wandb

    main = dist.is_main()
    folder = RunFolder(os.path.join(cfg.LOG.PREFIX, experiment_name), experiment_name, cfg.dump())
    try:

        def decide() -> str:
            folder.lock()
            return folder.begin(resume, cfg.dump())

        mode = dist.from_rank0(decide)  # rank 0 decides for every rank
        if mode == "skip":
            return None
        resume = mode == "resume"  # a run without a checkpoint starts again
        seed_run(cfg, device)
        if main:
            _init_wandb(cfg, experiment_name)
            show_cfg(cfg)
            log.info("DistributedDataParallel on %d process(es), %s", dist.world(), device)
        train_loader, val_loader, num_data, num_classes = get_dataset(cfg)
        student, teacher = build_models(cfg, num_classes)
        distiller = build_distiller(cfg, student, teacher, num_data).to(device)
        if cfg.EXPERIMENT.SEED >= 0 and dist.world() > 1:
            seed_everything(cfg.EXPERIMENT.SEED + dist.rank())  # per-rank streams for any draws in a training step
        trainer = DDPTrainer(experiment_name, distiller, train_loader, val_loader, cfg)
        trainer.time_limit = time_limit
        with allow_release_types():  # states from the host's trainer hold numpy floats
            trainer.train(resume=resume)
        return trainer
    finally:
        folder.unlock()
