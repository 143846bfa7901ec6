"""Offline CIFAR-100: npz shards and cifar-100-python folders give the host's batches; bad input fails clearly."""

from __future__ import annotations

import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from test_safe_pickle import Hostile, official_entry, py2_pickle

from conftest import CIFAR_DIR, needs_data, needs_mdistiller

pytestmark = needs_mdistiller


def _cfg(root, **over):
    from normkd_plugin.config import load_config

    opts = ["DATASET.ROOT", str(root), "DATASET.NUM_WORKERS", "0", "SOLVER.BATCH_SIZE", "16"]
    for k, v in over.items():
        opts += [k, str(v)]
    return load_config("cifar100/normkd/res56_res20", opts)


def _write_python_layout(root, images, labels, n_train=40, n_test=20):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, sl in (("train", slice(0, n_train)), ("test", slice(n_train, n_train + n_test))):
        data = images[sl].transpose(0, 3, 1, 2).reshape(-1, 3072)
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels[sl].tolist()}, f)
    return root


@needs_data
def test_npz_shards_give_the_official_split():
    from normkd_plugin.data import load_cifar100

    train_x, train_y = load_cifar100(CIFAR_DIR, train=True)
    test_x, test_y = load_cifar100(CIFAR_DIR, train=False)
    assert train_x.shape == (50000, 32, 32, 3) and test_x.shape == (10000, 32, 32, 3)
    assert np.bincount(train_y, minlength=100).tolist() == [500] * 100
    assert np.bincount(test_y, minlength=100).tolist() == [100] * 100


@needs_data
def test_loaders_yield_the_host_batch_structure_from_shards():
    from normkd_plugin.data import get_dataset

    train, val, num_data, num_classes = get_dataset(_cfg(CIFAR_DIR))
    assert (num_data, num_classes) == (50000, 100)
    image, target, index = next(iter(train))
    assert image.shape == (16, 3, 32, 32) and image.dtype == torch.float32
    assert target.dtype == torch.int64 and index.shape == (16,)
    x, y = next(iter(val))
    assert x.shape == (64, 3, 32, 32) and y.shape == (64,)  # DATASET.TEST.BATCH_SIZE


def test_python_layout_matches_shard_content(tmp_path, cifar_test_arrays):
    from normkd_plugin.data import load_cifar100

    images, labels = cifar_test_arrays
    root = _write_python_layout(tmp_path, images, labels)
    x, y = load_cifar100(root, train=True)
    assert np.array_equal(x, images[:40]) and np.array_equal(y, labels[:40])
    x, y = load_cifar100(root / "cifar-100-python", train=False)
    assert np.array_equal(x, images[40:60])


def test_python_layout_through_get_dataset(tmp_path, cifar_test_arrays):
    from normkd_plugin.data import get_dataset

    root = _write_python_layout(tmp_path, *cifar_test_arrays)
    train, val, num_data, _ = get_dataset(_cfg(root))
    assert num_data == 40
    batch = next(iter(train))
    assert len(batch) == 3 and batch[0].shape == (16, 3, 32, 32)
    assert len(next(iter(val))) == 2


def test_missing_root_names_path_and_layouts(tmp_path):
    from normkd_plugin.data import DataError, get_dataset

    with pytest.raises(DataError, match=r"nowhere.*npz shards.*cifar-100-python"):
        get_dataset(_cfg(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"holds no CIFAR-100 train split"):
        get_dataset(_cfg(tmp_path))


def test_malformed_inputs(tmp_path):
    from normkd_plugin.data import DataError, load_cifar100

    np.savez(tmp_path / "train-0-of-2.npz", images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="incomplete train shards"):
        load_cifar100(tmp_path, True)
    np.savez(tmp_path / "train-1-of-2.npz", images=np.zeros((4, 28, 28, 3), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(DataError, match=r"train-1-of-2\.npz: images must be uint8 \(N,32,32,3\)"):
        load_cifar100(tmp_path, True)
    np.savez(tmp_path / "test-0-of-1.npz", pictures=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match=r"test-0-of-1\.npz: missing array\(s\) \['images', 'labels'\]"):
        load_cifar100(tmp_path, False)
    other = tmp_path / "py"
    (other / "cifar-100-python").mkdir(parents=True)
    (other / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"cifar-100-python/train: not a cifar-100-python pickle"):
        load_cifar100(other, True)
    np.savez(tmp_path / "train-0-of-2.npz", images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.full(4, 100))
    with pytest.raises(DataError, match="fine labels 0-99"):
        load_cifar100(tmp_path, True)


def test_the_official_python2_files_load(tmp_path, cifar_test_arrays):
    """cifar-100-python/{train,test} as the official archive holds them: Python 2 pickles of the official keys."""
    from normkd_plugin.data import load_cifar100

    images, labels = cifar_test_arrays
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split, part in (("train", slice(0, 30)), ("test", slice(30, 40))):
        entry = official_entry(part.stop - part.start)
        entry["data"] = images[part].transpose(0, 3, 1, 2).reshape(-1, 3072)
        entry["fine_labels"] = labels[part].tolist()
        (folder / split).write_bytes(py2_pickle(entry))
        x, y = load_cifar100(tmp_path, train=split == "train")
        assert np.array_equal(x, images[part]) and np.array_equal(y, labels[part]) and y.dtype == np.int64


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_cifar_pickle_that_would_run_code_is_refused_in_one_line_and_nothing_runs(
    tmp_path, cifar_test_arrays, split, capsys
):
    from normkd_plugin import train

    root = _write_python_layout(tmp_path / "root", *cifar_test_arrays)
    marker, hostile = tmp_path / "ran", root / "cifar-100-python" / split
    entry = {"data": Hostile(marker), "fine_labels": [0]}
    hostile.write_bytes(pickle.dumps(entry, protocol=2))  # the official files' protocol
    argv = ["--cfg", "cifar100/normkd/res56_res20", "--device", "cpu", "SOLVER.TRAINER", "fast"]
    with pytest.raises(SystemExit) as stop:
        train.main([*argv, "DATASET.ROOT", str(root), "LOG.PREFIX", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and not marker.exists()
    assert err == [
        f"normkd-train: {hostile}: refused to unpickle it: it names {os.system.__module__}.system, and a "
        "cifar-100-python pickle holds only a dict of strings, lists and numpy arrays (nothing in the file was run)"
    ]


def test_the_meta_file_is_never_read(tmp_path, cifar_test_arrays):
    """Only train and test are read: a hostile meta (class names) beside them never runs."""
    from normkd_plugin.data import load_cifar100

    root = _write_python_layout(tmp_path / "root", *cifar_test_arrays)
    marker = tmp_path / "ran"
    (root / "cifar-100-python" / "meta").write_bytes(pickle.dumps({"fine_label_names": Hostile(marker)}, protocol=2))
    assert load_cifar100(root, True)[0].shape == (40, 32, 32, 3) and load_cifar100(root, False)[1].shape == (20,)
    assert not marker.exists()


def test_npz_shards_never_unpickle(tmp_path):
    """An object array in a shard is a pickle: refused (allow_pickle=False), naming the shard."""
    from normkd_plugin.data import DataError, load_cifar100

    shard = tmp_path / "train-0-of-1.npz"
    np.savez(shard, images=np.zeros((1, 32, 32, 3), np.uint8), labels=np.array([Hostile(tmp_path / "ran")], object))
    with pytest.raises(DataError, match=rf"^{re.escape(str(shard))}: unreadable npz shard.*allow_pickle=False"):
        load_cifar100(tmp_path, True)
    assert not (tmp_path / "ran").exists()


@pytest.fixture(scope="module")
def real_shard_bytes():
    shard = CIFAR_DIR / "test-0-of-1.npz"
    if not shard.is_file():
        pytest.skip(f"real CIFAR-100 shards not found in {CIFAR_DIR} (set NORMKD_DATA)")
    return shard.read_bytes()


@pytest.mark.parametrize("keep", [0.5, 0.999, 30, 0])
def test_truncated_real_shard_names_the_shard(tmp_path, real_shard_bytes, keep):
    from normkd_plugin.data import DataError, load_cifar100

    shard = tmp_path / "test-0-of-1.npz"
    shard.write_bytes(real_shard_bytes[: int(len(real_shard_bytes) * keep) if keep < 1 else keep])
    with pytest.raises(DataError, match=rf"^{re.escape(str(shard))}: unreadable npz shard, truncated or corrupt \("):
        load_cifar100(tmp_path, train=False)


# Byte offsets in the real shard: deflate stream start, the .npy header, mid-images (zip CRC).
@pytest.mark.parametrize("offset", [100, 200, 14_000_000])
def test_bit_flipped_real_shard_names_the_shard(tmp_path, real_shard_bytes, offset):
    from normkd_plugin.data import DataError, load_cifar100

    data = bytearray(real_shard_bytes)
    data[offset] ^= 0xFF
    shard = tmp_path / "test-0-of-1.npz"
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"^{re.escape(str(shard))}: unreadable npz shard, truncated or corrupt \("):
        load_cifar100(tmp_path, train=False)


def test_seeded_loaders_repeat_their_order(tmp_path, cifar_test_arrays):
    from normkd_plugin.data import get_dataset, seed_everything

    root = _write_python_layout(tmp_path, *cifar_test_arrays)
    firsts = []
    for _ in range(2):
        seed_everything(3)
        train, *_ = get_dataset(_cfg(root, **{"EXPERIMENT.SEED": 3}))
        firsts.append(next(iter(train)))
    assert torch.equal(firsts[0][2], firsts[1][2]) and torch.equal(firsts[0][0], firsts[1][0])


def test_imagenet_folder_root(tmp_path, cifar_test_arrays):
    from PIL import Image

    from normkd_plugin.config import load_config
    from normkd_plugin.data import DataError, get_dataset

    images, _ = cifar_test_arrays
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(images[i]).resize((64, 64)).save(tmp_path / split / cls / f"{i}.png")
    opts = [
        "DATASET.ROOT",
        str(tmp_path),
        "DATASET.NUM_WORKERS",
        "0",
        "SOLVER.BATCH_SIZE",
        "2",
        "DATASET.TEST.BATCH_SIZE",
        "2",
    ]
    train, val, num_data, num_classes = get_dataset(load_config("imagenet/r34_r18/normkd", opts))
    assert (num_data, num_classes) == (4, 1000)
    image, target, index = next(iter(train))
    assert image.shape == (2, 3, 224, 224) and index.shape == (2,)
    assert next(iter(val))[0].shape == (2, 3, 224, 224)
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(DataError, match=r"has no val/ folder"):
        get_dataset(load_config("imagenet/r34_r18/normkd", opts))


def test_empty_root_offline_is_one_error_naming_the_key(monkeypatch, tmp_path):
    """Without DATASET.ROOT the host's loader downloads; its network error becomes one line naming DATASET.ROOT,
    and the data folder the host made for the download is not left in its checkout."""
    import urllib.error

    import mdistiller.dataset

    from normkd_plugin import data
    from normkd_plugin.config import load_config
    from normkd_plugin.data import DataError, get_dataset

    folder = tmp_path / "checkout" / "data"

    def offline(cfg):
        folder.mkdir(parents=True)  # as the host's get_data_folder does, then a partial download
        (folder / "cifar-100-python.tar.gz").write_bytes(b"partial")
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(mdistiller.dataset, "get_dataset", offline)
    monkeypatch.setattr(data, "host_data_folder", lambda: str(folder))
    cfg = load_config("cifar100/kd/res56_res20", [])
    with pytest.raises(
        DataError, match=r"DATASET.ROOT is empty, so mdistiller's own loader .* Name or service not known"
    ):
        get_dataset(cfg)
    assert not folder.exists()
    folder.mkdir(parents=True)  # a data folder that was there before is the user's: kept
    monkeypatch.setattr(mdistiller.dataset, "get_dataset", lambda cfg: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(DataError):
        get_dataset(cfg)
    assert folder.is_dir()


def test_the_host_data_folder_is_in_its_checkout():
    import mdistiller

    from normkd_plugin.data import host_data_folder

    assert host_data_folder() == os.path.join(os.path.dirname(os.path.dirname(mdistiller.__file__)), "data")


def test_position_seed_is_a_fixed_hash_of_the_position():
    """Pinned values: a run resumed by another version of the plugin must draw what it drew before."""
    from normkd_plugin.data import position_seed

    assert position_seed(3, 1, 0) == 7204337006902755625
    assert position_seed(3, 2, 0) == 4848192325418067472
    seeds = {position_seed(s, e, i) for s in (0, 1) for e in range(1, 30) for i in range(300)}
    assert len(seeds) == 2 * 29 * 300 and all(0 <= s < 2**63 for s in seeds)
    assert len({position_seed(1, 2, 3), position_seed(1, 3, 2), position_seed(1, 2, 3, 0)}) == 3


def test_seeded_samples_draw_the_hosts_augmentation_from_the_key_alone(cifar_test_arrays):
    """The host's random crop and flip, drawn from torch's generator seeded with position_seed(seed, epoch, index),
    whatever the global RNGs held before; those are left as they were."""
    import random

    from mdistiller.dataset.cifar100 import get_cifar100_train_transform
    from PIL import Image

    from normkd_plugin.data import CIFAR100Arrays, SeededSamples, position_seed

    images, labels = cifar_test_arrays
    transform = get_cifar100_train_transform()
    samples = SeededSamples(CIFAR100Arrays(images[:8], labels[:8], transform=transform))
    assert len(samples) == 8
    for epoch in (1, 2):
        for index in range(8):
            torch.manual_seed(index)
            random.seed(index)
            np.random.seed(index)
            before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
            image, target, got_index = samples[(index, 5, epoch)]
            assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
            assert np.array_equal(np.random.get_state()[1], before[2])
            torch.manual_seed(position_seed(5, epoch, index))
            assert torch.equal(image, transform(Image.fromarray(images[index])))
            assert (target, got_index) == (int(labels[index]), index)
    # the key decides: another epoch or seed crops and flips some of the 8 images differently
    first = torch.stack([samples[(i, 5, 1)][0] for i in range(8)])
    for seed, epoch in ((5, 2), (6, 1)):
        assert not torch.equal(first, torch.stack([samples[(i, seed, epoch)][0] for i in range(8)]))
    # in a loader worker (restore=False) the same images, the global RNG left as the sample seeded it
    unrestored = SeededSamples(samples.dataset, restore=False)
    torch.manual_seed(123)
    assert torch.equal(first, torch.stack([unrestored[(i, 5, 1)][0] for i in range(8)]))
    assert not torch.equal(torch.get_rng_state(), torch.manual_seed(123).get_state())


@pytest.mark.parametrize("layout", ["npz", "pickle"])
def test_float_labels_are_refused_not_cast(tmp_path, layout):
    from normkd_plugin.data import DataError, load_cifar100

    images, labels = np.zeros((4, 32, 32, 3), np.uint8), np.array([0.0, 1.5, 2.0, 3.7])
    if layout == "npz":
        np.savez(tmp_path / "train-0-of-1.npz", images=images, labels=labels)
    else:
        (tmp_path / "train").write_bytes(
            pickle.dumps({"data": images.reshape(4, 3072), "fine_labels": labels.tolist()})
        )
    with pytest.raises(DataError, match=r"labels must be integers 0-99, got dtype float64 \(e\.g\. 0\.0\)"):
        load_cifar100(tmp_path, True)


@pytest.mark.parametrize("split", ["train", "test"])
def test_an_empty_split_is_refused_before_training(tmp_path, split):
    from normkd_plugin.data import DataError, get_dataset

    for name, n in (("train", 4), ("test", 4)):
        n = 0 if name == split else n
        np.savez(
            tmp_path / f"{name}-0-of-1.npz", images=np.zeros((n, 32, 32, 3), np.uint8), labels=np.zeros(n, np.int64)
        )
    with pytest.raises(DataError, match=rf"{split}-\*-of-1\.npz: the {split} split is empty \(0 images\)"):
        get_dataset(_cfg(tmp_path))
