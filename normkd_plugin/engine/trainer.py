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
* run folders are locked, written atomically and resumed exactly (:mod:`normkd_plugin.run_folder`); a
  non-finite loss stops the run and marks it failed;
* optional bfloat16 autocast (``SOLVER.AMP``) and channels_last (``SOLVER.FAST.CHANNELS_LAST``);
  validation runs on the device in batches of ``SOLVER.FAST.EVAL_BATCH_SIZE``.
"""

from __future__ import annotations

import torch
from mdistiller.engine.trainer import BaseTrainer
from yacs.config import CfgNode as CN

__all__ = ["FastTrainer", "LoaderFedTrainer"]


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
        from ..build import assemble_pack
        from ..engine.pack import PackRun
        from ..run_folder import RunFolder
        from .state import data_seed

        super().__init__(experiment_name, distiller, train_loader, val_loader, cfg)
        self.model = distiller.module if isinstance(distiller, torch.nn.DataParallel) else distiller
        self.device = next(self.model.parameters()).device
        folder = RunFolder(self.log_path, experiment_name, cfg.dump())
        self.run = PackRun(experiment_name, cfg, folder, self.model, self.optimizer, data_seed(cfg), self.tf_writer)
        self.pack = assemble_pack([self.run], train_loader.dataset, val_loader.dataset, self.device)

    def train(self, resume: bool = False, hooks=()) -> None:
        """Train (or resume) the run to SOLVER.EPOCHS (:func:`~.fit.train_runs`, ``hooks`` added to its own);
        RunsFailed if its loss turned non-finite."""
        from ..lifecycle import RunLife, decide_all
        from .fit import Tensorboard, train_runs

        life = RunLife(self.run.folder, resume)
        trained = False
        try:
            decide_all([life])
            if life.mode != "skip":
                trained = True  # train_runs closes the pack and the writer, whatever happens
                train_runs(self.pack, [life], hooks=hooks)
        finally:
            if not trained:  # skipped as finished, or refused
                Tensorboard([self.run]).close()
                self.pack.close()
            life.close()
        self.best_acc = self.run.best_acc

    def train_epoch(self, epoch: int) -> None:
        """Not this trainer's: mdistiller's BaseTrainer.train_epoch trains one epoch on CUDA without the run's lock;
        ``train(resume)`` trains (or resumes) the whole schedule, epoch by epoch."""
        raise NotImplementedError("FastTrainer trains the whole schedule with train(resume=...), not epoch by epoch")


class LoaderFedTrainer(FastTrainer):
    """``SOLVER.TRAINER ddp``: a pack of one fed by the host's datasets through a loader (one process here;
    ``normkd-train`` runs it under torchrun too). The config's name is the host's; there is no
    DistributedDataParallel in it: the ranks all-reduce each run's gradients themselves (:mod:`normkd_plugin.distributed`)."""

    @classmethod
    def cfg_defaults(cls) -> CN:
        """SOLVER.SYNC_BN and DATASET.DECODE (host | cpu | gpu)."""
        cfg = CN()
        cfg.SOLVER = CN()
        cfg.SOLVER.SYNC_BN = False  # student BatchNorm -> SyncBatchNorm (CUDA, several processes)
        cfg.DATASET = CN()
        cfg.DATASET.DECODE = "host"  # ImageNet: host = PIL in workers; gpu = nvJPEG; cpu = same code on CPU
        return cfg
