"""Packed training: K runs of one teacher in one process and one CUDA graph, against solo runs.

    python benchmarks/pack_speed.py --data CIFAR100_ROOT [--iters 200] [--out results/pack_speed-CARD.md]
                                    [--cudnn-benchmark off,on] [--table fuse_speed.csv]

For resnet56 -> resnet20 and resnet32x4 -> resnet8x4 (batch 64, real CIFAR-100 from a local
folder), in float32 and bf16 (+ channels_last): ms per packed step for K = 1, 4 (KD, DKD, NormKD,
NormDKD; one seed), 12 (the 4 methods x 3 seeds, so 3 distinct batches a step), 15 (the vanilla
student and the 4 methods x 3 seeds) and 21 (the comparison: those and KD+LS, DKD+LS x 3 seeds); each run's cost (ms per step / K)
relative to a solo ``fast`` run of the same precision and to mdistiller's stock ``base`` trainer
(``cudnn.benchmark`` on, as its tools/train.py sets it) measured in the same process; peak GPU
memory of the pack alone (the previous pack collected first). Teachers keep a random
initialisation (their weights do not change the work). Timed after a warm-up that includes the
graph capture. Packs of K > 1 are timed in three layouts: students one after another in the step
("serial", FUSE off), each on its own forked CUDA stream ("branches", SOLVER.FAST.PACK_BRANCHES)
and all students as one network ("fused", SOLVER.FAST.FUSE on). ``cudnn.benchmark`` is off in
seeded runs (as every run of the comparison is) and on otherwise: ``--cudnn-benchmark`` times
either or both. A case that fails (a capture that fails, an error, out of memory) says so in its
row, and the table goes on. ``--table`` merges each K's serial and fused times into the CSV that
``SOLVER.FAST.FUSE auto`` decides from (:mod:`normkd_plugin.engine.fuse_speed`; a fused case that
failed is recorded as infinitely slow). Runs on a CPU too (``--device cpu``, eager: serial and
fused), for checking the script and comparing layouts there. Not a test.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_speed import bench_base  # noqa: E402  (the stock trainer's timing, shared)

from normkd_plugin.build import build_pack  # noqa: E402
from normkd_plugin.config import load_config, run_name  # noqa: E402
from normkd_plugin.data import get_dataset  # noqa: E402
from normkd_plugin.engine.fuse_speed import Measurement, merge_table  # noqa: E402
from normkd_plugin.run_folder import RunFolder  # noqa: E402

METHODS = ("kd", "dkd", "normkd", "normdkd")
PAIRS = {"res56_res20": ("resnet56", "resnet20"), "res32x4_res8x4": ("resnet32x4", "resnet8x4")}
PRECISIONS = {"fp32": [], "bf16": ["SOLVER.AMP", "True", "SOLVER.FAST.CHANNELS_LAST", "True"]}
LAYOUTS = {
    "serial": ["SOLVER.FAST.FUSE", "off"],
    "branches": ["SOLVER.FAST.FUSE", "off", "SOLVER.FAST.PACK_BRANCHES", "True"],  # forked streams
    "fused": ["SOLVER.FAST.FUSE", "on"],  # one network for all students
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _collect(device: torch.device) -> None:
    """Free what earlier cases left (a pack lives in reference cycles), so a peak counts one pack."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def graph_note(step, device: torch.device) -> str:
    """'' when a pack's steps (``pack.step``) were replayed from its CUDA graph (or the device has none), else why not."""
    if device.type != "cuda" or step.graph.graph is not None:
        return ""
    return f"eager: graph capture failed ({step.graph.failure})" if step.graph.failure else "eager: no graph"


def bench_pack(stem, k, extra, common, device, iters, warmup, benchmark=False) -> tuple[float, float, str]:
    """(seconds per packed step, peak memory in GiB, note) for a pack of ``k`` runs; the note says what went eager."""
    seeds = (0, 1, 2) if k >= 12 else (0,)
    methods = {1: ("normkd",), 15: ("vanilla", *METHODS), 21: ("vanilla", *METHODS, "kd_ls", "dkd_ls")}.get(k, METHODS)
    cfgs, names = [], []
    for method in methods:
        for seed in seeds:
            opts = [*common, *extra, "SOLVER.TRAINER", "fast", "EXPERIMENT.SEED", str(seed)]
            if method == "vanilla":  # the student alone, as the comparison trains it
                opts += ["DISTILLER.TYPE", "NONE"]
            cfg = load_config(f"cifar100/{'kd' if method == 'vanilla' else method}/{stem}", opts)
            cfgs.append(cfg)
            names.append(run_name(cfg, opts))
    assert len(cfgs) == k
    prefix = cfgs[0].LOG.PREFIX
    _collect(device)
    pack = build_pack(cfgs, names, [RunFolder(os.path.join(prefix, n)) for n in names], device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = benchmark  # build_pack turned it off: the runs are seeded
        torch.cuda.reset_peak_memory_stats()
    pack.step.train_steps(pack.runs, 1, warmup)  # includes the graph capture
    _sync(device)
    t0 = time.perf_counter()
    steps = pack.step.train_steps(pack.runs, 1, iters)  # same epoch: the captured graph is replayed
    _sync(device)
    sec = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return sec, mem, graph_note(pack.step, device)


def _teacher_ckpt(name: str, folder: str) -> str:
    from mdistiller.models import cifar_model_dict

    path = os.path.join(folder, f"{name}.pt")
    torch.manual_seed(0)
    torch.save(cifar_model_dict[name][0](num_classes=100).state_dict(), path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="CIFAR-100 folder (npz shards or cifar-100-python)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--sizes", default="1,4,12,15,21")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="of K > 1 packs (branches: CUDA only)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--cudnn-benchmark", default="off", help="off, on or off,on (CUDA only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--table", default=None, help="merge the serial and fused times into this CSV (FUSE auto's)")
    args = ap.parse_args()
    device = torch.device(args.device)
    tmp = tempfile.mkdtemp()
    sizes = [int(s) for s in args.sizes.split(",")]
    settings = args.cudnn_benchmark.split(",") if device.type == "cuda" else ["–"]
    card = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    lines = [
        f"Packed training, batch 64, {args.iters} timed steps, {card}, torch {torch.__version__}",
        "",
        "| pair | precision | cudnn.benchmark | runs K | ms / packed step | ms / run-step | vs solo fast "
        "| vs base (stock) | peak GiB | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    table = []
    for stem in args.pairs.split(","):
        teacher, student = PAIRS[stem]
        ckpt = _teacher_ckpt(teacher, tmp)
        common = ["DATASET.ROOT", args.data, "DATASET.NUM_WORKERS", str(args.workers)]
        common += ["DISTILLER.TEACHER_CKPT", ckpt, "LOG.PREFIX", os.path.join(tmp, stem)]
        base = float("nan")
        if device.type == "cuda":
            cfg = load_config(f"cifar100/kd/{stem}", common)
            torch.manual_seed(0)
            from mdistiller.models import cifar_model_dict

            init = (cifar_model_dict[student][0](num_classes=100), cifar_model_dict[teacher][0](num_classes=100))
            torch.backends.cudnn.benchmark = True  # as tools/train.py sets it
            base = bench_base(cfg, init, get_dataset(cfg)[:2], args.iters, args.warmup, on_gpu=False)
        layouts = [lay for lay in args.layouts.split(",") if lay != "branches" or device.type == "cuda"]
        for precision in args.precisions.split(","):
            for setting in settings:
                extra, solo, serial = PRECISIONS[precision], None, {}
                cases = [(1, "solo", extra + LAYOUTS["serial"])] if 1 in sizes else []
                cases += [(k, lay, extra + LAYOUTS[lay]) for k in sizes if k > 1 for lay in layouts]
                for k, layout, opts in cases:
                    row = f"| {stem} | {precision} | {setting} | {k} {layout} |"
                    try:
                        sec, mem, note = bench_pack(
                            stem, k, opts, common, device, args.iters, args.warmup, setting == "on"
                        )
                    except Exception as exc:  # the row says what failed; the table goes on
                        traceback.print_exc()
                        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                        lines.append(f"{row} – | – | – | – | – | failed: {why} |")
                        print(lines[-1], flush=True)
                        sec, note = float("inf"), why
                        _collect(device)
                    else:
                        per_run = sec / k
                        solo = per_run if k == 1 else solo
                        vs_solo = f"{per_run / solo:.3f}×" if solo else "–"
                        lines.append(
                            f"{row} {sec * 1e3:.2f} | {per_run * 1e3:.2f} | {vs_solo} | "
                            f"{per_run / base:.3f}× | {mem:.2f} | {note} |"
                        )
                        print(lines[-1], flush=True)
                    if layout == "serial":
                        serial[k] = sec
                    elif layout == "fused" and math.isfinite(serial.get(k, math.inf)):
                        table.append(
                            Measurement(
                                card,
                                student,
                                precision,
                                "on" if setting == "on" else "off",
                                k,
                                serial[k] * 1e3,
                                sec * 1e3,
                                torch.__version__,
                                note,
                            )
                        )
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.table and table:
        merge_table(args.table, table)
        print(f"{args.table}: {len(table)} measurement(s) of fused vs serial packs")


if __name__ == "__main__":
    main()
