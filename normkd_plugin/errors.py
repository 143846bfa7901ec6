"""The errors a user can fix: each names the file, key or value at fault and prints as one line."""

from __future__ import annotations

__all__ = ["UserError", "RunError", "RunsFailed", "Interrupted"]


class UserError(Exception):
    """Base of every error caused by input (config, data, checkpoint, run folder); CLIs print it on one line."""


class RunError(UserError, RuntimeError):
    """A run folder that cannot be used as asked (locked, already started or finished, unreadable state)."""


class RunsFailed(RunError):
    """One or more runs stopped (a non-finite loss, a state that cannot be resumed); the message says which.

    ``unfinished``: what a time limit left of the other runs of a pack (None when they finished or there was no limit).
    """

    def __init__(self, message: str, unfinished: str | None = None):
        super().__init__(message)
        self.unfinished = unfinished


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGTERM) raised as Ctrl-C's KeyboardInterrupt is; ``signum`` is the signal."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum
