"""What a pack checks before anything is built: that its runs can train together, on this engine."""

from __future__ import annotations

import torch
from yacs.config import CfgNode as CN

from ..config import ConfigError, lookup
from .fuse_speed import FuseChoice
from .source import source_kind

__all__ = ["PACK_KEYS", "TEACHER_KEYS", "check_pack"]

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
TEACHER_KEYS = ("DISTILLER.TEACHER", "DISTILLER.TEACHER_CKPT")


def check_pack(cfgs: list[CN], names: list[str], device: torch.device | None = None) -> None:
    """ConfigError unless the configs can train together: same data, batches, schedule length, teacher."""
    from ..imagenet import check_decode

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
            if lookup(cfg, key) != lookup(first, key):
                raise ConfigError(
                    f"pack: {key} differs: {lookup(first, key)!r} in {first_name} but {lookup(cfg, key)!r} in {name}; "
                    "runs of a pack share data, batch size and schedule length"
                )
    for cfg, name in distilled[1:]:
        for key in TEACHER_KEYS:
            if lookup(cfg, key) != lookup(distilled[0][0], key):
                raise ConfigError(
                    f"pack: {key} differs: {lookup(distilled[0][0], key)!r} in {distilled[0][1]} but "
                    f"{lookup(cfg, key)!r} in {name}; the runs of a pack share one teacher"
                )
