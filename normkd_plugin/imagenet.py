"""ImageNet input pipeline that decodes JPEGs in batches on the training device (``DATASET.DECODE``).

* ``host`` (default): mdistiller's own loader unchanged (PIL decode and augmentation in workers);
* ``gpu``: loader workers only read the file bytes; ``torchvision.io.decode_jpeg`` decodes each
  batch with nvJPEG on the rank's GPU, and the host's augmentation runs there on uint8 tensors;
* ``cpu``: the same code with the decode and augmentation on the CPU of the training process.

Every trainer first checks the splits' folders (:func:`check_class_folders`): ImageFolder numbers the
classes of each split by their sorted folder names, so a split missing a class would shift the labels
of all the classes after it; and a folder link could loop or count images twice.

The augmentation is the host's, read from its own transform objects
(``get_imagenet_train_transform`` / ``get_imagenet_test_transform``): RandomResizedCrop with its
size, scale, ratio and interpolation, the horizontal flip with its probability, ToTensor's /255
and its Normalize; validation Resize + CenterCrop. Crop parameters and flips are drawn with
torchvision's own algorithm and in its order, from a ``torch.Generator`` instead of the global RNG.
Resizing uses torchvision's tensor kernels (float compute, rounded to uint8), which differ from
PIL's fixed-point kernels by at most one intensity level (1/255 after ToTensor).

torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec; they are still the
batched nvJPEG path, so the deprecation warning is silenced around the decode calls only.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from .config import ConfigError
from .data import DataError

__all__ = [
    "DECODE_CHOICES",
    "HostAugment",
    "JpegFiles",
    "collate_jpeg",
    "decode",
    "DevicePipeline",
    "check_decode",
    "check_class_folders",
]

DECODE_CHOICES = ("host", "cpu", "gpu")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _find(compose: T.Compose, kind: type, what: str):
    found = [t for t in compose.transforms if isinstance(t, kind)]
    if len(found) != 1:
        raise RuntimeError(f"mdistiller's {what} transform has {len(found)} {kind.__name__}; expected one: {compose}")
    return found[0]


@dataclass(frozen=True)
class HostAugment:
    """The parameters of the host's ImageNet train and validation transforms."""

    size: tuple[int, int]
    scale: tuple[float, float]
    ratio: tuple[float, float]
    interpolation: T.InterpolationMode
    antialias: bool
    flip_p: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val_resize: int
    val_crop: tuple[int, int]
    val_interpolation: T.InterpolationMode

    @classmethod
    def from_host(cls, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> HostAugment:
        """Read the parameters from mdistiller's own transform objects."""
        from mdistiller.dataset.imagenet import get_imagenet_test_transform, get_imagenet_train_transform

        train = get_imagenet_train_transform(list(mean), list(std))
        test = get_imagenet_test_transform(list(mean), list(std))
        crop = _find(train, T.RandomResizedCrop, "train")
        flip = _find(train, T.RandomHorizontalFlip, "train")
        norm = _find(train, T.Normalize, "train")
        resize = _find(test, T.Resize, "validation")
        center = _find(test, T.CenterCrop, "validation")
        if _find(test, T.Normalize, "validation").mean != norm.mean or not isinstance(resize.size, int):
            raise RuntimeError(f"mdistiller's validation transform is not Resize(int)+CenterCrop+Normalize: {test}")
        return cls(
            size=tuple(crop.size),
            scale=tuple(crop.scale),
            ratio=tuple(crop.ratio),
            interpolation=crop.interpolation,
            antialias=bool(crop.antialias),
            flip_p=float(flip.p),
            mean=tuple(norm.mean),
            std=tuple(norm.std),
            val_resize=int(resize.size),
            val_crop=tuple(center.size),
            val_interpolation=resize.interpolation,
        )


class JpegFiles(Dataset):
    """``(uint8 tensor of the file's bytes, target, index)`` for each ``(path, target)`` of an ImageFolder."""

    def __init__(self, samples: Sequence[tuple[str, int]]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        path, target = self.samples[index]
        return torch.from_numpy(np.fromfile(path, dtype=np.uint8)), target, index


def collate_jpeg(batch: list[tuple[Tensor, int, int]]) -> tuple[list[Tensor], Tensor, Tensor]:
    """Keep the encoded images as a list; stack targets and indices."""
    data, targets, indices = zip(*batch)
    return list(data), torch.as_tensor(targets, dtype=torch.long), torch.as_tensor(indices, dtype=torch.long)


@contextmanager
def _torchvision_io():
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning
        )
        yield


def _decode_one(data: Tensor, device: torch.device, name: str) -> Tensor:
    with _torchvision_io():
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass  # not a JPEG the decoder takes (PNG, CMYK on nvJPEG, ...): decode it on the CPU
        try:
            return decode_image(data, mode=ImageReadMode.RGB).to(device)
        except RuntimeError as exc:
            raise DataError(f"{name}: cannot be decoded as an image ({exc})") from exc


def decode(data: list[Tensor], device: torch.device, names: Sequence[str] | None = None) -> list[Tensor]:
    """Decode a batch of encoded images to RGB uint8 (3, H, W) tensors on ``device`` in one call."""
    try:
        with _torchvision_io():
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one image of the batch is not a plain JPEG: decode one by one
        names = names or [f"image {k} of the batch" for k in range(len(data))]
        return [_decode_one(d, device, n) for d, n in zip(data, names)]


class DevicePipeline:
    """The host's ImageNet augmentation on decoded uint8 tensors on one device, batched."""

    def __init__(self, augment: HostAugment, device: torch.device, generator: torch.Generator | None = None):
        self.augment = augment
        self.device = torch.device(device)
        self.generator = generator if generator is not None else torch.Generator()
        self._mean = torch.tensor(augment.mean, device=self.device).view(-1, 1, 1)
        self._std = torch.tensor(augment.std, device=self.device).view(-1, 1, 1)

    def crop_params(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) by RandomResizedCrop.get_params' algorithm, drawn from the generator."""
        g, (lo, hi) = self.generator, self.augment.scale
        area = height * width
        log_ratio = torch.log(torch.tensor(self.augment.ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(lo, hi, generator=g).item()
            aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
                left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
                return top, left, h, w
        in_ratio = float(width) / float(height)
        if in_ratio < min(self.augment.ratio):
            w, h = width, int(round(width / min(self.augment.ratio)))
        elif in_ratio > max(self.augment.ratio):
            h, w = height, int(round(height * max(self.augment.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def normalize(self, batch: Tensor) -> Tensor:
        """ToTensor's /255 then Normalize, on a uint8 (N, 3, H, W) batch."""
        return batch.float().div_(255).sub_(self._mean).div_(self._std)

    def train(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int, int, int, bool]]]:
        """RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize; also the (top, left, h, w, flip) used."""
        a, out, params = self.augment, [], []
        for img in images:
            top, left, h, w = self.crop_params(img.shape[-2], img.shape[-1])
            flip = bool(torch.rand(1, generator=self.generator).item() < a.flip_p)
            crop = F.resized_crop(img, top, left, h, w, list(a.size), a.interpolation, antialias=a.antialias)
            out.append(crop.flip(-1) if flip else crop)
            params.append((top, left, h, w, flip))
        return self.normalize(torch.stack(out)), params

    def val(self, images: list[Tensor]) -> Tensor:
        """Resize (shorter side) + CenterCrop + ToTensor + Normalize."""
        a = self.augment
        out = [
            F.center_crop(F.resize(img, a.val_resize, a.val_interpolation, antialias=True), list(a.val_crop))
            for img in images
        ]
        return self.normalize(torch.stack(out))


def check_decode(cfg, device: torch.device) -> str:
    """DATASET.DECODE, checked against the dataset type and the device; ConfigError naming the value."""
    decode_mode = cfg.DATASET.get("DECODE", "host")
    if decode_mode not in DECODE_CHOICES:
        raise ConfigError(f"DATASET.DECODE {decode_mode!r}; choose from {', '.join(DECODE_CHOICES)}")
    if decode_mode != "host" and cfg.DATASET.TYPE != "imagenet":
        raise ConfigError(
            f"DATASET.DECODE {decode_mode!r} is the ImageNet JPEG pipeline; DATASET.TYPE is {cfg.DATASET.TYPE!r}: "
            "use DATASET.DECODE host"
        )
    if decode_mode == "gpu" and device.type != "cuda":
        raise ConfigError(
            f"DATASET.DECODE gpu decodes with nvJPEG on CUDA; --device is {device.type}: use DATASET.DECODE cpu"
        )
    return decode_mode


def _names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit]) or "none"
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _check_links(split) -> None:
    """DataError naming the first folder link on the path of one of ``split``'s images (ImageFolder follows them).

    Every such link loops (it leads to a folder that holds it), leaves the split, or leads to a folder the
    split holds anyway (its images counted twice, under two classes); links to image files are followed.
    """
    root = os.path.normpath(split.root)
    real_root = os.path.realpath(root)
    checked: set[str] = set()
    for folder in sorted({path.rpartition(os.sep)[0] for path, _ in split.samples}):
        parts = os.path.relpath(folder, root).split(os.sep)
        for depth in range(1, len(parts) + 1):
            path = os.path.join(root, *parts[:depth])
            if path in checked:
                continue
            checked.add(path)
            if not os.path.islink(path):
                continue
            target, holder = os.path.realpath(path), os.path.realpath(os.path.dirname(path))
            if holder == target or holder.startswith(target + os.sep):
                why = "a folder that holds it: a loop, whose images would be counted again and again"
            elif not target.startswith(real_root + os.sep):
                why = f"outside the split {root}"
            else:
                why = "inside the split, whose images would be counted twice"
            raise DataError(
                f"{path} is a link to {target}, {why}; the class folders of a split and the folders in them must be "
                "real folders inside it (links to image files are followed)"
            )


def check_class_folders(train_set, val_set) -> None:
    """DataError unless the validation split's classes are the training split's and no folder link in either split
    loops, leaves it or counts images twice; datasets that are not ImageFolders pass."""
    splits = (train_set, val_set)
    if not all(hasattr(ds, "classes") and hasattr(ds, "samples") and hasattr(ds, "root") for ds in splits):
        return
    for split in splits:
        _check_links(split)
    train, val = list(train_set.classes), list(val_set.classes)
    if val != train:
        missing, extra = [c for c in train if c not in val], [c for c in val if c not in train]
        raise DataError(
            f"{val_set.root} does not hold the classes of {train_set.root}: missing {_names(missing)}; extra "
            f"{_names(extra)}. ImageFolder numbers each split's classes by their sorted folder names, so every "
            "split needs the same class folders"
        )
