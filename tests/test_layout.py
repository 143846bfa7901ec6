"""engine/layout.py: a fused pack trains what the same pack trains unfused, to float32 rounding (CPU, real data).

Fused students run as grouped convolutions, which sum in another order than K separate ones, so
runs agree to rounding, not bitwise. How far rounding carries is measured, not guessed: BatchNorm's
backward subtracts nearly equal terms, so the first layers' gradients move ~1e4x more than the
forward's rounding (a 1e-7 relative change of the weights changes conv1's gradient by 2.5e-3), and
from a random init at LR 0.05 one step amplifies such a difference ~2000x. The tests therefore run
at LR 1e-5 and, after 2 epochs of 4 steps (the LR decay crossed, NormDKD inside its warm-up, the
8-image last batch), ask per tensor (norms): metric records within 1e-6 relative (seen: 2e-7), BN
running statistics within 1e-5 (seen: 2.2e-6), momentum buffers within 5e-2 (seen: 1.9e-2), weights
within 0.1 of epoch 2's movement plus 1e-6 of their size (seen: 0.055); generators, counters and the
LR exactly. A plausible wrong fusion (another batch, a shared momentum, pooled BN statistics) misses
these by orders of magnitude (every slice fed slice 0's batch: conv1's weights fail). Runs that do not fuse (a
feature distiller, another architecture) stay bitwise equal to the unfused pack.

Those tolerances were measured on this CPU; other kernels (a GPU's, or channels_last ones) round
otherwise. Where they differ, the bound is what rounding itself moves (:func:`assert_as_close_as`):
fused and unfused no further apart, per tensor and record, than FLOOR_FACTOR times the unfused pack
and the same pack in the other memory format (seen on the CPU: at most 3.1x for tensors; every slice
fed slice 0's batch: a median of 250x).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from conftest import (
    assert_same_run,
    fast_opts,
    interrupted_at,
    load_state,
    nan_weights_at,
    needs_cuda,
    needs_mdistiller,
)

pytestmark = needs_mdistiller

PARAM_TOL, MOMENTUM_TOL, STAT_TOL, REL = 0.1, 5e-2, 1e-5, 1e-6
FLOOR_FACTOR = 10
# A small LR keeps the comparison about rounding (see the module's docstring).
SMALL = ("SOLVER.LR", "1e-5", "LOG.SAVE_CHECKPOINT_FREQ", "1")
KD, NORMKD, NORMDKD = "cifar100/kd/res56_res20", "cifar100/normkd/res56_res20", "cifar100/normdkd/res56_res20"
# KD and NormKD share seed 0; NormDKD and the vanilla student seed 1: one fused group, two seed groups.
FOUR = ((KD, 0, ()), (NORMKD, 0, ()), (NORMDKD, 1, ()), (KD, 1, ("DISTILLER.TYPE", "NONE")))


def _train(root, teacher, prefix, runs, fuse, extra=(), resume=False, caplog=None, device="cpu", hooks=()):
    """Train ``runs`` ((config, seed, overrides) each) as one pack (``hooks`` joining the engine's); the run folders."""
    from normkd_plugin.config import load_config, run_name
    from normkd_plugin.train import train_pack

    cfgs, names = [], []
    for name, seed, own in runs:
        opts = fast_opts(root, teacher, prefix, seed, *SMALL, *own, *extra, "SOLVER.FAST.FUSE", fuse)
        cfgs.append(load_config(name, opts))
        names.append(run_name(cfgs[-1], opts))
    if caplog is not None:
        with caplog.at_level(logging.INFO, logger="normkd_plugin.engine"):
            train_pack(cfgs, names, torch.device(device), resume, hooks=hooks)
    else:
        train_pack(cfgs, names, torch.device(device), resume, hooks=hooks)
    return [prefix / n for n in names]


def _rel(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> float:
    return ((x.double() - y.double()).norm() / max(scale.double().norm().item(), 1e-30)).item()


def _close_weights(x: torch.Tensor, y: torch.Tensor, moved: torch.Tensor) -> bool:
    """Within PARAM_TOL of what the weights moved in an epoch plus 1e-6 of their size (p + update is rounded)."""
    tol = PARAM_TOL * (moved.double().norm() + 1e-6 * x.double().norm())
    return bool((x.double() - y.double()).norm() <= tol)


def assert_close_runs(a, b):
    """Two run folders hold the same run to float32 rounding (generators, counters and schedule exactly).

    The tolerances and why are in the module's docstring.
    """
    a1, a2, b1, b2 = load_state(a, "epoch_1"), load_state(a), load_state(b, "epoch_1"), load_state(b)
    assert a2["epoch"] == b2["epoch"] and a2["model"].keys() == b2["model"].keys()
    for key, x in a2["model"].items():
        y, moved = b2["model"][key], x - a1["model"][key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        if not x.is_floating_point():
            assert torch.equal(x, y) and torch.equal(a1["model"][key], b1["model"][key]), f"{a.name}: {key}"
        elif "running_" in key:
            assert _rel(x, y, x) < STAT_TOL and _rel(a1["model"][key], b1["model"][key], x) < STAT_TOL, key
        else:
            assert _close_weights(x, y, moved) and _close_weights(a1["model"][key], b1["model"][key], moved), key
    assert any(k.endswith("running_var") for k in a2["model"])
    for sa, sb in ((a1, b1), (a2, b2)):
        moms = [[s["momentum_buffer"] for s in st["optimizer"]["state"].values()] for st in (sa, sb)]
        assert len(moms[0]) == len(moms[1]) > 0
        assert all(_rel(x, y, x) < MOMENTUM_TOL for x, y in zip(*moms)), f"{a.name}: momentum"
        assert sa["optimizer"]["param_groups"][0]["lr"] == sb["optimizer"]["param_groups"][0]["lr"]
        assert torch.equal(sa["generator"], sb["generator"]) and sa["seed"] == sb["seed"]
        for key in sa["record"]:
            assert math.isclose(sa["record"][key], sb["record"][key], rel_tol=REL, abs_tol=1e-9), f"{a.name}: {key}"
    for name in ("epoch_1", "student_latest"):
        assert (a / name).stat().st_size < 1.5 * (b / name).stat().st_size  # one slice saved, not the stack


def _dist(x: torch.Tensor, y: torch.Tensor) -> float:
    return (x.double() - y.double()).norm().item()


def assert_as_close_as(a, b, floor):
    """Run folders ``a`` and ``b`` no further apart than the two of ``floor`` (the same runs in two memory formats).

    Per tensor and per record of both epochs: distance <= FLOOR_FACTOR x the floor's, plus 1e-6 of
    the value (its own float32 rounding: a tensor the floor leaves bitwise alike); generators,
    counters, seeds and learning rates exactly.
    """
    for name in ("epoch_1", "latest"):
        sa, sb, sc, sd = (load_state(folder, name) for folder in (a, b, *floor))
        pairs = [(f"{name}: {k}", sa["model"][k], sb["model"][k], sc["model"][k], sd["model"][k]) for k in sa["model"]]
        moms = [[s["momentum_buffer"] for s in st["optimizer"]["state"].values()] for st in (sa, sb, sc, sd)]
        assert len(moms[0]) == len(moms[1]) > 0
        pairs += [(f"{name}: momentum {i}", *m) for i, m in enumerate(zip(*moms))]
        for key, x, y, z, w in pairs:
            if not x.is_floating_point():
                assert torch.equal(x, y), f"{a.name} {key}"
                continue
            bound = FLOOR_FACTOR * _dist(z, w) + 1e-6 * x.double().norm().item()
            assert _dist(x, y) <= bound, f"{a.name} {key}: {_dist(x, y):.3g} apart, {_dist(z, w):.3g} in the floor"
        for key, x in sa["record"].items():
            bound = FLOOR_FACTOR * abs(sc["record"][key] - sd["record"][key]) + REL * abs(x)
            assert abs(x - sb["record"][key]) <= bound, f"{a.name} {name}: {key}"
        assert sa["optimizer"]["param_groups"][0]["lr"] == sb["optimizer"]["param_groups"][0]["lr"]
        assert torch.equal(sa["generator"], sb["generator"]) and sa["seed"] == sb["seed"]


def test_fused_pack_equals_the_unfused_pack(tmp_path, small_cifar_npz, teacher_resnet56, caplog):
    """KD s0, NormKD s0, NormDKD s1, vanilla s1: one fused group of 4 (two batches), against the same pack unfused."""
    fused = _train(small_cifar_npz, teacher_resnet56, tmp_path / "fused", FOUR, "on", caplog=caplog)
    assert "fused 4 students" in caplog.text
    unfused = _train(small_cifar_npz, teacher_resnet56, tmp_path / "unfused", FOUR, "off")
    for a, b in zip(fused, unfused):
        assert a.name == b.name  # FUSE does not enter the run name
        assert_close_runs(a, b)
    state = load_state(fused[2])
    assert state["epoch"] == 2 and state["lr"] == pytest.approx(1e-6)  # the decay was crossed
    assert "lr: 0.00" in (fused[0] / "worklog.txt").read_text()
    # the slices really differ (their own inits, batches and losses): no slice copied another
    weights = [load_state(f)["model"]["module.student.fc.weight"] for f in fused]
    assert all(not torch.allclose(weights[i], weights[j]) for i in range(4) for j in range(i))


def test_runs_with_their_own_learning_rates_follow_their_own_schedules(tmp_path, small_cifar_npz, teacher_resnet56):
    runs = ((KD, 0, ("SOLVER.LR", "1e-5")), (KD, 0, ("SOLVER.LR", "4e-5")), (NORMKD, 0, ("SOLVER.LR", "1e-5")))
    fused = _train(small_cifar_npz, teacher_resnet56, tmp_path / "fused", runs, "on")
    unfused = _train(small_cifar_npz, teacher_resnet56, tmp_path / "unfused", runs, "off")
    for a, b in zip(fused, unfused):
        assert_close_runs(a, b)
    assert [load_state(f)["lr"] for f in fused] == pytest.approx([1e-6, 4e-6, 1e-6])


def test_mixed_pack_fuses_what_it_can_and_trains_the_rest_as_before(
    tmp_path, small_cifar_npz, teacher_resnet56, caplog
):
    """KD + NormKD (resnet20) fuse; OFD (features) and a vanilla resnet8 beside them stay bitwise as unfused."""
    runs = (
        (KD, 0, ()),
        (KD, 0, ("DISTILLER.TYPE", "OFD")),
        (NORMKD, 1, ()),
        (KD, 1, ("DISTILLER.TYPE", "NONE", "DISTILLER.STUDENT", "resnet8")),
    )
    fused = _train(small_cifar_npz, teacher_resnet56, tmp_path / "fused", runs, "on", caplog=caplog)
    assert "fused 2 students" in caplog.text and "fused 3" not in caplog.text
    unfused = _train(small_cifar_npz, teacher_resnet56, tmp_path / "unfused", runs, "off")
    assert_close_runs(fused[0], unfused[0])
    assert_close_runs(fused[2], unfused[2])
    assert_same_run(fused[1], unfused[1])
    assert_same_run(fused[3], unfused[3])


@pytest.mark.parametrize("bad_epoch", [1, 2])
def test_a_nan_run_in_a_fused_group_fails_alone(tmp_path, small_cifar_npz, teacher_resnet56, bad_epoch):
    """NormKD's slice turns NaN; it fails at step 1 of 4, the other slices equal the unfused pack's.

    At epoch 1 the survivors are fused again for epoch 2, after validation left the students in eval mode:
    they must train in train mode (batch statistics, running statistics updated) as the unfused runs do.
    """
    from normkd_plugin.errors import RunsFailed

    runs, where = FOUR[:3], f"epoch {bad_epoch} step 1 of 4"
    with pytest.raises(RunsFailed, match=where):
        _train(
            small_cifar_npz,
            teacher_resnet56,
            tmp_path / "fused",
            runs,
            "on",
            hooks=[nan_weights_at(bad_epoch, "NORMKD")],
        )
    with pytest.raises(RunsFailed, match=where):
        _train(
            small_cifar_npz,
            teacher_resnet56,
            tmp_path / "unfused",
            runs,
            "off",
            hooks=[nan_weights_at(bad_epoch, "NORMKD")],
        )
    unfused = sorted((tmp_path / "unfused").glob("*/*"))
    fused = sorted((tmp_path / "fused").glob("*/*"))
    assert len(fused) == len(unfused) == 3
    for a, b in zip(fused, unfused):
        if "normkd" in a.name and "normdkd" not in a.name:
            assert f"failed\t{where}" in (a / "worklog.txt").read_text()
            assert load_state(a)["epoch"] == 1 if bad_epoch == 2 else not (a / "latest").exists()
        else:
            assert_close_runs(a, b)
            assert all(torch.isfinite(t).all() for t in load_state(a)["model"].values())


def test_resume_fused_then_unfused_then_fused_equals_the_uninterrupted_run(tmp_path, small_cifar_npz, teacher_resnet56):
    runs, three = FOUR[1:3], ("SOLVER.EPOCHS", "3", "SOLVER.LR_DECAY_STAGES", "[2]")
    whole = _train(small_cifar_npz, teacher_resnet56, tmp_path / "whole", runs, "off", three)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        _train(small_cifar_npz, teacher_resnet56, cut, runs, "on", three, hooks=[interrupted_at(2)])
    with pytest.raises(KeyboardInterrupt):
        _train(small_cifar_npz, teacher_resnet56, cut, runs, "off", three, resume=True, hooks=[interrupted_at(3)])
    assert load_state(cut / whole[0].relative_to(tmp_path / "whole"))["epoch"] == 2
    resumed = _train(small_cifar_npz, teacher_resnet56, cut, runs, "on", three, resume=True)
    for a, b in zip(resumed, whole):
        assert_close_runs(a, b)
        assert (a / "worklog.txt").read_text().count("epoch: ") == 3


def test_fusion_key_accepts_logit_distillers_and_sgd_only(small_cifar_npz, teacher_resnet56, tmp_path):
    """Which runs fuse: logit-only distillers over plain SGD of exactly the student's parameters."""
    from types import SimpleNamespace

    from mdistiller.models.cifar import resnet8, resnet20

    from normkd_plugin.engine.layout import fusion_key

    def run(kind, student, optimizer=None, dropout=False):
        net = student(num_classes=100)
        if dropout:
            net.drop = torch.nn.Dropout(0.5)
        distiller = SimpleNamespace(student=net, named_parameters=net.named_parameters)
        opt = optimizer(net) if optimizer else torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        cfg = SimpleNamespace(DISTILLER=SimpleNamespace(TYPE=kind))
        return SimpleNamespace(cfg=cfg, distiller=distiller, optimizer=opt)

    assert fusion_key(run("KD", resnet20)) == fusion_key(run("NORMDKD", resnet20)) is not None
    assert fusion_key(run("NONE", resnet8)) not in (None, fusion_key(run("KD", resnet20)))
    assert fusion_key(run("OFD", resnet20)) is None
    assert fusion_key(run("KD", resnet20, lambda m: torch.optim.Adam(m.parameters()))) is None
    assert (
        fusion_key(run("KD", resnet20, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, nesterov=True, momentum=0.9)))
        is None
    )
    assert fusion_key(run("KD", resnet20, lambda m: torch.optim.SGD(list(m.parameters())[1:], lr=0.1))) is None
    assert fusion_key(run("KD", resnet20, dropout=True)) is None


def test_fuse_key_is_checked_and_is_an_execution_setting():
    from normkd_plugin.config import ConfigError, load_config, run_name

    with pytest.raises(ConfigError, match=r"SOLVER\.FAST\.FUSE sometimes: expected auto, on or off"):
        load_config(KD, ["SOLVER.FAST.FUSE", "sometimes"])
    on, off = (["SOLVER.FAST.FUSE", v, "EXPERIMENT.SEED", "0"] for v in ("on", "off"))
    assert run_name(load_config(KD, on), on) == run_name(load_config(KD, off), off)
    assert "FUSE" not in run_name(load_config(KD, on), on)
    assert load_config(KD).SOLVER.FAST.FUSE == "auto"  # the resume check ignores it (see the resume test)


@needs_cuda
@pytest.mark.parametrize("layout", ["nchw", "branches", "channels_last"])
def test_fused_graph_pack_equals_the_unfused_eager_pack_on_cuda(
    tmp_path, small_cifar_npz, teacher_resnet56, layout, caplog
):
    """The fused step captured in the CUDA graph (on a forked branch; on channels_last batches, fp32) against the
    unfused eager pack: no further apart than that pack is from itself in the other memory format."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cl, other = (("SOLVER.FAST.CHANNELS_LAST", str(v)) for v in (layout == "channels_last", layout != "channels_last"))
    extra = (*cl, "SOLVER.FAST.PACK_BRANCHES", str(layout == "branches"))
    fused = _train(small_cifar_npz, teacher_resnet56, tmp_path / "f", FOUR, "on", extra, caplog=caplog, device="cuda")
    assert "fused 4 students" in caplog.text and "capture failed" not in caplog.text
    eager = ("SOLVER.FAST.CUDA_GRAPH", "False")
    unfused = _train(small_cifar_npz, teacher_resnet56, tmp_path / "u", FOUR, "off", (*eager, *cl), device="cuda")
    switched = _train(small_cifar_npz, teacher_resnet56, tmp_path / "s", FOUR, "off", (*eager, *other), device="cuda")
    for a, b, c in zip(fused, unfused, switched):
        assert_as_close_as(a, b, floor=(b, c))


@needs_cuda
def test_fused_bf16_channels_last_pack_trains_in_the_graph_on_cuda(tmp_path, small_cifar_npz, teacher_resnet56, caplog):
    amp = ("SOLVER.AMP", "True", "SOLVER.FAST.CHANNELS_LAST", "True")
    fused = _train(small_cifar_npz, teacher_resnet56, tmp_path, FOUR, "on", amp, caplog=caplog, device="cuda")
    assert "fused 4 students" in caplog.text and "capture failed" not in caplog.text
    for folder in fused:
        state = load_state(folder)
        assert state["epoch"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.fixture
def cudnn_batch_norm(monkeypatch):
    """Batch norm asks its input's layout as cuDNN's does on CUDA: ``input.contiguous(input.suggest_memory_format())``.

    The CPU kernel never asks; under vmap, asking a channels_last batched tensor raises "NYI: querying
    is_contiguous inside of vmap", as fp32 fused students with channels_last inputs would on CUDA.
    """
    from torch._prims_common import suggest_memory_format

    real = torch.nn.functional.batch_norm

    def batch_norm(input, *args, **kwargs):
        return real(input.contiguous(memory_format=suggest_memory_format(input)), *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "batch_norm", batch_norm)


def _fused_resnets(k: int):
    """k resnet8 students (1x1 downsample convolutions included) fused after a channels_last pack's conversion."""
    from types import SimpleNamespace

    from mdistiller.models.cifar import resnet8

    from normkd_plugin.engine.layout import FusedStudents

    torch.manual_seed(0)
    nets = [resnet8(num_classes=100).to(memory_format=torch.channels_last) for _ in range(k)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9) for n in nets]
    return FusedStudents(
        [SimpleNamespace(distiller=SimpleNamespace(student=n), optimizer=o) for n, o in zip(nets, opts)]
    )


def test_fused_students_take_channels_last_batches(cifar_batch, cudnn_batch_norm):
    """Students and batches in channels_last: training (one batch, a batch per slice) and validation give what
    they give on NCHW batches (the batch norm of the fixture would refuse a channels_last activation)."""
    x = cifar_batch[0][:16]
    per_slice = torch.stack([x[:8], x[8:]])
    fused = _fused_resnets(2)
    with torch.no_grad():
        for nchw, channels_last, batched in (
            (x, x.contiguous(memory_format=torch.channels_last), False),
            (per_slice, torch.stack([b.contiguous(memory_format=torch.channels_last) for b in per_slice]), True),
        ):
            assert not channels_last.is_contiguous()
            assert torch.equal(fused(channels_last, batched=batched), fused(nchw, batched=batched))
        assert torch.equal(fused.evaluate(x.contiguous(memory_format=torch.channels_last)), fused.evaluate(x))


def test_fused_channels_last_pack_equals_the_unfused_one(tmp_path, small_cifar_npz, teacher_resnet56, cudnn_batch_norm):
    """NormKD s0 and NormDKD s1 (a batch per slice) with SOLVER.FAST.CHANNELS_LAST, fused (in NCHW) against
    unfused (in channels_last): no further apart than the unfused pack in its two memory formats."""
    runs, cl = FOUR[1:3], ("SOLVER.FAST.CHANNELS_LAST", "True")
    fused = _train(small_cifar_npz, teacher_resnet56, tmp_path / "fused", runs, "on", cl)
    unfused = _train(small_cifar_npz, teacher_resnet56, tmp_path / "unfused", runs, "off", cl)
    nchw = _train(small_cifar_npz, teacher_resnet56, tmp_path / "nchw", runs, "off")
    for a, b, c in zip(fused, unfused, nchw):
        assert_as_close_as(a, b, floor=(b, c))


def test_fused_students_step_as_their_own_sgd_optimizers(cifar_batch):
    """Three resnet20 slices (two share LR and weight decay, one has its own; each its own images) over
    three SGD steps against three modules with torch's SGD: the same weights, momentum and BN buffers."""
    import copy
    from types import SimpleNamespace

    import torch.nn.functional as F
    from mdistiller.models.cifar import resnet20

    from normkd_plugin.engine.layout import FusedStudents

    x, y = cifar_batch  # 32 real images: slice k trains on its own 16 (slices 0 and 2 share theirs)
    batches = [(x[:16], y[:16]), (x[16:], y[16:]), (x[:16], y[:16])]
    hyper = [(1e-5, 5e-4), (1e-5, 5e-4), (3e-5, 1e-4)]
    nets = [resnet20(num_classes=100).train() for _ in hyper]
    refs = [copy.deepcopy(n) for n in nets]
    init = [{k: v.detach().clone() for k, v in n.named_parameters()} for n in nets]

    def optimizer(net, lr, wd):
        return torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=wd)

    runs = [
        SimpleNamespace(distiller=SimpleNamespace(student=n), optimizer=optimizer(n, *h)) for n, h in zip(nets, hyper)
    ]
    ref_opts = [optimizer(n, *h) for n, h in zip(refs, hyper)]
    fused = FusedStudents(runs)
    for _ in range(3):
        fused.zero_grad()
        logits = fused(torch.stack([b for b, _ in batches]), batched=True)
        sum(F.cross_entropy(logits[k], t) for k, (_, t) in enumerate(batches)).backward()
        fused.step()
        for net, opt, (b, t) in zip(refs, ref_opts, batches):
            opt.zero_grad()
            F.cross_entropy(net(b)[0], t).backward()
            opt.step()
    for run, net, opt, start in zip(runs, refs, ref_opts, init):
        mine = dict(run.distiller.student.named_parameters())
        for name, p in net.named_parameters():
            assert _close_weights(mine[name], p, p - start[name]), name  # the weights (views of the stack) moved alike
            m = run.optimizer.state[mine[name]]["momentum_buffer"]
            assert _rel(m, opt.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"]) < MOMENTUM_TOL, name
        theirs = dict(net.named_buffers())
        for name, b in run.distiller.student.named_buffers():
            assert torch.equal(b, theirs[name]) if "num_batches" in name else _rel(b, theirs[name], b) < STAT_TOL, name
    fused.unfuse()
    assert all(p.untyped_storage().nbytes() == p.numel() * 4 for p in nets[0].parameters())  # own storage again


def _measured(device="NVIDIA H100 80GB HBM3", precision="fp32", benchmark="off", runs=15, serial=40.0, fused=20.0):
    from normkd_plugin.engine.fuse_speed import Measurement

    return Measurement(device, "resnet20", precision, benchmark, runs, serial, fused, "2.14.1", "")


def test_fuse_auto_fuses_where_the_nearest_measurement_of_this_device_says_fused_is_faster():
    from normkd_plugin.engine.fuse_speed import choose

    h100, a100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"
    rows = [_measured(runs=4, serial=10.0, fused=8.0), _measured(runs=15, serial=30.0, fused=31.0)]
    rows += [_measured(a100, runs=15, serial=50.0, fused=20.0), _measured(runs=12, fused=math.inf, benchmark="on")]

    def fuses(runs, device=h100, precision="fp32", benchmark="off", student="resnet20"):
        return choose(rows, device, student, precision, benchmark, runs)[0]

    assert fuses(4) and fuses(5) and fuses(9)  # nearest measured size: 4 (fused faster)
    assert not fuses(10) and not fuses(15) and not fuses(21)  # nearest: 15 (fused slower)
    assert fuses(15, device=a100)  # each device by its own measurement
    assert not fuses(12, benchmark="on")  # fusing failed there (recorded as infinitely slow)
    for other in ({"device": "NVIDIA L4"}, {"precision": "bf16"}, {"student": "resnet8x4"}):
        assert not fuses(4, **other)  # nothing measured: not fused
    assert choose(rows, "NVIDIA L4", "resnet20", "fp32", "off", 4)[1].startswith("auto: no measurement for resnet20")
    assert "4 runs, fused 8.00 vs serial 10.00 ms per step" in choose(rows, h100, "resnet20", "fp32", "off", 5)[1]


def test_fuse_choice_reads_the_packaged_table_and_this_machines_own_first(tmp_path, monkeypatch):
    """auto on CUDA (the device name stands in): $NORMKD_FUSE_TABLE's rows win over the packaged ones; auto on a
    CPU never fuses, on anywhere; the packaged table is a valid table."""
    from normkd_plugin.config import ConfigError, load_config
    from normkd_plugin.engine.checks import check_pack
    from normkd_plugin.engine.fuse_speed import FuseChoice, measurements, write_table

    monkeypatch.delenv("NORMKD_FUSE_TABLE", raising=False)
    packaged = measurements()
    assert all(m.device and m.runs > 0 for m in packaged)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    cfg = load_config(KD, ["SOLVER.FAST.FUSE", "auto", "SOLVER.TRAINER", "fast"])
    assert FuseChoice.of(cfg, torch.device("cuda")).fuses("resnet20", 15)[0] is False  # not measured
    write_table(tmp_path / "mine.csv", [_measured("Some GPU", serial=30.0, fused=10.0)])
    monkeypatch.setenv("NORMKD_FUSE_TABLE", str(tmp_path / "mine.csv"))
    assert FuseChoice.of(cfg, torch.device("cuda")).fuses("resnet20", 15) == (
        True,
        "auto: measured 15 runs, fused 10.00 vs serial 30.00 ms per step on Some GPU",
    )
    assert FuseChoice.of(cfg, torch.device("cpu")).fuses("resnet20", 15) == (False, "auto: fuses only on CUDA")
    on = load_config(KD, ["SOLVER.FAST.FUSE", "on"])
    assert FuseChoice.of(on, torch.device("cpu")).fuses("resnet20", 15)[0] is True
    assert not FuseChoice.of(load_config(KD, ["SOLVER.FAST.FUSE", "off"]), torch.device("cpu")).considered()
    (tmp_path / "mine.csv").write_text("device,serial\n")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'mine.csv'}: not a fused-speed table"):
        check_pack([cfg], ["kd"], torch.device("cuda"))  # checked with the configs, before any run folder is made


def test_fuse_table_merges_by_key_and_names_what_it_cannot_read(tmp_path):
    from normkd_plugin.config import ConfigError
    from normkd_plugin.engine.fuse_speed import main, merge_table, read_table, write_table

    table = tmp_path / "table.csv"
    merge_table(table, [_measured(runs=15, fused=20.0), _measured(runs=4)])
    merge_table(table, [_measured(runs=15, fused=50.0), _measured(precision="bf16", runs=15, fused=math.inf)])
    rows = read_table(table)
    assert [(r.precision, r.runs, r.fused_ms) for r in rows] == [
        ("bf16", 15, math.inf),
        ("fp32", 4, 20.0),
        ("fp32", 15, 50.0),
    ]
    lines = table.read_text().splitlines()
    (tmp_path / "header.csv").write_text("device,runs\n")
    (tmp_path / "row.csv").write_text("\n".join([lines[0], lines[1], lines[2].replace(",4,", ",four,")]) + "\n")
    for name, message in (
        ("header.csv", "not a fused-speed table"),
        ("row.csv", "line 3 is not a measurement"),
        ("missing.csv", "cannot read the fused-speed table"),
    ):
        with pytest.raises(ConfigError, match=message) as caught:
            read_table(tmp_path / name)
        assert str(tmp_path / name) in str(caught.value)
    write_table(tmp_path / "new.csv", [_measured(runs=15, fused=5.0)])
    assert main([str(tmp_path / "new.csv"), str(table)]) == 0
    assert [r.fused_ms for r in read_table(table)] == [math.inf, 20.0, 5.0]
    assert main([str(tmp_path / "row.csv"), str(table)]) == 2  # one line on stderr, the table untouched
    assert [r.fused_ms for r in read_table(table)] == [math.inf, 20.0, 5.0]


def test_a_group_that_the_choice_does_not_fuse_trains_as_unfused(
    tmp_path, small_cifar_npz, teacher_resnet56, caplog, monkeypatch
):
    """Runs that could fuse but are not chosen to: trained bitwise as the unfused pack, the log says why."""
    from normkd_plugin.engine.fuse_speed import FuseChoice

    monkeypatch.setattr(FuseChoice, "fuses", lambda self, student, runs: (False, f"measured slower for {student}"))
    short = ("SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[]", "SOLVER.FAST.ITERS_PER_EPOCH", "2")
    chosen = _train(small_cifar_npz, teacher_resnet56, tmp_path / "c", FOUR[:2], "on", short, caplog=caplog)
    assert "2 students of one architecture not fused" in caplog.text and "measured slower for resnet20" in caplog.text
    unfused = _train(small_cifar_npz, teacher_resnet56, tmp_path / "u", FOUR[:2], "off", short)
    for a, b in zip(chosen, unfused):
        assert_same_run(a, b)
