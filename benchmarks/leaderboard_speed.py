"""The leaderboard over many run folders: seconds for ``normkd-leaderboard`` on N synthetic finished runs.

    python benchmarks/leaderboard_speed.py [--runs 3000] [--epochs 240] [--keep DIR]

Each synthetic run is what normkd-train leaves: the full ``config.yaml`` dump of a packaged config
(the method and seed varied) and a 240-epoch ``worklog.txt`` ending with ``best_acc``. Prints the
wall and CPU time of the whole command (discover, read, aggregate, render markdown), best of
``--repeats``; on a shared machine the CPU time is the figure to compare. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import tempfile
import time
from pathlib import Path

from normkd_plugin.config import load_config
from normkd_plugin.leaderboard.cli import main as leaderboard
from normkd_plugin.worklog import block as worklog_block

METHODS = ("kd", "dkd", "normkd", "normdkd")


def make_runs(root: Path, runs: int, epochs: int) -> None:
    """``runs`` finished run folders under ``root`` (seeds over the four methods of res56_res20)."""
    rng = random.Random(0)
    dumps = {m: load_config(f"cifar100/{m}/res56_res20", ["SOLVER.TRAINER", "fast"]) for m in METHODS}
    for i in range(runs):
        method, seed = METHODS[i % 4], i // 4
        cfg = dumps[method].clone()
        cfg.defrost()
        cfg.EXPERIMENT.SEED = seed
        folder = root / "cifar100" / f"{method},res56,res20,SOLVER.TRAINER:fast,seed:{seed}"
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(cfg.dump())
        blocks, best = [], 0.0
        for e in range(1, epochs + 1):
            acc = min(75.0, 20 + e * 0.25 + rng.random())
            best = max(best, acc)
            record = dict(train_acc=acc + 5, train_loss=1.0, test_acc=acc, test_acc_top5=acc + 20, test_loss=1.2)
            blocks.append(worklog_block(e, 0.05, record))
        (folder / "worklog.txt").write_text("".join(blocks) + f"best_acc\t{best:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=240)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", metavar="DIR", help="make (or reuse) the runs in DIR instead of a temporary folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        if not (root / "cifar100").is_dir():
            t = time.perf_counter()
            make_runs(root, args.runs, args.epochs)
            print(f"made {args.runs} runs of {args.epochs} epochs in {time.perf_counter() - t:.1f} s")
        times, cpu = [], []
        for _ in range(args.repeats):
            out = io.StringIO()
            t, c = time.perf_counter(), time.process_time()
            with contextlib.redirect_stdout(out):
                leaderboard([str(root)])
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        rows = out.getvalue().count("\n| cifar100 |")
        print(
            f"normkd-leaderboard over {args.runs} runs: {min(times):.2f} s wall, {min(cpu):.2f} s CPU "
            f"(best of {args.repeats}; {rows} table rows)"
        )


if __name__ == "__main__":
    main()
