"""normkd-train and python -m normkd_plugin.run: config errors early, CUDA message, seeds, outputs."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import needs_mdistiller

pytestmark = needs_mdistiller

MDISTILLER_SRC = Path(os.environ.get("MDISTILLER_SRC", "/opt/mdistiller"))


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


def test_bad_config_fails_before_training(tmp_path):
    proc = _cli("--cfg", "cifar100/normkd/res56_res20", "NORMKD.TEMPERATURE", "2", "LOG.PREFIX", str(tmp_path))
    assert proc.returncode != 0 and "command-line override NORMKD.TEMPERATURE 2: no such config key" in proc.stderr
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
        runs[0].name
        == "normdkd,res56,res20,SOLVER.TRAINER:fast,SOLVER.BATCH_SIZE:16,SOLVER.EPOCHS:1,SOLVER.LR_DECAY_STAGES:[],"
        "SOLVER.FAST.ITERS_PER_EPOCH:1,seed:7"
    )
    losses = [(r / "worklog.txt").read_text().split("train_loss: ")[1].split()[0] for r in [*runs, other]]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]
    cfg = yaml.safe_load((runs[0] / "config.yaml").read_text())
    assert cfg["EXPERIMENT"]["SEED"] == 7 and cfg["DISTILLER"]["TYPE"] == "NORMDKD"
    assert cfg["DATASET"]["ROOT"] == str(small_cifar)


def test_interrupted_run_resumes_through_the_cli(tmp_path, small_cifar, teacher_resnet56, monkeypatch):
    from normkd_plugin import train
    from normkd_plugin.fast.trainer import FastTrainer

    argv = [
        "--cfg", "cifar100/normkd/res56_res20", "--device", "cpu", "SOLVER.TRAINER", "fast",
        "SOLVER.BATCH_SIZE", "16", "SOLVER.FAST.ITERS_PER_EPOCH", "1", "SOLVER.EPOCHS", "3", "SOLVER.LR_DECAY_STAGES", "[2]",
        "DATASET.ROOT", str(small_cifar), "DISTILLER.TEACHER_CKPT", str(teacher_resnet56),
        "LOG.PREFIX", str(tmp_path / "o"), "EXPERIMENT.NAME", "r",
    ]  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no checkpoint .*latest"):
        train.main(["--resume", *argv])
    real_epoch = FastTrainer.train_epoch

    def interrupted(self, epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        real_epoch(self, epoch)

    monkeypatch.setattr(FastTrainer, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    monkeypatch.setattr(FastTrainer, "train_epoch", real_epoch)
    train.main(["--resume", *argv])
    (folder,) = list((tmp_path / "o" / "cifar100").iterdir())
    text = (folder / "worklog.txt").read_text()
    assert [int(x.split()[0]) for x in text.split("epoch: ")[1:]] == [1, 2, 3]
    assert text.count("best_acc") == 1


def test_missing_teacher_checkpoint_names_path(tmp_path, small_cifar):
    from normkd_plugin import train
    from normkd_plugin.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match=r"^DISTILLER.TEACHER_CKPT .*missing\.pt: no such file$"):
        train.main([
            "--cfg", "cifar100/normkd/res56_res20", "--device", "cpu", "SOLVER.TRAINER", "fast",
            "DATASET.ROOT", str(small_cifar), "DISTILLER.TEACHER_CKPT", str(tmp_path / "missing.pt"),
            "LOG.PREFIX", str(tmp_path / "o"),
        ])  # fmt: skip


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


def test_run_launcher_on_host_train_script_without_cuda(tmp_path):
    import torch

    train_py = MDISTILLER_SRC / "tools" / "train.py"
    if not train_py.is_file():
        pytest.skip(f"no mdistiller checkout at MDISTILLER_SRC={MDISTILLER_SRC}")
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
