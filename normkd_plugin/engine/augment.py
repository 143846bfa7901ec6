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

__all__ = ["Pipeline", "Draw", "host_pipeline", "TensorCifar"]


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


@dataclass(frozen=True)
class Draw:
    """The random choices of one epoch: order, crop offsets (0..2*pad) and flips, one per image."""

    index: Tensor
    dy: Tensor
    dx: Tensor
    flip: Tensor


class TensorCifar:
    """A CIFAR split held as uint8 (N, 3, 32, 32) on ``device``, augmented in whole batches.

    Every random choice comes from the ``torch.Generator`` passed in, so a run's data order and
    augmentation depend on its own generator only (what makes packed == solo and resume exact).
    """

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
        """(x / 255 - mean) / std, the operations of ToTensor then Normalize."""
        return (images_uint8.float().div(255) - self.mean) / self.std

    def draw(self, generator: torch.Generator, count: int | None = None) -> Draw:
        """A fresh permutation (first ``count`` of it), then offsets and flips for those images."""
        dev, p = self.device, self.pipeline.pad
        index = torch.randperm(len(self), device=dev, generator=generator)[:count]
        n = index.shape[0]
        dy = torch.randint(0, 2 * p + 1, (n,), device=dev, generator=generator)
        dx = torch.randint(0, 2 * p + 1, (n,), device=dev, generator=generator)
        flip = torch.rand(n, device=dev, generator=generator) < self.pipeline.flip_p
        return Draw(index, dy, dx, flip)

    def crop_flip(self, draw: Draw) -> Tensor:
        """Uint8 32x32 windows at (dy, dx) of the padded images ``draw.index``, mirrored where ``flip``."""
        n, dev = draw.index.shape[0], self.device
        ar = torch.arange(32, device=dev)
        rows = draw.dy.view(n, 1, 1, 1) + ar.view(1, 1, 32, 1)
        cols = draw.dx.view(n, 1, 1, 1) + ar.view(1, 1, 1, 32)
        cols = torch.where(draw.flip.view(n, 1, 1, 1), draw.dx.view(n, 1, 1, 1) + 31 - ar.view(1, 1, 1, 32), cols)
        chan = torch.arange(3, device=dev).view(1, 3, 1, 1)
        return self.images[draw.index.view(n, 1, 1, 1), chan, rows, cols]

    def epoch(self, generator: torch.Generator, count: int | None = None) -> tuple[Tensor, Tensor]:
        """(uint8 augmented images, targets) of a shuffled epoch drawn from ``generator``."""
        draw = self.draw(generator, count)
        return self.crop_flip(draw), self.targets[draw.index]

    def eval_set(self) -> tuple[Tensor, Tensor]:
        """The whole split, centre (unpadded) and normalised, in order."""
        p = self.pipeline.pad
        return self.normalize(self.images[:, :, p : p + 32, p : p + 32]), self.targets
