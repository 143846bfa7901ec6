"""DATASET.DECODE gpu|cpu: byte-reading loader, batched decode, the host's augmentation on tensors.

Fixtures are real CIFAR-100 test images upscaled with PIL (nearest neighbour, so edges stay sharp
and a crop that is off by one pixel shows) to 256-500 px and saved as JPEG in tmp_path, in an
ImageFolder tree; one is grayscale and one is a PNG named .JPEG, as in the real ImageNet train set.

The references are the host's own transform objects on PIL images (mdistiller's
``get_imagenet_train_transform`` / ``get_imagenet_test_transform``, drawing from the global RNG).
Bound for the pixel comparison: PIL resamples in two 8-bit passes with fixed-point weights
(each pass within 1/2 level of the exact value, so the result is within 1 level), torchvision in
float32 rounded once (within 1/2 level); both are integers, so they differ by at most one level,
1/255 after ToTensor. Crops, flips and decoded pixels must match exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, needs_cuda, needs_mdistiller

pytestmark = needs_mdistiller

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LEVEL = 1 / 255


def _benchmark(name: str):
    """The script benchmarks/NAME.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def image_root(tmp_path_factory, cifar_test_arrays):
    """root/{train,val}/<class>/*.JPEG of upscaled real CIFAR-100 images (3 classes x 4 train, 2 val)."""
    images, _ = cifar_test_arrays
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("imagenet")
    k = 0
    for split, per_class in (("train", 4), ("val", 2)):
        for c in ("n01", "n02", "n03"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                w, h = (int(v) for v in rng.integers(256, 501, size=2))
                im = Image.fromarray(images[k]).resize((w, h), Image.NEAREST)
                k += 1
                path = root / split / c / f"{c}_{i}.JPEG"
                if split == "train" and (c, i) == ("n02", 1):
                    im.convert("L").save(path, "JPEG", quality=90)
                elif split == "train" and (c, i) == ("n03", 2):
                    im.save(path, "PNG")  # ImageNet has a PNG named .JPEG too
                else:
                    im.save(path, "JPEG", quality=90)
    return root


def _host(split):
    from mdistiller.dataset.imagenet import get_imagenet_test_transform, get_imagenet_train_transform

    return (get_imagenet_train_transform if split == "train" else get_imagenet_test_transform)(list(MEAN), list(STD))


def _pipeline(seed=0, device="cpu"):
    from normkd_plugin.imagenet import DevicePipeline, HostAugment

    return DevicePipeline(HostAugment.from_host(), torch.device(device), torch.Generator().manual_seed(seed))


def _samples(root, split):
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(root / split)).samples


def _pil(path) -> Image.Image:
    """mdistiller's ImageFolder loader: PIL, converted to RGB."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def _jpeg_samples(root):
    """The training samples that are JPEG files (not the PNG named .JPEG)."""
    return [s for s in _samples(root, "train") if Path(s[0]).read_bytes()[:2] == b"\xff\xd8"]


def _bytes(path) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(path, dtype=np.uint8))


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """Undo Normalize: ToTensor's [0, 1] values."""
    return x * torch.tensor(STD).view(-1, 1, 1) + torch.tensor(MEAN).view(-1, 1, 1)


def test_host_augment_is_read_from_mdistillers_transforms():
    from normkd_plugin.imagenet import HostAugment

    a = HostAugment.from_host()
    assert (a.size, a.scale, a.ratio, a.flip_p) == ((224, 224), (0.08, 1.0), (3 / 4, 4 / 3), 0.5)
    assert (a.mean, a.std, a.val_resize, a.val_crop, a.antialias) == (MEAN, STD, 256, (224, 224), True)


@pytest.mark.parametrize("size", [(375, 500), (256, 256), (500, 40), (40, 500), (300, 390)])
def test_crop_parameters_are_torchvisions_draws(size):
    import torchvision.transforms as T

    a = _pipeline().augment
    for seed in range(40):
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(torch.empty(3, *size), list(a.scale), list(a.ratio))
        assert _pipeline(seed).crop_params(*size) == expected, (seed, size)


def test_cpu_decode_equals_the_hosts_pil_loader(image_root):
    from normkd_plugin.imagenet import decode

    samples = _samples(image_root, "train")
    data = [_bytes(p) for p, _ in samples]
    decoded = decode(data, torch.device("cpu"))  # the PNG sends the batch through the one-by-one path
    for (path, _), img in zip(samples, decoded):
        pil = np.asarray(_pil(path))
        assert img.dtype == torch.uint8 and img.shape == (3, *pil.shape[:2])
        assert np.array_equal(img.permute(1, 2, 0).numpy(), pil), path


def test_undecodable_file_is_named(tmp_path):
    from normkd_plugin.data import DataError
    from normkd_plugin.imagenet import decode

    bad = torch.frombuffer(bytearray(b"not an image at all"), dtype=torch.uint8)
    with pytest.raises(DataError, match="broken.JPEG: cannot be decoded as an image"):
        decode([bad], torch.device("cpu"), ["train/n01/broken.JPEG"])


def _decoded(root, split):
    from normkd_plugin.imagenet import decode

    samples = _samples(root, split)
    return samples, decode([_bytes(p) for p, _ in samples], torch.device("cpu"))


def test_train_batch_matches_the_hosts_transform(image_root):
    samples, images = _decoded(image_root, "train")
    mine, params = _pipeline(seed=5).train(images)
    host_tf = _host("train")
    torch.manual_seed(5)  # the host draws from the global RNG, image after image, crop then flip
    host = torch.stack([host_tf(_pil(p)) for p, _ in samples])
    assert mine.shape == host.shape == (len(samples), 3, 224, 224) and mine.dtype == torch.float32
    assert {flip for *_, flip in params} == {True, False}
    diff = (_pixels(mine) - _pixels(host)).abs().amax(dim=(1, 2, 3))
    assert diff.max() <= LEVEL + 1e-6, diff
    assert (mine != host).any()  # the bound is used: PIL and torchvision round differently
    assert _pixels(mine).min() >= -1e-6 and _pixels(mine).max() <= 1 + 1e-6

    # the comparison sees a crop one pixel off or a missed flip
    import torchvision.transforms.functional as F

    top, left, h, w, flip = params[0]
    pil = _pil(samples[0][0])
    for t, lf, fl in ((top + 1, left, flip), (top, left + 1, flip), (top, left, not flip)):
        other = F.resized_crop(pil, t, lf, h, w, [224, 224], antialias=True)
        other = F.to_tensor(F.hflip(other) if fl else other)
        assert (_pixels(mine[0]) - other).abs().max() > 3 * LEVEL


def test_val_batch_matches_the_hosts_transform(image_root):
    samples, images = _decoded(image_root, "val")
    mine = _pipeline().val(images)
    host = torch.stack([_host("val")(_pil(p)) for p, _ in samples])
    assert mine.shape == host.shape == (len(samples), 3, 224, 224)
    assert (_pixels(mine) - _pixels(host)).abs().max() <= LEVEL + 1e-6


def test_byte_loader_shards_and_keeps_the_hosts_labels(image_root):
    from mdistiller.dataset.imagenet import ImageNet
    from torch.utils.data import DistributedSampler

    jpeg_loader = _benchmark("imagenet_loader").jpeg_loader
    host = ImageNet(str(image_root / "train"))
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(host, num_replicas=2, rank=rank, shuffle=True, seed=1)
        sampler.set_epoch(3)
        for data, target, index in jpeg_loader(host.samples, 4, sampler, num_workers=1):
            assert isinstance(data, list) and all(d.dtype == torch.uint8 and d.dim() == 1 for d in data)
            for d, t, i in zip(data, target.tolist(), index.tolist()):
                path, label = host.samples[i]
                assert t == label == host.targets[i]
                with open(path, "rb") as f:
                    assert bytes(d.numpy()) == f.read()
                seen.append(i)
        assert list(sampler) == seen[-len(list(sampler)) :]
    assert sorted(seen) == list(range(len(host)))
    assert sorted(set(host.targets)) == [0, 1, 2]


def test_decode_key_is_checked(tmp_path):
    from normkd_plugin.config import ConfigError, load_config
    from normkd_plugin.imagenet import check_decode

    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="DATASET.DECODE 'nvjpeg'; choose from host, cpu, gpu"):
        check_decode(load_config("imagenet/r34_r18/normkd", ["DATASET.DECODE", "nvjpeg"]), cpu)
    with pytest.raises(ConfigError, match="DATASET.TYPE is 'cifar100': use DATASET.DECODE host"):
        check_decode(load_config("cifar100/normkd/res56_res20", ["DATASET.DECODE", "cpu"]), cpu)
    with pytest.raises(ConfigError, match="DATASET.DECODE gpu decodes with nvJPEG on CUDA; --device is cpu"):
        check_decode(load_config("imagenet/r34_r18/normkd", ["DATASET.DECODE", "gpu"]), cpu)
    assert check_decode(load_config("imagenet/r34_r18/normkd", ["DATASET.DECODE", "cpu"]), cpu) == "cpu"


def test_trainer_trains_an_imagenet_folder_with_the_tensor_pipeline(image_root, tmp_path):
    from normkd_plugin import train

    train.main([
        "--cfg", "imagenet/r34_r18/kd", "--device", "cpu", "SOLVER.TRAINER", "ddp", "DISTILLER.TYPE", "NONE",
        "DATASET.DECODE", "cpu", "DATASET.ROOT", str(image_root), "DATASET.NUM_WORKERS", "1",
        "DATASET.TEST.BATCH_SIZE", "4", "SOLVER.BATCH_SIZE", "6", "SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[]",
        "LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", "r", "EXPERIMENT.SEED", "0",
    ])  # fmt: skip
    (folder,) = list((tmp_path / "imagenet").iterdir())
    text = (folder / "worklog.txt").read_text()
    assert "epoch: 1" in text and text.endswith("best_acc\t" + text.split("test_acc: ")[1].split()[0])
    state = torch.load(folder / "latest", map_location="cpu", weights_only=True)
    acc = state["record"]["test_acc"]
    assert state["epoch"] == 1 and 0 <= acc <= 100 and acc * 6 / 100 == pytest.approx(round(acc * 6 / 100))


def _decoded_alike(a: torch.Tensor, b: torch.Tensor) -> str:
    """'' when ``b`` decodes the JPEG that libjpeg-turbo decoded as ``a`` (uint8, 3 x H x W) as another decoder
    may, else how it does not.

    Decoders differ in IDCT rounding (a few levels) and in chroma upsampling: at a hard chroma edge
    (these fixtures are upscaled with nearest neighbours) one interpolates the subsampled chroma and
    another may repeat it, which moves a pixel by up to much of the edge's contrast, so a bound on the
    largest difference says nothing. Bounded instead: the mean difference, under 2 levels (torchvision's
    bound for nvJPEG against libjpeg-turbo), and every pixel within 8 levels plus the contrast of its
    5 x 5 neighbourhood in ``a`` (an upsampled chroma value lies between its neighbours'). A shift by a
    few pixels, swapped channels or a grey image fail; see the test below.
    """
    diff = (a.int() - b.int()).abs()
    mean = diff.double().mean().item()
    x = a.double().unsqueeze(0)
    contrast = (torch.nn.functional.max_pool2d(x, 5, 1, 2) + torch.nn.functional.max_pool2d(-x, 5, 1, 2))[0]
    excess = (diff.amax(0).double() - 8 - contrast.amax(0)).max().item()
    if mean >= 2 or excess > 0:
        return f"mean difference {mean:.2f} levels (bound 2), {excess:.0f} levels beyond the local bound"
    return ""


def test_decode_bound_takes_another_chroma_upsampling_and_refuses_a_wrong_image(image_root):
    """The bound of the nvJPEG test, on the CPU: the same decode with its chroma subsampled 2 x 2 and repeated
    (not interpolated) and IDCT-like noise of up to 2 levels passes; shifted, channel-swapped or grey ones fail."""
    from normkd_plugin.imagenet import decode

    samples = _jpeg_samples(image_root)
    images = decode([_bytes(p) for p, _ in samples], torch.device("cpu"))
    rgb_to_ycc = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    g = torch.Generator().manual_seed(0)
    for a in images:
        ycc = torch.einsum("ij,jhw->ihw", rgb_to_ycc.double(), a.double())
        h, w = a.shape[1:]
        chroma = torch.nn.functional.avg_pool2d(ycc[1:].unsqueeze(0), 2, ceil_mode=True)
        ycc[1:] = chroma.repeat_interleave(2, 2).repeat_interleave(2, 3)[0, :, :h, :w]
        repeated = torch.einsum("ij,jhw->ihw", torch.linalg.inv(rgb_to_ycc.double()), ycc)
        other = (repeated + torch.randint(-2, 3, a.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)
        assert not torch.equal(other, a)
        assert _decoded_alike(a, other) == ""
        grey = a.double().mean(0, keepdim=True).expand_as(a).round().to(torch.uint8)
        for wrong in (torch.roll(a, 3, dims=2), a.flip(0), grey):
            assert torch.equal(wrong, a) or _decoded_alike(a, wrong) != ""  # the grey JPEG is its own grey


@needs_cuda
def test_gpu_pipeline_matches_the_cpu_pipeline(image_root):
    """nvJPEG and CUDA resampling against the CPU path: same crops, pixels as two decoders of one JPEG may differ."""
    from normkd_plugin.imagenet import decode

    samples = _jpeg_samples(image_root)
    data = [_bytes(p) for p, _ in samples]
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    gpu_images, cpu_images = decode(data, cuda), decode(data, cpu)
    for (path, _), g, c in zip(samples, gpu_images, cpu_images):
        assert g.shape == c.shape and not _decoded_alike(c, g.cpu()), f"{path}: {_decoded_alike(c, g.cpu())}"
    decode_diff = max((g.cpu().int() - c.int()).abs().max().item() for g, c in zip(gpu_images, cpu_images))
    (g, gp), (c, cp) = _pipeline(7, "cuda").train(gpu_images), _pipeline(7).train(cpu_images)
    assert gp == cp
    assert (_pixels(g.cpu()) - _pixels(c)).abs().max() <= (decode_diff + 1) * LEVEL + 1e-6


# -- the splits' class folders: the same classes in each split, no folder links ----------------------------


def _tree(root, layout, images):
    """root/<split>/<class>/<i>.JPEG for ``layout`` {split: {class: images}}, of real 32-px CIFAR-100 test images."""
    k = 0
    for split, classes in layout.items():
        for c, n in classes.items():
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(images[k]).save(root / split / c / f"{i}.JPEG", quality=90)
                k += 1
    return root


def _train_folder(root, prefix, capsys):
    """normkd-train (a vanilla ResNet18, the loader engine, one short epoch) on ``root``: (exit code, stderr lines)."""
    from normkd_plugin import train

    argv = [
        "--cfg", "imagenet/r34_r18/kd", "--device", "cpu", "SOLVER.TRAINER", "ddp", "DISTILLER.TYPE", "NONE",
        "DATASET.ROOT", str(root), "DATASET.NUM_WORKERS", "0", "DATASET.TEST.BATCH_SIZE", "2",
        "SOLVER.BATCH_SIZE", "2", "SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[]", "LOG.PREFIX", str(prefix),
        "EXPERIMENT.SEED", "0",
    ]  # fmt: skip
    try:
        train.main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_validation_split_missing_a_class_is_refused_in_one_line(tmp_path, cifar_test_arrays, capsys):
    """val/ without c0: ImageFolder would number c1 as 0 there (train: c0 0, c1 1), every validation label shifted."""
    root = _tree(tmp_path / "data", {"train": {"c0": 2, "c1": 2}, "val": {"c1": 2}}, cifar_test_arrays[0])
    code, err = _train_folder(root, tmp_path / "out", capsys)
    assert code == 2
    assert err[-1] == (
        f"normkd-train: {root}/val does not hold the classes of {root}/train: missing c0; extra none. ImageFolder "
        "numbers each split's classes by their sorted folder names, so every split needs the same class folders"
    )
    assert not (tmp_path / "out").exists()


def test_a_folder_link_that_loops_is_refused_naming_it(tmp_path, cifar_test_arrays, capsys):
    """val/c1/loop -> .. made ImageFolder count val's images 40 times over (until the kernel's link limit)."""
    import os

    root = _tree(tmp_path / "data", {"train": {"c0": 2, "c1": 2}, "val": {"c0": 1, "c1": 1}}, cifar_test_arrays[0])
    os.symlink("..", root / "val" / "c1" / "loop")
    code, err = _train_folder(root, tmp_path / "out", capsys)
    assert code == 2
    assert err[-1].startswith(
        f"normkd-train: {root}/val/c1/loop is a link to {os.path.realpath(root / 'val')}, a folder that holds it: a loop"
    )


@pytest.mark.parametrize(
    ("link", "target", "why"),
    [
        ("c1/more", "val/c0", "inside the split, whose images would be counted twice"),
        ("c1/more", "elsewhere/c2", "outside the split {val}"),
        ("c1", "val/c0", "inside the split, whose images would be counted twice"),
        ("c1", "elsewhere/c2", "outside the split {val}"),
    ],
)
def test_folder_links_are_refused_naming_them(tmp_path, cifar_test_arrays, link, target, why):
    """Every folder link on an image's path loops, leaves the split or counts images twice (under two classes)."""
    import os

    from torchvision.datasets import ImageFolder

    from normkd_plugin.data import DataError
    from normkd_plugin.imagenet import check_class_folders

    layout = {"train": {"c0": 2, "c1": 2}, "val": {"c0": 1}, "elsewhere": {"c2": 1}}
    root = _tree(tmp_path / "data", layout, cifar_test_arrays[0])
    if link != "c1":
        (root / "val" / "c1").mkdir()
    os.symlink(os.path.relpath(root / target, (root / "val" / link).parent), root / "val" / link)
    train, val = ImageFolder(str(root / "train")), ImageFolder(str(root / "val"))
    expected = f"{root / 'val' / link} is a link to {root / target}, {why.format(val=root / 'val')}; "
    with pytest.raises(DataError, match="^" + re.escape(expected)):
        check_class_folders(train, val)


def test_file_links_are_followed_and_a_split_with_an_extra_class_is_refused(tmp_path, cifar_test_arrays):
    import os

    from torchvision.datasets import ImageFolder

    from normkd_plugin.data import DataError
    from normkd_plugin.imagenet import check_class_folders

    layout = {"train": {"c0": 2, "c1": 2}, "val": {"c0": 1, "c1": 1}, "elsewhere": {"c2": 1}}
    root = _tree(tmp_path / "data", layout, cifar_test_arrays[0])
    os.symlink(root / "elsewhere" / "c2" / "0.JPEG", root / "val" / "c1" / "linked.JPEG")  # one image, counted once
    val = ImageFolder(str(root / "val"))
    check_class_folders(ImageFolder(str(root / "train")), val)
    assert len(val) == 3
    (root / "val" / "c9").mkdir()
    (root / "val" / "c1" / "0.JPEG").rename(root / "val" / "c9" / "0.JPEG")
    with pytest.raises(DataError, match=r"/val does not hold the classes of .*/train: missing none; extra c9\. "):
        check_class_folders(ImageFolder(str(root / "train")), ImageFolder(str(root / "val")))
