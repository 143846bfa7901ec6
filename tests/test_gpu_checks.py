"""benchmarks/gpu_checks.sh compare + gpu_unpack.sh, run on the CPU: a chunked comparison that travels
between machines as bundles ends bitwise as one uninterrupted pack."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import REPO, assert_same_run, needs_mdistiller

pytestmark = [
    needs_mdistiller,
    pytest.mark.skipif(
        shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout"
    ),
]

METHODS = ("kd", "dkd", "normkd", "normdkd")
EPOCHS = 20  # of one 64-image step each: the first chunk (12 s) ends part-way on most machines
TINY = f"--device cpu SOLVER.EPOCHS {EPOCHS} SOLVER.LR_DECAY_STAGES [5,10] SOLVER.FAST.ITERS_PER_EPOCH 1"


@pytest.fixture
def data(tmp_path, small_cifar_npz, teacher_resnet56):
    """$DATA as the GPU machine has it: cifar100/*.npz and teachers/cifar100/resnet56-f2eff4c8.pt."""
    root = tmp_path / "data"
    (root / "teachers" / "cifar100").mkdir(parents=True)
    shutil.copytree(small_cifar_npz, root / "cifar100")
    os.symlink(teacher_resnet56, root / "teachers" / "cifar100" / teacher_resnet56.name)
    return root


def _env(tmp_path, data, chunk: int, seconds: int) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # normkd-train of this environment
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ["PATH"],
        "OMP_NUM_THREADS": "1",
        "DATA": str(data),
        "OUT": str(tmp_path / f"out{chunk}"),
        "RES": str(tmp_path / f"res{chunk}"),
        "COMPARE_PREFIX": str(tmp_path / f"machine{chunk}"),  # each chunk on a "fresh machine"
        "COMPARE_KEEP": str(tmp_path / "repo" / "runs"),
        "COMPARE_SECONDS": str(seconds),
        "COMPARE_SEEDS": "0",
        "COMPARE_OPTS": TINY,
    }


def _chunk(tmp_path, data, chunk: int, seconds: int) -> int:
    """Run the compare stage, unpack its bundle into the 'repository'; the chunk's exit code."""
    env = _env(tmp_path, data, chunk, seconds)
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_checks.sh", "compare"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    code = int(re.search(r"compare chunk: exit (\d+)", proc.stdout).group(1))
    parts = sorted((tmp_path / f"out{chunk}").iterdir())
    assert parts and all(re.fullmatch(r"results\.tgz\.\d\d", p.name) for p in parts)  # few files come back
    unpack = subprocess.run(
        ["bash", "benchmarks/gpu_unpack.sh", env["OUT"], str(tmp_path / f"unpacked{chunk}"), env["COMPARE_KEEP"]],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert unpack.returncode == 0, unpack.stderr
    return code


def test_chunks_travel_as_bundles_and_end_as_the_uninterrupted_pack(tmp_path, data):
    first = _chunk(tmp_path, data, 1, seconds=12)
    runs = tmp_path / "repo" / "runs"
    names = sorted(p.name for p in runs.iterdir())
    assert [n.split(",")[0] for n in names] == sorted(METHODS) and all(n.endswith("seed:0") for n in names)
    done = {(runs / n / "worklog.txt").read_text().count("epoch: ") for n in names}
    assert len(done) == 1  # a pack moves its runs together
    (epochs_done,) = done
    assert first == (0 if epochs_done == EPOCHS else 3), (first, epochs_done)
    for name in names:  # only what the next machine needs: `latest` of unfinished runs, never a teacher
        kept = {p.name for p in (runs / name).iterdir()}
        assert kept == ({"worklog.txt", "config.yaml"} | ({"latest"} if 0 < epochs_done < EPOCHS else set()))

    assert _chunk(tmp_path, data, 2, seconds=600) == 0
    for name in names:
        assert {p.name for p in (runs / name).iterdir()} == {"worklog.txt", "config.yaml"}  # finished: no state
        assert (runs / name / "worklog.txt").read_text().count("epoch: ") == EPOCHS

    reference = tmp_path / "uninterrupted"
    cfgs = [arg for m in METHODS for arg in ("--cfg", f"cifar100/{m}/res56_res20")]
    proc = subprocess.run(
        [sys.executable, "-m", "normkd_plugin.train", *cfgs, "--seeds", "0", *TINY.split(), "SOLVER.TRAINER", "fast",
         "DATASET.ROOT", str(data / "cifar100"), "DISTILLER.TEACHER_CKPT", str(data / "teachers/cifar100/resnet56-f2eff4c8.pt"),
         "LOG.PREFIX", str(reference)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = "machine2" if epochs_done < EPOCHS else "machine1"  # the machine that trained the last epoch
    for name in names:
        assert_same_run(reference / "cifar100" / name, tmp_path / last / "cifar100" / name)
        assert (runs / name / "worklog.txt").read_text() == (reference / "cifar100" / name / "worklog.txt").read_text()


def test_bundle_of_a_failed_chunk_is_still_written(tmp_path, data):
    """A chunk whose training fails (here: a bad override) exits 1 and still returns its log."""
    env = _env(tmp_path, data, 1, 60)
    env["COMPARE_OPTS"] = "--device cpu SOLVER.EPOCHS 0"
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_checks.sh", "compare"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1 and "compare chunk: exit 2" in proc.stdout
    (part,) = (tmp_path / "out1").iterdir()
    with tarfile.open(part) as tar:
        log = tar.extractfile("./compare.log").read().decode()
    assert "SOLVER.EPOCHS" in log
