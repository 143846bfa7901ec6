"""Progress of a training job: a tqdm bar per epoch on a terminal, one line per epoch otherwise (logs, Slurm).

The trainers call :meth:`JobProgress.step` once per step from the host, where the step is issued. On a
CPU that is when it runs; on CUDA (a replayed graph runs ahead of the host) the bar follows CUDA events
recorded every few steps and polled without waiting, so no host sync is added to the step. Besides the
epoch's own bar, the postfix gives the rate and the ETA of the whole job (every epoch still to train,
validation and checkpoints included in the measured rate).
"""

from __future__ import annotations

import collections
import logging
import sys
import time

import torch

from .timelimit import format_seconds

log = logging.getLogger(__name__)

__all__ = ["JobProgress"]


class JobProgress:
    """Epochs ``done+1 .. epochs`` of ``steps_per_epoch`` steps each.

    ``show``: whether this process reports (rank 0). ``interactive``: a bar (default: stderr is a
    terminal); otherwise one log line per epoch. ``device``: a CUDA device makes the bar follow events.
    """

    def __init__(
        self,
        epochs: int,
        done: int,
        steps_per_epoch: int,
        show: bool = True,
        interactive: bool | None = None,
        device: torch.device | None = None,
        stride: int = 8,
    ):
        self.epochs, self.done, self.steps_per_epoch = int(epochs), int(done), max(1, int(steps_per_epoch))
        self.show = show
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.stride = stride
        self.job_steps = (self.epochs - self.done) * self.steps_per_epoch
        self.steps_done = 0  # over the job, up to the last finished epoch
        self.started = time.monotonic()
        self.bar = None
        self.epoch = 0
        self._issued = self._shown = 0
        self._pending: collections.deque = collections.deque()
        self._epoch_started = 0.0

    # -- the job ---------------------------------------------------------------------------
    def rate(self, in_epoch: int = 0) -> float:
        """Steps per second over the job so far (validation and checkpoints included)."""
        elapsed = time.monotonic() - self.started
        return (self.steps_done + in_epoch) / elapsed if elapsed > 0 else 0.0

    def eta(self, in_epoch: int = 0) -> float | None:
        rate = self.rate(in_epoch)
        left = self.job_steps - self.steps_done - in_epoch
        return left / rate if rate > 0 else None

    def summary(self, in_epoch: int = 0) -> str:
        pct = 100.0 * (self.steps_done + in_epoch) / self.job_steps if self.job_steps else 100.0
        eta = self.eta(in_epoch)
        return f"job {pct:.1f}%, {self.rate(in_epoch):.2f} it/s, ETA {format_seconds(eta) if eta is not None else '?'}"

    # -- an epoch --------------------------------------------------------------------------
    def start_epoch(self, epoch: int, steps: int | None = None, desc: str = "") -> None:
        self.epoch = epoch
        self.epoch_steps = int(steps or self.steps_per_epoch)
        self._issued = self._shown = 0
        self._pending.clear()
        self._epoch_started = time.monotonic()
        if self.show and self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.epoch_steps,
                desc=desc or f"epoch {epoch}/{self.epochs}",
                unit="it",
                file=sys.stderr,
                dynamic_ncols=True,
                leave=False,
            )
            self.bar.set_postfix_str(self.summary(), refresh=False)

    def step(self) -> None:
        """One step was issued by the host (cheap; never waits for the device)."""
        if self.bar is None:
            return
        self._issued += 1
        if not self.cuda:
            self._advance(self._issued)
            return
        if self._issued % self.stride == 0:
            event = torch.cuda.Event()
            event.record()
            self._pending.append((self._issued, event))
        while self._pending and self._pending[0][1].query():
            self._advance(self._pending.popleft()[0])

    def _advance(self, done: int) -> None:
        if done > self._shown:
            self.bar.update(done - self._shown)
            self._shown = done
            self.bar.set_postfix_str(self.summary(done), refresh=False)

    def end_epoch(self, steps: int | None = None) -> None:
        """The epoch's steps are done (the caller has synced, e.g. to read its sums)."""
        steps = int(steps if steps is not None else self.epoch_steps)
        self.steps_done += steps
        seconds = time.monotonic() - self._epoch_started
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self._pending.clear()
        if self.show:
            log.info(
                "epoch %d/%d done in %.1f s (%d steps); %s", self.epoch, self.epochs, seconds, steps, self.summary()
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
