"""``SOLVER.TRAINER fast``: the host's base trainer, with the data and the step kept on the device.

Same semantics as ``mdistiller.engine.trainer.BaseTrainer`` (a subclass: optimizer, step learning
rate schedule, ``worklog.txt``, checkpoints, ``--resume``); it trains a :class:`~.pack.Pack` of one
run, so a solo run and a packed run share every line of the training code. What changes:

* the CIFAR split lives on the device as uint8; each epoch is shuffled, cropped and flipped there
  in a few batched kernels from the run's own ``torch.Generator`` (seeded from EXPERIMENT.SEED),
  and normalised inside the step (the host's pipeline, read from its transform);
* on CUDA the whole step is captured as one CUDA graph per epoch and replayed (:mod:`.graph`),
  so the learning rate and the distiller's ``epoch`` (DKD-style warm-up) are exact constants;
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

__all__ = ["FastTrainer", "tensor_split"]


def tensor_split(loader, what: str, device: torch.device) -> TensorCifar:
    """The dataset of a host DataLoader as a device-resident TensorCifar with the loader's transform."""
    ds = loader.dataset
    if not hasattr(ds, "data") or not hasattr(ds, "targets"):
        raise TypeError(
            f"SOLVER.TRAINER fast needs an in-memory CIFAR-style {what} dataset with .data and "
            f".targets (got {type(ds).__name__}); use SOLVER.TRAINER base for folder datasets"
        )
    return TensorCifar(ds.data, ds.targets, host_pipeline(ds.transform), device)


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
        cfg.SOLVER.FAST.FUSE = "auto"  # packs: students of one architecture as one network (auto: on CUDA)
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
        self.pack = Pack(
            [run],
            tensor_split(train_loader, "train", self.device),
            tensor_split(val_loader, "validation", self.device),
            share_teacher(self.model),
        )

    def train(self, resume: bool = False) -> None:
        """Train (or resume) the run to SOLVER.EPOCHS; RunsFailed if its loss turned non-finite."""
        self.pack.train(resume)
        self.best_acc = self.run.best_acc

    def train_epoch(self, epoch: int) -> None:
        """One epoch of the host's loop: schedule, a pass over the data, validation, worklog, checkpoints."""
        self.pack.train_epoch([self.run], epoch)
        self.best_acc = self.run.best_acc
