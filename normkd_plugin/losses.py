"""NormKD and NormDKD losses (arXiv:2308.00520), and logit standardization (LSKD, Sun et al.,
CVPR 2024) for comparison, independent of any host framework.

NormKD: every logit vector is softened with its own temperature ``T_n = T_norm * std(z_n)`` (unbiased
std over the C classes). The teacher's ``T_n**2`` weights each sample's KL divergence before
the batch mean. The student's std is part of the graph: gradients flow through it.

Guards that leave ordinary logits untouched (relative change far below 1e-6):

* the std is floored at ``SIGMA_FLOOR`` so constant logits (std 0) soften to the uniform
  distribution instead of dividing by zero, with a zero gradient through the floor;
* logits are shifted by their row maximum before the division (softmax ignores shifts), so
  logits of magnitude 1e4 stay finite;
* float16/bfloat16 logits are computed in float32 and the loss is returned in float32
  (float64 inputs stay float64);
* every log-probability comes from ``log_softmax``/``logsumexp``, never ``log(p)``, so a
  probability of exactly 0 or 1 gives no ``inf``.

LSKD z-scores every logit vector, ``(z - mean z) / (LS_EPSILON + std z)`` (unbiased std, the
student's not detached), then softens both with one base temperature ``tau`` and weights every
sample's KL by the constant ``tau**2`` (its release's ``kd_loss``/``dkd_loss`` with
``logit_stand``). Since softmax ignores a shift, its softened distributions are NormKD's at
``T_norm = tau`` up to ``LS_EPSILON``; the two differ in the KL weight: NormKD's per-sample
``T_t,n**2`` against LSKD's constant ``tau**2``. A constant row standardizes to zeros (uniform),
with the exact gradient ``(I - 1/C) / LS_EPSILON`` of the formula there (the std contributes none).

On CUDA, :mod:`normkd_plugin._fused` computes the same values in one Triton kernel per call;
:func:`use_fused` says when. ``NORMKD_REFERENCE=1`` forces this module's PyTorch path.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SIGMA_FLOOR",
    "LS_EPSILON",
    "per_sample_temperature",
    "standardize",
    "ls_temperature",
    "normkd_loss",
    "normdkd_loss",
    "normkd_loss_reference",
    "normdkd_loss_reference",
    "ls_kd_loss",
    "ls_dkd_loss",
    "ls_kd_loss_reference",
    "ls_dkd_loss_reference",
    "use_fused",
]

SIGMA_FLOOR = 1e-6
"""Smallest standard deviation used for a temperature; only constant rows reach it."""

LS_EPSILON = 1e-7
"""LSKD's epsilon, added to the std: z-scores are ``(z - mean z) / (LS_EPSILON + std z)``."""

# A masked logit this far below the row maximum has probability exactly 0 in float32/64.
_MASK_OFFSET = 1e9

_REDUCTIONS = ("mean", "sum", "none")


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_logits(logits_student: Tensor, logits_teacher: Tensor) -> None:
    if logits_student.dim() != 2:
        raise ValueError(f"logits_student must be 2-D (N, C), got shape {tuple(logits_student.shape)}")
    if logits_student.shape != logits_teacher.shape:
        raise ValueError(
            f"logits_student {tuple(logits_student.shape)} and logits_teacher "
            f"{tuple(logits_teacher.shape)} must have the same shape"
        )
    if logits_student.shape[1] < 2:
        raise ValueError(f"need at least 2 classes for a standard deviation, got C={logits_student.shape[1]}")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; expected one of {_REDUCTIONS}")


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def per_sample_temperature(logits: Tensor, t_norm: float) -> Tensor:
    """T_n = t_norm * max(std(z_n), SIGMA_FLOOR), unbiased std over dim 1; shape (N, 1)."""
    var = logits.var(dim=1, keepdim=True, unbiased=True)
    # Clamping the variance (not the std) keeps the gradient finite at std = 0.
    return t_norm * var.clamp_min(SIGMA_FLOOR**2).sqrt()


def _std(logits: Tensor) -> Tensor:
    """Unbiased std over dim 1, shape (N, 1); exact values, gradient 0 (not NaN) where the std is 0."""
    var = logits.var(dim=1, keepdim=True, unbiased=True)
    positive = var > 0
    return torch.where(positive, torch.where(positive, var, 1.0).sqrt(), 0.0)


def standardize(logits: Tensor) -> Tensor:
    """LSKD's z-score of each row: (z_n - mean z_n) / (LS_EPSILON + std z_n), unbiased std over dim 1."""
    return (logits - logits.mean(dim=1, keepdim=True)) / (LS_EPSILON + _std(logits))


def ls_temperature(logits: Tensor, temperature: float) -> Tensor:
    """LSKD's effective per-sample temperature tau * (LS_EPSILON + std(z_n)): softmax(standardize(z) / tau) is
    softmax(z / it); shape (N, 1)."""
    return temperature * (LS_EPSILON + _std(logits))


def _scaled(logits: Tensor, temperature: Tensor) -> Tensor:
    """(z - max z) / T: the softmax argument, shifted so it is <= 0 and finite."""
    return (logits - logits.detach().amax(dim=1, keepdim=True)) / temperature


def _prepare(logits_student: Tensor, logits_teacher: Tensor, t_norm: float):
    dtype = _compute_dtype(logits_student, logits_teacher)
    zs = logits_student.to(dtype)
    zt = logits_teacher.detach().to(dtype)
    t_s = per_sample_temperature(zs, t_norm)
    t_t = per_sample_temperature(zt, t_norm)
    return _scaled(zs, t_s), _scaled(zt, t_t), t_t.squeeze(1) ** 2


def _kl_rows(s: Tensor, t: Tensor) -> Tensor:
    """KL(softmax(t) || softmax(s)) of each row, shape (N,)."""
    log_q = F.log_softmax(s, dim=1)
    log_p = F.log_softmax(t, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def _binary_kl(log_p1: Tensor, log_p0: Tensor, log_q1: Tensor, log_q0: Tensor) -> Tensor:
    return log_p1.exp() * (log_p1 - log_q1) + log_p0.exp() * (log_p0 - log_q0)


def _dkd_rows(s: Tensor, t: Tensor, target: Tensor, alpha: float, beta: float) -> Tensor:
    """alpha * TCKD + beta * NCKD of each row of the softmax arguments s (student) and t (teacher), shape (N,)."""
    gt = F.one_hot(target.long(), s.shape[1]).bool()
    lse_s, lse_t = s.logsumexp(dim=1), t.logsumexp(dim=1)
    s_nt = s.masked_fill(gt, -_MASK_OFFSET)
    t_nt = t.masked_fill(gt, -_MASK_OFFSET)
    lse_s_nt, lse_t_nt = s_nt.logsumexp(dim=1), t_nt.logsumexp(dim=1)

    # Binary [target, rest] log-probabilities; log(1 - p_target) = lse(non-target) - lse(all).
    idx = target.long().unsqueeze(1)
    tckd = _binary_kl(
        t.gather(1, idx).squeeze(1) - lse_t,
        lse_t_nt - lse_t,
        s.gather(1, idx).squeeze(1) - lse_s,
        lse_s_nt - lse_s,
    )
    log_q_nt = s_nt - lse_s_nt.unsqueeze(1)
    log_p_nt = t_nt - lse_t_nt.unsqueeze(1)
    nckd = (log_p_nt.exp() * (log_p_nt - log_q_nt)).sum(dim=1)
    return alpha * tckd + beta * nckd


def normkd_loss_reference(
    logits_student: Tensor, logits_teacher: Tensor, t_norm: float, reduction: str = "mean"
) -> Tensor:
    """L = mean_n T_t,n^2 * KL(softmax(z_t,n / T_t,n) || softmax(z_s,n / T_s,n)), in PyTorch."""
    _check_logits(logits_student, logits_teacher)
    _check_reduction(reduction)
    s, t, weight = _prepare(logits_student, logits_teacher, t_norm)
    return _reduce(weight * _kl_rows(s, t), reduction)


def normdkd_loss_reference(
    logits_student: Tensor,
    logits_teacher: Tensor,
    target: Tensor,
    alpha: float,
    beta: float,
    t_norm: float,
    reduction: str = "mean",
) -> Tensor:
    """alpha * TCKD + beta * NCKD with per-sample temperatures, each KL weighted by T_t,n^2."""
    _check_logits(logits_student, logits_teacher)
    _check_reduction(reduction)
    _check_target(target, logits_student)
    s, t, weight = _prepare(logits_student, logits_teacher, t_norm)
    return _reduce(weight * _dkd_rows(s, t, target, alpha, beta), reduction)


def _standardized(logits_student: Tensor, logits_teacher: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    dtype = _compute_dtype(logits_student, logits_teacher)
    zs = logits_student.to(dtype)
    zt = logits_teacher.detach().to(dtype)
    return standardize(zs) / temperature, standardize(zt) / temperature


def ls_kd_loss_reference(
    logits_student: Tensor, logits_teacher: Tensor, temperature: float, reduction: str = "mean"
) -> Tensor:
    """KD on z-scored logits (LSKD): mean_n tau^2 * KL(softmax(zhat_t,n / tau) || softmax(zhat_s,n / tau)), in PyTorch."""
    _check_logits(logits_student, logits_teacher)
    _check_reduction(reduction)
    s, t = _standardized(logits_student, logits_teacher, temperature)
    return _reduce(temperature**2 * _kl_rows(s, t), reduction)


def ls_dkd_loss_reference(
    logits_student: Tensor,
    logits_teacher: Tensor,
    target: Tensor,
    alpha: float,
    beta: float,
    temperature: float,
    reduction: str = "mean",
) -> Tensor:
    """DKD on z-scored logits (LSKD): mean_n tau^2 * (alpha * TCKD_n + beta * NCKD_n) at temperature tau, in PyTorch."""
    _check_logits(logits_student, logits_teacher)
    _check_reduction(reduction)
    _check_target(target, logits_student)
    s, t = _standardized(logits_student, logits_teacher, temperature)
    return _reduce(temperature**2 * _dkd_rows(s, t, target, alpha, beta), reduction)


def _check_target(target: Tensor, logits: Tensor) -> None:
    """Shape and range of the class targets; on CUDA the range check is a device-side assert (no sync)."""
    n, c = logits.shape
    if target.shape != (n,):
        raise ValueError(f"target must have shape ({n},), got {tuple(target.shape)}")
    message = f"target must hold class indices in 0..{c - 1} (no ignore index such as -100)"
    if target.is_cuda:
        torch._assert_async(((target >= 0) & (target < c)).all(), message)
    elif n and (int(target.min()) < 0 or int(target.max()) >= c):
        bad = int(target[(target < 0) | (target >= c)][0])
        raise ValueError(f"{message}; got {bad}")


def use_fused(logits_student: Tensor) -> bool:
    """True where the fused Triton path applies: CUDA logits and NORMKD_REFERENCE unset or 0."""
    if os.environ.get("NORMKD_REFERENCE", "0") not in ("", "0"):
        return False
    if not logits_student.is_cuda:
        return False
    from . import _fused

    return _fused.available()


def _dispatch(
    name: str,
    reference,
    logits_student: Tensor,
    logits_teacher: Tensor,
    args: tuple,
    reduction: str,
    fused: bool | None,
) -> Tensor:
    """``_fused.<name>_fused(z_s, z_t, *args, reduction)`` where the fused path applies or is forced (checked
    here, before a kernel launch), else ``reference(z_s, z_t, *args, reduction)``."""
    if fused is None:
        fused = use_fused(logits_student)
    if not fused:
        return reference(logits_student, logits_teacher, *args, reduction)
    from . import _fused

    _check_fused_device(logits_student)
    _check_logits(logits_student, logits_teacher)
    _check_reduction(reduction)
    return getattr(_fused, f"{name}_fused")(logits_student, logits_teacher, *args, reduction)


def _check_fused_device(logits: Tensor) -> None:
    if not logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"fused=True needs CUDA logits (got device {logits.device}); use fused=None or False")


def normkd_loss(
    logits_student: Tensor,
    logits_teacher: Tensor,
    t_norm: float,
    reduction: str = "mean",
    fused: bool | None = None,
) -> Tensor:
    """NormKD: mean_n T_t,n^2 * KL(p_t,n || p_s,n), T_x,n = t_norm * std(z_x,n).

    Args:
        logits_student: (N, C) student logits; gradients flow through its std too.
        logits_teacher: (N, C) teacher logits; treated as constants.
        t_norm: the normalisation temperature T_norm (2.0 on CIFAR-100).
        reduction: "mean" (the paper's), "sum" or "none" (per-sample, shape (N,)).
        fused: force (True) or refuse (False) the fused CUDA kernel; None chooses.
    """
    return _dispatch("normkd_loss", normkd_loss_reference, logits_student, logits_teacher, (t_norm,), reduction, fused)


def normdkd_loss(
    logits_student: Tensor,
    logits_teacher: Tensor,
    target: Tensor,
    alpha: float,
    beta: float,
    t_norm: float,
    reduction: str = "mean",
    fused: bool | None = None,
) -> Tensor:
    """NormDKD: mean_n T_t,n^2 * (alpha * TCKD_n + beta * NCKD_n) with per-sample temperatures.

    TCKD is the KL of the binary [target, non-target] distributions, NCKD the KL of the
    distributions over the non-target classes (target masked out); both softened with
    T_x,n = t_norm * std(z_x,n). Arguments as :func:`normkd_loss`, plus the class ``target``
    (N,) and the weights ``alpha`` and ``beta``.
    """
    return _dispatch(
        "normdkd_loss",
        normdkd_loss_reference,
        logits_student,
        logits_teacher,
        (
            target,
            alpha,
            beta,
            t_norm,
        ),
        reduction,
        fused,
    )


def ls_kd_loss(
    logits_student: Tensor,
    logits_teacher: Tensor,
    temperature: float,
    reduction: str = "mean",
    fused: bool | None = None,
) -> Tensor:
    """KD with logit standardization (LSKD): mean_n tau^2 * KL(softmax(zhat_t,n / tau) || softmax(zhat_s,n / tau)).

    ``zhat = (z - mean z) / (LS_EPSILON + std z)`` per row (:func:`standardize`); the student's std
    is part of the graph. Arguments as :func:`normkd_loss`, with the base temperature
    ``temperature`` (tau) in place of T_norm. The KD weight (LSKD's ``--kd-weight``) is the caller's.
    """
    return _dispatch(
        "ls_kd_loss", ls_kd_loss_reference, logits_student, logits_teacher, (temperature,), reduction, fused
    )


def ls_dkd_loss(
    logits_student: Tensor,
    logits_teacher: Tensor,
    target: Tensor,
    alpha: float,
    beta: float,
    temperature: float,
    reduction: str = "mean",
    fused: bool | None = None,
) -> Tensor:
    """DKD with logit standardization (LSKD): mean_n tau^2 * (alpha * TCKD_n + beta * NCKD_n) on z-scored logits.

    The host's DKD (binary target/rest KL and non-target KL) at temperature ``temperature`` on
    :func:`standardize`-d logits. Arguments as :func:`normdkd_loss`; LSKD multiplies ``alpha`` and
    ``beta`` by its KD weight before they get here.
    """
    return _dispatch(
        "ls_dkd_loss",
        ls_dkd_loss_reference,
        logits_student,
        logits_teacher,
        (
            target,
            alpha,
            beta,
            temperature,
        ),
        reduction,
        fused,
    )
