"""The errors a user can fix: each names the file, key or value at fault and prints as one line."""

from __future__ import annotations

__all__ = ["UserError", "RunError"]


class UserError(Exception):
    """Base of every error caused by input (config, data, checkpoint, run folder); CLIs print it on one line."""


class RunError(UserError, RuntimeError):
    """A run folder that cannot be used as asked (locked, already started or finished, unreadable state)."""
