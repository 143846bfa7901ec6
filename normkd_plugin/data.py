"""Offline datasets: CIFAR-100 from a local folder (npz shards or cifar-100-python), ImageNet folders.

Only the source of the pixels changes: augmentation, normalisation, loaders and the batch
structure (``(image, target, index)`` for training, ``(image, target)`` for validation) are the
host's own. A missing or malformed dataset raises :class:`DataError` naming the path and the
expected layout; nothing is ever downloaded from a configured root. Nothing in a data file runs: the
cifar-100-python pickles are read by :mod:`safe_pickle` (data and numeric arrays only), npz shards with
``allow_pickle=False``.

npz-shard layout (one folder)::

    train-0-of-5.npz ... train-4-of-5.npz   test-0-of-1.npz
    each: images uint8 (N, 32, 32, 3) HWC RGB, labels int64 (N,) fine labels 0-99,
          index int64 (N,) position in the official split (optional)
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import random
import re
import shutil
import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import safe_pickle
from .errors import UserError

__all__ = [
    "DataError",
    "CIFAR100Arrays",
    "load_cifar100",
    "get_dataset",
    "seed_everything",
    "seed_run",
    "seed_worker",
    "worker_options",
    "position_seed",
    "SeededSamples",
]

CIFAR_LAYOUTS = (
    "npz shards: <root>/train-K-of-M.npz and <root>/test-K-of-M.npz with arrays images uint8 "
    "(N,32,32,3) and labels int64 (N,); or torchvision's layout: <root>/cifar-100-python/{train,test} "
    "(or <root>/{train,test}) pickles with b'data' (N,3072) and b'fine_labels'"
)
_SHARD = re.compile(r"^(train|test)-(\d+)-of-(\d+)\.npz$")
# What numpy's npz reader raises on a truncated or damaged file (zip structure, CRC, deflate, .npy header).
_UNREADABLE = (OSError, EOFError, ValueError, SyntaxError, zipfile.BadZipFile, zlib.error, tokenize.TokenError)


class DataError(UserError, RuntimeError):
    """A dataset root that is missing or not in a supported layout."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_run(cfg, device: torch.device) -> None:
    """EXPERIMENT.SEED >= 0 seeds everything and turns cuDNN autotuning off (on CUDA); < 0 lets it tune."""
    if cfg.EXPERIMENT.SEED >= 0:
        seed_everything(cfg.EXPERIMENT.SEED)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.EXPERIMENT.SEED < 0


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive NumPy's and Python's seeds from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def position_seed(*position: int) -> int:
    """A seed in [0, 2**63) that is a fixed hash of the integers ``position`` (any process, any platform)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in position)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededSamples(Dataset):
    """``dataset[index]`` for a key ``(index, seed, epoch)``, with Python's, NumPy's and torch's global RNGs seeded
    from ``position_seed(seed, epoch, index)`` while it is made; with ``restore`` the caller's RNG states are
    left as they were (a loader worker's RNGs are its own: there ``restore=False`` saves ~60 µs a sample).

    A sample's random augmentation is then a function of its key alone: the same for any number of
    loader workers or ranks, and after a resume.
    """

    def __init__(self, dataset: Dataset, restore: bool = True):
        self.dataset = dataset
        self.restore = restore

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]):
        index, seed, epoch = key
        s = position_seed(seed, epoch, index)
        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if self.restore else None
        try:
            random.seed(s)
            np.random.seed([s & 0xFFFFFFFF, s >> 32])  # all 63 bits (a single seed takes 32)
            torch.default_generator.manual_seed(s)  # the CPU's only: CUDA streams are not the caller's to lose
            return self.dataset[index]
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


class CIFAR100Arrays(Dataset):
    """CIFAR-100 held as arrays, returning what the host's datasets return.

    ``data`` (N, 32, 32, 3) uint8 and ``targets`` (list of int) mirror torchvision's CIFAR100;
    training items are ``(image, target, index)`` like the host's ``CIFAR100Instance``.
    """

    def __init__(self, data: np.ndarray, targets, transform=None, with_index: bool = True):
        self.data = data
        self.targets = [int(t) for t in targets]
        self.transform = transform
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.with_index:
            return img, self.targets[index], index
        return img, self.targets[index]


def _check_arrays(images: np.ndarray, labels: np.ndarray, source: Path) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DataError(f"{source}: images must be uint8 (N,32,32,3), got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise DataError(f"{source}: {labels.shape[0] if labels.ndim else 0} labels for {images.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 99):
        raise DataError(f"{source}: labels must be fine labels 0-99, found {labels.min()}..{labels.max()}")


def _integer_labels(labels: np.ndarray, source: Path) -> np.ndarray:
    """``labels`` as int64; DataError for labels that are not integers (floats are never silently cut)."""
    if labels.size and (labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(
            f"{source}: labels must be integers 0-99, got dtype {labels.dtype} (e.g. {labels.flat[0].item()!r})"
        )
    return labels.astype(np.int64)


def _load_shards(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for f in files:
        try:
            # our handle: np.load leaks its own on a bad zip
            with open(f, "rb") as fh, np.load(fh, allow_pickle=False) as z:
                missing = [k for k in ("images", "labels") if k not in z.files]
                if missing:
                    raise DataError(f"{f}: missing array(s) {missing}; expected 'images' and 'labels'")
                img, lab = z["images"], _integer_labels(z["labels"], f)
        except _UNREADABLE as exc:
            lines = str(exc).strip().splitlines()
            why = f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"
            raise DataError(f"{f}: unreadable npz shard, truncated or corrupt ({why}); copy it again") from exc
        _check_arrays(img, lab, f)
        images.append(img)
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def _npz_split(root: Path, split: str) -> list[Path] | None:
    shards = sorted(
        (int(m.group(2)), int(m.group(3)), p) for p in root.glob(f"{split}-*-of-*.npz") if (m := _SHARD.match(p.name))
    )
    if not shards:
        return None
    total = shards[0][1]
    if sorted(k for k, _, _ in shards) != list(range(total)) or any(m != total for _, m, _ in shards):
        have = ", ".join(p.name for _, _, p in shards)
        raise DataError(f"{root}: incomplete {split} shards (need {split}-0..{total - 1}-of-{total}.npz, have {have})")
    return [p for _, _, p in shards]


def _load_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = safe_pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = _integer_labels(np.asarray(entry["fine_labels"]), path)
    except safe_pickle.Refused as exc:
        raise DataError(
            f"{path}: refused to unpickle it: it names {exc.name}, and a cifar-100-python pickle holds only a dict "
            "of strings, lists and numpy arrays (nothing in the file was run)"
        ) from None
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, MemoryError) as exc:
        raise DataError(f"{path}: not a cifar-100-python pickle with 'data' and 'fine_labels' ({exc})") from exc
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be (N, 3072), got {data.shape}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    _check_arrays(images, labels, path)
    return images, labels


def load_cifar100(root: str | Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N,32,32,3), labels int64 (N,)) of one split from either local layout."""
    root = Path(root).expanduser()
    split = "train" if train else "test"
    if not root.is_dir():
        raise DataError(f"DATASET.ROOT {root} is not a directory; expected {CIFAR_LAYOUTS}")
    shards = _npz_split(root, split)
    found = None
    if shards:
        found, source = _load_shards(shards), f"{root}/{split}-*-of-{len(shards)}.npz"
    else:
        for folder in (root / "cifar-100-python", root):
            if (folder / split).is_file():
                found, source = _load_pickle(folder / split), folder / split
                break
    if found is not None:
        if found[1].shape[0] == 0:
            raise DataError(f"{source}: the {split} split is empty (0 images); expected {CIFAR_LAYOUTS}")
        return found
    raise DataError(f"DATASET.ROOT {root} holds no CIFAR-100 {split} split; expected {CIFAR_LAYOUTS}")


# What the forkserver imports once, so that each worker it forks starts with them (not in ~2 s each).
WORKER_PRELOAD = ["__main__", "torch", "mdistiller.dataset.cifar100", "normkd_plugin.data", "normkd_plugin.imagenet"]


def worker_options(num_workers: int) -> dict:
    """DataLoader options for loaders made once threads or a process group exist: workers come from a
    forkserver (a plain fork can copy a lock another thread holds, and the worker hangs) and persist."""
    if num_workers <= 0:
        return {}
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)  # read when this process's forkserver first starts
    return {"multiprocessing_context": context, "persistent_workers": True}


def _loader(dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int) -> DataLoader:
    generator = None
    if seed >= 0:
        generator = torch.Generator()
        generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        worker_init_fn=seed_worker,
        generator=generator,
    )


def _cifar100_loaders(cfg):
    from mdistiller.dataset.cifar100 import get_cifar100_test_transform, get_cifar100_train_transform

    root = cfg.DATASET.ROOT
    train = CIFAR100Arrays(*load_cifar100(root, True), transform=get_cifar100_train_transform())
    test = CIFAR100Arrays(*load_cifar100(root, False), transform=get_cifar100_test_transform(), with_index=False)
    seed = cfg.EXPERIMENT.SEED
    train_loader = _loader(train, cfg.SOLVER.BATCH_SIZE, True, cfg.DATASET.NUM_WORKERS, seed)
    val_loader = _loader(test, cfg.DATASET.TEST.BATCH_SIZE, False, 1, seed)
    return train_loader, val_loader, len(train), 100


def _imagenet_loaders(cfg):
    from mdistiller.dataset.imagenet import ImageNet, get_imagenet_test_transform, get_imagenet_train_transform
    from torchvision.datasets import ImageFolder

    root = Path(cfg.DATASET.ROOT).expanduser()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(
                f"DATASET.ROOT {root} has no {split}/ folder; expected ImageFolder roots {root}/train and {root}/val"
            )
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    train = ImageNet(str(root / "train"), transform=get_imagenet_train_transform(mean, std))
    test = ImageFolder(str(root / "val"), transform=get_imagenet_test_transform(mean, std))
    seed = cfg.EXPERIMENT.SEED
    train_loader = _loader(train, cfg.SOLVER.BATCH_SIZE, True, cfg.DATASET.NUM_WORKERS, seed)
    val_loader = _loader(test, cfg.DATASET.TEST.BATCH_SIZE, False, cfg.DATASET.NUM_WORKERS, seed)
    return train_loader, val_loader, len(train), 1000


def host_data_folder() -> str:
    """The host's data folder (``<checkout>/data``), where its loaders download CIFAR-100; not created here."""
    import mdistiller.dataset.cifar100 as host

    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(host.__file__)), "../../data"))


def get_dataset(cfg):
    """(train_loader, val_loader, num_data, num_classes) like the host's ``get_dataset``.

    With ``DATASET.ROOT`` set, the data comes from that folder; without it, the host's own
    function runs unchanged (its ``./data`` folder and torchvision download).
    """
    if not cfg.DATASET.ROOT:
        from mdistiller.dataset import get_dataset as host_get_dataset

        folder = host_data_folder()
        existed = os.path.isdir(folder)
        try:
            return host_get_dataset(cfg)
        except (OSError, RuntimeError) as exc:  # no network (URLError is an OSError), a damaged download
            if not existed:  # the host made it for this download: nothing of it is left in the checkout
                shutil.rmtree(folder, ignore_errors=True)
            raise DataError(
                f"DATASET.ROOT is empty, so mdistiller's own loader read (or tried to download) "
                f"{cfg.DATASET.TYPE} into its data folder and failed: {exc}. Offline, set DATASET.ROOT to a folder "
                f"holding the data ({CIFAR_LAYOUTS} for cifar100)"
            ) from None
    if cfg.DISTILLER.TYPE == "CRD":
        raise DataError("DATASET.ROOT is not supported with DISTILLER.TYPE CRD (its sampler reads the host's ./data)")
    if cfg.DATASET.TYPE == "cifar100":
        return _cifar100_loaders(cfg)
    if cfg.DATASET.TYPE == "imagenet":
        return _imagenet_loaders(cfg)
    raise DataError(f"DATASET.TYPE {cfg.DATASET.TYPE!r} has no offline loader; use cifar100 or imagenet")
