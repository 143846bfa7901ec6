"""Logit standardization (LSKD, Sun et al. CVPR 2024) as KD_LS / DKD_LS against LSKD's formulas in float64.

The references below are LSKD's formulas written out row by row (its release's ``normalize``,
``kd_loss`` and ``dkd_loss`` with ``logit_stand``, and its ``tools/train.py`` weights): z-score
``(z - mean) / (1e-7 + std)`` with the unbiased std, softmax at the base temperature tau, KL times
tau^2; KD+LS is the host's KD with KD weight lambda, DKD+LS the host's DKD with alpha and beta
multiplied by lambda. Rows whose std is near 1e-7 are where the epsilon shows; constant rows (std 0)
have the formula's exact gradient (I - 1/C) / 1e-7 through the z-score.
"""

from __future__ import annotations

import logging

import pytest
import torch

from normkd_plugin.losses import ls_dkd_loss, ls_kd_loss, ls_temperature, standardize

EPS = 1e-7


def z_score(row: torch.Tensor) -> torch.Tensor:
    """LSKD's normalize of one row, float64: (z - mean) / (1e-7 + unbiased std)."""
    return (row - row.mean()) / (EPS + row.std(unbiased=True))


def ref_kd_on_zhat(zhat_s, zhat_t, tau):
    """(1/N) sum_n tau^2 KL(softmax(zhat_t / tau) || softmax(zhat_s / tau)), row by row."""
    total = 0.0
    for s, t in zip(zhat_s, zhat_t):
        p, q = torch.softmax(t / tau, 0), torch.softmax(s / tau, 0)
        total = total + tau**2 * (p * torch.log(p / q)).sum()
    return total / zhat_s.shape[0]


def ref_dkd_on_zhat(zhat_s, zhat_t, y, alpha, beta, tau):
    """(1/N) sum_n tau^2 (alpha TCKD + beta NCKD) at temperature tau, row by row."""
    total = 0.0
    for s, t, g in zip(zhat_s, zhat_t, y.tolist()):
        p, q = torch.softmax(t / tau, 0), torch.softmax(s / tau, 0)
        bp, bq = torch.stack([p[g], 1 - p[g]]), torch.stack([q[g], 1 - q[g]])
        tckd = (bp * torch.log(bp / bq)).sum()
        keep = torch.arange(len(s)) != g
        ph, qh = p[keep] / p[keep].sum(), q[keep] / q[keep].sum()
        nckd = (ph * torch.log(ph / qh)).sum()
        total = total + tau**2 * (alpha * tckd + beta * nckd)
    return total / zhat_s.shape[0]


def _z(logits):
    return torch.stack([z_score(row) for row in logits.double()])


def ref_ls_kd(zs, zt, tau):
    """KD+LS: the KD formula on LSKD's z-scores, float64."""
    return ref_kd_on_zhat(_z(zs), _z(zt), tau)


def ref_ls_dkd(zs, zt, y, alpha, beta, tau):
    """DKD+LS: the DKD formula on LSKD's z-scores, float64."""
    return ref_dkd_on_zhat(_z(zs), _z(zt), y, alpha, beta, tau)


def _logits(n, c, seed, tiny_rows=0):
    """Random float64 logits; the first ``tiny_rows`` rows have a std of about 1e-7 (where the epsilon matters; their
    z-scores carry ~1e-9 relative rounding, as z - mean cancels ~8 digits: hence tolerances of 1e-8 and 1e-6)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * 3 + torch.randn(n, 1, generator=g, dtype=torch.float64)
    z[:tiny_rows] = 5.0 + 1e-7 * torch.randn(tiny_rows, c, generator=g, dtype=torch.float64)
    return z


def _grad(fn, zs):
    zs = zs.clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(zs), zs)
    return g


def _close(got, want, rtol, what=""):
    assert torch.allclose(got, want, rtol=rtol, atol=rtol * want.abs().max().item()), (
        f"{what}: max error {(got - want).abs().max().item():.3e}, scale {want.abs().max().item():.3e}"
    )


SHAPES = [(1, 10), (3, 2), (8, 5), (64, 100), (16, 1000)]


@pytest.mark.quick
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", [1.0, 2.0, 3.0])
def test_ls_kd_and_its_gradient_match_lskd_formula_in_float64(shape, tau):
    n, c = shape
    zs, zt = _logits(n, c, 0, tiny_rows=min(1, n - 1) if n > 1 else 0), _logits(n, c, 1, tiny_rows=n // 3)
    value = ls_kd_loss(zs, zt, tau)
    assert value.dtype == torch.float64
    _close(value, ref_ls_kd(zs, zt, tau), 1e-8, "value")
    _close(_grad(lambda s: ls_kd_loss(s, zt, tau), zs), _grad(lambda s: ref_ls_kd(s, zt, tau), zs), 1e-6, "gradient")


@pytest.mark.quick
@pytest.mark.parametrize("shape", SHAPES)
def test_ls_dkd_and_its_gradient_match_lskd_formula_in_float64(shape):
    n, c = shape
    zs, zt = _logits(n, c, 2, tiny_rows=1 if n > 1 else 0), _logits(n, c, 3, tiny_rows=n // 3)
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(4))
    args = (9.0, 18.0, 2.0)  # alpha = 1 * lambda, beta = 2 * lambda, tau: LSKD's res56 -> res20 DKD run
    _close(ls_dkd_loss(zs, zt, y, *args), ref_ls_dkd(zs, zt, y, *args), 1e-8, "value")
    want = _grad(lambda s: ref_ls_dkd(s, zt, y, *args), zs)
    _close(_grad(lambda s: ls_dkd_loss(s, zt, y, *args), zs), want, 1e-6, "gradient")


@pytest.mark.quick
def test_the_epsilon_is_added_to_the_unbiased_std():
    """A row of std 1e-7 is z-scored to half its unit-std shape: (z - mean) / (1e-7 + 1e-7)."""
    unit = torch.randn(3, 50, dtype=torch.float64)
    unit = (unit - unit.mean(1, keepdim=True)) / unit.std(1, keepdim=True)
    _close(standardize(4.0 + 1e-7 * unit), unit / 2, 1e-6, "z-score at std 1e-7")
    _close(standardize(10 * unit), 10 * unit / (1e-7 + 10), 1e-12, "z-score at std 10")
    _close(ls_temperature(10 * unit, 2.0), torch.full((3, 1), 2.0 * (10 + 1e-7), dtype=torch.float64), 1e-12)


@pytest.mark.quick
@pytest.mark.parametrize("kind", ["kd", "dkd"])
def test_constant_rows_soften_to_uniform_with_the_formulas_gradient(kind):
    """std 0: zhat = 0 (a uniform softmax), and the z-score's Jacobian there is (I - 1/C) / 1e-7 (the std, 0 times
    a bounded derivative, adds nothing): dL/dz_s = (g - mean g) / 1e-7 with g = dL/dzhat_s at zhat_s = 0."""
    n, c, tau = 4, 10, 2.0
    zs = torch.tensor([2.0, -3.0, 0.0, 1e3], dtype=torch.float64).unsqueeze(1).expand(n, c).contiguous()
    zt = _logits(n, c, 5)
    zt[3] = 7.0  # a constant teacher row too: uniform against uniform
    y = torch.tensor([0, 3, 9, 4])
    ours = (lambda s: ls_kd_loss(s, zt, tau)) if kind == "kd" else (lambda s: ls_dkd_loss(s, zt, y, 9.0, 72.0, tau))
    on_zhat = (
        (lambda h: ref_kd_on_zhat(h, _z(zt), tau)) if kind == "kd" else
        (lambda h: ref_dkd_on_zhat(h, _z(zt), y, 9.0, 72.0, tau))
    )  # fmt: skip
    zeros = torch.zeros(n, c, dtype=torch.float64)
    value = ours(zs)
    _close(value, on_zhat(zeros), 1e-12, "value")
    assert value.item() > 0
    g = _grad(on_zhat, zeros)
    got = _grad(ours, zs)
    assert torch.isfinite(got).all()
    _close(got, (g - g.mean(1, keepdim=True)) / EPS, 1e-8, "gradient at std 0")
    assert got.abs().max() > 1e4 and got[3].abs().max() < 1e-9 * got.abs().max()


@pytest.mark.quick
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_computed_in_float32(dtype):
    zs, zt = (_logits(16, 100, 6) * 2).to(dtype), (_logits(16, 100, 7) * 2).to(dtype)
    y = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(8))
    for ours, ref in (
        (lambda s: ls_kd_loss(s, zt, 2.0), lambda s: ref_ls_kd(s, zt.double(), 2.0)),
        (lambda s: ls_dkd_loss(s, zt, y, 9.0, 72.0, 2.0), lambda s: ref_ls_dkd(s, zt.double(), y, 9.0, 72.0, 2.0)),
    ):
        value = ours(zs)
        assert value.dtype == torch.float32
        _close(value.double(), ref(zs.double()), 1e-5, f"{dtype} value")
        grad = _grad(ours, zs)
        assert grad.dtype == dtype and torch.isfinite(grad.float()).all()
        _close(grad.double(), _grad(ref, zs.double()), 2e-2, f"{dtype} gradient")


@pytest.mark.quick
def test_the_student_std_is_not_detached():
    """The gradient differs from the one with the student's std held constant."""
    zs, zt = _logits(4, 10, 9), _logits(4, 10, 10)

    def frozen_std(s):
        zhat_s = (s - s.mean(1, keepdim=True)) / (EPS + s.std(1, keepdim=True).detach())
        return ref_kd_on_zhat(zhat_s, _z(zt), 2.0)

    assert not torch.allclose(_grad(lambda s: ls_kd_loss(s, zt, 2.0), zs), _grad(frozen_std, zs), atol=1e-6)


@pytest.mark.quick
def test_softened_distributions_equal_normkds_at_t_norm_tau_only_the_weight_differs():
    """softmax(zhat / tau) = softmax(z / (tau (1e-7 + std))): LS is NormKD at T_norm = tau with the weight tau^2."""
    from normkd_plugin.losses import normkd_loss

    zs, zt = _logits(8, 100, 11), _logits(8, 100, 12)
    t_t = ls_temperature(zt, 2.0).squeeze(1)
    per_ls = ls_kd_loss(zs, zt, 2.0, reduction="none")
    per_norm = normkd_loss(zs, zt, 2.0, reduction="none")
    _close(per_ls / 4.0, per_norm / (2.0 * zt.std(1)) ** 2, 1e-6, "KL per sample")
    assert not torch.allclose(per_ls, per_norm)
    assert t_t.shape == (8,)


# -- the distillers, through the host's registry ------------------------------------------------------


def _distiller(kind: str, *opts):
    from mdistiller.distillers import distiller_dict
    from mdistiller.models import cifar_model_dict

    from normkd_plugin.config import load_config

    cfg = load_config(f"cifar100/{kind}/res56_res20", [str(x) for x in opts])
    torch.manual_seed(0)
    s = cifar_model_dict["resnet8"][0](num_classes=100)
    t = cifar_model_dict["resnet8"][0](num_classes=100)
    d = distiller_dict[cfg.DISTILLER.TYPE](s, t, cfg)
    return d.double().train(), cfg


def _logits_of(d, x):
    with torch.no_grad():
        return d.student(x)[0], d.teacher(x)[0]


@pytest.mark.quick
def test_kd_ls_is_ce_weight_times_ce_plus_kd_weight_times_lskd_kd():
    pytest.importorskip("mdistiller")
    d, cfg = _distiller("kd_ls", "KD_LS.TEMPERATURE", "3.0", "KD_LS.LOSS.KD_WEIGHT", "12.0")
    x, y = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 5, 9, 50, 99, 3])
    zs, zt = _logits_of(d, x)
    _, losses = d(image=x, target=y, epoch=1)
    assert (cfg.KD_LS.TEMPERATURE, cfg.KD_LS.LOSS.CE_WEIGHT, cfg.KD_LS.LOSS.KD_WEIGHT) == (3.0, 0.1, 12.0)
    _close(losses["loss_kd"], 12.0 * ref_ls_kd(zs, zt, 3.0), 1e-10, "loss_kd")
    _close(losses["loss_ce"], 0.1 * torch.nn.functional.cross_entropy(zs, y), 1e-12, "loss_ce")


@pytest.mark.quick
@pytest.mark.parametrize("epoch", [5, 20, 40])
def test_dkd_ls_multiplies_alpha_and_beta_by_the_kd_weight(epoch):
    """LSKD's tools/train.py: DKD.ALPHA *= lambda, DKD.BETA *= lambda, DKD.T = tau; the warm-up as DKD's."""
    pytest.importorskip("mdistiller")
    d, cfg = _distiller("dkd_ls", "DKD_LS.KD_WEIGHT", "18.0", "DKD_LS.T", "3.0", "DKD_LS.BETA", "2.0")
    x, y = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 5, 9, 50, 99, 3])
    zs, zt = _logits_of(d, x)
    _, losses = d(image=x, target=y, epoch=epoch)
    ramp = min(epoch / 20, 1.0)
    _close(losses["loss_kd"], ramp * ref_ls_dkd(zs, zt, y, 1.0 * 18.0, 2.0 * 18.0, 3.0), 1e-10, "loss_kd")
    _close(losses["loss_ce"], 1.0 * torch.nn.functional.cross_entropy(zs, y), 1e-12, "loss_ce")
    with pytest.raises(TypeError, match="epoch"):
        d(image=x, target=y)


# -- every trainer: a CPU pack of the whole comparison, fused and unfused ----------------------------------------


COMPARISON = ("vanilla", "kd", "dkd", "kd_ls", "dkd_ls", "normkd", "normdkd")


def test_a_pack_of_all_seven_methods_trains_fused_as_unfused(tmp_path, small_cifar_npz, teacher_resnet56, caplog):
    """The comparison pack (one seed, 2 epochs of 2 steps: the LR decay crossed, the DKD-type warm-ups running) as one
    fused group of 7 resnet20 students and unfused: the same runs to float32 rounding (test_layout's tolerances)."""
    pytest.importorskip("mdistiller")
    from test_layout import _train, assert_close_runs

    runs = tuple((f"cifar100/{m}/res56_res20", 0, ()) for m in COMPARISON)
    few = ("SOLVER.FAST.ITERS_PER_EPOCH", "2")
    with caplog.at_level(logging.INFO, logger="normkd_plugin.engine"):  # the step says what it fused
        fused = _train(small_cifar_npz, teacher_resnet56, tmp_path / "fused", runs, "on", few)
    assert "fused 7 students" in caplog.text
    unfused = _train(small_cifar_npz, teacher_resnet56, tmp_path / "unfused", runs, "off", few)
    for a, b in zip(fused, unfused):
        assert (a / "worklog.txt").read_text().rstrip().splitlines()[-1].startswith("best_acc\t")
        assert_close_runs(a, b)
    assert [f.name.split(",")[0] for f in fused] == list(COMPARISON)
