"""Where a pack's batches come from: the CIFAR split held on the device, or a data loader.

A source hands the pack, for each epoch, the batches of every seed group (runs that share a seed
share them) step by step, each rank its share, and then the validation split in batches:

* :class:`DeviceSplit` (``SOLVER.TRAINER fast``): the CIFAR split as uint8 on the device. Every rank
  draws the whole global epoch from the group's ``torch.Generator`` and trains its contiguous rows
  of each global batch; normalisation runs inside the step (:mod:`.augment`).
* :class:`LoaderSource` (``SOLVER.TRAINER ddp``; ``base`` under torchrun or with
  ``DATASET.DECODE``): the host's dataset through one ``DataLoader``. A seed group's order is a
  ``DistributedSampler`` seeded with the group's seed (``set_epoch`` each epoch): the global batch
  of step k is positions [kB, (k+1)B) of ``randperm(N, seed + epoch)`` (padded to a multiple of
  the world size), and rank r takes its positions r, r + W, ... A sample's random augmentation is
  seeded from (seed, epoch, index) (:class:`~normkd_plugin.data.SeededSamples`); the JPEG
  pipeline's (``DATASET.DECODE gpu|cpu``, :mod:`normkd_plugin.imagenet`) from (seed, epoch, step,
  rank) per batch. So the batches do not depend on the loader's workers, a resumed run draws what
  the uninterrupted run draws, and the global batches are the same for any number of ranks.
  Step k's loader batch holds every seed group's share in turn: each image is read, decoded and
  augmented once per seed group, by one set of workers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .. import distributed, imagenet
from ..config import ConfigError
from ..config_rules import batch_source
from ..data import SeededSamples, position_seed, worker_options
from ..distributed import Ranks
from .augment import TensorCifar, host_pipeline

log = logging.getLogger(__name__)

__all__ = ["Epoch", "DeviceSplit", "LoaderSource", "SeedGroupBatches", "source_kind", "uses_engine", "make_source"]

Batches = tuple[list[Tensor], list[Tensor]]


def source_kind(cfg) -> str | None:
    """Where this engine takes ``cfg``'s batches from, in torchrun's world (``config_rules.batch_source``)."""
    _, world_size, _, _ = distributed.env_world()
    return batch_source(cfg.SOLVER.TRAINER, cfg.DATASET.get("DECODE", "host"), world_size)


def uses_engine(cfg) -> bool:
    """Whether ``cfg`` trains on this plugin's engine (``source_kind`` is not None), not on one of the host's trainers."""
    return source_kind(cfg) is not None


@dataclass(frozen=True)
class Epoch:
    """One epoch of batches: ``batch(k)`` gives step k's (inputs, targets) per seed group and this rank's share of
    the global batch; the first ``full_steps`` have the static shape a CUDA graph replays."""

    steps: int
    full_steps: int
    batch: Callable[[int], tuple[list[Tensor], list[Tensor], float]]


class DeviceSplit:
    """The CIFAR train and validation splits held on the device (``SOLVER.TRAINER fast``)."""

    def __init__(self, train: TensorCifar, val: TensorCifar, batch_size: int, eval_batch_size: int, ranks: Ranks):
        self.train, self.val, self.ranks = train, val, ranks
        self.device = train.device
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self._eval_set: tuple[Tensor, Tensor] | None = None

    def check(self, iters: int) -> None:
        """ConfigError if the epoch's last batch cannot be shared by the ranks."""
        partial = 0 if iters > 0 else len(self.train) % self.batch_size
        if 0 < partial < self.ranks.world:
            raise ConfigError(
                f"the last batch of an epoch ({partial} images: {len(self.train)} % SOLVER.BATCH_SIZE "
                f"{self.batch_size}) cannot be shared by {self.ranks.world} processes; use at most {partial}"
            )

    def steps(self, iters: int) -> int:
        """Steps of an epoch (``iters`` > 0: at most that many)."""
        n = min(iters * self.batch_size, len(self.train)) if iters > 0 else len(self.train)
        return -(-n // self.batch_size)

    def prepare(self, images: Tensor) -> Tensor:
        """Inside the step: ToTensor and Normalize of a uint8 batch."""
        return self.train.normalize(images)

    def epoch(self, seeds: list[tuple[int, torch.Generator]], epoch: int, iters: int) -> Epoch:
        """Each seed group's shuffled, augmented epoch, drawn at once from its generator; rows shared by the ranks."""
        count = iters * self.batch_size if iters > 0 else None
        data = [self.train.epoch(generator, count) for _, generator in seeds]
        n, bs = data[0][1].shape[0], self.batch_size

        def batch(k: int):
            i, j = k * bs, min((k + 1) * bs, n)
            lo, hi = self.ranks.share(i, j)  # the whole batch on one process
            return [x[lo:hi] for x, _ in data], [y[lo:hi] for _, y in data], (hi - lo) / (j - i)

        return Epoch(-(-n // bs), n // bs, batch)

    def close(self) -> None:
        """Nothing to stop: the splits are tensors."""

    def val_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's part of the validation split, normalised (once for the whole job), in eval batches."""
        if self._eval_set is None:
            self._eval_set = self.val.eval_set()
        images, targets = self._eval_set
        lo, hi = self.ranks.share(0, targets.shape[0])
        for i in range(lo, hi, self.eval_batch_size):
            j = min(i + self.eval_batch_size, hi)
            yield images[i:j], targets[i:j]


class SeedGroupBatches(Sampler):
    """Batch sampler: step k's keys ``(index, seed, epoch)`` of this rank, for each seed group in turn.

    Each group's order is the rank's ``DistributedSampler(shuffle=True, seed=seed)`` at ``epoch``, cut into
    batches of ``per_rank`` as a DataLoader with that sampler and batch size cuts it.
    """

    def __init__(self, n: int, per_rank: int, rank: int, world: int):
        self.n, self.per_rank, self.rank, self.world = n, per_rank, rank, world
        self.num_samples = math.ceil(n / world)  # DistributedSampler's, drop_last False
        self.seeds: list[int] = []
        self.epoch = 0
        self.limit = 0

    def set(self, seeds: list[int], epoch: int, limit: int = 0) -> None:
        """Draw the next iteration's batches for ``seeds`` at ``epoch``; ``limit`` > 0: at most that many steps."""
        self.seeds, self.epoch, self.limit = list(seeds), epoch, limit

    def order(self, seed: int) -> list[int]:
        """This rank's sample indices of ``seed``'s epoch, in order."""
        sampler = DistributedSampler(range(self.n), self.world, self.rank, shuffle=True, seed=seed, drop_last=False)
        sampler.set_epoch(self.epoch)
        return list(sampler)

    def steps(self, limit: int = 0) -> int:
        """Steps of an epoch (``limit`` > 0: at most that many)."""
        steps = -(-self.num_samples // self.per_rank)
        return min(steps, limit) if limit > 0 else steps

    def __len__(self) -> int:
        return self.steps(self.limit)

    def last_size(self) -> int:
        """Rows per group in the last step of an epoch."""
        return min(self.per_rank, self.num_samples - (len(self) - 1) * self.per_rank)

    def __iter__(self):
        seed_orders = [(seed, self.order(seed)) for seed in self.seeds]
        for k in range(len(self)):
            lo, hi = k * self.per_rank, (k + 1) * self.per_rank
            yield [(i, seed, self.epoch) for seed, order in seed_orders for i in order[lo:hi]]


class _ByIndex(Dataset):
    """``dataset[index]`` for a key ``(index, seed, epoch)``: the JPEG pipeline seeds per batch, not per sample."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.dataset[key[0]]


class LoaderSource:
    """The host's train and validation datasets through DataLoaders (ImageNet, or any run under torchrun)."""

    def __init__(self, train_set: Dataset, val_set: Dataset, cfg, device: torch.device, ranks: Ranks, workers: int):
        imagenet.check_class_folders(train_set, val_set)  # the same class folders in each split, no folder links
        self.device, self.ranks = device, ranks
        self.decode = imagenet.check_decode(cfg, device)
        self.batch_size = int(cfg.SOLVER.BATCH_SIZE)
        per_rank = self.batch_size // ranks.world
        val_per_rank = max(1, math.ceil(cfg.DATASET.TEST.BATCH_SIZE / ranks.world))
        self.sampler = SeedGroupBatches(len(train_set), per_rank, ranks.rank, ranks.world)
        if len(train_set) % ranks.world and ranks.main:
            log.warning(
                "%d training samples over %d ranks: DistributedSampler repeats %d sample(s) per epoch",
                len(train_set),
                ranks.world,
                ranks.world - len(train_set) % ranks.world,
            )
        # The loader draws its workers' base seeds from this generator, not from the global RNG (samples are
        # seeded from their keys anyway); the JPEG pipeline reseeds it per batch.
        self.generator = torch.Generator().manual_seed(0)
        val_indices = distributed.shard(range(len(val_set)), ranks.rank, ranks.world)
        self.pipeline = None
        options = worker_options(workers)
        if self.decode != "host":
            for what, ds in (("train", train_set), ("val", val_set)):
                if not hasattr(ds, "samples"):
                    raise ConfigError(f"DATASET.DECODE {self.decode!r} needs an ImageFolder {what} set, not {ds!r}")
            where = device if self.decode == "gpu" else torch.device("cpu")
            self.pipeline = imagenet.DevicePipeline(imagenet.HostAugment.from_host(), where, self.generator)
            self._names = [p for p, _ in train_set.samples], [p for p, _ in val_set.samples]
            train = _ByIndex(imagenet.JpegFiles(train_set.samples))
            val_data, collate = imagenet.JpegFiles(val_set.samples), imagenet.collate_jpeg
        else:
            train = SeededSamples(train_set, restore=workers == 0)  # the main process's RNGs stay as they were
            val_data, collate = val_set, None
        pin = device.type == "cuda" and self.pipeline is None
        self.train_loader = DataLoader(
            train,
            batch_sampler=self.sampler,
            num_workers=workers,
            generator=self.generator,
            pin_memory=pin,
            collate_fn=collate,
            **options,
        )
        self.val_loader = DataLoader(
            val_data,
            batch_size=val_per_rank,
            sampler=val_indices,
            num_workers=workers,
            generator=torch.Generator().manual_seed(0),  # as above: the global RNG is not the loader's to draw
            pin_memory=pin,
            collate_fn=collate,
            **options,
        )
        self._seeds: list[int] = []

    def check(self, iters: int) -> None:
        """Nothing to refuse: every rank gets equal shares (DistributedSampler repeats up to W - 1 samples)."""

    def steps(self, iters: int) -> int:
        """Steps of an epoch on each rank (``iters`` > 0: at most that many)."""
        return self.sampler.steps(iters)

    def prepare(self, images: Tensor) -> Tensor:
        """Inside the step: nothing (the loader's batches are normalised already)."""
        return images

    def epoch(self, seeds: list[tuple[int, torch.Generator]], epoch: int, iters: int) -> Epoch:
        """The seed groups' batches of ``epoch``, read by the loader as the steps ask for them."""
        self._seeds = [seed for seed, _ in seeds]
        self.sampler.set(self._seeds, epoch, iters)
        steps, last = len(self.sampler), self.sampler.last_size()
        batches = iter(self.train_loader)
        weight = 1.0 / self.ranks.world  # equal shares on every rank, the last step included

        def batch(k: int):
            xs, ys = self.train_batch(next(batches), epoch, k)
            return xs, ys, weight

        return Epoch(steps, steps if last == self.sampler.per_rank else steps - 1, batch)

    def train_batch(self, data, epoch: int, step: int) -> Batches:
        """A loader batch ``(images, targets, indices)`` as (inputs, targets) per seed group, on the device."""
        groups = len(self._seeds)
        if self.pipeline is None:
            images, targets = data[0], data[1]
            xs = images.to(self.device, non_blocking=True).float().chunk(groups)
            return list(xs), list(targets.to(self.device, non_blocking=True).chunk(groups))
        encoded, targets, indices = data
        decoded = imagenet.decode(encoded, self.pipeline.device, [self._names[0][i] for i in indices.tolist()])
        m = len(encoded) // groups
        xs = []
        for g, seed in enumerate(self._seeds):
            self.generator.manual_seed(position_seed(seed, epoch, step, self.ranks.rank))
            xs.append(self.pipeline.train(decoded[g * m : (g + 1) * m])[0].to(self.device, non_blocking=True))
        return xs, list(targets.to(self.device, non_blocking=True).chunk(groups))

    def close(self) -> None:
        """Stop the loaders' persistent workers now. Left to the garbage collector, a loader in a reference cycle can
        lose its queues before its workers are told to stop, and then waits 5 s for each worker."""
        for loader in (self.train_loader, self.val_loader):
            iterator = getattr(loader, "_iterator", None)  # where DataLoader keeps its persistent workers
            if iterator is not None:
                iterator._shutdown_workers()
                loader._iterator = None

    def val_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's strided share of the validation split, normalised, in DATASET.TEST.BATCH_SIZE batches."""
        for data in self.val_loader:
            if self.pipeline is None:
                image, target = data[0], data[1]
            else:
                encoded, target, indices = data
                names = [self._names[1][i] for i in indices.tolist()]
                image = self.pipeline.val(imagenet.decode(encoded, self.pipeline.device, names))
            yield image.to(self.device, non_blocking=True).float(), target.to(self.device, non_blocking=True)


def _tensor_split(dataset: Dataset, what: str, device: torch.device) -> TensorCifar:
    """A host CIFAR dataset as a device-resident TensorCifar with the dataset's transform."""
    if not hasattr(dataset, "data") or not hasattr(dataset, "targets"):
        raise TypeError(
            f"SOLVER.TRAINER fast needs an in-memory CIFAR-style {what} dataset with .data and "
            f".targets (got {type(dataset).__name__}); use SOLVER.TRAINER base for folder datasets"
        )
    return TensorCifar(dataset.data, dataset.targets, host_pipeline(dataset.transform), device)


def make_source(
    train_set: Dataset, val_set: Dataset, cfg, device: torch.device, ranks: Ranks
) -> DeviceSplit | LoaderSource:
    """Where a pack of ``cfg``'s runs takes its batches (:func:`source_kind`): the host's CIFAR splits held on the
    device (SOLVER.TRAINER fast), or the host's datasets through this engine's loader."""
    if source_kind(cfg) == "loader":
        return LoaderSource(train_set, val_set, cfg, device, ranks, int(cfg.DATASET.NUM_WORKERS))
    train, val = _tensor_split(train_set, "train", device), _tensor_split(val_set, "validation", device)
    return DeviceSplit(train, val, int(cfg.SOLVER.BATCH_SIZE), int(cfg.SOLVER.FAST.EVAL_BATCH_SIZE), ranks)
