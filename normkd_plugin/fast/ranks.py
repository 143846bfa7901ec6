"""This process's place among the torchrun processes training a pack (rank 0 of 1 without torchrun).

Every rank holds the whole split and draws the same global epoch from the runs' generators; rank r
trains rows [r·n/W, (r+1)·n/W) of each global batch of n. After backward, each run's gradients are
weighted by the rank's share of the batch and summed over the ranks (the gradient of the global
batch mean); BatchNorm buffers then follow rank 0, as they do under mdistiller's DataParallel (the
replica on the first device keeps its updates) and under DDP's ``broadcast_buffers``. Full batches
split evenly (SOLVER.BATCH_SIZE is a multiple of W); where the epoch's last batch does not, this
share weighting keeps the global mean, while DataParallel would average its unequal chunks' means. All of it is
torch.distributed's own collectives (NCCL on CUDA, gloo on CPU), capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .. import dist as job

__all__ = ["Ranks"]


def _flat_apply(tensors: list[Tensor], op) -> None:
    """Apply the in-place collective ``op`` to ``tensors`` as one flat buffer per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        op(flat)
        torch._foreach_copy_(group, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in group]), group)])


class Ranks:
    """The rank and world size of this process, and the few collectives a pack needs."""

    def __init__(self) -> None:
        self.rank, self.world = job.rank(), job.world()
        self.main = self.rank == 0

    def share(self, start: int, stop: int) -> tuple[int, int]:
        """This rank's rows of the global batch [start, stop): contiguous, sizes differing by at most one."""
        n = stop - start
        return start + n * self.rank // self.world, start + n * (self.rank + 1) // self.world

    def reduce_grads(self, params: list[Tensor], weight: float) -> None:
        """grad <- sum over ranks of weight_r · grad_r (weight_r = this rank's share of the global batch)."""
        grads = [p.grad for p in params if p.grad is not None]
        if weight != 1.0:
            torch._foreach_mul_(grads, weight)
        _flat_apply(grads, dist.all_reduce)

    def follow_rank0(self, tensors: list[Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's values."""
        _flat_apply(tensors, lambda t: dist.broadcast(t, src=0))

    def sum_(self, tensor: Tensor) -> Tensor:
        """In-place sum over the ranks (no-op on one rank)."""
        return job.all_reduce_sum(tensor)

    def first_(self, steps: Tensor) -> Tensor:
        """In-place minimum over the ranks of step numbers where -1 means none."""
        if self.world > 1:
            big = torch.iinfo(steps.dtype).max
            steps.copy_(torch.where(steps < 0, big, steps))
            dist.all_reduce(steps, op=dist.ReduceOp.MIN)
            steps.copy_(torch.where(steps == big, -1, steps))
        return steps

    def wait_for_all(self, device: torch.device) -> None:
        """Return once every rank has called this: a sum of one zero over the ranks (no-op on one rank)."""
        self.sum_(torch.zeros(1, device=device))

    def same_int(self, value: int, device: torch.device) -> int:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=device)
        dist.broadcast(t, src=0)
        return int(t.item())
