"""NormKD and NormDKD as mdistiller distillers (the host glue around :mod:`normkd_plugin.losses`).

Each class names the config node it reads (``CFG_NODE``) and carries that node's defaults
(:meth:`cfg_defaults`); :func:`normkd_plugin.register` adds both to the host. The ``*Release``
aliases read the node layout of the authors' release (``NormKD``, ``NormKD_W_DKD``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mdistiller.distillers._base import Distiller
from torch import Tensor, nn
from yacs.config import CfgNode as CN

from .losses import normdkd_loss, normkd_loss

__all__ = ["NormKD", "NormDKD", "NormKDRelease", "NormDKDRelease"]


def _fused_choice(cfg: CN) -> bool | None:
    """None (choose by device) unless DISTILLER.FUSED_LOSS is False, which forces the reference."""
    return None if cfg.DISTILLER.get("FUSED_LOSS", True) else False


class NormKD(Distiller):
    """NormKD: CE_WEIGHT * CE(z_s, y) + KD_WEIGHT * normkd_loss(z_s, z_t, TEMPERATURE_NORM)."""

    CFG_NODE = "NORMKD"

    @classmethod
    def cfg_defaults(cls) -> CN:
        """The yacs node ``CFG.<CFG_NODE>`` with its defaults (CIFAR-100 values)."""
        node = CN()
        node.TEMPERATURE_NORM = 2.0
        node.LOSS = CN()
        node.LOSS.CE_WEIGHT = 0.1
        node.LOSS.KD_WEIGHT = 0.9
        return CN({cls.CFG_NODE: node})

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: CN):
        super().__init__(student, teacher)
        node = cfg[self.CFG_NODE]
        self.fused = _fused_choice(cfg)
        self.t_norm = float(node.TEMPERATURE_NORM)
        self.ce_loss_weight = float(node.LOSS.CE_WEIGHT)
        self.kd_loss_weight = float(node.LOSS.KD_WEIGHT)

    def forward_train(self, image: Tensor, target: Tensor, **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns (student logits, {"loss_ce", "loss_kd"}), the host's contract."""
        logits_student, _ = self.student(image)
        with torch.no_grad():
            logits_teacher, _ = self.teacher(image)
        loss_ce = self.ce_loss_weight * F.cross_entropy(logits_student, target)
        loss_kd = self.kd_loss_weight * normkd_loss(logits_student, logits_teacher, self.t_norm, fused=self.fused)
        return logits_student, {"loss_ce": loss_ce, "loss_kd": loss_kd}


class NormDKD(Distiller):
    """NormDKD: CE_WEIGHT * CE + min(epoch / WARMUP, 1) * normdkd_loss(ALPHA, BETA, TEMPERATURE_NORM)."""

    CFG_NODE = "NORMDKD"

    @classmethod
    def cfg_defaults(cls) -> CN:
        """The yacs node ``CFG.<CFG_NODE>`` with its defaults (CIFAR-100 resnet32x4 values)."""
        node = CN()
        node.TEMPERATURE_NORM = 2.0
        node.CE_WEIGHT = 1.0
        node.ALPHA = 1.0
        node.BETA = 8.0
        node.WARMUP = 20
        return CN({cls.CFG_NODE: node})

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: CN):
        super().__init__(student, teacher)
        node = cfg[self.CFG_NODE]
        self.fused = _fused_choice(cfg)
        self.t_norm = float(node.TEMPERATURE_NORM)
        self.ce_loss_weight = float(node.CE_WEIGHT)
        self.alpha = float(node.ALPHA)
        self.beta = float(node.BETA)
        self.warmup = float(node.WARMUP)
        if self.warmup <= 0:
            raise ValueError(f"{self.CFG_NODE}.WARMUP must be > 0 (epochs), got {node.WARMUP}")

    def forward_train(self, image: Tensor, target: Tensor, **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns (student logits, {"loss_ce", "loss_kd"}); needs the trainer's ``epoch=``."""
        if "epoch" not in kwargs:
            raise TypeError(f"{type(self).__name__}.forward_train needs epoch= for the warm-up")
        logits_student, _ = self.student(image)
        with torch.no_grad():
            logits_teacher, _ = self.teacher(image)
        loss_ce = self.ce_loss_weight * F.cross_entropy(logits_student, target)
        ramp = min(kwargs["epoch"] / self.warmup, 1.0)
        loss_kd = ramp * normdkd_loss(
            logits_student, logits_teacher, target, self.alpha, self.beta, self.t_norm, fused=self.fused
        )
        return logits_student, {"loss_ce": loss_ce, "loss_kd": loss_kd}


class NormKDRelease(NormKD):
    """NormKD reading the authors' release node ``CFG.NormKD`` (same layout as ``NORMKD``)."""

    CFG_NODE = "NormKD"


class NormDKDRelease(NormDKD):
    """NormDKD reading the authors' release node ``CFG.NormKD_W_DKD`` (plus its empty ``LOSS``)."""

    CFG_NODE = "NormKD_W_DKD"

    @classmethod
    def cfg_defaults(cls) -> CN:
        """As :meth:`NormDKD.cfg_defaults`, with the release's empty ``LOSS`` node."""
        cfg = super().cfg_defaults()
        cfg[cls.CFG_NODE].LOSS = CN()
        return cfg
