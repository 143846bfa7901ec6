"""normkd-sweep: the normkd-train command of every (method, pair, seed) run, or run them in turn.

    normkd-sweep --dataset cifar100 --methods kd,dkd,normkd,normdkd --pairs all --seeds 0,1,2 [--run] [KEY VALUE ...]

Without --run it prints one command per line (for a cluster scheduler). With --run it executes
them one after another and skips any run whose folder already holds a finished worklog.txt
(a ``best_acc`` line), so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

from .pairs import METHODS, PAIRS


@dataclass(frozen=True)
class Job:
    """One run of the grid: its packaged config, seed and extra overrides."""

    cfg: str
    seed: int
    opts: tuple[str, ...]

    def argv(self) -> list[str]:
        return ["normkd-train", "--cfg", self.cfg, *self.opts, "EXPERIMENT.SEED", str(self.seed)]

    def command(self) -> str:
        return shlex.join(self.argv())


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def grid(dataset: str, methods: list[str], pairs: list[str], seeds: list[int], opts: list[str]) -> list[Job]:
    """Every (pair, method, seed) job, pairs in benchmark order; unknown names raise ValueError."""
    known = [p for p in PAIRS if p.dataset == dataset]
    if not known:
        raise ValueError(f"--dataset {dataset!r}; expected one of {sorted({p.dataset for p in PAIRS})}")
    stems = [p.stem for p in known]
    chosen = stems if pairs == ["all"] else pairs
    bad = [p for p in chosen if p not in stems] + [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(
            f"unknown pair or method {', '.join(bad)}; pairs: {', '.join(stems)}; methods: {', '.join(METHODS)}"
        )
    jobs = []
    for stem in chosen:
        for method in methods:
            name = f"{dataset}/{method}/{stem}" if dataset == "cifar100" else f"{dataset}/{stem}/{method}"
            jobs.extend(Job(name, seed, tuple(opts)) for seed in seeds)
    return jobs


def run_folder(job: Job) -> str:
    """The folder normkd-train will write for this job."""
    from .config import load_config, run_name

    opts = [*job.opts, "EXPERIMENT.SEED", str(job.seed)]
    cfg = load_config(job.cfg, opts)
    return os.path.join(cfg.LOG.PREFIX, run_name(cfg, opts))


def is_finished(folder: str) -> bool:
    """True when folder/worklog.txt ends the host's way, with a best_acc line."""
    try:
        with open(os.path.join(folder, "worklog.txt")) as f:
            return any(line.startswith("best_acc") for line in f)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    """Print or run the grid."""
    ap = argparse.ArgumentParser(
        prog="normkd-sweep", description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2]
    )
    ap.add_argument("--dataset", default="cifar100")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--pairs", default="all", help="comma-separated stems, or all")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--run", action="store_true", help="execute the commands one after another")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides passed to every run")
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in _split(args.seeds)]
        jobs = grid(args.dataset, _split(args.methods), _split(args.pairs), seeds, list(args.opts))
    except ValueError as exc:
        sys.exit(f"normkd-sweep: {exc}")
    if not args.run:
        for job in jobs:
            print(job.command())
        return
    for i, job in enumerate(jobs, 1):
        folder = run_folder(job)
        if is_finished(folder):
            print(f"[{i}/{len(jobs)}] skip (finished): {folder}", flush=True)
            continue
        print(f"[{i}/{len(jobs)}] {job.command()}", flush=True)
        resume = ["--resume"] if os.path.isfile(os.path.join(folder, "latest")) else []
        argv_ = [sys.executable, "-m", "normkd_plugin.train", *resume, *job.argv()[1:]]
        code = subprocess.call(argv_)
        if code:
            sys.exit(f"normkd-sweep: run failed with exit code {code}: {job.command()}")


if __name__ == "__main__":
    main()
