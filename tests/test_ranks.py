"""distributed.py's Ranks: a pack on two processes (gloo, CPU) trains what one process trains on per-rank half batches;
on three, each step's gradient is the global batch mean's, however unevenly the batch splits."""

from __future__ import annotations

import pytest
import torch

from conftest import (
    SMALL_BATCH,
    SMALL_TRAIN,
    SMALL_VAL,
    fast_opts,
    interrupted_at,
    load_state,
    needs_mdistiller,
    spawn_and_wait,
    train_built_pack,
)

pytestmark = needs_mdistiller
CFG = "cifar100/normkd/res56_res20"


def _cfg(root, teacher, prefix, epochs=1, name=CFG, seed=0, extra=()):
    from normkd_plugin.config import load_config, run_name

    opts = fast_opts(root, teacher, prefix, seed, "SOLVER.EPOCHS", str(epochs), "SOLVER.LR_DECAY_STAGES", "[]", *extra)
    cfg = load_config(name, opts)
    return cfg, run_name(cfg, opts)


def _worker(
    rank, world, root, teacher, prefix, out, epochs, stop_at, fail_rank, names=(CFG,), seed=0, extra=(), slow=0.0
):
    """One torchrun-like process: init gloo, build and train the pack, record what it saw and wrote.

    ``stop_at``: a KeyboardInterrupt as that epoch starts; ``fail_rank``: that rank raises as its first epoch starts;
    ``slow``: rank 0 waits this many seconds before it writes a run's end (the other ranks are ahead)."""
    import time

    import torch.distributed as dist

    from normkd_plugin import run_folder
    from normkd_plugin.build import build_pack
    from normkd_plugin.engine.fit import Hook
    from normkd_plugin.engine.source import DeviceSplit, Epoch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    seen, writes, steps = [], [], []
    real_epoch = DeviceSplit.epoch

    def epoch_batches(self, seeds, epoch, iters):  # each step's targets (of its first seed group) as it takes them
        batches = real_epoch(self, seeds, epoch, iters)

        def batch(k):
            images, targets, share = batches.batch(k)
            seen.append(targets[0].tolist())
            return images, targets, share

        return Epoch(batches.steps, batches.full_steps, batch)

    class Harness(Hook):
        """A failing rank; and in a solo run, each step's starting state and reduced gradient."""

        def before_fit(self, pack):
            self.runs, self.before = pack.runs, None

        def before_epoch(self, epoch, runs_):
            if rank == fail_rank:
                raise ValueError(f"rank {rank} broke")

        def before_step(self, epoch, step):  # the previous step is done, this one not begun
            self.step_done()
            if len(self.runs) == 1:
                self.before = {k: v.clone() for k, v in self.runs[0].distiller.student.state_dict().items()}

        def after_epoch(self, epoch, results):
            self.step_done()

        def step_done(self):
            if self.before is not None:
                student = self.runs[0].distiller.student
                steps.append((self.before, {k: p.grad.clone() for k, p in student.named_parameters()}))
                self.before = None

    DeviceSplit.epoch = epoch_batches
    if rank == 0 and slow:
        real_finish = run_folder.RunFolder.finish
        run_folder.RunFolder.finish = lambda self, best: (time.sleep(slow), real_finish(self, best))
    for name in ("write_bytes", "append", "write_text"):
        real = getattr(run_folder.RunFolder, name)
        setattr(
            run_folder.RunFolder, name, lambda self, *a, _real=real, _name=name: (writes.append(_name), _real(self, *a))
        )
    try:
        cfgs, run_names = zip(*(_cfg(root, teacher, prefix, epochs, n, seed, extra) for n in names))
        folders = [run_folder.RunFolder(prefix / n) for n in run_names]
        pack = build_pack(list(cfgs), list(run_names), folders, torch.device("cpu"))
        try:
            resume = (prefix / run_names[0] / "latest").exists()
            train_built_pack(pack, resume=resume, hooks=[interrupted_at(stop_at), Harness()])
        except KeyboardInterrupt:
            pass
        student = {k: v.clone() for k, v in pack.runs[0].distiller.student.state_dict().items()}
        torch.save({"seen": seen, "writes": writes, "student": student, "writer": pack.runs[0].writer is not None,
                    "seed": pack.runs[0].seed, "steps": steps}, out / f"rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def _spawn(
    tmp_path,
    root,
    teacher,
    prefix,
    world=2,
    epochs=1,
    stop_at=0,
    fail_rank=-1,
    names=(CFG,),
    seed=0,
    extra=(),
    slow=0.0,
):
    """Start ``world`` processes of _worker and wait (at most 5 minutes: a hang fails the test)."""
    out = tmp_path / f"out-{world}-{epochs}-{stop_at}-{len(list(tmp_path.glob('out-*')))}"
    out.mkdir()
    spawn_and_wait(
        _worker, (world, root, teacher, prefix, out, epochs, stop_at, fail_rank, names, seed, extra, slow), world
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _reference(root, teacher, cfg):
    """Written here, independently: each global batch split in two halves (per-half BatchNorm), gradients of
    the half means weighted by the halves' shares and summed; running statistics from the first half only."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same float32 rounding
    try:
        return _reference_steps(root, teacher, cfg)
    finally:
        torch.set_num_threads(threads)


def _reference_steps(root, teacher, cfg):
    from mdistiller.dataset.cifar100 import get_cifar100_train_transform
    from mdistiller.models import cifar_model_dict

    from normkd_plugin.data import load_cifar100, seed_everything
    from normkd_plugin.distillers import NormKD
    from normkd_plugin.engine.augment import TensorCifar, host_pipeline

    net = cifar_model_dict["resnet56"][0](num_classes=100)
    net.load_state_dict(torch.load(teacher, weights_only=True))
    seed_everything(0)
    student = cifar_model_dict["resnet20"][0](num_classes=100)
    distiller = NormKD(student, net, cfg)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    data = TensorCifar(*load_cifar100(root, True), host_pipeline(get_cifar100_train_transform()), torch.device("cpu"))
    images, targets = data.epoch(torch.Generator().manual_seed(0))
    x, batches = data.normalize(images), []
    distiller.train()
    for i in range(0, SMALL_TRAIN, SMALL_BATCH):
        j = min(i + SMALL_BATCH, SMALL_TRAIN)
        halves = [(i, i + (j - i) // 2), (i + (j - i) // 2, j)]
        batches.append([targets[a:b].tolist() for a, b in halves])
        opt.zero_grad()
        for h, (a, b) in enumerate(halves):
            kept = {k: v.clone() for k, v in student.state_dict().items() if "running" in k or "num_batches" in k}
            _, losses = distiller(image=x[a:b], target=targets[a:b], epoch=1)
            (sum(v.mean() for v in losses.values()) * ((b - a) / (j - i))).backward()
            if h == 1:  # the second half's running statistics are not kept
                student.load_state_dict(kept, strict=False)
        opt.step()
    return student, batches


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, small_cifar_npz, teacher_resnet56):
    """One epoch of CFG (seed 0) on two harness processes: what each rank saw and wrote, and the runs' prefix.
    The tests only read them."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    return _spawn(tmp, small_cifar_npz, teacher_resnet56, tmp / "o"), tmp / "o"


def test_two_ranks_equal_the_half_batch_reference(small_cifar_npz, teacher_resnet56, two_ranks):
    ranks, prefix = two_ranks
    cfg, name = _cfg(small_cifar_npz, teacher_resnet56, prefix)
    student, batches = _reference(small_cifar_npz, teacher_resnet56, cfg)
    want = student.state_dict()
    for key in want:
        assert torch.equal(ranks[0]["student"][key], ranks[1]["student"][key]), key  # every rank the same
        a, b = ranks[0]["student"][key].double(), want[key].double()
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (key, (a - b).abs().max().item())
    # each sample once per epoch across the ranks: rank r trained half r of every global batch
    assert [[ranks[0]["seen"][s], ranks[1]["seen"][s]] for s in range(4)] == batches
    assert [len(s) for s in ranks[1]["seen"]] == [8, 8, 8, 4]
    # only rank 0 writes
    assert ranks[0]["writes"] and not ranks[1]["writes"] and ranks[0]["writer"] and not ranks[1]["writer"]
    # the all-reduced validation accuracy is the accuracy on the whole split
    record = load_state(prefix / name)["record"]
    correct, n = _count_correct(student, small_cifar_npz)
    assert record["test_acc"] == pytest.approx(100.0 * correct / n, abs=1e-9) and n == SMALL_VAL


def _global_batches(root, epoch):
    """Written here, independently: the targets of each global batch of SMALL_BATCH in ``epoch`` of an uninterrupted seed-0
    run (one generator, seeded with the run's seed, draws epoch after epoch; the world size does not enter)."""
    from mdistiller.dataset.cifar100 import get_cifar100_train_transform

    from normkd_plugin.data import load_cifar100
    from normkd_plugin.engine.augment import TensorCifar, host_pipeline

    data = TensorCifar(*load_cifar100(root, True), host_pipeline(get_cifar100_train_transform()), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    for _ in range(epoch):
        _, targets = data.epoch(generator)
    return [targets[i : i + SMALL_BATCH].tolist() for i in range(0, len(targets), SMALL_BATCH)]


def _step_gradients(root, teacher, cfg, states, world, weighting):
    """Written here, independently: from each recorded state, the gradient of the global batch mean with the batch
    split in ``world`` contiguous parts (per-part BatchNorm): each part's mean loss weighted by its share of the
    batch (``weighting`` "share"), or each by 1/world ("equal": the mean of the parts' means)."""
    from mdistiller.dataset.cifar100 import get_cifar100_train_transform
    from mdistiller.models import cifar_model_dict

    from normkd_plugin.data import load_cifar100
    from normkd_plugin.distillers import NormKD
    from normkd_plugin.engine.augment import TensorCifar, host_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same float32 rounding
    try:
        net = cifar_model_dict["resnet56"][0](num_classes=100)
        net.load_state_dict(torch.load(teacher, weights_only=True))
        student = cifar_model_dict["resnet20"][0](num_classes=100)
        distiller = NormKD(student, net, cfg)
        distiller.train()
        pipeline = host_pipeline(get_cifar100_train_transform())
        data = TensorCifar(*load_cifar100(root, True), pipeline, torch.device("cpu"))
        images, targets = data.epoch(torch.Generator().manual_seed(0))  # the run's seed: its epoch 1
        x, grads = data.normalize(images), []
        for i, state in zip(range(0, SMALL_TRAIN, SMALL_BATCH), states):
            j = min(i + SMALL_BATCH, SMALL_TRAIN)
            student.load_state_dict(state)
            student.zero_grad(set_to_none=True)
            cuts = [i + (j - i) * r // world for r in range(world + 1)]
            for a, b in zip(cuts[:-1], cuts[1:]):
                _, losses = distiller(image=x[a:b], target=targets[a:b], epoch=1)
                weight = (b - a) / (j - i) if weighting == "share" else 1.0 / world
                (sum(v.mean() for v in losses.values()) * weight).backward()
            grads.append({k: p.grad.clone() for k, p in student.named_parameters()})
        return grads
    finally:
        torch.set_num_threads(threads)


def test_three_ranks_weight_uneven_shares_by_their_size(tmp_path, small_cifar_npz, teacher_resnet56):
    """3 processes, batches of 16 then 8: shares of 5/5/6 and 2/3/3 images. Each step's summed gradient is the
    gradient of the global batch mean (each share weighted by its size), not the mean of the shares' means.

    Gradients are compared step by step from the state each step started in: this training amplifies rounding
    (a 2**-22 relative change of one step's gradient moves conv1 by ~1e-2 three steps later), so only two ranks,
    whose halves sum exactly, can be compared over a whole epoch. Under torchrun, dist.check_world refuses a
    SOLVER.BATCH_SIZE the world size does not divide, so there only an epoch's last batch splits unevenly; this
    harness drives the pack directly, so all four steps do here. (The ``ddp`` trainer never splits unevenly: its
    DistributedSampler pads the epoch to a multiple of the world size and every rank takes BATCH_SIZE / world.)
    """
    ranks = _spawn(tmp_path, small_cifar_npz, teacher_resnet56, tmp_path / "o", world=3)
    cfg, _ = _cfg(small_cifar_npz, teacher_resnet56, tmp_path / "o")
    assert [[len(t) for t in r["seen"]] for r in ranks] == [[5, 5, 5, 2], [5, 5, 5, 3], [6, 6, 6, 3]]
    states, reduced = zip(*ranks[0]["steps"])
    for r in ranks[1:]:  # every rank started each step alike and stepped with the same gradient
        for (state, grad), (state0, grad0) in zip(r["steps"], ranks[0]["steps"]):
            assert all(torch.equal(v, state0[k]) for k, v in state.items())
            assert all(torch.equal(v, grad0[k]) for k, v in grad.items())
    want = _step_gradients(small_cifar_npz, teacher_resnet56, cfg, states, 3, "share")
    equal = _step_gradients(small_cifar_npz, teacher_resnet56, cfg, states, 3, "equal")
    assert len(reduced) == len(want) == 4
    for step, (got, share, mean_of_means) in enumerate(zip(reduced, want, equal), 1):
        assert got.keys() == share.keys()
        for key in share:  # rounding: ~1e-5 at most; this training's gradients are ill-conditioned
            assert _relative_gap(got[key], share[key]) < 1e-4, (step, key, _relative_gap(got[key], share[key]))
        # the check tells the weightings apart: equal weighting is ~2e-2 to 8e-2 away
        flat = [torch.cat([g[k].reshape(-1) for k in share]) for g in (got, mean_of_means)]
        assert _relative_gap(*flat) > 1e-3, step


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _count_correct(student, root):
    from mdistiller.dataset.cifar100 import get_cifar100_test_transform
    from PIL import Image

    from normkd_plugin.data import load_cifar100

    images, labels = load_cifar100(root, False)
    tf = get_cifar100_test_transform()
    student.eval()
    with torch.no_grad():
        logits = student(torch.stack([tf(Image.fromarray(im)) for im in images]))[0]
    return int((logits.argmax(1) == torch.as_tensor(labels)).sum()), len(labels)


@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)])
def test_resume_with_another_number_of_ranks(tmp_path, small_cifar_npz, teacher_resnet56, first, then):
    """Epoch 1 on ``first`` processes, epoch 2 resumed on ``then``: epoch 2 trains the global batches the
    uninterrupted run trains (the data generator is restored), and the run finishes."""
    prefix = tmp_path / "o"
    first_epoch = _spawn(tmp_path, small_cifar_npz, teacher_resnet56, prefix, world=first, epochs=2, stop_at=2)
    cfg, name = _cfg(small_cifar_npz, teacher_resnet56, prefix, epochs=2)
    assert load_state(prefix / name)["epoch"] == 1
    resumed = _spawn(tmp_path, small_cifar_npz, teacher_resnet56, prefix, world=then, epochs=2)
    epoch1, epoch2 = (_global_batches(small_cifar_npz, e) for e in (1, 2))  # 4 steps an epoch
    assert [sum((r["seen"][s] for r in first_epoch), []) for s in range(4)] == epoch1
    assert [sum((r["seen"][s] for r in resumed), []) for s in range(4)] == epoch2 != epoch1
    text = (prefix / name / "worklog.txt").read_text()
    assert text.count("epoch: ") == 2 and text.rstrip().splitlines()[-1].startswith("best_acc\t")
    assert load_state(prefix / name)["epoch"] == 2


def test_a_rank_that_raises_ends_the_job_with_its_error(tmp_path, small_cifar_npz, teacher_resnet56):
    from torch.multiprocessing import ProcessRaisedException

    with pytest.raises(ProcessRaisedException, match="rank 1 broke"):
        _spawn(tmp_path, small_cifar_npz, teacher_resnet56, tmp_path / "o", fail_rank=1)
    (folder,) = list((tmp_path / "o" / "cifar100").iterdir())
    assert not (folder / "latest").exists() and not (folder / "worklog.txt").exists()


def test_torchrun_trains_a_pack_like_the_two_process_harness(tmp_path, small_cifar_npz, teacher_resnet56, two_ranks):
    """normkd-train under torchrun (gloo): a pack of KD and NormKD; its NormKD run equals the harness's solo run."""
    import os
    import subprocess
    import sys

    opts = fast_opts(small_cifar_npz, teacher_resnet56, tmp_path / "torchrun", 0, "SOLVER.EPOCHS", "1")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "normkd_plugin.train", "--device", "cpu", "--cfg", "cifar100/kd/res56_res20", "--cfg", CFG,
            *opts, "SOLVER.LR_DECAY_STAGES", "[]"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks, _ = two_ranks  # the harness's solo run
    _, name = _cfg(small_cifar_npz, teacher_resnet56, tmp_path / "torchrun")
    state = load_state(tmp_path / "torchrun" / name)["model"]
    for key, value in ranks[0]["student"].items():
        assert torch.equal(state[f"module.student.{key}"], value), key
    runs = sorted(p.name for p in (tmp_path / "torchrun" / "cifar100").iterdir())
    assert len(runs) == 2 and all((tmp_path / "torchrun" / "cifar100" / r / "worklog.txt").is_file() for r in runs)


def test_a_run_that_refuses_to_resume_fails_alone_on_every_rank(tmp_path, small_cifar_npz, teacher_resnet56):
    """A pack of KD and NormKD on 2 ranks, stopped after epoch 1; KD's config.yaml then says another LR. The
    resume must not hang: KD fails on both ranks, NormKD finishes. Rank 0 is made slow to write NormKD's end: a
    rank that raised while rank 0 still wrote would have torchrun (here: the spawner) stop rank 0 mid-write."""
    from torch.multiprocessing import ProcessRaisedException

    names, prefix = ("cifar100/kd/res56_res20", CFG), tmp_path / "o"
    _spawn(tmp_path, small_cifar_npz, teacher_resnet56, prefix, epochs=2, stop_at=2, names=names)
    (kd_name, nk_name) = (_cfg(small_cifar_npz, teacher_resnet56, prefix, 2, n)[1] for n in names)
    config = prefix / kd_name / "config.yaml"
    config.write_text(config.read_text().replace("LR: 0.05", "LR: 0.1"))
    with pytest.raises(ProcessRaisedException, match="started with another config"):
        _spawn(tmp_path, small_cifar_npz, teacher_resnet56, prefix, epochs=2, names=names, slow=3.0)
    assert (prefix / nk_name / "worklog.txt").read_text().rstrip().splitlines()[-1].startswith("best_acc\t")
    assert load_state(prefix / kd_name)["epoch"] == 1


def test_unseeded_runs_take_rank_0s_seed_and_initialisation(tmp_path, small_cifar_npz, teacher_resnet56):
    """EXPERIMENT.SEED -1: each process draws its own seed and initialisation; rank 0's must win on both."""
    ranks = _spawn(tmp_path, small_cifar_npz, teacher_resnet56, tmp_path / "o", seed=-1)
    assert ranks[0]["seed"] == ranks[1]["seed"]
    assert all(torch.equal(v, ranks[1]["student"][k]) for k, v in ranks[0]["student"].items())


def test_two_ranks_train_a_fused_pack_as_the_unfused_pack(tmp_path, small_cifar_npz, teacher_resnet56):
    """NormKD and KD fused (SOLVER.FAST.FUSE on) on two processes against the same two-process pack unfused."""
    from test_layout import SMALL, assert_close_runs

    names = (CFG, "cifar100/kd/res56_res20")
    for fuse in ("on", "off"):
        extra = (*SMALL, "SOLVER.FAST.FUSE", fuse)
        ranks = _spawn(tmp_path, small_cifar_npz, teacher_resnet56, tmp_path / fuse, epochs=2, names=names, extra=extra)
        assert all(torch.equal(v, ranks[1]["student"][k]) for k, v in ranks[0]["student"].items())  # ranks agree
    for name in names:
        _, folder = _cfg(small_cifar_npz, teacher_resnet56, tmp_path, 2, name, 0, (*SMALL, "SOLVER.FAST.FUSE", "on"))
        assert_close_runs(tmp_path / "on" / folder, tmp_path / "off" / folder)


def test_a_resume_with_another_teacher_is_refused_on_every_rank(tmp_path, small_cifar_npz, teacher_resnet56):
    """Rank 0 compares the teacher file's SHA-256 with the state's record; every rank raises its refusal."""
    from torch.multiprocessing import ProcessRaisedException

    prefix = tmp_path / "o"
    _spawn(tmp_path, small_cifar_npz, teacher_resnet56, prefix, epochs=2, stop_at=2)
    weights = torch.load(teacher_resnet56, map_location="cpu", weights_only=True)
    weights["fc.bias"] = weights["fc.bias"] + 0.5
    torch.save(weights, tmp_path / "other.pt")
    with pytest.raises(ProcessRaisedException, match=r"latest was trained with another teacher than this command's"):
        _spawn(tmp_path, small_cifar_npz, tmp_path / "other.pt", prefix, epochs=2)
    assert load_state(prefix / _cfg(small_cifar_npz, teacher_resnet56, prefix, 2)[1])["epoch"] == 1
