"""SOLVER.TRAINER fast against the host's base-trainer semantics, on small real CIFAR-100 batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import needs_cuda, needs_mdistiller

pytestmark = needs_mdistiller


def _cfg(tmp_path, **over):
    from normkd_plugin.config import load_config

    opts = {
        "SOLVER.TRAINER": "fast",
        "SOLVER.EPOCHS": 2,
        "SOLVER.BATCH_SIZE": 32,
        "SOLVER.LR_DECAY_STAGES": "[1,2]",
        "LOG.PREFIX": str(tmp_path),
        "DISTILLER.STUDENT": "resnet8",
        "DISTILLER.TEACHER": "resnet20",
    }
    opts.update(over)
    return load_config("cifar100/kd/res56_res20", [str(x) for kv in opts.items() for x in kv])


def _loaders(arrays, n_train=200, n_val=100):
    from mdistiller.dataset.cifar100 import get_cifar100_test_transform, get_cifar100_train_transform

    from normkd_plugin.data import CIFAR100Arrays

    images, labels = arrays
    train = CIFAR100Arrays(images[:n_train], labels[:n_train], get_cifar100_train_transform())
    val = CIFAR100Arrays(
        images[n_train : n_train + n_val],
        labels[n_train : n_train + n_val],
        get_cifar100_test_transform(),
        with_index=False,
    )
    return torch.utils.data.DataLoader(train, batch_size=32), torch.utils.data.DataLoader(val, batch_size=64)


def _trainer(cfg, arrays, device="cpu", name="run", distiller=None):
    from mdistiller.distillers import distiller_dict
    from mdistiller.engine import trainer_dict
    from mdistiller.models import cifar_model_dict

    torch.manual_seed(0)
    if distiller is None:
        s = cifar_model_dict[cfg.DISTILLER.STUDENT][0](num_classes=100)
        t = cifar_model_dict[cfg.DISTILLER.TEACHER][0](num_classes=100)
        distiller = distiller_dict[cfg.DISTILLER.TYPE](s, t, cfg)
    train_loader, val_loader = _loaders(arrays)
    dp = torch.nn.DataParallel(distiller.to(device))
    return trainer_dict[cfg.SOLVER.TRAINER](name, dp, train_loader, val_loader, cfg)


def test_learning_rate_per_epoch_matches_host_schedule(tmp_path, cifar_test_arrays):
    from mdistiller.engine.utils import adjust_learning_rate

    cfg = _cfg(tmp_path, **{"SOLVER.EPOCHS": 4, "SOLVER.LR_DECAY_STAGES": "[1,3]", "SOLVER.FAST.ITERS_PER_EPOCH": 1})
    tr = _trainer(cfg, cifar_test_arrays)
    host_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.SOLVER.LR)
    for epoch in range(1, 5):
        tr.train_epoch(epoch)
        want = adjust_learning_rate(epoch, cfg, host_opt)
        assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(want)
    assert [round(adjust_learning_rate(e, cfg, host_opt), 6) for e in range(1, 5)] == [0.05, 0.005, 0.005, 0.0005]
    sgd = tr.optimizer.param_groups[0]
    assert sgd["momentum"] == 0.9 and sgd["weight_decay"] == 0.0005


class _Spy(torch.nn.Module):
    """A distiller that records the trainer's keyword arguments and returns three loss terms."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student, self.teacher, self.calls = student, teacher, []

    def get_learnable_parameters(self):
        return list(self.student.parameters())

    def forward(self, **kw):
        if not self.training:
            return self.student(kw["image"])[0]
        self.calls.append(sorted(kw))
        logits, _ = self.student(kw["image"])
        ce = torch.nn.functional.cross_entropy(logits, kw["target"], reduction="none")
        return logits, {"loss_ce": ce, "loss_kd": 0 * ce + 1.0, "loss_extra": ce.mean() * 0 + 2.0}


def test_loss_dict_contract_and_epoch_keyword(tmp_path, cifar_test_arrays):
    from mdistiller.models import cifar_model_dict

    cfg = _cfg(tmp_path, **{"SOLVER.EPOCHS": 1, "SOLVER.LR": 0.0})
    s = cifar_model_dict["resnet8"][0](num_classes=100)
    spy = _Spy(s, cifar_model_dict["resnet8"][0](num_classes=100))
    tr = _trainer(cfg, cifar_test_arrays, distiller=spy)
    tr.train_epoch(1)
    assert spy.calls and all(c == ["epoch", "image", "target"] for c in spy.calls)
    assert len(spy.calls) == 7  # 200 images / 32: 6 full batches and one partial
    text = Path(tr.log_path, "worklog.txt").read_text()
    # with lr 0 the CE is constant per sample; the loss is mean CE + 1 + 2 summed over terms
    train_loss = float(text.split("train_loss: ")[1].split()[0])
    assert train_loss > 3.0 + 4.0  # CE of an untrained 100-way classifier is about log(100)


def test_run_files_and_worklog_format(tmp_path, cifar_test_arrays):
    from mdistiller.engine.utils import load_checkpoint
    from mdistiller.models import cifar_model_dict

    from normkd_plugin.leaderboard.runs import parse_worklog

    cfg = _cfg(tmp_path, **{"SOLVER.FAST.ITERS_PER_EPOCH": 2, "LOG.SAVE_CHECKPOINT_FREQ": 2})
    tr = _trainer(cfg, cifar_test_arrays)
    tr.train()
    folder = tmp_path / "run"
    for name in ("worklog.txt", "latest", "best", "student_latest", "student_best", "epoch_2", "student_2"):
        assert (folder / name).is_file(), name
    assert list((folder / "train.events").iterdir())
    log = parse_worklog((folder / "worklog.txt").read_text())
    assert [e["epoch"] for e in log.epochs] == [1, 2]
    assert set(log.epochs[0]) >= {"lr", "train_acc", "train_loss", "test_acc", "test_acc_top5", "test_loss"}
    assert log.best_acc == pytest.approx(max(e["test_acc"] for e in log.epochs), abs=0.01)
    state = load_checkpoint(str(folder / "latest"))
    assert state["epoch"] == 2 and set(state) >= {"epoch", "model", "optimizer", "best_acc"}
    assert all(k.startswith("module.student.") for k in state["model"])  # no copy of the teacher
    student = cifar_model_dict["resnet8"][0](num_classes=100)
    student.load_state_dict(load_checkpoint(str(folder / "student_best"))["model"])  # as tools/eval.py does


def test_resume_continues_where_it_stopped(tmp_path, cifar_test_arrays):
    from mdistiller.engine.utils import load_checkpoint

    cfg = _cfg(tmp_path, **{"SOLVER.FAST.ITERS_PER_EPOCH": 2, "SOLVER.EPOCHS": 3})
    first = _trainer(cfg, cifar_test_arrays)
    first.pack.start(resume=False)
    for epoch in (1, 2):  # then "killed": no epoch 3, no best_acc line
        first.train_epoch(epoch)
    first.run.folder.unlock()
    after2 = load_checkpoint(str(tmp_path / "run" / "latest"))
    tr = _trainer(cfg, cifar_test_arrays)
    seen = []
    original = tr.pack.train_epoch
    tr.pack.train_epoch = lambda runs, e: (seen.append(e), original(runs, e))
    tr.train(resume=True)
    assert seen == [3]
    after3 = load_checkpoint(str(tmp_path / "run" / "latest"))
    assert after2["epoch"] == 2 and after3["epoch"] == 3
    key = next(k for k in after2["model"] if k.endswith("conv1.weight"))
    assert not torch.equal(after2["model"][key], after3["model"][key])
    text = (tmp_path / "run" / "worklog.txt").read_text()
    assert text.count("epoch: ") == 3 and text.count("best_acc") == 1


def test_resume_of_a_finished_run_changes_nothing(tmp_path, cifar_test_arrays):
    cfg = _cfg(tmp_path, **{"SOLVER.FAST.ITERS_PER_EPOCH": 1, "SOLVER.EPOCHS": 1})
    _trainer(cfg, cifar_test_arrays).train()
    folder = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    _trainer(cfg, cifar_test_arrays).train(resume=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


@needs_cuda
@pytest.mark.parametrize("amp", [False, True])
def test_graph_and_eager_paths_give_the_same_parameters(tmp_path, cifar_test_arrays, amp):
    """Both paths take the same 6 SGD steps: their parameters differ by far less than the steps moved them."""
    params = []
    for graph in (True, False):
        cfg = _cfg(tmp_path, **{"SOLVER.FAST.CUDA_GRAPH": graph, "SOLVER.AMP": amp, "SOLVER.LR": 0.1})
        tr = _trainer(cfg, cifar_test_arrays, device="cuda", name=f"g{graph}{amp}")
        init = torch.cat([p.detach().flatten() for p in tr.model.student.parameters()])
        torch.manual_seed(1)
        tr.train_iterations(1, 6 * 32)
        assert (tr._graph is not None) == graph
        params.append(torch.cat([p.detach().flatten() for p in tr.model.student.parameters()]))
    moved = (params[1] - init).norm().item()
    apart = (params[0] - params[1]).norm().item()
    # cuDNN's non-deterministic kernels make the paths differ by rounding, amplified over steps.
    assert apart < 0.01 * moved, (apart, moved)
