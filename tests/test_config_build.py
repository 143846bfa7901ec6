"""Every packaged config builds its models and distiller with the host's code and runs forward_train (not -m quick)."""

from __future__ import annotations

import pytest

from conftest import needs_mdistiller
from test_config import CIFAR, METHODS

pytestmark = needs_mdistiller


@pytest.mark.parametrize("stem", list(CIFAR))
@pytest.mark.parametrize("method", METHODS)
def test_every_cifar_config_builds_and_runs_forward_train_on_real_data(method, stem, cifar_batch):
    from mdistiller.models import cifar_model_dict

    from normkd_plugin.build import build_distiller
    from normkd_plugin.config import load_config

    cfg = load_config(f"cifar100/{method}/{stem}")
    torch = pytest.importorskip("torch")
    student = cifar_model_dict[cfg.DISTILLER.STUDENT][0](num_classes=100)
    teacher = cifar_model_dict[cfg.DISTILLER.TEACHER][0](num_classes=100)
    distiller = build_distiller(cfg, student, teacher, 50000)
    distiller.train()
    x, y = cifar_batch
    with torch.no_grad():
        _, losses = distiller(image=x[:8], target=y[:8], epoch=1)
    assert set(losses) == {"loss_ce", "loss_kd"}
    assert all(torch.isfinite(v).all() for v in losses.values())


@pytest.mark.parametrize("pair", ["r34_r18", "r50_mv1"])
def test_imagenet_configs_build_their_distillers(pair):
    from mdistiller.models import imagenet_model_dict

    from normkd_plugin.build import build_distiller
    from normkd_plugin.config import load_config

    for method in METHODS:
        cfg = load_config(f"imagenet/{pair}/{method}")
        s = imagenet_model_dict[cfg.DISTILLER.STUDENT](pretrained=False)
        t = imagenet_model_dict[cfg.DISTILLER.TEACHER](pretrained=False)
        assert build_distiller(cfg, s, t, 1000).teacher is t
