"""ImageNet packs against solo runs: seconds per image trained per run, decode-bound and compute-bound.

    python benchmarks/imagenet_pack.py [--device cpu|cuda] [--images N] [--batch 64] [--iters 10] [--warmup 2]
        [--decode host,cpu] [--workers 4] [--repeats 2] [--out results/imagenet_pack-DEVICE.md]

A pack of 4 runs (KD, DKD, NormKD, NormDKD of ``imagenet/r34_r18``, all seed 0, so they share each
decoded, augmented batch and one teacher forward; ``--methods`` for fewer) is timed against the same
runs trained solo (packs of one), fed by the loader source (``SOLVER.TRAINER ddp``) for each ``DATASET.DECODE``
asked for: ``host`` (mdistiller's ImageNet dataset, PIL decode and augmentation in the loader
workers), ``cpu`` or ``gpu`` (the workers read bytes; decode and augmentation in the training
process, on the CPU or with nvJPEG on the GPU). Two settings:

* ``compute-bound``: the r34_r18 configs as they are (ResNet34 teacher, ResNet18 student) on
  ImageNet-size JPEGs (256-500 px sides, ``--compute-sides``);
* ``decode-bound``: large JPEGs (1000-2000 px sides by default, ``--decode-sides``) and the
  cheapest models of the host's ``imagenet_model_dict`` (``--light``, default ResNet18 student and
  ResNet18 teacher: MobileNetV1 has fewer FLOPs but its depthwise convolutions train no faster on a
  CPU). DISTILLER.STUDENT / DISTILLER.TEACHER are overridden for this cost measurement only; the
  trained runs are not the paper's pair.

The JPEGs are real CIFAR-100 test images upscaled with PIL (``make_folder`` of
``imagenet_loader.py``). Teachers keep seeded random weights (they do not change the work). Each
measurement trains ``--warmup`` steps, then times ``--iters`` steps of one epoch (worker start-up
and, on CUDA, the graph capture fall in the warm-up). Reported per setting and decode mode, summed
over ``--repeats`` rounds of (4 solo runs, then the pack) so that load from other processes falls
on both alike:

* seconds per image trained per run (solo: the solo runs' time over their images; pack: the
  pack's time over the images of all its runs) and the ratio pack / solo (below 1: the pack is cheaper);
* the share of the timed wall clock the training loop spends getting its batches (waiting for the
  loader, and in the ``cpu``/``gpu`` modes decoding and augmenting in the training process) against
  training; a share near 1 is decode-bound, near 0 compute-bound. On CUDA the device is
  synchronised around each batch fetch so that the split is exact; the timings include those syncs.

It prints a markdown table with the command line, the CPU model and the load average. Not a test.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imagenet_loader import cpu_model, make_folder  # noqa: E402  (the JPEG folder and CPU line, shared)

from normkd_plugin.build import build_pack  # noqa: E402
from normkd_plugin.config import load_config, run_name  # noqa: E402
from normkd_plugin.engine.source import Epoch  # noqa: E402
from normkd_plugin.run_folder import RunFolder  # noqa: E402

METHODS = ("kd", "dkd", "normkd", "normdkd")
PAIR = "imagenet/r34_r18"
SETTINGS = ("compute", "decode")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sides(text: str) -> tuple[int, int]:
    lo, hi = (int(v) for v in text.split(","))
    return lo, hi


def teacher_ckpt(name: str, folder: Path) -> str:
    """A checkpoint {"model": state dict} of the host's ImageNet ``name`` with seeded random weights."""
    from mdistiller.models import imagenet_model_dict

    path = folder / f"{name}.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save({"model": imagenet_model_dict[name](pretrained=False).state_dict()}, path)
    return str(path)


def measure(cfgs, names, prefix: str, device: torch.device, warmup: int, iters: int) -> tuple[float, float, int]:
    """(timed seconds, of which getting batches, images trained per run) of one pack of ``cfgs``."""
    pack = build_pack(cfgs, names, [RunFolder(os.path.join(prefix, n)) for n in names], device)
    source, clock = pack.source, {"start": None, "fetch": 0.0}
    epoch_of = source.epoch

    def timed_epoch(seeds, epoch, limit):
        batches = epoch_of(seeds, epoch, limit)

        def batch(k: int):
            if k < warmup:
                return batches.batch(k)
            _sync(device)  # the previous step's work counts as training
            t = time.perf_counter()
            if clock["start"] is None:
                clock["start"] = t
            out = batches.batch(k)
            _sync(device)  # a decode on the device counts as getting the batch
            clock["fetch"] += time.perf_counter() - t
            return out

        return Epoch(batches.steps, batches.full_steps, batch)

    source.epoch = timed_epoch
    try:
        steps = pack.step.train_steps(pack.runs, 1, warmup + iters)
        _sync(device)
        end = time.perf_counter()
    finally:
        pack.close()  # its loaders' persistent workers stop before the next measurement
        for run in pack.runs:
            if run.writer is not None:
                run.writer.close()
    if steps <= warmup or clock["start"] is None:
        raise SystemExit(f"imagenet_pack: only {steps} steps ran; give --images >= (warmup + iters) x batch")
    return end - clock["start"], clock["fetch"], (steps - warmup) * int(cfgs[0].SOLVER.BATCH_SIZE)


def configs(setting: str, decode: str, args, root: Path, ckpts: dict[str, str], prefix: str):
    """The 4 runs' configs and names for ``setting`` and ``decode``."""
    common = [
        "SOLVER.TRAINER", "ddp", "DATASET.DECODE", decode, "DATASET.ROOT", str(root),
        "DATASET.NUM_WORKERS", str(args.workers), "SOLVER.BATCH_SIZE", str(args.batch),
        "DATASET.TEST.BATCH_SIZE", str(args.batch), "LOG.PREFIX", prefix, "EXPERIMENT.SEED", "0",
    ]  # fmt: skip
    if setting == "decode":
        student, teacher = args.light.split(",")
        common += ["DISTILLER.STUDENT", student, "DISTILLER.TEACHER", teacher]
    else:
        teacher = "ResNet34"
    common += ["DISTILLER.TEACHER_CKPT", ckpts[teacher]]
    cfgs = [load_config(f"{PAIR}/{m}", common) for m in args.methods.split(",")]
    return cfgs, [run_name(cfg, common) for cfg in cfgs]


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--images", type=int, help="training JPEGs per setting (default (warmup + iters) x batch)")
    p.add_argument("--batch", type=int, default=64, help="SOLVER.BATCH_SIZE (default 64)")
    p.add_argument("--iters", type=int, default=10, help="timed steps per measurement (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2; >= 1 on CUDA)")
    p.add_argument("--decode", default="auto", help="comma-separated DATASET.DECODE modes (auto: host,cpu or host,gpu)")
    p.add_argument("--workers", type=int, default=4, help="DATASET.NUM_WORKERS (default 4)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of (solo runs, pack) per row (default 2)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="compute,decode (default both)")
    p.add_argument("--compute-sides", type=_sides, default=(256, 500), help="JPEG sides, compute-bound (256,500)")
    p.add_argument("--decode-sides", type=_sides, default=(1000, 2000), help="JPEG sides, decode-bound (1000,2000)")
    p.add_argument("--light", default="ResNet18,ResNet18", help="STUDENT,TEACHER of the decode-bound setting")
    p.add_argument("--methods", default=",".join(METHODS), help="the pack's runs (default kd,dkd,normkd,normdkd)")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    decodes = ["host", "gpu" if device.type == "cuda" else "cpu"] if args.decode == "auto" else args.decode.split(",")
    settings, k = args.settings.split(","), len(args.methods.split(","))
    images = args.images or (args.warmup + args.iters) * args.batch
    load_before = os.getloadavg()

    rows = []
    with tempfile.TemporaryDirectory(prefix="imagenet_pack_") as tmp:
        tmp_path = Path(tmp)
        ckpts = {name: teacher_ckpt(name, tmp_path) for name in {"ResNet34", *args.light.split(",")[1:]}}
        count = 0
        for setting in settings:
            sides = args.compute_sides if setting == "compute" else args.decode_sides
            root = tmp_path / f"jpeg_{setting}"
            _, mpix = make_folder(root, images, sides=sides)
            models = "ResNet34 -> ResNet18" if setting == "compute" else " -> ".join(reversed(args.light.split(",")))
            for decode in decodes:
                totals = {"solo": [0.0, 0.0, 0], "pack": [0.0, 0.0, 0]}
                ratios = []
                for _ in range(args.repeats):
                    per_run = {}
                    for kind in ("solo", "pack"):  # interleaved: solo, pack, solo, pack, ...
                        count += 1
                        prefix = str(tmp_path / f"runs{count}")
                        cfgs, names = configs(setting, decode, args, root, ckpts, prefix)
                        groups = [([c], [n]) for c, n in zip(cfgs, names)] if kind == "solo" else [(cfgs, names)]
                        sec = fetch = 0.0
                        run_images = 0
                        for cs, ns in groups:
                            s, f, n = measure(cs, ns, prefix, device, args.warmup, args.iters)
                            sec, fetch, run_images = sec + s, fetch + f, run_images + n * len(cs)
                        t = totals[kind]
                        t[0], t[1], t[2] = t[0] + sec, t[1] + fetch, t[2] + run_images
                        per_run[kind] = sec / run_images
                        print(
                            f"{setting} {decode} {kind}: {sec:.2f} s, {per_run[kind]:.4f} s/img/run, "
                            f"batches {fetch / sec:.0%}",
                            file=sys.stderr,
                            flush=True,
                        )
                    ratios.append(per_run["pack"] / per_run["solo"])
                solo, pack = (totals[k][0] / totals[k][2] for k in ("solo", "pack"))
                share = {k: totals[k][1] / totals[k][0] for k in totals}
                rows.append((setting, decode, models, sides, mpix, solo, pack, share, ratios))
    load_after = os.getloadavg()

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    command = "python benchmarks/imagenet_pack.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [
        f"`{command}`",
        "",
        f"CPU: {cpu_model()}, {cores} cores usable; torch threads {torch.get_num_threads()}; GPU: {gpu}; "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}",
        "Load average (1, 5, 15 min) before: {:.2f}, {:.2f}, {:.2f}; after: {:.2f}, {:.2f}, {:.2f}".format(
            *load_before, *load_after
        ),
        f"Device {device.type}; batch {args.batch}; {args.warmup} warm-up + {args.iters} timed steps per measurement; "
        f"{images} training JPEGs per setting; {args.workers} loader workers; {args.repeats} rounds of "
        f"({k} solo runs, then the pack of {k}: {args.methods}, seed 0) per row.",
        "Settings: compute-bound = the imagenet/r34_r18 configs on ImageNet-size JPEGs; decode-bound = large JPEGs "
        "and the cheapest host models (DISTILLER.STUDENT/TEACHER overridden, for cost only). JPEGs: real CIFAR-100 "
        "test images upscaled (PIL bicubic) to random sides, quality 90.",
        "",
        "| setting | decode | teacher -> student | JPEG sides (mean MP) | solo s/img/run | pack s/img/run "
        "| pack/solo | batches share solo | batches share pack | pack/solo per round |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for setting, decode, models, sides, mpix, solo, pack, share, ratios in rows:
        lines.append(
            f"| {setting}-bound | {decode} | {models} | {sides[0]}-{sides[1]} px ({mpix:.2f}) | {solo:.4f} | "
            f"{pack:.4f} | {pack / solo:.3f} | {share['solo']:.0%} | {share['pack']:.0%} | "
            f"{', '.join(f'{r:.3f}' for r in ratios)} |"
        )
    lines += [
        "",
        "s/img/run: timed seconds per image trained by one run (the pack's time is shared by its runs). "
        "Batches share: of the timed wall clock, the part the training loop spent getting its batches (waiting "
        "for the loader workers; in the cpu/gpu modes also decoding and augmenting in the training process); "
        "the rest is training.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)
    return table


if __name__ == "__main__":
    main()
