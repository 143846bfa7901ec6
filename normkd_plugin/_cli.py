"""What the command lines share: user errors as one line, and flags mixed freely with KEY VALUE overrides."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import UserError

__all__ = ["user_errors", "parse_with_overrides", "quiet_pipe"]


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
    """Print a UserError raised inside as one line ``prog: message`` on stderr and exit 2; with debug, re-raise it."""
    try:
        yield
    except UserError as exc:
        if debug:
            raise
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"{prog}: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``parser``'s flags wherever they stand; every other token starts a KEY VALUE pair, kept in ``.opts``.

    A token after a KEY is always its VALUE (so ``EXPERIMENT.SEED -1`` works); a token after a flag
    that takes an argument is that argument. ``--`` ends the flags: the rest are overrides.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    takes_arg = {s: a.nargs != 0 for a in parser._actions for s in a.option_strings}
    flags: list[str] = []
    opts: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            opts += argv[i + 1 :]
            break
        if tok.startswith("-") and len(tok) > 1:
            name = tok.split("=", 1)[0]
            hits = [s for s in takes_arg if s == name]
            if not hits and parser.allow_abbrev:
                hits = [s for s in takes_arg if s.startswith(name)]
            width = 2 if "=" not in tok and len(hits) == 1 and takes_arg[hits[0]] else 1
            flags += argv[i : i + width]
        else:
            width = 2
            opts += argv[i : i + width]
        i += width
    args = parser.parse_args(flags)
    args.opts = opts
    return args
