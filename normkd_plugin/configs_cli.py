"""normkd-configs: list the packaged configs (dataset, method, teacher, student, name for --cfg)."""

from __future__ import annotations

import argparse

from ._cli import quiet_pipe, user_errors
from .config import packaged_configs, resolve_config


def main(argv: list[str] | None = None) -> None:
    """Print every packaged config as a table, optionally filtered by dataset or method."""
    ap = argparse.ArgumentParser(prog="normkd-configs", description=__doc__)
    ap.add_argument("--dataset", help="only this dataset (cifar100, imagenet)")
    ap.add_argument("--method", help="only this DISTILLER.TYPE (KD, DKD, NORMKD, NORMDKD)")
    ap.add_argument("--path", metavar="NAME", help="print the file of one packaged config and exit")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an input error instead of one line")
    args = ap.parse_args(argv)
    if args.path:
        with user_errors(ap.prog, args.debug):
            print(resolve_config(args.path))
        return
    rows = [
        r
        for r in packaged_configs()
        if (not args.dataset or r.dataset == args.dataset)
        and (not args.method or r.method.upper() == args.method.upper())
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
