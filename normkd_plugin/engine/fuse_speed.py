"""SOLVER.FAST.FUSE and the measurements ``auto`` decides from: fused vs serial packs, per GPU model.

``on`` fuses on any device and ``off`` never. ``auto`` fuses a group of runs only where a recorded
measurement says the fused pack is faster: a row of ``fuse_speed.csv`` (package data, written by
``benchmarks/pack_speed.py --table`` and merged by ``benchmarks/gpu_unpack.sh``) for this GPU model,
student, precision and ``cudnn.benchmark`` setting, at the measured pack size nearest the group's.
Without such a row it does not fuse: fusing's own costs (grouped convolutions with many small
groups, which cuDNN runs slowly without ``cudnn.benchmark``, off whenever seeds are set; extra
copies around BatchNorm under vmap) may outweigh the launches it saves, and the serial pack is the
layout whose runs are bitwise those of solo runs. On a CPU it never fuses (grouped convolutions are
slower there: ``results/pack_speed-cpu.md``). ``NORMKD_FUSE_TABLE`` names a further table, read
first (a GPU machine's own measurement, before it is committed).
"""

from __future__ import annotations

import csv
import importlib.resources
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from yacs.config import CfgNode as CN

__all__ = ["FuseChoice", "Measurement", "choose", "merge_table", "read_table", "write_table"]

TABLE = "fuse_speed.csv"
ENV = "NORMKD_FUSE_TABLE"


@dataclass(frozen=True)
class Measurement:
    """ms per packed step of ``runs`` runs, serial (SOLVER.FAST.FUSE off) and fused (inf: fusing failed)."""

    device: str  # torch.cuda.get_device_name()
    student: str  # DISTILLER.STUDENT
    precision: str  # fp32, or bf16 (SOLVER.AMP)
    cudnn_benchmark: str  # on or off
    runs: int
    serial_ms: float
    fused_ms: float
    torch: str = ""
    note: str = ""

    def key(self) -> tuple:
        return self.device, self.student, self.precision, self.cudnn_benchmark, self.runs


COLUMNS = [f.name for f in fields(Measurement)]


def read_table(path: str | os.PathLike) -> list[Measurement]:
    """The rows of a measurement table; ConfigError naming the file (and line) when it cannot be read."""
    from ..config import ConfigError

    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != COLUMNS:
                raise ConfigError(f"{path}: not a fused-speed table (its header must be {','.join(COLUMNS)})")
            rows = []
            for row in reader:
                rows.append(_measurement(row))
                if rows[-1] is None:
                    raise ConfigError(
                        f"{path}: line {reader.line_num} is not a measurement: {','.join(map(str, row.values()))}"
                    )
            return rows
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the fused-speed table ({exc.strerror or exc})") from None


def _measurement(row: dict) -> Measurement | None:
    try:
        m = Measurement(
            **{
                **row,
                "runs": int(row["runs"]),
                "serial_ms": float(row["serial_ms"]),
                "fused_ms": float(row["fused_ms"]),
            }
        )
    except (TypeError, ValueError):  # a missing or extra field, a number that is not one
        return None
    usable = m.precision in ("fp32", "bf16") and m.cudnn_benchmark in ("on", "off") and m.runs > 0
    return m if usable and m.serial_ms > 0 and m.fused_ms > 0 else None  # fused_ms inf: fusing failed


def write_table(path: str | os.PathLike, rows: list[Measurement]) -> None:
    """Write ``rows`` sorted by device, student, precision, cudnn.benchmark and pack size."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(asdict(r) for r in sorted(rows, key=Measurement.key))


def merge_table(path: str | os.PathLike, new: list[Measurement]) -> None:
    """Put ``new`` into the table at ``path`` (created if missing), replacing rows of the same key."""
    old = read_table(path) if Path(path).exists() else []
    keys = {r.key() for r in new}
    write_table(path, [r for r in old if r.key() not in keys] + list(new))


def measurements() -> list[Measurement]:
    """The rows of $NORMKD_FUSE_TABLE (when set), then the packaged table's."""
    rows = read_table(os.environ[ENV]) if os.environ.get(ENV) else []
    with importlib.resources.as_file(importlib.resources.files(__package__) / TABLE) as packaged:
        return rows + read_table(packaged)


def choose(rows: list[Measurement], device: str, student: str, precision: str, benchmark: str, runs: int):
    """(fuse?, why): the first measured pack size nearest ``runs`` among the matching rows decides."""
    mine = [r for r in rows if r.key()[:4] == (device, student, precision, benchmark)]
    if not mine:
        return False, f"auto: no measurement for {student}, {precision}, cudnn.benchmark {benchmark} on {device}"
    best = min(mine, key=lambda r: abs(r.runs - runs))  # min keeps the first of equals: $NORMKD_FUSE_TABLE's
    measured = f"{best.runs} runs, fused {best.fused_ms:.2f} vs serial {best.serial_ms:.2f} ms per step on {device}"
    return best.fused_ms < best.serial_ms, f"auto: measured {measured}"


@dataclass(frozen=True)
class FuseChoice:
    """SOLVER.FAST.FUSE of a pack, the table read once (at the pack's start: a bad table stops the job before any run folder is made)."""

    value: str  # auto, on, off
    device: torch.device
    precision: str
    benchmark: str
    rows: tuple[Measurement, ...] = ()

    @classmethod
    def of(cls, cfg: CN, device: torch.device) -> FuseChoice:
        """The choice for a pack of ``cfg``'s execution settings on ``device`` (cudnn.benchmark as set now)."""
        value = str(cfg.SOLVER.FAST.FUSE)
        rows = tuple(measurements()) if value == "auto" and device.type == "cuda" else ()
        precision = "bf16" if cfg.SOLVER.AMP else "fp32"
        return cls(value, device, precision, "on" if torch.backends.cudnn.benchmark else "off", rows)

    def considered(self) -> bool:
        """Whether groups of fusable runs are looked for at all."""
        return self.value != "off"

    def fuses(self, student: str, runs: int) -> tuple[bool, str]:
        """(fuse?, why) for a group of ``runs`` fusable runs of ``student``."""
        if self.value != "auto":
            return self.value == "on", f"SOLVER.FAST.FUSE {self.value}"
        if self.device.type != "cuda":
            return False, "auto: fuses only on CUDA"
        name = torch.cuda.get_device_name(self.device)
        return choose(list(self.rows), name, student, self.precision, self.benchmark, runs)


def main(argv: list[str] | None = None) -> int:
    """``python -m normkd_plugin.engine.fuse_speed NEW.csv TABLE.csv``: merge a measurement into a table."""
    import argparse
    import sys

    from ..config import ConfigError

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("new")
    ap.add_argument("table")
    args = ap.parse_args(argv)
    try:
        new = read_table(args.new)
        merge_table(args.table, new)
    except ConfigError as exc:
        print(f"fuse_speed: {exc}", file=sys.stderr)
        return 2
    print(f"{args.table}: {len(new)} measurement(s) merged from {args.new}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
