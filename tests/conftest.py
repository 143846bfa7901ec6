"""Shared fixtures: the real mdistiller, the real CIFAR-100 shards and teacher in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("NORMKD_DATA", REPO.parent / "shared" / "data"))
CIFAR_DIR = DATA_DIR / "cifar100"
TEACHER_RESNET56 = DATA_DIR / "teachers" / "cifar100" / "resnet56-f2eff4c8.pt"

try:
    import mdistiller  # noqa: F401

    HAVE_MDISTILLER = True
except ImportError:
    HAVE_MDISTILLER = False

needs_mdistiller = pytest.mark.skipif(
    not HAVE_MDISTILLER,
    reason='mdistiller is not importable: set MDISTILLER_SRC to a checkout and pip install -e "$MDISTILLER_SRC"',
)
needs_data = pytest.mark.skipif(
    not (CIFAR_DIR / "test-0-of-1.npz").is_file(),
    reason=f"real CIFAR-100 shards not found in {CIFAR_DIR} (set NORMKD_DATA to the shared data folder)",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def cifar_test_arrays():
    """The real CIFAR-100 test split (images uint8 NHWC, labels)."""
    if not (CIFAR_DIR / "test-0-of-1.npz").is_file():
        pytest.skip(f"real CIFAR-100 shards not found in {CIFAR_DIR} (set NORMKD_DATA)")
    with np.load(CIFAR_DIR / "test-0-of-1.npz") as z:
        return z["images"], z["labels"]


@pytest.fixture(scope="session")
def cifar_batch(cifar_test_arrays):
    """32 real test images normalised as the host does, with their labels."""
    if not HAVE_MDISTILLER:
        pytest.skip("mdistiller is not importable: set MDISTILLER_SRC and install it")
    from mdistiller.dataset.cifar100 import get_cifar100_test_transform
    from PIL import Image

    images, labels = cifar_test_arrays
    tf = get_cifar100_test_transform()
    x = torch.stack([tf(Image.fromarray(images[i])) for i in range(32)])
    return x, torch.as_tensor(labels[:32])


@pytest.fixture(scope="session")
def teacher_resnet56():
    """Path of the real CIFAR-100 resnet56 teacher."""
    if not TEACHER_RESNET56.is_file():
        pytest.skip(f"teacher checkpoint not found: {TEACHER_RESNET56} (set NORMKD_DATA)")
    return TEACHER_RESNET56
