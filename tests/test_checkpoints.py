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
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to unpickle it: it holds print; only tensors"):
        load_state_dict(path)


def test_numpy_scalars_load_as_numbers_and_a_crafted_dtype_state_is_refused(tmp_path):
    """Release-style numpy scalars come back equal and of their type; a dtype state that numpy's own
    __setstate__ would take (6 items for 8: loading it ends numpy 2.4.6's process with SIGSEGV) is refused."""
    import io
    import subprocess
    import sys
    import zipfile

    from normkd_plugin.checkpoints import allow_release_types

    saved = {"epoch": np.int64(240), "accuracy": np.float64(72.3), "lr": np.float32(0.05), "ok": np.True_}
    buf = io.BytesIO()
    torch.save({"model": {}, **saved}, buf)
    with allow_release_types():
        loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert all(type(loaded[k]) is type(v) and loaded[k] == v for k, v in saved.items())

    crafted = tmp_path / "crafted.pth"
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(crafted, "w") as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):  # (3, '<', None, None, None, -1, -1, 0) -> two Nones fewer
                data = data.replace(
                    b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t", b"NJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t", 1
                )
            out.writestr(info, data)
    probe = f"from normkd_plugin.checkpoints import load_state_dict as f\ntry: f({str(crafted)!r})\nexcept Exception as e: print(e)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert proc.stdout.strip() == f"{crafted}: not a readable torch checkpoint, truncated or corrupt"


def _teacher_cfg(ckpt=""):
    from yacs.config import CfgNode as CN

    return CN({"DISTILLER": CN({"TEACHER": "resnet56", "TEACHER_CKPT": str(ckpt)})})


def _resnet56():
    pytest.importorskip("mdistiller", reason="mdistiller is not importable: set MDISTILLER_SRC and install it")
    from mdistiller.models import cifar_model_dict

    return cifar_model_dict["resnet56"][0](num_classes=100)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"^checkpoint not found: .*nope\.pth$"):
        load_state_dict(tmp_path / "nope.pth")


def test_missing_host_default_names_exact_path_and_host_layout(tmp_path, monkeypatch):
    from normkd_plugin.checkpoints import load_teacher

    monkeypatch.chdir(tmp_path)
    host = "download_ckpts/cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth"
    with pytest.raises(CheckpointError) as info:
        load_teacher(_teacher_cfg(), torch.nn.Linear(2, 2), host)
    message = str(info.value)
    assert message.startswith(f"teacher checkpoint not found: {tmp_path / host} (mdistiller's path for 'resnet56')")
    assert "<teacher>_vanilla/ckpt_epoch_240.pth" in message and "DISTILLER.TEACHER_CKPT" in message


def test_missing_teacher_ckpt_never_mentions_the_host_layout(tmp_path):
    from normkd_plugin.checkpoints import load_teacher

    path = tmp_path / "missing.pt"
    with pytest.raises(CheckpointError) as info:
        load_teacher(_teacher_cfg(path), torch.nn.Linear(2, 2), "download_ckpts/cifar_teachers/x/ckpt_epoch_240.pth")
    assert str(info.value) == f"DISTILLER.TEACHER_CKPT {path}: no such file"


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt: empty file \(0 bytes\)"):
        load_state_dict(path)


@pytest.mark.parametrize("keep", [0.5, 0.999, 100])
def test_truncated_real_teacher_is_refused(tmp_path, teacher_resnet56, keep):
    data = teacher_resnet56.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(CheckpointError, match=r"cut\.pt: truncated or corrupt checkpoint \(\d+ bytes; BadZipFile"):
        load_state_dict(path)


@pytest.mark.parametrize("where", [0.5, 0.9])
def test_bit_flipped_real_teacher_is_refused(tmp_path, teacher_resnet56, where):
    """torch.load itself reads a flipped weight byte without complaint; the zip CRC catches it."""
    data = bytearray(teacher_resnet56.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path = tmp_path / "flip.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"flip\.pt: corrupt checkpoint \(CRC mismatch in .*\)"):
        load_state_dict(path)


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes\.pt: not a readable torch checkpoint, truncated or corrupt"):
        load_state_dict(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad):
    state = collections.OrderedDict(w=torch.randn(3, 3), b=torch.zeros(3), c=torch.zeros(2))
    state["b"][1] = bad
    state["c"][0] = bad
    path = tmp_path / "nan.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"nan\.pt: tensor b holds NaN or inf"):
        load_state_dict(path)


def test_checkpoint_of_another_model_does_not_fit(tmp_path, teacher_resnet56):
    pytest.importorskip("mdistiller", reason="mdistiller is not importable: set MDISTILLER_SRC and install it")
    from mdistiller.models import cifar_model_dict

    from normkd_plugin.checkpoints import load_teacher

    resnet20 = cifar_model_dict["resnet20"][0](num_classes=100)
    with pytest.raises(CheckpointError) as info:
        load_teacher(_teacher_cfg(teacher_resnet56), resnet20, None)
    message = str(info.value)
    assert message.startswith(f"{teacher_resnet56} does not fit teacher 'resnet56': ")
    assert "unexpected keys (layer1.3." in message and "\n" not in message
    wrong_classes = cifar_model_dict["resnet56"][0](num_classes=10)
    with pytest.raises(
        CheckpointError,
        match=r"2 shape mismatches \(fc.weight \(100, 64\) in the file, \(10, 64\) in the model, fc.bias \(100,\) in the file",
    ):
        load_teacher(_teacher_cfg(teacher_resnet56), wrong_classes, None)


def test_load_teacher_loads_the_real_teacher(teacher_resnet56):
    from normkd_plugin.checkpoints import load_teacher

    model = _resnet56()
    load_teacher(_teacher_cfg(teacher_resnet56), model, None)
    assert torch.equal(model.state_dict()["fc.bias"], load_state_dict(teacher_resnet56)["fc.bias"])


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
