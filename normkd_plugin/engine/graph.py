"""Capture of a training step as one CUDA graph, and its replay; eager when capture fails.

The step's Python runs once per capture: the learning rates, what a warm-up reads of ``epoch`` and
the set of runs are constants of the graph, so the caller keys the graph on them and it is captured
again whenever ``key`` changes (at an LR decay, in each epoch of a warm-up, when a run drops out).
The capture's warm-up trains the epoch's first batch eagerly on a side stream; whatever happens to
the capture, training goes on from the second batch, so no batch is trained twice. The capture is
thread-local: a loader's pin-memory thread may allocate pinned memory or query events meanwhile,
which the default (global) mode would refuse.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["StepGraph"]

Batches = tuple[list[Tensor], list[Tensor]]


class StepGraph:
    """Run full batches of an epoch through ``step``: captured once per ``key`` and replayed, or eagerly."""

    def __init__(self, step: Callable, zero_grad: Callable[[], None], enabled: bool):
        self.step, self.zero_grad, self.enabled = step, zero_grad, enabled
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key = None
        self.static: Batches | None = None
        self.failure = ""  # why the capture failed (training then goes on eagerly)

    def capture(self, first: Batches, epoch: int, key) -> None:
        """Capture ``step`` on copies of the batch ``first`` (its static inputs) as the graph of ``key``."""
        self.graph, self.key = None, None
        self.static = ([x.clone() for x in first[0]], [y.clone() for y in first[1]])
        self.zero_grad()  # set_to_none: the captured backward allocates the grads from the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.step(*self.static, epoch)
        self.graph, self.key = graph, key

    def run(self, eager_step: Callable, batch: Callable[[int], Batches], full: int, epoch: int, key) -> int:
        """Train steps ``batch(0)`` ... ``batch(full - 1)`` (asked for in that order); returns ``full``."""
        start = 0
        if self.enabled and full > 1 and self.key != key:
            first = batch(0)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                eager_step(*first, epoch)  # the capture's warm-up: trains batch 0
            torch.cuda.current_stream().wait_stream(stream)
            start = 1
            try:
                self.capture(first, epoch, key)
            except RuntimeError as exc:
                log.warning("CUDA graph capture failed (%s); training eagerly", exc)
                self.enabled, self.graph, self.failure = False, None, (str(exc).splitlines() or [""])[0]
                torch.cuda.synchronize()
        if self.enabled and self.graph is not None and self.key == key:
            xs, ys = self.static
            for i in range(start, full):
                images, targets = batch(i)
                for dst, src in zip(xs + ys, images + targets):
                    dst.copy_(src)  # into the graph's static inputs
                self.graph.replay()
            return full
        for i in range(start, full):
            eager_step(*batch(i), epoch)
        return full
