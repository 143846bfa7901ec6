"""Teacher checkpoints load under torch >= 2.6 with only the needed types allowed."""

from __future__ import annotations

import argparse
import collections

import numpy as np
import pytest
import torch

from normkd_plugin.checkpoints import CheckpointError, load_state_dict


def _state():
    return collections.OrderedDict(w=torch.randn(3, 3), b=torch.zeros(3))


def test_release_style_file_with_numpy_scalars_and_namespace(tmp_path):
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save(
        {"model": _state(), "epoch": np.int64(240), "accuracy": np.float64(72.3), "opt": argparse.Namespace(lr=0.05)},
        path,
    )
    sd = load_state_dict(path)
    assert set(sd) == {"w", "b"}


def test_bare_state_dict(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(_state(), path)
    assert torch.equal(load_state_dict(path)["b"], torch.zeros(3))


class Evil:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _state(), "x": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to unpickle"):
        load_state_dict(path)


def test_missing_file_names_path_and_host_layout(tmp_path):
    with pytest.raises(
        CheckpointError,
        match=r"nope\.pth.*download_ckpts/cifar_teachers/<teacher>_vanilla/ckpt_epoch_240\.pth.*TEACHER_CKPT",
    ):
        load_state_dict(tmp_path / "nope.pth")


def test_real_shared_teacher_loads_strictly(teacher_resnet56):
    pytest.importorskip("mdistiller", reason="mdistiller is not importable: set MDISTILLER_SRC and install it")
    from mdistiller.models import cifar_model_dict

    model = cifar_model_dict["resnet56"][0](num_classes=100)
    model.load_state_dict(load_state_dict(teacher_resnet56), strict=True)


def test_host_resume_checkpoint_with_numpy_lr_loads_inside_allow_context(tmp_path):
    """mdistiller stores a numpy float LR after a decay; its load_checkpoint refuses it on torch >= 2.6."""
    pytest.importorskip("mdistiller", reason="mdistiller is not importable: set MDISTILLER_SRC and install it")
    from mdistiller.engine.utils import load_checkpoint, save_checkpoint

    from normkd_plugin.checkpoints import allow_release_types

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.05, momentum=0.9)
    opt.param_groups[0]["lr"] = 0.05 * np.float64(0.1) ** np.int64(1)  # what adjust_learning_rate stores
    path = str(tmp_path / "latest")
    save_checkpoint({"epoch": 151, "model": {}, "optimizer": opt.state_dict(), "best_acc": torch.tensor(70.0)}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(path)
    with allow_release_types():
        assert load_checkpoint(path)["epoch"] == 151
