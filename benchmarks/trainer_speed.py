"""Training-step speed on one CUDA device: mdistiller's base trainer vs SOLVER.TRAINER fast.

    python benchmarks/trainer_speed.py --data CIFAR100_ROOT [--iters 300] [--out FILE]

resnet32x4 -> resnet8x4, KD, batch 64, real CIFAR-100 from a local folder, one process. The
teacher keeps its random initialisation (its weights do not change the work done). Rows:
base with its own DataLoader (the stock setting), base fed batches already on the GPU, fast in
float32, fast with SOLVER.AMP (bfloat16) and channels_last. Each fast row is timed after a
warm-up that includes the CUDA-graph capture. Not a test.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import tempfile
import time

import torch
from mdistiller.distillers import distiller_dict
from mdistiller.engine import trainer_dict
from mdistiller.engine.utils import AverageMeter
from mdistiller.models import cifar_model_dict

from normkd_plugin.config import load_config
from normkd_plugin.data import get_dataset


def _meters():
    return {k: AverageMeter() for k in ("training_time", "data_time", "losses", "top1", "top5")}


def _distiller(cfg, init):
    d = distiller_dict[cfg.DISTILLER.TYPE](*copy.deepcopy(init), cfg)
    return torch.nn.DataParallel(d.cuda())


def bench_base(cfg, init, loaders, iters, warmup, on_gpu):
    trainer = trainer_dict["base"]("bench-base", _distiller(cfg, init), *loaders, cfg)
    trainer.distiller.train()
    meters = _meters()
    batches = iter(loaders[0])
    if on_gpu:
        cached = [tuple(t.cuda() for t in next(batches)) for _ in range(20)]
        batches = itertools.cycle(cached)
    for _ in range(warmup):
        trainer.train_iter(next(batches), 1, meters)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        trainer.train_iter(next(batches), 1, meters)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def bench_fast(cfg, init, loaders, iters, warmup):
    trainer = trainer_dict["fast"]("bench-fast", _distiller(cfg, init), *loaders, cfg)
    pack, runs = trainer.pack, [trainer.run]
    pack.step.train_steps(runs, 1, warmup)  # includes the graph capture
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    steps = pack.step.train_steps(runs, 1, iters)  # same epoch: the captured graph is reused
    torch.cuda.synchronize()
    assert pack.step.graph.graph is not None, "the CUDA graph was not used"
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="CIFAR-100 folder (npz shards or cifar-100-python)")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    common = ["DATASET.ROOT", args.data, "DATASET.NUM_WORKERS", str(args.workers), "LOG.PREFIX", tempfile.mkdtemp()]
    cfg = load_config("cifar100/kd/res32x4_res8x4", common)
    loaders = get_dataset(cfg)[:2]
    torch.manual_seed(0)
    init = (cifar_model_dict["resnet8x4"][0](num_classes=100), cifar_model_dict["resnet32x4"][0](num_classes=100))
    # The fast trainer records what its run learns from, the teacher's file among it: the random teacher, saved.
    teacher_ckpt = os.path.join(tempfile.mkdtemp(), "resnet32x4.pt")
    torch.save(init[1].state_dict(), teacher_ckpt)
    rows = [
        ("base", "DataLoader (stock)", bench_base(cfg, init, loaders, args.iters, args.warmup, on_gpu=False)),
        ("base", "batches already on GPU", bench_base(cfg, init, loaders, args.iters, args.warmup, on_gpu=True)),
    ]
    for label, opts in [
        ("float32, CUDA graph", []),
        ("bf16 AMP + channels_last, CUDA graph", ["SOLVER.AMP", "True", "SOLVER.FAST.CHANNELS_LAST", "True"]),
    ]:
        fast = ["SOLVER.TRAINER", "fast", "DISTILLER.TEACHER_CKPT", teacher_ckpt, *opts]
        fcfg = load_config("cifar100/kd/res32x4_res8x4", common + fast)
        rows.append(("fast", label, bench_fast(fcfg, init, loaders, args.iters, args.warmup)))
    stock, on_gpu = rows[0][2], rows[1][2]
    card = torch.cuda.get_device_name()
    lines = [
        f"resnet32x4 -> resnet8x4, KD, batch 64, {args.iters} timed iterations, {card}, torch {torch.__version__}",
        "",
        "| trainer | setting | ms/iter | images/s | speed-up vs base (DataLoader) | vs base (GPU batches) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for trainer, label, sec in rows:
        lines.append(
            f"| {trainer} | {label} | {sec * 1e3:.2f} | {64 / sec:,.0f} | {stock / sec:.2f}× | {on_gpu / sec:.2f}× |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
