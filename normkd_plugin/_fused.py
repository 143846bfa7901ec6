"""Fused NormKD / NormDKD and LSKD's KD / DKD: one Triton program per row computes std, softmaxes, KL and gradient.

The forward kernel writes each row's loss and its gradient with respect to the student logits;
backward is a single scale of that stored gradient. At the benchmark's sizes the reference path
is launch-bound (dozens of small kernels forward and backward); this is one kernel forward and
one multiply backward. Values match :mod:`normkd_plugin.losses` to float32 rounding.

Gradient used (s = (z - max z) / T_s, T_s = t_norm * sigma_s, g = dL/ds per row)::

    dL/dz_j = g_j / T_s - (sum_i g_i s_i) * (z_j - mean z) / ((C - 1) * sigma_s^2)

KD:   g = w (q - p).   DKD:  g_i = w [alpha (q_g - p_g)(d_ig - (1 - d_ig) q^_i)
                                     + beta (1 - d_ig)(q^_i - p^_i)]
with w = T_t^2, q/p the student/teacher softmaxes and q^/p^ the non-target ones. The sigma term
vanishes where the std is floored (constant rows), as in the reference's clamp.

Logit standardization (``STANDARDIZE``) is the same row with T_x = tau * (sigma_x + eps) (LSKD's
z-score divided by tau; softmax ignores the mean it subtracts) and the constant w = tau^2; its
sigma term is ``(sum_i g_i s_i) * (z_j - mean z) / ((C - 1) * sigma_s * (sigma_s + eps))``, 0 where
sigma_s = 0. Same loads, reductions and stores as NormKD: the same cost.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .losses import LS_EPSILON, SIGMA_FLOOR, _check_target

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

MAX_CLASSES = 16384
"""Rows longer than this fall back to the reference path (one row must fit one program)."""


def available() -> bool:
    """True when Triton is importable and a CUDA device is present."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _row_kernel(
        zs_ptr,
        zt_ptr,
        target_ptr,
        loss_ptr,
        grad_ptr,
        C,
        stride_s,
        stride_t,
        t_norm,
        alpha,
        beta,
        sigma_floor,
        eps,
        row_scale,
        DKD: tl.constexpr,
        STANDARDIZE: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        valid = cols < C
        zs = tl.load(zs_ptr + row * stride_s + cols, mask=valid, other=0.0).to(tl.float32)
        zt = tl.load(zt_ptr + row * stride_t + cols, mask=valid, other=0.0).to(tl.float32)

        # Unbiased std of each row (two-pass): floored (NormKD) or plus eps (LSKD), like the reference.
        ds = tl.where(valid, zs - tl.sum(zs, axis=0) / C, 0.0)
        dt = tl.where(valid, zt - tl.sum(zt, axis=0) / C, 0.0)
        var_s = tl.sum(ds * ds, axis=0) / (C - 1)
        var_t = tl.sum(dt * dt, axis=0) / (C - 1)
        if STANDARDIZE:
            floor2 = 0.0
            sig_s = tl.sqrt(var_s)
            temp_s = t_norm * (sig_s + eps)
            temp_t = t_norm * (tl.sqrt(var_t) + eps)
            w = t_norm * t_norm
            sigma_term = (C - 1) * sig_s * (sig_s + eps)  # (C - 1) sigma_s T_s / tau
        else:
            floor2 = sigma_floor * sigma_floor
            sig_s = tl.sqrt(tl.maximum(var_s, floor2))
            temp_s = t_norm * sig_s
            temp_t = t_norm * tl.sqrt(tl.maximum(var_t, floor2))
            w = temp_t * temp_t
            sigma_term = (C - 1) * var_s  # (C - 1) sigma_s T_s / t_norm

        neg_inf = float("-inf")
        s = tl.where(valid, (zs - tl.max(tl.where(valid, zs, neg_inf), axis=0)) / temp_s, neg_inf)
        t = tl.where(valid, (zt - tl.max(tl.where(valid, zt, neg_inf), axis=0)) / temp_t, neg_inf)
        lse_s = tl.log(tl.sum(tl.exp(s), axis=0))
        lse_t = tl.log(tl.sum(tl.exp(t), axis=0))
        q = tl.exp(s - lse_s)

        if DKD:
            tgt = tl.load(target_ptr + row).to(tl.int32)
            is_gt = cols == tgt
            other = valid & (cols != tgt)
            s_nt = tl.where(other, s, neg_inf)
            t_nt = tl.where(other, t, neg_inf)
            lse_s_nt = tl.log(tl.sum(tl.exp(s_nt), axis=0))
            lse_t_nt = tl.log(tl.sum(tl.exp(t_nt), axis=0))
            lq_g = tl.sum(tl.where(is_gt, s, 0.0), axis=0) - lse_s
            lp_g = tl.sum(tl.where(is_gt, t, 0.0), axis=0) - lse_t
            lq_r = lse_s_nt - lse_s
            lp_r = lse_t_nt - lse_t
            tckd = tl.exp(lp_g) * (lp_g - lq_g) + tl.exp(lp_r) * (lp_r - lq_r)
            lq_hat = s_nt - lse_s_nt
            lp_hat = t_nt - lse_t_nt
            q_hat = tl.where(other, tl.exp(lq_hat), 0.0)
            p_hat = tl.where(other, tl.exp(lp_hat), 0.0)
            nckd = tl.sum(tl.where(other, p_hat * (lp_hat - lq_hat), 0.0), axis=0)
            loss = w * (alpha * tckd + beta * nckd)
            d_tc = tl.exp(lq_g) - tl.exp(lp_g)
            g = w * (alpha * d_tc * tl.where(is_gt, 1.0, -q_hat) + beta * (q_hat - p_hat))
        else:
            log_q = s - lse_s
            log_p = t - lse_t
            p = tl.exp(log_p)
            loss = w * tl.sum(tl.where(valid, p * (log_p - log_q), 0.0), axis=0)
            g = w * (q - p)

        g = tl.where(valid, g, 0.0)
        gs = tl.sum(tl.where(valid, g * s, 0.0), axis=0)
        coef = tl.where(var_s > floor2, gs / sigma_term, 0.0)
        grad = g / temp_s - coef * ds
        # row_scale is 1/N for reduction="mean" so backward needs no extra division.
        tl.store(loss_ptr + row, loss * row_scale)
        tl.store(grad_ptr + row * C + cols, grad * row_scale, mask=valid)


def _launch(
    zs: Tensor,
    zt: Tensor,
    target: Tensor | None,
    alpha: float,
    beta: float,
    t_norm: float,
    row_scale: float,
    standardize: bool,
):
    n, c = zs.shape
    zs = zs.contiguous() if zs.stride(1) != 1 else zs
    zt = zt.contiguous() if zt.stride(1) != 1 else zt
    loss = torch.empty(n, device=zs.device, dtype=torch.float32)
    grad = torch.empty(n, c, device=zs.device, dtype=torch.float32)
    block = max(triton.next_power_of_2(c), 16)
    dkd = target is not None
    _row_kernel[(n,)](
        zs,
        zt,
        target if dkd else loss,  # unused pointer when not DKD
        loss,
        grad,
        c,
        zs.stride(0),
        zt.stride(0),
        float(t_norm),
        float(alpha),
        float(beta),
        SIGMA_FLOOR,
        LS_EPSILON,
        float(row_scale),
        DKD=dkd,
        STANDARDIZE=standardize,
        BLOCK_C=block,
        num_warps=4 if block <= 2048 else 8,
    )
    return loss, grad


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zs, zt, target, alpha, beta, t_norm, reduction, standardize):
        row_scale = 1.0 / zs.shape[0] if reduction == "mean" else 1.0
        loss, grad = _launch(zs, zt.detach(), target, alpha, beta, t_norm, row_scale, standardize)
        ctx.save_for_backward(grad)
        ctx.per_row = reduction == "none"
        ctx.in_dtype = zs.dtype
        return loss if ctx.per_row else loss.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        grad = grad * (grad_out.unsqueeze(1) if ctx.per_row else grad_out)
        return grad.to(ctx.in_dtype), None, None, None, None, None, None, None


def _fits(zs: Tensor) -> bool:
    return zs.shape[1] <= MAX_CLASSES and zs.dtype != torch.float64


def normkd_loss_fused(zs: Tensor, zt: Tensor, t_norm: float, reduction: str = "mean") -> Tensor:
    """Fused :func:`normkd_loss` (same contract); float64 or very wide rows use the reference."""
    if not _fits(zs):
        from .losses import normkd_loss_reference

        return normkd_loss_reference(zs, zt, t_norm, reduction)
    return _FusedLoss.apply(zs, zt, None, 1.0, 1.0, t_norm, reduction, False)


def normdkd_loss_fused(
    zs: Tensor, zt: Tensor, target: Tensor, alpha: float, beta: float, t_norm: float, reduction: str = "mean"
) -> Tensor:
    """Fused :func:`normdkd_loss` (same contract); float64 or very wide rows use the reference."""
    if not _fits(zs):
        from .losses import normdkd_loss_reference

        return normdkd_loss_reference(zs, zt, target, alpha, beta, t_norm, reduction)
    _check_target(target, zs)  # before the launch: the kernel would read any index without complaint
    return _FusedLoss.apply(zs, zt, target.contiguous(), alpha, beta, t_norm, reduction, False)


def ls_kd_loss_fused(zs: Tensor, zt: Tensor, temperature: float, reduction: str = "mean") -> Tensor:
    """Fused :func:`~normkd_plugin.losses.ls_kd_loss` (same contract); float64 or very wide rows use the reference."""
    if not _fits(zs):
        from .losses import ls_kd_loss_reference

        return ls_kd_loss_reference(zs, zt, temperature, reduction)
    return _FusedLoss.apply(zs, zt, None, 1.0, 1.0, temperature, reduction, True)


def ls_dkd_loss_fused(
    zs: Tensor, zt: Tensor, target: Tensor, alpha: float, beta: float, temperature: float, reduction: str = "mean"
) -> Tensor:
    """Fused :func:`~normkd_plugin.losses.ls_dkd_loss` (same contract); float64 or very wide rows use the reference."""
    if not _fits(zs):
        from .losses import ls_dkd_loss_reference

        return ls_dkd_loss_reference(zs, zt, target, alpha, beta, temperature, reduction)
    _check_target(target, zs)
    return _FusedLoss.apply(zs, zt, target.contiguous(), alpha, beta, temperature, reduction, True)
