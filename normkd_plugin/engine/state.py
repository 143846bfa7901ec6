"""A run's training state: what its checkpoints hold, and how a run of a pack starts or resumes from one.

A state is the host's checkpoint (``model`` with the ``module.`` prefix, ``optimizer``, ``best_acc``,
``epoch``) plus what resuming exactly needs (``format``, ``lr``, ``record``, ``saved_best``, ``seed``,
``generator``); the run folder adds whose state it is and the records of every epoch
(:meth:`~normkd_plugin.run_folder.RunFolder.commit_epoch`).
"""

from __future__ import annotations

import logging
import os

from torch import Tensor, nn
from torch.utils._pytree import tree_map
from yacs.config import CfgNode as CN

from ..errors import RunError

log = logging.getLogger(__name__)

__all__ = [
    "STATE_FORMAT",
    "data_seed",
    "model_state",
    "load_model_state",
    "unshare_storage",
    "student_state",
    "training_state",
    "restore",
]

STATE_FORMAT = 1


def data_seed(cfg: CN) -> int:
    """EXPERIMENT.SEED when >= 0, else a fresh random seed (recorded in the checkpoints)."""
    return int(cfg.EXPERIMENT.SEED) if cfg.EXPERIMENT.SEED >= 0 else int.from_bytes(os.urandom(4), "little")


def unshare_storage(tree):
    """``tree`` with every tensor that views a larger storage (a fused slice) copied: torch.save writes whole storages."""

    def own(t):
        if isinstance(t, Tensor) and t.untyped_storage().nbytes() > t.numel() * t.element_size():
            return t.clone()
        return t

    return tree_map(own, tree)


def model_state(distiller: nn.Module) -> dict[str, Tensor]:
    """The distiller's state dict as the host saves it (``module.`` prefix), without the teacher."""
    return {f"module.{k}": v for k, v in distiller.state_dict().items() if not k.startswith("teacher.")}


def load_model_state(distiller: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load a saved model state (with or without the teacher's weights) into ``distiller``."""
    own = {k.removeprefix("module."): v for k, v in state.items()}
    own = {k: v for k, v in own.items() if not k.startswith("teacher.")}
    missing, unexpected = distiller.load_state_dict(own, strict=False)
    missing = [k for k in missing if not k.startswith("teacher.")]
    if missing or unexpected:
        raise RunError(
            f"{source}: the checkpoint does not fit this run's model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def student_state(run) -> dict:
    """The student-only checkpoint (tools/eval.py reads it): {"model": the student's state dict}."""
    return unshare_storage({"model": run.distiller.student.state_dict()})


def training_state(run, epoch: int, lr: float, record: dict, saved_best: bool) -> dict:
    """The full state of ``run`` after ``epoch``: the host's checkpoint keys plus what an exact resume needs."""
    return {
        "epoch": epoch,
        "model": unshare_storage(model_state(run.distiller)),
        "optimizer": unshare_storage(run.optimizer.state_dict()),
        "best_acc": run.best_acc,
        "format": STATE_FORMAT,
        "lr": lr,
        "record": dict(record),
        "saved_best": saved_best,
        "seed": run.seed,
        "generator": run.generator.get_state(),
    }


def restore(run, state: dict, source: str) -> None:
    """Put ``state`` (read from ``source``) into ``run``: weights, optimizer, epoch, best accuracy, seed, generator."""
    load_model_state(run.distiller, state["model"], source)
    run.optimizer.load_state_dict(state["optimizer"])
    run.epoch, run.best_acc = int(state["epoch"]), float(state["best_acc"])
    if state.get("format") != STATE_FORMAT:
        raise RunError(
            f"{source}: not a state of this trainer (format {state.get('format')}); it cannot resume exactly"
        )
    run.seed = int(state["seed"])
    try:
        run.generator.set_state(state["generator"])
    except RuntimeError:
        raise RunError(
            f"{source}: its data generator belongs to another device type; resume with the same --device"
        ) from None
