"""The jobs of a sweep: the grid of (pair, method, seed) runs, grouped by teacher into packs, and their folders."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from .pairs import PAIRS
from .pairs import methods as dataset_methods

__all__ = ["Job", "PackJob", "grid", "packs", "job_folder", "split_names"]


@dataclass(frozen=True)
class Job:
    """One run of the grid: its packaged config, seed and extra overrides."""

    cfg: str
    seed: int
    opts: tuple[str, ...]
    teacher: str = ""  # the pair's teacher: runs of one teacher can share a pack

    def argv(self) -> list[str]:
        return ["normkd-train", "--cfg", self.cfg, *self.opts, "EXPERIMENT.SEED", str(self.seed)]

    def command(self) -> str:
        return shlex.join(self.argv())

    def runs(self) -> list[tuple[str, int]]:
        return [(self.cfg, self.seed)]


@dataclass(frozen=True)
class PackJob:
    """Configs x seeds of one teacher, trained together: ``normkd-train --cfg A --cfg B --seeds S``."""

    cfgs: tuple[str, ...]
    seeds: tuple[int, ...]
    opts: tuple[str, ...]

    def argv(self) -> list[str]:
        cfgs = [x for cfg in self.cfgs for x in ("--cfg", cfg)]
        return ["normkd-train", *cfgs, "--seeds", ",".join(map(str, self.seeds)), *self.opts]

    def command(self) -> str:
        return shlex.join(self.argv())

    def runs(self) -> list[tuple[str, int]]:
        return [(cfg, seed) for cfg in self.cfgs for seed in self.seeds]


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)] if size > 0 else [items]


def packs(jobs: list[Job], max_runs: int = 0, trainer: str = "fast") -> list[PackJob]:
    """Group jobs by teacher into packs of configs x seeds, each at most ``max_runs`` runs (0: no limit); SOLVER.TRAINER
    ``trainer`` unless the jobs' overrides name one."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.teacher, []).append(job)
    out = []
    for group in groups.values():
        cfgs = list(dict.fromkeys(j.cfg for j in group))
        seeds = list(dict.fromkeys(j.seed for j in group))
        opts = list(group[0].opts)
        if "SOLVER.TRAINER" not in opts[::2]:
            opts += ["SOLVER.TRAINER", trainer]
        for seed_chunk in _chunks(seeds, max_runs if max_runs and len(seeds) > max_runs else 0):
            per_pack = max(1, max_runs // len(seed_chunk)) if max_runs else 0
            out += [PackJob(tuple(c), tuple(seed_chunk), tuple(opts)) for c in _chunks(cfgs, per_pack)]
    return out


def split_names(value: str) -> list[str]:
    """The comma-separated names of ``value`` (blanks dropped)."""
    return [v.strip() for v in value.split(",") if v.strip()]


def grid(dataset: str, methods: list[str], pairs: list[str], seeds: list[int], opts: list[str]) -> list[Job]:
    """Every (pair, method, seed) job, pairs in benchmark order; unknown names raise ValueError."""
    known = [p for p in PAIRS if p.dataset == dataset]
    if not known:
        raise ValueError(f"--dataset {dataset!r}; expected one of {sorted({p.dataset for p in PAIRS})}")
    stems = [p.stem for p in known]
    chosen = stems if pairs == ["all"] else pairs
    offered = dataset_methods(dataset)
    bad = [p for p in chosen if p not in stems] + [m for m in methods if m not in offered]
    if bad:
        raise ValueError(
            f"unknown pair or method {', '.join(bad)}; pairs: {', '.join(stems)}; methods: {', '.join(offered)}"
        )
    jobs = []
    for pair in (p for p in known if p.stem in chosen):
        stem = pair.stem
        for method in methods:
            name = f"{dataset}/{method}/{stem}" if dataset == "cifar100" else f"{dataset}/{stem}/{method}"
            jobs.extend(Job(name, seed, tuple(opts), pair.teacher) for seed in seeds)
    return jobs


def job_folder(cfg_name: str, seed: int, opts: tuple[str, ...]) -> str:
    """The folder normkd-train will write for the run of ``cfg_name`` with ``seed``."""
    from .config import load_config, run_folder_path, run_name

    opts = [*opts, "EXPERIMENT.SEED", str(seed)]
    cfg = load_config(cfg_name, opts)
    return run_folder_path(cfg, run_name(cfg, opts))
