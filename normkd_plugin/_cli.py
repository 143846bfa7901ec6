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


class _Token(str):
    """A command-line token that remembers where it stood."""

    def __new__(cls, text: str, at: int):
        token = super().__new__(cls, text)
        token.at = at
        return token


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``parser``'s flags wherever they stand; the other tokens are KEY VALUE pairs, kept in ``.opts``.

    argparse itself decides which tokens are flags and flag arguments (``parse_known_args``); the tokens
    it leaves (its positionals and the flags it does not know) pair up where they stand side by side. So
    the token after a KEY is its VALUE, even one argparse calls an unknown flag (``SOLVER.LR -1e-3``,
    ``EXPERIMENT.NAME -x``), unless argparse reads it as one of the parser's flags (``--resume``, also
    abbreviated: ``--res``): then the KEY has no VALUE, and the first such KEY is ``.key_without_value``
    (None when every KEY has one). An unknown flag where a KEY would stand is refused as argparse
    refuses it. ``--`` ends the flags: the rest are overrides. (``parse_intermixed_args`` alone would
    refuse ``-1e-3`` or ``-x`` as unknown flags, and a trailing ``argparse.REMAINDER``, as detectron2
    has, swallows the flags after the overrides.) The parser's only positional, if any, is ``opts``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    end = argv.index("--") if "--" in argv else len(argv)
    head, tail = argv[:end], argv[end + 1 :]
    # argparse hands back the tokens it leaves as the objects it was given: each says where it stood
    probe, unknown = parser.parse_known_args([_Token(tok, at) for at, tok in enumerate(head)])
    left = {tok.at for tok in [*(getattr(probe, "opts", None) or []), *unknown]}
    flags: list[str] = []
    opts: list[str] = []
    unpaired: list[str] = []
    stray: list[str] = []
    i = 0
    while i < len(head):
        tok = head[i]
        if i not in left:
            flags.append(tok)
        elif tok.startswith("-") and len(tok) > 1:
            stray.append(tok)
        elif i + 1 in left:
            opts += head[i : i + 2]
            i += 1
        else:
            unpaired.append(tok)
        i += 1
    args = parser.parse_args(flags)
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    opts += tail[: len(tail) // 2 * 2]
    unpaired += tail[len(tail) // 2 * 2 :]
    args.opts = opts
    args.key_without_value = unpaired[0] if unpaired else None
    return args
