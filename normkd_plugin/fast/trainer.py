"""``SOLVER.TRAINER fast`` and ``ddp``: the host's base trainer as a pack of one run of this engine.

``fast`` keeps the data and the step on the device; ``ddp`` reads batches through the host's
datasets and a loader (:class:`~.source.LoaderSource`: ImageNet folders, ``DATASET.DECODE``, and
torchrun with each rank its share of every global batch).

Same semantics as ``mdistiller.engine.trainer.BaseTrainer`` (a subclass: optimizer, step learning
rate schedule, ``worklog.txt``, checkpoints, ``--resume``); it trains a :class:`~.pack.Pack` of one
run, so a solo run and a packed run share every line of the training code. What changes:

* the CIFAR split lives on the device as uint8; each epoch is shuffled, cropped and flipped there
  in a few batched kernels from the run's own ``torch.Generator`` (seeded from EXPERIMENT.SEED),
  and normalised inside the step (the host's pipeline, read from its transform);
* on CUDA the whole step is captured as one CUDA graph and replayed (:mod:`.graph`), captured again
  whenever the learning rate or the distiller's warm-up factor changes, so both are exact constants;
* the last partial batch (50,000 % 64 = 16 images) runs eagerly after the replays, so every image
  is used once per epoch as with the host's DataLoader while shapes stay static;
* run folders are locked, written atomically and resumed exactly (:mod:`normkd_plugin.runs`); a
  non-finite loss stops the run and marks it failed;
* optional bfloat16 autocast (``SOLVER.AMP``) and channels_last (``SOLVER.FAST.CHANNELS_LAST``);
  validation runs on the device in batches of ``SOLVER.FAST.EVAL_BATCH_SIZE``.
"""

from __future__ import annotations

import torch
from mdistiller.engine.trainer import BaseTrainer
from yacs.config import CfgNode as CN

from ..runs import RunFolder
from .augment import TensorCifar, host_pipeline
from .pack import Pack, PackRun, SharedTeacher, data_seed
from .ranks import Ranks
from .source import DeviceSplit, LoaderSource, source_kind

__all__ = ["FastTrainer", "LoaderTrainer", "tensor_split", "device_split", "make_source"]


def tensor_split(loader, what: str, device: torch.device) -> TensorCifar:
    """The dataset of a host DataLoader as a device-resident TensorCifar with the loader's transform."""
    ds = loader.dataset
    if not hasattr(ds, "data") or not hasattr(ds, "targets"):
        raise TypeError(
            f"SOLVER.TRAINER fast needs an in-memory CIFAR-style {what} dataset with .data and "
            f".targets (got {type(ds).__name__}); use SOLVER.TRAINER base for folder datasets"
        )
    return TensorCifar(ds.data, ds.targets, host_pipeline(ds.transform), device)


def device_split(train_loader, val_loader, cfg, device: torch.device, ranks: Ranks) -> DeviceSplit:
    """The host loaders' CIFAR splits held on ``device`` as a pack's source."""
    train, val = tensor_split(train_loader, "train", device), tensor_split(val_loader, "validation", device)
    return DeviceSplit(train, val, int(cfg.SOLVER.BATCH_SIZE), int(cfg.SOLVER.FAST.EVAL_BATCH_SIZE), ranks)


def make_source(train_loader, val_loader, cfg, device: torch.device, ranks: Ranks) -> DeviceSplit | LoaderSource:
    """Where a pack of ``cfg``'s runs takes its batches (:func:`~.source.source_kind`): the host loaders' CIFAR
    splits on the device (SOLVER.TRAINER fast), or their datasets through this engine's loader."""
    if source_kind(cfg) == "loader":
        workers = int(cfg.DATASET.NUM_WORKERS)
        return LoaderSource(train_loader.dataset, val_loader.dataset, cfg, device, ranks, workers)
    return device_split(train_loader, val_loader, cfg, device, ranks)


def share_teacher(distiller: torch.nn.Module) -> SharedTeacher | None:
    """Wrap the distiller's teacher (if any) so a pack can run it once per step for all runs."""
    teacher = getattr(distiller, "teacher", None)
    if teacher is None:
        return None
    if not isinstance(teacher, SharedTeacher):
        distiller.teacher = SharedTeacher(teacher)
    return distiller.teacher


class FastTrainer(BaseTrainer):
    """mdistiller's BaseTrainer training a pack of one run with device-resident data and a CUDA-graph step."""

    @classmethod
    def cfg_defaults(cls) -> CN:
        """SOLVER.AMP and SOLVER.FAST.{CUDA_GRAPH, CHANNELS_LAST, EVAL_BATCH_SIZE, ITERS_PER_EPOCH, PACK_BRANCHES, FUSE}."""
        cfg = CN()
        cfg.SOLVER = CN()
        cfg.SOLVER.AMP = False  # bfloat16 autocast for forward passes
        cfg.SOLVER.FAST = CN()
        cfg.SOLVER.FAST.CUDA_GRAPH = True
        cfg.SOLVER.FAST.CHANNELS_LAST = False
        cfg.SOLVER.FAST.EVAL_BATCH_SIZE = 1000
        cfg.SOLVER.FAST.ITERS_PER_EPOCH = 0  # > 0: a short epoch of that many steps (smoke runs only)
        cfg.SOLVER.FAST.PACK_BRANCHES = False  # CUDA: each student of a pack on its own stream (graph branch)
        cfg.SOLVER.FAST.FUSE = "auto"  # packs: students of one architecture as one network (auto: if measured faster)
        return cfg

    def __init__(self, experiment_name, distiller, train_loader, val_loader, cfg):
        super().__init__(experiment_name, distiller, train_loader, val_loader, cfg)
        self.model = distiller.module if isinstance(distiller, torch.nn.DataParallel) else distiller
        self.device = next(self.model.parameters()).device
        run = PackRun(
            name=experiment_name,
            cfg=cfg,
            folder=RunFolder(self.log_path, experiment_name, cfg.dump()),
            distiller=self.model,
            optimizer=self.optimizer,
            seed=data_seed(cfg),
            writer=self.tf_writer,
        )
        self.run = run
        source = make_source(train_loader, val_loader, cfg, self.device, Ranks())
        self.pack = Pack([run], source, share_teacher(self.model))

    def train(self, resume: bool = False) -> None:
        """Train (or resume) the run to SOLVER.EPOCHS; RunsFailed if its loss turned non-finite."""
        self.pack.train(resume)
        self.best_acc = self.run.best_acc

    def train_epoch(self, epoch: int) -> None:
        """One epoch of the host's loop: schedule, a pass over the data, validation, worklog, checkpoints."""
        self.pack.train_epoch([self.run], epoch)
        self.best_acc = self.run.best_acc


class LoaderTrainer(FastTrainer):
    """``SOLVER.TRAINER ddp``: a pack of one fed by the host's datasets through a loader (one process here;
    ``normkd-train`` runs it under torchrun too)."""

    @classmethod
    def cfg_defaults(cls) -> CN:
        """SOLVER.SYNC_BN and DATASET.DECODE (host | cpu | gpu)."""
        cfg = CN()
        cfg.SOLVER = CN()
        cfg.SOLVER.SYNC_BN = False  # student BatchNorm -> SyncBatchNorm (CUDA, several processes)
        cfg.DATASET = CN()
        cfg.DATASET.DECODE = "host"  # ImageNet: host = PIL in workers; gpu = nvJPEG; cpu = same code on CPU
        return cfg
