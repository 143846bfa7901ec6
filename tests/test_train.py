"""normkd-train and python -m normkd_plugin.run: config errors early, CUDA message, seeds, outputs."""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import interrupted_at, mdistiller_checkout, needs_mdistiller

pytestmark = needs_mdistiller


@pytest.fixture
def small_cifar(tmp_path, cifar_test_arrays):
    """A cifar-100-python folder of 48 training and 24 test images (real CIFAR-100 pixels)."""
    images, labels = cifar_test_arrays
    folder = tmp_path / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, sl in (("train", slice(0, 48)), ("test", slice(48, 72))):
        with open(folder / split, "wb") as f:
            pickle.dump(
                {"data": images[sl].transpose(0, 3, 1, 2).reshape(-1, 3072), "fine_labels": labels[sl].tolist()}, f
            )
    return folder.parent


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "normkd_plugin.train", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_host_trainer_without_cuda_stops_before_building(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the host trainer would really train")
    proc = _cli("--cfg", "cifar100/normkd/res56_res20", "LOG.PREFIX", str(tmp_path))
    assert proc.returncode != 0
    assert "no CUDA device is available" in proc.stderr and "SOLVER.TRAINER fast" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_bad_config_fails_before_training_with_one_line_and_exit_2(tmp_path):
    proc = _cli("--cfg", "cifar100/normkd/res56_res20", "NORMKD.TEMPERATURE", "2", "LOG.PREFIX", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "normkd-train: command-line override NORMKD.TEMPERATURE 2: no such config key; "
        "did you mean NORMKD.TEMPERATURE_NORM, KD.TEMPERATURE, NORMDKD.TEMPERATURE_NORM?"
    ]
    assert not any(tmp_path.iterdir())


def test_list_distillers_shows_distribution():
    proc = _cli("--list-distillers")
    assert proc.returncode == 0
    assert "NORMDKD" in proc.stdout and "normkd-plugin" in proc.stdout and "fast" in proc.stdout


def _train_once(tmp_path, small_cifar, teacher, seed, prefix):
    from normkd_plugin import train

    opts = [
        "--cfg", "cifar100/normdkd/res56_res20", "--device", "cpu",
        "SOLVER.TRAINER", "fast", "SOLVER.BATCH_SIZE", "16", "SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[]",
        "SOLVER.FAST.ITERS_PER_EPOCH", "1", "DATASET.ROOT", str(small_cifar),
        "DISTILLER.TEACHER_CKPT", str(teacher), "EXPERIMENT.SEED", str(seed), "LOG.PREFIX", str(prefix),
    ]  # fmt: skip
    train.main(opts)
    (run,) = list((prefix / "cifar100").iterdir())
    return run


def test_same_seed_same_first_iteration_losses_and_recorded(tmp_path, small_cifar, teacher_resnet56):
    runs = [_train_once(tmp_path, small_cifar, teacher_resnet56, 7, tmp_path / f"out{i}") for i in range(2)]
    other = _train_once(tmp_path, small_cifar, teacher_resnet56, 8, tmp_path / "out-other")
    assert (
        runs[0].name == "normdkd,res56,res20,SOLVER.BATCH_SIZE:16,SOLVER.EPOCHS:1,SOLVER.FAST.ITERS_PER_EPOCH:1,"
        "SOLVER.LR_DECAY_STAGES:[],SOLVER.TRAINER:fast,seed:7"
    )
    losses = [(r / "worklog.txt").read_text().split("train_loss: ")[1].split()[0] for r in [*runs, other]]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]
    cfg = yaml.safe_load((runs[0] / "config.yaml").read_text())
    assert cfg["EXPERIMENT"]["SEED"] == 7 and cfg["DISTILLER"]["TYPE"] == "NORMDKD"
    assert cfg["DATASET"]["ROOT"] == str(small_cifar)


def test_interrupted_run_resumes_through_the_cli(tmp_path, small_cifar, teacher_resnet56, monkeypatch, capsys):
    from normkd_plugin import train

    argv = [
        "--cfg", "cifar100/normkd/res56_res20", "--device", "cpu", "SOLVER.TRAINER", "fast",
        "SOLVER.BATCH_SIZE", "16", "SOLVER.FAST.ITERS_PER_EPOCH", "1", "SOLVER.EPOCHS", "3", "SOLVER.LR_DECAY_STAGES", "[2]",
        "DATASET.ROOT", str(small_cifar), "DISTILLER.TEACHER_CKPT", str(teacher_resnet56),
        "LOG.PREFIX", str(tmp_path / "o"), "EXPERIMENT.NAME", "r",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as info:  # one command, --resume included, starts the job (nothing to resume yet)
        train.main(["--resume", *argv], hooks=[interrupted_at(3)])
    assert info.value.code == 130
    assert capsys.readouterr().err.endswith("normkd-train: interrupted after epoch 2; --resume continues\n")
    with pytest.raises(SystemExit):
        train.main(argv)
    assert "already holds a started run; add --resume" in capsys.readouterr().err
    train.main(["--resume", *argv])  # the same command continues it
    (folder,) = list((tmp_path / "o" / "cifar100").iterdir())
    text = (folder / "worklog.txt").read_text()
    assert [int(x.split()[0]) for x in text.split("epoch: ")[1:]] == [1, 2, 3]
    assert text.count("best_acc") == 1
    stamp = (folder / "latest").stat().st_mtime_ns
    train.main(["--resume", *argv])  # and does nothing once the run is finished
    assert (folder / "worklog.txt").read_text() == text and (folder / "latest").stat().st_mtime_ns == stamp


def test_missing_teacher_checkpoint_is_one_line_naming_the_path(tmp_path, small_cifar, capsys):
    from normkd_plugin import train
    from normkd_plugin.checkpoints import CheckpointError

    missing = tmp_path / "missing.pt"
    argv = [
        "--cfg", "cifar100/normkd/res56_res20", "--device", "cpu", "SOLVER.TRAINER", "fast",
        "DATASET.ROOT", str(small_cifar), "DISTILLER.TEACHER_CKPT", str(missing), "LOG.PREFIX", str(tmp_path / "o"),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"normkd-train: DISTILLER.TEACHER_CKPT {missing}: no such file"
    with pytest.raises(CheckpointError, match="no such file"):  # --debug: the exception itself, with its traceback
        train.main([*argv, "--debug"])


@pytest.fixture
def fake_train(monkeypatch):
    """Replace train() and train_pack() by recorders: the CLI is tested without training anything."""
    from normkd_plugin import train

    calls = []

    def recorder(kind):
        def record(cfgs, names, device, resume, limit=None, hooks=(), lives=None):
            calls.append((kind, cfgs, names, device, resume, limit))

        return record

    monkeypatch.setattr(train, "train", recorder("train"))
    monkeypatch.setattr(train, "train_pack", recorder("pack"))
    return calls


def test_flags_may_follow_the_overrides(tmp_path, fake_train):
    from normkd_plugin import train

    cfg = "cifar100/normkd/res56_res20"
    # a VALUE starting with "-" (the seed) is never taken for a flag
    overrides = ["SOLVER.TRAINER", "fast", "EXPERIMENT.SEED", "-1", "SOLVER.LR", "0.1", "LOG.PREFIX", str(tmp_path)]
    orders = [
        ["--resume", "--device", "cpu", "--cfg", cfg, *overrides],
        ["--cfg", cfg, *overrides, "--resume", "--device", "cpu"],
        ["--cfg", cfg, *overrides[:4], "--resume", *overrides[4:], "--device=cpu"],
    ]
    for argv in orders:
        train.main(argv)
    assert len(fake_train) == 3
    for kind, cfg_, name, device, resume, limit in fake_train:
        assert (kind, name, device.type, resume, limit) == ("train", fake_train[0][2], "cpu", True, None)
        assert (cfg_.SOLVER.TRAINER, cfg_.EXPERIMENT.SEED, cfg_.SOLVER.LR) == ("fast", -1, 0.1)


def test_parse_with_overrides_keeps_pairs_and_negative_values():
    from normkd_plugin._cli import OverrideParser, parse_with_overrides

    p = OverrideParser()
    p.add_argument("--cfg", action="append", default=[])
    p.add_argument("--resume", action="store_true")
    p.add_argument("opts", nargs="*")
    args = parse_with_overrides(p, ["A.B", "-1", "--cfg", "x", "C", "--weird", "--res", "--cfg=y", "--", "D", "--e"])
    assert (args.cfg, args.resume, args.opts) == (["x", "y"], True, ["A.B", "-1", "C", "--weird", "D", "--e"])
    with pytest.raises(SystemExit):
        parse_with_overrides(p, ["--nope"])


def test_a_flag_where_a_value_should_be_leaves_its_key_without_value(tmp_path, fake_train, capsys):
    from normkd_plugin._cli import OverrideParser, parse_with_overrides

    p = OverrideParser()
    p.add_argument("--resume", action="store_true")
    args = parse_with_overrides(p, ["A", "1", "B", "--resume", "C", "2", "D"])
    assert (args.opts, args.key_without_value, args.resume) == (["A", "1", "C", "2"], "B", True)
    argv = ["--cfg", "cifar100/normkd/res56_res20", "SOLVER.TRAINER", "fast", "LOG.PREFIX", str(tmp_path)]
    code, err = _main([*argv, "EXPERIMENT.NAME", "--resume", "--device", "cpu"], capsys)  # the NAME was forgotten
    assert (code, err) == (
        2,
        ["normkd-train: command-line override EXPERIMENT.NAME has no VALUE; overrides are KEY VALUE pairs"],
    )
    assert not fake_train


def test_user_errors_print_one_line_and_exit_2(capsys):
    from normkd_plugin._cli import user_errors
    from normkd_plugin.errors import UserError

    with pytest.raises(SystemExit) as info, user_errors("prog"):
        raise UserError("first line\n  second line")
    assert info.value.code == 2 and capsys.readouterr().err == "prog: first line second line\n"
    with pytest.raises(UserError), user_errors("prog", debug=True):
        raise UserError("shown with its traceback")
    with pytest.raises(KeyError), user_errors("prog"):  # not an input error: a bug keeps its traceback
        raise KeyError("x")


def test_several_configs_train_as_one_pack(tmp_path, fake_train):
    from normkd_plugin import train

    argv = ["--cfg", "cifar100/kd/res56_res20", "SOLVER.TRAINER", "fast", "LOG.PREFIX", str(tmp_path)]
    train.main([*argv, "--cfg", "cifar100/normkd/res56_res20", "--device", "cpu", "--resume"])
    ((kind, cfgs, names, device, resume, _),) = fake_train
    assert kind == "pack" and [c.DISTILLER.TYPE for c in cfgs] == ["KD", "NORMKD"]
    assert all(c.SOLVER.TRAINER == "fast" for c in cfgs) and (device.type, resume) == ("cpu", True)
    assert names == ["cifar100/kd,res56,res20,SOLVER.TRAINER:fast", "cifar100/normkd,res56,res20,SOLVER.TRAINER:fast"]


def test_seeds_times_configs_go_to_train_pack(tmp_path, fake_train, capsys):
    from normkd_plugin import train

    argv = ["--cfg", "cifar100/kd/res56_res20", "--cfg", "cifar100/normkd/res56_res20", "--device", "cpu"]
    train.main([*argv, "--seeds", "0,1", "SOLVER.TRAINER", "fast", "LOG.PREFIX", str(tmp_path)])
    ((kind, cfgs, names, _, resume, _),) = fake_train
    assert kind == "pack" and not resume
    assert [(c.DISTILLER.TYPE, c.EXPERIMENT.SEED) for c in cfgs] == [("KD", 0), ("KD", 1), ("NORMKD", 0), ("NORMKD", 1)]
    assert names[1] == "cifar100/kd,res56,res20,SOLVER.TRAINER:fast,seed:1"
    with pytest.raises(SystemExit) as info:
        train.main([*argv, "--seeds", "0", "EXPERIMENT.SEED", "3", "LOG.PREFIX", str(tmp_path)])
    assert info.value.code == 2 and "either with --seeds or with EXPERIMENT.SEED" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main([*argv, "--seeds", "0,x"])
    assert "--seeds '0,x': expected comma-separated integers" in capsys.readouterr().err


def test_pack_members_writing_the_same_folder_are_refused(tmp_path, fake_train, capsys):
    from normkd_plugin import train

    argv = ["--cfg", "cifar100/kd/res56_res20", "--cfg", "cifar100/kd/res56_res20", "--device", "cpu"]
    with pytest.raises(SystemExit) as info:
        train.main([*argv, "SOLVER.TRAINER", "fast", "LOG.PREFIX", str(tmp_path)])
    assert info.value.code == 2 and not fake_train
    assert "would write the same run folder" in capsys.readouterr().err


def test_time_limit_reaches_the_trainer_and_a_bad_one_is_one_line(tmp_path, fake_train, capsys):
    from normkd_plugin import train

    argv = [
        "--cfg",
        "cifar100/kd/res56_res20",
        "SOLVER.TRAINER",
        "fast",
        "--device",
        "cpu",
        "LOG.PREFIX",
        str(tmp_path),
    ]
    train.main([*argv, "--time-limit", "1:30:00"])
    ((kind, *_, limit),) = fake_train
    assert kind == "train" and limit.seconds == 5400
    with pytest.raises(SystemExit) as info:
        train.main([*argv, "--time-limit", "soon"])
    assert info.value.code == 2 and len(fake_train) == 1
    assert "--time-limit 'soon': expected seconds (90, 90s), minutes (8m)" in capsys.readouterr().err


def test_bad_device_is_one_line(tmp_path, fake_train, capsys):
    from normkd_plugin import train

    with pytest.raises(SystemExit) as info:
        train.main(["--cfg", "cifar100/kd/res56_res20", "SOLVER.TRAINER", "fast", "--device", "tpu"])
    assert info.value.code == 2 and not fake_train
    assert capsys.readouterr().err.startswith("normkd-train: --device 'tpu': ")


def test_normkd_configs_unknown_name_is_one_line_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "normkd_plugin.configs_cli", "--path", "cifar100/normkd/res56_res2"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("normkd-configs: --path 'cifar100/normkd/res56_res2' is neither a file")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_run_launcher_registers_and_runs_script_as_main(tmp_path, monkeypatch):
    from normkd_plugin import run

    script = tmp_path / "show.py"
    out = tmp_path / "seen.txt"
    script.write_text(
        "import sys\nfrom mdistiller.distillers import distiller_dict\nfrom mdistiller.engine.cfg import CFG\n"
        "from pathlib import Path\n"
        f"Path({str(out)!r}).write_text(__name__ + ' ' + ' '.join(sys.argv[1:]) + ' ' + str('NORMKD' in distiller_dict and 'NORMKD' in CFG))\n"
    )
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    run.main([str(script), "--cfg", "x.yaml", "SOLVER.LR", "0.1"])
    assert out.read_text() == "__main__ --cfg x.yaml SOLVER.LR 0.1 True"


def test_the_host_checkout_is_the_one_pip_installed_mdistiller_from():
    import importlib.metadata
    import json
    from urllib.parse import unquote, urlparse

    import mdistiller

    record = importlib.metadata.distribution("mdistiller").read_text("direct_url.json")
    if not record or not json.loads(record).get("dir_info", {}).get("editable"):
        pytest.skip("mdistiller is not an editable install of a checkout (pip recorded no folder)")
    folder = Path(unquote(urlparse(json.loads(record)["url"]).path)).resolve()
    assert mdistiller_checkout() == folder and (folder / "tools" / "train.py").is_file()
    assert Path(mdistiller.__file__).resolve().is_relative_to(folder)


def test_run_launcher_on_host_train_script_without_cuda(tmp_path):
    import torch

    checkout = mdistiller_checkout()
    if checkout is None:
        pytest.skip("the installed mdistiller comes from no checkout with tools/train.py (not an editable install)")
    train_py = checkout / "tools" / "train.py"
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the host script would really train")
    from normkd_plugin.config import resolve_config

    cfg = resolve_config("cifar100/normkd/res56_res20")
    proc = subprocess.run(
        [sys.executable, "-m", "normkd_plugin.run", str(train_py), "--cfg", str(cfg)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode != 0 and "no CUDA device is available" in proc.stderr


def test_ddp_run_without_a_checkpoint_starts_again_under_resume(tmp_path, small_cifar, teacher_resnet56):
    from normkd_plugin import train
    from normkd_plugin.config import load_config, run_name

    opts = [
        "SOLVER.TRAINER", "ddp", "SOLVER.BATCH_SIZE", "16", "SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[]",
        "DATASET.ROOT", str(small_cifar), "DATASET.NUM_WORKERS", "0", "DISTILLER.TEACHER_CKPT", str(teacher_resnet56),
        "LOG.PREFIX", str(tmp_path),
    ]  # fmt: skip
    cfg = load_config("cifar100/normkd/res56_res20", opts)
    folder = tmp_path / run_name(cfg, opts)
    folder.mkdir(parents=True)
    (folder / "worklog.txt").write_text("-" * 25 + "\nepoch: 1\nlr: 0.0")  # killed mid-append, no checkpoint
    train.main(["--resume", "--cfg", "cifar100/normkd/res56_res20", "--device", "cpu", *opts])
    text = (folder / "worklog.txt").read_text()
    assert text.count("epoch: 1") == 1 and text.rstrip().splitlines()[-1].startswith("best_acc\t")
    assert (folder / "config.yaml").is_file() and (folder / "latest").is_file()


def test_mdistillers_size_average_warning_is_hidden_in_runs():
    import warnings

    import torch
    from mdistiller.distillers.DKD import dkd_loss

    from normkd_plugin.train import quiet_host_warnings

    args = (torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3]), 1.0, 8.0, 4.0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        dkd_loss(*args)
        assert any("size_average" in str(w.message) for w in seen)  # the host's loss does warn
        seen.clear()
        quiet_host_warnings()  # what normkd-train does before training
        dkd_loss(*args)
    assert not [w for w in seen if "size_average" in str(w.message)]


# -- one line for every failure: OS errors, signals, bad seeds ----------------------------------------


def _tiny_argv(small_cifar, teacher, prefix, epochs=3, *extra):
    return [
        "--cfg", "cifar100/normkd/res56_res20", "--device", "cpu", "SOLVER.TRAINER", "fast",
        "SOLVER.BATCH_SIZE", "16", "SOLVER.FAST.ITERS_PER_EPOCH", "1", "SOLVER.EPOCHS", str(epochs),
        "SOLVER.LR_DECAY_STAGES", "[2]", "DATASET.ROOT", str(small_cifar), "DISTILLER.TEACHER_CKPT", str(teacher),
        "LOG.PREFIX", str(prefix), "EXPERIMENT.NAME", "r", "EXPERIMENT.SEED", "0", *extra,
    ]  # fmt: skip


def _run_dir(prefix, epochs=3):
    """The run folder of ``_tiny_argv``."""
    return (
        prefix
        / "cifar100"
        / (
            f"r,SOLVER.BATCH_SIZE:16,SOLVER.EPOCHS:{epochs},SOLVER.FAST.ITERS_PER_EPOCH:1,SOLVER.LR_DECAY_STAGES:[2],"
            "SOLVER.TRAINER:fast,seed:0"
        )
    )


def _main(argv, capsys, hooks=()):
    """train.main(argv, hooks): (exit code, stderr lines)."""
    from normkd_plugin import train

    try:
        train.main(argv, hooks=hooks)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


def _before_epoch(epoch, action):
    """A hook (``engine.fit.Hook``) that calls ``action()`` as ``epoch`` starts."""
    from normkd_plugin.engine.fit import Hook

    class BeforeEpoch(Hook):
        def before_epoch(self, e, runs):
            if e == epoch:
                action()

    return BeforeEpoch()


@pytest.mark.parametrize("how", ["real tmpfs", "simulated"])
def test_a_full_disk_is_one_line_naming_the_file_and_the_last_epoch_is_kept(
    tmp_path, small_cifar, teacher_resnet56, monkeypatch, capsys, how
):
    import contextlib
    import errno
    import threading

    from conftest import fill_disk, load_state, mounted_tmpfs

    disk = tmp_path / "disk"
    with mounted_tmpfs(disk, "24m") if how == "real tmpfs" else contextlib.nullcontext(disk):
        disk.mkdir(exist_ok=True)
        argv = _tiny_argv(small_cifar, teacher_resnet56, disk / "out")
        with monkeypatch.context() as m:
            if how == "real tmpfs":
                fills = _before_epoch(2, lambda: fill_disk(disk))
            else:  # a file system that reports the full disk when the data reach it (fsync)
                real_fsync = os.fsync

                def full(fd):
                    if threading.current_thread() is not threading.main_thread():
                        return real_fsync(fd)  # tensorboardX's writer thread: not the run folder's writes
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                fills = _before_epoch(2, lambda: m.setattr(os, "fsync", full))
            code, err = _main(argv, capsys, hooks=[fills])
        folder = _run_dir(disk / "out")
        assert code == 2
        assert err[-1] == f"normkd-train: {folder}/latest: cannot write it: No space left on device (ENOSPC)"
        assert not any("Traceback" in line for line in err)
        assert load_state(folder)["epoch"] == 1  # the last good checkpoint
        assert not any(p.name.endswith(".tmp") for p in folder.iterdir())
        (disk / "filler").unlink(missing_ok=True)
        code, err = _main(["--resume", *argv], capsys)
        assert code == 0, err
        text = (folder / "worklog.txt").read_text()
        assert [int(x.split()[0]) for x in text.split("epoch: ")[1:]] == [1, 2, 3] and text.count("best_acc") == 1


def test_a_read_only_run_folder_is_one_line(tmp_path, small_cifar, teacher_resnet56, capsys):
    argv = _tiny_argv(small_cifar, teacher_resnet56, tmp_path / "out")
    code, _ = _main(argv, capsys, hooks=[interrupted_at(2)])
    assert code == 130
    folder = _run_dir(tmp_path / "out")
    bind = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True, text=True)
    if bind.returncode:
        pytest.skip(f"cannot bind-mount here (needs root or CAP_SYS_ADMIN): {bind.stderr.strip()[:200]}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
        code, err = _main(["--resume", *argv], capsys)
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
    assert code == 2
    assert err == [f"normkd-train: {folder}/.lock: cannot open the run folder's lock: Read-only file system (EROFS)"]


def test_a_dangling_link_where_the_run_folder_should_be_is_one_line(tmp_path, small_cifar, teacher_resnet56, capsys):
    link = _run_dir(tmp_path / "out")
    link.parent.mkdir(parents=True)
    link.symlink_to(tmp_path / "gone")
    code, err = _main(_tiny_argv(small_cifar, teacher_resnet56, tmp_path / "out"), capsys)
    assert code == 2
    assert err == [
        f"normkd-train: {link}: cannot create the run folder: a dangling symbolic link to {tmp_path}/gone stands there"
    ]


def test_a_binary_worklog_without_resume_is_one_line(tmp_path, small_cifar, teacher_resnet56, capsys):
    folder = _run_dir(tmp_path / "out")
    folder.mkdir(parents=True)
    (folder / "worklog.txt").write_bytes(b"\xff\xfe\x00garbage" * 50)
    code, err = _main(_tiny_argv(small_cifar, teacher_resnet56, tmp_path / "out"), capsys)
    assert code == 2 and len(err) == 1 and "already holds a started run; add --resume" in err[0]


@pytest.mark.parametrize(("seeds", "expected"), [(" ", "no seed given"), ("0,x", "expected comma-separated")])
def test_bad_seeds_are_one_line(tmp_path, fake_train, capsys, seeds, expected):
    code, err = _main(["--cfg", "cifar100/normkd/res56_res20", "--seeds", seeds, "LOG.PREFIX", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and expected in err[0] and not fake_train


def test_a_seed_that_overflows_is_one_line(tmp_path, fake_train, capsys):
    argv = ["--cfg", "cifar100/normkd/res56_res20", "--seeds", "99999999999999999999", "LOG.PREFIX", str(tmp_path)]
    code, err = _main(argv, capsys)
    assert code == 2 and err == [
        "normkd-train: command-line override EXPERIMENT.SEED 99999999999999999999: "
        "expected an integer below 2**63 (< 0: a random seed)"
    ]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_end_a_run_with_one_line_after_its_last_epoch(
    tmp_path, small_cifar, teacher_resnet56, sig, code
):
    import time

    from conftest import load_state

    argv = _tiny_argv(small_cifar, teacher_resnet56, tmp_path / "out", 60)
    worklog = _run_dir(tmp_path / "out", 60) / "worklog.txt"
    with subprocess.Popen(
        [sys.executable, "-m", "normkd_plugin.train", *argv], stderr=subprocess.PIPE, text=True
    ) as child:
        deadline = time.monotonic() + 300
        while not (worklog.is_file() and "epoch: 2\n" in worklog.read_text()):
            assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()[-3000:]
            time.sleep(0.05)
        child.send_signal(sig)
        err = child.stderr.read()
        assert child.wait() == code, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(r"normkd-train: interrupted after epoch (\d+); --resume continues", last)
    assert m, last
    epoch = int(m.group(1))
    assert load_state(worklog.parent)["epoch"] == epoch  # nothing past the last committed epoch
    text = worklog.read_text()
    assert [int(x.split()[0]) for x in text.split("epoch: ")[1:]] == list(range(1, epoch + 1))
    assert text.endswith("-" * 25 + "\n") and not any(p.name.endswith(".tmp") for p in worklog.parent.iterdir())


@pytest.mark.parametrize("taken", ["after the commit", "at once"])
def test_a_stop_while_an_epoch_commits_names_it_once_its_latest_is_written(
    tmp_path, small_cifar, teacher_resnet56, monkeypatch, capsys, taken
):
    """A stop arrives as epoch 2 commits, after its `latest` (the commit point): the line names epoch 2, the epoch
    `latest` holds and --resume continues from. SIGINT sent to the main thread waits for the end of the commit;
    a process's SIGINT taken by another thread interrupts at once, the rest of the epoch's files unwritten."""
    import threading

    from conftest import load_state
    from normkd_plugin.run_folder import RunFolder

    real, latest = RunFolder.write_bytes, []

    def write_bytes(self, name, data):
        real(self, name, data)
        latest.extend([name] if name == "latest" else [])
        if name == "student_latest" and len(latest) == 2:  # the first file after epoch 2's latest
            if taken == "at once":
                raise KeyboardInterrupt
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    argv = _tiny_argv(small_cifar, teacher_resnet56, tmp_path / "out")
    with monkeypatch.context() as m:
        m.setattr(RunFolder, "write_bytes", write_bytes)
        code, err = _main(argv, capsys)
    assert (code, err[-1:]) == (130, ["normkd-train: interrupted after epoch 2; --resume continues"])
    folder = _run_dir(tmp_path / "out")
    assert load_state(folder)["epoch"] == 2
    assert _main(["--resume", *argv], capsys)[0] == 0
    text = (folder / "worklog.txt").read_text()
    assert [int(x.split()[0]) for x in text.split("epoch: ")[1:]] == [1, 2, 3] and text.count("best_acc") == 1


def test_a_machine_without_a_gpu_refuses_the_gpu_command_and_says_how_to_use_the_cpu(
    tmp_path, monkeypatch, fake_train, capsys
):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    readme = [
        "--cfg", "cifar100/normkd/res32x4_res8x4", "SOLVER.TRAINER", "fast", "--resume", "--time-limit", "3:50:00",
    ]  # fmt: skip
    code, err = _main([*readme, "LOG.PREFIX", str(tmp_path)], capsys)
    assert (code, err) == (
        2,
        ["normkd-train: no CUDA device is available; add --device cpu to train the 240 epoch(s) on the CPU on purpose"],
    )
    assert not fake_train and not any(tmp_path.iterdir())
    code, err = _main([*readme, "LOG.PREFIX", str(tmp_path), "--device", "cpu"], capsys)  # on purpose: it trains
    assert code == 0 and not err
    ((kind, cfg, _, device, resume, limit),) = fake_train
    assert (kind, device.type, resume, limit.seconds, cfg.SOLVER.EPOCHS) == ("train", "cpu", True, 13800, 240)


def test_a_missing_released_teacher_says_to_run_normkd_teachers(tmp_path, small_cifar, monkeypatch, capsys):
    from mdistiller.models import cifar_model_dict

    # mdistiller's own path for the teacher, in a checkout whose download_ckpts/ normkd-teachers has not filled
    host = tmp_path / "mdistiller" / "download_ckpts" / "cifar_teachers" / "resnet56_vanilla" / "ckpt_epoch_240.pth"
    monkeypatch.setitem(cifar_model_dict, "resnet56", (cifar_model_dict["resnet56"][0], str(host)))
    argv = [
        "--cfg", "cifar100/normkd/res56_res20", "--device", "cpu", "SOLVER.TRAINER", "fast",
        "DATASET.ROOT", str(small_cifar), "LOG.PREFIX", str(tmp_path / "o"),
    ]  # fmt: skip
    code, err = _main(argv, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"normkd-train: teacher checkpoint not found: {host} (mdistiller's path for 'resnet56'); ")
    assert "run normkd-teachers to install mdistiller's released CIFAR-100 teachers there" in err[0]
    assert "(offline: normkd-teachers --from cifar_teachers.tar)" in err[0]


def _run_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "normkd_plugin.train" and r.msg.startswith("run ")]


def test_a_run_logs_its_folders_full_path_when_it_starts_and_ends(
    tmp_path, small_cifar, teacher_resnet56, monkeypatch, capsys, caplog
):
    import logging

    caplog.set_level(logging.INFO, logger="normkd_plugin.train")
    monkeypatch.chdir(tmp_path)  # LOG.PREFIX relative to the working folder, the default's way (./output)
    argv = _tiny_argv(small_cifar, teacher_resnet56, Path("out"), 2)
    folder = str(tmp_path / _run_dir(Path("out"), 2))
    assert _main(argv, capsys, hooks=[interrupted_at(2)])[0] == 130
    assert _run_lines(caplog) == [f"run starts: {folder}", f"run ended unfinished: {folder}"]
    caplog.clear()
    assert _main(["--resume", *argv], capsys)[0] == 0
    assert _run_lines(caplog) == [f"run resumes: {folder}", f"run finished: {folder}"]
    caplog.clear()
    assert _main(["--resume", *argv], capsys)[0] == 0  # finished: nothing starts, nothing to announce
    assert _run_lines(caplog) == []


def test_a_pack_logs_each_run_folders_full_path(tmp_path, small_cifar, teacher_resnet56, monkeypatch, capsys, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="normkd_plugin.train")
    monkeypatch.chdir(tmp_path)
    argv = _tiny_argv(small_cifar, teacher_resnet56, Path("out"), 2)
    argv[argv.index("EXPERIMENT.NAME") : argv.index("EXPERIMENT.NAME") + 2] = []  # each config its own folder
    assert _main([*argv, "--cfg", "cifar100/kd/res56_res20"], capsys)[0] == 0
    folders = sorted(str(p) for p in (tmp_path / "out" / "cifar100").iterdir())
    assert [p.split("/")[-1].split(",")[0] for p in folders] == ["kd", "normkd"]
    lines = _run_lines(caplog)
    assert sorted(lines[:2]) == [f"run starts: {p}" for p in folders]
    assert sorted(lines[2:]) == [f"run finished: {p}" for p in folders]


def test_the_host_trainer_logs_its_run_folders_full_path(tmp_path, small_cifar, teacher_resnet56, monkeypatch, caplog):
    """mdistiller's own BaseTrainer through normkd-train: without CUDA it fails at its first batch, after the start."""
    import logging

    import torch

    from normkd_plugin import train
    from normkd_plugin.config import load_config, run_name

    caplog.set_level(logging.INFO, logger="normkd_plugin.train")
    monkeypatch.chdir(tmp_path)
    opts = [
        "SOLVER.BATCH_SIZE", "16", "SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[]", "DATASET.ROOT",
        str(small_cifar), "DATASET.NUM_WORKERS", "0", "DISTILLER.TEACHER_CKPT", str(teacher_resnet56),
        "LOG.PREFIX", "out", "EXPERIMENT.SEED", "0",
    ]  # fmt: skip
    cfg = load_config("cifar100/kd/res56_res20", opts)
    assert cfg.SOLVER.TRAINER == "base"
    name = run_name(cfg, opts)
    folder = str(tmp_path / "out" / name)
    if torch.cuda.is_available():
        train.train(cfg, name, torch.device("cuda"))
        assert _run_lines(caplog) == [f"run starts: {folder}", f"run finished: {folder}"]
    else:
        with pytest.raises((RuntimeError, AssertionError)):  # the host's image.cuda() on a machine without CUDA
            train.train(cfg, name, torch.device("cpu"))
        assert _run_lines(caplog) == [f"run starts: {folder}", f"run ended unfinished: {folder}"]


# -- mdistiller's trainers: provenance.yaml holds what the run learned from ---------------------------


def _host_run_after_its_last_epoch(cfg, name, small_cifar, teacher):
    """The folder mdistiller's BaseTrainer leaves after the last epoch of ``cfg`` and before its ``best_acc`` line,
    with the provenance.yaml its start wrote (digests computed here from the files)."""
    import hashlib
    from types import SimpleNamespace

    import torch
    from mdistiller.engine.trainer import BaseTrainer

    from normkd_plugin.build import build_distiller, build_models

    folder = Path(cfg.LOG.PREFIX) / name
    folder.mkdir(parents=True)
    student, teacher_net = build_models(cfg, 100)
    distiller = torch.nn.DataParallel(build_distiller(cfg, student, teacher_net, 48))
    optimizer = BaseTrainer.init_optimizer(SimpleNamespace(distiller=distiller), cfg)
    state = {"epoch": 1, "model": distiller.state_dict(), "optimizer": optimizer.state_dict(), "best_acc": 1.0}
    torch.save(state, folder / "latest")
    (folder / "config.yaml").write_text(cfg.dump())
    (folder / "worklog.txt").write_text("-" * 25 + "\nepoch: 1\nlr: 0.05\ntest_acc: 1.00\n" + "-" * 25 + "\n")

    def sha(path):
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    files = {split: sha(small_cifar / "cifar-100-python" / split) for split in ("train", "test")}
    learned = {
        "teacher": {"path": str(teacher), "sha256": sha(teacher)},
        "data": {"root": str(small_cifar), "files": files},
    }
    (folder / "provenance.yaml").write_text(yaml.safe_dump(learned))
    return folder, sha


def test_mdistillers_trainer_resumes_with_its_teacher_only(tmp_path, small_cifar, teacher_resnet56):
    """SOLVER.TRAINER base (its checkpoints are mdistiller's): a resume with another teacher file is refused before the
    host's trainer is built; one with a copy of the teacher goes on (here: writes the host's best_acc line)."""
    import shutil

    import torch

    from normkd_plugin import train
    from normkd_plugin.config import load_config, run_name
    from normkd_plugin.errors import RunError

    opts = ["SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[]", "EXPERIMENT.SEED", "0"]
    place = ["DATASET.ROOT", str(small_cifar), "DATASET.NUM_WORKERS", "0", "LOG.PREFIX", str(tmp_path / "out")]

    def config(teacher):
        return load_config("cifar100/kd/res56_res20", [*opts, *place, "DISTILLER.TEACHER_CKPT", str(teacher)])

    name = run_name(config(teacher_resnet56), opts)
    folder, sha = _host_run_after_its_last_epoch(config(teacher_resnet56), name, small_cifar, teacher_resnet56)
    weights = torch.load(teacher_resnet56, map_location="cpu", weights_only=True)
    weights["fc.bias"] = weights["fc.bias"] + 0.5
    other = tmp_path / "other.pt"
    torch.save(weights, other)
    before = (folder / "worklog.txt").read_text()
    with pytest.raises(RunError) as refused:
        train.train(config(other), name, torch.device("cpu"), resume=True)
    assert str(refused.value).startswith(
        f"--resume: {folder} was trained with another teacher than this command's (teacher {teacher_resnet56} "
        f"(sha256 {sha(teacher_resnet56)[:12]}) -> {other} (sha256 {sha(other)[:12]}))"
    )
    assert (folder / "worklog.txt").read_text() == before
    copy = tmp_path / "copy.pt"
    shutil.copy(teacher_resnet56, copy)
    trainer = train.train(config(copy), name, torch.device("cpu"), resume=True)
    trainer.tf_writer.close()
    assert (folder / "worklog.txt").read_text() == before + "best_acc\t1.00"
    assert yaml.safe_load((folder / "provenance.yaml").read_text())["teacher"] == {
        "path": str(copy),
        "sha256": sha(teacher_resnet56),
    }


@pytest.mark.parametrize("damage", ["epoch_twice", "then_ended_twice"])
def test_mdistillers_trainer_resumed_after_a_kill_between_its_block_and_its_checkpoint_ends_finished(
    tmp_path, small_cifar, teacher_resnet56, damage
):
    """The host writes an epoch's block before its `latest`: a kill between the two, then --resume, logs that epoch
    again, and each later --resume of that unfinished-looking run appends another best_acc. The run still ends finished, its worklog the
    blocks of latest's epochs and one best_acc line (as the leaderboard and the sweep read it)."""
    import torch

    from normkd_plugin import train
    from normkd_plugin.config import load_config, run_name
    from normkd_plugin.run_folder import RunFolder

    opts = ["SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[]", "EXPERIMENT.SEED", "0"]
    place = ["DATASET.ROOT", str(small_cifar), "DATASET.NUM_WORKERS", "0", "LOG.PREFIX", str(tmp_path / "out")]
    cfg = load_config("cifar100/kd/res56_res20", [*opts, *place, "DISTILLER.TEACHER_CKPT", str(teacher_resnet56)])
    name = run_name(cfg, opts)
    folder, _ = _host_run_after_its_last_epoch(cfg, name, small_cifar, teacher_resnet56)
    block = (folder / "worklog.txt").read_text()
    damaged = block + block + ("" if damage == "epoch_twice" else "best_acc\t1.00best_acc\t1.00")
    (folder / "worklog.txt").write_text(damaged)
    assert RunFolder(folder).status() == "started"  # as the host left it: not finished

    trainer = train.train(cfg, name, torch.device("cpu"), resume=True)
    trainer.tf_writer.close()
    assert (folder / "worklog.txt").read_text() == block + "best_acc\t1.00"
    assert RunFolder(folder).status() == "finished"
