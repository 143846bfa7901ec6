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

import numpy as np
import pytest

from conftest import REPO, assert_same_run, needs_mdistiller, torch_threads

pytestmark = [
    needs_mdistiller,
    pytest.mark.skipif(
        shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout"
    ),
]

METHODS = ("vanilla", "kd", "dkd", "kd_ls", "dkd_ls", "normkd", "normdkd")  # the comparison's 7 rows
EPOCHS = 5  # of one 16-image step each; a decay in each of the two chunks
THREADS = 1  # of the chunks and of the reference: a bitwise comparison needs the same number in both
TINY = f"--device cpu SOLVER.EPOCHS {EPOCHS} SOLVER.LR_DECAY_STAGES [2,4] SOLVER.FAST.ITERS_PER_EPOCH 1 SOLVER.BATCH_SIZE 16"
# normkd-train as the stage finds it on PATH, on a clock where each run's epoch takes 10 s: a chunk's
# stop depends on the limit alone, not on this machine's speed. POISON=TYPE:EPOCH turns that run's weights NaN.
TIMED_TRAIN = """#!{python}
import os

import torch

from normkd_plugin import timelimit
from normkd_plugin.engine.fit import Hook
from normkd_plugin.train import main


class Clock:
    now = 0.0

    def monotonic(self):
        return self.now


class TenSecondsPerRun(Hook):
    def before_epoch(self, epoch, runs):
        kind, _, at = os.environ.get("POISON", "::").partition(":")
        for run in runs:
            if run.cfg.DISTILLER.TYPE == kind and epoch == int(at):
                with torch.no_grad():
                    next(run.distiller.student.parameters()).fill_(float("nan"))
        self.runs = len(runs)

    def before_step(self, epoch, step):  # inside the epoch the time limit measures
        if step == 0:
            clock.now += 10.0 * self.runs


timelimit.time = clock = Clock()
main(hooks=[TenSecondsPerRun()])
"""


@pytest.fixture
def data(tmp_path, small_cifar_npz, teacher_resnet56):
    """$DATA as the GPU machine has it: cifar100/*.npz and teachers/cifar100/resnet56-f2eff4c8.pt.

    The training split is the shared small one; the test split keeps 20 of its images (every epoch of every
    run evaluates it, and which images they are does not matter to a bitwise comparison)."""
    root = tmp_path / "data"
    (root / "teachers" / "cifar100").mkdir(parents=True)
    (root / "cifar100").mkdir()
    shutil.copy(small_cifar_npz / "train-0-of-1.npz", root / "cifar100")
    with np.load(small_cifar_npz / "test-0-of-1.npz") as z:
        np.savez(root / "cifar100" / "test-0-of-1.npz", images=z["images"][:20], labels=z["labels"][:20])
    os.symlink(teacher_resnet56, root / "teachers" / "cifar100" / teacher_resnet56.name)
    return root


def _env(tmp_path, data, chunk: int, seconds: int) -> dict[str, str]:
    timed = tmp_path / "bin"
    if not timed.is_dir():
        timed.mkdir()
        (timed / "normkd-train").write_text(TIMED_TRAIN.format(python=sys.executable))
        (timed / "normkd-train").chmod(0o755)
    return {
        **os.environ,
        "PATH": os.pathsep.join([str(timed), str(Path(sys.executable).parent), os.environ["PATH"]]),
        "OMP_NUM_THREADS": str(THREADS),
        "DATA": str(data),
        "OUT": str(tmp_path / f"out{chunk}"),
        "RES": str(tmp_path / f"res{chunk}"),
        "COMPARE_PREFIX": str(tmp_path / f"machine{chunk}"),  # each chunk on a "fresh machine"
        "COMPARE_KEEP": str(tmp_path / "repo" / "runs"),
        "COMPARE_SECONDS": str(seconds),
        "COMPARE_SEEDS": "0",
        "COMPARE_OPTS": TINY,
    }


def _chunk(tmp_path, data, chunk: int, seconds: int, stage_exit: int = 0, **extra: str) -> int:
    """Run the compare stage, unpack its bundle into the 'repository'; the chunk's exit code."""
    env = {**_env(tmp_path, data, chunk, seconds), **extra}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_checks.sh", "compare"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == stage_exit, proc.stdout[-2000:] + proc.stderr[-2000:]
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
    # 7 runs x 10 s per epoch within 220 s: epochs start at 0, 70 and 140 s; a fourth would end at 280 s
    assert _chunk(tmp_path, data, 1, seconds=220) == 3
    runs = tmp_path / "repo" / "runs"
    names = sorted(p.name for p in runs.iterdir())
    assert [n.split(",")[0] for n in names] == sorted(METHODS) and all(n.endswith("seed:0") for n in names)
    for name in names:  # only what the next machine needs: `latest` of unfinished runs, never a teacher
        assert {p.name for p in (runs / name).iterdir()} == {"worklog.txt", "config.yaml", "provenance.yaml", "latest"}
        assert (runs / name / "worklog.txt").read_text().count("epoch: ") == 3
    log = (tmp_path / "unpacked1" / "compare.log").read_text()
    assert "stopped at the time limit after 3m30s of 3m40s (longest epoch 70.0s): 7 of 7 run(s) at epoch 3 of 5" in log

    assert _chunk(tmp_path, data, 2, seconds=600) == 0  # a fresh machine: only the bundle's files
    for name in names:
        assert {p.name for p in (runs / name).iterdir()} == {
            "worklog.txt",
            "config.yaml",
            "provenance.yaml",
        }  # no state
        assert (runs / name / "worklog.txt").read_text().count("epoch: ") == EPOCHS

    from normkd_plugin import train

    reference = tmp_path / "uninterrupted"
    cfgs = [arg for m in METHODS for arg in ("--cfg", f"cifar100/{m}/res56_res20")]
    with torch_threads(THREADS):
        train.main(
            [*cfgs, "--seeds", "0", *TINY.split(), "SOLVER.TRAINER", "fast", "DATASET.ROOT", str(data / "cifar100"),
             "DISTILLER.TEACHER_CKPT", str(data / "teachers/cifar100/resnet56-f2eff4c8.pt"), "LOG.PREFIX", str(reference)]
        )  # fmt: skip
    for name in names:
        assert_same_run(reference / "cifar100" / name, tmp_path / "machine2" / "cifar100" / name)
        assert (runs / name / "worklog.txt").read_text() == (reference / "cifar100" / name / "worklog.txt").read_text()


def test_a_run_that_fails_in_a_chunk_does_not_hold_back_the_others(tmp_path, data):
    """NormDKD turns NaN in epoch 2: the chunk exits 2 (the stage 1), and every run's progress still comes back."""
    # epochs of 70, 70 (NormDKD fails in it) and 60 s end at 200 s; a fourth would end at 260 s
    assert _chunk(tmp_path, data, 1, seconds=210, stage_exit=1, POISON="NORMDKD:2") == 2
    runs = tmp_path / "repo" / "runs"
    log = (tmp_path / "unpacked1" / "compare.log").read_text()
    assert "epoch 2 step 1 of 1: non-finite training loss" in log
    assert "the others stopped at the time limit" in log and "6 of 7 run(s) at epoch 3 of 5" in log
    for folder in runs.iterdir():
        text = (folder / "worklog.txt").read_text()
        assert (folder / "latest").is_file()  # unfinished (the failed run keeps its last good state)
        if folder.name.startswith("normdkd"):
            assert text.count("epoch: ") == 1 and "failed\tepoch 2 step 1 of 1" in text
        else:
            assert text.count("epoch: ") == 3 and "failed" not in text


def test_bundle_of_a_failed_chunk_is_still_written(tmp_path, data):
    """A chunk whose training fails (here: a bad override) exits 1 and still returns its log."""
    env = _env(tmp_path, data, 1, 60)
    env["COMPARE_OPTS"] = "--device cpu SOLVER.EPOCHS 0"
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_checks.sh", "compare"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1 and "compare chunk: exit 2" in proc.stdout
    assert "normkd-train: command-line override SOLVER.EPOCHS 0" in proc.stdout  # the reason, on the console
    (part,) = (tmp_path / "out1").iterdir()
    with tarfile.open(part) as tar:
        log = tar.extractfile("./compare.log").read().decode()
    assert "SOLVER.EPOCHS" in log


# Writes the node ids pytest collected (after -k) and, among them, those that need CUDA (conftest's needs_cuda).
COLLECTOR = """
import os


def pytest_collection_finish(session):
    from conftest import needs_cuda

    reason = needs_cuda.mark.kwargs["reason"]
    with open(os.environ["COLLECTED"], "w") as f:
        for item in session.items:
            cuda = any(m.kwargs.get("reason") == reason for m in item.iter_markers("skipif"))
            f.write(("cuda " if cuda else "     ") + item.nodeid + "\\n")
"""


def _checks_stage() -> tuple[list[str], str, int]:
    """The checks stage's test files, -k expression and expected count, as gpu_checks.sh sets them."""
    text = (REPO / "benchmarks" / "gpu_checks.sh").read_text()
    files = re.search(r"^CUDA_TESTS=\(([^)]*)\)$", text, re.M).group(1).split()
    select = re.search(r'^CUDA_SELECT="(.*)"$', text, re.M).group(1)
    count = int(re.search(r"^CUDA_COUNT=(\d+)$", text, re.M).group(1))
    assert '-k "$CUDA_SELECT" "${CUDA_TESTS[@]}"' in text and '"^$CUDA_COUNT passed' in text
    return files, select, count


def _collected(tmp_path, *args: str) -> list[tuple[bool, str]]:
    (tmp_path / "cuda_collector.py").write_text(COLLECTOR)
    out = tmp_path / "collected.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "COLLECTED": str(out)}
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", "cuda_collector"]
    proc = subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [(line[:4] == "cuda", line[5:]) for line in out.read_text().splitlines()]


def test_the_checks_stage_selects_every_cuda_test_and_only_those(tmp_path):
    """Every test of the suite that needs CUDA is one that the checks stage runs, and their number is CUDA_COUNT."""
    files, select, count = _checks_stage()
    needing = sorted(node for cuda, node in _collected(tmp_path, "tests") if cuda)
    selected = _collected(tmp_path, "-k", select, *files)
    assert sorted(node for _, node in selected) == needing
    assert all(cuda for cuda, _ in selected) and len(needing) == count


def test_stages_keep_their_whole_output_and_a_failing_case_does_not_end_the_table(tmp_path):
    """checks and fused on a CPU with no data: the CUDA tests skip and say so; every benchmark case fails and its row
    says why; each stage's whole output, tracebacks included, comes back in the bundle."""
    data = tmp_path / "nodata"
    env = {**os.environ, "DATA": str(data), "OUT": str(tmp_path / "out"), "RES": str(tmp_path / "res")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    env["PYTHONPATH"] = str(REPO)  # python3 -P does not add the working directory
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_checks.sh", "checks", "fused"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    _, _, count = _checks_stage()
    assert f"CUDA tests: not all {count} passed" in proc.stdout
    rows = {line for line in proc.stdout.splitlines() if line.startswith("| res56_res20 |")}  # as they come, then all
    assert len(rows) == 6 and all("failed: DataError: DATASET.ROOT" in row for row in rows)  # fp32, bf16: 1, 21, 21
    parts = sorted((tmp_path / "out").iterdir())
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(f"cat {' '.join(map(str, parts))} | tar -xzf - -C {unpacked}", shell=True, check=True)
    tests_log = (unpacked / "cuda_tests.log").read_text()
    assert re.search(rf"^{count} skipped, \d+ deselected in ", tests_log, re.M) and "needs a CUDA device" in tests_log
    bench_log = (unpacked / "pack_speed_fused.log").read_text()
    assert bench_log.count("Traceback (most recent call last)") == 6 and str(data) in bench_log
    assert (unpacked / "pack_speed_fused.md").read_text().count("failed: ") == 6


def test_unpack_merges_a_fused_pack_measurement_into_the_table(tmp_path):
    from normkd_plugin.engine.fuse_speed import Measurement, read_table, write_table

    def row(runs, fused):
        return Measurement("GPU X", "resnet20", "fp32", "off", runs, 30.0, fused, "2.14.1", "")

    results, parts = tmp_path / "results", tmp_path / "parts"
    results.mkdir(), parts.mkdir()
    write_table(results / "fuse_speed.csv", [row(15, 10.0)])
    with tarfile.open(parts / "results.tgz.00", "w:gz") as tar:
        tar.add(results / "fuse_speed.csv", "./fuse_speed.csv")
    table = tmp_path / "table.csv"
    write_table(table, [row(15, 40.0), row(4, 20.0)])
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    env["PYTHONPATH"] = str(REPO)
    cmd = ["bash", "benchmarks/gpu_unpack.sh", str(parts), str(tmp_path / "dest"), str(tmp_path / "runs"), str(table)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [(r.runs, r.fused_ms) for r in read_table(table)] == [(4, 20.0), (15, 10.0)]  # the new row replaced the old
