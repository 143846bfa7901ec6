"""--time-limit: end a training job cleanly at an epoch boundary before a wall-clock limit.

A job under a limit (a Slurm allocation, a short GPU reservation) starts an epoch only if the
epochs measured so far say it will end in time; it then exits with EXIT_UNFINISHED and every run
continues exactly with ``--resume``. A kill is safe too (the run folders are crash-safe), but it
throws the partial epoch away and can cut off whatever the job does after training.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable

from .config import ConfigError

__all__ = ["EXIT_UNFINISHED", "TimeLimit", "Unfinished", "format_seconds", "parse_duration", "report_unfinished"]

EXIT_UNFINISHED = 3  # the job stopped at its time limit; run the same command with --resume to continue
UNFINISHED_FILE_ENV = "NORMKD_UNFINISHED_FILE"

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


class Unfinished(Exception):
    """Training stopped at the time limit with runs left to train; the message says how far they got."""


def parse_duration(text: str, flag: str = "--time-limit") -> float:
    """Seconds in ``text``: ``90``, ``90s``, ``8m``, ``1.5h``, ``MM:SS`` or ``H:MM:SS``.

    A bare number is seconds (Slurm's ``--time`` reads one as minutes: write ``240m`` or ``4:00:00``).
    """
    value = text.strip().lower()
    match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([smh]?)", value)
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    elif re.fullmatch(r"\d+(:[0-5]?\d){1,2}", value):
        seconds = 0.0
        for part in value.split(":"):
            seconds = seconds * 60 + int(part)
    else:
        raise ConfigError(f"{flag} {text!r}: expected seconds (90, 90s), minutes (8m), hours (1.5h) or H:MM:SS")
    if seconds <= 0:
        raise ConfigError(f"{flag} {text!r}: the limit must be positive")
    return seconds


def format_seconds(seconds: float, exact: bool = False) -> str:
    """Whole seconds as text: the two leading units for an estimate (``1h02m``, ``4m05s``, ``12s``);
    ``exact``: down to the second with minutes always shown, for a report (``1h02m03s``, ``4m05s``, ``0m40s``)."""
    minutes, secs = divmod(max(0, int(round(seconds))), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s" if exact else f"{hours}h{minutes:02d}m"
    if minutes or exact:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class TimeLimit:
    """A wall-clock budget counted from construction; an epoch starts only if it should end within it.

    The next epoch is estimated from the slowest epoch so far per run trained in it, times the runs
    it will train (a pack's catch-up epoch trains fewer runs than its full epochs). The first epoch of
    a job has no estimate and always starts; later ones err on the safe side, since the first epoch
    after a start or resume also carries warm-up costs.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] | None = None):
        self.seconds = float(seconds)
        self.clock = clock or time.monotonic
        self.start = self.clock()
        self._epoch_start: float | None = None
        self.longest = 0.0  # seconds of the slowest epoch
        self.per_run = 0.0  # seconds per run of the slowest epoch per run

    def epoch_started(self) -> None:
        """Mark the start of an epoch (for the duration estimate)."""
        self._epoch_start = self.clock()

    def epoch_ended(self, runs: int = 1) -> None:
        """Mark the end of the epoch begun last, which trained ``runs`` runs."""
        if self._epoch_start is not None:
            duration = self.clock() - self._epoch_start
            self.longest = max(self.longest, duration)
            self.per_run = max(self.per_run, duration / max(runs, 1))
            self._epoch_start = None

    def left(self) -> float:
        """Seconds of the limit not yet used (negative once past it)."""
        return self.seconds - (self.clock() - self.start)

    def allows_epoch(self, runs: int = 1) -> bool:
        """Whether one more epoch of ``runs`` runs, estimated as ``runs`` x the slowest per run so far, ends in time;
        True before any epoch was measured (a job's first epoch always starts, so its runs can resume)."""
        return self.per_run == 0 or self.per_run * runs <= self.left()

    def stopped(self, where: str) -> str:
        """The line a trainer ends with at the limit: what stopped ``where`` (runs and their epochs), how to go on."""
        return f"stopped at the time limit {self.describe()}: {where}; run the same command with --resume to continue"

    def describe(self) -> str:
        """'after 7m58s of 8m00s (longest epoch 41.2s)'; the epoch part once an epoch was measured."""
        text = f"after {format_seconds(self.seconds - self.left(), exact=True)} of {format_seconds(self.seconds, exact=True)}"
        return text + (f" (longest epoch {self.longest:.1f}s)" if self.longest else "")


def report_unfinished(message: str, failed: bool = False) -> None:
    """Write ``message`` to the file named by $NORMKD_UNFINISHED_FILE, if set (how normkd-sweep learns of a
    stop at the limit through torchrun, which turns its workers' exit codes 3 and 2 into 1); ``failed``:
    some runs also failed, and the first line says ``failed``."""
    path = os.environ.get(UNFINISHED_FILE_ENV)
    if path:
        with open(path, "w") as f:
            f.write(("failed\n" if failed else "") + message + "\n")
