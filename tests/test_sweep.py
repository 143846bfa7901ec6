"""normkd-sweep: the printed grid and the skip rule for finished runs."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import needs_mdistiller
from normkd_plugin import pairs, sweep


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
    with pytest.raises(ValueError, match="unknown pair or method vanilla; .*methods: kd, dkd, kd_ls, dkd_ls, normkd"):
        sweep.grid("imagenet", ["vanilla"], ["r34_r18"], [0], [])


def test_every_method_of_the_grid_has_its_packaged_config():
    from normkd_plugin.config import packaged_configs

    names = {c.name for c in packaged_configs()}
    for dataset in ("cifar100", "imagenet"):
        jobs = sweep.grid(dataset, list(pairs.methods(dataset)), ["all"], [0], [])
        assert {j.cfg for j in jobs} <= names and len(jobs) == {"cifar100": 11 * 7, "imagenet": 2 * 6}[dataset]


def _finished_worklog(epochs: int = 2) -> str:
    """What a run of ``epochs`` epochs leaves: every epoch's block, then best_acc (the best test_acc)."""
    from normkd_plugin import worklog

    record = dict(train_acc=30.0, train_loss=2.5, test_acc=20.0, test_acc_top5=45.0, test_loss=3.0)
    blocks = [worklog.block(e, 0.05, {**record, "test_acc": 20.0 + e}) for e in range(1, epochs + 1)]
    return "".join(blocks) + worklog.best_line(20.0 + epochs)


def _finish(folder) -> None:
    os.makedirs(folder)
    with open(os.path.join(folder, "worklog.txt"), "w") as f:
        f.write(_finished_worklog())


def _decision(folder) -> str:
    """What ``normkd-train --resume`` does with the run in ``folder``, as the sweep asks it (``lifecycle.decision``)."""
    from normkd_plugin.lifecycle import decision
    from normkd_plugin.run_folder import RunFolder

    return decision(RunFolder(folder), resume=True)


def test_finished_means_every_epoch_then_best_acc(tmp_path):
    """A run is skipped as finished only when its worklog holds every epoch and then best_acc, the best test_acc."""
    assert _decision(tmp_path) == "start"
    (tmp_path / "worklog.txt").write_text("-" * 25 + "\nepoch: 1\ntest_acc: 1.00\n" + "-" * 25 + "\n")
    assert _decision(tmp_path) == "start"  # started, but with no checkpoint to resume from
    with open(tmp_path / "worklog.txt", "a") as f:
        f.write("best_acc\t1.00")
    assert _decision(tmp_path) == "skip"
    (tmp_path / "config.yaml").write_text("SOLVER:\n  EPOCHS: 2\n")  # the run was to train 2 epochs
    assert _decision(tmp_path) == "start"
    (tmp_path / "worklog.txt").write_text(_finished_worklog(2))
    assert _decision(tmp_path) == "skip"
    (tmp_path / "worklog.txt").write_text("best_acc\t70.00")  # no epoch at all
    assert _decision(tmp_path) == "start"
    (tmp_path / "worklog.txt").write_text(_finished_worklog(2).replace("best_acc\t22.00", "best_acc\t70.00"))
    assert _decision(tmp_path) == "start"  # not the best logged test_acc
    (tmp_path / "worklog.txt").write_bytes(b"\xff\xfe\x00\x81" * 64)  # binary: damaged, so not finished
    assert _decision(tmp_path) == "start"
    (tmp_path / "latest").write_bytes(b"")  # a checkpoint beside it: resumed (and the worklog rebuilt from it)
    assert _decision(tmp_path) == "resume"


@needs_mdistiller
def test_run_over_a_grid_holding_a_binary_worklog_resumes_that_run(tmp_path, monkeypatch):
    opts = ["LOG.PREFIX", str(tmp_path)]
    damaged = sweep.job_folder("cifar100/kd/res56_res20", 0, tuple(opts))
    os.makedirs(damaged)
    with open(os.path.join(damaged, "worklog.txt"), "wb") as f:
        f.write(bytes(range(256)) * 4)
    launched = []
    monkeypatch.setattr(sweep, "launch", lambda argv, env=None: launched.append(argv) or 0)
    sweep.main(["--methods", "kd", "--pairs", "res56_res20", "--seeds", "0", "--run", *opts])
    (argv,) = launched  # normkd-train --resume then rebuilds the worklog from its checkpoint, or starts again
    assert "--resume" in argv and "cifar100/kd/res56_res20" in argv


@needs_mdistiller
def test_a_run_folder_that_cannot_be_read_fails_its_command_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    opts = ["LOG.PREFIX", str(tmp_path)]
    broken = sweep.job_folder("cifar100/kd/res56_res20", 0, tuple(opts))
    os.makedirs(os.path.join(broken, "worklog.txt"))  # reading it fails: EISDIR (as EACCES on a shared disk)
    launched = []
    monkeypatch.setattr(
        sweep, "launch", lambda argv, env=None: launched.append(argv) or (2 if len(launched) == 1 else 0)
    )
    with pytest.raises(SystemExit) as exc:
        sweep.main(["--methods", "kd", "--pairs", "res56_res20", "--seeds", "0,1", "--run", *opts])
    assert str(exc.value.code).startswith("normkd-sweep: 1 of 2 commands failed:")  # its one failed command
    assert len(launched) == 2 and "--resume" in launched[0]  # normkd-train says what is wrong with the folder
    assert "EXPERIMENT.SEED" in launched[1] and launched[1][launched[1].index("EXPERIMENT.SEED") + 1] == "1"
    assert "going on with the next" in capsys.readouterr().err


@needs_mdistiller
def test_run_skips_finished_and_launches_the_rest(tmp_path, monkeypatch):
    jobs = sweep.grid("cifar100", ["kd", "normkd"], ["res56_res20"], [0], ["LOG.PREFIX", str(tmp_path)])
    done = sweep.job_folder(jobs[0].cfg, jobs[0].seed, jobs[0].opts)
    assert done == str(tmp_path / "cifar100" / "kd,res56,res20,seed:0")
    _finish(done)
    launched = []
    monkeypatch.setattr(sweep, "launch", lambda argv, env=None: launched.append(argv) or 0)
    sweep.main(
        ["--methods", "kd,normkd", "--pairs", "res56_res20", "--seeds", "0", "--run", "LOG.PREFIX", str(tmp_path)]
    )
    assert len(launched) == 1 and "cifar100/normkd/res56_res20" in launched[0] and "--resume" not in launched[0]


@needs_mdistiller
def test_flags_after_the_overrides_are_flags_as_in_normkd_train(tmp_path, monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(sweep, "launch", lambda argv, env=None: launched.append(argv) or 0)
    grid = ["--methods", "kd", "--pairs", "res56_res20"]
    sweep.main([*grid, "SOLVER.LR", "0.1", "LOG.PREFIX", str(tmp_path), "--run", "--device", "cpu"])
    (argv,) = launched  # --run ran it; --device reached it; neither became an override
    assert argv[1:3] == ["-m", "normkd_plugin.train"] and argv[3:] == [
        "--device", "cpu", "--cfg", "cifar100/kd/res56_res20", "SOLVER.LR", "0.1", "LOG.PREFIX", str(tmp_path),
        "EXPERIMENT.SEED", "0",
    ]  # fmt: skip
    assert capsys.readouterr().out.splitlines() == [f"[1/1] normkd-train {sweep.shlex.join(argv[3:])}"]
    sweep.main([*grid, "--seeds", "3", "EXPERIMENT.NAME", "-x", "--pack", "--", "DATASET.ROOT", "--d"])
    assert capsys.readouterr().out.splitlines() == [  # a VALUE is never a flag; after --, neither is anything
        "normkd-train --cfg cifar100/kd/res56_res20 --seeds 3 EXPERIMENT.NAME -x DATASET.ROOT --d SOLVER.TRAINER fast"
    ]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["SOLVER.LR", "0.1", "--resume"], "normkd-sweep: error: unrecognized arguments: --resume"),
        (["SOLVER.LR", "0.1", "LOG.PREFIX"], "normkd-sweep: command-line override LOG.PREFIX has no VALUE; "),
        (["SOLVER.LR", "--device", "cpu"], "normkd-sweep: command-line override SOLVER.LR has no VALUE; "),
    ],
)
def test_a_flag_it_does_not_know_or_a_key_without_value_is_refused(argv, expected):
    proc = subprocess.run(
        [sys.executable, "-m", "normkd_plugin.sweep", "--pairs", "res56_res20", "--run", *argv],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(expected) and not proc.stdout


@pytest.mark.parametrize("seeds", ["0,x", ","])
def test_bad_seeds_are_refused_with_normkd_trains_line(seeds, capsys):
    from normkd_plugin.config import ConfigError, parse_seeds

    with pytest.raises(SystemExit) as exc:
        sweep.main(["--pairs", "res56_res20", "--seeds", seeds])
    with pytest.raises(ConfigError) as train_error:  # what normkd-train --seeds says
        parse_seeds(seeds)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"normkd-sweep: {train_error.value}"]


def test_pack_groups_runs_by_teacher_with_seeds():
    jobs = sweep.grid("cifar100", ["kd", "normkd"], ["res32x4_res8x4", "res56_res20", "res32x4_shuv2"], [0, 1], [])
    packs = sweep.packs(jobs)
    assert [p.command() for p in packs] == [
        "normkd-train --cfg cifar100/kd/res56_res20 --cfg cifar100/normkd/res56_res20 --seeds 0,1 SOLVER.TRAINER fast",
        "normkd-train --cfg cifar100/kd/res32x4_res8x4 --cfg cifar100/normkd/res32x4_res8x4 --cfg cifar100/kd/res32x4_shuv2 "
        "--cfg cifar100/normkd/res32x4_shuv2 --seeds 0,1 SOLVER.TRAINER fast",
    ]
    assert sorted(r for p in packs for r in p.runs()) == sorted((j.cfg, j.seed) for j in jobs)


def test_pack_size_limit_splits_configs_and_seeds():
    jobs = sweep.grid("cifar100", ["kd", "dkd", "normkd", "normdkd"], ["res56_res20"], [0, 1, 2], [])
    assert [len(p.runs()) for p in sweep.packs(jobs, 6)] == [6, 6]  # 2 configs x 3 seeds each
    small = sweep.packs(jobs, 2)
    assert all(len(p.runs()) <= 2 for p in small)
    assert sorted(r for p in small for r in p.runs()) == sorted((j.cfg, j.seed) for j in jobs)


def test_pack_cli_prints_full_comparison_and_refuses_other_trainers():
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "normkd_plugin.sweep", *args], capture_output=True, text=True)

    out = cli("--pairs", "res56_res20", "--seeds", "0,1,2", "--pack", "DATASET.ROOT", "/data")
    comparison = ("vanilla", "kd", "dkd", "kd_ls", "dkd_ls", "normkd", "normdkd")  # 7 methods x 3 seeds: 21 runs
    cfgs = " ".join(f"--cfg cifar100/{m}/res56_res20" for m in comparison)
    assert out.returncode == 0 and out.stdout.splitlines() == [
        f"normkd-train {cfgs} --seeds 0,1,2 DATASET.ROOT /data SOLVER.TRAINER fast"
    ]
    cpu = cli("--pairs", "res56_res20", "--seeds", "0", "--pack", "--device", "cpu")
    assert cpu.returncode == 0 and cpu.stdout.startswith("normkd-train --device cpu --cfg cifar100/vanilla/res56_res20")
    bad = cli("--pairs", "res56_res20", "--pack", "SOLVER.TRAINER", "base")
    assert bad.returncode == 2 and "--pack trains with SOLVER.TRAINER fast or ddp (or base under --nproc" in bad.stderr
    assert "not 'base'" in bad.stderr


def test_imagenet_pack_cli_prints_one_torchrun_command_per_teacher():
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "normkd_plugin.sweep", *args], capture_output=True, text=True)

    out = cli("--dataset", "imagenet", "--pairs", "r34_r18", "--pack", "--nproc-per-node", "8", "DATASET.ROOT", "/in")
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    assert line.startswith("torchrun --standalone --nproc-per-node 8 -m normkd_plugin.train --cfg imagenet/r34_r18/kd")
    cfgs = " ".join(f"--cfg imagenet/r34_r18/{m}" for m in ("kd", "dkd", "kd_ls", "dkd_ls", "normkd", "normdkd"))
    assert f"{cfgs} --seeds 0 DATASET.ROOT /in SOLVER.TRAINER ddp" in line  # no vanilla config on ImageNet
    fast = cli("--dataset", "imagenet", "--pack", "SOLVER.TRAINER", "fast")
    assert fast.returncode == 2 and "--pack trains with SOLVER.TRAINER ddp (or base under" in fast.stderr


@needs_mdistiller
def test_run_reports_a_failing_command_and_goes_on(tmp_path, monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(
        sweep, "launch", lambda argv, env=None: launched.append(argv) or (3 if len(launched) == 1 else 0)
    )
    with pytest.raises(SystemExit, match=r"1 of 2 commands failed:\n  exit code 3: normkd-train --cfg cifar100/kd"):
        sweep.main(["--methods", "kd,normkd", "--pairs", "res56_res20", "--run", "LOG.PREFIX", str(tmp_path)])
    assert len(launched) == 2
    assert "going on with the next" in capsys.readouterr().err


@needs_mdistiller
def test_pack_run_drops_finished_runs_and_resumes_started_ones(tmp_path, monkeypatch):
    opts = ["LOG.PREFIX", str(tmp_path)]
    (pack,) = sweep.packs(sweep.grid("cifar100", ["kd", "normkd"], ["res56_res20"], [0, 1], opts))
    for cfg, seed in pack.runs()[:2]:  # kd seeds 0 and 1 finished
        folder = sweep.job_folder(cfg, seed, pack.opts)
        assert "SOLVER.TRAINER:fast" in folder
        _finish(folder)
    started = sweep.job_folder("cifar100/normkd/res56_res20", 1, pack.opts)
    os.makedirs(started)
    open(os.path.join(started, "latest"), "wb").close()
    launched = []
    monkeypatch.setattr(sweep, "launch", lambda argv, env=None: launched.append(argv) or 0)
    sweep.run_all([pack])
    (argv,) = launched
    assert "--resume" in argv and argv.count("--cfg") == 1 and "cifar100/normkd/res56_res20" in argv


@needs_mdistiller
def test_pack_run_with_finished_and_new_runs_passes_resume(tmp_path, monkeypatch):
    opts = ["LOG.PREFIX", str(tmp_path)]
    (pack,) = sweep.packs(sweep.grid("cifar100", ["kd"], ["res56_res20"], [0, 1], opts))
    _finish(sweep.job_folder("cifar100/kd/res56_res20", 0, pack.opts))
    launched = []
    monkeypatch.setattr(sweep, "launch", lambda argv, env=None: launched.append(argv) or 0)
    sweep.run_all([pack])
    (argv,) = launched
    assert "--resume" in argv and "--seeds" in argv and "0,1" in argv  # seed 0 is skipped, seed 1 starts


def test_torchrun_commands():
    out = subprocess.run(
        [sys.executable, "-m", "normkd_plugin.sweep", "--dataset", "imagenet", "--methods", "normkd", "--pairs", "r34_r18",
         "--nproc-per-node", "8", "DATASET.ROOT", "/data/imagenet"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert out == [
        "torchrun --standalone --nproc-per-node 8 -m normkd_plugin.train --cfg imagenet/r34_r18/normkd "
        "DATASET.ROOT /data/imagenet EXPERIMENT.SEED 0"
    ]


@needs_mdistiller
def test_run_through_torchrun(tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(sweep, "launch", lambda argv, env=None: launched.append(argv) or 0)
    sweep.main(
        ["--methods", "kd", "--pairs", "res56_res20", "--nproc-per-node", "2", "--run", "LOG.PREFIX", str(tmp_path)]
    )
    ((python, *argv),) = launched
    assert python == sys.executable and argv[:5] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    assert argv[5:8] == ["-m", "normkd_plugin.train", "--cfg"]


def test_printing_into_a_closed_pipe_ends_quietly():
    proc = subprocess.run(
        f"{sys.executable} -m normkd_plugin.sweep --pairs all --seeds 0,1,2,3,4 | head -1",
        shell=True, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.stdout.startswith("normkd-train --cfg") and "Traceback" not in proc.stderr


@needs_mdistiller
@pytest.mark.parametrize("nproc", [1, 2])
def test_time_limit_is_shared_by_the_commands_and_a_stop_ends_the_sweep(tmp_path, monkeypatch, capsys, nproc):
    """Each command gets what is left of the sweep's budget; a command that stops at it ends the sweep (exit 3),
    also through torchrun, which exits 1 for workers that exited 3; failures before are listed."""
    from normkd_plugin import timelimit

    class Clock:
        now = 0.0

        def monotonic(self):
            return self.now

    clock = Clock()
    monkeypatch.setattr(timelimit, "time", clock)
    launched = []

    def call(argv, env=None):  # command 1 fails after 50 s, 2 finishes after 100 s, 3 stops at its limit
        launched.append(argv)
        clock.now += (50, 100, 120)[len(launched) - 1]
        if len(launched) < 3:
            return (2, 0)[len(launched) - 1]
        with open(env["NORMKD_UNFINISHED_FILE"], "w") as f:
            f.write("stopped at the time limit\n")
        return 3 if nproc == 1 else 1

    monkeypatch.setattr(sweep, "launch", call)
    args = ["--methods", "kd,dkd,normkd,normdkd", "--pairs", "res56_res20", "--run", "--time-limit", "5m"]
    opts = ["SOLVER.TRAINER", "fast", "LOG.PREFIX", str(tmp_path)]
    with pytest.raises(SystemExit) as stop:
        sweep.main([*args, "--nproc-per-node", str(nproc), *opts])
    assert stop.value.code == 3 and len(launched) == 3  # the fourth never started
    assert [a[a.index("--time-limit") + 1] for a in launched] == ["300", "250", "150"]
    err = capsys.readouterr().err
    assert "stopped at the time limit after 4m30s of 5m00s in command 3 of 4" in err
    first = "torchrun --standalone --nproc-per-node 2 -m normkd_plugin.train" if nproc == 2 else "normkd-train"
    assert f"1 command(s) failed before:\n  exit code 2: {first} --time-limit 300 --cfg cifar100/kd/res56_res20" in err
    assert "exit code 1" not in err  # torchrun's 1 for a stop is not a failure

    clock.now, launched[:] = 0.0, []
    monkeypatch.setattr(sweep, "launch", lambda argv, env=None: (launched.append(argv), 0)[1])
    monkeypatch.setattr(sweep, "_remaining", lambda job: (clock.__setattr__("now", clock.now + 200), (job, False))[1])
    with pytest.raises(SystemExit) as stop:  # each command takes 200 s to start: the second finds nothing left
        sweep.main([*args, *opts])
    assert stop.value.code == 3 and len(launched) == 1
    assert "after 6m40s of 5m00s before command 2 of 4" in capsys.readouterr().err


def test_time_limit_passes_through_printed_commands_and_bad_values_are_refused():
    printed = subprocess.run(
        [
            sys.executable,
            "-m",
            "normkd_plugin.sweep",
            "--pairs",
            "res56_res20",
            "--methods",
            "kd",
            "--time-limit",
            "2h",
            "SOLVER.TRAINER",
            "fast",
        ],
        capture_output=True,
        text=True,
    )
    assert printed.stdout.startswith("normkd-train --time-limit 2h --cfg cifar100/kd/res56_res20")
    base = subprocess.run(
        [sys.executable, "-m", "normkd_plugin.sweep", "--pairs", "res56_res20", "--time-limit", "2h"],
        capture_output=True,
        text=True,
    )
    assert base.returncode == 2 and "--time-limit: SOLVER.TRAINER 'base' is mdistiller's trainer" in base.stderr
    for value in ("later", ""):
        bad = subprocess.run(
            [sys.executable, "-m", "normkd_plugin.sweep", "--run", "--time-limit", value],
            capture_output=True,
            text=True,
        )
        assert bad.returncode == 2 and f"--time-limit {value!r}" in bad.stderr


@needs_mdistiller
def test_a_pack_that_failed_and_stopped_through_torchrun_is_a_failure_and_a_stop(tmp_path, monkeypatch, capsys):
    """One run of the pack failed, the others stopped at the limit: torchrun exits 1 either way; the report's
    first line ``failed`` makes the sweep list the command as failed before it stops."""
    launched = []

    def call(argv, env=None):
        launched.append(argv)
        with open(env["NORMKD_UNFINISHED_FILE"], "w") as f:
            f.write("failed\nstopped at the time limit\n")
        return 1

    monkeypatch.setattr(sweep, "launch", call)
    args = ["--pairs", "res56_res20", "--methods", "kd,normkd", "--pack", "--run", "--nproc-per-node", "2"]
    with pytest.raises(SystemExit) as stop:
        sweep.main([*args, "--time-limit", "1h", "LOG.PREFIX", str(tmp_path)])
    assert stop.value.code == 3 and len(launched) == 1
    err = capsys.readouterr().err
    assert "in command 1 of 1" in err and "1 command(s) failed before:\n  exit code 1: torchrun" in err


# -- sweeps under a scheduler: real signals, real concurrent sweeps -------------------------------------


def _sweep_cmd(root, teacher, prefix, seeds="0", epochs=60, *extra):
    return [
        sys.executable, "-m", "normkd_plugin.sweep", "--methods", "normkd", "--pairs", "res56_res20",
        "--seeds", seeds, "--device", "cpu", "--run", "SOLVER.TRAINER", "fast", "SOLVER.EPOCHS", str(epochs),
        "SOLVER.LR_DECAY_STAGES", "[2]", "SOLVER.FAST.ITERS_PER_EPOCH", "1", "DATASET.ROOT", str(root),
        "DISTILLER.TEACHER_CKPT", str(teacher), "LOG.PREFIX", str(prefix), *extra,
    ]  # fmt: skip


def _wait_for(test, what, proc=None, timeout=300):
    import time

    deadline = time.monotonic() + timeout
    while not test():
        assert proc is None or proc.poll() is None, f"the sweep ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _kill_holder(folder):
    holder = sweep.lock_holder(str(folder))
    if holder and holder.isdigit():
        os.kill(int(holder), signal.SIGKILL)


@needs_mdistiller
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_to_the_sweep_reaches_its_command_and_the_sweep_waits_for_it(
    tmp_path, small_cifar_npz, teacher_resnet56, sig, code
):
    from conftest import load_state

    folder = (
        tmp_path
        / "out"
        / "cifar100"
        / (
            "normkd,res56,res20,SOLVER.EPOCHS:60,SOLVER.FAST.ITERS_PER_EPOCH:1,SOLVER.LR_DECAY_STAGES:[2],"
            "SOLVER.TRAINER:fast,seed:0"
        )
    )
    cmd = _sweep_cmd(small_cifar_npz, teacher_resnet56, tmp_path / "out")
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True) as proc:
        try:
            _wait_for(lambda: "epoch: 2\n" in _text(folder / "worklog.txt"), "epoch 2", proc)
            proc.send_signal(sig)
            err = proc.stderr.read()
            assert proc.wait(timeout=120) == code, err[-3000:]
            assert sweep.lock_holder(str(folder)) is None  # its command stopped too, and released the run
        finally:
            _kill_holder(folder)
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert re.fullmatch(r"normkd-train: interrupted after epoch (\d+); --resume continues", lines[-2]), lines[-2:]
    assert lines[-1].startswith(f"normkd-sweep: interrupted by signal {int(sig)}; the command running stopped")
    assert load_state(folder)["epoch"] == int(re.search(r"epoch (\d+)", lines[-2]).group(1))


def _text(path):
    try:
        return path.read_text()
    except OSError:
        return ""


@needs_mdistiller
def test_two_sweeps_over_one_grid_share_the_work_and_both_exit_0(tmp_path, small_cifar_npz, teacher_resnet56):
    """A holds run 0 (its trainer is stopped with SIGSTOP while B looks, so B must find it held whatever the
    machine's speed): B skips it, trains run 1 and waits for A's; A, continued, finds run 1 finished."""
    cmd = _sweep_cmd(small_cifar_npz, teacher_resnet56, tmp_path / "out", "0,1", 2)
    folders = [
        tmp_path / "out" / "cifar100" / (
            "normkd,res56,res20,SOLVER.EPOCHS:2,SOLVER.FAST.ITERS_PER_EPOCH:1,SOLVER.LR_DECAY_STAGES:[2],"
            f"SOLVER.TRAINER:fast,seed:{seed}"
        )
        for seed in (0, 1)
    ]  # fmt: skip
    a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b = held = None
    try:
        _wait_for(lambda: (sweep.lock_holder(str(folders[0])) or "").isdigit(), "the first run to start", a)
        held = int(sweep.lock_holder(str(folders[0])))
        os.kill(held, signal.SIGSTOP)
        b = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: _decision(folders[1]) == "skip", "B to finish run 1", b)
        assert b.poll() is None  # B waits for the run A holds
        os.kill(held, signal.SIGCONT)
        out_b, err_b = b.communicate(timeout=300)
        out_a, err_a = a.communicate(timeout=300)
    finally:
        if held is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(held, signal.SIGCONT)
        for proc in (a, b):
            if proc is not None:
                proc.kill()
    assert (a.returncode, b.returncode) == (0, 0), (err_a[-2000:], err_b[-2000:])
    assert "[1/2] skip (running elsewhere, PID " in out_b  # the run A trains; B trained the other meanwhile
    assert "[2/2] skip (finished)" in out_a
    assert "failed" not in err_a + err_b
    for folder in folders:
        assert (folder / "worklog.txt").read_text().count("best_acc") == 1


@needs_mdistiller
def test_a_sweep_whose_first_commands_fail_with_one_input_error_stops(tmp_path, teacher_resnet56):
    missing = tmp_path / "no-data"
    proc = subprocess.run(
        _sweep_cmd(missing, teacher_resnet56, tmp_path / "out", "0,1,2,3", 2),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout.count("normkd-train --device cpu") == 2  # commands 3 and 4 never started
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "normkd-sweep: the first 2 commands failed with the same input error; stopping here (fix it and run the "
            f"same normkd-sweep again): normkd-train: DATASET.ROOT {missing} is not a directory"
        )
    )


@pytest.mark.parametrize(("seeds", "expected"), [(" ", "no seed given"), ("0,x", "expected comma-separated")])
def test_bad_seeds_are_one_line(seeds, expected):
    proc = subprocess.run(
        [sys.executable, "-m", "normkd_plugin.sweep", "--seeds", seeds], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and expected in proc.stderr
