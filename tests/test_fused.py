"""The fused Triton path (NormKD's and LSKD's losses) against the PyTorch reference: on CUDA, and on CPU through
Triton's interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import needs_cuda

triton = pytest.importorskip("triton", reason="triton is not installed")

CHECK = textwrap.dedent(
    """
    import sys, torch
    from normkd_plugin import _fused, losses

    dev = sys.argv[1]
    torch.manual_seed(0)

    def close(a, b, rtol, atol, what=""):
        a, b = a.double().cpu(), b.double().cpu()
        err = (a - b).abs().max().item()
        assert torch.isfinite(a).all(), "non-finite fused output"
        assert err <= atol + rtol * b.abs().max().item(), f"{what}: max error {err:.3e} (ref scale {b.abs().max().item():.3e})"

    def both(zs, zt, y, red, ls):
        # (value, grad) of the fused and the reference KD-type and DKD-type loss: NormKD's, or LSKD's when ls.
        if ls:
            kd, kd_ref = _fused.ls_kd_loss_fused, losses.ls_kd_loss_reference
            dkd, dkd_ref = _fused.ls_dkd_loss_fused, losses.ls_dkd_loss_reference
        else:
            kd, kd_ref = _fused.normkd_loss_fused, losses.normkd_loss_reference
            dkd, dkd_ref = _fused.normdkd_loss_fused, losses.normdkd_loss_reference
        out = []
        for fn in (
            lambda s: kd(s, zt, 2.0, red),
            lambda s: kd_ref(s, zt, 2.0, red),
            lambda s: dkd(s, zt, y, 4.0, 5.0, 2.0, red),
            lambda s: dkd_ref(s, zt, y, 4.0, 5.0, 2.0, red),
        ):
            s = zs.clone().requires_grad_()
            v = fn(s)
            # Distinct per-row weights exercise the "none" backward; the same for both paths.
            w = torch.linspace(-1.0, 2.0, v.numel(), device=v.device).view_as(v) if red == "none" else 1.0
            (g,) = torch.autograd.grad((v * w).sum(), s)
            out.append((v.detach(), g))
        return out

    # Few rows each: the interpreter runs one program per row, and every shape's path (C = 2, a masked
    # tail under the 16-wide minimum block, tails of 128-, 1024- and 2048-wide blocks, several rows)
    # is there with 2 to 5 rows.
    cases = []
    for n, c in [(1, 2), (5, 2), (3, 7), (4, 100), (3, 1000), (2, 1500)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            zs = (torch.randn(n, c) * 3).to(dtype).to(dev)
            zt = (torch.randn(n, c) * 4 + 2).to(dtype).to(dev)
            cases.append((zs, zt, dtype))
    cases.append((torch.full((4, 10), 2.0, device=dev), torch.randn(4, 10, device=dev), torch.float32))
    cases.append((torch.randn(4, 10, device=dev), torch.full((4, 10), -1.0, device=dev), torch.float32))
    cases.append((torch.randn(6, 100, device=dev) * 1e4, torch.randn(6, 100, device=dev) * 1e4, torch.float32))
    for zs, zt, dtype in cases:
        y = torch.randint(0, zs.shape[1], (zs.shape[0],), device=dev)
        # LSKD's path shares every line but the temperature and weight: float32 and one half shape suffice.
        families = (False, True) if dtype == torch.float32 or zs.shape == (4, 100) else (False,)
        for red, ls in [(red, ls) for red in ("mean", "sum", "none") for ls in families]:
            (vk, gk), (rk, rgk), (vd, gd), (rd, rgd) = both(zs, zt, y, red, ls)
            kd, dkd = ("KD+LS", "DKD+LS") if ls else ("NormKD", "NormDKD")
            label = f"{tuple(zs.shape)} {dtype} {red}"
            rtol = 1e-4 if dtype == torch.float32 else 2e-3
            close(vk, rk, rtol, 1e-6 * max(1.0, rk.abs().max().item()), f"value {kd} " + label)
            close(vd, rd, rtol, 1e-6 * max(1.0, rd.abs().max().item()), f"value {dkd} " + label)
            assert gk.dtype == zs.dtype and gk.shape == zs.shape
            # With C = 2 the normalised logits are fixed, so the exact gradient is 0 and both
            # paths return rounding noise: compare against the loss's scale instead.
            gtol_k = 1e-4 * max(1.0, rk.abs().max().item())
            gtol_d = 1e-4 * max(1.0, rd.abs().max().item())
            close(gk.float(), rgk.float(), 1e-3, gtol_k, f"grad {kd} " + label)
            close(gd.float(), rgd.float(), 1e-3, gtol_d, f"grad {dkd} " + label)
    print("FUSED-OK", len(cases))
    """
)


def _run(device: str, env_extra: dict) -> str:
    env = {**os.environ, **env_extra}
    proc = subprocess.run([sys.executable, "-c", CHECK, device], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_fused_kernel_matches_reference_in_triton_interpreter():
    """The kernel's arithmetic, run on CPU by Triton's interpreter, against the reference."""
    assert "FUSED-OK" in _run("cpu", {"TRITON_INTERPRET": "1"})


@needs_cuda
def test_fused_kernel_matches_reference_on_cuda():
    assert "FUSED-OK" in _run("cuda", {})


@needs_cuda
def test_fused_is_chosen_on_cuda_and_switch_forces_reference(monkeypatch):
    from normkd_plugin import losses

    z = torch.randn(4, 10, device="cuda")
    assert losses.use_fused(z)
    monkeypatch.setenv("NORMKD_REFERENCE", "1")
    assert not losses.use_fused(z)


def test_cpu_never_uses_fused():
    from normkd_plugin import losses

    assert not losses.use_fused(torch.randn(4, 10))


def test_forcing_fused_on_cpu_is_refused(monkeypatch):
    from normkd_plugin.losses import normdkd_loss, normkd_loss

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="fused=True needs CUDA logits"):
        normkd_loss(torch.randn(2, 3), torch.randn(2, 3), 2.0, fused=True)
    with pytest.raises(ValueError, match="fused=True needs CUDA logits"):
        normdkd_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), 1.0, 1.0, 2.0, fused=True)


TARGET_CHECK = textwrap.dedent(
    """
    import torch
    from normkd_plugin import _fused, losses

    zs, zt = torch.randn(4, 10), torch.randn(4, 10)
    good = torch.tensor([0, 9, 3, 3])
    fused = _fused.normdkd_loss_fused(zs, zt, good, 1.0, 8.0, 2.0)
    ref = losses.normdkd_loss_reference(zs, zt, good, 1.0, 8.0, 2.0)
    assert torch.allclose(fused, ref, rtol=1e-4), (fused, ref)
    for bad, shown in ((-100, -100), (10, 10), (-1, -1)):
        y = good.clone()
        y[2] = bad
        paths = {
            "reference": lambda: losses.normdkd_loss_reference(zs, zt, y, 1.0, 8.0, 2.0),
            "public fused=True": lambda: losses.normdkd_loss(zs, zt, y, 1.0, 8.0, 2.0, fused=True),
            "fused kernel entry": lambda: _fused.normdkd_loss_fused(zs, zt, y, 1.0, 8.0, 2.0),
        }
        messages = set()
        for name, call in paths.items():
            try:
                call()
            except ValueError as exc:
                messages.add(str(exc))
            else:
                raise AssertionError(f"{name} accepted target {bad}")
        assert messages == {f"target must hold class indices in 0..9 (no ignore index such as -100); got {shown}"}, messages
    print("TARGET-OK")
    """
)


def test_out_of_range_target_is_refused_alike_by_reference_and_fused_path():
    """-100 (an ignore index) or C: the same ValueError from both paths, before the kernel runs (Triton interpreter)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", TARGET_CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "TARGET-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


@needs_cuda
def test_out_of_range_target_on_cuda_needs_no_host_sync():
    """On CUDA the range check is a device-side assert queued on the stream, not a host round trip."""
    from normkd_plugin.losses import normdkd_loss

    zs, zt = torch.randn(8, 100, device="cuda"), torch.randn(8, 100, device="cuda")
    y = torch.randint(0, 100, (8,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        normdkd_loss(zs, zt, y, 1.0, 8.0, 2.0, fused=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
