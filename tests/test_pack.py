"""engine/: a packed run trains exactly what the same config trains alone (CPU, real data and teacher)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import (
    SMALL_BATCH,
    SMALL_TRAIN,
    assert_same_run,
    fast_opts,
    interrupted_at,
    load_state,
    nan_weights_at,
    needs_cuda,
    needs_mdistiller,
)

pytestmark = needs_mdistiller

# NormKD and KD share seed 0 (paired: the same batches), NormDKD has its own seed.
RUNS = (("cifar100/normkd/res56_res20", 0), ("cifar100/kd/res56_res20", 0), ("cifar100/normdkd/res56_res20", 1))


def _configs(root, teacher, prefix, runs=RUNS, extra=()):
    from normkd_plugin.config import load_config, run_name

    cfgs, names = [], []
    for name, seed in runs:
        opts = fast_opts(root, teacher, prefix, seed, *extra)
        cfg = load_config(name, opts)
        cfgs.append(cfg)
        names.append(run_name(cfg, opts))
    return cfgs, names


def _train(root, teacher, prefix, runs=RUNS, extra=(), resume=False, hooks=()):
    from normkd_plugin.train import train_pack

    cfgs, names = _configs(root, teacher, prefix, runs, extra)
    train_pack(cfgs, names, torch.device("cpu"), resume, hooks=hooks)
    return [prefix / n for n in names]


@pytest.fixture(scope="module")
def pack_and_solos(tmp_path_factory, small_cifar_npz, teacher_resnet56):
    """RUNS trained as one pack and each alone (2 epochs each): the references the tests below compare against.
    The tests only read these folders."""
    root = tmp_path_factory.mktemp("pack_and_solos")
    packed = _train(small_cifar_npz, teacher_resnet56, root / "pack")
    solos = [_train(small_cifar_npz, teacher_resnet56, root / f"solo-{i}", runs=[run])[0] for i, run in enumerate(RUNS)]
    return packed, solos


def test_pack_of_three_equals_three_solo_runs_bitwise(pack_and_solos):
    packed, solos = pack_and_solos
    for folder, solo in zip(packed, solos):
        assert solo.name == folder.name  # the same run folder name as a solo run
        assert_same_run(folder, solo)
    # the schedule really crossed the LR decay and NormDKD ran inside its warm-up
    state = load_state(packed[2])
    assert state["epoch"] == 2 and state["lr"] == pytest.approx(0.005)
    text = (packed[0] / "worklog.txt").read_text()
    assert "lr: 0.05" in text and "lr: 0.01" in text and text.rstrip().splitlines()[-1].startswith("best_acc\t")
    for folder in packed:
        assert {"config.yaml", "latest", "best", "student_latest", "student_best", "worklog.txt"} <= {
            p.name for p in folder.iterdir()
        }
        assert not any(k.startswith("module.teacher") for k in load_state(folder)["model"])


@pytest.fixture(scope="module")
def one_epoch_seen(tmp_path_factory, small_cifar_npz, teacher_resnet56):
    """One epoch of RUNS as a pack, watched through a hook: per step the (distiller type, image tensor, targets) of
    every run's training forward, and the batch size of every forward of the teacher network."""
    from normkd_plugin.engine.fit import Hook

    seen, sizes = [], []

    class Watch(Hook):
        def before_fit(self, pack):
            pack.teacher.net.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
            for run in pack.runs:  # the host's Distiller.forward calls forward_train while training
                forward = run.distiller.forward_train
                run.distiller.forward_train = lambda _f=forward, _r=run, **kw: (
                    seen[-1].append((_r.cfg.DISTILLER.TYPE, kw["image"], kw["target"])),
                    _f(**kw),
                )[1]

        def before_step(self, epoch, step):  # a step's batch is taken: its forwards follow
            seen.append([])

    prefix = tmp_path_factory.mktemp("one_epoch")
    _train(small_cifar_npz, teacher_resnet56, prefix, extra=("SOLVER.EPOCHS", "1"), hooks=[Watch()])
    return seen, sizes


def test_runs_that_share_a_seed_see_the_same_batches(one_epoch_seen):
    """NormKD and KD (seed 0) get the very same image tensors each step; NormDKD (seed 1) others; all images used."""
    seen, _ = one_epoch_seen
    assert [len(step) for step in seen] == [3, 3, 3, 3]
    for step in seen:
        by = {kind: (image, target) for kind, image, target in step}
        assert by["NORMKD"][0] is by["KD"][0] and torch.equal(by["NORMKD"][1], by["KD"][1])
        assert not torch.equal(by["NORMKD"][0], by["NORMDKD"][0])
    assert [len(step[0][2]) for step in seen] == [16, 16, 16, 8]  # the partial last batch is trained too
    for kind in ("KD", "NORMDKD"):
        labels = torch.cat([t for step in seen for k, _, t in step if k == kind])
        assert labels.shape == (SMALL_TRAIN,)  # every image once per epoch


def test_teacher_runs_once_per_step_on_the_distinct_batches(one_epoch_seen):
    """One forward of the teacher network per step, on the two seed groups' batches together (2 x 16 images)."""
    _, sizes = one_epoch_seen
    assert sizes == [2 * SMALL_BATCH] * 3 + [2 * (SMALL_TRAIN % SMALL_BATCH)]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (("SOLVER.BATCH_SIZE", "32"), "SOLVER.BATCH_SIZE"),
        (("SOLVER.EPOCHS", "3"), "SOLVER.EPOCHS"),
        (("DISTILLER.TEACHER", "resnet110"), "DISTILLER.TEACHER"),
        (("DISTILLER.TEACHER_CKPT", "/elsewhere/t.pt"), "DISTILLER.TEACHER_CKPT"),
        (("DATASET.ROOT", "/elsewhere"), "DATASET.ROOT"),
    ],
)
def test_configs_that_cannot_share_a_pack_fail_naming_key_and_values(
    tmp_path, small_cifar_npz, teacher_resnet56, override, key
):
    from normkd_plugin.config import ConfigError, load_config, run_name
    from normkd_plugin.train import train_pack

    cfgs, names = _configs(small_cifar_npz, teacher_resnet56, tmp_path / "o", RUNS[:1])
    opts = fast_opts(small_cifar_npz, teacher_resnet56, tmp_path / "o", 1, *override)
    other = load_config("cifar100/kd/res56_res20", opts)
    with pytest.raises(ConfigError, match=rf"pack: {key} differs: .* but .*{override[1].split('/')[-1]}"):
        train_pack([cfgs[0], other], [names[0], run_name(other, opts)], torch.device("cpu"))
    assert not (tmp_path / "o").exists()  # nothing built, nothing written


def test_same_run_twice_in_a_pack_is_refused(tmp_path, small_cifar_npz, teacher_resnet56):
    from normkd_plugin.config import ConfigError
    from normkd_plugin.train import train_pack

    cfgs, names = _configs(small_cifar_npz, teacher_resnet56, tmp_path, RUNS[:1] * 2)
    with pytest.raises(ConfigError, match="same run folder"):
        train_pack(cfgs, names, torch.device("cpu"))


def test_feature_distiller_trains_in_a_pack_as_alone(tmp_path, small_cifar_npz, teacher_resnet56):
    """OFD reads the teacher's features and calls its own methods: packed with KD it equals its solo run."""
    from normkd_plugin.config import load_config, run_name
    from normkd_plugin.train import train_pack

    def configs(prefix, types):
        out = []
        for kind in types:
            opts = fast_opts(small_cifar_npz, teacher_resnet56, prefix, 0, "DISTILLER.TYPE", kind, "SOLVER.EPOCHS", "1")
            cfg = load_config("cifar100/kd/res56_res20", [*opts, "SOLVER.LR_DECAY_STAGES", "[]"])
            out.append((cfg, run_name(cfg, [*opts, "SOLVER.LR_DECAY_STAGES", "[]"])))
        return out

    packed = configs(tmp_path / "pack", ["KD", "OFD"])
    train_pack([c for c, _ in packed], [n for _, n in packed], torch.device("cpu"))
    (solo,) = configs(tmp_path / "solo", ["OFD"])
    train_pack([solo[0]], [solo[1]], torch.device("cpu"))
    assert_same_run(tmp_path / "pack" / packed[1][1], tmp_path / "solo" / solo[1])


def test_vanilla_pack_of_different_architectures(tmp_path, small_cifar_npz, teacher_resnet56):
    from normkd_plugin.config import load_config, run_name
    from normkd_plugin.train import train_pack

    cfgs, names = [], []
    for student, seed in (("resnet8", 0), ("resnet20", 0), ("wrn_16_2", 2)):
        opts = fast_opts(
            small_cifar_npz, teacher_resnet56, tmp_path, seed, "DISTILLER.TYPE", "NONE", "DISTILLER.STUDENT", student
        )
        cfg = load_config("cifar100/kd/res56_res20", opts)
        cfgs.append(cfg)
        names.append(run_name(cfg, opts))
    runs = train_pack(cfgs, names, torch.device("cpu"))
    assert [r.status for r in runs] == ["finished"] * 3
    for name in names:
        text = (tmp_path / name / "worklog.txt").read_text()
        assert text.count("epoch: ") == 2 and "best_acc\t" in text


def test_interrupted_pack_resumes_every_run_exactly(tmp_path, small_cifar_npz, teacher_resnet56, pack_and_solos):
    whole, _ = pack_and_solos  # the uninterrupted pack
    with pytest.raises(KeyboardInterrupt):
        _train(small_cifar_npz, teacher_resnet56, tmp_path / "cut", hooks=[interrupted_at(2)])
    cut = _train(small_cifar_npz, teacher_resnet56, tmp_path / "cut", resume=True)
    for a, b in zip(whole, cut):
        assert_same_run(a, b)


def test_a_run_that_turns_nan_fails_alone(tmp_path, small_cifar_npz, teacher_resnet56, pack_and_solos):
    """The poisoned run stops at epoch 2 step 1, keeps its epoch-1 checkpoint; the others equal their solo runs."""
    from normkd_plugin.errors import RunsFailed

    with pytest.raises(RunsFailed, match=r"epoch 2 step 1 of 4: non-finite training loss.*1 of 3 runs failed"):
        _train(small_cifar_npz, teacher_resnet56, tmp_path / "pack", hooks=[nan_weights_at(2, "KD")])
    folders = [tmp_path / "pack" / n for n in _configs(small_cifar_npz, teacher_resnet56, tmp_path / "pack")[1]]
    kd = folders[1]
    text = (kd / "worklog.txt").read_text()
    assert text.count("epoch: ") == 1 and "best_acc" not in text
    assert text.splitlines()[-1].startswith("failed\tepoch 2 step 1 of 4: non-finite training loss")
    assert load_state(kd)["epoch"] == 1 and all(torch.isfinite(v).all() for v in load_state(kd)["model"].values())
    for folder, solo in zip(folders, pack_and_solos[1]):
        if folder == kd:
            continue
        assert solo.name == folder.name
        assert_same_run(folder, solo)


def test_the_graph_is_keyed_on_learning_rates_warm_up_factors_and_runs(
    tmp_path, small_cifar_npz, teacher_resnet56, monkeypatch
):
    """The keys a real pack gives its graph over 4 epochs (DKD and NormDKD warm up over 2, the LR decays after 3):
    a new key at the warm-up's second epoch and at the decay, the same one in between."""
    from normkd_plugin.engine.graph import StepGraph

    real, keys = StepGraph.run, []

    def run(self, eager_step, batch, full, epoch, key):
        keys.append(key)
        return real(self, eager_step, batch, full, epoch, key)

    monkeypatch.setattr(StepGraph, "run", run)
    runs = (("cifar100/kd/res56_res20", 0), ("cifar100/dkd/res56_res20", 0), ("cifar100/normdkd/res56_res20", 1))
    extra = ("SOLVER.EPOCHS", "4", "SOLVER.LR_DECAY_STAGES", "[3]", "SOLVER.FAST.ITERS_PER_EPOCH", "1")
    _train(small_cifar_npz, teacher_resnet56, tmp_path, runs, (*extra, "DKD.WARMUP", "2", "NORMDKD.WARMUP", "2"))
    assert len(keys) == 4
    assert keys[0] != keys[1] and keys[1] == keys[2] and keys[2] != keys[3]
    kd = [key[0] for key in keys]  # KD reads no epoch: its part changes at the decay only
    assert kd[0] == kd[1] == kd[2] != kd[3]
    assert [key[1][2] for key in keys] == [0.5, 1.0, 1.0, 1.0]  # DKD's warm-up factor
    assert [key[2][1] for key in keys] == [(0.05,), (0.05,), (0.05,), (pytest.approx(0.005),)]


@pytest.mark.parametrize("method", ["vanilla", "kd", "dkd", "normkd", "normdkd", "kd_ls", "dkd_ls"])
def test_graph_key_reads_of_the_epoch_what_the_distillers_loss_reads(method, cifar_batch):
    """Each logit distiller a pack trains (fused or not) is known to the key: its loss at epochs 1, 2, 3 is the
    loss after any warm-up times the key's warm-up factor (none: the very same loss), bit for bit."""
    from types import SimpleNamespace

    from mdistiller.models.cifar import resnet8

    from normkd_plugin.build import build_distiller
    from normkd_plugin.config import load_config
    from normkd_plugin.engine.step import graph_key

    cfg = load_config(
        f"cifar100/{method}/res56_res20", ["DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER", "resnet8"]
    )
    torch.manual_seed(0)
    teacher = None if cfg.DISTILLER.TYPE == "NONE" else resnet8(num_classes=100)
    distiller = build_distiller(cfg, resnet8(num_classes=100), teacher, 0).eval()
    run = SimpleNamespace(cfg=cfg, distiller=distiller, optimizer=torch.optim.SGD(distiller.parameters(), lr=0.05))
    x, y = cifar_batch

    def distillation_loss(epoch):
        with torch.no_grad():
            _, terms = distiller.forward_train(image=x, target=y, epoch=epoch)
        return sum((v for k, v in terms.items() if k != "loss_ce"), torch.zeros(()))

    after = distillation_loss(10**6)  # far past any warm-up
    for epoch in (1, 2, 3):
        factor = graph_key([run], epoch)[0][2]
        assert factor is None or isinstance(factor, float), f"{cfg.DISTILLER.TYPE}: captured again every epoch"
        assert torch.equal(distillation_loss(epoch), after if factor is None else factor * after), epoch


def test_graph_key_of_an_unknown_distiller_is_its_epoch_and_a_new_set_of_runs_is_a_new_key():
    from types import SimpleNamespace

    from normkd_plugin.engine.step import graph_key

    def run(kind):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
        return SimpleNamespace(cfg=SimpleNamespace(DISTILLER=SimpleNamespace(TYPE=kind)), optimizer=opt)

    kd, other = run("KD"), run("SOMETHING_NEW")
    assert graph_key([kd], 1) == graph_key([kd], 100)
    assert graph_key([kd, other], 1) != graph_key([kd, other], 2)  # it might read the epoch: captured again
    assert graph_key([kd], 1) != graph_key([kd, other], 1) != graph_key([run("KD"), other], 1)


@needs_cuda
@pytest.mark.parametrize("branches", [False, True])
def test_packed_graph_equals_solo_eager_runs_on_cuda(tmp_path, small_cifar_npz, teacher_resnet56, branches, caplog):
    """Deterministic kernels: the packed CUDA-graph runs against solo eager runs, within float32 rounding."""
    import logging

    from normkd_plugin.config import load_config, run_name
    from normkd_plugin.train import train_pack

    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        dev = torch.device("cuda")
        cfgs, names = _configs(
            small_cifar_npz,
            teacher_resnet56,
            tmp_path / "pack",
            extra=("SOLVER.FAST.PACK_BRANCHES", str(branches), "SOLVER.FAST.FUSE", "off"),  # fused: test_layout.py
        )
        with caplog.at_level(logging.WARNING):
            train_pack(cfgs, names, dev)
        assert "capture failed" not in caplog.text  # else both sides would be eager
        for (name, seed), folder in zip(RUNS, names):
            opts = fast_opts(
                small_cifar_npz, teacher_resnet56, tmp_path / "solo", seed, "SOLVER.FAST.CUDA_GRAPH", "False"
            )
            cfg = load_config(name, opts)
            train_pack([cfg], [run_name(cfg, opts)], dev)
            a, b = load_state(tmp_path / "pack" / folder), load_state(tmp_path / "solo" / run_name(cfg, opts))
            assert a["model"].keys() == b["model"].keys() and a["epoch"] == b["epoch"] == 2
            for key in a["model"]:
                x, y = a["model"][key].double(), b["model"][key].double()
                assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), key
            moms = [[s["momentum_buffer"].double() for s in st["optimizer"]["state"].values()] for st in (a, b)]
            assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(*moms)) and moms[0]
            assert all(math.isclose(a["record"][k], b["record"][k], rel_tol=1e-4) for k in b["record"])
    finally:
        torch.use_deterministic_algorithms(False)


def test_resumed_pack_restarts_a_run_that_failed_before_its_first_checkpoint(
    tmp_path, small_cifar_npz, teacher_resnet56
):
    """KD turns NaN in epoch 1 (no checkpoint), the pack is interrupted at epoch 3; --resume restarts KD from
    scratch, lets it catch up alone, and it ends bitwise equal to a solo KD run; NormKD resumes."""
    runs = RUNS[:2]
    extra = ("SOLVER.EPOCHS", "3", "SOLVER.LR_DECAY_STAGES", "[2]")
    with pytest.raises(KeyboardInterrupt):
        hooks = [nan_weights_at(1, "KD"), interrupted_at(3)]
        _train(small_cifar_npz, teacher_resnet56, tmp_path / "pack", runs, extra, hooks=hooks)
    normkd, kd = [
        tmp_path / "pack" / n for n in _configs(small_cifar_npz, teacher_resnet56, tmp_path / "pack", runs, extra)[1]
    ]
    assert (kd / "worklog.txt").read_text().startswith("failed\tepoch 1 step 1 of 4")
    assert not (kd / "latest").exists() and load_state(normkd)["epoch"] == 2
    _train(small_cifar_npz, teacher_resnet56, tmp_path / "pack", runs, extra, resume=True)
    (solo,) = _train(small_cifar_npz, teacher_resnet56, tmp_path / "solo", runs[1:], extra)
    assert_same_run(kd, solo)
    assert (normkd / "worklog.txt").read_text().count("epoch: ") == 3


def test_a_distillers_own_modules_start_as_on_the_base_path(tmp_path, small_cifar_npz, teacher_resnet56):
    """FitNet's connector (and the student) in a pack equal what normkd-train's path for the host's trainers
    (seed, student, teacher, distiller) initialises."""
    from normkd_plugin.build import build_distiller, build_models, build_pack
    from normkd_plugin.config import load_config, run_name
    from normkd_plugin.data import seed_run
    from normkd_plugin.run_folder import RunFolder

    opts = fast_opts(small_cifar_npz, teacher_resnet56, tmp_path, 3, "DISTILLER.TYPE", "FITNET")
    cfg = load_config("cifar100/kd/res56_res20", opts)
    pack = build_pack([cfg], [run_name(cfg, opts)], [RunFolder(tmp_path / "r")], torch.device("cpu"))
    packed = {k: v for k, v in pack.runs[0].distiller.state_dict().items() if not k.startswith("teacher.")}
    seed_run(cfg, torch.device("cpu"))
    student, teacher = build_models(cfg, 100)
    host = {
        k: v for k, v in build_distiller(cfg, student, teacher, SMALL_TRAIN).state_dict().items() if "teacher" not in k
    }
    assert any(k.startswith("conv_reg") for k in host) and packed.keys() == host.keys()
    for key in host:
        assert torch.equal(packed[key], host[key]), key


def test_a_pack_resumed_with_another_teacher_drops_its_distilled_runs_and_hashes_each_file_once(
    tmp_path, small_cifar_npz, teacher_resnet56, monkeypatch
):
    """KD and NormKD share the teacher, the vanilla run has none: after a stop at epoch 2, a resume with another
    teacher file refuses both distilled runs and finishes the vanilla one; the pack reads each input file once."""
    from normkd_plugin import provenance
    from normkd_plugin.errors import RunsFailed

    runs = (("cifar100/kd/res56_res20", 0), ("cifar100/normkd/res56_res20", 0), ("cifar100/vanilla/res56_res20", 0))
    extra = ("SOLVER.FAST.ITERS_PER_EPOCH", "1")
    with pytest.raises(KeyboardInterrupt):
        _train(small_cifar_npz, teacher_resnet56, tmp_path / "pack", runs, extra, hooks=[interrupted_at(2)])
    weights = torch.load(teacher_resnet56, map_location="cpu", weights_only=True)
    weights["fc.bias"] = weights["fc.bias"] + 0.5
    other = tmp_path / "other.pt"
    torch.save(weights, other)
    opened = []
    monkeypatch.setattr(provenance, "_DIGESTS", {})  # as in a new process
    monkeypatch.setattr(provenance, "open", lambda path, mode: (opened.append(str(path)), open(path, mode))[1], False)
    with pytest.raises(RunsFailed, match=r"was trained with another teacher than this command's .*2 of 3 runs failed"):
        _train(small_cifar_npz, other, tmp_path / "pack", runs, extra, resume=True)
    files = [other, small_cifar_npz / "train-0-of-1.npz", small_cifar_npz / "test-0-of-1.npz"]
    assert sorted(opened) == sorted(map(str, files))  # each once for the 3 runs
    kd, normkd, vanilla = (tmp_path / "pack" / n for n in _configs(small_cifar_npz, other, tmp_path, runs, extra)[1])
    assert vanilla.name.startswith("vanilla") and "best_acc\t" in (vanilla / "worklog.txt").read_text()
    for folder in (kd, normkd):
        assert load_state(folder)["epoch"] == 1 and "best_acc" not in (folder / "worklog.txt").read_text()
