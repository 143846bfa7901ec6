"""Entry-point discovery: put every installed distiller and trainer plugin into mdistiller.

Two entry-point groups, read with :mod:`importlib.metadata` (like pluggy's
``load_setuptools_entrypoints``):

* ``mdistiller.distillers``: ``NAME = pkg.module:DistillerClass``, added to
  ``mdistiller.distillers.distiller_dict[NAME]``;
* ``mdistiller.trainers``: ``NAME = pkg.module:TrainerClass``, added to
  ``mdistiller.engine.trainer_dict[NAME]``.

A class may carry ``cfg_defaults() -> CfgNode``, a partial config tree whose missing keys are
added to ``mdistiller.engine.cfg.CFG``; that is what lets yacs accept the plugin's keys when a
config file is merged. Registration is idempotent; a name held by a different object, or an
entry point that cannot be imported, raises :class:`PluginError` naming the entry point and its
distribution.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
from dataclasses import dataclass

from yacs.config import CfgNode as CN

log = logging.getLogger(__name__)

GROUPS = ("mdistiller.distillers", "mdistiller.trainers")


class PluginError(RuntimeError):
    """An entry point that cannot be registered."""


@dataclass(frozen=True)
class Plugin:
    """One registered entry point: where it came from and what it names."""

    group: str
    name: str
    value: str
    distribution: str
    version: str


def _host_tables() -> dict[str, dict]:
    try:
        from mdistiller.distillers import distiller_dict
        from mdistiller.engine import trainer_dict
    except ImportError as exc:  # pragma: no cover - exercised only without mdistiller
        raise ImportError(
            "mdistiller is not importable. Install a checkout: pip install -e /path/to/mdistiller "
            '(or pip install -e ".[mdistiller]" with network access).'
        ) from exc
    return {"mdistiller.distillers": distiller_dict, "mdistiller.trainers": trainer_dict}


def _host_cfg() -> CN:
    from mdistiller.engine.cfg import CFG

    return CFG


def iter_entry_points(group: str):
    """Yield (entry_point, distribution) for every installed distribution's entry points in group."""
    seen = set()
    for dist in md.distributions():
        for ep in dist.entry_points:
            if ep.group != group:
                continue
            key = (ep.name, ep.value)
            if key in seen:  # the same distribution found twice on sys.path
                continue
            seen.add(key)
            yield ep, dist


def merge_defaults(cfg: CN, defaults: CN, origin: str, path: str = "") -> None:
    """Add the keys of ``defaults`` missing from ``cfg``; an existing key must hold the same value."""
    for key, value in defaults.items():
        full = f"{path}{key}"
        if key not in cfg:
            was_frozen = cfg.is_frozen()
            cfg.defrost()
            cfg[key] = value.clone() if isinstance(value, CN) else value
            if was_frozen:
                cfg.freeze()
        elif isinstance(value, CN) and isinstance(cfg[key], CN):
            merge_defaults(cfg[key], value, origin, f"{full}.")
        elif isinstance(value, CN) or isinstance(cfg[key], CN) or cfg[key] != value:
            raise PluginError(
                f"{origin}: config key {full} already exists in mdistiller's CFG with "
                f"value {cfg[key]!r}; the plugin's default is {value!r}"
            )


def register() -> list[Plugin]:
    """Load every entry point of GROUPS into the host's registries and CFG; return what is there."""
    tables = _host_tables()
    cfg = _host_cfg()
    registered = []
    for group in GROUPS:
        table = tables[group]
        for ep, dist in iter_entry_points(group):
            dist_name = dist.metadata["Name"] or "?"
            origin = f"entry point {ep.name!r} = {ep.value!r} in group {group!r} of distribution {dist_name!r}"
            try:
                obj = ep.load()
            except Exception as exc:
                raise PluginError(f"cannot import {origin}: {type(exc).__name__}: {exc}") from exc
            current = table.get(ep.name)
            if current is not None and current is not obj:
                where = f"{current.__module__}.{current.__qualname__}"
                raise PluginError(f"{origin}: the name {ep.name!r} is already registered to {where}")
            if hasattr(obj, "cfg_defaults"):
                merge_defaults(cfg, obj.cfg_defaults(), origin)
            if current is None:
                table[ep.name] = obj
                log.debug("registered %s", origin)
            registered.append(Plugin(group, ep.name, ep.value, dist_name, dist.version))
    return registered
