"""NormKD / NormDKD and KD+LS / DKD+LS inside the real mdistiller: real models, real CIFAR-100 images, host baselines."""

from __future__ import annotations

import pytest
import torch

from conftest import needs_mdistiller

pytestmark = needs_mdistiller


def _cfg(node_type: str, **opts):
    from normkd_plugin.config import load_config

    flat = [str(x) for kv in opts.items() for x in kv]
    return load_config(f"cifar100/{node_type}/res56_res20", flat)


def _models(teacher="resnet56", student="resnet20"):
    from mdistiller.models import cifar_model_dict

    return cifar_model_dict[student][0](num_classes=100), cifar_model_dict[teacher][0](num_classes=100)


@pytest.mark.parametrize("teacher,student", [("resnet32x4", "resnet8x4"), ("resnet56", "resnet20")])
@pytest.mark.parametrize("kind", ["normkd", "normdkd", "kd_ls", "dkd_ls"])
def test_forward_train_on_real_cifar_batch(kind, teacher, student, cifar_batch, teacher_resnet56):
    from mdistiller.distillers import distiller_dict

    from normkd_plugin.checkpoints import load_state_dict

    cfg = _cfg(kind)
    s, t = _models(teacher, student)
    if teacher == "resnet56":
        t.load_state_dict(load_state_dict(teacher_resnet56))
    distiller = distiller_dict[kind.upper()](s, t, cfg)
    distiller.train()
    x, y = cifar_batch
    logits, losses = distiller(image=x, target=y, epoch=30)
    assert logits.shape == (32, 100)
    assert set(losses) == {"loss_ce", "loss_kd"}
    assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values())
    assert not distiller.teacher.training


def test_real_teacher_is_accurate_on_real_batch(cifar_batch, teacher_resnet56):
    """Guards the data path: the shared teacher must classify real images well above chance."""
    from normkd_plugin.checkpoints import load_state_dict

    _, t = _models()
    t.load_state_dict(load_state_dict(teacher_resnet56))
    t.eval()
    x, y = cifar_batch
    with torch.no_grad():
        acc = (t(x)[0].argmax(1) == y).float().mean().item()
    assert acc > 0.5


@pytest.mark.parametrize("kind", ["normkd", "normdkd", "kd_ls", "dkd_ls"])
def test_sgd_steps_on_a_fixed_real_batch_lower_the_loss(kind, cifar_batch, teacher_resnet56):
    from mdistiller.distillers import distiller_dict

    from normkd_plugin.checkpoints import load_state_dict

    cfg = _cfg(kind)
    s, t = _models()
    t.load_state_dict(load_state_dict(teacher_resnet56))
    distiller = distiller_dict[kind.upper()](s, t, cfg)
    distiller.train()
    opt = torch.optim.SGD(distiller.get_learnable_parameters(), lr=0.05, momentum=0.9)
    x, y = cifar_batch
    totals = []
    for _ in range(8):
        opt.zero_grad()
        _, losses = distiller(image=x, target=y, epoch=40)
        loss = sum(v.mean() for v in losses.values())
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert totals[-1] < 0.8 * totals[0], totals


def test_normdkd_warmup_ramp():
    from mdistiller.distillers import distiller_dict

    cfg = _cfg("normdkd")
    s, t = _models()
    d = distiller_dict["NORMDKD"](s, t, cfg)
    d.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    torch.manual_seed(0)
    kd5 = d(image=x, target=y, epoch=5)[1]["loss_kd"]
    kd20 = d(image=x, target=y, epoch=20)[1]["loss_kd"]
    kd40 = d(image=x, target=y, epoch=40)[1]["loss_kd"]
    assert torch.allclose(kd5 * 4, kd20, rtol=1e-5)
    assert torch.allclose(kd20, kd40, rtol=1e-6)
    with pytest.raises(TypeError, match="epoch"):
        d(image=x, target=y)


def _equal_sigma_logits(n, c, sigma):
    """Logits whose every row has unbiased std exactly sigma."""
    z = torch.randn(n, c, dtype=torch.float64)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)
    return z * sigma + torch.randn(n, 1, dtype=torch.float64)


def test_normkd_equals_host_kd_when_every_temperature_is_4():
    from mdistiller.distillers.KD import kd_loss

    from normkd_plugin.losses import normkd_loss

    zs, zt = _equal_sigma_logits(16, 100, 2.0), _equal_sigma_logits(16, 100, 2.0)  # T = 2.0 * 2.0
    ours = normkd_loss(zs.float(), zt.float(), 2.0)
    host = kd_loss(zs.float(), zt.float(), 4.0)
    assert torch.allclose(ours, host, rtol=1e-5), (ours.item(), host.item())


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
def test_normdkd_equals_host_dkd_when_every_temperature_is_4():
    from mdistiller.distillers.DKD import dkd_loss

    from normkd_plugin.losses import normdkd_loss

    zs, zt = _equal_sigma_logits(16, 100, 1.6), _equal_sigma_logits(16, 100, 1.6)  # T = 2.5 * 1.6
    y = torch.randint(0, 100, (16,))
    ours = normdkd_loss(zs.float(), zt.float(), y, 1.0, 8.0, 2.5)
    host = dkd_loss(zs.float(), zt.float(), y, 1.0, 8.0, 4.0)
    assert torch.allclose(ours, host, rtol=1e-5), (ours.item(), host.item())


def test_release_aliases_read_release_nodes():
    from mdistiller.distillers import distiller_dict
    from mdistiller.engine.cfg import CFG

    import normkd_plugin

    normkd_plugin.register()
    cfg = CFG.clone()
    cfg.defrost()
    cfg.NormKD.TEMPERATURE_NORM = 1.25
    cfg.NormKD_W_DKD.BETA = 3.5
    s, t = _models()
    assert distiller_dict["NormKD"](s, t, cfg).t_norm == 1.25
    assert distiller_dict["NormKD_W_DKD"](s, t, cfg).beta == 3.5
    assert "LOSS" in cfg.NormKD_W_DKD


def test_fused_loss_switch_in_config():
    from mdistiller.distillers import distiller_dict

    on = _cfg("normkd")
    off = _cfg("normdkd", **{"DISTILLER.FUSED_LOSS": False})
    s, t = _models()
    assert distiller_dict["NORMKD"](s, t, on).fused is None
    assert distiller_dict["NORMDKD"](s, t, off).fused is False
    assert distiller_dict["KD_LS"](s, t, _cfg("kd_ls")).fused is None
    assert distiller_dict["DKD_LS"](s, t, _cfg("dkd_ls", **{"DISTILLER.FUSED_LOSS": False})).fused is False
