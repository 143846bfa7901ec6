"""Crash-safe files of a run folder: atomic writes, OS errors in one line, stops held back, and the lock.

* every file is written to a temporary file in the same folder, flushed, fsync'ed and moved over
  the old one with ``os.replace`` (a reader sees the old file or the new one, never half of one);
* an OS error while reading or writing is a :class:`FolderError` naming the path and the cause;
* SIGINT/SIGTERM can be held back while a block runs (an epoch's commit is never cut in two);
* ``fcntl.flock`` on a lock file, with the holder's PID inside, keeps a second process out of a folder.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import RunError

__all__ = [
    "FolderError",
    "os_errors",
    "held_signals",
    "atomic_write",
    "serialize",
    "take_lock",
    "lock_holder",
    "wait_for_lock",
]


class FolderError(RunError, OSError):
    """An OS error (disk full, read-only, permissions, a dangling link, a name too long) on a run folder's file."""


def _reason(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0)
    return f"{exc.strerror or exc}" + (f" ({name})" if name else "")


@contextmanager
def os_errors(path: str | os.PathLike, doing: str) -> Iterator[None]:
    """Turn an OSError inside into a FolderError ``PATH: cannot DOING: CAUSE (ERRNO)``."""
    try:
        yield
    except FolderError:
        raise
    except OSError as exc:
        where = Path(path)
        if exc.errno == errno.EEXIST and where.is_symlink() and not where.exists():
            cause = f"a dangling symbolic link to {os.readlink(where)} stands there"
        else:
            cause = _reason(exc)
        raise FolderError(f"{where}: cannot {doing}: {cause}") from None


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def held_signals() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends (an epoch's commit is never cut in two by a stop).

    In the main thread their handlers only note them inside the block, then each noted signal is raised
    again: a mask would hold them from this thread alone, and the kernel gives a signal sent to the
    process to any thread that does not block it (tensorboard's, the loader's), whose Python handler then
    runs in the main thread at once. Elsewhere (no Python handler runs there) this thread masks them.
    """
    if threading.current_thread() is not threading.main_thread():
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        return
    noted: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in dict.fromkeys(noted):
            signal.raise_signal(s)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write ``path`` by calling ``write(file_object)`` on a temporary sibling, fsync, then os.replace."""
    path = Path(path)
    with os_errors(path, "write it"):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the files are as readable as the host's
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def serialize(state: dict) -> bytes:
    """``torch.save`` of ``state`` into bytes (written to several files without serialising again)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def take_lock(path: Path, in_use: str) -> int:
    """The file descriptor of ``path`` locked exclusively, with this process's PID written in it; RunError
    ``in_use`` (with ``{pid}`` replaced by the holder's) when another process holds it."""
    with os_errors(path, "open the run folder's lock"):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        if exc.errno in _HELD:
            raise RunError(in_use.format(pid=holder)) from None
        raise FolderError(f"{path}: cannot lock: {_reason(exc)}") from None
    try:
        with os_errors(path.parent, "write in the run folder"):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)  # (which releases the lock)
        raise
    return fd


_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def _holder(fd: int) -> str:
    return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"


def lock_holder(path: str | os.PathLike) -> str | None:
    """The PID (as written) of the process holding the lock file ``path``, or None when it is free or absent."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return _holder(fd) if exc.errno in _HELD else None
    finally:
        os.close(fd)  # (releases our shared lock, if taken)
    return None


def wait_for_lock(path: str | os.PathLike) -> None:
    """Block until no process holds the lock file ``path`` (at once when there is none)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)
