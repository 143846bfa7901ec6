"""Build the student, teacher and distiller of a run config with the host's own pieces."""

from __future__ import annotations

import inspect
import os

from torch import nn

from .checkpoints import load_teacher

__all__ = ["build_student", "build_teacher", "build_models", "build_distiller", "build_pack"]


def build_student(cfg, num_classes: int) -> nn.Module:
    """DISTILLER.STUDENT from mdistiller's model dictionaries, freshly initialised from the global RNG."""
    from mdistiller.models import cifar_model_dict, imagenet_model_dict

    if cfg.DATASET.TYPE == "imagenet":
        return imagenet_model_dict[cfg.DISTILLER.STUDENT](pretrained=False)
    return cifar_model_dict[cfg.DISTILLER.STUDENT][0](num_classes=num_classes)


def _teacher_architecture(cfg, num_classes: int) -> nn.Module:
    """DISTILLER.TEACHER freshly initialised from the global RNG, no weights loaded."""
    from mdistiller.models import cifar_model_dict, imagenet_model_dict

    if cfg.DATASET.TYPE == "imagenet":
        return imagenet_model_dict[cfg.DISTILLER.TEACHER](pretrained=False)
    return cifar_model_dict[cfg.DISTILLER.TEACHER][0](num_classes=num_classes)


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


def build_pack(cfgs: list, names: list[str], folders: list, device):
    """A Pack: data and teacher once; then per run, seed, student, distiller and optimizer.

    The order is the same for a pack of one, so a run's initialisation depends on its own seed only.
    The batches come from the CIFAR split on the device (SOLVER.TRAINER fast) or from the host's
    datasets through a loader (:func:`~.fast.source.source_kind`). Only each run's tensorboard writer
    is opened (on rank 0); locking and starting the folders is the caller's.
    """
    import torch
    from tensorboardX import SummaryWriter

    from .data import get_dataset, seed_everything
    from .fast.pack import Pack, PackRun, SharedTeacher, data_seed, host_optimizer
    from .fast.ranks import Ranks
    from .fast.trainer import make_source
    from .provenance import learned_from

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = all(cfg.EXPERIMENT.SEED < 0 for cfg in cfgs)
    ranks = Ranks()
    train_loader, val_loader, num_data, num_classes = get_dataset(cfgs[0])
    teacher_cfg = next((cfg for cfg in cfgs if cfg.DISTILLER.TYPE != "NONE"), None)
    teacher = None if teacher_cfg is None else build_teacher(teacher_cfg, num_classes)
    distillers = []
    for cfg in cfgs:  # on the CPU, with the plain teacher, as the host builds them (connectors probe shapes)
        if cfg.EXPERIMENT.SEED >= 0:
            seed_everything(cfg.EXPERIMENT.SEED)
        student = build_student(cfg, num_classes)
        if teacher is not None and cfg.DISTILLER.TYPE != "NONE":
            # normkd-train's path for the host's trainers initialises the teacher here, between student and
            # distiller: draw as much from the global RNG, so a distiller's own modules (connectors) start alike.
            _teacher_architecture(cfg, num_classes)
        if cfg.SOLVER.SYNC_BN and ranks.world > 1:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        distillers.append(build_distiller(cfg, student, teacher if cfg.DISTILLER.TYPE != "NONE" else None, num_data))
    if ranks.main:  # what each run learns from, recorded and checked by rank 0 (a shared file is hashed once)
        for cfg, folder in zip(cfgs, folders):
            folder.provenance = learned_from(cfg, train_loader.dataset, val_loader.dataset)
    if teacher is not None:
        teacher.requires_grad_(False)  # frozen: it is never trained, and the gradient all-reduce skips it
    shared = None if teacher is None else SharedTeacher(teacher).to(device)
    source = make_source(train_loader, val_loader, cfgs[0], device, ranks)  # may refuse the data: before any writer
    runs = []
    for cfg, name, folder, distiller in zip(cfgs, names, folders, distillers):
        if cfg.DISTILLER.TYPE != "NONE":
            distiller.teacher = shared
        distiller.to(device)
        writer = SummaryWriter(os.path.join(folder.path, "train.events"), flush_secs=60) if ranks.main else None
        runs.append(PackRun(name, cfg, folder, distiller, host_optimizer(cfg, distiller), data_seed(cfg), writer))
    return Pack(runs, source, shared)
