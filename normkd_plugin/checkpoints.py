"""Teacher checkpoints: safe loading (torch >= 2.6 ``weights_only``) and the host's layout."""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from . import safe_pickle
from .errors import UserError

__all__ = [
    "CheckpointError",
    "load_state_dict",
    "load_weights",
    "load_teacher",
    "teacher_checkpoint_path",
    "allow_release_types",
]


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing or cannot be read safely; the message names the file."""


def _safe_globals() -> list:
    """The non-tensor types the released CIFAR teachers pickle: numpy scalars and an argparse Namespace.

    numpy's dtype and scalar are read by safe_pickle's checked stand-ins: numpy's own dtype.__setstate__
    trusts the file's state, and a crafted one crashes the process.
    """
    allowed: list = [argparse.Namespace, (safe_pickle.DType, "numpy.dtype")]
    # Pickles from numpy 1.x name numpy.core.*, numpy 2.x numpy._core.*; allow both spellings.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed.append((safe_pickle.scalar, f"{module}.scalar"))
    return allowed


def allow_release_types():
    """Context in which torch.load(weights_only=True) also accepts numpy scalars and argparse.Namespace.

    mdistiller's own resume needs it under torch >= 2.6: after an LR decay its optimizer state
    holds a numpy float, which the default weights-only unpickler refuses.
    """
    return torch.serialization.safe_globals(_safe_globals())


HOST_LAYOUT = (
    "mdistiller expects <checkout>/download_ckpts/cifar_teachers/<teacher>_vanilla/ckpt_epoch_240.pth holding "
    '{"model": state_dict}'
)

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format


def _first_line(exc: BaseException, limit: int = 200) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit] if lines else ''}"


def _check_file(path: Path, missing: str) -> None:
    """Refuse a missing, empty, truncated or corrupt (CRC mismatch) checkpoint before torch reads it."""
    if not path.is_file():
        raise CheckpointError(missing)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes); expected a torch checkpoint")
    with open(path, "rb") as f:
        if f.read(4) != _ZIP_MAGIC:
            return  # not torch's zip format (legacy or garbage): torch.load reports it
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint ({size} bytes; {_first_line(exc)}); copy or download it again"
        ) from exc
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint (CRC mismatch in {bad}); copy or download it again")


def load_state_dict(path: str | os.PathLike, missing: str = "") -> dict[str, torch.Tensor]:
    """The model weights of ``path``: a ``{"model": state_dict}`` file or a bare state dict, every tensor finite.

    A missing file (message ``missing`` when given), an empty, truncated or corrupt one, a pickle
    holding other objects than the release's, and a NaN or inf tensor raise CheckpointError naming the file.
    """
    path = Path(path)
    _check_file(path, missing or f"checkpoint not found: {os.path.abspath(path)}")
    try:
        with allow_release_types():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:
            raise CheckpointError(
                f"{path}: refused to unpickle it: it holds {refused.group(1)}; only tensors, numpy scalars "
                "and argparse.Namespace are allowed"
            ) from exc
        # torch's own message here advises weights_only=False, which would run code from the file
        raise CheckpointError(f"{path}: not a readable torch checkpoint, truncated or corrupt") from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint, truncated or corrupt ({_first_line(exc)})"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict or {{'model': state_dict}}, got {type(obj).__name__}")
    for name, tensor in obj.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {name} holds NaN or inf; refusing non-finite weights")
    return obj


def _fit_problems(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> list[str]:
    def shape(t: torch.Tensor) -> tuple[int, ...]:
        return tuple(t.shape)

    found = {
        "missing keys": [k for k in own if k not in state],
        "unexpected keys": [k for k in state if k not in own],
        "shape mismatches": [
            f"{k} {shape(state[k])} in the file, {shape(own[k])} in the model"
            for k in own
            if k in state and state[k].shape != own[k].shape
        ],
    }
    return [f"{len(v)} {label} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})" for label, v in found.items() if v]


def load_weights(model: nn.Module, path: str | os.PathLike, what: str, missing: str = "") -> None:
    """Load ``path``'s weights into ``model`` strictly; a CheckpointError says which keys or shapes do not fit."""
    state = load_state_dict(path, missing)
    problems = _fit_problems(state, model.state_dict())
    if problems:
        raise CheckpointError(f"{path} does not fit {what}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def teacher_checkpoint_path(cfg, host_default: str | None) -> str:
    """DISTILLER.TEACHER_CKPT when set, else the host's path for the teacher."""
    if cfg.DISTILLER.TEACHER_CKPT:
        return cfg.DISTILLER.TEACHER_CKPT
    if host_default is None:
        raise CheckpointError(
            f"mdistiller has no checkpoint path for teacher {cfg.DISTILLER.TEACHER!r}; set DISTILLER.TEACHER_CKPT"
        )
    return host_default


def load_teacher(cfg, teacher: nn.Module, host_default: str | None) -> None:
    """Load the teacher's weights from DISTILLER.TEACHER_CKPT, else from mdistiller's path for it."""
    path = teacher_checkpoint_path(cfg, host_default)
    tried = os.path.abspath(path)
    if cfg.DISTILLER.TEACHER_CKPT:
        missing = f"DISTILLER.TEACHER_CKPT {path}: no such file" + ("" if tried == path else f" ({tried})")
    else:
        missing = (
            f"teacher checkpoint not found: {tried} (mdistiller's path for {cfg.DISTILLER.TEACHER!r}); "
            "run normkd-teachers to install mdistiller's released CIFAR-100 teachers there (offline: "
            "normkd-teachers --from cifar_teachers.tar), or set DISTILLER.TEACHER_CKPT to a file (bare state "
            f"dicts load too). {HOST_LAYOUT}"
        )
    load_weights(teacher, path, f"teacher {cfg.DISTILLER.TEACHER!r}", missing)
