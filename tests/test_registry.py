"""register(): entry points of every distribution into the real host, idempotent, loud on conflicts."""

from __future__ import annotations

import importlib.metadata as md

import pytest
from yacs.config import CfgNode as CN

from conftest import needs_mdistiller

pytestmark = needs_mdistiller


def test_register_puts_classes_and_nodes_in_place():
    from mdistiller.distillers import distiller_dict
    from mdistiller.engine import trainer_dict
    from mdistiller.engine.cfg import CFG

    import normkd_plugin
    from normkd_plugin.distillers import DKDLS, KDLS, NormDKD, NormDKDRelease, NormKD, NormKDRelease
    from normkd_plugin.engine.trainer import FastTrainer, LoaderFedTrainer

    plugins = normkd_plugin.register()
    assert distiller_dict["NORMKD"] is NormKD and distiller_dict["NORMDKD"] is NormDKD
    assert distiller_dict["NormKD"] is NormKDRelease and distiller_dict["NormKD_W_DKD"] is NormDKDRelease
    assert trainer_dict["fast"] is FastTrainer and trainer_dict["ddp"] is LoaderFedTrainer
    assert CFG.NORMKD.TEMPERATURE_NORM == 2.0 and CFG.NORMKD.LOSS.CE_WEIGHT == 0.1 and CFG.NORMKD.LOSS.KD_WEIGHT == 0.9
    assert (CFG.NORMDKD.TEMPERATURE_NORM, CFG.NORMDKD.CE_WEIGHT, CFG.NORMDKD.ALPHA, CFG.NORMDKD.BETA, CFG.NORMDKD.WARMUP) == (
        2.0, 1.0, 1.0, 8.0, 20,
    )  # fmt: skip
    assert CFG.NormKD.LOSS.KD_WEIGHT == 0.9 and CFG.NormKD_W_DKD.WARMUP == 20
    assert distiller_dict["KD_LS"] is KDLS and distiller_dict["DKD_LS"] is DKDLS
    assert (CFG.KD_LS.TEMPERATURE, CFG.KD_LS.LOSS.CE_WEIGHT, CFG.KD_LS.LOSS.KD_WEIGHT) == (2.0, 0.1, 9.0)
    assert (CFG.DKD_LS.T, CFG.DKD_LS.KD_WEIGHT, CFG.DKD_LS.ALPHA, CFG.DKD_LS.BETA, CFG.DKD_LS.WARMUP) == (
        2.0, 9.0, 1.0, 8.0, 20,
    )  # fmt: skip
    assert CFG.SOLVER.AMP is False and CFG.EXPERIMENT.SEED == -1
    names = {(p.group, p.name): p for p in plugins}
    assert names[("mdistiller.distillers", "NORMKD")].distribution == "normkd-plugin"
    # the host's own entries are untouched
    assert distiller_dict["KD"].__module__ == "mdistiller.distillers.KD"


def test_register_is_idempotent():
    from mdistiller.distillers import distiller_dict
    from mdistiller.engine.cfg import CFG

    import normkd_plugin

    first = normkd_plugin.register()
    before = (dict(distiller_dict), CFG.dump())
    assert normkd_plugin.register() == first
    assert (dict(distiller_dict), CFG.dump()) == before


class _FakeDist:
    """A stand-in installed distribution (the pluggy test pattern) declaring entry points."""

    def __init__(self, name, eps):
        self.metadata = {"Name": name}
        self.version = "9.9"
        self.entry_points = [md.EntryPoint(n, v, g) for n, v, g in eps]


class ThirdPartyDistiller:
    """A distiller of another distribution, with its own node."""

    @classmethod
    def cfg_defaults(cls):
        return CN({"THIRDPARTY": CN({"WEIGHT": 0.5})})


@pytest.fixture
def fake_dists(monkeypatch):
    def install(*dists):
        real = list(md.distributions())
        monkeypatch.setattr(md, "distributions", lambda: real + list(dists))

    yield install
    from mdistiller.distillers import distiller_dict
    from mdistiller.engine.cfg import CFG

    distiller_dict.pop("THIRDPARTY", None)
    CFG.pop("THIRDPARTY", None)


def test_entry_points_of_other_distributions_are_registered(fake_dists):
    from mdistiller.distillers import distiller_dict
    from mdistiller.engine.cfg import CFG

    import normkd_plugin

    fake_dists(
        _FakeDist("thirdparty-kd", [("THIRDPARTY", "test_registry:ThirdPartyDistiller", "mdistiller.distillers")])
    )
    plugins = normkd_plugin.register()
    assert distiller_dict["THIRDPARTY"] is ThirdPartyDistiller
    assert CFG.THIRDPARTY.WEIGHT == 0.5
    assert any(p.name == "THIRDPARTY" and p.distribution == "thirdparty-kd" for p in plugins)


def test_a_name_taken_by_another_class_fails_naming_entry_point_and_distribution(fake_dists):
    import normkd_plugin

    fake_dists(_FakeDist("evil-kd", [("KD", "test_registry:ThirdPartyDistiller", "mdistiller.distillers")]))
    with pytest.raises(
        normkd_plugin.PluginError, match=r"'KD'.*evil-kd.*already registered to mdistiller\.distillers\.KD\.KD"
    ):
        normkd_plugin.register()


def test_an_entry_point_that_fails_to_import_names_it(fake_dists):
    import normkd_plugin

    fake_dists(_FakeDist("broken-kd", [("BROKEN", "no_such_module_xyz:Thing", "mdistiller.distillers")]))
    with pytest.raises(
        normkd_plugin.PluginError, match=r"cannot import entry point 'BROKEN'.*broken-kd.*ModuleNotFoundError"
    ):
        normkd_plugin.register()


def test_conflicting_config_default_is_refused():
    from normkd_plugin._registry import PluginError, merge_defaults

    cfg = CN({"KD": CN({"TEMPERATURE": 4})})
    with pytest.raises(PluginError, match=r"KD\.TEMPERATURE.*4.*2"):
        merge_defaults(cfg, CN({"KD": CN({"TEMPERATURE": 2})}), "test")


def test_installed_metadata_declares_our_entry_points():
    eps = md.distribution("normkd-plugin").entry_points
    got = {(e.group, e.name) for e in eps}
    names = ("NORMKD", "NORMDKD", "NormKD", "NormKD_W_DKD", "KD_LS", "DKD_LS")
    assert {("mdistiller.distillers", n) for n in names} <= got
    assert {("mdistiller.trainers", "fast"), ("mdistiller.trainers", "ddp")} <= got
