"""Loss cost, forward + backward, on one CUDA device: host KD/DKD vs NormKD/NormDKD (reference, fused).

    python benchmarks/loss_speed.py [--repeats 300] [--out results/loss_speed-<card>.md]

Median of per-call CUDA-event timings after warm-up, the cases interleaved in rounds; each
call is the loss forward plus ``torch.autograd.grad`` with respect to the student logits. At
these sizes the work is launch-bound, so the times are mostly the host's cost of issuing
kernels. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from mdistiller.distillers.DKD import dkd_loss
from mdistiller.distillers.KD import kd_loss

from normkd_plugin.losses import normdkd_loss, normkd_loss

SIZES = [(64, 100), (512, 1000), (4096, 1000)]


def time_calls(fn, zs, calls: int) -> list[float]:
    """Microseconds of each of ``calls`` forward + backward passes of fn(zs), by CUDA events."""
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.autograd.grad(fn(zs), zs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return times


def interleaved_medians(cases: dict, zs, repeats: int, rounds: int = 10) -> dict[str, float]:
    """Median per case over ``rounds`` interleaved blocks, so drift in clocks hits every case alike."""
    for fn in cases.values():
        time_calls(fn, zs, 30)  # warm-up: kernel compilation, allocator, clocks
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            times[name] += time_calls(fn, zs, max(1, repeats // rounds))
    return {name: statistics.median(t) for name, t in times.items()}


def loss_cases(zt, y) -> dict:
    """name -> fn(student_logits) for the host's losses and ours, reference and fused."""
    return {
        "KD (host, T=4)": lambda s: kd_loss(s, zt, 4.0),
        "DKD (host, T=4)": lambda s: dkd_loss(s, zt, y, 1.0, 8.0, 4.0),
        "NormKD reference": lambda s: normkd_loss(s, zt, 2.0, fused=False),
        "NormKD fused": lambda s: normkd_loss(s, zt, 2.0, fused=True),
        "NormDKD reference": lambda s: normdkd_loss(s, zt, y, 1.0, 8.0, 2.0, fused=False),
        "NormDKD fused": lambda s: normdkd_loss(s, zt, y, 1.0, 8.0, 2.0, fused=True),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=600)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="size_average")
    card = torch.cuda.get_device_name()
    rows = []
    for n, c in SIZES:
        torch.manual_seed(0)
        zs = (torch.randn(n, c, device="cuda") * 3).requires_grad_()
        zt = torch.randn(n, c, device="cuda") * 4
        y = torch.randint(0, c, (n,), device="cuda")
        cases = loss_cases(zt, y)
        us = interleaved_medians(cases, zs, args.repeats)
        for name, t in us.items():
            base = us["DKD (host, T=4)"] if "DKD" in name else us["KD (host, T=4)"]
            rows.append((f"{n}x{c}", name, t, t / base))
    lines = [
        f"Loss forward+backward, median of {args.repeats} (CUDA events), {card}, torch {torch.__version__}",
        "",
        "| logits | loss | µs | ratio to host (KD for NormKD, DKD for NormDKD) |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {size} | {name} | {t:.1f} | {r:.2f}× |" for size, name, t, r in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
