"""normkd_plugin.losses against independent float64 formulas, gradcheck, invariances, edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from normkd_plugin.losses import (
    normdkd_loss,
    normdkd_loss_reference,
    normkd_loss,
    normkd_loss_reference,
    per_sample_temperature,
)

pytestmark = pytest.mark.quick


def ref_normkd(zs, zt, t_norm):
    """Direct formula, float64, row by row: (1/N) sum_n T_t^2 KL(p_t || p_s)."""
    total = 0.0
    for s, t in zip(zs.double(), zt.double()):
        ts, tt = t_norm * s.std(), t_norm * t.std()
        p = torch.exp(t / tt) / torch.exp(t / tt).sum()
        q = torch.exp(s / ts) / torch.exp(s / ts).sum()
        total += tt**2 * (p * torch.log(p / q)).sum()
    return total / zs.shape[0]


def ref_normdkd(zs, zt, y, alpha, beta, t_norm):
    """Direct DKD formula with per-sample temperatures, float64, row by row."""
    total = 0.0
    for s, t, g in zip(zs.double(), zt.double(), y.tolist()):
        ts, tt = t_norm * s.std(), t_norm * t.std()
        p = torch.exp(t / tt) / torch.exp(t / tt).sum()
        q = torch.exp(s / ts) / torch.exp(s / ts).sum()
        bp = torch.stack([p[g], 1 - p[g]])
        bq = torch.stack([q[g], 1 - q[g]])
        tckd = (bp * torch.log(bp / bq)).sum()
        keep = torch.arange(len(s)) != g
        ph, qh = p[keep] / p[keep].sum(), q[keep] / q[keep].sum()
        nckd = (ph * torch.log(ph / qh)).sum()
        total += tt**2 * (alpha * tckd + beta * nckd)
    return total / zs.shape[0]


SHAPES = [(1, 10), (3, 2), (8, 5), (64, 100), (16, 1000)]


@pytest.mark.parametrize("shape", SHAPES)
def test_normkd_matches_direct_formula(shape):
    zs, zt = torch.randn(shape) * 3, torch.randn(shape) * 5 + 1
    got = normkd_loss(zs, zt, 2.0)
    want = ref_normkd(zs, zt, 2.0)
    assert got.dtype == torch.float32
    assert math.isclose(got.item(), want.item(), rel_tol=1e-5, abs_tol=1e-7), f"{got.item()} vs {want.item()}"


@pytest.mark.parametrize("shape", SHAPES)
def test_normdkd_matches_direct_formula(shape):
    zs, zt = torch.randn(shape) * 3, torch.randn(shape) * 5
    y = torch.randint(0, shape[1], (shape[0],))
    got = normdkd_loss(zs, zt, y, 4.0, 5.0, 2.0)
    want = ref_normdkd(zs, zt, y, 4.0, 5.0, 2.0)
    assert math.isclose(got.item(), want.item(), rel_tol=1e-5, abs_tol=1e-7), f"{got.item()} vs {want.item()}"


def test_float64_inputs_stay_float64_and_match_tightly():
    zs, zt = torch.randn(7, 30, dtype=torch.float64), torch.randn(7, 30, dtype=torch.float64)
    y = torch.randint(0, 30, (7,))
    assert normkd_loss(zs, zt, 1.5).dtype == torch.float64
    assert torch.allclose(normkd_loss(zs, zt, 1.5), ref_normkd(zs, zt, 1.5), rtol=1e-12)
    assert torch.allclose(normdkd_loss(zs, zt, y, 2.0, 7.0, 1.5), ref_normdkd(zs, zt, y, 2.0, 7.0, 1.5), rtol=1e-12)


def test_reductions_agree():
    zs, zt = torch.randn(6, 20), torch.randn(6, 20)
    per = normkd_loss(zs, zt, 2.0, reduction="none")
    assert per.shape == (6,)
    assert torch.allclose(per.mean(), normkd_loss(zs, zt, 2.0))
    assert torch.allclose(per.sum(), normkd_loss(zs, zt, 2.0, reduction="sum"))
    with pytest.raises(ValueError, match="reduction='avg'"):
        normkd_loss(zs, zt, 2.0, reduction="avg")


def test_temperature_is_t_norm_times_unbiased_std():
    z = torch.randn(5, 17, dtype=torch.float64)
    want = 2.0 * z.std(dim=1, unbiased=True, keepdim=True)
    assert torch.allclose(per_sample_temperature(z, 2.0), want, rtol=1e-12)


def test_gradcheck_normkd_through_student_std():
    zs = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(4, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: normkd_loss(s, zt, 2.0, reduction="none"), (zs,))


def test_gradcheck_normdkd_through_student_std():
    zs = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(4, 6, dtype=torch.float64)
    y = torch.tensor([0, 5, 2, 2])
    assert torch.autograd.gradcheck(lambda s: normdkd_loss(s, zt, y, 3.0, 6.0, 2.0, reduction="none"), (zs,))


def test_student_std_is_not_detached():
    """The gradient differs from the one with sigma_s held constant (the paper's formulation)."""
    zs = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(4, 10, dtype=torch.float64)
    (g_full,) = torch.autograd.grad(normkd_loss(zs, zt, 2.0), zs)
    ts = per_sample_temperature(zs, 2.0).detach()
    tt = per_sample_temperature(zt, 2.0)
    kl = torch.nn.functional.kl_div(torch.log_softmax(zs / ts, 1), torch.softmax(zt / tt, 1), reduction="none").sum(1)
    (g_detached,) = torch.autograd.grad((tt.squeeze(1) ** 2 * kl).mean(), zs)
    assert not torch.allclose(g_full, g_detached, atol=1e-6)


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_per_sample_shift_invariance(which):
    zs, zt = torch.randn(8, 50), torch.randn(8, 50)
    y = torch.randint(0, 50, (8,))
    shift = torch.randn(8, 1) * 100
    zs2, zt2 = (zs + shift, zt) if which == "student" else (zs, zt + shift)
    assert torch.allclose(normkd_loss(zs, zt, 2.0), normkd_loss(zs2, zt2, 2.0), rtol=1e-5)
    assert torch.allclose(normdkd_loss(zs, zt, y, 1.0, 8.0, 2.0), normdkd_loss(zs2, zt2, y, 1.0, 8.0, 2.0), rtol=1e-5)


def test_teacher_scale_invariance_of_distribution():
    """Scaling the teacher's logits scales T_t but not p_t: the loss scales by the factor squared."""
    zs, zt = torch.randn(8, 50, dtype=torch.float64), torch.randn(8, 50, dtype=torch.float64)
    assert torch.allclose(normkd_loss(zs, 3 * zt, 2.0), 9 * normkd_loss(zs, zt, 2.0), rtol=1e-10)


def _losses_and_grads(zs, zt, y):
    zs = zs.clone().requires_grad_()
    a = normkd_loss(zs, zt, 2.0)
    b = normdkd_loss(zs, zt, y, 1.0, 8.0, 2.0)
    (ga,) = torch.autograd.grad(a, zs)
    (gb,) = torch.autograd.grad(b, zs)
    return [a, b, ga, gb]


def _all_finite(tensors):
    return all(torch.isfinite(t.float()).all() for t in tensors)


def test_constant_logits_give_finite_values_and_gradients():
    zs = torch.full((4, 10), 3.0)
    zt = torch.full((4, 10), -2.0)
    y = torch.tensor([0, 1, 2, 3])
    out = _losses_and_grads(zs, zt, y)
    assert _all_finite(out)
    assert out[0].item() == pytest.approx(0.0, abs=1e-12)  # uniform vs uniform


def test_constant_student_only_is_finite_and_positive():
    zs, zt = torch.zeros(4, 10), torch.randn(4, 10)
    out = _losses_and_grads(zs, zt, torch.zeros(4, dtype=torch.long))
    assert _all_finite(out)
    assert out[0].item() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_float32(dtype):
    zs32, zt32 = torch.randn(16, 100) * 4, torch.randn(16, 100) * 4
    zs, zt = zs32.to(dtype), zt32.to(dtype)
    y = torch.randint(0, 100, (16,))
    out = _losses_and_grads(zs, zt, y)
    assert out[0].dtype == torch.float32 and out[2].dtype == dtype
    assert _all_finite(out)
    want = normkd_loss(zs.float(), zt.float(), 2.0)
    assert torch.allclose(out[0], want, rtol=1e-6)


def test_huge_logits_are_finite():
    zs, zt = torch.randn(8, 100) * 1e4, torch.randn(8, 100) * 1e4
    y = torch.randint(0, 100, (8,))
    out = _losses_and_grads(zs, zt, y)
    assert _all_finite(out)
    # T^2 scales with the logits: the loss equals the unit-scale one times 1e8.
    assert torch.allclose(out[0], normkd_loss(zs / 1e4, zt / 1e4, 2.0) * 1e8, rtol=1e-4)


def test_huge_constant_logits_fp16():
    zs = torch.full((2, 10), 6e4, dtype=torch.float16)
    zt = torch.full((2, 10), -6e4, dtype=torch.float16)
    assert _all_finite(_losses_and_grads(zs, zt, torch.tensor([1, 2])))


def test_batch_of_one_and_two_classes():
    zs, zt = torch.randn(1, 2), torch.randn(1, 2)
    y = torch.tensor([1])
    out = _losses_and_grads(zs, zt, y)
    assert _all_finite(out)
    want = ref_normdkd(zs, zt, y, 1.0, 8.0, 2.0)
    assert math.isclose(out[1].item(), want.item(), rel_tol=1e-5, abs_tol=1e-7)


def test_confident_target_tckd_has_no_log_of_zero():
    """p_target rounding to 1 in float32 makes log(1 - p) = -inf in the host's DKD; not here."""
    zs = torch.tensor([[60.0, 0.0, 0.0, 0.0]])
    zt = torch.tensor([[0.0, 60.0, 0.0, 0.0]])
    out = _losses_and_grads(zs, zt, torch.tensor([0]))
    assert _all_finite(out)


def test_guards_leave_ordinary_logits_within_1e6_of_unguarded():
    zs, zt = torch.randn(32, 100) * 2, torch.randn(32, 100) * 3
    y = torch.randint(0, 100, (32,))
    ts, tt = 2.0 * zs.std(1, keepdim=True), 2.0 * zt.std(1, keepdim=True)
    unguarded = (
        tt.squeeze(1) ** 2
        * torch.nn.functional.kl_div(torch.log_softmax(zs / ts, 1), torch.softmax(zt / tt, 1), reduction="none").sum(1)
    ).mean()
    assert torch.allclose(normkd_loss(zs, zt, 2.0), unguarded, rtol=1e-6)
    assert torch.allclose(normkd_loss(zs, zt, 2.0), normkd_loss_reference(zs, zt, 2.0))
    assert torch.allclose(normdkd_loss(zs, zt, y, 1, 8, 2.0), normdkd_loss_reference(zs, zt, y, 1, 8, 2.0))


def test_bad_shapes_are_rejected_with_the_shape():
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 9\)"):
        normkd_loss(torch.zeros(4, 10), torch.zeros(4, 9), 2.0)
    with pytest.raises(ValueError, match="C=1"):
        normkd_loss(torch.zeros(4, 1), torch.zeros(4, 1), 2.0)
    with pytest.raises(ValueError, match="target"):
        normdkd_loss(torch.zeros(4, 10), torch.zeros(4, 10), torch.zeros(3, dtype=torch.long), 1, 1, 2.0)


def test_reference_switch_env(monkeypatch):
    from normkd_plugin import losses

    monkeypatch.setenv("NORMKD_REFERENCE", "1")
    assert not losses.use_fused(torch.zeros(2, 3))
