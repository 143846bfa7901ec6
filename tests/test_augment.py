"""engine/augment.py: the device augmentation equals the host's torchvision pipeline, exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import needs_mdistiller

pytestmark = needs_mdistiller


@pytest.fixture(scope="module")
def pipe():
    from mdistiller.dataset.cifar100 import get_cifar100_train_transform

    from normkd_plugin.engine.augment import host_pipeline

    return host_pipeline(get_cifar100_train_transform())


def _data(arrays, n, pipe):
    from normkd_plugin.engine.augment import TensorCifar

    images, labels = arrays
    return TensorCifar(images[:n], labels[:n], pipe, torch.device("cpu"))


def test_pipeline_is_read_from_the_host_transform(pipe):
    assert pipe.pad == 4 and pipe.flip_p == 0.5
    assert pipe.mean == (0.5071, 0.4867, 0.4408) and pipe.std == (0.2675, 0.2565, 0.2761)


def test_given_offsets_and_flips_equal_torchvision_exactly(cifar_test_arrays, pipe):
    """RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize with the same choices, bit for bit."""
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.transforms import functional as TF

    from normkd_plugin.engine.augment import Draw

    n = 96
    data = _data(cifar_test_arrays, n, pipe)
    g = torch.Generator().manual_seed(5)
    draw = Draw(
        index=torch.randperm(n, generator=g),
        dy=torch.randint(0, 9, (n,), generator=g),
        dx=torch.randint(0, 9, (n,), generator=g),
        flip=torch.rand(n, generator=g) < 0.5,
    )
    # every corner and edge offset is exercised
    draw.dy[:4], draw.dx[:4] = torch.tensor([0, 0, 8, 8]), torch.tensor([0, 8, 0, 8])
    got = data.normalize(data.crop_flip(draw))
    to_tensor, normalize = T.ToTensor(), T.Normalize(pipe.mean, pipe.std)
    images = cifar_test_arrays[0]
    for k in range(n):
        img = Image.fromarray(images[int(draw.index[k])])
        # RandomCrop's own steps: pad with 0, then crop at (top, left) = (dy, dx)
        img = TF.crop(TF.pad(img, 4, fill=0, padding_mode="constant"), int(draw.dy[k]), int(draw.dx[k]), 32, 32)
        if draw.flip[k]:
            img = TF.hflip(img)
        want = normalize(to_tensor(img))
        assert torch.equal(got[k], want), f"image {k} (offset {int(draw.dy[k])},{int(draw.dx[k])})"
    assert torch.equal(data.targets[draw.index], torch.as_tensor(cifar_test_arrays[1][:n])[draw.index])


def test_eval_split_is_the_host_test_transform_exactly(cifar_test_arrays):
    from mdistiller.dataset.cifar100 import get_cifar100_test_transform
    from PIL import Image

    from normkd_plugin.engine.augment import TensorCifar, host_pipeline

    images, labels = cifar_test_arrays
    tf = get_cifar100_test_transform()
    data = TensorCifar(images[:16], labels[:16], host_pipeline(tf), torch.device("cpu"))
    x, y = data.eval_set()
    assert torch.equal(x, torch.stack([tf(Image.fromarray(images[i])) for i in range(16)]))
    assert y.tolist() == labels[:16].tolist()


def test_an_epoch_is_a_permutation_with_uniform_offsets_and_fair_flips(cifar_test_arrays, pipe):
    """Over the 10,000 test images: each used once; 81 offsets near-uniform (chi-square); flips near 1/2."""
    data = _data(cifar_test_arrays, 10_000, pipe)
    draw = data.draw(torch.Generator().manual_seed(0))
    assert torch.equal(draw.index.sort().values, torch.arange(10_000))
    cells = torch.bincount(draw.dy * 9 + draw.dx, minlength=81).double()
    expected = 10_000 / 81
    chi2 = ((cells - expected) ** 2 / expected).sum().item()
    assert chi2 < 124.1, chi2  # chi-square 80 dof, p = 0.001
    assert 0 <= draw.dy.min() and draw.dy.max() <= 8 and draw.dx.max() <= 8
    flips = int(draw.flip.sum())
    assert abs(flips - 5000) < 3.29 * 50, flips  # binomial sd 50, p = 0.001
    assert (draw.dy[draw.flip].double().mean() - 4).abs() < 0.2  # flips independent of offsets


def test_crops_are_windows_of_the_zero_padded_images(cifar_test_arrays, pipe):
    data = _data(cifar_test_arrays, 32, pipe)
    draw = data.draw(torch.Generator().manual_seed(1))
    crops = data.crop_flip(draw)
    assert crops.shape == (32, 3, 32, 32) and crops.dtype == torch.uint8
    padded = np.pad(cifar_test_arrays[0][:32], ((0, 0), (4, 4), (4, 4), (0, 0)))
    for k in range(32):
        i, dy, dx = int(draw.index[k]), int(draw.dy[k]), int(draw.dx[k])
        window = padded[i, dy : dy + 32, dx : dx + 32]
        if draw.flip[k]:
            window = window[:, ::-1]
        assert np.array_equal(crops[k].permute(1, 2, 0).numpy(), window)


def test_the_same_generator_state_draws_the_same_epoch(cifar_test_arrays, pipe):
    data = _data(cifar_test_arrays, 500, pipe)
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x1, y1 = data.epoch(a, 100)
    x2, y2 = data.epoch(b, 100)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape[0] == 100
    assert not torch.equal(data.epoch(a, 100)[0], x1)


def test_unsupported_transform_is_refused():
    from torchvision import transforms as T

    from normkd_plugin.engine.augment import host_pipeline

    with pytest.raises(ValueError, match="ColorJitter"):
        host_pipeline(T.Compose([T.ColorJitter(0.1), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]))
