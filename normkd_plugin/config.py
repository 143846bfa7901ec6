"""Config handling: plugin keys, packaged configs by name, and a validated, frozen run config.

Order (detectron2's ``get_cfg`` pattern): register plugins, ``CFG.clone()``, merge the file,
merge the ``KEY VALUE`` overrides, validate, freeze. Every failure names the file or key.
"""

from __future__ import annotations

import difflib
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from yacs.config import CfgNode as CN

from .errors import UserError

__all__ = [
    "ConfigError",
    "plugin_defaults",
    "resolve_config",
    "packaged_configs",
    "load_config",
    "run_name",
]


class ConfigError(UserError, ValueError):
    """A config file, name or override that cannot be used; the message names it."""


def plugin_defaults() -> CN:
    """Keys this plugin adds to the host's CFG (all inert at their defaults)."""
    cfg = CN()
    cfg.EXPERIMENT = CN()
    cfg.EXPERIMENT.SEED = -1  # >= 0 seeds Python, NumPy, torch and loader workers
    cfg.DATASET = CN()
    cfg.DATASET.ROOT = ""  # local dataset folder; "" keeps the host's ./data + download
    cfg.DISTILLER = CN()
    cfg.DISTILLER.TEACHER_CKPT = ""  # teacher checkpoint file; "" keeps the host's layout
    cfg.DISTILLER.FUSED_LOSS = True  # False forces the PyTorch reference loss (as NORMKD_REFERENCE=1)
    return cfg


def _config_root():
    return importlib.resources.files("normkd_plugin.configs")


@dataclass(frozen=True)
class PackagedConfig:
    """One config shipped with the package."""

    name: str  # e.g. "cifar100/normkd/res32x4_res8x4"
    dataset: str
    method: str
    teacher: str
    student: str


def _walk(node, prefix: str = ""):
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        if child.is_dir():
            yield from _walk(child, f"{prefix}{child.name}/")
        elif child.name.endswith(".yaml"):
            yield f"{prefix}{child.name[:-5]}", child


def packaged_configs() -> list[PackagedConfig]:
    """Every packaged config, read from the installed package data."""
    rows = []
    for name, res in _walk(_config_root()):
        data = yaml.safe_load(res.read_text()) or {}
        dist = data.get("DISTILLER", {})
        rows.append(
            PackagedConfig(
                name=name,
                dataset=data.get("DATASET", {}).get("TYPE", "cifar100"),
                method=dist.get("TYPE", "NONE"),
                teacher=dist.get("TEACHER", ""),
                student=dist.get("STUDENT", ""),
            )
        )
    return rows


def resolve_config(name_or_path: str) -> Path:
    """A file path if it exists, else a packaged config name (".yaml" optional)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    stem = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    names = dict(_walk(_config_root()))
    if stem in names:
        with importlib.resources.as_file(names[stem]) as real:
            return Path(real)
    near = difflib.get_close_matches(stem, list(names), n=5, cutoff=0.5)
    hint = f" Close packaged names: {', '.join(near)}." if near else " List them with normkd-configs."
    raise ConfigError(f"--cfg {name_or_path!r} is neither a file nor a packaged config.{hint}")


def _merge_file(cfg: CN, path: Path) -> None:
    try:
        with open(path) as f:
            other = cfg.load_cfg(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if "_BASE_" in other:
        raise ConfigError(f"{path}: _BASE_ inheritance is not supported by mdistiller's yacs; inline the keys")
    try:
        cfg.merge_from_other_cfg(other)
    except KeyError as exc:
        raise ConfigError(f"{path}: {exc.args[0]} (is the plugin that defines it installed?)") from exc
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _merge_opts(cfg: CN, opts: list[str]) -> None:
    if len(opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs; got an odd list: {' '.join(opts)}")
    for key in opts[::2]:
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node, CN) or part not in node:
                raise ConfigError(f"override {key}: no such config key")
            node = node[part]
        if not isinstance(node, CN) or parts[-1] not in node:
            near = difflib.get_close_matches(key, list(_flat_keys(cfg)), n=3)
            raise ConfigError(
                f"override {key}: no such config key" + (f"; did you mean {', '.join(near)}?" if near else "")
            )
    try:
        cfg.merge_from_list(list(opts))
    except (ValueError, AssertionError) as exc:
        raise ConfigError(f"overrides {' '.join(opts)}: {exc}") from exc


def _flat_keys(cfg: CN, prefix: str = ""):
    for key, value in cfg.items():
        if isinstance(value, CN):
            yield from _flat_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _choice(value: str, choices, what: str, source: str) -> None:
    if value not in choices:
        near = difflib.get_close_matches(value, list(choices), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(near)}?" if near else f"choose from {', '.join(sorted(choices))}"
        raise ConfigError(f"{source}: {what} {value!r} is not registered; {hint}")


def validate(cfg: CN, source: str) -> None:
    """Check names against the host's registries before anything is built."""
    from mdistiller.distillers import distiller_dict
    from mdistiller.engine import trainer_dict
    from mdistiller.models import cifar_model_dict, imagenet_model_dict

    _choice(cfg.DISTILLER.TYPE, distiller_dict, "DISTILLER.TYPE", source)
    _choice(cfg.SOLVER.TRAINER, trainer_dict, "SOLVER.TRAINER", source)
    models = imagenet_model_dict if cfg.DATASET.TYPE == "imagenet" else cifar_model_dict
    if cfg.DATASET.TYPE not in ("cifar100", "imagenet"):
        raise ConfigError(f"{source}: DATASET.TYPE {cfg.DATASET.TYPE!r}; expected cifar100 or imagenet")
    _choice(cfg.DISTILLER.STUDENT, models, "DISTILLER.STUDENT", source)
    if cfg.DISTILLER.TYPE != "NONE":
        _choice(cfg.DISTILLER.TEACHER, models, "DISTILLER.TEACHER", source)
    if cfg.SOLVER.BATCH_SIZE < 1 or cfg.SOLVER.EPOCHS < 1:
        raise ConfigError(f"{source}: SOLVER.BATCH_SIZE and SOLVER.EPOCHS must be >= 1")
    if list(cfg.SOLVER.LR_DECAY_STAGES) != sorted(cfg.SOLVER.LR_DECAY_STAGES):
        raise ConfigError(f"{source}: SOLVER.LR_DECAY_STAGES must be increasing, got {cfg.SOLVER.LR_DECAY_STAGES}")


def load_config(name_or_path: str, opts: list[str] | tuple = ()) -> CN:
    """register(); CFG.clone(); merge file and KEY VALUE overrides; validate; freeze."""
    from mdistiller.engine.cfg import CFG

    from . import register

    register()
    path = resolve_config(name_or_path)
    cfg = CFG.clone()
    cfg.defrost()
    _merge_file(cfg, path)
    _merge_opts(cfg, list(opts))
    validate(cfg, str(path))
    cfg.freeze()
    return cfg


# Overrides that say where things are or how they are logged, not what is trained.
_UNNAMED_PREFIXES = ("EXPERIMENT.", "LOG.", "DATASET.ROOT", "DATASET.NUM_WORKERS", "DISTILLER.TEACHER_CKPT")


def run_name(cfg: CN, opts: list[str] | tuple = ()) -> str:
    """PROJECT/<NAME or TAG>[,KEY:VALUE per override][,seed:N], like the host's tools/train.py.

    Overrides of paths, logging and EXPERIMENT keys stay out of the name (see _UNNAMED_PREFIXES).
    """
    name = cfg.EXPERIMENT.NAME or cfg.EXPERIMENT.TAG
    pairs = zip(opts[::2], opts[1::2])
    tags = [f"{k}:{v}" for k, v in pairs if not k.startswith(_UNNAMED_PREFIXES)]
    if cfg.EXPERIMENT.SEED >= 0:
        tags.append(f"seed:{cfg.EXPERIMENT.SEED}")
    return os.path.join(cfg.EXPERIMENT.PROJECT, ",".join([name, *tags]))
