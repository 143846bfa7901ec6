"""SOLVER.TRAINER fast against the host's base-trainer semantics, on small real CIFAR-100 batches."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import needs_cuda, needs_mdistiller

pytestmark = needs_mdistiller


def _cfg(root, teacher, tmp_path, **over):
    """A short ``fast`` run of KD: the real resnet56 teacher, a resnet8 student, the small real split of ``root``."""
    from conftest import SMALL_BATCH
    from normkd_plugin.config import load_config

    opts = {
        "SOLVER.TRAINER": "fast",
        "SOLVER.EPOCHS": 2,
        "SOLVER.BATCH_SIZE": SMALL_BATCH,
        "SOLVER.LR_DECAY_STAGES": "[1,2]",
        "LOG.PREFIX": str(tmp_path),
        "DISTILLER.STUDENT": "resnet8",
        "DATASET.ROOT": str(root),
        "DISTILLER.TEACHER_CKPT": str(teacher),
    }
    opts.update(over)
    return load_config("cifar100/kd/res56_res20", [str(x) for kv in opts.items() for x in kv])


def _trainer(cfg, device="cpu", name="run", distiller=None):
    """``trainer_dict[SOLVER.TRAINER]`` built as mdistiller's tools/train.py builds it, on the host's loaders."""
    from mdistiller.distillers import distiller_dict
    from mdistiller.engine import trainer_dict
    from mdistiller.models import cifar_model_dict

    from normkd_plugin.build import build_teacher
    from normkd_plugin.data import get_dataset

    torch.manual_seed(0)
    if distiller is None:
        s = cifar_model_dict[cfg.DISTILLER.STUDENT][0](num_classes=100)
        distiller = distiller_dict[cfg.DISTILLER.TYPE](s, build_teacher(cfg, 100), cfg)
    train_loader, val_loader, _, _ = get_dataset(cfg)
    dp = torch.nn.DataParallel(distiller.to(device))
    return trainer_dict[cfg.SOLVER.TRAINER](name, dp, train_loader, val_loader, cfg)


def _watch(optimizer):
    """A hook (``engine.fit.Hook``) recording each epoch as it starts and the optimizer's LR once it trained."""
    from normkd_plugin.engine.fit import Hook

    class Watch(Hook):
        def __init__(self):
            self.started, self.lr = [], {}

        def before_epoch(self, epoch, runs):
            self.started.append(epoch)

        def after_epoch(self, epoch, results):
            (result,) = results
            assert result.lr == optimizer.param_groups[0]["lr"]
            self.lr[epoch] = result.lr

    return Watch()


def test_learning_rate_per_epoch_matches_host_schedule(tmp_path, small_cifar_npz, teacher_resnet56):
    from mdistiller.engine.utils import adjust_learning_rate

    cfg = _cfg(
        small_cifar_npz,
        teacher_resnet56,
        tmp_path,
        **{"SOLVER.EPOCHS": 4, "SOLVER.LR_DECAY_STAGES": "[1,3]", "SOLVER.FAST.ITERS_PER_EPOCH": 1},
    )
    tr = _trainer(cfg)
    watch = _watch(tr.optimizer)
    tr.train(hooks=[watch])
    host_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.SOLVER.LR)
    assert watch.started == [1, 2, 3, 4]
    for epoch in range(1, 5):
        assert watch.lr[epoch] == pytest.approx(adjust_learning_rate(epoch, cfg, host_opt))
    assert [round(adjust_learning_rate(e, cfg, host_opt), 6) for e in range(1, 5)] == [0.05, 0.005, 0.005, 0.0005]
    sgd = tr.optimizer.param_groups[0]
    assert sgd["momentum"] == 0.9 and sgd["weight_decay"] == 0.0005


class _Spy(torch.nn.Module):
    """A distiller that records the trainer's keyword arguments and each batch's size and summed loss terms (float64),
    and returns three loss terms."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student, self.teacher, self.calls, self.losses = student, teacher, [], []

    def get_learnable_parameters(self):
        return list(self.student.parameters())

    def forward(self, **kw):
        if not self.training:
            return self.student(kw["image"])[0]
        self.calls.append(sorted(kw))
        logits, _ = self.student(kw["image"])
        ce = torch.nn.functional.cross_entropy(logits, kw["target"], reduction="none")
        self.losses.append((ce.detach().double().mean().item() + 1.0 + 2.0, ce.shape[0]))
        return logits, {"loss_ce": ce, "loss_kd": 0 * ce + 1.0, "loss_extra": ce.mean() * 0 + 2.0}


def test_loss_dict_contract_and_epoch_keyword(tmp_path, small_cifar_npz, teacher_resnet56):
    from mdistiller.engine.utils import load_checkpoint
    from mdistiller.models import cifar_model_dict

    from conftest import SMALL_TRAIN
    from normkd_plugin.build import build_teacher

    cfg = _cfg(
        small_cifar_npz,
        teacher_resnet56,
        tmp_path,
        **{"SOLVER.EPOCHS": 1, "SOLVER.LR": 1e-12, "SOLVER.LR_DECAY_STAGES": "[1]"},
    )
    spy = _Spy(cifar_model_dict["resnet8"][0](num_classes=100), build_teacher(cfg, 100))
    tr = _trainer(cfg, distiller=spy)
    tr.train()
    assert spy.calls and all(c == ["epoch", "image", "target"] for c in spy.calls)
    assert [n for _, n in spy.losses] == [16, 16, 16, 8]  # SMALL_TRAIN images: 3 full batches and one partial
    # the epoch's train_loss: each batch's summed terms (mean CE + 1 + 2), weighted by its images
    want = sum(loss * n for loss, n in spy.losses) / SMALL_TRAIN
    assert want > 3.0 + 4.0  # CE of an untrained 100-way classifier is about log(100)
    assert load_checkpoint(str(tmp_path / "run" / "latest"))["record"]["train_loss"] == pytest.approx(want, rel=1e-6)
    text = Path(tr.log_path, "worklog.txt").read_text()
    assert f"train_loss: {want:.2f}\n" in text


def test_run_files_and_worklog_format(tmp_path, small_cifar_npz, teacher_resnet56):
    from mdistiller.engine.utils import load_checkpoint
    from mdistiller.models import cifar_model_dict

    from normkd_plugin.leaderboard.results import parse_worklog

    cfg = _cfg(
        small_cifar_npz, teacher_resnet56, tmp_path, **{"SOLVER.FAST.ITERS_PER_EPOCH": 2, "LOG.SAVE_CHECKPOINT_FREQ": 2}
    )
    tr = _trainer(cfg)
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


def test_resume_continues_where_it_stopped(tmp_path, small_cifar_npz, teacher_resnet56):
    from mdistiller.engine.utils import load_checkpoint

    from conftest import interrupted_at

    cfg = _cfg(small_cifar_npz, teacher_resnet56, tmp_path, **{"SOLVER.FAST.ITERS_PER_EPOCH": 2, "SOLVER.EPOCHS": 3})
    first = _trainer(cfg)
    with pytest.raises(KeyboardInterrupt):  # "killed" as epoch 3 starts: no epoch 3, no best_acc line
        first.train(hooks=[interrupted_at(3)])
    after2 = load_checkpoint(str(tmp_path / "run" / "latest"))
    assert (tmp_path / "run" / "worklog.txt").read_text().count("epoch: ") == 2
    tr = _trainer(cfg)
    watch = _watch(tr.optimizer)
    tr.train(resume=True, hooks=[watch])
    assert watch.started == [3]
    after3 = load_checkpoint(str(tmp_path / "run" / "latest"))
    assert after2["epoch"] == 2 and after3["epoch"] == 3
    key = next(k for k in after2["model"] if k.endswith("conv1.weight"))
    assert not torch.equal(after2["model"][key], after3["model"][key])
    text = (tmp_path / "run" / "worklog.txt").read_text()
    assert text.count("epoch: ") == 3 and text.count("best_acc") == 1


def test_resume_of_a_finished_run_changes_nothing(tmp_path, small_cifar_npz, teacher_resnet56):
    over = {"SOLVER.FAST.ITERS_PER_EPOCH": 1, "SOLVER.EPOCHS": 1, "SOLVER.LR_DECAY_STAGES": "[1]"}
    cfg = _cfg(small_cifar_npz, teacher_resnet56, tmp_path, **over)
    _trainer(cfg).train()
    folder = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    again = _trainer(cfg)
    again.train(resume=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert again.tf_writer.all_writers is None  # its tensorboard writer (and thread) closed, as after training
    with pytest.raises(RuntimeError, match="already holds a finished run"):
        refused = _trainer(cfg)
        try:
            refused.train(resume=False)
        finally:
            assert refused.tf_writer.all_writers is None
    with pytest.raises(NotImplementedError, match=r"whole schedule with train\(resume=...\)"):
        again.train_epoch(1)  # not mdistiller's epoch on CUDA without the run's lock


@pytest.mark.parametrize("method", ["normkd", "normdkd", "kd_ls", "dkd_ls"])
def test_fast_steps_equal_the_host_train_iter_bitwise(tmp_path, small_cifar_npz, teacher_resnet56, method, monkeypatch):
    """The pack's eager step against mdistiller's own BaseTrainer.train_iter on the same real batches.

    Epoch 2 (past epoch 1; NormDKD inside its warm-up, factor 2/20), SMALL_TRAIN images: three batches of
    SMALL_BATCH and the partial last batch. Parameters, BN buffers and momentum buffers end bitwise equal.
    """
    import copy

    from mdistiller.engine.trainer import BaseTrainer
    from mdistiller.engine.utils import AverageMeter, adjust_learning_rate

    from conftest import SMALL_BATCH, SMALL_TRAIN, fast_opts
    from normkd_plugin.build import assemble_pack, build_distiller, build_student, build_teacher, host_optimizer
    from normkd_plugin.config import load_config
    from normkd_plugin.data import get_dataset
    from normkd_plugin.engine.pack import PackRun
    from normkd_plugin.engine.teacher import SharedTeacher
    from normkd_plugin.run_folder import RunFolder

    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # the host's train_iter moves to CUDA
    cfg = load_config(f"cifar100/{method}/res56_res20", fast_opts(small_cifar_npz, teacher_resnet56, tmp_path, 0))
    train_loader, val_loader, num_data, _ = get_dataset(cfg)
    teacher = build_teacher(cfg, 100)
    torch.manual_seed(0)
    student = build_student(cfg, 100)
    host = torch.nn.DataParallel(build_distiller(cfg, student, teacher, num_data))
    ours = build_distiller(cfg, copy.deepcopy(student), SharedTeacher(copy.deepcopy(teacher)), num_data)
    host_trainer = BaseTrainer("host", host, train_loader, val_loader, cfg)
    run = PackRun("ours", cfg, RunFolder(tmp_path / "ours"), ours, host_optimizer(cfg, ours), seed=0)
    pack = assemble_pack([run], train_loader.dataset, val_loader.dataset, torch.device("cpu"))
    data = pack.source.train  # the host's split held as the engine holds it (engine.source.make_source)

    epoch = 2
    for optimizer in (host_trainer.optimizer, run.optimizer):
        lr = float(adjust_learning_rate(epoch, cfg, optimizer))
        for group in optimizer.param_groups:
            group["lr"] = lr
    images, targets = data.epoch(torch.Generator().manual_seed(0))  # what the run's own generator draws
    meters = {k: AverageMeter() for k in ("training_time", "data_time", "losses", "top1", "top5")}
    host.train()
    for i in range(0, SMALL_TRAIN, SMALL_BATCH):
        x, y = data.normalize(images[i : i + SMALL_BATCH]), targets[i : i + SMALL_BATCH]
        host_trainer.train_iter((x, y, torch.arange(y.shape[0])), epoch, meters)
    assert pack.step.train_steps([run], epoch) == 4
    pack.close()
    run.writer.close()

    got, want = ours.student.state_dict(), host.module.student.state_dict()
    assert any("running_var" in k for k in want) and any("num_batches_tracked" in k for k in want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    mom = [run.optimizer.state[p]["momentum_buffer"] for p in ours.student.parameters()]
    host_mom = [host_trainer.optimizer.state[p]["momentum_buffer"] for p in host.module.student.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(mom, host_mom))
    loss_sum, top1, n = pack.step.sums[0].tolist()
    assert n == meters["top1"].count == SMALL_TRAIN
    assert top1 == round(float(meters["top1"].sum) / 100)
    # the host accumulates its per-batch mean loss in float32 numpy; ours sums loss*n in float64
    assert loss_sum == pytest.approx(float(meters["losses"].sum), rel=1e-6)


def _stale_graph(real_run):
    """A StepGraph.run that keeps the graph of its first capture for the whole job (the no-recapture mutation)."""

    def run(self, eager_step, batch, full, epoch, key):
        return real_run(self, eager_step, batch, full, epoch, key="captured once")

    return run


def test_the_no_recapture_stand_in_has_the_signature_of_step_graph_run():
    """The CUDA test's mutation replaces StepGraph.run: a stale signature would fail that test on the GPU only."""
    import inspect

    from normkd_plugin.engine.graph import StepGraph

    def shape(fn):  # names, kinds and defaults (annotations aside)
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert shape(_stale_graph(StepGraph.run)) == shape(StepGraph.run)


def _mutated(mutation: str | None):
    """A hook (``engine.fit.Hook``) applying ``mutation`` to the runs before each epoch and recording, after each,
    whether the step ran as a captured CUDA graph."""
    from normkd_plugin.engine.fit import Hook

    class Mutate(Hook):
        def __init__(self):
            self.graphed: list[bool] = []

        def before_fit(self, pack):
            self.step_graph = pack.step.graph

        def before_epoch(self, epoch, runs):
            for run in runs:
                if mutation == "frozen-bn":
                    for m in run.distiller.student.modules():
                        if isinstance(m, torch.nn.BatchNorm2d):
                            m.momentum = 0.0
                if mutation == "no-weight-decay":
                    for group in run.optimizer.param_groups:
                        group["weight_decay"] = 0.0

        def after_epoch(self, epoch, results):
            self.graphed.append(self.step_graph.graph is not None)

    return Mutate()


def _graph_vs_eager_state(tmp_path, root, teacher, graph: bool, mutation: str | None = None):
    """Two epochs (LR decay after 1, NormDKD in warm-up, partial last batch) on CUDA; the run's final state."""
    from conftest import fast_opts, load_state
    from normkd_plugin.config import load_config, run_name
    from normkd_plugin.engine.graph import StepGraph
    from normkd_plugin.train import train_pack

    opts = fast_opts(root, teacher, tmp_path / f"g{graph}{mutation}", 0, "SOLVER.FAST.CUDA_GRAPH", str(graph))
    cfg = load_config("cifar100/normdkd/res56_res20", opts)
    hook = _mutated(mutation)
    with pytest.MonkeyPatch.context() as patch:
        if mutation == "no-recapture":
            patch.setattr(StepGraph, "run", _stale_graph(StepGraph.run))
        train_pack([cfg], [run_name(cfg, opts)], torch.device("cuda"), hooks=[hook])
    assert hook.graphed == [graph, graph], "the graph run fell back to eager" if graph else "the eager run captured"
    return load_state(tmp_path / f"g{graph}{mutation}" / run_name(cfg, opts))


def _close(a, b) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=1e-6) for k in a)


@needs_cuda
@pytest.mark.parametrize("mutation", [None, "no-recapture", "frozen-bn", "no-weight-decay"])
def test_cuda_graph_equals_eager_and_catches_mutations(tmp_path, small_cifar_npz, teacher_resnet56, mutation):
    """Deterministic kernels, TF32 off: graph == eager to float32 rounding; each mutation of the graph run is caught."""
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        eager = _graph_vs_eager_state(tmp_path, small_cifar_npz, teacher_resnet56, graph=False)
        graph = _graph_vs_eager_state(tmp_path, small_cifar_npz, teacher_resnet56, graph=True, mutation=mutation)
    finally:
        torch.use_deterministic_algorithms(False)
    moms = [{str(i): s["momentum_buffer"] for i, s in st["optimizer"]["state"].items()} for st in (graph, eager)]
    same = (
        _close(graph["model"], eager["model"])
        and _close(*moms)
        and graph["optimizer"]["param_groups"][0]["lr"] == eager["optimizer"]["param_groups"][0]["lr"]
        and all(math.isclose(graph["record"][k], eager["record"][k], rel_tol=1e-4) for k in eager["record"])
    )
    if mutation is None:
        assert same, "the CUDA-graph run drifted from the eager run"
        keys = graph["model"].keys()
        assert any(k.endswith("running_mean") for k in keys) and any(k.endswith("num_batches_tracked") for k in keys)
    else:
        assert not same, f"the comparison did not notice the mutation {mutation!r}"
