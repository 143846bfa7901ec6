"""Build the student, teacher and distiller of a run config with the host's own pieces."""

from __future__ import annotations

import inspect

from torch import nn

from .checkpoints import load_teacher

__all__ = ["build_models", "build_distiller"]


def build_models(cfg, num_classes: int) -> tuple[nn.Module, nn.Module | None]:
    """(student, teacher or None) from mdistiller's model dictionaries; the teacher's weights loaded."""
    from mdistiller.models import cifar_model_dict, imagenet_model_dict

    if cfg.DATASET.TYPE == "imagenet":
        student = imagenet_model_dict[cfg.DISTILLER.STUDENT](pretrained=False)
        if cfg.DISTILLER.TYPE == "NONE":
            return student, None
        teacher = imagenet_model_dict[cfg.DISTILLER.TEACHER](pretrained=not cfg.DISTILLER.TEACHER_CKPT)
        if cfg.DISTILLER.TEACHER_CKPT:
            load_teacher(cfg, teacher, None)
        return student, teacher
    student = cifar_model_dict[cfg.DISTILLER.STUDENT][0](num_classes=num_classes)
    if cfg.DISTILLER.TYPE == "NONE":
        return student, None
    net, host_path = cifar_model_dict[cfg.DISTILLER.TEACHER]
    teacher = net(num_classes=num_classes)
    load_teacher(cfg, teacher, host_path)
    return student, teacher


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
