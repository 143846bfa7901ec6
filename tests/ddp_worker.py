"""One rank of a test job: ``torchrun ... tests/ddp_worker.py --out DIR [--fixed-augment] [--fail R:E] [--nan R:E:S] -- ARGS``,
or the same ranks forked by :func:`forked_job`.

Runs ``normkd_plugin.train.main(ARGS)`` (the normkd-train command line) with, for the tests:

* ``--fixed-augment``: CIFAR training images get the host's test transform (no random crop or
  flip), so a reference in the test can rebuild every batch from the sample indices alone;
* ``--fail R:E``: rank R raises as it takes its first batch of epoch E (a hook of the engine);
* ``--fail-disk R:E``: the same with a full disk's FolderError (an input error: one line and exit 2);
* ``--nan R:E:S``: rank R's training loss is NaN at step S (from 1) of epoch E (see :func:`nan_loss_at`);
* records per rank in ``DIR/rank<R>.pt``: the sample indices of every step, the metrics each rank's
  validation returned, and the distiller's final state;
* each rank works in its own empty directory ``DIR/cwd<R>``, so relative paths show who wrote what.

:func:`forked_job` is a launcher for the tests that do not test torchrun itself: it gives each rank
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) in
a process forked from the forkserver, which has imported torch and the engine already (torchrun
starts a fresh interpreter per rank, ~5 s each on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def nan_loss_at(epoch: int, step: int, on_step=None) -> None:
    """Make NormKD's training losses NaN at ``step`` (from 1) of ``epoch`` in this process; ``on_step(epoch, step)``
    is called before every training step. Later steps turn non-finite on their own (NaN gradients, NaN weights)."""
    from normkd_plugin.distillers import NormKD

    real = NormKD.forward_train
    calls: dict[int, int] = {}

    def forward_train(self, **kwargs):
        e = kwargs["epoch"]
        calls[e] = calls.get(e, 0) + 1
        if on_step is not None:
            on_step(e, calls[e])
        preds, losses = real(self, **kwargs)
        if (e, calls[e]) == (epoch, step):
            losses = {k: v * float("nan") for k, v in losses.items()}
        return preds, losses

    NormKD.forward_train = forward_train


def main(args: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--fixed-augment", action="store_true")
    p.add_argument("--fail", default="")
    p.add_argument("--fail-disk", default="")
    p.add_argument("--nan", default="")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(args)
    argv = a.args[1:] if a.args[:1] == ["--"] else a.args
    rank = int(os.environ.get("RANK", "0"))
    out = Path(a.out).resolve()
    cwd = out / f"cwd{rank}"
    cwd.mkdir(parents=True, exist_ok=True)
    os.chdir(cwd)

    import torch

    if a.fixed_augment:
        import mdistiller.dataset.cifar100 as host_cifar

        host_cifar.get_cifar100_train_transform = host_cifar.get_cifar100_test_transform

    from normkd_plugin import train
    from normkd_plugin.engine.fit import Hook
    from normkd_plugin.engine.pack import Pack
    from normkd_plugin.engine.source import LoaderSource

    fail = tuple(int(x) for x in a.fail.split(":")) if a.fail else None
    disk = tuple(int(x) for x in a.fail_disk.split(":")) if a.fail_disk else None
    if a.nan:
        nan_rank, nan_epoch, nan_step = (int(x) for x in a.nan.split(":"))
        if rank == nan_rank:
            nan_loss_at(nan_epoch, nan_step)
    record: dict = {"batches": {}, "validation": {}}
    now = {"epoch": 0}
    real_batch, real_validate = LoaderSource.train_batch, Pack.validate

    def train_batch(self, data, epoch, step):
        record["batches"].setdefault(epoch, []).append(data[2].tolist())
        return real_batch(self, data, epoch, step)

    def validate(self, runs):
        result = real_validate(self, runs)
        if result:  # a run whose training loss turned non-finite is not validated
            record["validation"][now["epoch"]] = result[0]
        return result

    class Harness(Hook):
        """--fail's error as the rank's first batch of its epoch is taken; the rank's record once training ends."""

        def before_fit(self, pack):
            self.pack = pack

        def before_epoch(self, epoch, runs):
            now["epoch"] = epoch

        def before_step(self, epoch, step):
            if fail == (self.pack.ranks.rank, epoch):
                raise RuntimeError(f"injected failure on rank {self.pack.ranks.rank} in epoch {epoch}")
            if disk == (self.pack.ranks.rank, epoch):
                from normkd_plugin.run_files import FolderError

                raise FolderError(f"{Path.cwd()}/latest: cannot write it: No space left on device (ENOSPC)")

        def after_fit(self, finished):
            ranks = self.pack.ranks
            record.update(rank=ranks.rank, world=ranks.world, model=self.pack.runs[0].distiller.state_dict())
            torch.save(record, out / f"rank{ranks.rank}.pt")

    LoaderSource.train_batch, Pack.validate = train_batch, validate
    train.main(argv, hooks=[Harness()])


def _forked_rank(rank: int, world: int, port: int, out: str, args: list[str]) -> None:
    """One rank of :func:`forked_job`: torchrun's environment, stdout and stderr to files, then :func:`main`."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    import torch

    torch.set_num_threads(1)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        with open(Path(out) / f"rank{rank}.{name}", "w") as f:
            os.dup2(f.fileno(), fd)
    main(args)  # its SystemExit code is the process's exit code


def forked_job(world: int, out: Path, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``main(args)`` as ``world`` ranks; the job's exit code (the first failing rank's, else 0) and the ranks'
    stdout and stderr joined. Once a rank fails, the others get 5 s to end on their own, then are killed (as
    torchrun stops a job); a job past ``timeout`` fails the test."""
    import multiprocessing
    import socket
    import time

    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("forkserver")
    procs = [ctx.Process(target=_forked_rank, args=(r, world, port, str(out), args)) for r in range(world)]
    for proc in procs:
        proc.start()
    deadline, failed_at = time.monotonic() + timeout, None
    while any(proc.is_alive() for proc in procs):
        now = time.monotonic()
        if failed_at is None and any(proc.exitcode for proc in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + 5):
            for proc in procs:
                proc.kill()
            assert now <= deadline, "the ranks hung"
        time.sleep(0.05)
    codes = [proc.exitcode for proc in procs]
    code = next((c for c in codes if c), 0)
    text = {name: "".join((out / f"rank{r}.{name}").read_text() for r in range(world)) for name in ("stdout", "stderr")}
    return subprocess.CompletedProcess(args, code, text["stdout"], text["stderr"])


if __name__ == "__main__":
    sys.exit(main())
