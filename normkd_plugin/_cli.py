"""What the command lines share: user errors as one line, and flags mixed freely with KEY VALUE overrides."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .errors import Interrupted, UserError

__all__ = ["user_errors", "OverrideParser", "parse_with_overrides", "quiet_pipe", "stop_signals"]


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


class OverrideParser(argparse.ArgumentParser):
    """An ArgumentParser that knows its flags and whether each takes a value (from the Actions that
    ``add_argument`` returns), so :func:`parse_with_overrides` can mix them with KEY VALUE overrides."""

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        """``ArgumentParser.add_argument``, recording the flag's option strings and whether it takes a value."""
        action = super().add_argument(*args, **kwargs)
        vars(self).setdefault("takes_value", {}).update(dict.fromkeys(action.option_strings, action.nargs != 0))
        return action

    def flag(self, token: str) -> str | None:
        """The flag ``token`` names (in full, with ``=value``, or a unique abbreviation of a long flag), or None."""
        if not token.startswith("-") or token in ("-", "--"):
            return None
        name = token.split("=", 1)[0]
        if name in self.takes_value:
            return name
        hits = [s for s in self.takes_value if s.startswith(name)] if self.allow_abbrev and name[:2] == "--" else []
        return hits[0] if len(hits) == 1 else None


def parse_with_overrides(parser: OverrideParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``parser``'s flags wherever they stand; the other tokens are KEY VALUE pairs, kept in ``.opts``.

    The token after a KEY is its VALUE, even one that starts with a dash (``SOLVER.LR -1e-3``,
    ``EXPERIMENT.NAME -x``), unless it is one of the parser's flags (``--resume``, also abbreviated:
    ``--res``): then the KEY has no VALUE, and the first such KEY is ``.key_without_value`` (None when
    every KEY has one). A dash token where a KEY would stand is refused as argparse refuses an unknown
    flag. ``--`` ends the flags: the rest are overrides. (``parse_intermixed_args`` would refuse
    ``-1e-3`` or ``-x`` as unknown flags, and a trailing ``argparse.REMAINDER``, as detectron2 has,
    swallows the flags after the overrides.)
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    end = argv.index("--") if "--" in argv else len(argv)
    head, tail = argv[:end], argv[end + 1 :]
    flags: list[str] = []
    opts: list[str] = []
    unpaired: list[str] = []
    stray: list[str] = []
    i = 0
    while i < len(head):
        token, flag = head[i], parser.flag(head[i])
        if flag is not None:
            width = 2 if "=" not in token and parser.takes_value[flag] else 1
            flags += head[i : i + width]
        elif token.startswith("-") and len(token) > 1:
            width = 1
            stray.append(token)
        elif i + 1 < len(head) and parser.flag(head[i + 1]) is None:
            width = 2
            opts += head[i : i + 2]
        else:
            width = 1
            unpaired.append(token)
        i += width
    args = parser.parse_args(flags)
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    opts += tail[: len(tail) // 2 * 2]
    unpaired += tail[len(tail) // 2 * 2 :]
    args.opts = opts
    args.key_without_value = unpaired[0] if unpaired else None
    return args
