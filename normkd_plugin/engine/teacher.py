"""The teacher of a pack: run once per step on the distinct batches of its seed groups, shared by every run."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

__all__ = ["SharedTeacher", "share_teacher"]


class SharedTeacher(nn.Module):
    """The teacher of a pack: run once per step on the distinct batches; a distiller's call gets its slice.

    :meth:`precompute` stores the outputs for given input tensors; calling the module with one of
    those very tensors returns the stored output, any other input runs the network.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self._outputs: list[tuple[Tensor, object]] = []

    def precompute(self, batches: list[Tensor]) -> None:
        """Run the network once on ``batches`` (concatenated) without gradient and keep each one's output."""
        with torch.no_grad():
            if not batches:
                outputs = []
            elif len(batches) == 1:
                outputs = [self.net(batches[0])]
            else:
                joint = self.net(torch.cat(batches))
                bounds = list(itertools.accumulate(b.shape[0] for b in batches))
                outputs = [
                    tree_map(lambda t, lo=lo, hi=hi: t[lo:hi] if isinstance(t, Tensor) else t, joint)
                    for lo, hi in zip([0, *bounds[:-1]], bounds)
                ]
        self._outputs = list(zip(batches, outputs))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # the teacher's own methods (get_stage_channels, ...) for the distillers
            return getattr(super().__getattr__("net"), name)

    def forward(self, x: Tensor):
        for batch, output in self._outputs:
            if batch is x:
                return output
        return self.net(x)


def share_teacher(distiller: nn.Module) -> SharedTeacher | None:
    """Wrap the distiller's teacher (if any) so a pack can run it once per step for all runs."""
    teacher = getattr(distiller, "teacher", None)
    if teacher is None:
        return None
    if not isinstance(teacher, SharedTeacher):
        distiller.teacher = SharedTeacher(teacher)
    return distiller.teacher
