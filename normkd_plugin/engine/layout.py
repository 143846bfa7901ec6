"""How the students of a pack are laid out: runs of one architecture fused into one network (SOLVER.FAST.FUSE).

The students' parameters and buffers are stacked along a new first dimension (K runs) and the
student is called once through ``torch.func.vmap(functional_call)``: vmap's batching rules turn
every convolution into one grouped convolution over the K students, every BatchNorm into one
BatchNorm over K·C channels (each slice's own batch statistics and running buffers) and the
classifier into one batched matmul, so a layer costs one kernel for all K runs. The slices never
mix: a run's NaN reaches only its own slice.

Each run keeps its own modules and optimizer: their parameters, buffers and momentum buffers
become views of the stacked tensors (``aliased``), so validation, checkpoints (per run, the host's
format), resume and NaN poisoning act on a run exactly as unfused. The losses stay the host's
distiller code: inside :func:`student_output` a run's ``student(x)`` returns its slice of the fused
logits. The SGD step is the functional ``torch.optim.sgd.sgd`` on slices of the stacked tensors,
one call per contiguous range of runs with the same LR, momentum and weight decay (elementwise, so
each slice steps as its own optimizer would).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.optim.sgd import sgd

__all__ = ["FUSABLE_TYPES", "FusedStudents", "fusion_key", "student_output"]

# Distillers whose loss reads only the student's logits (the host's Vanilla, KD, DKD and this plugin's).
FUSABLE_TYPES = frozenset({"NONE", "KD", "DKD", "NORMKD", "NORMDKD", "NormKD", "NormKD_W_DKD", "KD_LS", "DKD_LS"})


def fusion_key(run) -> tuple | None:
    """What runs must share to fuse (student class, parameter and buffer shapes), or None: trains unfused.

    A run fuses when its distiller needs only the student's logits, its optimizer is the host's plain
    SGD over exactly the student's parameters, and its student draws no random numbers (dropout).
    """
    cfg, distiller, opt = run.cfg, run.distiller, run.optimizer
    if cfg.DISTILLER.TYPE not in FUSABLE_TYPES or type(opt) is not torch.optim.SGD or len(opt.param_groups) != 1:
        return None
    group = opt.param_groups[0]
    if group["nesterov"] or group["maximize"] or group["dampening"] or group.get("differentiable"):
        return None
    student = getattr(distiller, "student", None)
    if not isinstance(student, nn.Module):
        return None
    own = {id(p) for name, p in distiller.named_parameters() if not name.startswith("teacher.")}
    mine = {id(p) for p in student.parameters()}
    if own != mine or {id(p) for p in group["params"]} != mine:
        return None  # a distiller with modules of its own (connectors) or a partial optimizer
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in student.modules()):
        return None
    if any(isinstance(m, nn.SyncBatchNorm) for m in student.modules()):
        return None  # its statistics are an all-reduce over the ranks, which vmap cannot batch
    return (
        type(student),
        tuple((n, tuple(p.shape), p.dtype, p.device) for n, p in student.named_parameters()),
        tuple((n, tuple(b.shape), b.dtype) for n, b in student.named_buffers()),
    )


def _set_buffer(module: nn.Module, name: str, value: Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module.get_submodule(owner)._buffers[leaf] = value


# The fused students compute in NCHW, inputs and weights alike: a channels_last activation would reach
# cuDNN's batch norm, which asks its input ``is_contiguous`` in the suggested (channels_last) format,
# and vmap's batched tensors refuse that query ("NYI: querying is_contiguous inside of vmap").


def _nchw(x: Tensor) -> Tensor:
    """``x`` in the default (NCHW) layout, as the stacked weights are."""
    return x.contiguous()


def _stack(tensors: list[Tensor], grad: bool) -> Tensor:
    """The tensors stacked along a new first dimension, with default strides.

    Not ``.contiguous()``: a channels_last 1x1 weight counts as contiguous with its channels_last
    strides, and a convolution by it returns channels_last activations.
    """
    stacked = torch.stack([t.detach() for t in tensors]).clone(memory_format=torch.contiguous_format)
    return stacked.requires_grad_(grad)


class FusedStudents:
    """The students of ``runs`` (one architecture, see :func:`fusion_key`) as one stacked network."""

    def __init__(self, runs: list) -> None:
        self.runs = runs
        students = [run.distiller.student for run in runs]
        self.params = {
            n: _stack([dict(s.named_parameters())[n] for s in students], True)
            for n, _ in students[0].named_parameters()
        }
        self.buffers = {
            n: _stack([dict(s.named_buffers())[n] for s in students], False) for n, _ in students[0].named_buffers()
        }
        self.momentum = {}
        for name in self.params:
            bufs = []
            for run, student in zip(runs, students):
                p = student.get_parameter(name)
                buf = run.optimizer.state.get(p, {}).get("momentum_buffer")
                bufs.append(torch.zeros_like(p) if buf is None else buf)  # 0·m + g = g: SGD's first step
            self.momentum[name] = _stack(bufs, False)
        # The structure functional_call runs, in train mode whatever mode the students are left in (eval,
        # after a validation, when a group is formed again): only evaluate() runs it in eval mode.
        self.base = copy.deepcopy(students[0]).to("meta").train()
        self._alias(students)

    def _alias(self, students: list[nn.Module]) -> None:
        """Make every run's parameters, buffers and momentum buffers views of its slice."""
        for k, (run, student) in enumerate(zip(self.runs, students)):
            for name, p in student.named_parameters():
                p.data = self.params[name].detach()[k]
                if run.optimizer.param_groups[0]["momentum"] != 0:
                    run.optimizer.state[p]["momentum_buffer"] = self.momentum[name][k]
            for name in self.buffers:
                _set_buffer(student, name, self.buffers[name][k])

    def unfuse(self) -> None:
        """Give every run's tensors their own storage again (values as they are now)."""
        for run in self.runs:
            student = run.distiller.student
            for p in student.parameters():
                p.data = p.data.clone()
                state = run.optimizer.state.get(p)
                if state and state.get("momentum_buffer") is not None:
                    state["momentum_buffer"] = state["momentum_buffer"].clone()
            for name, b in list(student.named_buffers()):
                _set_buffer(student, name, b.clone())
        self.params = self.buffers = self.momentum = {}

    def _logits(self, params: dict, buffers: dict, x: Tensor) -> Tensor:
        return functional_call(self.base, (params, buffers), (x,))[0]

    def __call__(self, x: Tensor, batched: bool) -> Tensor:
        """Logits (K, B, classes): slice k is student k on ``x[k]`` (``batched``) or on the one batch ``x``."""
        return vmap(self._logits, in_dims=(0, 0, 0 if batched else None))(self.params, self.buffers, _nchw(x))

    @torch.no_grad()
    def evaluate(self, x: Tensor) -> Tensor:
        """Logits (K, B, classes) of every student in eval mode (BN running statistics) on the one batch ``x``."""
        self.base.eval()
        try:
            return vmap(self._logits, in_dims=(0, 0, None))(self.params, self.buffers, _nchw(x))
        finally:
            self.base.train()

    def parameters(self) -> list[Tensor]:
        """The stacked parameters (their ``.grad`` holds every slice's gradient)."""
        return list(self.params.values())

    def buffer_list(self) -> list[Tensor]:
        """The stacked BatchNorm running statistics and counters."""
        return list(self.buffers.values())

    def zero_grad(self) -> None:
        """Drop the stacked gradients (set to None, as ``optimizer.zero_grad(set_to_none=True)``)."""
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """SGD on every slice with its run's hyperparameters: p ← p − lr·(μ·m + g + wd·p)."""
        names = list(self.params)
        for lo, hi, group in self._ranges():
            momentum = group["momentum"]
            sgd(
                [self.params[n][lo:hi] for n in names],
                [self.params[n].grad[lo:hi] for n in names],
                [self.momentum[n][lo:hi] for n in names] if momentum != 0 else [None] * len(names),
                foreach=group["foreach"],
                fused=group["fused"],
                weight_decay=group["weight_decay"],
                momentum=momentum,
                lr=group["lr"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
            )

    def _ranges(self) -> Iterator[tuple[int, int, dict]]:
        """Maximal ranges [lo, hi) of consecutive runs whose SGD hyperparameters are equal."""

        def hyper(run):
            group = run.optimizer.param_groups[0]
            return tuple(group[k] for k in ("lr", "momentum", "weight_decay", "dampening", "foreach", "fused"))

        lo = 0
        for hi in range(1, len(self.runs) + 1):
            if hi == len(self.runs) or hyper(self.runs[hi]) != hyper(self.runs[lo]):
                yield lo, hi, self.runs[lo].optimizer.param_groups[0]
                lo = hi


@contextlib.contextmanager
def student_output(student: nn.Module, logits: Tensor):
    """Inside the block ``student(x)`` returns ``(logits, {})``: the host's loss code reads a fused slice."""
    student.forward = lambda *args, **kwargs: (logits, {})
    try:
        yield
    finally:
        del student.forward
