"""Build the student, teacher and distiller of a run config with the host's own pieces."""

from __future__ import annotations

import inspect
import os

from torch import nn

from .checkpoints import load_teacher

__all__ = [
    "build_student",
    "build_teacher",
    "build_models",
    "build_distiller",
    "host_optimizer",
    "build_pack",
    "assemble_pack",
]


def build_student(cfg, num_classes: int, name: str | None = None) -> nn.Module:
    """DISTILLER.STUDENT (or the architecture ``name``) from mdistiller's model dictionaries, freshly initialised
    from the global RNG, no weights loaded."""
    from mdistiller.models import cifar_model_dict, imagenet_model_dict

    name = name or cfg.DISTILLER.STUDENT
    if cfg.DATASET.TYPE == "imagenet":
        return imagenet_model_dict[name](pretrained=False)
    return cifar_model_dict[name][0](num_classes=num_classes)


def build_teacher(cfg, num_classes: int) -> nn.Module | None:
    """DISTILLER.TEACHER with its weights loaded, or None for DISTILLER.TYPE NONE."""
    from mdistiller.models import cifar_model_dict, imagenet_model_dict

    if cfg.DISTILLER.TYPE == "NONE":
        return None
    if cfg.DATASET.TYPE == "imagenet":
        teacher = imagenet_model_dict[cfg.DISTILLER.TEACHER](pretrained=not cfg.DISTILLER.TEACHER_CKPT)
        if cfg.DISTILLER.TEACHER_CKPT:
            load_teacher(cfg, teacher, None)
        return teacher
    net, host_path = cifar_model_dict[cfg.DISTILLER.TEACHER]
    teacher = net(num_classes=num_classes)
    load_teacher(cfg, teacher, host_path)
    return teacher


def build_models(cfg, num_classes: int) -> tuple[nn.Module, nn.Module | None]:
    """(student, teacher or None), the student built first (normkd-train's order for the host's trainers)."""
    student = build_student(cfg, num_classes)
    return student, build_teacher(cfg, num_classes)


def build_distiller(cfg, student: nn.Module, teacher: nn.Module | None, num_data: int) -> nn.Module:
    """distiller_dict[DISTILLER.TYPE] built as the host's tools/train.py builds it."""
    from mdistiller.distillers import distiller_dict

    cls = distiller_dict[cfg.DISTILLER.TYPE]
    if teacher is None:
        return cls(student)
    # CRD-style distillers take the dataset size as a fourth argument.
    if len(inspect.signature(cls.__init__).parameters) > 4:
        return cls(student, teacher, cfg, num_data)
    return cls(student, teacher, cfg)


def host_optimizer(cfg, distiller: nn.Module):
    """The optimizer mdistiller's BaseTrainer.init_optimizer builds for ``distiller``."""
    from types import SimpleNamespace

    from mdistiller.engine.trainer import BaseTrainer

    return BaseTrainer.init_optimizer(SimpleNamespace(distiller=SimpleNamespace(module=distiller)), cfg)


def build_pack(cfgs: list, names: list[str], folders: list, device):
    """A Pack of ``cfgs``: data and teacher once; then per run, seed, student, distiller and optimizer.

    The order is the same for a pack of one, so a run's initialisation depends on its own seed only.
    Locking and starting the folders is the caller's (:mod:`normkd_plugin.lifecycle`).
    """
    import torch

    from .data import get_dataset, seed_everything
    from .distributed import Ranks
    from .engine.pack import PackRun
    from .engine.state import data_seed

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = all(cfg.EXPERIMENT.SEED < 0 for cfg in cfgs)
    train_loader, val_loader, num_data, num_classes = get_dataset(cfgs[0])
    teacher_cfg = next((cfg for cfg in cfgs if cfg.DISTILLER.TYPE != "NONE"), None)
    teacher = None if teacher_cfg is None else build_teacher(teacher_cfg, num_classes)
    runs = []
    for cfg, name, folder in zip(cfgs, names, folders):  # on the CPU, with the plain teacher, as the host builds them
        if cfg.EXPERIMENT.SEED >= 0:
            seed_everything(cfg.EXPERIMENT.SEED)
        student = build_student(cfg, num_classes)
        if teacher is not None and cfg.DISTILLER.TYPE != "NONE":
            # normkd-train's path for the host's trainers initialises the teacher here, between student and
            # distiller: draw as much from the global RNG, so a distiller's own modules (connectors) start alike.
            build_student(cfg, num_classes, cfg.DISTILLER.TEACHER)
        if cfg.SOLVER.SYNC_BN and Ranks().world > 1:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        distiller = build_distiller(cfg, student, teacher if cfg.DISTILLER.TYPE != "NONE" else None, num_data)
        runs.append(PackRun(name, cfg, folder, distiller, host_optimizer(cfg, distiller), data_seed(cfg)))
    return assemble_pack(runs, train_loader.dataset, val_loader.dataset, device)


def assemble_pack(runs: list, train_set, val_set, device):
    """The one place a Pack is made, from built runs (``build_pack``, or mdistiller's tools/train.py through
    ``FastTrainer``): what each run learns from, its batches' source, one shared frozen teacher on ``device``,
    and (rank 0) a tensorboard writer for each run that has none."""
    from tensorboardX import SummaryWriter

    from .distributed import Ranks
    from .engine.pack import Pack
    from .engine.source import make_source
    from .engine.teacher import share_teacher
    from .provenance import learned_from

    ranks = Ranks()
    for run in runs:  # the config its folder writes to config.yaml, records in its states and checks on --resume
        if run.folder.config is None:
            run.folder.config = run.cfg.dump()
    if ranks.main:  # what each run learns from, recorded and checked by rank 0 (a shared file is hashed once)
        for run in runs:
            run.folder.provenance = learned_from(run.cfg, train_set, val_set)
    source = make_source(train_set, val_set, runs[0].cfg, device, ranks)  # may refuse the data: before any writer
    distilled = [run for run in runs if run.cfg.DISTILLER.TYPE != "NONE"]
    shared = share_teacher(distilled[0].distiller) if distilled else None
    if shared is not None:
        shared.net.requires_grad_(False)  # frozen: it is never trained, and the gradient all-reduce skips it
        shared.to(device)
    for run in runs:
        if run in distilled:
            run.distiller.teacher = shared
        run.distiller.to(device)
        if run.writer is None and ranks.main:
            run.writer = SummaryWriter(os.path.join(run.folder.path, "train.events"), flush_secs=60)
    return Pack(runs, source, shared)
