"""NormKD and NormDKD (arXiv:2308.00520) for mdistiller, registered through entry points.

``register()`` loads every installed ``mdistiller.distillers`` / ``mdistiller.trainers`` entry
point into mdistiller's registries and adds their config nodes, plus this plugin's own keys
(``EXPERIMENT.SEED``, ``DATASET.ROOT``, ``DISTILLER.TEACHER_CKPT``), to ``mdistiller.engine.cfg.CFG``.
"""

from __future__ import annotations

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
