"""provenance.py: the teacher's and the data's identity a run records, hashed once per file and process."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from conftest import needs_mdistiller


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def counted_reads(monkeypatch):
    """The paths provenance.py opens from now on, with an empty digest cache (as in a new process)."""
    from normkd_plugin import provenance

    opened = []
    monkeypatch.setattr(provenance, "_DIGESTS", {})
    monkeypatch.setattr(provenance, "open", lambda path, mode: (opened.append(str(path)), open(path, mode))[1], False)
    return opened


def test_a_file_is_hashed_once_while_unchanged_and_again_when_rewritten(tmp_path, counted_reads):
    from normkd_plugin.provenance import file_sha256

    path = tmp_path / "teacher.pt"
    path.write_bytes(os.urandom(3 << 20))  # more than one read chunk
    assert file_sha256(path) == file_sha256(tmp_path / "." / "teacher.pt") == _sha256(path)
    assert counted_reads == [str(path)]
    stat = path.stat()
    time.sleep(0.05)  # past the file system's timestamp granularity: the rewrite gets another ctime
    path.write_bytes(os.urandom(3 << 20))  # other bytes, the same size and (set back) the same mtime
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(path) == _sha256(path) and len(counted_reads) == 2


@needs_mdistiller
def test_a_pack_of_fifteen_runs_hashes_its_teacher_and_data_once(tmp_path, counted_reads, small_cifar_npz):
    from normkd_plugin.config import load_config
    from normkd_plugin.provenance import learned_from

    teacher = tmp_path / "resnet56.pt"
    teacher.write_bytes(os.urandom(1 << 20))
    opts = ["DATASET.ROOT", str(small_cifar_npz), "DISTILLER.TEACHER_CKPT", str(teacher)]
    methods = ("vanilla", "kd", "dkd", "normkd", "normdkd")
    cfgs = [
        load_config(f"cifar100/{m}/res56_res20", [*opts, "EXPERIMENT.SEED", str(s)]) for m in methods for s in (0, 1, 2)
    ]
    records = [learned_from(cfg) for cfg in cfgs]
    assert sorted(counted_reads) == sorted(
        str(small_cifar_npz / n) for n in ("test-0-of-1.npz", "train-0-of-1.npz")
    ) + [str(teacher)]
    assert all(r["teacher"] is None for r in records[:3])  # vanilla: no teacher
    assert all(r["teacher"] == {"path": str(teacher), "sha256": _sha256(teacher)} for r in records[3:])
    assert all(r["data"]["files"]["train-0-of-1.npz"] == _sha256(small_cifar_npz / "train-0-of-1.npz") for r in records)


@needs_mdistiller
def test_the_teacher_file_is_the_one_the_host_would_load(tmp_path):
    import torch
    from mdistiller.models import cifar_model_dict
    from mdistiller.models.imagenet.resnet import model_urls

    from normkd_plugin.config import load_config
    from normkd_plugin.provenance import teacher_file

    assert teacher_file(load_config("cifar100/normkd/res32x4_res8x4", [])) == cifar_model_dict["resnet32x4"][1]
    given = load_config("cifar100/normkd/res32x4_res8x4", ["DISTILLER.TEACHER_CKPT", str(tmp_path / "t.pt")])
    assert teacher_file(given) == str(tmp_path / "t.pt")
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(model_urls["resnet34"]))
    assert teacher_file(load_config("imagenet/r34_r18/normkd", [])) == cached  # torchvision's download of ResNet34


def test_differences_name_what_changed_by_content_only():
    from normkd_plugin.provenance import differences

    teacher = {"path": "/a/t.pt", "sha256": "1" * 64}
    folders = {"root": "/d", "classes": ["c0", "c1", "c2"], "images": {"train": 6, "val": 3}}
    same = {"teacher": {**teacher, "path": "/elsewhere/t.pt"}, "data": {**folders, "root": "/mnt/d"}}
    assert differences({"teacher": teacher, "data": folders}, same) == []  # moved, same contents
    assert differences({"teacher": None, "data": None}, same) == []  # nothing recorded to compare
    changed = {
        "teacher": {"path": "/b/u.pt", "sha256": "2" * 64},
        "data": {"root": "/d", "classes": ["c1", "c2", "c3"], "images": {"train": 6, "val": 4}},
    }
    assert differences({"teacher": teacher, "data": folders}, changed) == [
        f"teacher /a/t.pt (sha256 {'1' * 12}) -> /b/u.pt (sha256 {'2' * 12})",
        "data in /d: classes missing ['c0'], extra ['c3'], val images 3 -> 4",
    ]


def test_the_same_pickles_in_either_layout_the_loader_reads_are_the_same_data(tmp_path):
    """DATASET.ROOT/cifar-100-python/{train,test} and DATASET.ROOT/{train,test}: one identity; other bytes differ."""
    from yacs.config import CfgNode as CN

    from normkd_plugin.provenance import data_identity, differences

    nested, flat = tmp_path / "a" / "cifar-100-python", tmp_path / "b"
    nested.mkdir(parents=True)
    flat.mkdir()
    for split, payload in (("train", b"train bytes"), ("test", b"test bytes")):
        (nested / split).write_bytes(payload)
        (flat / split).write_bytes(payload)

    def identity(root):
        return data_identity(CN({"DATASET": CN({"TYPE": "cifar100", "ROOT": str(root)})}))

    a, b = identity(tmp_path / "a"), identity(flat)
    assert sorted(a["files"]) == ["test", "train"] and a["files"] == b["files"]
    assert differences({"teacher": None, "data": a}, {"teacher": None, "data": b}) == []
    (flat / "test").write_bytes(b"other test bytes")
    assert differences({"teacher": None, "data": a}, {"teacher": None, "data": identity(flat)}) != []
