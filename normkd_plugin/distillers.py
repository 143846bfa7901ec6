"""NormKD, NormDKD and LSKD's KD+LS, DKD+LS as mdistiller distillers (the host glue around :mod:`normkd_plugin.losses`).

Each class names the config node it reads (``CFG_NODE``) and carries that node's defaults
(:meth:`cfg_defaults`); :func:`normkd_plugin.register` adds them to the host. The ``*Release``
aliases read the node layout of the NormKD authors' release (``NormKD``, ``NormKD_W_DKD``).

Each distiller also sums, on the device, the teacher's and the student's per-sample temperatures
of every training batch (:class:`EpochTemperatures`, its ``epoch_scalars``): the ``fast`` and
``ddp`` trainers reset the sums when an epoch starts and write their mean and spread to
tensorboard when it ends. Under mdistiller's own trainers nothing reads them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mdistiller.distillers._base import Distiller
from torch import Tensor, nn
from yacs.config import CfgNode as CN

from .losses import ls_dkd_loss, ls_kd_loss, ls_temperature, normdkd_loss, normkd_loss, per_sample_temperature

__all__ = ["NormKD", "NormDKD", "NormKDRelease", "NormDKDRelease", "KDLS", "DKDLS", "EpochTemperatures"]


def _fused_choice(cfg: CN) -> bool | None:
    """None (choose by device) unless DISTILLER.FUSED_LOSS is False, which forces the reference."""
    return None if cfg.DISTILLER.get("FUSED_LOSS", True) else False


class EpochTemperatures:
    """The teacher's and the student's per-sample temperatures over an epoch, summed on the device.

    ``sums`` (float64) holds [n, sum T_t, sum T_t^2, sum T_s, sum T_s^2]. :meth:`add` queues device
    operations only (no host sync: it runs inside a captured CUDA-graph step); :meth:`scalars`
    reads the sums once, at the epoch's end.
    """

    KEYS = (
        "temperature/teacher_mean",
        "temperature/teacher_std",
        "temperature/student_mean",
        "temperature/student_std",
    )

    def __init__(self) -> None:
        self.sums: Tensor | None = None

    def reset(self, device: torch.device | str) -> None:
        """Zero the sums on ``device``: in place when they are there already (a captured graph adds to that tensor)."""
        if self.sums is not None and self.sums.device == torch.empty(0, device=device).device:  # "cuda" is "cuda:N"
            self.sums.zero_()
        else:
            self.sums = torch.zeros(5, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, t_teacher: Tensor, t_student: Tensor) -> None:
        """Add one batch's temperatures, shape (N,) or (N, 1) each; skipped on another device (a DataParallel replica)."""
        if self.sums is None:
            self.reset(t_teacher.device)
        if self.sums.device != t_teacher.device:
            return
        rows = torch.stack([t_teacher.reshape(-1), t_student.reshape(-1)]).double()  # (2, N)
        count = torch.full((1,), rows.shape[1], dtype=torch.float64, device=rows.device)  # a fill: capturable
        moments = torch.stack([rows.sum(dim=1), (rows * rows).sum(dim=1)], dim=1).reshape(-1)  # Σt, Σt², Σs, Σs²
        self.sums += torch.cat([count, moments])

    def scalars(self) -> dict[str, float]:
        """{"temperature/teacher_mean": ..., ..._std, "temperature/student_mean", ..._std} over the samples added
        since the reset (std: the population std); {} when none were."""
        if self.sums is None:
            return {}
        n, st, st2, ss, ss2 = self.sums.tolist()
        if n <= 0:
            return {}
        out = []
        for total, squares in ((st, st2), (ss, ss2)):
            mean = total / n
            out += [mean, max(squares / n - mean * mean, 0.0) ** 0.5]
        return dict(zip(self.KEYS, out))


class _Temperatures(Distiller):
    """CE_WEIGHT * CE(z_s, y) + min(epoch / WARMUP, 1) * kd_loss(z_s, z_t, y) (no ramp where ``warmup`` is None),
    recording the per-sample temperatures (``sample_temperatures(logits)``) in ``epoch_scalars``."""

    warmup: float | None = None  # epochs of DKD's linear warm-up of the KD term

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__(student, teacher)
        self.epoch_scalars = EpochTemperatures()

    def sample_temperatures(self, logits: Tensor) -> Tensor:
        """The per-sample temperature this distiller softens ``logits`` with, shape (N, 1)."""
        raise NotImplementedError

    def kd_loss(self, logits_student: Tensor, logits_teacher: Tensor, target: Tensor) -> Tensor:
        """The distillation term before the warm-up ramp."""
        raise NotImplementedError

    def forward_train(self, image: Tensor, target: Tensor, **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns (student logits, {"loss_ce", "loss_kd"}), the host's contract; a warm-up needs the trainer's ``epoch=``."""
        if self.warmup is not None and "epoch" not in kwargs:
            raise TypeError(f"{type(self).__name__}.forward_train needs epoch= for the warm-up")
        logits_student, _ = self.student(image)
        with torch.no_grad():
            logits_teacher, _ = self.teacher(image)
        self._record(logits_student, logits_teacher)
        loss_ce = self.ce_loss_weight * F.cross_entropy(logits_student, target)
        loss_kd = self.kd_loss(logits_student, logits_teacher, target)
        if self.warmup is not None:
            loss_kd = min(kwargs["epoch"] / self.warmup, 1.0) * loss_kd
        return logits_student, {"loss_ce": loss_ce, "loss_kd": loss_kd}

    def _record(self, logits_student: Tensor, logits_teacher: Tensor) -> None:
        with torch.no_grad():
            t_t = self.sample_temperatures(logits_teacher.detach().float())
            t_s = self.sample_temperatures(logits_student.detach().float())
        self.epoch_scalars.add(t_t, t_s)


class NormKD(_Temperatures):
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

    def sample_temperatures(self, logits: Tensor) -> Tensor:
        """T_n = TEMPERATURE_NORM * std(z_n) (floored), shape (N, 1)."""
        return per_sample_temperature(logits, self.t_norm)

    def kd_loss(self, logits_student: Tensor, logits_teacher: Tensor, target: Tensor) -> Tensor:
        """KD_WEIGHT * normkd_loss(z_s, z_t, TEMPERATURE_NORM)."""
        return self.kd_loss_weight * normkd_loss(logits_student, logits_teacher, self.t_norm, fused=self.fused)


class NormDKD(_Temperatures):
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

    def sample_temperatures(self, logits: Tensor) -> Tensor:
        """T_n = TEMPERATURE_NORM * std(z_n) (floored), shape (N, 1)."""
        return per_sample_temperature(logits, self.t_norm)

    def kd_loss(self, logits_student: Tensor, logits_teacher: Tensor, target: Tensor) -> Tensor:
        """normdkd_loss(z_s, z_t, y, ALPHA, BETA, TEMPERATURE_NORM)."""
        return normdkd_loss(
            logits_student, logits_teacher, target, self.alpha, self.beta, self.t_norm, fused=self.fused
        )


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


class KDLS(_Temperatures):
    """KD with logit standardization (LSKD, CVPR 2024): CE_WEIGHT * CE + KD_WEIGHT * ls_kd_loss(TEMPERATURE).

    LSKD's release runs it as ``tools/train.py --logit-stand --base-temp TEMPERATURE --kd-weight KD_WEIGHT``
    on the host's KD: the KL on z-scored logits at the base temperature, times TEMPERATURE**2.
    """

    CFG_NODE = "KD_LS"

    @classmethod
    def cfg_defaults(cls) -> CN:
        """The yacs node ``CFG.KD_LS`` with LSKD's defaults (its README: base temperature 2, KD weight 9)."""
        node = CN()
        node.TEMPERATURE = 2.0
        node.LOSS = CN()
        node.LOSS.CE_WEIGHT = 0.1
        node.LOSS.KD_WEIGHT = 9.0
        return CN({cls.CFG_NODE: node})

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: CN):
        super().__init__(student, teacher)
        node = cfg[self.CFG_NODE]
        self.fused = _fused_choice(cfg)
        self.temperature = float(node.TEMPERATURE)
        self.ce_loss_weight = float(node.LOSS.CE_WEIGHT)
        self.kd_loss_weight = float(node.LOSS.KD_WEIGHT)

    def sample_temperatures(self, logits: Tensor) -> Tensor:
        """tau * (eps + std(z_n)): the divisor of z_n inside softmax(standardize(z_n) / tau), shape (N, 1)."""
        return ls_temperature(logits, self.temperature)

    def kd_loss(self, logits_student: Tensor, logits_teacher: Tensor, target: Tensor) -> Tensor:
        """KD_WEIGHT * ls_kd_loss(z_s, z_t, TEMPERATURE)."""
        return self.kd_loss_weight * ls_kd_loss(logits_student, logits_teacher, self.temperature, fused=self.fused)


class DKDLS(_Temperatures):
    """DKD with logit standardization (LSKD): CE_WEIGHT * CE + min(epoch / WARMUP, 1) * ls_dkd_loss(
    ALPHA * KD_WEIGHT, BETA * KD_WEIGHT, T).

    LSKD's release runs it as ``tools/train.py --logit-stand --base-temp T --kd-weight KD_WEIGHT`` on the
    host's DKD, which multiplies the DKD config's ALPHA and BETA by the KD weight and sets DKD.T to the
    base temperature; ALPHA and BETA here are the values before that multiplication.
    """

    CFG_NODE = "DKD_LS"

    @classmethod
    def cfg_defaults(cls) -> CN:
        """The yacs node ``CFG.DKD_LS``: the host's DKD defaults with LSKD's base temperature 2 and KD weight 9."""
        node = CN()
        node.CE_WEIGHT = 1.0
        node.ALPHA = 1.0
        node.BETA = 8.0
        node.T = 2.0
        node.WARMUP = 20
        node.KD_WEIGHT = 9.0
        return CN({cls.CFG_NODE: node})

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: CN):
        super().__init__(student, teacher)
        node = cfg[self.CFG_NODE]
        self.fused = _fused_choice(cfg)
        self.temperature = float(node.T)
        self.ce_loss_weight = float(node.CE_WEIGHT)
        self.alpha = float(node.ALPHA) * float(node.KD_WEIGHT)
        self.beta = float(node.BETA) * float(node.KD_WEIGHT)
        self.warmup = float(node.WARMUP)
        if self.warmup <= 0:
            raise ValueError(f"{self.CFG_NODE}.WARMUP must be > 0 (epochs), got {node.WARMUP}")

    def sample_temperatures(self, logits: Tensor) -> Tensor:
        """tau * (eps + std(z_n)): the divisor of z_n inside softmax(standardize(z_n) / tau), shape (N, 1)."""
        return ls_temperature(logits, self.temperature)

    def kd_loss(self, logits_student: Tensor, logits_teacher: Tensor, target: Tensor) -> Tensor:
        """ls_dkd_loss(z_s, z_t, y, ALPHA * KD_WEIGHT, BETA * KD_WEIGHT, T)."""
        return ls_dkd_loss(
            logits_student, logits_teacher, target, self.alpha, self.beta, self.temperature, fused=self.fused
        )
