"""ImageNet input throughput: mdistiller's PIL loader against the batched-decode tensor pipeline.

    python benchmarks/imagenet_loader.py [--images 2048] [--workers 4,8,16] [--root FOLDER] [--out table.md]

Without ``--root`` it writes a temporary ImageFolder (kept in ``--keep DIR`` if given) of real-image JPEGs of ImageNet-like size:
real CIFAR-100 test images (``$NORMKD_DATA/cifar100/test-0-of-1.npz``, default
``../shared/data``) upscaled with PIL (bicubic) to random 256-500 px sides, JPEG quality 90, in
10 classes; with ``--root`` it reads ``ROOT/train`` and ``ROOT/val`` (e.g. the real ImageNet).

Measured, for each worker count, in images per second after the first batch (worker start-up
excluded), including the copy of each batch to the device:

* ``host``: mdistiller's ``ImageNet`` dataset with its train (or test) transform in a DataLoader;
* ``tensor``: loader workers read bytes only; ``decode_jpeg`` on the device (nvJPEG on CUDA, the
  CPU otherwise) and the host's augmentation on tensors (:mod:`normkd_plugin.imagenet`).

It prints a markdown table naming the CPU model, its core count and the GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler, Sampler

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NORMKD_DATA", REPO.parent / "shared" / "data"))
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's answer elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def make_folder(root: Path, n: int, seed: int = 0, sides: tuple[int, int] = (256, 500)) -> tuple[int, float]:
    """root/{train,val}/cNN/*.JPEG from real CIFAR-100 images upscaled to random ``sides`` (256-500 px); (count,
    mean megapixels)."""
    npz = DATA / "cifar100" / "test-0-of-1.npz"
    if not npz.is_file():
        sys.exit(f"imagenet_loader: {npz} not found; set NORMKD_DATA to the shared data folder or pass --root")
    with np.load(npz) as z:
        images = z["images"]
    rng = np.random.default_rng(seed)
    pixels = 0
    for split, count in (("train", n), ("val", max(n // 4, 1))):
        for i in range(count):
            folder = root / split / f"c{i % 10:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            w, h = (int(v) for v in rng.integers(sides[0], sides[1] + 1, size=2))
            pixels += w * h
            Image.fromarray(images[i % len(images)]).resize((w, h), Image.BICUBIC).save(
                folder / f"{split}_{i:06d}.JPEG", "JPEG", quality=90
            )
    return n, pixels / (n + max(n // 4, 1)) / 1e6


def _time(batches, consume, device: torch.device) -> float:
    """Images per second of ``consume`` over ``batches``, from the end of the first batch."""
    seen, start = 0, None
    for batch in batches:
        n = consume(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if start is None:
            start = time.perf_counter()
            continue
        seen += n
    return seen / (time.perf_counter() - start) if start and seen else float("nan")


def host_rate(root: Path, split: str, batch: int, workers: int, device: torch.device) -> float:
    """mdistiller's PIL pipeline: decode and augmentation in the loader workers."""
    from mdistiller.dataset.imagenet import ImageNet, get_imagenet_test_transform, get_imagenet_train_transform

    tf = (get_imagenet_train_transform if split == "train" else get_imagenet_test_transform)(MEAN, STD)
    ds = ImageNet(str(root / split), transform=tf)
    loader = DataLoader(
        ds, batch_size=batch, shuffle=split == "train", num_workers=workers, pin_memory=device.type == "cuda"
    )

    def consume(data) -> int:
        data[0].to(device, non_blocking=True)
        return data[0].shape[0]

    return _time(loader, consume, device)


def jpeg_loader(
    samples: Sequence[tuple[str, int]], batch_size: int, sampler: Sampler | Sequence[int], num_workers: int
) -> DataLoader:
    """A DataLoader whose workers only read file bytes, in the order of ``sampler``."""
    from normkd_plugin.data import worker_options
    from normkd_plugin.imagenet import JpegFiles, collate_jpeg

    return DataLoader(
        JpegFiles(samples),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_jpeg,
        **worker_options(num_workers),
    )


def tensor_rate(root: Path, split: str, batch: int, workers: int, device: torch.device) -> float:
    """Byte-reading workers, batched decode and the host's augmentation on ``device``."""
    from torchvision.datasets import ImageFolder

    from normkd_plugin.imagenet import DevicePipeline, HostAugment, decode

    samples = ImageFolder(str(root / split)).samples
    sampler = RandomSampler(samples) if split == "train" else list(range(len(samples)))
    pipeline = DevicePipeline(HostAugment.from_host(MEAN, STD), device, torch.Generator().manual_seed(0))
    loader = jpeg_loader(samples, batch, sampler, workers)

    def consume(data) -> int:
        images = decode(data[0], device)
        out = pipeline.train(images)[0] if split == "train" else pipeline.val(images)
        return out.shape[0]

    return _time(loader, consume, device)


def main(argv: list[str] | None = None) -> str:
    """Build or read the folder, measure, print (and optionally write) the markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2048, help="training images to write (default 2048)")
    p.add_argument("--root", type=Path, help="an existing ImageFolder root with train/ and val/")
    p.add_argument("--keep", type=Path, help="write the generated folder here and keep it (instead of a temporary one)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", default="4,8", help="comma-separated loader worker counts")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cuda or cpu")
    p.add_argument("--splits", default="train,val")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    workers = [int(w) for w in args.workers.split(",")]
    splits = args.splits.split(",")

    with tempfile.TemporaryDirectory(prefix="imagenet_loader_") as tmp:
        root = args.root
        if root is None:
            root = args.keep or Path(tmp)
            count, mpix = make_folder(root, args.images)
            source = f"{count} CIFAR-100 test images upscaled to 256-500 px (mean {mpix:.3f} MP), JPEG q90"
        else:
            source = f"ImageFolder {root}"
        rows = []
        for split in splits:
            for w in workers:
                host = host_rate(root, split, args.batch_size, w, device)
                mine = tensor_rate(root, split, args.batch_size, w, device)
                rows.append((split, w, host, mine))
                print(f"{split} workers={w}: host {host:.0f} img/s, tensor {mine:.0f} img/s", file=sys.stderr)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    decode_where = "nvJPEG on the GPU" if device.type == "cuda" else "the CPU (main process)"
    lines = [
        f"CPU: {cpu_model()}, {cores} cores usable; GPU: {gpu}; torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}",
        f"Data: {source}; batch {args.batch_size}; tensor pipeline decodes on {decode_where}.",
        "",
        "| split | loader workers | host PIL loader (img/s) | tensor pipeline (img/s) | speed-up |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {s} | {w} | {h:.0f} | {m:.0f} | {m / h:.2f}x |" for s, w, h, m in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)
    return table


if __name__ == "__main__":
    main()
