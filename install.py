#!/usr/bin/env python3
"""Install normkd-plugin (editable, with its test extra) and mdistiller at the pinned commit into this Python.

    python install.py                                  # with network: pip clones mdistiller at a08d46f (editable)
    MDISTILLER_SRC=/path/to/mdistiller python install.py   # a local checkout instead (offline, CI)
    python install.py --torch cpu                      # first PyTorch's CPU build (no CUDA libraries)

mdistiller is not on PyPI and its ``tools/train.py`` is not installed by its setup.py, so it is
installed as an editable checkout: with network, pip clones it at the pinned commit into
``--src DIR`` (default: ``src/`` of the active virtual environment); with ``MDISTILLER_SRC``, the
checkout there is used as it is (it must be writable: the editable install writes
``mdistiller.egg-info`` into it). The last line printed names the checkout that ``tools/train.py``
runs from. ``--torch cpu`` first installs torch and torchvision from PyTorch's CPU index (its Linux
wheels on PyPI bring several GB of CUDA libraries), unless this Python already has a CPU build of
both. Only the standard library is used here; pip does the rest.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
MDISTILLER_REPO = "https://github.com/megvii-research/mdistiller"
MDISTILLER_COMMIT = "a08d46f10d6102bd6e3f258ca5ac880b020ea259"


TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_REQUIREMENTS = ("nvidia-", "cuda-")  # what a CUDA build of torch requires on Linux (PyPI's default wheels)


def torch_build() -> str | None:
    """'cpu' or 'cuda' for this Python's installed torch (from its metadata: the local version label, and the
    CUDA packages a CUDA build requires), None without torch."""
    try:
        version = importlib.metadata.version("torch")
        requires = importlib.metadata.requires("torch") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    label = version.partition("+")[2]
    if label.startswith(("cu", "rocm")) or any(r.lower().startswith(CUDA_REQUIREMENTS) for r in requires):
        return "cuda"
    return "cpu"


def has_torchvision() -> bool:
    """Whether this Python has torchvision installed."""
    try:
        importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def torch_cpu_command(keep: str | None = None) -> list[str]:
    """pip's command for PyTorch's CPU build of torch and torchvision (this Python's pip); ``keep``: the version
    of a CPU torch already installed, pinned so that only torchvision is added."""
    torch = f"torch=={keep}" if keep else "torch"
    return [sys.executable, "-m", "pip", "install", torch, "torchvision", "--index-url", TORCH_CPU_INDEX]


def mdistiller_requirement(src: str | None) -> list[str]:
    """pip's arguments for mdistiller: the local checkout ``src``, else an editable clone at the pinned commit."""
    if src:
        return ["-e", src]
    return ["-e", f"git+{MDISTILLER_REPO}@{MDISTILLER_COMMIT}#egg=mdistiller"]


def pip_command(src: str | None, clone_into: str | None, extras: str = "test", with_mdistiller: bool = True):
    """The whole pip command line (this Python's pip)."""
    argv = [sys.executable, "-m", "pip", "install", "-e", f"{REPO}[{extras}]" if extras else str(REPO)]
    if with_mdistiller:
        argv += mdistiller_requirement(src)
        if not src and clone_into:
            argv += ["--src", clone_into]
    return argv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="install.py",
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--src", metavar="DIR", help="with network: where pip clones mdistiller (DIR/mdistiller)")
    ap.add_argument("--extras", default="test", help="extras of this package (default: test; '' for none)")
    ap.add_argument("--without-mdistiller", action="store_true", help="only this package (its tests then skip)")
    ap.add_argument(
        "--torch",
        choices=("pypi", "cpu"),
        default="pypi",
        help="pypi (default): torch as pip resolves it (on Linux, a CUDA build with its CUDA libraries); "
        "cpu: first torch and torchvision from PyTorch's CPU index, unless a CPU build is installed",
    )
    ap.add_argument("--dry-run", action="store_true", help="print the pip command(s) and stop")
    args = ap.parse_args(argv)
    src = os.environ.get("MDISTILLER_SRC") or None
    if src and not args.without_mdistiller:
        if not (Path(src) / "setup.py").is_file():
            print(f"install.py: MDISTILLER_SRC={src} is not an mdistiller checkout (no setup.py)", file=sys.stderr)
            return 2
        if not os.access(src, os.W_OK):
            print(
                f"install.py: MDISTILLER_SRC={src} is not writable (pip writes mdistiller.egg-info there)",
                file=sys.stderr,
            )
            return 2
    commands = [pip_command(src, args.src, args.extras, not args.without_mdistiller)]
    if args.torch == "cpu":
        build = torch_build()
        if build == "cuda":
            print(
                f"install.py: --torch cpu: this Python already has torch {importlib.metadata.version('torch')}, "
                "a CUDA build; uninstall it first (pip uninstall torch torchvision) or use a fresh environment",
                file=sys.stderr,
            )
            return 2
        if build == "cpu" and has_torchvision():
            print(f"torch {importlib.metadata.version('torch')} is a CPU build already; keeping it", flush=True)
        else:
            commands.insert(0, torch_cpu_command(importlib.metadata.version("torch") if build == "cpu" else None))
    if args.dry_run:
        print("\n".join(map(shlex.join, commands)))
        return 0
    for command in commands:
        print(shlex.join(command), flush=True)
        code = subprocess.call(command)
        if code:
            if command is not commands[-1]:
                hint = f"; without access to {TORCH_CPU_INDEX}, install torch yourself and leave out --torch cpu"
            else:
                hint = "" if src else "; offline, set MDISTILLER_SRC to a local mdistiller checkout and run it again"
            print(f"install.py: pip failed (exit {code}){hint}", file=sys.stderr)
            return code
    if args.without_mdistiller:
        return 0
    where = subprocess.run(
        [sys.executable, "-c", "import mdistiller, os; print(os.path.dirname(os.path.dirname(mdistiller.__file__)))"],
        capture_output=True,
        text=True,
    )
    if where.returncode:
        print(f"install.py: mdistiller does not import after the install:\n{where.stderr}", file=sys.stderr)
        return 1
    checkout = where.stdout.strip()
    print(
        f"mdistiller checkout: {checkout} (tools/train.py runs from there; normkd-teachers fills its download_ckpts/)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
