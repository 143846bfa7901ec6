"""normkd-temperatures: σ, T_n and the KL weights against float64 references, the real resnet56 figures, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from conftest import CIFAR_DIR, REPO, TEACHER_RESNET56, needs_data, needs_mdistiller
from normkd_plugin.temperatures import (
    LSKD_DEFAULTS,
    PERCENTILES,
    TemperatureError,
    find,
    kl_weights,
    logit_std,
    main,
    pair_settings,
    per_class_mean,
    summarize,
)


def _percentile(sorted_values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default): rank h = (n − 1)·p/100."""
    h = (len(sorted_values) - 1) * p / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (h - lo) * (sorted_values[hi] - sorted_values[lo])


def _reference(rows: np.ndarray) -> dict:
    """σ per row (N − 1 denominator, float64) and its mean, sample std and percentiles, written out."""
    rows = rows.astype(np.float64)
    c = rows.shape[1]
    sigma = [math.sqrt(sum((x - sum(r) / c) ** 2 for x in r) / (c - 1)) for r in rows.tolist()]
    n = len(sigma)
    mean = sum(sigma) / n
    std = math.sqrt(sum((s - mean) ** 2 for s in sigma) / (n - 1))
    ranked = sorted(sigma)
    return {"sigma": sigma, "mean": mean, "std": std, "pct": {p: _percentile(ranked, p) for p in PERCENTILES}}


def _synthetic_logits(n: int = 203, c: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    scale = torch.rand(n, 1, generator=g) * 5 + 0.5  # a spread of σ, as a teacher's logits have
    z = (torch.randn(n, c, generator=g) * scale + torch.randn(n, 1, generator=g) * 10).float()
    return z, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.quick
def test_sigma_summary_and_weights_match_a_float64_reference():
    z, labels = _synthetic_logits()
    ref = _reference(z.numpy())
    sigma = logit_std(z)
    assert sigma.dtype == torch.float64
    np.testing.assert_allclose(sigma.numpy(), ref["sigma"], rtol=1e-12)
    s = summarize(sigma)
    assert s.n == len(ref["sigma"])
    assert (s.min, s.max) == (pytest.approx(min(ref["sigma"]), rel=1e-12), pytest.approx(max(ref["sigma"]), rel=1e-12))
    assert s.mean == pytest.approx(ref["mean"], rel=1e-12) and s.std == pytest.approx(ref["std"], rel=1e-12)
    for p in PERCENTILES:
        assert s.percentiles[p] == pytest.approx(ref["pct"][p], rel=1e-12), f"p{p}"
    by_class = per_class_mean(sigma, labels, 12)
    for k in range(12):
        members = [x for x, y in zip(ref["sigma"], labels.tolist()) if y == k]
        assert by_class[k] == (pytest.approx(sum(members) / len(members), rel=1e-12) if members else None), k
    settings = pair_settings(find("res56_res20"))
    normkd, kd, ls = kl_weights(sigma, settings)
    t_norm, w = settings.t_norm, settings.normkd_weight
    np.testing.assert_allclose(normkd.numpy(), [w * (t_norm * x) ** 2 for x in ref["sigma"]], rtol=1e-12)
    assert kd == settings.kd_weight * settings.kd_temperature**2
    assert ls == settings.ls_weight * settings.ls_tau**2


def _yaml(name: str) -> dict | None:
    path = REPO / "configs" / f"{name}.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


@pytest.mark.quick
@pytest.mark.parametrize("stem", ["res56_res20", "res32x4_res8x4", "vgg13_mv2"])
def test_settings_are_the_packaged_configs(stem):
    s = pair_settings(find(stem))
    normkd, kd, ls = _yaml(f"cifar100/normkd/{stem}"), _yaml(f"cifar100/kd/{stem}"), _yaml(f"cifar100/kd_ls/{stem}")
    assert (s.t_norm, s.normkd_weight) == (normkd["NORMKD"]["TEMPERATURE_NORM"], normkd["NORMKD"]["LOSS"]["KD_WEIGHT"])
    assert (s.kd_temperature, s.kd_weight) == (kd["KD"]["TEMPERATURE"], kd["KD"]["LOSS"]["KD_WEIGHT"])
    if ls is None:
        assert (s.ls_tau, s.ls_weight) == LSKD_DEFAULTS and "README defaults" in s.ls_source
    else:
        assert (s.ls_tau, s.ls_weight) == (ls["KD_LS"]["TEMPERATURE"], ls["KD_LS"]["LOSS"]["KD_WEIGHT"])


@pytest.mark.quick
def test_a_packaged_kd_ls_config_replaces_the_defaults_and_a_missing_kd_config_is_named():
    configs = {
        "cifar100/normkd/res56_res20": _yaml("cifar100/normkd/res56_res20"),
        "cifar100/kd/res56_res20": _yaml("cifar100/kd/res56_res20"),
    }
    configs["cifar100/kd_ls/res56_res20"] = {"KD_LS": {"TEMPERATURE": 3.0, "LOSS": {"KD_WEIGHT": 6.0}}}
    s = pair_settings(find("res56_res20"), read=configs.get)
    assert (s.ls_tau, s.ls_weight, s.ls_source) == (3.0, 6.0, "cifar100/kd_ls/res56_res20")
    assert kl_weights(torch.ones(1), s)[2] == 6.0 * 3.0**2
    del configs["cifar100/kd/res56_res20"]
    with pytest.raises(TemperatureError, match="cifar100/kd/res56_res20"):
        pair_settings(find("res56_res20"), read=configs.get)


@pytest.mark.quick
def test_pairs_are_found_by_stem_or_dataset_and_stem():
    assert find("cifar100/res56_res20") == find("res56_res20")
    assert find("imagenet/r34_r18").teacher == "ResNet34"
    with pytest.raises(TemperatureError, match="did you mean res56_res20"):
        find("res56_res2")


# ---- the command ----------------------------------------------------------------------------------------------


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    """A test split of 37 random images (10 classes used) and random resnet56 / resnet20 checkpoints."""
    from mdistiller.models import cifar_model_dict

    root = tmp_path_factory.mktemp("tiny")
    g = np.random.default_rng(5)
    images = g.integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)
    labels = g.integers(0, 10, 37).astype(np.int64)
    np.savez(root / "test-0-of-1.npz", images=images, labels=labels)
    torch.manual_seed(1)
    teacher = cifar_model_dict["resnet56"][0](num_classes=100)
    student = cifar_model_dict["resnet20"][0](num_classes=100)
    torch.save(teacher.state_dict(), root / "teacher.pt")  # bare state dict, as the shared teacher
    torch.save({"model": student.state_dict()}, root / "student_best")  # the host's student checkpoint
    return root, images, labels, teacher, student


def _host_logits(model, images) -> np.ndarray:
    """Logits of images each put through the host's own test transform (PIL, ToTensor, Normalize)."""
    from mdistiller.dataset.cifar100 import get_cifar100_test_transform
    from PIL import Image

    tf = get_cifar100_test_transform()
    model.eval()
    with torch.no_grad():
        return model(torch.stack([tf(Image.fromarray(im)) for im in images]))[0].numpy()


@needs_mdistiller
def test_command_reports_the_models_sigma_on_the_split(capsys, tiny_split, tmp_path):
    root, images, labels, teacher, student = tiny_split
    code, out, err = _run(
        capsys, "res56_res20", "DATASET.ROOT", str(root), "DISTILLER.TEACHER_CKPT", str(root / "teacher.pt"),
        "--student-ckpt", str(root / "student_best"), "--device", "cpu", "--batch-size", "16",
        "--json", str(tmp_path / "t.json"), "--png", str(tmp_path / "t.png"),
    )  # fmt: skip
    assert code == 0, err
    got = json.loads((tmp_path / "t.json").read_text())
    t_norm = got["settings"]["t_norm"]
    host = [_host_logits(net, images) for net in (teacher, student)]
    for model, z in zip(got["models"], host):
        ref = _reference(z)
        assert model["sigma"]["mean"] == pytest.approx(ref["mean"], rel=1e-5)
        assert model["sigma"]["std"] == pytest.approx(ref["std"], rel=1e-4)
        for p in PERCENTILES:
            assert model["sigma"]["percentiles"][str(p)] == pytest.approx(ref["pct"][p], rel=1e-5)
        assert model["temperature"]["mean"] == pytest.approx(t_norm * ref["mean"], rel=1e-5)
        assert model["top1"] == pytest.approx(100 * float(np.mean(z.argmax(1) == labels)))
        zero = [c for c in range(100) if c not in set(labels.tolist())]
        assert all(model["class_sigma"][c] is None for c in zero) and model["class_sigma"][int(labels[0])] is not None
    weight = got["kl_weight"]["normkd"]
    teacher_ref = _reference(host[0])
    mean_sq = sum(x * x for x in teacher_ref["sigma"]) / len(teacher_ref["sigma"])
    assert weight["mean"] == pytest.approx(got["settings"]["normkd_weight"] * t_norm**2 * mean_sq, rel=1e-5)
    assert got["kl_weight"]["kd"] == 0.9 * 4**2
    assert f"{got['models'][0]['sigma']['mean']:.2f}" in out and "KD+LS" in out
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "t.png").shape[:2] == (504, 1320)


@needs_mdistiller
@pytest.mark.parametrize(
    "argv, expect",
    [
        (["res56_res2"], "pair 'res56_res2' is not a pair of the benchmark; did you mean res56_res20"),
        (["r34_r18"], "is an imagenet pair"),
        (["res56_res20", "DISTILLER.TEACHER", "resnet57"], "DISTILLER.TEACHER"),
        (["res56_res20", "DISTILLER.TEACHER_CKPT", "{root}/nope.pt"], "DISTILLER.TEACHER_CKPT {root}/nope.pt: no such file"),
        (["res56_res20", "DISTILLER.TEACHER_CKPT", "{root}/student_best"], "does not fit teacher 'resnet56'"),
        (["res56_res20", "DISTILLER.TEACHER_CKPT", "{root}/teacher.pt", "--student-ckpt", "{root}/no"], "--student-ckpt {root}/no: no such file"),
        (["res56_res20", "DISTILLER.TEACHER_CKPT", "{root}/teacher.pt", "DATASET.ROOT", "{root}/none"], "{root}/none is not a directory"),
        (["res56_res20", "--png", "{root}/no/such/x.png"], "--png {root}/no/such/x.png: no such folder"),
        (["res56_res20", "--batch-size", "0"], "--batch-size 0"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(capsys, tiny_split, argv, expect):
    root = tiny_split[0]
    code, out, err = _run(capsys, *[a.format(root=root) for a in argv], "--device", "cpu")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("normkd-temperatures: "), err
    assert expect.format(root=root) in err


@needs_mdistiller
def test_pair_must_come_first(capsys):
    code, _, err = _run(capsys, "--device", "cpu")
    assert code == 2 and "PAIR comes first" in err


@needs_data
@needs_mdistiller
def test_resnet56_on_the_cifar100_test_set_matches_the_measured_figures(capsys, tmp_path):
    """The shared teacher's σ on the real test set: mean 3.59, p10 2.88, p90 4.34 (the data README's figures)."""
    if not TEACHER_RESNET56.is_file():
        pytest.skip(f"teacher checkpoint not found: {TEACHER_RESNET56} (set NORMKD_DATA)")
    code, out, err = _run(
        capsys, "res56_res20", "DATASET.ROOT", str(CIFAR_DIR), "DISTILLER.TEACHER_CKPT", str(TEACHER_RESNET56),
        "--device", "cpu", "--json", str(tmp_path / "t.json"),
    )  # fmt: skip
    assert code == 0, err
    teacher = json.loads((tmp_path / "t.json").read_text())["models"][0]
    sigma = teacher["sigma"]
    assert (sigma["n"], round(teacher["top1"], 2)) == (10000, 72.61)
    got = (round(sigma["mean"], 2), round(sigma["percentiles"]["10"], 2), round(sigma["percentiles"]["90"], 2))
    assert got == (3.59, 2.88, 4.34)
