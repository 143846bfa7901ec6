"""NormKD and NormDKD (arXiv:2308.00520) for mdistiller, registered through entry points.

``register()`` loads every installed ``mdistiller.distillers`` / ``mdistiller.trainers`` entry
point into mdistiller's registries and adds their config nodes, plus this plugin's own keys
(``EXPERIMENT.SEED``, ``DATASET.ROOT``, ``DISTILLER.TEACHER_CKPT``), to ``mdistiller.engine.cfg.CFG``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._registry import Plugin, PluginError
    from .losses import normdkd_loss, normkd_loss, per_sample_temperature

__all__ = [
    "register",
    "Plugin",
    "PluginError",
    "normkd_loss",
    "normdkd_loss",
    "per_sample_temperature",
]
__version__ = "0.1.0"


def register() -> list[Plugin]:
    """Register every installed plugin and this package's config keys into mdistiller; idempotent."""
    from . import _registry
    from .config import plugin_defaults

    plugins = _registry.register()
    _registry.merge_defaults(_registry._host_cfg(), plugin_defaults(), "normkd_plugin.config.plugin_defaults")
    return plugins


# Imported on first use (PEP 562), so that command lines which never touch a tensor
# (normkd-configs, normkd-sweep, normkd-leaderboard) start without importing torch.
_LAZY = {
    "Plugin": "._registry",
    "PluginError": "._registry",
    "normkd_loss": ".losses",
    "normdkd_loss": ".losses",
    "per_sample_temperature": ".losses",
}


def __getattr__(name: str):
    """The lazily imported public names of this package."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Module attributes including the lazily imported names."""
    return sorted({*globals(), *_LAZY})
