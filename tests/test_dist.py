"""torchrun for the host's base trainer (SOLVER.TRAINER ddp: the engine fed by a loader), on CPU with gloo, 2 processes.

The jobs run ``tests/ddp_worker.py`` under ``python -m torch.distributed.run`` (torchrun), which
calls normkd-train's ``main``. The references below are single-process re-implementations of the
semantics: the global batch of step k is ``randperm(N, seed + epoch)[k*B:(k+1)*B]``; rank r
takes its positions r, r + world, ...; each rank's BatchNorm sees only its share; gradients are
averaged; rank 0's BatchNorm buffers win (DDP broadcasts them before every forward).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_BATCH, SMALL_TRAIN, needs_mdistiller

pytestmark = needs_mdistiller

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
SEED = 3
N_TRAIN, BATCH = SMALL_TRAIN, SMALL_BATCH  # steps of 16, 16, 16, 8 images
N_VAL = 25  # odd: a padded split over 2 ranks would count one image twice


# -- unit: distributed.py --------------------------------------------------------------------------
def test_shard_splits_like_distributed_sampler_without_padding():
    from torch.utils.data import DistributedSampler

    from normkd_plugin.distributed import shard

    for n, world in ((10, 2), (11, 3), (2, 4), (0, 2)):
        parts = [shard(list(range(n)), r, world) for r in range(world)]
        assert sorted(i for p in parts for i in p) == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        if n % world == 0 and n:
            for r in range(world):
                sampler = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False)
                assert parts[r] == list(sampler)
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        shard([1, 2, 3], 2, 2)


def _cfg(*opts):
    from normkd_plugin.config import load_config

    return load_config("cifar100/normkd/res56_res20", list(opts))


def test_check_world_names_the_bad_key(monkeypatch):
    from normkd_plugin import distributed as dist
    from normkd_plugin.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"SOLVER\.BATCH_SIZE 64 .* divisible by the world size 3"):
        dist.check_world(_cfg(), torch.device("cpu"))
    dist.check_world(_cfg("SOLVER.BATCH_SIZE", "63"), torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"runs 4 rank\(s\) .* sees 2 GPU\(s\)"):
        dist.check_world(_cfg(), torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    dist.check_world(_cfg(), torch.device("cuda"))
    with pytest.raises(ConfigError, match="SOLVER.SYNC_BN True needs CUDA"):
        dist.check_world(_cfg("SOLVER.SYNC_BN", "True"), torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "x")
    with pytest.raises(ConfigError, match="WORLD_SIZE='x' is not an integer"):
        dist.check_world(_cfg(), torch.device("cpu"))


def test_outside_torchrun_everything_is_one_process(monkeypatch):
    from normkd_plugin import distributed as dist

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert dist.init_from_env("cpu") == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    assert (dist.rank(), dist.world(), dist.is_main()) == (0, 1, True)
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    with pytest.raises(Exception, match="distributed training runs on cuda"):
        dist.init_from_env("mps")


def test_which_runs_go_to_which_source(monkeypatch):
    from normkd_plugin.config import ConfigError
    from normkd_plugin.engine.source import source_kind

    monkeypatch.setenv("WORLD_SIZE", "1")
    assert source_kind(_cfg()) is None  # base in one process: the host's own trainer
    assert source_kind(_cfg("SOLVER.TRAINER", "ddp")) == "loader"
    assert source_kind(_cfg("SOLVER.TRAINER", "fast")) == "device"
    assert source_kind(_cfg("SOLVER.TRAINER", "dot")) is None
    with pytest.raises(ConfigError, match="DATASET.DECODE 'gpu' needs SOLVER.TRAINER base or ddp, not 'dot'"):
        source_kind(_cfg("SOLVER.TRAINER", "dot", "DATASET.DECODE", "gpu"))
    with pytest.raises(ConfigError, match="DATASET.DECODE 'cpu' needs SOLVER.TRAINER base or ddp, not 'fast'"):
        source_kind(_cfg("SOLVER.TRAINER", "fast", "DATASET.DECODE", "cpu"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert source_kind(_cfg()) == "loader"
    assert source_kind(_cfg("SOLVER.TRAINER", "fast")) == "device"
    with pytest.raises(ConfigError, match=r"SOLVER.TRAINER 'dot' has no multi-process version \(WORLD_SIZE=2"):
        source_kind(_cfg("SOLVER.TRAINER", "dot"))


# -- jobs ----------------------------------------------------------------------------------------
def _opts(root, teacher, prefix, epochs=2, *extra):
    return [
        "--cfg", "cifar100/normkd/res56_res20", "--device", "cpu", "SOLVER.TRAINER", "ddp",
        "SOLVER.EPOCHS", str(epochs), "SOLVER.LR_DECAY_STAGES", "[1]", "SOLVER.BATCH_SIZE", str(BATCH), "DATASET.ROOT", str(root),
        "DATASET.NUM_WORKERS", "0", "DISTILLER.TEACHER_CKPT", str(teacher), "LOG.PREFIX", str(prefix),
        "EXPERIMENT.SEED", str(SEED), "EXPERIMENT.NAME", "r", *extra,
    ]  # fmt: skip


def _job(nproc, out, opts, *worker_flags, launcher="fork"):
    """``nproc`` ranks of ddp_worker.py: forked with torchrun's environment ("fork"), under the real torchrun
    ("torchrun"), or one plain process ("none")."""
    if launcher == "fork":
        from ddp_worker import forked_job

        return forked_job(nproc, out, ["--out", str(out), *worker_flags, "--", *opts])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prefix = [sys.executable]
    if launcher == "torchrun":
        prefix += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone"]
    cmd = [*prefix, str(WORKER), "--out", str(out), *worker_flags, "--", *opts]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _run_folder(prefix: Path, dataset: str = "cifar100") -> Path:
    (folder,) = list((prefix / dataset).iterdir())
    return folder


def _load(path):
    from normkd_plugin.checkpoints import allow_release_types

    with allow_release_types():
        return torch.load(path, map_location="cpu", weights_only=True)


class Reference:
    """The same training in one process, written from the semantics above."""

    def __init__(self, root, teacher, opts):
        from mdistiller.dataset.cifar100 import get_cifar100_test_transform
        from mdistiller.distillers import distiller_dict
        from mdistiller.models import cifar_model_dict
        from PIL import Image

        from normkd_plugin.config import load_config
        from normkd_plugin.data import seed_everything

        self.cfg = load_config(opts[1], opts[4:])
        tf = get_cifar100_test_transform()  # what --fixed-augment gives the training images
        with np.load(root / "train-0-of-1.npz") as z:
            self.x = torch.stack([tf(Image.fromarray(im)) for im in z["images"]])
            self.y = torch.as_tensor(z["labels"])
        with np.load(root / "test-0-of-1.npz") as z:
            self.x_val = torch.stack([tf(Image.fromarray(im)) for im in z["images"]])
            self.y_val = torch.as_tensor(z["labels"])
        seed_everything(SEED)
        student = cifar_model_dict["resnet20"][0](num_classes=100)
        net = cifar_model_dict["resnet56"][0](num_classes=100)
        weights = _load(teacher)
        net.load_state_dict(weights.get("model", weights))
        self.distiller = distiller_dict["NORMKD"](student, net, self.cfg)
        self.params = list(student.parameters())
        self.buffers = list(student.buffers())
        self.opt = torch.optim.SGD(self.params, lr=0.05, momentum=0.9, weight_decay=5e-4)

    def load(self, state):
        """Continue from a saved training state (model keys as mdistiller saves them)."""
        own = {k.removeprefix("module."): v for k, v in state["model"].items()}
        missing, unexpected = self.distiller.load_state_dict(own, strict=False)
        assert not unexpected and all(k.startswith("teacher.") for k in missing)  # states leave the teacher out
        self.opt.load_state_dict(state["optimizer"])

    def batches(self, epoch):
        perm = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(SEED + epoch))
        return [perm[k : k + BATCH] for k in range(0, N_TRAIN, BATCH)]

    def epoch(self, epoch, world):
        """One epoch on ``world`` simulated ranks; returns the mean training loss over all samples."""
        lr = 0.05 * (0.1 if epoch > 1 else 1.0)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.distiller.train()
        loss_sum = 0.0
        for batch in self.batches(epoch):
            start = [b.clone() for b in self.buffers]
            grads, after_rank0 = None, None
            for r in range(world):
                share = batch[r::world]
                for b, s in zip(self.buffers, start):
                    b.copy_(s)
                _, losses = self.distiller(image=self.x[share], target=self.y[share], epoch=epoch)
                loss = sum(v.mean() for v in losses.values())
                loss_sum += loss.item() * len(share)
                g = torch.autograd.grad(loss, self.params)
                grads = list(g) if grads is None else [a + c for a, c in zip(grads, g)]
                if r == 0:
                    after_rank0 = [b.clone() for b in self.buffers]
            with torch.no_grad():
                for b, s in zip(self.buffers, after_rank0):
                    b.copy_(s)
            for p, g in zip(self.params, grads):
                p.grad = g / world
            self.opt.step()
        return loss_sum / N_TRAIN

    @torch.no_grad()
    def accuracy(self, student_state):
        """Top-1 % of ``student_state`` on the whole validation split, in one process."""
        from mdistiller.models import cifar_model_dict

        net = cifar_model_dict["resnet20"][0](num_classes=100)
        net.load_state_dict(student_state)
        net.eval()
        return 100.0 * (net(self.x_val)[0].argmax(1) == self.y_val).sum().item() / len(self.y_val)

    def assert_close(self, model_state):
        """The trained student equals this one up to float32 rounding of the gradient sums."""
        mine = self.distiller.student.state_dict()
        theirs = {k.removeprefix("student."): v for k, v in model_state.items() if k.startswith("student.")}
        assert mine.keys() == theirs.keys()
        for key, value in mine.items():
            if value.is_floating_point():
                # (a/2 + b/2 == (a + b)/2 in floating point: with one thread per process they are bitwise equal)
                torch.testing.assert_close(theirs[key], value, rtol=1e-5, atol=1e-6, msg=key)
            else:
                assert torch.equal(theirs[key], value), key


def _student(state):
    return {k.removeprefix("module.student."): v for k, v in state["model"].items() if k.startswith("module.student.")}


@pytest.fixture(scope="module")
def npz_root(tmp_path_factory, cifar_test_arrays):
    """An npz-shard DATASET.ROOT of real CIFAR-100 pixels: N_TRAIN training and N_VAL test images."""
    images, labels = cifar_test_arrays
    root = tmp_path_factory.mktemp("ddp_npz")
    np.savez(root / "train-0-of-1.npz", images=images[:N_TRAIN], labels=labels[:N_TRAIN])
    np.savez(root / "test-0-of-1.npz", images=images[1000 : 1000 + N_VAL], labels=labels[1000 : 1000 + N_VAL])
    return root


@pytest.fixture
def reference(npz_root, teacher_resnet56, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1): the same float32 rounding
    opts = _opts(npz_root, teacher_resnet56, tmp_path / "unused")
    yield Reference(npz_root, teacher_resnet56, opts)
    torch.set_num_threads(threads)


def test_two_ranks_equal_the_single_process_reference(npz_root, teacher_resnet56, tmp_path, reference):
    out = tmp_path / "job"
    proc = _job(2, out, _opts(npz_root, teacher_resnet56, "runs"), "--fixed-augment")
    _ok(proc)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]

    # every rank ends with the same parameters and buffers
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key

    for epoch in (1, 2):
        # rank r's k-th batch is its strided share of global batch k; every sample once per epoch
        steps = [ranks[r]["batches"][epoch] for r in range(2)]
        expected = reference.batches(epoch)
        assert [len(s) for s in steps] == [len(expected)] * 2
        for k, batch in enumerate(expected):
            for r in range(2):
                assert steps[r][k] == batch[r::2].tolist()
        used = sorted(i for r in range(2) for step in steps[r] for i in step)
        assert used == list(range(N_TRAIN))
        train_loss = reference.epoch(epoch, world=2)

    reference.assert_close(ranks[0]["model"])
    folder = _run_folder(out / "cwd0" / "runs")
    state = _load(folder / "latest")
    assert state["epoch"] == 2
    # validation of the whole split, summed over the ranks: every rank got the one-process accuracy
    acc = reference.accuracy(_student(state))
    assert ranks[0]["validation"][2][0] == ranks[1]["validation"][2][0] == state["record"]["test_acc"] == acc
    assert state["record"]["train_loss"] == pytest.approx(train_loss, rel=1e-5)
    assert f"test_acc: {acc:.2f}" in (folder / "worklog.txt").read_text()

    # only rank 0 wrote: rank 1 worked in its own empty directory and left it empty
    assert list((out / "cwd1").iterdir()) == []
    assert sorted(p.name for p in folder.iterdir()) == [
        ".lock", "best", "config.yaml", "latest", "provenance.yaml", "student_best", "student_latest", "train.events",
        "worklog.txt",
    ]  # fmt: skip
    assert (folder / "worklog.txt").read_text().count("epoch: ") == 2


def _root_cause(stderr: str) -> str:
    assert "Root Cause (first observed failure)" in stderr, stderr[-4000:]
    return stderr.split("Root Cause (first observed failure)", 1)[1]


def test_failing_rank_ends_the_job_and_the_run_resumes_on_one_rank(npz_root, teacher_resnet56, tmp_path, reference):
    prefix = tmp_path / "runs"
    opts = _opts(npz_root, teacher_resnet56, prefix)
    proc = _job(2, tmp_path / "a", opts, "--fixed-augment", "--fail", "1:2", launcher="torchrun")
    assert proc.returncode != 0
    root = _root_cause(proc.stderr)
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root) and "injected failure on rank 1 in epoch 2" in root
    assert not re.search(r"rank\s*: 0 \(local_rank: 0\)", root.split("====")[0])
    # nothing half-written: epoch 1 complete (checkpoint, then its worklog block), nothing of epoch 2
    folder = _run_folder(prefix)
    state = _load(folder / "latest")
    assert state["epoch"] == 1
    text = (folder / "worklog.txt").read_text()
    assert text.count("epoch: ") == 1 and text.endswith("-" * 25 + os.linesep) and "best_acc" not in text
    assert not list(folder.glob(".*.tmp")) and list((tmp_path / "a" / "cwd1").iterdir()) == []

    # the 2-rank state resumes in one process without torchrun; epoch 2 is then a one-rank epoch
    proc = _job(1, tmp_path / "b", ["--resume", *opts], "--fixed-augment", launcher="none")
    _ok(proc)
    final = torch.load(tmp_path / "b" / "rank0.pt", weights_only=False)
    assert final["world"] == 1 and list(final["batches"]) == [2]
    reference.load(state)
    reference.epoch(2, world=1)
    reference.assert_close(final["model"])
    text = (folder / "worklog.txt").read_text()
    assert [int(x.split()[0]) for x in text.split("epoch: ")[1:]] == [1, 2] and text.count("best_acc\t") == 1


def test_an_input_error_on_one_rank_is_torchruns_root_cause_in_one_line(npz_root, teacher_resnet56, tmp_path):
    """A full disk (one line and exit 2 on that rank) is what torchrun's summary names, not a bare exit code."""
    opts = _opts(npz_root, teacher_resnet56, tmp_path / "runs")
    proc = _job(2, tmp_path / "a", opts, "--fixed-augment", "--fail-disk", "1:2", launcher="torchrun")
    assert proc.returncode != 0
    root = _root_cause(proc.stderr)
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root) and "exitcode  : 2" in root
    assert "FolderError" in root and "latest: cannot write it: No space left on device (ENOSPC)" in root
    assert "normkd-train: " in proc.stderr and "No space left on device (ENOSPC)" in proc.stderr  # its one line


def test_one_rank_run_resumes_on_two_ranks(npz_root, teacher_resnet56, tmp_path, reference):
    prefix = tmp_path / "runs"
    opts = _opts(npz_root, teacher_resnet56, prefix)
    proc = _job(1, tmp_path / "a", opts, "--fixed-augment", "--fail", "0:2")
    assert proc.returncode != 0 and "injected failure on rank 0 in epoch 2" in proc.stderr
    folder = _run_folder(prefix)
    state = _load(folder / "latest")
    assert state["epoch"] == 1

    # rank 0 judges the run folder and every rank stops with its verdict
    proc = _job(2, tmp_path / "c", opts, "--fixed-augment")
    assert proc.returncode != 0 and proc.stderr.count("already holds a started run; add --resume") >= 2
    assert _load(folder / "latest")["epoch"] == 1 and (folder / "worklog.txt").read_text().count("epoch: ") == 1

    proc = _job(2, tmp_path / "b", ["--resume", *opts], "--fixed-augment")
    _ok(proc)
    ranks = [torch.load(tmp_path / "b" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and list(ranks[0]["batches"]) == [2]
    reference.load(state)
    reference.epoch(2, world=2)
    reference.assert_close(ranks[0]["model"])
    reference.assert_close(ranks[1]["model"])
    assert _load(folder / "latest")["epoch"] == 2


def test_batch_not_divisible_by_world_fails_before_anything_is_written(npz_root, teacher_resnet56, tmp_path):
    opts = _opts(npz_root, teacher_resnet56, tmp_path / "runs", 1, "SOLVER.BATCH_SIZE", "63")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    proc = subprocess.run(
        [*cmd, "-m", "normkd_plugin.train", *opts],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode != 0
    assert "SOLVER.BATCH_SIZE 63 is the global batch and must be divisible by the world size 2" in proc.stderr
    assert not (tmp_path / "runs").exists()


# -- a non-finite loss and the stored seed: normkd-train in this process (one rank) --------------------
class _Stop(Exception):
    """Stands for a kill in the middle of an epoch."""


@pytest.fixture
def here(monkeypatch):
    """Runs of normkd-train's main in this process, as the workers run (one thread, --fixed-augment)."""
    import mdistiller.dataset.cifar100 as host_cifar

    from normkd_plugin import train

    monkeypatch.setattr(host_cifar, "get_cifar100_train_transform", host_cifar.get_cifar100_test_transform)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def run(opts, *flags, hooks=()) -> int:
        """The exit status of ``normkd-train *flags *opts`` (0 when main returns), ``hooks`` added to the engine's."""
        try:
            train.main([*flags, *opts], hooks=hooks)
        except SystemExit as exc:
            return exc.code
        return 0

    yield run
    torch.set_num_threads(threads)


def _record_batches(monkeypatch) -> dict[int, list[list[int]]]:
    """From now on, the sample indices of every training step, by epoch."""
    from normkd_plugin.engine.source import LoaderSource

    batches: dict[int, list[list[int]]] = {}
    real = LoaderSource.train_batch

    def train_batch(self, data, epoch, step):
        batches.setdefault(epoch, []).append(data[2].tolist())
        return real(self, data, epoch, step)

    monkeypatch.setattr(LoaderSource, "train_batch", train_batch)
    return batches


def _pack_spy():
    """A hook (``engine.fit.Hook``) that keeps, in its ``packs``, every pack it sees trained."""
    from normkd_plugin.engine.fit import Hook

    class PackSpy(Hook):
        def __init__(self):
            self.packs = []

        def before_fit(self, pack):
            self.packs.append(pack)

    return PackSpy()


def _global_batches(seed: int, epoch: int) -> list[list[int]]:
    """One process's batches: a shuffled DistributedSampler permutes with ``randperm(N, seed + epoch)``."""
    perm = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [perm[k : k + BATCH] for k in range(0, N_TRAIN, BATCH)]


def _files(folder: Path) -> dict[str, bytes]:
    """The run folder's checkpoints and config, by name."""
    skip = {"worklog.txt", "train.events", ".lock"}
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name not in skip}


def test_nonfinite_training_loss_stops_the_run_and_resume_restarts_from_the_last_epoch(
    npz_root, teacher_resnet56, tmp_path, here, monkeypatch, capsys
):
    """NaN at epoch 2 step 2 of 4: a `failed` line naming both, exit 2 with one line, epoch 1's files untouched;
    a start without --resume is refused; --resume ends as the uninterrupted run (bitwise, one process)."""
    from ddp_worker import nan_loss_at

    whole = tmp_path / "whole"
    assert here(_opts(npz_root, teacher_resnet56, whole)) == 0
    prefix = tmp_path / "runs"
    opts = _opts(npz_root, teacher_resnet56, prefix)
    before: dict[str, bytes] = {}

    def on_step(epoch, step):
        if (epoch, step) == (2, 1):
            before.update(_files(_run_folder(prefix)))

    from normkd_plugin.distillers import NormKD

    real = NormKD.forward_train
    monkeypatch.setattr(NormKD, "forward_train", real)  # restored after the test, whatever happens
    nan_loss_at(2, 2, on_step)
    capsys.readouterr()
    assert here(opts) == 2
    err = capsys.readouterr().err.strip().splitlines()
    folder = _run_folder(prefix)
    assert err[-1] == f"normkd-train: {folder}: epoch 2 step 2 of 4: non-finite training loss (1 of 1 runs failed)"
    text = (folder / "worklog.txt").read_text()
    assert text.count("epoch: ") == 1 and "best_acc" not in text
    assert text.splitlines()[-1].startswith("failed\tepoch 2 step 2 of 4: non-finite training loss; likely causes: ")
    assert sorted(before) == ["best", "config.yaml", "latest", "provenance.yaml", "student_best", "student_latest"]
    assert _files(folder) == before  # nothing of epoch 2 was written over epoch 1's files
    assert _load(folder / "latest")["epoch"] == 1

    NormKD.forward_train = real
    assert here(opts) == 2
    assert "already holds a failed run; add --resume" in capsys.readouterr().err
    assert here(opts, "--resume") == 0
    assert (folder / "worklog.txt").read_text() == (_run_folder(whole) / "worklog.txt").read_text()
    mine, theirs = _load(folder / "latest"), _load(_run_folder(whole) / "latest")
    assert mine["epoch"] == theirs["epoch"] == 2 and mine["seed"] == theirs["seed"] == SEED
    assert mine["model"].keys() == theirs["model"].keys()
    for key, value in theirs["model"].items():
        assert torch.equal(mine["model"][key], value), key


def test_nonfinite_validation_loss_stops_the_run_before_its_first_checkpoint(
    npz_root, teacher_resnet56, tmp_path, here, monkeypatch, capsys
):
    """Weights that turn NaN after the last training step: epoch 1 is not committed, the worklog says why."""
    from normkd_plugin.engine.pack import Pack

    real = Pack.validate

    def validate(self, runs):
        with torch.no_grad():
            runs[0].distiller.student.fc.bias.fill_(math.nan)
        return real(self, runs)

    monkeypatch.setattr(Pack, "validate", validate)
    capsys.readouterr()
    assert here(_opts(npz_root, teacher_resnet56, tmp_path / "runs", 1)) == 2
    folder = _run_folder(tmp_path / "runs")
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"normkd-train: {folder}: epoch 1: non-finite validation loss (1 of 1 runs failed)"
    )
    assert (folder / "worklog.txt").read_text().startswith("failed\tepoch 1: non-finite validation loss; likely causes")
    assert sorted(_files(folder)) == ["config.yaml", "provenance.yaml"]


def test_drawn_seed_is_stored_and_a_resume_shuffles_with_it(npz_root, teacher_resnet56, tmp_path, here, monkeypatch):
    """EXPERIMENT.SEED -1: the state keeps the seed the sampler used; a resume shuffles epoch 2 as the
    uninterrupted run with that seed does (a fresh draw would give another order)."""
    from conftest import interrupted_at

    opts = _opts(npz_root, teacher_resnet56, tmp_path / "runs", 2, "EXPERIMENT.SEED", "-1")
    batches = _record_batches(monkeypatch)
    assert here(opts, hooks=[interrupted_at(2)]) == 130  # stopped as epoch 2 starts
    folder = _run_folder(tmp_path / "runs")
    seed = _load(folder / "latest")["seed"]
    assert isinstance(seed, int) and batches == {1: _global_batches(seed, 1)}  # the seed epoch 1 used

    spy = _pack_spy()
    assert here(opts, "--resume", hooks=[spy]) == 0
    (pack,) = spy.packs
    assert pack.runs[0].seed == seed and pack.source.sampler.seeds == [seed]
    assert batches[2] == _global_batches(seed, 2)
    assert _load(folder / "latest")["seed"] == seed


def test_two_ranks_agree_on_the_first_nonfinite_step(npz_root, teacher_resnet56, tmp_path):
    """Rank 1's loss is NaN at step 2 (rank 0's turns NaN at step 3, through the averaged gradients): both ranks
    stop with the same error, none waits in a collective, and rank 0's worklog names step 2."""
    opts = _opts(npz_root, teacher_resnet56, tmp_path / "runs", 1)
    proc = _job(2, tmp_path / "a", opts, "--fixed-augment", "--nan", "1:1:2")
    assert proc.returncode != 0
    folder = _run_folder(tmp_path / "runs")
    line = f"normkd-train: {folder}: epoch 1 step 2 of 4: non-finite training loss (1 of 1 runs failed)"
    assert proc.stderr.count(line) == 2, proc.stderr[-4000:]
    assert (folder / "worklog.txt").read_text().startswith("failed\tepoch 1 step 2 of 4: non-finite training loss")
    assert (
        sorted(_files(folder)) == ["config.yaml", "provenance.yaml"] and list((tmp_path / "a" / "cwd1").iterdir()) == []
    )


# -- random augmentation: a pure function of (seed, epoch, sample), so resumes are bitwise ------------
def _main(opts, *flags, hooks=()) -> None:
    """normkd-train's main in this process on one thread (as the workers), with the host's random training transform;
    ``hooks`` added to the engine's."""
    from normkd_plugin import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main([*flags, *opts], hooks=hooks)
    finally:
        torch.set_num_threads(threads)


def _augmenting_opts(root, teacher, prefix, workers: int) -> list[str]:
    return _opts(root, teacher, prefix, 2, "DATASET.NUM_WORKERS", str(workers))


@pytest.fixture(scope="module")
def augmented_runs(npz_root, teacher_resnet56, tmp_path_factory):
    """Run folders of uninterrupted 2-epoch runs with random augmentation, by DATASET.NUM_WORKERS (0 and 2)."""
    folders = {}
    for workers in (0, 2):
        prefix = tmp_path_factory.mktemp(f"augmented{workers}")
        _main(_augmenting_opts(npz_root, teacher_resnet56, prefix, workers))
        folders[workers] = _run_folder(prefix)
    return folders


def _assert_same_run(folder: Path, reference: Path) -> None:
    """The same worklog and, bitwise, the same final model tensors and optimizer state (momentum buffers)."""
    assert (folder / "worklog.txt").read_text() == (reference / "worklog.txt").read_text()
    mine, theirs = _load(folder / "latest"), _load(reference / "latest")
    assert mine["epoch"] == theirs["epoch"] == 2 and mine["record"] == theirs["record"]
    assert mine["model"].keys() == theirs["model"].keys()
    for key, value in theirs["model"].items():
        assert torch.equal(mine["model"][key], value), key
    momentum = [s["momentum_buffer"] for s in theirs["optimizer"]["state"].values()]
    assert len(momentum) == len(mine["optimizer"]["state"]) > 0
    for buf, s in zip(momentum, mine["optimizer"]["state"].values()):
        assert torch.equal(s["momentum_buffer"], buf)
    assert mine["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]


def test_random_augmentation_does_not_depend_on_the_loader_workers(augmented_runs):
    """In the main process (0 workers) or in 2 persistent workers: the same images, bitwise the same run."""
    _assert_same_run(augmented_runs[2], augmented_runs[0])


@pytest.mark.parametrize("workers", [0, 2])
def test_random_augmentation_resumes_bitwise(npz_root, teacher_resnet56, tmp_path, augmented_runs, workers):
    """Killed at the first step of epoch 2, then resumed: bitwise the uninterrupted run with the same workers.

    Before each sample was seeded from its position, this failed: the resumed epoch 2 drew its crops
    and flips from restarted streams (the main process's global RNG, re-seeded workers) instead of
    the streams the uninterrupted run had advanced through epoch 1.
    """
    opts = _augmenting_opts(npz_root, teacher_resnet56, tmp_path / "runs", workers)
    _stopped_in_epoch_2_then_resumed(opts, lambda: _run_folder(tmp_path / "runs"))
    _assert_same_run(_run_folder(tmp_path / "runs"), augmented_runs[workers])


def _stopped_in_epoch_2_then_resumed(opts: list[str], folder) -> None:
    """Train ``opts`` until the first step of epoch 2 (an exception as its batch is taken), check ``folder()`` holds
    epoch 1, resume."""
    from normkd_plugin.engine.fit import Hook

    class StopInEpoch2(Hook):
        def before_step(self, epoch, step):
            if epoch == 2:
                raise _Stop

    with pytest.raises(_Stop):
        _main(opts, hooks=[StopInEpoch2()])
    assert _load(folder() / "latest")["epoch"] == 1
    _main(opts, "--resume")


def test_a_pack_that_ends_stops_its_loader_workers_and_closes_its_writers(npz_root, teacher_resnet56, tmp_path):
    """Persistent workers and tensorboard writers end with the pack, not when the garbage collector finds them
    (a loader collected in a reference cycle loses its queues first, and then waits 5 s for each worker)."""
    from normkd_plugin.engine.source import LoaderSource

    workers: list = []
    real_close = LoaderSource.close

    def close(self):
        for loader in (
            self.train_loader,
            self.val_loader,
        ):  # the DataLoader's persistent workers, read before they stop
            workers.extend(getattr(loader._iterator, "_workers", []))
        real_close(self)

    spy = _pack_spy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LoaderSource, "close", close)
        _main(_opts(npz_root, teacher_resnet56, tmp_path, 1, "DATASET.NUM_WORKERS", "2"), hooks=[spy])
    assert len(workers) == 4 and not any(w.is_alive() for w in workers)  # 2 per loader
    (pack,) = spy.packs
    assert all(run.writer.all_writers is None for run in pack.runs)  # tensorboardX's closed state


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory, cifar_test_arrays):
    """An ImageFolder DATASET.ROOT of real CIFAR-100 images upscaled to 64-96 px: 2 classes x 3 train, x 1 val."""
    from PIL import Image

    images, _ = cifar_test_arrays
    root = tmp_path_factory.mktemp("jpeg")
    k = 0
    for split, per_class in (("train", 3), ("val", 1)):
        for c in "ab":
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                image = Image.fromarray(images[k]).resize((64 + 8 * k, 96 - 4 * k), Image.NEAREST)
                image.save(root / split / c / f"{i}.JPEG", "JPEG", quality=90)
                k += 1
    return root


def test_tensor_pipeline_augmentation_resumes_bitwise(jpeg_root, tmp_path):
    """DATASET.DECODE cpu draws each batch's crops and flips from (seed, epoch, step, rank): killed in epoch 2 and
    resumed, a run ends bitwise as the uninterrupted one (before, the resumed epoch 2 repeated epoch 1's draws)."""

    def opts(prefix):
        return [
            "--cfg", "imagenet/r34_r18/kd", "--device", "cpu", "SOLVER.TRAINER", "ddp", "DISTILLER.TYPE", "NONE",
            "DATASET.DECODE", "cpu", "DATASET.ROOT", str(jpeg_root), "DATASET.NUM_WORKERS", "0",
            "DATASET.TEST.BATCH_SIZE", "2", "SOLVER.BATCH_SIZE", "3", "SOLVER.EPOCHS", "2",
            "SOLVER.LR_DECAY_STAGES", "[1]", "LOG.PREFIX", str(prefix), "EXPERIMENT.NAME", "r", "EXPERIMENT.SEED", "0",
        ]  # fmt: skip

    _main(opts(tmp_path / "whole"))
    _stopped_in_epoch_2_then_resumed(opts(tmp_path / "runs"), lambda: _run_folder(tmp_path / "runs", "imagenet"))
    _assert_same_run(_run_folder(tmp_path / "runs", "imagenet"), _run_folder(tmp_path / "whole", "imagenet"))
