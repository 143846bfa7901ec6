"""Config handling: plugin keys, packaged configs by name, and a validated, frozen run config.

Order (detectron2's ``get_cfg`` pattern): register plugins, ``CFG.clone()``, merge the file,
merge the ``KEY VALUE`` overrides, validate, freeze. Every failure is a :class:`ConfigError` naming
the key, its value and what is expected, and where the value came from: the config file, or the
command line (then only the one ``KEY VALUE`` pair at fault is shown). Validation
(:func:`~.config_rules.validate`) checks names against the host's registries, values against each
key's rule, the LR decay stages against the epochs, and that ``LOG.PREFIX`` can be written or
created, all before anything is built.
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
    "parse_seeds",
    "packaged_configs",
    "load_config",
    "run_name",
    "run_folder_path",
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


def resolve_config(name_or_path: str, flag: str = "--cfg") -> Path:
    """A file path if it exists, else a packaged config name (".yaml" optional); ``flag`` names it in errors."""
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
    raise ConfigError(f"{flag} {name_or_path!r} is neither a file nor a packaged config.{hint}")


def parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    """The integers of a comma-separated list (``0,1,2``; blanks between commas are skipped); ``flag`` names it in
    errors."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers such as 0,1,2") from None
    if not seeds:
        raise ConfigError(f"{flag} {text!r}: no seed given; expected comma-separated integers such as 0,1,2")
    return seeds


class _DuplicateKey(Exception):
    def __init__(self, key, line: int, first: int):
        super().__init__(key, line, first)
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """yaml's safe loader (the C one when built), refusing a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            try:
                key = self.construct_object(key_node, deep=True)
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base constructor says so
                continue
            if first != key_node.start_mark.line + 1:
                raise _DuplicateKey(key, key_node.start_mark.line + 1, first)
        return super().construct_mapping(node, deep)


def read_yaml_config(path: Path) -> dict:
    """The mapping in the YAML file ``path``; ConfigError for a file that is not text, not YAML, empty,
    not a mapping, or gives a key twice (naming the key and both lines)."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file (byte {exc.start} is not UTF-8); expected a YAML config") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as dup:
        raise ConfigError(
            f"{path}: line {dup.line}: duplicate key {dup.key!r} (first given on line {dup.first}); keep one"
        ) from None
    except yaml.YAMLError as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"{path}: not valid YAML: {message[:300]}") from None
    if data is None:
        raise ConfigError(f"{path}: empty config file; expected keys such as DISTILLER: {{TYPE: NORMKD}}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got a {type(data).__name__}")
    return data


def _merge_file(cfg: CN, path: Path) -> None:
    data = read_yaml_config(path)
    other = type(cfg)(data)
    if "_BASE_" in other:
        raise ConfigError(f"{path}: _BASE_ inheritance is not supported by mdistiller's yacs; inline the keys")
    try:
        cfg.merge_from_other_cfg(other)
    except KeyError as exc:
        message = str(exc.args[0])
        key = message.rsplit(":", 1)[-1].strip() if message.startswith("Non-existent config key") else ""
        near = difflib.get_close_matches(key, list(flatten(cfg)), n=3) if key else []
        hint = f"did you mean {', '.join(near)}?" if near else "is the plugin that defines it installed?"
        raise ConfigError(f"{path}: {message} ({hint})") from exc
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _merge_opts(cfg: CN, opts: list[str]) -> None:
    """Merge KEY VALUE overrides one pair at a time; an error shows only the pair at fault."""
    from .config_rules import is_int

    if len(opts) % 2:
        raise ConfigError(f"command-line override {opts[-1]} has no VALUE; overrides are KEY VALUE pairs")
    for key, raw in zip(opts[::2], opts[1::2]):
        where = f"command-line override {key} {raw}"
        old = lookup(cfg, key)
        if old is MISSING:
            near = difflib.get_close_matches(key, list(flatten(cfg)), n=3)
            raise ConfigError(f"{where}: no such config key" + (f"; did you mean {', '.join(near)}?" if near else ""))
        if isinstance(old, CN):
            raise ConfigError(f"{where}: {key} is a group of keys; override one of its keys, e.g. {key}.<NAME>")
        try:
            cfg.merge_from_list([key, raw])
        except (ValueError, AssertionError, KeyError) as exc:
            new = CN._decode_cfg_value(raw)
            if type(new) is type(old):
                raise ConfigError(f"{where}: {exc}") from None
            hint = f" (write {float(new)!r})" if isinstance(old, float) and is_int(new) else ""
            expected = f"a value of type {type(old).__name__} (like {old!r})"
            raise ConfigError(f"{where}: expected {expected}, got {type(new).__name__} {new!r}{hint}") from None


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"SOLVER.LR": 0.05, ...}: the leaves of a nested dict (a yacs CfgNode or loaded YAML) by dotted key."""
    out = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


MISSING = object()


def lookup(cfg: CN, key: str):
    """The value of the dotted ``key`` (``SOLVER.LR``) in ``cfg``, or ``MISSING`` when a part of it is absent."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, CN) or part not in node:
            return MISSING
        node = node[part]
    return node


def load_config(name_or_path: str, opts: list[str] | tuple = ()) -> CN:
    """register(); CFG.clone(); merge file and KEY VALUE overrides; validate; freeze."""
    from mdistiller.engine.cfg import CFG

    from . import register
    from .config_rules import validate

    register()
    path = resolve_config(name_or_path)
    cfg = CFG.clone()
    cfg.defrost()
    _merge_file(cfg, path)
    _merge_opts(cfg, list(opts))
    validate(cfg, path, list(opts))
    cfg.freeze()
    return cfg


# Keys that say where things are or how they are logged, not what is trained.
PLACE_KEYS = ("EXPERIMENT.", "LOG.", "DATASET.ROOT", "DATASET.NUM_WORKERS", "DISTILLER.TEACHER_CKPT")
# Keys that change neither what is trained nor its result beyond rounding (how it is run or evaluated).
UNTRAINED_KEYS = PLACE_KEYS + (
    "DATASET.TEST.BATCH_SIZE",
    "SOLVER.FAST.CUDA_GRAPH",
    "SOLVER.FAST.EVAL_BATCH_SIZE",
    "SOLVER.FAST.PACK_BRANCHES",
    "SOLVER.FAST.FUSE",
)


NAME_MAX = 255  # bytes of one file name on Linux file systems (ext4, xfs, btrfs, tmpfs)


def _shorten(part: str, limit: int = NAME_MAX) -> str:
    """``part`` if it fits in ``limit`` bytes, else its first bytes, '~' and 16 hex digits of its SHA-256."""
    raw = part.encode()
    if len(raw) <= limit:
        return part
    import hashlib

    head = raw[: limit - 17].decode(errors="ignore")  # whole UTF-8 characters only
    return f"{head}~{hashlib.sha256(raw).hexdigest()[:16]}"


def run_name(cfg: CN, opts: list[str] | tuple = ()) -> str:
    """PROJECT/<NAME or TAG>[,KEY:VALUE per override][,seed:N], as the host's tools/train.py names runs.

    Unlike the host, the overrides are sorted by key (the last value of a repeated key wins), so the
    name does not depend on their order. Paths, logging, EXPERIMENT keys and how a run is executed
    stay out (UNTRAINED_KEYS: a run resumes in its folder under another SOLVER.FAST.FUSE, say).
    A part longer than a file name may be (255 bytes) keeps its first 238 bytes, then '~' and 16 hex
    digits of the whole part's SHA-256: distinct names stay distinct.
    """
    name = cfg.EXPERIMENT.NAME or cfg.EXPERIMENT.TAG
    given = {k: v for k, v in zip(opts[::2], opts[1::2]) if not k.startswith(UNTRAINED_KEYS)}
    tags = [f"{k}:{v}" for k, v in sorted(given.items())]
    if cfg.EXPERIMENT.SEED >= 0:
        tags.append(f"seed:{cfg.EXPERIMENT.SEED}")
    parts = os.path.join(cfg.EXPERIMENT.PROJECT, ",".join([name, *tags])).split(os.sep)
    return os.sep.join(_shorten(p) if p not in ("", ".", "..") else p for p in parts)


def run_folder_path(cfg: CN, name: str) -> str:
    """LOG.PREFIX/``name``, normalised; ConfigError if ``name`` would place the run outside LOG.PREFIX
    (an absolute path, a '..' part) or a part is longer than the file system there allows."""
    prefix = os.path.normpath(cfg.LOG.PREFIX)
    folder = os.path.normpath(os.path.join(prefix, name))
    parts = name.split(os.sep)
    if os.path.isabs(name) or ".." in parts or os.path.commonpath([prefix, folder]) != prefix or folder == prefix:
        raise ConfigError(
            f"EXPERIMENT.NAME {cfg.EXPERIMENT.NAME!r} (EXPERIMENT.PROJECT {cfg.EXPERIMENT.PROJECT!r}): the run name "
            f"{name!r} must stay inside LOG.PREFIX {prefix} (it would write {folder}); use a name without '..' parts "
            "or a leading '/'"
        )
    base = Path(prefix).absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        limit = os.pathconf(base, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = NAME_MAX
    for part in parts:
        if len(part.encode()) > limit:
            raise ConfigError(
                f"run name part {part[:60]!r}... is {len(part.encode())} bytes; the file system under {base} allows "
                f"{limit}: set a shorter EXPERIMENT.NAME or PROJECT"
            )
    return folder
