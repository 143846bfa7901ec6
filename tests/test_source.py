"""The engine fed by a loader (``engine/source.py``): ImageNet-format packs of real JPEGs on the CPU.

A packed run is the same run as alone, bitwise on a CPU: runs that share a seed share every
decoded, augmented batch and one teacher forward; runs with their own seeds draw their own order
and augmentation. The same holds under 2 gloo processes, and a killed pack resumes bitwise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_same_run, needs_mdistiller

pytestmark = needs_mdistiller

PAIR = "imagenet/r34_r18"


# -- the batch sampler against DistributedSampler + DataLoader ------------------------------------
@pytest.mark.parametrize("n, world, per_rank", [(10, 1, 4), (11, 2, 3), (7, 3, 2)])
def test_seed_group_batches_are_each_groups_distributed_sampler_batches(n, world, per_rank):
    from torch.utils.data import DataLoader, DistributedSampler

    from normkd_plugin.engine.source import SeedGroupBatches

    for rank in range(world):
        batches = SeedGroupBatches(n, per_rank, rank, world)
        batches.set([5, 9], epoch=3)
        host = []
        for seed in (5, 9):
            sampler = DistributedSampler(range(n), world, rank, shuffle=True, seed=seed)
            sampler.set_epoch(3)
            host.append([b.tolist() for b in DataLoader(range(n), batch_size=per_rank, sampler=sampler)])
        got = list(batches)
        assert len(got) == len(batches) == len(host[0])
        for k, keys in enumerate(got):  # group 5's share of global batch k, then group 9's
            want = [(i, 5, 3) for i in host[0][k]] + [(i, 9, 3) for i in host[1][k]]
            assert keys == want
        assert batches.last_size() == len(host[0][-1])
        batches.set([5], epoch=3, limit=1)
        assert [[i for i, _, _ in keys] for keys in batches] == host[0][:1]


def test_packs_refuse_what_their_source_cannot_feed(monkeypatch):
    from normkd_plugin.config import ConfigError, load_config
    from normkd_plugin.engine.checks import check_pack

    monkeypatch.setenv("WORLD_SIZE", "1")
    kd = f"{PAIR}/kd"
    with pytest.raises(
        ConfigError, match="SOLVER.TRAINER fast holds CIFAR splits on the device; DATASET.TYPE 'imagenet'"
    ):
        check_pack([load_config(kd, ["SOLVER.TRAINER", "fast"])], ["a"])
    with pytest.raises(ConfigError, match=r"pack: b has SOLVER.TRAINER 'base', mdistiller's own trainer"):
        check_pack([load_config(kd, ["SOLVER.TRAINER", "ddp"]), load_config(kd, [])], ["a", "b"])
    ddp = [load_config(kd, ["SOLVER.TRAINER", "ddp", "DATASET.DECODE", d]) for d in ("cpu", "host")]
    with pytest.raises(ConfigError, match="pack: DATASET.DECODE differs: 'cpu' in a but 'host' in b"):
        check_pack(ddp, ["a", "b"])
    with pytest.raises(ConfigError, match="DATASET.DECODE gpu decodes with nvJPEG on CUDA; --device is cpu"):
        check_pack([load_config(kd, ["SOLVER.TRAINER", "ddp", "DATASET.DECODE", "gpu"])], ["a"], torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun, base is this engine with a loader
    check_pack([load_config(kd, []), load_config(f"{PAIR}/normkd", [])], ["a", "b"])


# -- ImageNet-format packs ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory, cifar_test_arrays):
    """root/{train,val}/<class>/*.JPEG: real CIFAR-100 images upscaled to 64-120 px, 2 classes x 2 train, x 1 val."""
    from PIL import Image

    images, _ = cifar_test_arrays
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("loader_jpeg")
    k = 0
    for split, per_class in (("train", 2), ("val", 1)):
        for c in ("n01", "n02"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                w, h = (int(v) for v in rng.integers(64, 121, size=2))
                Image.fromarray(images[k]).resize((w, h), Image.BICUBIC).save(
                    root / split / c / f"{i}.JPEG", quality=90
                )
                k += 1
    return root


@pytest.fixture(scope="module")
def teacher_r34(tmp_path_factory):
    """A ResNet34 teacher checkpoint (mdistiller's architecture, seeded random weights: the test needs a fixed one)."""
    from mdistiller.models import imagenet_model_dict

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("r34") / "resnet34.pth"
    torch.save({"model": imagenet_model_dict["ResNet34"](pretrained=False).state_dict()}, path)
    return path


def _opts(root, teacher, prefix, decode: str, *extra) -> list[str]:
    return [
        "--device", "cpu", "SOLVER.TRAINER", "ddp", "DATASET.DECODE", decode, "DATASET.ROOT", str(root),
        "DATASET.NUM_WORKERS", "0", "DATASET.TEST.BATCH_SIZE", "2", "SOLVER.BATCH_SIZE", "2",
        "SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES", "[1]", "SOLVER.LR", "0.01",
        "DISTILLER.TEACHER_CKPT", str(teacher), "LOG.PREFIX", str(prefix), *extra,
    ]  # fmt: skip


def _cfgs(*methods: str) -> list[str]:
    return [x for m in methods for x in ("--cfg", f"{PAIR}/{m}")]


def _folders(prefix) -> dict[str, object]:
    """The run folders under ``prefix``, by run name."""
    return {p.name: p for p in (prefix / "imagenet").iterdir()}


def _train(argv: list[str], hooks=()) -> None:
    from normkd_plugin import train

    train.main(argv, hooks=hooks)


class _Count:
    """Calls of the shared teacher and images decoded, from now on."""

    def __init__(self, monkeypatch):
        import normkd_plugin.imagenet as imagenet
        from normkd_plugin.engine.teacher import SharedTeacher

        self.teacher: list[int] = []  # batches per teacher forward
        self.decoded = 0
        real_precompute, real_decode = SharedTeacher.precompute, imagenet.decode

        def precompute(teacher, batches):
            if batches:
                self.teacher.append(len(batches))
            return real_precompute(teacher, batches)

        def decode(data, *args, **kwargs):
            self.decoded += len(data)
            return real_decode(data, *args, **kwargs)

        monkeypatch.setattr(SharedTeacher, "precompute", precompute)
        monkeypatch.setattr(imagenet, "decode", decode)


@pytest.fixture(scope="module")
def kd_runs(jpeg_root, teacher_r34, tmp_path_factory):
    """KD and NormKD (seed 0, JPEGs decoded by the tensor pipeline): solo run folders, and the pack's."""
    solo, pack = tmp_path_factory.mktemp("solo"), tmp_path_factory.mktemp("pack")
    for method in ("kd", "normkd"):
        _train([*_cfgs(method), *_opts(jpeg_root, teacher_r34, solo, "cpu", "EXPERIMENT.SEED", "0")])
    with pytest.MonkeyPatch.context() as mp:
        count = _Count(mp)
        _train([*_cfgs("kd", "normkd"), *_opts(jpeg_root, teacher_r34, pack, "cpu", "EXPERIMENT.SEED", "0")])
    return _folders(solo), _folders(pack), count


def test_loader_pack_of_one_seed_equals_its_solo_runs_and_decodes_and_teaches_once(kd_runs):
    solo, pack, count = kd_runs
    assert sorted(solo) == sorted(pack) and len(pack) == 2
    for name in pack:
        assert_same_run(pack[name], solo[name])
    # 2 epochs x 2 steps: one teacher forward per step on the one seed group's batch, each image decoded once
    assert count.teacher == [1] * 4
    assert count.decoded == 2 * 4 + 2 * 2  # training images per epoch, plus the validation split each epoch


def test_loader_pack_of_two_seeds_equals_its_solo_runs(jpeg_root, teacher_r34, tmp_path):
    """Students alone (DISTILLER.TYPE NONE), seeds 0 and 1, through the host's PIL loader: each its own batches."""
    vanilla = ("DISTILLER.TYPE", "NONE")
    for seed in ("0", "1"):
        _train(
            [*_cfgs("kd"), *_opts(jpeg_root, teacher_r34, tmp_path / "solo", "host", *vanilla, "EXPERIMENT.SEED", seed)]
        )
    _train([*_cfgs("kd"), "--seeds", "0,1", *_opts(jpeg_root, teacher_r34, tmp_path / "pack", "host", *vanilla)])
    solo, pack = _folders(tmp_path / "solo"), _folders(tmp_path / "pack")
    assert sorted(solo) == sorted(pack) and len(pack) == 2
    for name in pack:
        assert_same_run(pack[name], solo[name])
    a, b = (torch.load(pack[n] / "latest", weights_only=True)["model"] for n in sorted(pack))
    assert not torch.equal(a["module.student.fc.weight"], b["module.student.fc.weight"])  # two different runs


def test_killed_loader_pack_resumes_bitwise(jpeg_root, teacher_r34, tmp_path, kd_runs):
    from normkd_plugin.engine.fit import Hook

    _, whole, _ = kd_runs
    argv = [*_cfgs("kd", "normkd"), *_opts(jpeg_root, teacher_r34, tmp_path, "cpu", "EXPERIMENT.SEED", "0")]

    class KilledInEpoch2(Hook):
        def before_step(self, epoch, step):
            if (epoch, step) == (2, 1):
                raise KeyboardInterrupt  # what a Ctrl-C in the middle of epoch 2 raises

    with pytest.raises(SystemExit) as stop:
        _train(argv, hooks=[KilledInEpoch2()])
    assert stop.value.code == 130
    folders = _folders(tmp_path)
    for folder in folders.values():
        assert torch.load(folder / "latest", weights_only=True)["epoch"] == 1
    _train(["--resume", *argv])
    for name, folder in folders.items():
        assert_same_run(folder, whole[name])


def test_loader_pack_under_two_gloo_processes_equals_its_solo_run(jpeg_root, teacher_r34, tmp_path):
    """torchrun, 2 processes: each rank trains its share of every global batch, of both runs at once (one flat
    all-reduce of both runs' gradients); the KD run ends bitwise as the KD run trained alone on 2 processes."""
    from test_dist import _job, _ok

    opts = _opts(jpeg_root, teacher_r34, "runs", "cpu", "EXPERIMENT.SEED", "0")
    _ok(_job(2, tmp_path / "solo", [*_cfgs("kd"), *opts]))
    _ok(_job(2, tmp_path / "pack", [*_cfgs("kd", "normkd"), *opts]))
    solo, pack = _folders(tmp_path / "solo" / "cwd0" / "runs"), _folders(tmp_path / "pack" / "cwd0" / "runs")
    (name,) = solo
    assert len(pack) == 2 and name in pack
    assert_same_run(pack[name], solo[name])
    ranks = [torch.load(tmp_path / "pack" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    # each rank read its strided half of every global batch: 1 image of 2, all 4 once per epoch
    for epoch in (1, 2):
        steps = [r["batches"][epoch] for r in ranks]
        assert [len(s) for s in steps] == [2, 2] and all(len(b) == 1 for s in steps for b in s)
        assert sorted(i for s in steps for b in s for i in b) == list(range(4))
