"""torchrun and the ranks of a job: the process group from the environment, rank-0 decisions, and the few
collectives a pack needs.

Everything here is PyTorch's own machinery (``torch.distributed`` with NCCL on CUDA, gloo on CPU, ``env://``
rendezvous as set up by ``torchrun``); outside torchrun every helper is a no-op for a world of one process.

How a pack trains on W ranks (:class:`Ranks`): every rank holds the whole split and draws the same global
epoch from the runs' generators; rank r trains rows [r·n/W, (r+1)·n/W) of each global batch of n. After
backward, each run's gradients are weighted by the rank's share of the batch and summed over the ranks (the
gradient of the global batch mean); BatchNorm buffers then follow rank 0, as they do under mdistiller's
DataParallel (the replica on the first device keeps its updates) and under DDP's ``broadcast_buffers``. Full
batches split evenly (SOLVER.BATCH_SIZE is a multiple of W); where the epoch's last batch does not, this share
weighting keeps the global mean, while DataParallel would average its unequal chunks' means. All of it is
torch.distributed's own collectives, capturable in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .config import ConfigError
from .errors import UserError
from .timelimit import Unfinished

__all__ = [
    "under_torchrun",
    "env_world",
    "init_from_env",
    "is_main",
    "rank",
    "world",
    "all_reduce_sum",
    "broadcast_object",
    "from_rank0",
    "shard",
    "check_world",
    "job",
    "Ranks",
]

log = logging.getLogger(__name__)
# A rank that only lost a peer waits this long for torchrun to stop it, so the failing rank is the root cause.
PEER_GRACE_S = 30.0
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted", "Broken pipe")

T = TypeVar("T")
_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """Whether torchrun (or an equivalent launcher) set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT."""
    return all(key in os.environ for key in _TORCHRUN_KEYS)


def _env_int(key: str, default: int) -> int:
    value = os.environ.get(key, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {key}={value!r} is not an integer") from None


def env_world() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) from torchrun's environment; (0, 1, 0, 1) outside it."""
    world_size = _env_int("WORLD_SIZE", 1)
    local_world = _env_int("LOCAL_WORLD_SIZE", world_size)
    return _env_int("RANK", 0), world_size, _env_int("LOCAL_RANK", 0), local_world


def init_from_env(device_type: str) -> torch.device:
    """Join torchrun's process group (nccl for cuda, gloo for cpu) and return this rank's device."""
    if device_type not in ("cuda", "cpu"):
        raise ConfigError(f"--device {device_type!r}: distributed training runs on cuda (NCCL) or cpu (gloo)")
    _, _, local, _ = env_world()
    device = torch.device("cuda", local) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    if under_torchrun() and not dist.is_initialized():
        if device_type == "cuda":
            dist.init_process_group(backend="nccl", init_method="env://", device_id=device)
        else:
            dist.init_process_group(backend="gloo", init_method="env://")
        if dist.get_rank() != 0:  # rank 0 tells the story; the others speak up only about problems
            logging.getLogger("normkd_plugin").setLevel(logging.WARNING)
    return device


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    """Number of processes in the job (1 outside a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this is global rank 0, the only rank that writes files."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place and return it (unchanged for a world of one)."""
    if world() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` is ignored on the others)."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def from_rank0(decide: Callable[[], T]) -> T:
    """``decide()`` run on rank 0 only, its result on every rank; a UserError it raises is raised on every rank
    alike (the other ranks never read the run folders, and none is left waiting in a collective)."""
    result: Any = None
    if is_main():
        try:
            result = decide()
        except UserError as exc:
            result = exc
    result = broadcast_object(result)
    if isinstance(result, UserError):
        raise result
    return result


def shard(indices: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s strided share ``indices[rank::world]``, as DistributedSampler splits, without padding."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard: rank {rank} is not in a world of {world} process(es)")
    return list(indices[rank::world])


def check_world(cfg, device: torch.device) -> None:
    """ConfigError, before anything is built, if the config cannot run in torchrun's world on ``device``."""
    _, world_size, local, local_world = env_world()
    if world_size < 1 or local_world < 1 or not 0 <= local < local_world:
        raise ConfigError(
            f"torchrun environment is inconsistent: WORLD_SIZE={world_size}, "
            f"LOCAL_WORLD_SIZE={local_world}, LOCAL_RANK={local}"
        )
    if cfg.SOLVER.BATCH_SIZE % world_size:
        raise ConfigError(
            f"SOLVER.BATCH_SIZE {cfg.SOLVER.BATCH_SIZE} is the global batch and must be divisible by the "
            f"world size {world_size} (WORLD_SIZE); use a multiple of {world_size} or another number of processes"
        )
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if gpus < local_world:
            raise ConfigError(
                f"NCCL needs one GPU per local rank: this node runs {local_world} rank(s) "
                f"(torchrun --nproc-per-node) but sees {gpus} GPU(s) (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); lower --nproc-per-node to {gpus}"
            )
    if cfg.SOLVER.get("SYNC_BN", False) and device.type != "cuda":
        raise ConfigError(
            f"SOLVER.SYNC_BN True needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); "
            f"--device is {device.type}: set SOLVER.SYNC_BN False"
        )


def _peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` only says that another rank went away (its own error is the job's error)."""
    return isinstance(exc, dist.DistError) or any(text in str(exc) for text in _PEER_LOST)


@contextlib.contextmanager
def job(cfgs: Sequence, device: torch.device) -> Iterator[torch.device]:
    """Check the world for every config; inside torchrun join the process group; yield this rank's device.

    A rank that raises ends the job with its own error (written to torchrun's error file by torch's error
    handler); a rank that only lost a peer waits up to PEER_GRACE_S for torchrun to stop it. Outside torchrun (or
    inside a process group made by the caller) it yields ``device`` and does nothing else.
    """
    owned = under_torchrun() and not dist.is_initialized()
    for cfg in cfgs:
        check_world(cfg, device)  # before the process group: fails fast and alike on every rank
    try:
        if owned:
            device = init_from_env(device.type)
        yield device
    except Unfinished:  # a time limit ended the job on every rank alike: not a failure
        if owned and dist.is_initialized():
            dist.destroy_process_group()
        raise
    except Exception as exc:
        if world() > 1 and _peer_lost(exc):
            log.error("rank %d lost a peer (%s); torchrun reports the failing rank", rank(), exc)
            time.sleep(PEER_GRACE_S)
        elif os.environ.get("TORCHELASTIC_ERROR_FILE"):
            # What ``@record`` on a main would write, here: normkd-train turns an input error into one line and
            # exit 2 before a decorator on its main could see it, and a time-limit stop is not a failure.
            from torch.distributed.elastic.multiprocessing.errors import get_error_handler

            get_error_handler().record_exception(exc)
        raise
    if owned and dist.is_initialized():
        dist.destroy_process_group()


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
        self.rank, self.world = rank(), world()
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
        return all_reduce_sum(tensor)

    def earliest_step_(self, steps: Tensor) -> Tensor:
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
