"""Shared fixtures: the real mdistiller, the real CIFAR-100 shards and teacher in ../shared/data."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

# cuBLAS reads this when its first handle is made; deterministic GPU tests need it.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_configure(config):
    """Pin the threads of the process that runs the tests, however pytest was started (with or without xdist).

    It runs torch on its share of the cores (all of them without xdist, 1/N in each of -n N workers: N
    workers x all cores each would only fight over the cores), and so do the processes its tests start:
    they inherit OMP_NUM_THREADS. The same count in both is what lets a test compare a run in a
    subprocess bitwise with a reference trained here (float sums depend on the number of threads).
    """
    if getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # the xdist controller runs no tests; each of its workers pins its own share
    share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ.setdefault("OMP_NUM_THREADS", str(share))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@contextlib.contextmanager
def torch_threads(n: int):
    """torch on ``n`` threads inside the block: a reference compared bitwise with processes started on ``n``."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("NORMKD_DATA", REPO.parent / "shared" / "data"))
CIFAR_DIR = DATA_DIR / "cifar100"
TEACHER_RESNET56 = DATA_DIR / "teachers" / "cifar100" / "resnet56-f2eff4c8.pt"

try:
    import mdistiller

    HAVE_MDISTILLER = True
except ImportError:
    HAVE_MDISTILLER = False


def mdistiller_checkout() -> Path | None:
    """The mdistiller checkout the installed package comes from (the folder holding tools/train.py), or None."""
    if not HAVE_MDISTILLER:
        return None
    checkout = Path(mdistiller.__file__).resolve().parents[1]
    return checkout if (checkout / "tools" / "train.py").is_file() else None


needs_mdistiller = pytest.mark.skipif(
    not HAVE_MDISTILLER,
    reason='mdistiller is not importable: set MDISTILLER_SRC to a checkout and pip install -e "$MDISTILLER_SRC"',
)
needs_data = pytest.mark.skipif(
    not (CIFAR_DIR / "test-0-of-1.npz").is_file(),
    reason=f"real CIFAR-100 shards not found in {CIFAR_DIR} (set NORMKD_DATA to the shared data folder)",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def cifar_test_arrays():
    """The real CIFAR-100 test split (images uint8 NHWC, labels)."""
    if not (CIFAR_DIR / "test-0-of-1.npz").is_file():
        pytest.skip(f"real CIFAR-100 shards not found in {CIFAR_DIR} (set NORMKD_DATA)")
    with np.load(CIFAR_DIR / "test-0-of-1.npz") as z:
        return z["images"], z["labels"]


@pytest.fixture(scope="session")
def cifar_batch(cifar_test_arrays):
    """32 real test images normalised as the host does, with their labels."""
    if not HAVE_MDISTILLER:
        pytest.skip("mdistiller is not importable: set MDISTILLER_SRC and install it")
    from mdistiller.dataset.cifar100 import get_cifar100_test_transform
    from PIL import Image

    images, labels = cifar_test_arrays
    tf = get_cifar100_test_transform()
    x = torch.stack([tf(Image.fromarray(images[i])) for i in range(32)])
    return x, torch.as_tensor(labels[:32])


@pytest.fixture(scope="session")
def teacher_resnet56():
    """Path of the real CIFAR-100 resnet56 teacher."""
    if not TEACHER_RESNET56.is_file():
        pytest.skip(f"teacher checkpoint not found: {TEACHER_RESNET56} (set NORMKD_DATA)")
    return TEACHER_RESNET56


# The small split of the training tests: three full batches of SMALL_BATCH and a smaller last one
# (8 images: 4 per rank on 2 ranks, 2/3/3 on 3), so every kind of step is trained at a small cost.
SMALL_TRAIN, SMALL_BATCH, SMALL_VAL = 56, 16, 25


@pytest.fixture(scope="session")
def small_cifar_npz(tmp_path_factory, cifar_test_arrays):
    """An npz-shard DATASET.ROOT of real CIFAR-100 pixels: SMALL_TRAIN training images, SMALL_VAL test images."""
    images, labels = cifar_test_arrays
    root = tmp_path_factory.mktemp("cifar_npz")
    train, val = slice(0, SMALL_TRAIN), slice(SMALL_TRAIN, SMALL_TRAIN + SMALL_VAL)
    np.savez(root / "train-0-of-1.npz", images=images[train], labels=labels[train])
    np.savez(root / "test-0-of-1.npz", images=images[val], labels=labels[val])
    return root


def fast_opts(root, teacher, prefix, seed, *extra) -> list[str]:
    """Overrides of a short CPU ``fast`` run on ``root`` (batches of SMALL_BATCH) with the real resnet56 teacher."""
    return [
        "SOLVER.TRAINER", "fast", "SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES", "[1]", "SOLVER.BATCH_SIZE",
        str(SMALL_BATCH), "DATASET.ROOT", str(root), "DISTILLER.TEACHER_CKPT", str(teacher), "LOG.PREFIX", str(prefix),
        "EXPERIMENT.SEED", str(seed), *extra,
    ]  # fmt: skip


def load_state(folder, name="latest"):
    from normkd_plugin.checkpoints import allow_release_types

    with allow_release_types():
        return torch.load(folder / name, map_location="cpu", weights_only=True)


def assert_same_run(a, b):
    """Two run folders hold bitwise the same run: parameters, BN buffers, momentum buffers, data generator, metrics and the worklog."""
    sa, sb = load_state(a), load_state(b)
    assert sa["epoch"] == sb["epoch"]
    assert sa["model"].keys() == sb["model"].keys()
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), f"{a.name}: {key}"
    assert any(k.endswith("running_mean") for k in sa["model"]) and any(
        k.endswith("num_batches_tracked") for k in sa["model"]
    )
    moms_a = [s["momentum_buffer"] for s in sa["optimizer"]["state"].values()]
    moms_b = [s["momentum_buffer"] for s in sb["optimizer"]["state"].values()]
    assert len(moms_a) == len(moms_b) > 0 and all(torch.equal(x, y) for x, y in zip(moms_a, moms_b))
    assert sa["optimizer"]["param_groups"][0]["lr"] == sb["optimizer"]["param_groups"][0]["lr"]
    assert torch.equal(sa["generator"], sb["generator"])
    assert sa["record"] == sb["record"]  # exact floats: train loss/acc sums, test acc/top-5/loss
    assert (a / "worklog.txt").read_text() == (b / "worklog.txt").read_text()


def interrupted_at(epoch: int):
    """A hook (``engine.fit.Hook``) that raises KeyboardInterrupt as ``epoch`` starts (an interruption a pack sees)."""
    from normkd_plugin.engine.fit import Hook

    class InterruptAt(Hook):
        def before_epoch(self, e, runs):
            if e == epoch:
                raise KeyboardInterrupt

    return InterruptAt()


def nan_weights_at(epoch: int, kind: str):
    """A hook (``engine.fit.Hook``) that fills the classifier weights of the DISTILLER.TYPE ``kind`` run with NaN
    as ``epoch`` starts (that run must be in the epoch)."""
    from normkd_plugin.engine.fit import Hook

    class NanWeights(Hook):
        def before_epoch(self, e, runs):
            if e == epoch:
                victim = next(r for r in runs if r.cfg.DISTILLER.TYPE == kind)
                with torch.no_grad():
                    victim.distiller.student.fc.weight.fill_(math.nan)

    return NanWeights()


def train_built_pack(pack, resume: bool = False, time_limit=None, hooks=()):
    """What normkd-train does with a built pack: decide each run (``lifecycle``), train them, release the folders.
    Under several processes rank 0 alone reads and writes the folders, as under normkd-train."""
    from normkd_plugin.engine.fit import train_runs
    from normkd_plugin.lifecycle import RunLife, decide_all

    lives = [RunLife(run.folder, resume, pack.ranks.main) for run in pack.runs]
    try:
        decide_all(lives)
        return train_runs(pack, lives, time_limit, hooks)
    finally:
        for life in lives:
            life.close()


# Processes the tests start (loader workers, spawn_and_wait's ranks) fork from one forkserver per
# test process, which imports these once: each process then starts in a fraction of a second.
FORKSERVER_PRELOAD = ["mdistiller.models", "mdistiller.distillers", "normkd_plugin.build", "normkd_plugin.engine.pack"]


def _preload_forkserver() -> None:
    import multiprocessing

    from normkd_plugin import data

    data.WORKER_PRELOAD[:] = dict.fromkeys([*data.WORKER_PRELOAD, *FORKSERVER_PRELOAD])
    multiprocessing.set_forkserver_preload(data.WORKER_PRELOAD)


if HAVE_MDISTILLER:
    _preload_forkserver()


def spawn_and_wait(worker, args: tuple, nprocs: int, deadline_s: float = 300) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` fresh processes (forked by the forkserver); a hang past
    ``deadline_s`` fails the test."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="forkserver")
    deadline = time.monotonic() + deadline_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            raise AssertionError("the processes hung")


@contextlib.contextmanager
def mounted_tmpfs(path, size: str = "16m", *options: str):
    """A real tmpfs of ``size`` mounted at ``path`` for the block; the test is skipped where mounting is not allowed."""
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join([f"size={size}", *options])
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()[:200]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(folder) -> None:
    """Fill the file system of ``folder`` to the last byte (a file ``filler`` in it)."""
    with open(folder / "filler", "wb", buffering=0) as f:
        chunk = b"\0" * (1 << 20)
        while True:
            try:
                f.write(chunk)
            except OSError:
                if len(chunk) == 1:
                    return
                chunk = chunk[: len(chunk) // 2]
