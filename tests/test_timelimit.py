"""timelimit.py and --time-limit: a job ends at an epoch boundary in time; its runs resume exactly elsewhere."""

from __future__ import annotations

import shutil

import pytest

from conftest import assert_same_run, fast_opts, load_state, needs_mdistiller, spawn_and_wait, train_built_pack


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("2.5", 2.5), ("8m", 480), ("1.5h", 5400), ("7:30", 450), ("1:02:03", 3723)],
)
def test_parse_duration(text, seconds):
    from normkd_plugin.timelimit import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "8 minutes", "-5", "0", "1:75", "h"])
def test_bad_duration_names_flag_and_value(text):
    from normkd_plugin.config import ConfigError
    from normkd_plugin.timelimit import parse_duration

    with pytest.raises(ConfigError, match=rf"--time-limit '{text}'"):
        parse_duration(text)


def test_format_seconds_estimates_in_two_units_and_reports_to_the_second():
    """The ETA keeps the two leading units; --time-limit's report is exact, minutes always shown."""
    from normkd_plugin.timelimit import format_seconds

    seconds = (0, 12.4, 40, 245, 3720, 3723, 86399)
    assert [format_seconds(s) for s in seconds] == ["0s", "12s", "40s", "4m05s", "1h02m", "1h02m", "23h59m"]
    assert [format_seconds(s, exact=True) for s in seconds] == [
        "0m00s",
        "0m12s",
        "0m40s",
        "4m05s",
        "1h02m00s",
        "1h02m03s",
        "23h59m59s",
    ]


class FakeClock:
    """time.monotonic for normkd_plugin.timelimit: advanced by hand (or by an epoch) in the test."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    from normkd_plugin import timelimit

    fake = FakeClock()
    monkeypatch.setattr(timelimit, "time", fake)
    return fake


def epochs_take(clock: FakeClock, seconds: float):
    """A hook (``engine.fit.Hook``) by which every epoch takes ``seconds`` of ``clock``: it advances the clock as the
    epoch's first batch is taken, after the time limit marked the epoch's start and before it marks its end."""
    from normkd_plugin.engine.fit import Hook

    class EpochsTake(Hook):
        def before_step(self, epoch, step):
            if step == 0:
                clock.now += seconds

    return EpochsTake()


def test_an_epoch_starts_only_if_the_longest_epoch_so_far_still_fits(clock):
    from normkd_plugin.timelimit import TimeLimit

    limit = TimeLimit(100)
    clock.now += 30  # building the job
    assert limit.allows_epoch()  # nothing measured yet
    # epochs end at 50, 60, 75 and 85 s; with the longest (20 s) the next would end at 70, 80, 95, 105 s
    for duration, allowed in ((20, True), (10, True), (15, True), (10, False)):
        limit.epoch_started()
        clock.now += duration
        limit.epoch_ended()
        assert limit.allows_epoch() is allowed, clock.now
    assert limit.longest == 20 and limit.describe() == "after 1m25s of 1m40s (longest epoch 20.0s)"
    late = TimeLimit(10)
    clock.now += 60  # building the job took longer than the whole limit
    assert late.allows_epoch()  # still the first epoch starts: its runs must hold something to resume


def test_the_estimate_scales_with_the_runs_an_epoch_trains(clock):
    """A catch-up epoch of one run (a pack that gained a run) must not admit a full epoch of four."""
    from normkd_plugin.timelimit import TimeLimit

    limit = TimeLimit(100)
    limit.epoch_started()
    clock.now += 10  # one run
    limit.epoch_ended(runs=1)
    assert limit.allows_epoch(runs=1) and limit.allows_epoch(runs=9) and not limit.allows_epoch(runs=10)
    limit.epoch_started()
    clock.now += 20  # four runs: cheaper per run (the teacher's forward is shared)
    limit.epoch_ended(runs=4)
    assert limit.per_run == 10 and limit.longest == 20
    assert limit.allows_epoch(runs=7) and not limit.allows_epoch(runs=8)  # 70 s left


def _ranked_worker(rank, out, root, teacher):
    """One of two gloo processes training a one-run pack under a limit; rank 1's clock runs 1000 s ahead per epoch."""
    import torch
    import torch.distributed as dist

    from normkd_plugin import timelimit
    from normkd_plugin.build import build_pack
    from normkd_plugin.config import load_config, run_name
    from normkd_plugin.run_folder import RunFolder

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    clock = FakeClock()
    timelimit.time = clock
    try:
        opts = fast_opts(root, teacher, out / "runs", 0, "SOLVER.FAST.ITERS_PER_EPOCH", "1")
        cfg = load_config("cifar100/normkd/res56_res20", opts)
        name = run_name(cfg, opts)
        pack = build_pack([cfg], [name], [RunFolder(out / "runs" / name)], torch.device("cpu"))
        hooks = [epochs_take(clock, 1.0 if rank == 0 else 1000.0)]
        train_built_pack(pack, time_limit=timelimit.TimeLimit(100), hooks=hooks)
        (out / f"rank{rank}").write_text(str(pack.runs[0].epoch))
    finally:
        dist.destroy_process_group()


@needs_mdistiller
def test_every_rank_follows_rank_0s_decision(tmp_path, small_cifar_npz, teacher_resnet56):
    """Alone, rank 1 would stop after epoch 1 (its epochs take 1000 s); it follows rank 0 and both finish, no hang."""
    spawn_and_wait(_ranked_worker, (tmp_path, small_cifar_npz, teacher_resnet56), 2)
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["2", "2"]
    (folder,) = (tmp_path / "runs").glob("*/*")
    assert (folder / "worklog.txt").read_text().count("best_acc") == 1


PACK = ("--cfg", "cifar100/normkd/res56_res20", "--cfg", "cifar100/normdkd/res56_res20", "--device", "cpu")


@needs_mdistiller
def test_pack_stops_in_time_then_resumes_from_travelled_files_bitwise(
    tmp_path, small_cifar_npz, teacher_resnet56, clock, capsys
):
    """A 2-epoch pack under a limit that fits one epoch exits 3 after epoch 1; only worklog.txt, config.yaml
    and latest of each run travel to another folder, and --resume there ends bitwise as the uninterrupted pack."""
    from normkd_plugin import train

    def argv(prefix):
        return [*PACK, *fast_opts(small_cifar_npz, teacher_resnet56, prefix, 0)]

    train.main(argv(tmp_path / "whole"))
    hooks = [epochs_take(clock, 40.0)]
    with pytest.raises(SystemExit) as stop:
        train.main(["--time-limit", "1m", *argv(tmp_path / "chunk")], hooks=hooks)
    assert stop.value.code == 3
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("normkd-train: stopped at the time limit after 0m40s of 1m00s (longest epoch 40.0s)")
    assert message.endswith("2 of 2 run(s) at epoch 1 of 2; run the same command with --resume to continue")

    runs = sorted(p.relative_to(tmp_path / "chunk") for p in (tmp_path / "chunk").glob("*/*"))
    assert runs == sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").glob("*/*"))
    assert len(runs) == 2
    for name in runs:
        chunk, moved = tmp_path / "chunk" / name, tmp_path / "moved" / name
        assert load_state(chunk)["epoch"] == 1
        text = (chunk / "worklog.txt").read_text()
        assert text.count("epoch: ") == 1 and "best_acc" not in text and "failed" not in text
        moved.mkdir(parents=True)
        for kept in ("worklog.txt", "config.yaml", "latest"):  # what a chunk carries to the next machine
            shutil.copy(chunk / kept, moved / kept)
    # a fresh budget: epoch 2 fits
    train.main(["--resume", "--time-limit", "1m", *argv(tmp_path / "moved")], hooks=hooks)
    for name in runs:
        assert_same_run(tmp_path / "whole" / name, tmp_path / "moved" / name)


@needs_mdistiller
def test_a_limit_spent_before_training_still_trains_one_epoch(
    tmp_path, small_cifar_npz, teacher_resnet56, clock, capsys
):
    """Building took longer than the limit: the first epoch runs anyway (nothing to estimate it by), so the
    stopped run holds a checkpoint and the suggested --resume continues it."""
    from normkd_plugin import train
    from normkd_plugin.engine.fit import Hook

    class SlowStart(Hook):
        def before_fit(self, pack):  # the runs' folders are decided and started: 100 s have gone by
            clock.now += 100

    argv = [PACK[0], PACK[1], "--device", "cpu", *fast_opts(small_cifar_npz, teacher_resnet56, tmp_path, 0)]
    with pytest.raises(SystemExit) as stop:
        train.main(["--time-limit", "30s", *argv], hooks=[SlowStart(), epochs_take(clock, 5.0)])
    assert stop.value.code == 3 and "1 of 1 run(s) at epoch 1 of 2" in capsys.readouterr().err
    (folder,) = tmp_path.glob("*/*")
    assert load_state(folder)["epoch"] == 1
    train.main(["--resume", *argv])
    assert (folder / "worklog.txt").read_text().count("best_acc") == 1


@needs_mdistiller
def test_ddp_trainer_stops_in_time_and_resumes(tmp_path, small_cifar_npz, teacher_resnet56, clock, capsys):
    from normkd_plugin import train

    opts = [
        "--cfg", "cifar100/normkd/res56_res20", "--device", "cpu",
        *fast_opts(small_cifar_npz, teacher_resnet56, tmp_path, 0, "SOLVER.TRAINER", "ddp", "DATASET.NUM_WORKERS", "0"),
    ]  # fmt: skip
    hooks = [epochs_take(clock, 25.0)]
    with pytest.raises(SystemExit) as stop:
        train.main(["--time-limit", "45s", *opts], hooks=hooks)
    assert stop.value.code == 3
    assert "at epoch 1 of 2; run the same command with --resume" in capsys.readouterr().err
    (folder,) = tmp_path.glob("*/*")
    assert load_state(folder)["epoch"] == 1 and "best_acc" not in (folder / "worklog.txt").read_text()
    # a fresh budget: 25 s fits, then 50 s + 25 s does not
    train.main(["--resume", "--time-limit", "45s", *opts], hooks=hooks)
    text = (folder / "worklog.txt").read_text()
    assert [int(b.split()[0]) for b in text.split("epoch: ")[1:]] == [1, 2] and text.count("best_acc\t") == 1


@needs_mdistiller
def test_host_trainer_refuses_a_time_limit_before_building(tmp_path, capsys):
    from normkd_plugin import train

    with pytest.raises(SystemExit) as stop:
        train.main(["--cfg", "cifar100/kd/res56_res20", "--time-limit", "2h", "LOG.PREFIX", str(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--time-limit: SOLVER.TRAINER 'base' is mdistiller's trainer, whose epoch loop cannot stop early" in err
    assert not any(tmp_path.iterdir())
