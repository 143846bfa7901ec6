"""normkd-configs: list the packaged configs (dataset, method, teacher, student, name for --cfg)."""

from __future__ import annotations

import argparse
import difflib

from ._cli import quiet_pipe, user_errors
from .config import ConfigError, packaged_configs, resolve_config

# The folder a method's configs sit in, where it differs from their DISTILLER.TYPE.
METHOD_FOLDERS = {"VANILLA": "NONE"}


def _method_type(value: str) -> str:
    """The DISTILLER.TYPE a --method value names: the type itself or its folder's name, in any case."""
    return METHOD_FOLDERS.get(value.upper(), value.upper())


def _check_choice(flag: str, value: str | None, choices: list[str], norm=str) -> None:
    """A filter that matches no packaged config is an error (not an empty table), with near names."""
    if value is None or norm(value) in choices:
        return
    near = difflib.get_close_matches(norm(value), choices, n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(near)}?" if near else f"choose from {', '.join(choices)}"
    raise ConfigError(f"{flag} {value!r}: no packaged config has it; {hint}")


def main(argv: list[str] | None = None) -> None:
    """Print every packaged config as a table, optionally filtered by dataset or method."""
    ap = argparse.ArgumentParser(prog="normkd-configs", description=__doc__)
    ap.add_argument("--dataset", help="only this dataset (cifar100, imagenet)")
    ap.add_argument(
        "--method",
        help="only this DISTILLER.TYPE (KD, DKD, KD_LS, DKD_LS, NORMKD, NORMDKD, or NONE: the folder vanilla/), any case",
    )
    ap.add_argument("--path", metavar="NAME", help="print the file of one packaged config and exit")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an input error instead of one line")
    args = ap.parse_args(argv)
    if args.path:
        with user_errors(ap.prog, args.debug):
            print(resolve_config(args.path, "--path"))
        return
    every = packaged_configs()
    with user_errors(ap.prog, args.debug):
        _check_choice("--dataset", args.dataset, sorted({r.dataset for r in every}))
        types = {r.method.upper() for r in every}
        names = types | {folder for folder, kind in METHOD_FOLDERS.items() if kind in types}
        _check_choice("--method", args.method, sorted(names), str.upper)
    rows = [
        r
        for r in every
        if (not args.dataset or r.dataset == args.dataset)
        and (not args.method or r.method.upper() == _method_type(args.method))
    ]
    header = ("dataset", "method", "teacher", "student", "--cfg name")
    table = [header] + [(r.dataset, r.method, r.teacher, r.student, r.name) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    with quiet_pipe():
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        print(f"{len(rows)} configs")


if __name__ == "__main__":
    main()
