"""CIFAR augmentation on tensors, batched, reproducing the host's torchvision pipeline.

The host trains with ``RandomCrop(32, padding=4)`` (zero padding of the uint8 image),
``RandomHorizontalFlip()``, ``ToTensor()`` and ``Normalize(mean, std)``. :func:`host_pipeline`
reads those parameters from the host's own transform object; :class:`TensorCifar` applies the
same operations to a whole epoch at once on the data's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchvision import transforms as T

__all__ = ["Pipeline", "host_pipeline", "TensorCifar"]


@dataclass(frozen=True)
class Pipeline:
    """The parameters of a crop/flip/normalise pipeline."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad: int = 0
    flip_p: float = 0.0


def host_pipeline(transform) -> Pipeline:
    """Read pad, flip probability, mean and std from a torchvision Compose like the host's."""
    steps = transform.transforms if isinstance(transform, T.Compose) else [transform]
    pad, flip_p, mean, std = 0, 0.0, None, None
    for step in steps:
        if isinstance(step, T.RandomCrop):
            if step.size != (32, 32) or step.fill != 0 or step.padding_mode != "constant":
                raise ValueError(f"fast trainer supports RandomCrop(32, padding=p) only, got {step}")
            pad = step.padding if isinstance(step.padding, int) else step.padding[0]
        elif isinstance(step, T.RandomHorizontalFlip):
            flip_p = float(step.p)
        elif isinstance(step, T.Normalize):
            mean, std = tuple(step.mean), tuple(step.std)
        elif not isinstance(step, T.ToTensor):
            raise ValueError(f"fast trainer cannot reproduce the transform step {step!r} on tensors")
    if mean is None:
        raise ValueError(f"no Normalize step in {transform!r}")
    return Pipeline(mean, std, pad, flip_p)


class TensorCifar:
    """A CIFAR split held as uint8 (N, 3, 32, 32) on ``device``, augmented in whole batches."""

    def __init__(self, images_nhwc: np.ndarray, targets, pipeline: Pipeline, device: torch.device):
        images = torch.as_tensor(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2)
        p = pipeline.pad
        # Padding the uint8 image with 0 is what RandomCrop does before ToTensor/Normalize.
        self.images = torch.nn.functional.pad(images, (p, p, p, p)).contiguous().to(device)
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=device)
        self.pipeline = pipeline
        self.device = device
        self.mean = torch.tensor(pipeline.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(pipeline.std, device=device).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return self.targets.shape[0]

    def normalize(self, images_uint8: Tensor) -> Tensor:
        """(x / 255 - mean) / std, as ToTensor then Normalize compute it."""
        return (images_uint8.float().div_(255) - self.mean) / self.std

    def crop_flip(self, index: Tensor) -> Tensor:
        """Uint8 random 32x32 windows of the padded images ``index``, each flipped with p."""
        n, p = index.shape[0], self.pipeline.pad
        dev = self.device
        dy = torch.randint(0, 2 * p + 1, (n, 1, 1, 1), device=dev)
        dx = torch.randint(0, 2 * p + 1, (n, 1, 1, 1), device=dev)
        ar = torch.arange(32, device=dev)
        rows = dy + ar.view(1, 1, 32, 1)
        cols = dx + ar.view(1, 1, 1, 32)
        if self.pipeline.flip_p > 0:
            flip = torch.rand(n, 1, 1, 1, device=dev) < self.pipeline.flip_p
            cols = torch.where(flip, dx + 31 - ar.view(1, 1, 1, 32), cols)
        chan = torch.arange(3, device=dev).view(1, 3, 1, 1)
        return self.images[index.view(n, 1, 1, 1), chan, rows, cols]

    def epoch(self, count: int | None = None) -> tuple[Tensor, Tensor]:
        """A shuffled, augmented, normalised epoch (first ``count`` images of a fresh permutation)."""
        perm = torch.randperm(len(self), device=self.device)[:count]
        return self.normalize(self.crop_flip(perm)), self.targets[perm]

    def eval_set(self) -> tuple[Tensor, Tensor]:
        """The whole split, centre (unpadded) and normalised, in order."""
        p = self.pipeline.pad
        return self.normalize(self.images[:, :, p : p + 32, p : p + 32]), self.targets
