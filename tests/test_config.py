"""Packaged configs against the real host and the published per-pair hyperparameters; config errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_mdistiller

pytestmark = [needs_mdistiller, pytest.mark.quick]

# Independent copy of the authors' per-pair settings: stem -> (LR, DKD beta, NormDKD alpha, beta).
CIFAR = {
    "res56_res20": (0.05, 2, 7, 2),
    "res110_res32": (0.05, 2, 5, 4),
    "res32x4_res8x4": (0.05, 8, 4, 5),
    "wrn40_2_wrn_16_2": (0.05, 6, 4, 5),
    "wrn40_2_wrn_40_1": (0.05, 6, 3, 6),
    "vgg13_vgg8": (0.05, 6, 2, 7),
    "vgg13_mv2": (0.01, 6, 3, 6),
    "res50_mv2": (0.01, 8, 2, 7),
    "res32x4_shuv1": (0.01, 8, 0.5, 8.5),
    "res32x4_shuv2": (0.01, 8, 4, 5),
    "wrn40_2_shuv1": (0.01, 8, 4, 5),
}
METHODS = ("kd", "dkd", "kd_ls", "dkd_ls", "normkd", "normdkd")
ALL = [f"cifar100/{m}/{s}" for s in CIFAR for m in (*METHODS, "vanilla")] + [
    f"imagenet/{p}/{m}" for p in ("r34_r18", "r50_mv1") for m in METHODS
]
# LSKD's released runs, copied from its logs' file names (logs/KD/kd,<teacher>,<student>,<tau>,<lambda>.txt,
# logs/DKD/dkd,<teacher>,<student>,<tau>,<lambda>[,<beta>].txt): stem -> KD+LS (tau, lambda), DKD+LS (tau, lambda,
# beta); a DKD name without beta ran the beta of LSKD's DKD config (8 for these pairs). None: no released run, the
# README default (2, 9) and the pair's DKD beta.
LSKD_LOGS = {
    "res56_res20": ((2, 9), (3, 18, 2.0)),
    "res110_res32": ((2, 9), (2, 15, 2.0)),
    "res32x4_res8x4": ((2, 9), (2, 9, 8.0)),
    "wrn40_2_wrn_16_2": ((2, 9), (2, 12, 2.0)),
    "wrn40_2_wrn_40_1": ((2, 9), (2, 12, 2.0)),
    "vgg13_vgg8": ((3, 9), (2, 15, 2.0)),
    "vgg13_mv2": ((3, 9), (3, 9, 2.0)),
    "res50_mv2": ((3, 1), (2, 15, 2.0)),
    "res32x4_shuv1": (None, None),
    "res32x4_shuv2": ((2, 9), (2, 9, 8.0)),
    "wrn40_2_shuv1": (None, None),
}


def test_89_packaged_configs():
    from normkd_plugin.config import packaged_configs

    names = sorted(c.name for c in packaged_configs())
    assert names == sorted(ALL)


@pytest.mark.parametrize("name", ALL)
def test_config_merges_into_host_cfg_and_names_real_models(name):
    from mdistiller.distillers import distiller_dict
    from mdistiller.models import cifar_model_dict, imagenet_model_dict

    from normkd_plugin.config import load_config

    cfg = load_config(name)
    assert cfg.is_frozen()
    models = imagenet_model_dict if cfg.DATASET.TYPE == "imagenet" else cifar_model_dict
    assert cfg.DISTILLER.TEACHER in models and cfg.DISTILLER.STUDENT in models
    assert cfg.DISTILLER.TYPE in distiller_dict
    assert cfg.LOG.WANDB is False


@pytest.mark.parametrize("stem", list(CIFAR))
def test_cifar_per_pair_hyperparameters(stem):
    from normkd_plugin.config import load_config

    lr, dkd_beta, alpha, beta = CIFAR[stem]
    cfgs = {m: load_config(f"cifar100/{m}/{stem}") for m in METHODS}
    for cfg in cfgs.values():
        s = cfg.SOLVER
        assert (s.LR, s.BATCH_SIZE, s.EPOCHS, list(s.LR_DECAY_STAGES), s.WEIGHT_DECAY, s.MOMENTUM) == (
            lr, 64, 240, [150, 180, 210], 5e-4, 0.9,
        )  # fmt: skip
    assert (cfgs["kd"].KD.TEMPERATURE, cfgs["kd"].KD.LOSS.CE_WEIGHT, cfgs["kd"].KD.LOSS.KD_WEIGHT) == (4, 0.1, 0.9)
    d = cfgs["dkd"].DKD
    assert (d.ALPHA, d.BETA, d.T, d.WARMUP, d.CE_WEIGHT) == (1.0, dkd_beta, 4.0, 20, 1.0)
    n = cfgs["normkd"].NORMKD
    assert (n.TEMPERATURE_NORM, n.LOSS.CE_WEIGHT, n.LOSS.KD_WEIGHT) == (2.0, 0.1, 0.9)
    nd = cfgs["normdkd"].NORMDKD
    assert (nd.TEMPERATURE_NORM, nd.CE_WEIGHT, nd.ALPHA, nd.BETA, nd.WARMUP) == (2.0, 1.0, alpha, beta, 20)
    tags = {cfg.EXPERIMENT.PROJECT + "/" + cfg.EXPERIMENT.TAG for cfg in cfgs.values()}
    assert len(tags) == len(METHODS)


@pytest.mark.parametrize("stem", list(CIFAR))
def test_cifar_ls_configs_carry_lskds_released_settings(stem):
    """KD+LS: CE 0.1, LSKD's tau and lambda; DKD+LS: CE 1, alpha 1, LSKD's beta, tau and lambda, warm-up 20; both with
    the pair's solver. Where LSKD released no run, the README default and a comment that says so."""
    from normkd_plugin.config import load_config, resolve_config

    lr, dkd_beta = CIFAR[stem][:2]
    kd_ls, dkd_ls = LSKD_LOGS[stem]
    kd_ls, dkd_ls = kd_ls or (2, 9), dkd_ls or (2, 9, dkd_beta)
    kd, dkd = load_config(f"cifar100/kd_ls/{stem}"), load_config(f"cifar100/dkd_ls/{stem}")
    for cfg in (kd, dkd):
        s = cfg.SOLVER
        assert (s.LR, s.BATCH_SIZE, s.EPOCHS, list(s.LR_DECAY_STAGES), s.WEIGHT_DECAY, s.MOMENTUM) == (
            lr, 64, 240, [150, 180, 210], 5e-4, 0.9,
        )  # fmt: skip
    assert (kd.KD_LS.TEMPERATURE, kd.KD_LS.LOSS.KD_WEIGHT, kd.KD_LS.LOSS.CE_WEIGHT) == (*kd_ls, 0.1)
    d = dkd.DKD_LS
    assert (d.T, d.KD_WEIGHT, d.BETA, d.ALPHA, d.CE_WEIGHT, d.WARMUP) == (*dkd_ls, 1.0, 1.0, 20)
    for method, released in (("kd_ls", LSKD_LOGS[stem][0]), ("dkd_ls", LSKD_LOGS[stem][1])):
        text = resolve_config(f"cifar100/{method}/{stem}").read_text()
        assert ("README default" in text) == (released is None), (method, stem)
        assert ("logs/" in text) == (released is not None)
    assert kd.EXPERIMENT.TAG.startswith("kd_ls,") and dkd.EXPERIMENT.TAG.startswith("dkd_ls,")


def test_imagenet_ls_configs_are_lskds_readme_default_on_the_pairs_kd_and_dkd():
    from normkd_plugin.config import load_config

    for pair, kd_ce, dkd_beta in (("r34_r18", 1.0, 0.5), ("r50_mv1", 0.5, 2.0)):
        kd, dkd = load_config(f"imagenet/{pair}/kd_ls"), load_config(f"imagenet/{pair}/dkd_ls")
        for cfg in (kd, dkd):
            assert (cfg.SOLVER.BATCH_SIZE, cfg.SOLVER.LR, cfg.SOLVER.EPOCHS, cfg.DATASET.TYPE) == (
                512,
                0.2,
                100,
                "imagenet",
            )
        assert (kd.KD_LS.TEMPERATURE, kd.KD_LS.LOSS.KD_WEIGHT, kd.KD_LS.LOSS.CE_WEIGHT) == (2.0, 9.0, kd_ce)
        d = dkd.DKD_LS
        assert (d.T, d.KD_WEIGHT, d.ALPHA, d.BETA, d.CE_WEIGHT, d.WARMUP) == (2.0, 9.0, 1.0, dkd_beta, 1.0, 1)


def test_imagenet_hyperparameters():
    from normkd_plugin.config import load_config

    for pair, dkd_beta, t_norm_dkd in (("r34_r18", 0.5, 0.5), ("r50_mv1", 2.0, 0.75)):
        c = {m: load_config(f"imagenet/{pair}/{m}") for m in METHODS}
        for cfg in c.values():
            assert (cfg.SOLVER.BATCH_SIZE, cfg.SOLVER.LR, cfg.SOLVER.EPOCHS, list(cfg.SOLVER.LR_DECAY_STAGES)) == (
                512,
                0.2,
                100,
                [30, 60, 90],
            )
            assert cfg.SOLVER.WEIGHT_DECAY == 1e-4 and cfg.DATASET.TYPE == "imagenet"
        assert (c["kd"].KD.TEMPERATURE, c["kd"].KD.LOSS.CE_WEIGHT, c["kd"].KD.LOSS.KD_WEIGHT) == (1, 0.5, 0.5)
        assert (c["dkd"].DKD.BETA, c["dkd"].DKD.T, c["dkd"].DKD.WARMUP) == (dkd_beta, 1.0, 1)
        assert (c["normkd"].NORMKD.TEMPERATURE_NORM, c["normkd"].NORMKD.LOSS.CE_WEIGHT) == (1.0, 0.5)
        nd = c["normdkd"].NORMDKD
        assert (nd.TEMPERATURE_NORM, nd.ALPHA, nd.BETA, nd.WARMUP) == (t_norm_dkd, 1.0, 1.0, 1)


def test_config_by_path_and_by_name_with_yaml_suffix(tmp_path):
    from normkd_plugin.config import load_config, resolve_config

    p = resolve_config("cifar100/normkd/res32x4_res8x4.yaml")
    assert p.is_file()
    own = tmp_path / "mine.yaml"
    own.write_text(p.read_text())
    assert load_config(str(own)).DISTILLER.TYPE == "NORMKD"


def test_unknown_name_suggests_close_ones():
    from normkd_plugin.config import ConfigError, resolve_config

    with pytest.raises(ConfigError, match="cifar100/normkd/res32x4_res8x4"):
        resolve_config("cifar100/normkd/res32x4_res8")


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    from normkd_plugin.config import ConfigError, load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("DISTILLER:\n  TYPE: NORMKD\nNORMKD:\n  TEMPERATURE_NROM: 2.0\n")
    with pytest.raises(
        ConfigError, match=r"bad\.yaml.*NORMKD\.TEMPERATURE_NROM \(did you mean NORMKD\.TEMPERATURE_NORM"
    ):
        load_config(str(bad))  # the suggestion a command-line override gets too
    bad.write_text("DISTILLER:\n  TYPE: NORMKD\nZZZZ:\n  QQQ: 2.0\n")
    with pytest.raises(ConfigError, match=r"key: ZZZZ \(is the plugin that defines it installed\?\)"):
        load_config(str(bad))


@pytest.mark.parametrize(
    ("text", "seeds"), [("0,1,2", [0, 1, 2]), (" 3 , 4 ", [3, 4]), ("5,,6,", [5, 6]), ("-1", [-1])]
)
def test_parse_seeds_reads_comma_separated_integers(text, seeds):
    from normkd_plugin.config import parse_seeds

    assert parse_seeds(text) == seeds


@pytest.mark.parametrize(
    ("text", "flag", "message"),
    [
        ("0,x", "--seeds", "--seeds '0,x': expected comma-separated integers such as 0,1,2"),
        ("1.5", "--seeds", "--seeds '1.5': expected comma-separated integers such as 0,1,2"),
        (",", "--seeds", "--seeds ',': no seed given; expected comma-separated integers such as 0,1,2"),
        ("", "--other", "--other '': no seed given; expected comma-separated integers such as 0,1,2"),
    ],
)
def test_parse_seeds_refuses_in_one_line_naming_the_flag_and_value(text, flag, message):
    from normkd_plugin.config import ConfigError, parse_seeds

    with pytest.raises(ConfigError) as exc:
        parse_seeds(text, flag)
    assert str(exc.value) == message


def test_bad_overrides_name_the_one_command_line_pair():
    from normkd_plugin.config import ConfigError, load_config

    good = ["SOLVER.BATCH_SIZE", "16", "EXPERIMENT.SEED", "3"]
    cases = [
        (
            ["DISTILLER.TYPE", "NORMKDD"],
            "command-line override DISTILLER.TYPE NORMKDD: not a registered distiller; did you mean NORMKD",
        ),
        (
            ["DISTILLER.STUDENT", "resnet21"],
            "command-line override DISTILLER.STUDENT resnet21: not a registered cifar100 model",
        ),
        (
            ["SOLVER.TRAINER", "fats"],
            "command-line override SOLVER.TRAINER fats: not a registered trainer; did you mean fast",
        ),
        (["SOLVER.LRR", "0.1"], "command-line override SOLVER.LRR 0.1: no such config key; did you mean SOLVER.LR"),
        (["NORMKDD.TEMPERATURE_NORM", "2.0"], "command-line override NORMKDD.TEMPERATURE_NORM 2.0: no such config key"),
        (["SOLVER", "1"], "command-line override SOLVER 1: SOLVER is a group of keys"),
        (
            ["SOLVER.LR", "abc"],
            r"command-line override SOLVER.LR abc: expected a value of type float \(like 0.05\), got str 'abc'",
        ),
        (
            ["SOLVER.LR", "1"],
            r"command-line override SOLVER.LR 1: expected a value of type float \(like 0.05\), got int 1 \(write 1.0\)",
        ),
        (
            ["SOLVER.EPOCHS", "2.5"],
            r"command-line override SOLVER.EPOCHS 2.5: expected a value of type int \(like 240\), got float 2.5$",
        ),
        (["SOLVER.LR"], "command-line override SOLVER.LR has no VALUE; overrides are KEY VALUE pairs"),
    ]
    for bad, message in cases:
        with pytest.raises(ConfigError, match=f"^{message}") as info:
            load_config("cifar100/normkd/res56_res20", [*good, *bad])
        # only the pair at fault: neither the other overrides nor the file are named
        assert "BATCH_SIZE" not in str(info.value) and "yaml" not in str(info.value), str(info.value)


def test_bad_names_in_a_file_name_the_file(tmp_path):
    from normkd_plugin.config import ConfigError, load_config, resolve_config

    bad = tmp_path / "typo.yaml"
    bad.write_text(resolve_config("cifar100/normkd/res56_res20").read_text().replace("resnet20", "resnet21"))
    with pytest.raises(ConfigError, match=r"typo\.yaml: DISTILLER.STUDENT 'resnet21': not a registered cifar100 model"):
        load_config(str(bad))


C = "cifar100/normkd/res56_res20"
BAD_VALUES = [
    # (config, KEY, VALUE, what the message says is expected)
    (C, "NORMKD.TEMPERATURE_NORM", "0.0", "a finite temperature > 0"),
    (C, "NORMKD.TEMPERATURE_NORM", "-2.0", "a finite temperature > 0"),
    (C, "NORMKD.LOSS.CE_WEIGHT", "-0.1", "a finite weight >= 0"),
    ("cifar100/normdkd/res56_res20", "NORMDKD.TEMPERATURE_NORM", "0.0", "a finite temperature > 0"),
    ("cifar100/normdkd/res56_res20", "NORMDKD.WARMUP", "0", "a warm-up > 0"),
    ("cifar100/normdkd/res56_res20", "NORMDKD.ALPHA", "-1.0", "a finite weight >= 0"),
    ("cifar100/normdkd/res56_res20", "NORMDKD.BETA", "-8.0", "a finite weight >= 0"),
    ("cifar100/normdkd/res56_res20", "NORMDKD.CE_WEIGHT", "-1.0", "a finite weight >= 0"),
    ("cifar100/kd/res56_res20", "KD.TEMPERATURE", "0", "a finite temperature > 0"),
    ("cifar100/kd/res56_res20", "KD.LOSS.KD_WEIGHT", "-0.9", "a finite weight >= 0"),
    ("cifar100/dkd/res56_res20", "DKD.T", "-4.0", "a finite temperature > 0"),
    ("cifar100/dkd/res56_res20", "DKD.WARMUP", "-1", "a warm-up > 0"),
    ("cifar100/dkd/res56_res20", "DKD.BETA", "-2.0", "a finite weight >= 0"),
    ("cifar100/kd_ls/res56_res20", "KD_LS.TEMPERATURE", "0.0", "a finite temperature > 0"),
    ("cifar100/kd_ls/res56_res20", "KD_LS.LOSS.KD_WEIGHT", "-9.0", "a finite weight >= 0"),
    ("cifar100/kd_ls/res56_res20", "KD_LS.LOSS.CE_WEIGHT", "-0.1", "a finite weight >= 0"),
    ("cifar100/dkd_ls/res56_res20", "DKD_LS.T", "-2.0", "a finite temperature > 0"),
    ("cifar100/dkd_ls/res56_res20", "DKD_LS.WARMUP", "0", "a warm-up > 0"),
    ("cifar100/dkd_ls/res56_res20", "DKD_LS.KD_WEIGHT", "-18.0", "a finite weight >= 0"),
    ("cifar100/dkd_ls/res56_res20", "DKD_LS.ALPHA", "-1.0", "a finite weight >= 0"),
    ("cifar100/dkd_ls/res56_res20", "DKD_LS.BETA", "-2.0", "a finite weight >= 0"),
    ("cifar100/dkd_ls/res56_res20", "DKD_LS.CE_WEIGHT", "-1.0", "a finite weight >= 0"),
    (C, "SOLVER.BATCH_SIZE", "0", "an integer >= 1"),
    (C, "DATASET.TEST.BATCH_SIZE", "0", "an integer >= 1"),
    (C, "SOLVER.FAST.EVAL_BATCH_SIZE", "-5", "an integer >= 1"),
    (C, "SOLVER.EPOCHS", "0", "an integer >= 1"),
    (C, "SOLVER.LR", "0.0", "a finite learning rate > 0"),
    (C, "SOLVER.LR", "-0.05", "a finite learning rate > 0"),
    (C, "SOLVER.FAST.ITERS_PER_EPOCH", "-1", r"an integer >= 0 \(0: full epochs\)"),
    (
        C,
        "SOLVER.LR_DECAY_STAGES",
        "[180,150,210]",
        r"SOLVER.LR_DECAY_STAGES \[180, 150, 210\] to be strictly increasing",
    ),
    (
        C,
        "SOLVER.LR_DECAY_STAGES",
        "[150,150]",
        "SOLVER.LR_DECAY_STAGES \\[150, 150\\] to be strictly increasing whole epochs within 1..240",
    ),
    (C, "SOLVER.LR_DECAY_STAGES", "[0,180]", r"SOLVER.LR_DECAY_STAGES \[0, 180\] .* within 1..240"),
    (C, "SOLVER.LR_DECAY_STAGES", "[150,250]", r"SOLVER.LR_DECAY_STAGES \[150, 250\] .* within 1..240"),
    (C, "SOLVER.LR_DECAY_STAGES", "[1.5]", r"SOLVER.LR_DECAY_STAGES \[1.5\] to be strictly increasing whole epochs"),
    (
        C,
        "SOLVER.EPOCHS",
        "2",
        r"SOLVER.LR_DECAY_STAGES \[150, 180, 210\] to be strictly increasing whole epochs within 1..2 .*'\[\]' for no decay",
    ),
]


@pytest.mark.parametrize(("cfg", "key", "value", "expected"), BAD_VALUES, ids=[f"{k}={v}" for _, k, v, _ in BAD_VALUES])
def test_bad_values_are_refused_naming_key_value_and_range(cfg, key, value, expected):
    from normkd_plugin.config import ConfigError, load_config

    with pytest.raises(
        ConfigError, match=f"^command-line override {re.escape(key)} {re.escape(value)}: expected {expected}"
    ):
        load_config(cfg, ["EXPERIMENT.SEED", "1", key, value])


def test_bad_value_in_a_file_names_the_file_key_and_value(tmp_path):
    from normkd_plugin.config import ConfigError, load_config, resolve_config

    text = resolve_config("cifar100/normdkd/res56_res20").read_text()
    assert "WARMUP: 20" in text
    bad = tmp_path / "warm.yaml"
    bad.write_text(text.replace("WARMUP: 20", "WARMUP: 0"))
    with pytest.raises(ConfigError, match=r"warm\.yaml: NORMDKD.WARMUP 0: expected a warm-up > 0"):
        load_config(str(bad))
    bad.write_text(text.replace("TEMPERATURE_NORM: 2.0", "TEMPERATURE_NORM: .nan"))
    with pytest.raises(
        ConfigError, match=r"warm\.yaml: NORMDKD.TEMPERATURE_NORM nan: expected a finite temperature > 0"
    ):
        load_config(str(bad))


def test_only_the_selected_distillers_node_is_checked():
    from normkd_plugin.config import load_config

    # KD's node is not read by NORMKD, so a KD value out of range does not stop a NORMKD run
    cfg = load_config(C, ["KD.TEMPERATURE", "0"])
    assert cfg.KD.TEMPERATURE == 0 and cfg.DISTILLER.TYPE == "NORMKD"


def test_release_nodes_are_checked(tmp_path):
    from normkd_plugin.config import ConfigError, load_config

    f = tmp_path / "release.yaml"
    f.write_text(
        "DISTILLER:\n  TYPE: NormKD_W_DKD\n  TEACHER: resnet32x4\n  STUDENT: resnet8x4\n"
        "NormKD_W_DKD:\n  TEMPERATURE_NORM: 2.0\n  WARMUP: 20\n"
    )
    with pytest.raises(ConfigError, match="override NormKD_W_DKD.TEMPERATURE_NORM -1.0: expected a finite temperature"):
        load_config(str(f), ["NormKD_W_DKD.TEMPERATURE_NORM", "-1.0"])
    with pytest.raises(ConfigError, match="override NormKD_W_DKD.WARMUP 0: expected a warm-up > 0"):
        load_config(str(f), ["NormKD_W_DKD.WARMUP", "0"])
    f.write_text("DISTILLER:\n  TYPE: NormKD\n  TEACHER: resnet32x4\n  STUDENT: resnet8x4\n")
    with pytest.raises(ConfigError, match="override NormKD.TEMPERATURE_NORM 0.0: expected a finite temperature"):
        load_config(str(f), ["NormKD.TEMPERATURE_NORM", "0.0"])


def test_short_run_with_its_own_decay_stages_is_accepted():
    from normkd_plugin.config import load_config

    assert load_config(C, ["SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES", "[]"]).SOLVER.EPOCHS == 2
    assert list(load_config(C, ["SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES", "[1,2]"]).SOLVER.LR_DECAY_STAGES) == [
        1,
        2,
    ]


def test_log_prefix_must_be_writable_or_creatable(tmp_path, monkeypatch):
    from normkd_plugin.config import ConfigError, load_config

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match=r"override LOG.PREFIX .*a-file/out: expected a folder .*a-file is a file"):
        load_config(C, ["LOG.PREFIX", str(tmp_path / "a-file" / "out")])
    # a folder that does not exist yet is fine when its nearest existing parent is writable; nothing is created
    assert load_config(C, ["LOG.PREFIX", str(tmp_path / "new" / "deeper")]).LOG.PREFIX.endswith("deeper")
    assert not (tmp_path / "new").exists()
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(ConfigError, match=r"LOG.PREFIX .*locked/out: expected a folder .*locked is not writable"):
        load_config(C, ["LOG.PREFIX", str(locked / "out")])


def test_release_config_runs_unchanged(tmp_path):
    """A config written for the authors' release (DISTILLER.TYPE NormKD_W_DKD and its nodes)."""
    from mdistiller.distillers import distiller_dict
    from mdistiller.models import cifar_model_dict

    from normkd_plugin.config import load_config

    f = tmp_path / "release.yaml"
    f.write_text(
        "EXPERIMENT:\n  TAG: normkd_w_dkd,res32x4,res8x4\nDISTILLER:\n  TYPE: NormKD_W_DKD\n"
        "  TEACHER: resnet32x4\n  STUDENT: resnet8x4\nNormKD_W_DKD:\n  TEMPERATURE_NORM: 2.0\n"
        "  CE_WEIGHT: 1.0\n  ALPHA: 4.0\n  BETA: 5.0\n  WARMUP: 20\n  LOSS: {}\n"
        "NormKD:\n  TEMPERATURE_NORM: 2.0\n  LOSS:\n    CE_WEIGHT: 0.1\n    KD_WEIGHT: 0.9\n"
    )
    cfg = load_config(str(f))
    d = distiller_dict[cfg.DISTILLER.TYPE](
        cifar_model_dict["resnet8x4"][0](num_classes=100), cifar_model_dict["resnet32x4"][0](num_classes=100), cfg
    )
    assert (d.alpha, d.beta, d.t_norm) == (4.0, 5.0, 2.0)


def test_normkd_configs_lists_89():
    out = subprocess.run(
        [sys.executable, "-m", "normkd_plugin.configs_cli"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().endswith("89 configs")
    assert "cifar100  NONE     resnet56    resnet20     cifar100/vanilla/res56_res20" in out
    assert "cifar100  NORMDKD  resnet32x4  ShuffleV1    cifar100/normdkd/res32x4_shuv1" in out
    assert "cifar100  KD_LS    resnet56    resnet20     cifar100/kd_ls/res56_res20" in out
    assert "imagenet  DKD_LS   ResNet50    MobileNetV1  imagenet/r50_mv1/dkd_ls" in out
    ls = subprocess.run(
        [sys.executable, "-m", "normkd_plugin.configs_cli", "--method", "kd_ls"], capture_output=True, text=True
    ).stdout
    assert ls.strip().endswith("13 configs") and ls.count("KD_LS") == 13


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "nrmkd"], "normkd-configs: --method 'nrmkd': no packaged config has it; did you mean NORMKD"),
        (
            ["--dataset", "cifar10"],
            "normkd-configs: --dataset 'cifar10': no packaged config has it; did you mean cifar100?",
        ),
    ],
)
def test_normkd_configs_filter_that_matches_nothing_is_an_error(argv, message):
    proc = subprocess.run([sys.executable, "-m", "normkd_plugin.configs_cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.startswith(message)


def test_normkd_configs_path_prints_the_file():
    out = subprocess.run(
        [sys.executable, "-m", "normkd_plugin.configs_cli", "--path", "cifar100/normkd/res56_res20"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert out.endswith("res56_res20.yaml") and "NORMKD" in Path(out).read_text()


def test_run_name_does_not_depend_on_the_order_of_the_overrides():
    from normkd_plugin.config import load_config, run_name

    a = ["SOLVER.TRAINER", "fast", "SOLVER.EPOCHS", "3", "SOLVER.LR_DECAY_STAGES", "[2]", "DATASET.ROOT", "/d"]
    b = [
        "SOLVER.EPOCHS",
        "2",
        "DATASET.ROOT",
        "/e",
        "SOLVER.LR_DECAY_STAGES",
        "[2]",
        "SOLVER.EPOCHS",
        "3",
        "SOLVER.TRAINER",
        "fast",
    ]
    names = {run_name(load_config("cifar100/kd/res56_res20", o), o) for o in (a, b)}
    assert names == {"cifar100/kd,res56,res20,SOLVER.EPOCHS:3,SOLVER.LR_DECAY_STAGES:[2],SOLVER.TRAINER:fast"}


def test_a_duplicate_key_is_an_error_naming_the_key_and_both_lines(tmp_path):
    from normkd_plugin.config import ConfigError, load_config

    bad = tmp_path / "dup.yaml"
    bad.write_text("DISTILLER:\n  TYPE: NORMKD\nSOLVER:\n  LR: 0.05\n  EPOCHS: 240\n  LR: 0.5\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: line 6: duplicate key 'LR' \(first given on line 4\)"):
        load_config(str(bad))
    bad.write_text("SOLVER:\n  LR: 0.05\nSOLVER:\n  EPOCHS: 3\n")  # a whole section twice
    with pytest.raises(ConfigError, match=r"line 3: duplicate key 'SOLVER' \(first given on line 1\)"):
        load_config(str(bad))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty config file"),
        (b"# only a comment\n\n", "empty config file"),
        (b"- a\n- list\n", "expected a mapping of config keys, got a list"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff", "not a text file"),
        (b"SOLVER: {LR: [unclosed\n", "not valid YAML"),
    ],
)
def test_an_empty_or_garbage_config_file_is_one_error(tmp_path, content, expected):
    from normkd_plugin.config import ConfigError, load_config

    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(expected)) as info:
        load_config(str(bad))
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["../outside", "../../outside", "/tmp/elsewhere", "a/../../b"])
def test_a_run_name_cannot_leave_log_prefix(tmp_path, name):
    from normkd_plugin.config import ConfigError, load_config, run_folder_path, run_name

    cfg = load_config("cifar100/normkd/res56_res20", ["EXPERIMENT.NAME", name, "LOG.PREFIX", str(tmp_path / "out")])
    with pytest.raises(ConfigError, match="must stay inside LOG.PREFIX"):
        run_folder_path(cfg, run_name(cfg))
    inside = load_config("cifar100/normkd/res56_res20", ["EXPERIMENT.NAME", "ok", "LOG.PREFIX", str(tmp_path / "o")])
    assert run_folder_path(inside, run_name(inside)) == str(tmp_path / "o" / "cifar100" / "ok")


def test_a_too_long_run_name_is_shortened_without_collisions(tmp_path):
    from normkd_plugin.config import load_config, run_folder_path, run_name

    names = []
    for last in "ab":
        cfg = load_config(
            "cifar100/normkd/res56_res20", ["EXPERIMENT.NAME", "x" * 300 + last, "LOG.PREFIX", str(tmp_path)]
        )
        names.append(run_name(cfg))
        folder = run_folder_path(cfg, names[-1])
        os.makedirs(folder)  # the file system takes it
    assert names[0] != names[1]
    assert all(len(n.split("/")[1].encode()) == 255 and n.split("/")[1].startswith("x" * 200) for n in names)
    assert re.fullmatch(r"x+~[0-9a-f]{16}", names[0].split("/")[1])
    short = load_config("cifar100/normkd/res56_res20", ["EXPERIMENT.NAME", "plain"])
    assert run_name(short) == "cifar100/plain"


@pytest.mark.parametrize("seed", ["99999999999999999999", "9223372036854775808"])
def test_a_seed_that_overflows_is_refused(seed):
    from normkd_plugin.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"EXPERIMENT.SEED {seed}: expected an integer below 2\*\*63"):
        load_config("cifar100/normkd/res56_res20", ["EXPERIMENT.SEED", seed])
