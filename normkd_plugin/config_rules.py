"""What a config may hold: each key's rule (a range or a registry), checked by :func:`validate` before anything is built.

Every message names the key, its value and what is expected, and says whether the value came from
the command line (the one KEY VALUE pair) or from the config file.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from yacs.config import CfgNode as CN

from .config import MISSING, ConfigError, lookup

__all__ = ["Rule", "COMMON_RULES", "DISTILLER_RULES", "validate", "is_int", "batch_source"]


class _Origin:
    """Where a value came from, for messages: the command line (its one KEY VALUE pair) or the config file."""

    def __init__(self, path: Path, opts: list[str]):
        self.path = path
        self.overrides = dict(zip(opts[::2], opts[1::2]))

    def __call__(self, key: str, value, *related: str) -> str:
        """'command-line override K V' for the first of key, *related overridden; else 'FILE: KEY VALUE'."""
        for k in (key, *related):
            if k in self.overrides:
                return f"command-line override {k} {self.overrides[k]}"
        return f"{self.path}: {key} {value!r}"


def is_int(value) -> bool:
    """Whether ``value`` is an int (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


@dataclass(frozen=True)
class Rule:
    """A value check: ``test(value)`` must hold; ``expected`` says what is wanted, for the message."""

    test: Callable[[object], bool]
    expected: str


TEMPERATURE = Rule(lambda v: _is_number(v) and v > 0, "a finite temperature > 0")
WEIGHT = Rule(lambda v: _is_number(v) and v >= 0, "a finite weight >= 0")
WARMUP = Rule(lambda v: _is_number(v) and v > 0, "a warm-up > 0 (epochs)")
AT_LEAST_ONE = Rule(lambda v: is_int(v) and v >= 1, "an integer >= 1")
LEARNING_RATE = Rule(lambda v: _is_number(v) and v > 0, "a finite learning rate > 0")
ITERATIONS = Rule(lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: full epochs)")
SEED = Rule(lambda v: is_int(v) and v < 2**63, "an integer below 2**63 (< 0: a random seed)")

COMMON_RULES: dict[str, Rule] = {
    "SOLVER.BATCH_SIZE": AT_LEAST_ONE,
    "DATASET.TEST.BATCH_SIZE": AT_LEAST_ONE,
    "SOLVER.EPOCHS": AT_LEAST_ONE,
    "SOLVER.LR": LEARNING_RATE,
    "SOLVER.FAST.EVAL_BATCH_SIZE": AT_LEAST_ONE,  # only where the fast trainer is registered
    "SOLVER.FAST.ITERS_PER_EPOCH": ITERATIONS,
    "SOLVER.FAST.FUSE": Rule(lambda v: v in ("auto", "on", "off"), "auto, on or off"),
    "EXPERIMENT.SEED": SEED,
}
"""Keys every run reads; a key missing from the config is skipped."""


def _normkd_rules(node: str) -> dict[str, Rule]:
    return {f"{node}.TEMPERATURE_NORM": TEMPERATURE, f"{node}.LOSS.CE_WEIGHT": WEIGHT, f"{node}.LOSS.KD_WEIGHT": WEIGHT}


def _normdkd_rules(node: str) -> dict[str, Rule]:
    keys = {"TEMPERATURE_NORM": TEMPERATURE, "WARMUP": WARMUP, "CE_WEIGHT": WEIGHT, "ALPHA": WEIGHT, "BETA": WEIGHT}
    return {f"{node}.{k}": rule for k, rule in keys.items()}


DISTILLER_RULES: dict[str, dict[str, Rule]] = {
    "KD": {"KD.TEMPERATURE": TEMPERATURE, "KD.LOSS.CE_WEIGHT": WEIGHT, "KD.LOSS.KD_WEIGHT": WEIGHT},
    "DKD": {
        "DKD.T": TEMPERATURE,
        "DKD.WARMUP": WARMUP,
        "DKD.CE_WEIGHT": WEIGHT,
        "DKD.ALPHA": WEIGHT,
        "DKD.BETA": WEIGHT,
    },
    "NORMKD": _normkd_rules("NORMKD"),
    "NormKD": _normkd_rules("NormKD"),  # the authors' release node names
    "NORMDKD": _normdkd_rules("NORMDKD"),
    "NormKD_W_DKD": _normdkd_rules("NormKD_W_DKD"),
    "KD_LS": {"KD_LS.TEMPERATURE": TEMPERATURE, "KD_LS.LOSS.CE_WEIGHT": WEIGHT, "KD_LS.LOSS.KD_WEIGHT": WEIGHT},
    "DKD_LS": {
        "DKD_LS.T": TEMPERATURE,
        "DKD_LS.WARMUP": WARMUP,
        "DKD_LS.CE_WEIGHT": WEIGHT,
        "DKD_LS.ALPHA": WEIGHT,
        "DKD_LS.BETA": WEIGHT,
        "DKD_LS.KD_WEIGHT": WEIGHT,
    },
}
"""DISTILLER.TYPE -> the keys of the node that distiller reads; only the selected type's keys are checked."""


def _choice(cfg: CN, key: str, choices, what: str, origin: _Origin) -> None:
    value = lookup(cfg, key)
    if value not in choices:
        near = difflib.get_close_matches(value, list(choices), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(near)}?" if near else f"choose from {', '.join(sorted(choices))}"
        raise ConfigError(f"{origin(key, value)}: not a registered {what}; {hint}")


def _check_stages(cfg: CN, origin: _Origin) -> None:
    stages, epochs = list(cfg.SOLVER.LR_DECAY_STAGES), cfg.SOLVER.EPOCHS
    whole = all(is_int(s) for s in stages)
    inside = whole and all(1 <= s <= epochs for s in stages)
    if inside and all(a < b for a, b in zip(stages, stages[1:])):
        return
    where = origin("SOLVER.LR_DECAY_STAGES", stages, "SOLVER.EPOCHS")
    hint = "" if inside or not whole else "; for a short run also set SOLVER.LR_DECAY_STAGES, e.g. '[]' for no decay"
    raise ConfigError(
        f"{where}: expected SOLVER.LR_DECAY_STAGES {stages} to be strictly increasing whole epochs "
        f"within 1..{epochs} (SOLVER.EPOCHS){hint}"
    )


def _check_log_prefix(cfg: CN, origin: _Origin) -> None:
    prefix = cfg.LOG.PREFIX
    folder = Path(prefix).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        problem = f"{folder} is a file"
    elif not os.access(folder, os.W_OK | os.X_OK):
        problem = f"{folder} is not writable"
    else:
        return
    raise ConfigError(f"{origin('LOG.PREFIX', prefix)}: expected a folder that can be written or created ({problem})")


def validate(cfg: CN, source: str | Path, opts: list[str] | tuple = ()) -> None:
    """Check names against the host's registries and values against their ranges, before anything is built.

    Each message names the key, its value and what is expected, and says whether the value came
    from the command line (``opts``, shown as the one KEY VALUE pair) or from the file ``source``.
    """
    from mdistiller.distillers import distiller_dict
    from mdistiller.engine import trainer_dict
    from mdistiller.models import cifar_model_dict, imagenet_model_dict

    origin = _Origin(Path(source), list(opts))
    _choice(cfg, "DISTILLER.TYPE", distiller_dict, "distiller", origin)
    _choice(cfg, "SOLVER.TRAINER", trainer_dict, "trainer", origin)
    if cfg.DATASET.TYPE not in ("cifar100", "imagenet"):
        raise ConfigError(f"{origin('DATASET.TYPE', cfg.DATASET.TYPE)}: expected cifar100 or imagenet")
    models = imagenet_model_dict if cfg.DATASET.TYPE == "imagenet" else cifar_model_dict
    model_kind = f"{cfg.DATASET.TYPE} model"
    _choice(cfg, "DISTILLER.STUDENT", models, model_kind, origin)
    if cfg.DISTILLER.TYPE != "NONE":
        _choice(cfg, "DISTILLER.TEACHER", models, model_kind, origin)
    rules = {**COMMON_RULES, **DISTILLER_RULES.get(cfg.DISTILLER.TYPE, {})}
    for key, rule in rules.items():
        value = lookup(cfg, key)
        if value is not MISSING and not rule.test(value):
            raise ConfigError(f"{origin(key, value)}: expected {rule.expected}")
    _check_stages(cfg, origin)
    _check_log_prefix(cfg, origin)


def batch_source(trainer: str, decode_mode: str = "host", world_size: int = 1) -> str | None:
    """Which trainer trains SOLVER.TRAINER ``trainer`` with DATASET.DECODE ``decode_mode`` on ``world_size``
    processes: this plugin's engine with the CIFAR split on the device ('device': fast) or fed by a loader
    ('loader': ddp; base under torchrun or with DATASET.DECODE), or None: the host's own trainer.
    ConfigError for a host trainer that cannot run as asked."""
    if trainer == "fast":
        if decode_mode != "host":
            raise ConfigError(
                f"DATASET.DECODE {decode_mode!r} needs SOLVER.TRAINER base or ddp, not 'fast' (in-memory CIFAR)"
            )
        return "device"
    if trainer == "ddp" or (trainer == "base" and (world_size > 1 or decode_mode != "host")):
        return "loader"
    if trainer == "base":
        return None
    if world_size > 1:
        raise ConfigError(
            f"SOLVER.TRAINER {trainer!r} has no multi-process version (WORLD_SIZE={world_size} under torchrun); "
            "use SOLVER.TRAINER base or ddp (this plugin's engine, fed by a data loader) or launch one process without torchrun"
        )
    if decode_mode != "host":
        raise ConfigError(f"DATASET.DECODE {decode_mode!r} needs SOLVER.TRAINER base or ddp, not {trainer!r}")
    return None
