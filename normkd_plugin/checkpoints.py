"""Teacher checkpoints: safe loading (torch >= 2.6 ``weights_only``) and the host's layout."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

__all__ = ["CheckpointError", "load_state_dict", "teacher_checkpoint_path", "allow_release_types"]


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing or cannot be read safely; the message names the file."""


def _safe_globals() -> list:
    """The non-tensor types the released CIFAR teachers pickle: numpy scalars and an argparse Namespace."""
    allowed: list = [argparse.Namespace, np.dtype]
    core = getattr(np, "_core", None) or np.core
    # Pickles from numpy 1.x name numpy.core.*, numpy 2.x numpy._core.*; allow both spellings.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed.append((core.multiarray.scalar, f"{module}.scalar"))
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return allowed


def allow_release_types():
    """Context in which torch.load(weights_only=True) also accepts numpy scalars and argparse.Namespace.

    mdistiller's own resume needs it under torch >= 2.6: after an LR decay its optimizer state
    holds a numpy float, which the default weights-only unpickler refuses.
    """
    return torch.serialization.safe_globals(_safe_globals())


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights of ``path``: a ``{"model": state_dict}`` file or a bare state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"teacher checkpoint not found: {path}. mdistiller expects "
            "<checkout>/download_ckpts/cifar_teachers/<teacher>_vanilla/ckpt_epoch_240.pth holding "
            '{"model": state_dict}; or set DISTILLER.TEACHER_CKPT to a file (bare state dicts load too).'
        )
    try:
        with allow_release_types():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle it (only tensors, numpy scalars and argparse.Namespace are allowed): {exc}"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict or {{'model': state_dict}}, got {type(obj).__name__}")
    return obj


def teacher_checkpoint_path(cfg, host_default: str | None) -> str:
    """DISTILLER.TEACHER_CKPT when set, else the host's path for the teacher."""
    if cfg.DISTILLER.TEACHER_CKPT:
        return cfg.DISTILLER.TEACHER_CKPT
    if host_default is None:
        raise CheckpointError(
            f"mdistiller has no checkpoint path for teacher {cfg.DISTILLER.TEACHER!r}; set DISTILLER.TEACHER_CKPT"
        )
    return host_default
