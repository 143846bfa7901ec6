"""Packed training: K runs of one teacher in one process and one CUDA graph, against solo runs.

    python benchmarks/pack_speed.py --data CIFAR100_ROOT [--iters 200] [--out results/pack_speed-CARD.md]

For resnet56 -> resnet20 and resnet32x4 -> resnet8x4 (batch 64, real CIFAR-100 from a local
folder), in float32 and bf16 (+ channels_last): ms per packed step for K = 1, 4 (KD, DKD, NormKD,
NormDKD; one seed), 12 (the 4 methods x 3 seeds, so 3 distinct batches a step) and 15 (the
comparison: the vanilla student and the 4 methods x 3 seeds); each run's cost (ms per step / K)
relative to a solo ``fast`` run of the same precision and to mdistiller's stock ``base`` trainer
measured in the same process; peak GPU memory. Teachers keep a random initialisation (their
weights do not change the work). Timed after a warm-up that includes the graph capture. Packs of
K > 1 are timed in three layouts: students one after another in the step ("serial", FUSE off), each
on its own forked CUDA stream ("branches", SOLVER.FAST.PACK_BRANCHES) and all students as one
network ("fused", SOLVER.FAST.FUSE on). Runs on a CPU too (``--device cpu``, eager: serial and
fused), for checking the script and comparing layouts there. Not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_speed import bench_base  # noqa: E402  (the stock trainer's timing, shared)

from normkd_plugin.build import build_pack  # noqa: E402
from normkd_plugin.config import load_config, run_name  # noqa: E402
from normkd_plugin.data import get_dataset  # noqa: E402
from normkd_plugin.runs import RunFolder  # noqa: E402

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


def bench_pack(stem, k, extra, common, device, iters, warmup) -> tuple[float, float]:
    """(seconds per packed step, peak memory in GiB) for a pack of ``k`` runs."""
    seeds = (0, 1, 2) if k >= 12 else (0,)
    methods = ("normkd",) if k == 1 else ("vanilla", *METHODS) if k == 15 else METHODS
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
    pack = build_pack(cfgs, names, [RunFolder(os.path.join(prefix, n)) for n in names], device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pack.train_iterations(pack.runs, 1, warmup)  # includes the graph capture
    _sync(device)
    t0 = time.perf_counter()
    steps = pack.train_iterations(pack.runs, 1, iters)  # same epoch: the captured graph is replayed
    _sync(device)
    sec = (time.perf_counter() - t0) / steps
    if device.type == "cuda":
        assert pack.graph.graph is not None, "the CUDA graph was not used"
        return sec, torch.cuda.max_memory_allocated() / 2**30
    return sec, float("nan")


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
    ap.add_argument("--sizes", default="1,4,12,15")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="of K > 1 packs (branches: CUDA only)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    tmp = tempfile.mkdtemp()
    sizes = [int(s) for s in args.sizes.split(",")]
    card = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    lines = [
        f"Packed training, batch 64, {args.iters} timed steps, {card}, torch {torch.__version__}",
        "",
        "| pair | precision | runs K | ms / packed step | ms / run-step | vs solo fast | vs base (stock) | peak GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
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
            base = bench_base(cfg, init, get_dataset(cfg)[:2], args.iters, args.warmup, on_gpu=False)
        layouts = [lay for lay in args.layouts.split(",") if lay != "branches" or device.type == "cuda"]
        for precision in args.precisions.split(","):
            extra, solo = PRECISIONS[precision], None
            cases = [(1, "solo", extra + LAYOUTS["serial"])] if 1 in sizes else []
            cases += [(k, lay, extra + LAYOUTS[lay]) for k in sizes if k > 1 for lay in layouts]
            for k, layout, opts in cases:
                sec, mem = bench_pack(stem, k, opts, common, device, args.iters, args.warmup)
                per_run = sec / k
                solo = per_run if k == 1 else solo
                vs_solo = f"{per_run / solo:.3f}×" if solo else "–"
                lines.append(
                    f"| {stem} | {precision} | {k} {layout} | {sec * 1e3:.2f} | {per_run * 1e3:.2f} | {vs_solo} | "
                    f"{per_run / base:.3f}× | {mem:.2f} |"
                )
                print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
