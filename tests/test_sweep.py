"""normkd-sweep: the printed grid and the skip rule for finished runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import needs_mdistiller
from normkd_plugin import sweep


def test_full_cifar_grid_is_11_pairs_by_4_methods_by_seeds():
    jobs = sweep.grid("cifar100", ["kd", "dkd", "normkd", "normdkd"], ["all"], [0, 1, 2], [])
    assert len(jobs) == 11 * 4 * 3
    assert jobs[0].command() == "normkd-train --cfg cifar100/kd/res56_res20 EXPERIMENT.SEED 0"
    assert len({(j.cfg, j.seed) for j in jobs}) == len(jobs)


def test_printed_commands_pass_overrides_through():
    out = subprocess.run(
        [sys.executable, "-m", "normkd_plugin.sweep", "--dataset", "imagenet", "--methods", "normkd", "--pairs", "r50_mv1",
         "--seeds", "0,1", "SOLVER.TRAINER", "base", "DATASET.ROOT", "/data/my imagenet"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert out == [
        "normkd-train --cfg imagenet/r50_mv1/normkd SOLVER.TRAINER base DATASET.ROOT '/data/my imagenet' EXPERIMENT.SEED 0",
        "normkd-train --cfg imagenet/r50_mv1/normkd SOLVER.TRAINER base DATASET.ROOT '/data/my imagenet' EXPERIMENT.SEED 1",
    ]


def test_unknown_pair_or_method_is_named():
    with pytest.raises(ValueError, match="res56_res2[^0].*pairs: res56_res20"):
        sweep.grid("cifar100", ["kd"], ["res56_res2"], [0], [])
    with pytest.raises(ValueError, match="fitnet"):
        sweep.grid("cifar100", ["fitnet"], ["all"], [0], [])


def test_finished_means_a_best_acc_line(tmp_path):
    assert not sweep.is_finished(tmp_path)
    (tmp_path / "worklog.txt").write_text("-" * 25 + "\nepoch: 1\ntest_acc: 1.00\n" + "-" * 25 + "\n")
    assert not sweep.is_finished(tmp_path)
    with open(tmp_path / "worklog.txt", "a") as f:
        f.write("best_acc\t1.00")
    assert sweep.is_finished(tmp_path)


@needs_mdistiller
def test_run_skips_finished_and_launches_the_rest(tmp_path, monkeypatch):
    jobs = sweep.grid("cifar100", ["kd", "normkd"], ["res56_res20"], [0], ["LOG.PREFIX", str(tmp_path)])
    done = sweep.run_folder(jobs[0])
    assert done == str(tmp_path / "cifar100" / "kd,res56,res20,seed:0")
    (tmp_path / "cifar100" / "kd,res56,res20,seed:0").mkdir(parents=True)
    (tmp_path / "cifar100" / "kd,res56,res20,seed:0" / "worklog.txt").write_text("best_acc\t70.00")
    launched = []
    monkeypatch.setattr(sweep.subprocess, "call", lambda argv: launched.append(argv) or 0)
    sweep.main(
        ["--methods", "kd,normkd", "--pairs", "res56_res20", "--seeds", "0", "--run", "LOG.PREFIX", str(tmp_path)]
    )
    assert len(launched) == 1 and "cifar100/normkd/res56_res20" in launched[0] and "--resume" not in launched[0]
