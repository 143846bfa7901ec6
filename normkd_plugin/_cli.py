"""What the command lines share: user errors as one line, and flags mixed freely with KEY VALUE overrides."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .errors import Interrupted, UserError

__all__ = ["user_errors", "parse_with_overrides", "quiet_pipe", "stop_signals"]


@contextmanager
def quiet_pipe() -> Iterator[None]:
    """End quietly when the reader of stdout goes away (``normkd-configs | head``), as Unix tools do."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        raise SystemExit(1) from None


@contextmanager
def user_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Print a UserError raised inside as one line ``prog: message`` on stderr and exit 2; with debug, re-raise it.

    An OSError that reaches here (a file the program read or wrote) prints as ``prog: PATH: CAUSE``.
    """
    try:
        yield
    except (UserError, OSError) as exc:
        if debug or isinstance(exc, BrokenPipeError):
            raise
        if isinstance(exc, UserError):
            text = str(exc)
        else:
            text = (
                f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else f"{type(exc).__name__}: {exc}"
            )
        message = " ".join(line.strip() for line in text.splitlines() if line.strip())
        print(f"{prog}: {message}", file=sys.stderr)
        raise SystemExit(2) from None


@contextmanager
def stop_signals(prog: str, where: Callable[[], str], debug: bool = False) -> Iterator[None]:
    """SIGTERM stops like Ctrl-C; either ends with one line ``prog: interrupted WHERE`` and exit 128 + signal.

    ``where()`` says how far the work got (and how to continue); a second signal while ending is ignored.
    """

    def on_term(signum, frame):
        raise Interrupted(signum)

    old = signal.signal(signal.SIGTERM, on_term)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # also where a shell started us ignoring it
    try:
        yield
    except KeyboardInterrupt as exc:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if debug:
            raise
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"{prog}: interrupted {where()}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``parser``'s flags wherever they stand; every other token starts a KEY VALUE pair, kept in ``.opts``.

    A token after a KEY is its VALUE (so ``EXPERIMENT.SEED -1`` works) unless it is one of the parser's
    flags spelt in full: then the KEY has no VALUE, and the first such KEY is ``.key_without_value``
    (None when every KEY has one), so a flag is never taken for a VALUE. A token after a flag that takes
    an argument is that argument. ``--`` ends the flags: the rest are overrides.
    (``parse_intermixed_args`` would take a VALUE such as ``-1e-3`` or ``-inf`` for an unknown flag, and
    a trailing ``argparse.REMAINDER``, as detectron2 has, swallows the flags after the overrides; argparse
    has no public list of a parser's flags, hence ``_actions``.)
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    takes_arg = {s: a.nargs != 0 for a in parser._actions for s in a.option_strings}
    flags: list[str] = []
    opts: list[str] = []
    unpaired: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            rest = argv[i + 1 :]
            opts += rest[: len(rest) // 2 * 2]
            unpaired += rest[len(rest) // 2 * 2 :]
            break
        if tok.startswith("-") and len(tok) > 1:
            name = tok.split("=", 1)[0]
            hits = [s for s in takes_arg if s == name]
            if not hits and parser.allow_abbrev:
                hits = [s for s in takes_arg if s.startswith(name)]
            width = 2 if "=" not in tok and len(hits) == 1 and takes_arg[hits[0]] else 1
            flags += argv[i : i + width]
        elif i + 1 < len(argv) and argv[i + 1].split("=", 1)[0] not in takes_arg:
            width = 2
            opts += argv[i : i + width]
        else:
            width = 1
            unpaired.append(tok)
        i += width
    args = parser.parse_args(flags)
    args.opts = opts
    args.key_without_value = unpaired[0] if unpaired else None
    return args
