"""python -m normkd_plugin.run PATH/TO/tools/train.py ARGS...: a host script with the plugins registered.

The script runs unchanged (``runpy`` as ``__main__``, ``sys.argv = [script, *ARGS]``, its folder
first on ``sys.path``), so every mdistiller script sees the registered distillers and config keys.
"""

from __future__ import annotations

import os
import runpy
import sys

import torch


def _stop(message: str) -> None:
    print(f"normkd_plugin.run: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Register the plugins, then execute the host script as ``__main__``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if argv else 2)
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        _stop(f"no such script: {argv[0]}")
    if not torch.cuda.is_available():
        _stop(
            f"{argv[0]} is an mdistiller script, and mdistiller moves its models to CUDA (distiller.cuda()); "
            "no CUDA device is available. On a CPU-only machine use normkd-train --device cpu ... SOLVER.TRAINER fast."
        )
    from . import register

    register()
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
