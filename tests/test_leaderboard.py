"""normkd-leaderboard on run folders written in the host's exact worklog.txt format."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import needs_mdistiller
from normkd_plugin.leaderboard import cli
from normkd_plugin.leaderboard.render import curves_figure, plot_curves
from normkd_plugin.leaderboard.results import discover_runs
from normkd_plugin.leaderboard.table import aggregate, split_duplicates


def host_worklog(accs, finished=True, lr=0.05):
    """Exactly what mdistiller's BaseTrainer.log and train() write."""
    text = ""
    for epoch, acc in enumerate(accs, 1):
        lines = ["-" * 25 + os.linesep, f"epoch: {epoch}" + os.linesep, f"lr: {lr:.2f}" + os.linesep]
        for k, v in (
            ("train_acc", acc + 5),
            ("train_loss", 1.5),
            ("test_acc", acc),
            ("test_acc_top5", acc + 20),
            ("test_loss", 1.2),
        ):
            lines.append(f"{k}: {v:.2f}" + os.linesep)
        lines.append("-" * 25 + os.linesep)
        text += "".join(lines)
    if finished:
        text += "best_acc\t" + f"{float(max(accs)):.2f}"
    return text


def make_run(root: Path, name: str, accs, finished=True, config: dict | None = None, project="cifar100"):
    """A run folder whose worklog logs ``accs`` as the last epochs' test_acc; a finished run logs every epoch of
    its config's SOLVER.EPOCHS (the first accuracy repeated before ``accs``: best and last stay theirs)."""
    folder = root / project / name
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        if finished:
            accs = [accs[0]] * (config["SOLVER"]["EPOCHS"] - len(accs)) + list(accs)
    (folder / "worklog.txt").write_text(host_worklog(accs, finished))
    return folder


def cfg(method, teacher="resnet56", student="resnet20", seed=0, epochs=3, trainer="base"):
    return {
        "DATASET": {"TYPE": "cifar100"},
        "DISTILLER": {"TYPE": method.upper(), "TEACHER": teacher, "STUDENT": student},
        "EXPERIMENT": {"SEED": seed},
        "SOLVER": {"EPOCHS": epochs, "TRAINER": trainer},
    }


@pytest.fixture
def runs_root(tmp_path):
    make_run(tmp_path, "kd,res56,res20,seed:0", [60.0, 70.0, 69.5])  # host-style name, no config
    make_run(tmp_path, "kd,res56,res20,seed:1", [61.0, 71.0, 70.5])
    make_run(tmp_path, "normkd-0", [62.0, 72.0, 71.0], config=cfg("normkd", seed=0))
    make_run(tmp_path, "normkd-1", [63.0, 72.5, 72.5], config=cfg("normkd", seed=1))
    make_run(tmp_path, "normkd-2", [50.0], finished=False, config=cfg("normkd", seed=2))
    make_run(tmp_path, "dkd,res56,res20", [60.0, 71.5, 71.5])
    make_run(tmp_path, "normdkd,res32x4,res8x4", [70.0, 74.0, 74.0], config=cfg("normdkd", "resnet32x4", "resnet8x4"))
    bad = tmp_path / "cifar100" / "corrupt"
    bad.mkdir()
    (bad / "worklog.txt").write_text("-------------------------\nepoch: 1\ntest_acc: lots\n")
    return tmp_path


def test_discovery_identity_from_config_and_from_folder_name(runs_root):
    runs, problems = discover_runs([runs_root])
    assert len(runs) == 7
    assert [p.name for p, _ in problems] == ["corrupt"]
    by = {r.path.name: r for r in runs}
    assert (by["kd,res56,res20,seed:1"].method, by["kd,res56,res20,seed:1"].seed, by["kd,res56,res20,seed:1"].pair) == (
        "kd",
        1,
        "res56_res20",
    )
    assert by["normkd-2"].finished is False and by["normkd-2"].epochs_done == 1 and by["normkd-2"].epochs_planned == 3
    assert by["normdkd,res32x4,res8x4"].pair == "res32x4_res8x4"


def test_aggregation_numbers(runs_root):
    rows = {(r.pair, r.method): r for r in aggregate(discover_runs([runs_root])[0])}
    kd = rows[("res56_res20", "kd")]
    assert kd.runs == 2 and kd.best_mean == pytest.approx(70.5) and kd.best_std == pytest.approx(0.7071, abs=1e-4)
    assert kd.last_mean == pytest.approx(70.0) and kd.top5_mean == pytest.approx(90.0)
    assert kd.published == 70.66 and kd.diff_vs_published == pytest.approx(70.5 - 70.66)
    nk = rows[("res56_res20", "normkd")]
    # the unfinished run is counted and marked, but the means are over finished runs
    assert nk.runs == 3 and nk.finished == 2 and nk.progress == "1/3"
    assert nk.best_mean == pytest.approx((72.0 + 72.5) / 2)
    assert nk.gain_vs_kd == pytest.approx(nk.best_mean - 70.5) and nk.gain_vs_dkd == pytest.approx(nk.best_mean - 71.5)
    assert rows[("res32x4_res8x4", "normdkd")].gain_vs_kd is None


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "normkd_plugin.leaderboard.cli", *map(str, args)], capture_output=True, text=True
    )


def test_markdown_csv_json_outputs(runs_root):
    md = _cli(runs_root)
    assert md.returncode == 0
    assert (
        "| cifar100 | res56_res20 | kd | 2 | 70.50 ± 0.71 | 70.00 ± 0.71 | 90.00 | – | -1.00 welch n=2/1, no CI | "
        "70.66 | -0.16 |" in md.stdout
    )
    assert "3 (1 unfinished: 1/3)" in md.stdout and "corrupt" in md.stdout
    assert "| cifar100 | res56_res20 | 72.34 | 69.06 | 70.66 | 71.97 |" in md.stdout
    rows = list(csv.DictReader(io.StringIO(_cli(runs_root, "--format", "csv").stdout)))
    assert {r["method"] for r in rows} == {"kd", "dkd", "normkd", "normdkd"} and len(rows) == 4
    data = json.loads(_cli(runs_root, "--format", "json").stdout)
    assert len(data["rows"]) == 4 and data["skipped"][0]["path"].endswith("corrupt")


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", head[16:24])


def test_plots_are_real_images(runs_root, tmp_path):
    pytest.importorskip("matplotlib")
    bars, curves = tmp_path / "bars.png", tmp_path / "curves.png"
    proc = _cli(runs_root, "--plot", bars, "--curves", curves, "--select", "normkd")
    assert proc.returncode == 0, proc.stderr
    for p in (bars, curves):
        w, h = _png_size(p)
        assert 400 <= w <= 3000 and 300 <= h <= 2000, (p, w, h)


def _check(runs_root, tmp_path, thresholds: dict):
    f = tmp_path / "th.yaml"
    f.write_text(yaml.safe_dump(thresholds))
    return _cli(runs_root, "--check", f)


def test_check_passes(runs_root, tmp_path):
    proc = _check(
        runs_root,
        tmp_path,
        {"min_best_acc": {"cifar100/res56_res20/kd": 70.0}, "required": ["cifar100/res56_res20/dkd"]},
    )
    assert proc.returncode == 0 and "regression check passed" in proc.stderr


def test_check_fails_below_minimum(runs_root, tmp_path):
    proc = _check(runs_root, tmp_path, {"min_best_acc": {"cifar100/res56_res20/kd": 71.0}})
    assert proc.returncode == 1 and "cifar100/res56_res20/kd: mean best top-1 70.50 < minimum 71.00" in proc.stderr


def test_check_fails_on_missing_required_run(runs_root, tmp_path):
    proc = _check(runs_root, tmp_path, {"required": ["cifar100/res110_res32/normkd"]})
    assert proc.returncode == 1 and "cifar100/res110_res32/normkd: required run missing" in proc.stderr


def test_check_normkd_must_beat_kd(runs_root, tmp_path):
    make_run(runs_root, "kd,res32x4,res8x4", [70.0, 80.0])
    make_run(runs_root, "normkd,res32x4,res8x4", [70.0, 75.0])
    proc = _check(runs_root, tmp_path, {"normkd_beats_kd": ["cifar100/res32x4_res8x4"]})
    assert proc.returncode == 1 and "NormKD 75.00 does not beat KD 80.00" in proc.stderr
    ok = _check(runs_root, tmp_path, {"normkd_beats_kd": ["cifar100/res56_res20"]})
    assert ok.returncode == 0, ok.stderr


def test_check_rejects_unknown_section(runs_root, tmp_path):
    proc = _check(runs_root, tmp_path, {"min_acc": {}})
    assert proc.returncode == 2 and proc.stdout == "" and "unknown section(s) ['min_acc']" in proc.stderr


KD_MIN = "min_best_acc:\n  cifar100/res56_res20/kd: "


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (KD_MIN + "high\n", "line 2: min_best_acc: cifar100/res56_res20/kd: expected a minimum mean best top-1 from 0 to 100, got 'high'"),
        (KD_MIN + "null\n", "line 2: min_best_acc: cifar100/res56_res20/kd: expected a minimum mean best top-1 from 0 to 100, got 'null'"),
        (KD_MIN + "[70]\n", "line 2: min_best_acc: cifar100/res56_res20/kd: expected a minimum mean best top-1 from 0 to 100, got a list"),
        (KD_MIN + ".nan\n", "line 2: min_best_acc: cifar100/res56_res20/kd: expected a minimum mean best top-1 from 0 to 100, got '.nan'"),
        (KD_MIN + "150\n", "line 2: min_best_acc: cifar100/res56_res20/kd: expected a minimum mean best top-1 from 0 to 100, got '150'"),
        (KD_MIN + "90\n  cifar100/res56_res20/kd: 60\n", "line 3: min_best_acc: cifar100/res56_res20/kd given twice (first on line 2); keep one"),
        ("required: [cifar100/res56_res20/kd]\nrequired: []\n", "line 2: sections: required given twice (first on line 1); keep one"),
        ("required:\n  - cifar100/res56_res20/kd\n  - 7\n", "line 3: section required: expected a name, got '7'"),
        ("min_best_acc: 70\n", "line 1: section min_best_acc: expected a mapping dataset/pair/method: minimum, got '70'"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not a text file (byte 0 is not UTF-8); expected YAML thresholds"),
    ],
)  # fmt: skip
def test_a_malformed_thresholds_file_is_one_line_naming_its_line_and_what_it_wants(
    runs_root, tmp_path, content, message
):
    th = tmp_path / "th.yaml"
    th.write_bytes(content if isinstance(content, bytes) else content.encode())
    proc = _cli(runs_root, "--check", th)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert proc.stderr == f"normkd-leaderboard: {th}: {message}\n"


def test_check_function_lists_every_failure():
    assert cli.check([], {"required": ["a/b/c"], "min_best_acc": {"a/b/d": 1.0}}) == [
        "no run found: nothing to check",
        "a/b/d: no runs (minimum 1.00)",
        "a/b/c: required run missing",
    ]


def test_host_folder_name_with_glued_override_tag(tmp_path):
    make_run(tmp_path, "dkd,res32x4,res8x4SOLVER.LR:0.1,SOLVER.TRAINER:fast", [70.0, 75.0])
    (run,) = discover_runs([tmp_path])[0]
    assert (run.method, run.teacher, run.student, run.pair, run.trainer) == (
        "dkd",
        "res32x4",
        "res8x4",
        "res32x4_res8x4",
        "fast",
    )


# --- paired statistics -------------------------------------------------------------------------

# two-sided 95 % quantiles of Student's t, from tables: t_{0.975, dof}
T975 = {1: 12.706204736174705, 2: 4.302652729911275, 3: 3.182446305284263, 4: 2.7764451051977987}


def t_interval(diffs, t):
    """mean ± t·s/√n, written out."""
    n = len(diffs)
    mean = sum(diffs) / n
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
    return mean, mean - t * sd / n**0.5, mean + t * sd / n**0.5


def seeded(root: Path, method: str, seed: int, accs, trainer="base", teacher="resnet56", student="resnet20", **kw):
    name = f"{method}-{trainer}-{teacher}-{seed}"
    return make_run(root, name, accs, config=cfg(method, teacher, student, seed=seed, trainer=trainer), **kw)


@pytest.fixture
def paired_root(tmp_path):
    for seed, kd, ours in ((0, [60, 70.0, 69.0], [60, 71.5, 71.0]), (1, [60, 71.0, 70.5], [60, 71.8, 71.8])):
        seeded(tmp_path, "kd", seed, kd)
        seeded(tmp_path, "normkd", seed, ours)
    seeded(tmp_path, "kd", 2, [60, 70.5, 70.0])
    seeded(tmp_path, "normkd", 2, [60, 72.3, 71.9])
    seeded(tmp_path, "dkd", 0, [60, 71.0, 71.0])
    return tmp_path


def test_t_quantile_is_two_sided_95():
    from normkd_plugin.leaderboard.stats import t975

    for dof, t in T975.items():
        assert t975(dof) == pytest.approx(t, rel=1e-9)
    for dof in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="degrees of freedom must be positive and finite"):
            t975(dof)


@pytest.mark.parametrize("x", [0.0, 1e-6, 0.01, 0.3, 0.5, 0.77, 0.999, 1 - 1e-9])
def test_incomplete_beta_closed_forms(x):
    from normkd_plugin.leaderboard.stats import betainc

    assert (betainc(2.0, 0.5, 0.0), betainc(2.0, 0.5, 1.0)) == (0.0, 1.0)
    assert betainc(1.0, 1.0, x) == pytest.approx(x, rel=1e-12, abs=1e-300)
    assert betainc(3.0, 1.0, x) == pytest.approx(x**3, rel=1e-12, abs=1e-300)
    assert betainc(1.0, 2.5, x) == pytest.approx(-math.expm1(2.5 * math.log1p(-x)), rel=1e-12, abs=1e-300)
    assert betainc(0.5, 0.5, x) == pytest.approx(
        2 / math.pi * math.atan2(math.sqrt(x), math.sqrt(1 - x)), rel=1e-12, abs=1e-300
    )


@pytest.mark.parametrize("dof", [0.5, 1, 1.5, 2, 2.635, 3, 4, 5, 7.3, 10, 29, 100, 1000, 1e5])
def test_t_quantile_matches_scipy(dof):
    stats = pytest.importorskip("scipy.stats")
    special = pytest.importorskip("scipy.special")
    from normkd_plugin.leaderboard.stats import betainc, t975

    assert t975(dof) == pytest.approx(float(stats.t.ppf(0.975, dof)), rel=1e-9)
    for x in (0.001, 0.05, 0.5, 0.9, 0.99999):
        assert betainc(dof / 2, 0.5, x) == pytest.approx(float(special.betainc(dof / 2, 0.5, x)), rel=1e-10)


def test_intervals_are_computed_without_scipy(paired_root):
    """The table's intervals (what made start-up slow) need no scipy import."""
    code = (
        "import sys; from normkd_plugin.leaderboard import cli; cli.main([sys.argv[1]]); "
        "print(sorted({'scipy', 'numpy'} & set(sys.modules)), file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(paired_root)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr.strip() == "[]", proc.stderr
    assert "paired n=3" in proc.stdout


def test_paired_difference_over_shared_seeds(paired_root):
    rows = {r.method: r for r in aggregate(discover_runs([paired_root])[0])}
    best, last = rows["normkd"].vs_kd_best, rows["normkd"].vs_kd_last
    mean, low, high = t_interval([71.5 - 70.0, 71.8 - 71.0, 72.3 - 70.5], T975[2])
    assert (best.kind, best.n, best.dof, best.baseline) == ("paired", 3, 2.0, "kd")
    assert (best.mean, best.low, best.high) == pytest.approx((mean, low, high), abs=1e-9)
    assert low > 0  # 1.3667 ± 1.2748
    mean, low, high = t_interval([71.0 - 69.0, 71.8 - 70.5, 71.9 - 70.0], T975[2])
    assert (last.kind, last.n) == ("paired", 3)
    assert (last.mean, last.low, last.high) == pytest.approx((mean, low, high))
    # DKD has seed 0 only: one pair, a difference but no interval, and the reason recorded
    dkd = rows["normkd"].vs_dkd_best
    assert (dkd.kind, dkd.n, dkd.mean, dkd.low, dkd.high) == ("paired", 1, pytest.approx(0.5), None, None)
    assert dkd.note == "n=1: fewer than 2 pairs" and dkd.text() == "+0.50 paired n=1, no CI"
    assert rows["kd"].vs_kd_best is None and rows["dkd"].vs_dkd_best is None
    assert rows["kd"].vs_dkd_best.text() == "-1.00 paired n=1, no CI"


def test_welch_when_no_seed_is_shared(tmp_path):
    for seed, acc in ((10, 70.0), (11, 72.0), (12, 74.0)):
        seeded(tmp_path, "normkd", seed, [acc])
        seeded(tmp_path, "normkd", seed, [acc], teacher="resnet110", student="resnet32")
    for seed, acc in ((0, 69.0), (1, 70.0)):
        seeded(tmp_path, "kd", seed, [acc])
    for seed, acc in ((0, 67.0), (1, 69.0), (2, 71.0)):
        seeded(tmp_path, "kd", seed, [acc], teacher="resnet110", student="resnet32")
    rows = {(r.pair, r.method): r for r in aggregate(discover_runs([tmp_path])[0])}
    # unequal variances: means 72 and 69.5, variances 4 and 0.5 over n = 3 and 2
    va, vb = 4.0 / 3, 0.5 / 2
    dof = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 1)
    assert dof == pytest.approx(2.6350364963503647)
    t = 3.4469381687714518  # t_{0.975, 2.635}
    d = rows[("res56_res20", "normkd")].vs_kd_best
    assert (d.kind, d.n, d.n_baseline) == ("welch", 3, 2)
    assert (d.mean, d.dof) == pytest.approx((2.5, dof))
    assert (d.low, d.high) == pytest.approx((2.5 - t * (va + vb) ** 0.5, 2.5 + t * (va + vb) ** 0.5), rel=1e-6)
    assert d.text() == f"+2.50 [{2.5 - t * (va + vb) ** 0.5:+.2f}, {2.5 + t * (va + vb) ** 0.5:+.2f}] welch n=3/2"
    # equal n and variances: Welch–Satterthwaite gives 2(n-1) = 4 dof
    d = rows[("res110_res32", "normkd")].vs_kd_best
    half = T975[4] * (4.0 / 3 + 4.0 / 3) ** 0.5
    assert (d.kind, d.dof) == ("welch", pytest.approx(4.0))
    assert (d.mean, d.low, d.high) == pytest.approx((3.0, 3.0 - half, 3.0 + half))


def test_runs_of_different_trainers_are_not_paired(paired_root):
    for seed, acc in ((0, 71.5), (1, 71.8), (2, 72.3)):
        seeded(paired_root, "normkd", seed, [60, acc], trainer="fast")
    rows = {r.method: r for r in aggregate(discover_runs([paired_root])[0])}
    assert rows["normkd (fast)"].trainer == "fast" and rows["normkd (fast)"].base_method == "normkd"
    d = rows["normkd (fast)"].vs_kd_best  # no KD with the fast trainer: the host's KD, unpaired
    assert (d.kind, d.n, d.n_baseline, d.baseline) == ("welch", 3, 3, "kd")
    assert d.mean == pytest.approx((71.5 + 71.8 + 72.3) / 3 - (70.0 + 71.0 + 70.5) / 3)
    seeded(paired_root, "kd", 0, [60, 70.0], trainer="fast")
    seeded(paired_root, "kd", 1, [60, 70.0], trainer="fast")
    rows = {r.method: r for r in aggregate(discover_runs([paired_root])[0])}
    d = rows["normkd (fast)"].vs_kd_best  # now the fast KD, paired over seeds 0 and 1
    assert (d.kind, d.n, d.baseline) == ("paired", 2, "kd (fast)")
    assert (d.mean, d.low, d.high) == pytest.approx(t_interval([1.5, 1.8], T975[1]))


def test_repeated_seed_is_not_paired():
    from normkd_plugin.leaderboard.stats import compare

    d = compare([(0, 71.0), (0, 73.0), (1, 72.0)], [(0, 70.0), (1, 70.5)])
    assert (d.kind, d.n, d.n_baseline, d.note) == ("welch", 3, 2, "seed 0 repeated, not paired")
    assert d.mean == pytest.approx(72.0 - 70.25)
    d = compare([(None, 71.0), (None, 73.0)], [(None, 70.0), (None, 70.0)])
    assert (d.kind, d.mean, d.low, d.high) == ("welch", 2.0, pytest.approx(2.0 - T975[1]), pytest.approx(2.0 + T975[1]))
    assert d.dof == pytest.approx(1.0)  # all the variance on one side: n_a - 1 dof
    d = compare([(0, 71.0), (1, 72.0)], [(None, 70.0)])
    assert (d.kind, d.mean, d.low, d.note) == ("welch", 1.5, None, "n=2/1: fewer than 2 runs on a side")


def test_csv_and_json_carry_best_and_last_differences(paired_root):
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(_cli(paired_root, "--format", "csv").stdout))}
    mean, low, high = t_interval([1.5, 0.8, 1.8], T975[2])
    r = rows["normkd"]
    assert (r["vs_kd_best_kind"], r["vs_kd_best_n"], r["vs_kd_best_baseline"]) == ("paired", "3", "kd")
    assert [float(r[f"vs_kd_best_{k}"]) for k in ("mean", "low", "high")] == pytest.approx([mean, low, high])
    assert float(r["vs_kd_last_mean"]) == pytest.approx((2.0 + 1.3 + 1.9) / 3)
    assert r["vs_dkd_best_low"] == "" and r["vs_dkd_best_note"] == "n=1: fewer than 2 pairs"
    assert rows["kd"]["vs_kd_best_mean"] == "" and r["failed"] == "0" and r["failed_runs"] == ""
    data = json.loads(_cli(paired_root, "--format", "json").stdout)
    (nk,) = [r for r in data["rows"] if r["method"] == "normkd"]
    assert nk["vs_kd_last"]["kind"] == "paired" and nk["vs_kd_best"]["low"] == pytest.approx(low)
    assert data["failed"] == [] and "members" not in nk


def test_markdown_shows_interval_and_method(paired_root):
    md = _cli(paired_root).stdout
    mean, low, high = t_interval([1.5, 0.8, 1.8], T975[2])
    assert "| vs KD (best, 95 % CI) | vs DKD (best, 95 % CI) |" in md.splitlines()[0]
    assert f"| {mean:+.2f} [{low:+.2f}, {high:+.2f}] paired n=3 | +0.50 paired n=1, no CI |" in md
    assert "*paired*: mean of per-seed differences" in md


# --- failed and invalid runs ------------------------------------------------------------------


def test_non_finite_accuracies_make_a_run_invalid(tmp_path):
    nan = make_run(tmp_path, "kd,res56,res20,seed:0", [10.0, 20.0])
    (nan / "worklog.txt").write_text((nan / "worklog.txt").read_text().replace("test_acc: 20.00", "test_acc: nan"))
    inf = make_run(tmp_path, "kd,res56,res20,seed:1", [10.0])
    (inf / "worklog.txt").write_text(host_worklog([10.0], finished=False) + "best_acc\tinf")
    ok = make_run(tmp_path, "kd,res56,res20,seed:2", [10.0])
    runs = {r.seed: r for r in discover_runs([tmp_path])[0]}
    assert (runs[0].status, runs[0].problem) == ("invalid", "non-finite test_acc (nan) at epoch 2")
    assert (runs[1].status, runs[1].problem) == ("invalid", "non-finite best_acc (inf)")
    assert (runs[2].status, runs[2].problem) == ("finished", None) and ok == runs[2].path
    (row,) = aggregate(list(runs.values()))
    assert (row.runs, row.finished, row.failed, row.invalid, row.best_mean, row.best_std) == (1, 1, 0, 2, 10.0, None)


@pytest.fixture
def failed_root(runs_root):
    # a failed KD run and an invalid (nan) NormKD run sharing seeds with good ones: counted in neither mean nor pair
    failed = make_run(runs_root, "kd,res56,res20,seed:0,again", [60.0, 10.0], finished=False)
    with open(failed / "worklog.txt", "a") as f:
        f.write("failed\tepoch 3 step 17: non-finite training loss\n")
    bad = make_run(runs_root, "normkd-nan", [79.0, 79.0], config=cfg("normkd", seed=1))
    (bad / "worklog.txt").write_text((bad / "worklog.txt").read_text().replace("test_acc: 79.00", "test_acc: nan", 1))
    return runs_root


def test_failed_runs_are_listed_apart(failed_root, tmp_path):
    rows = {(r.pair, r.method): r for r in aggregate(discover_runs([failed_root])[0])}
    kd, nk = rows[("res56_res20", "kd")], rows[("res56_res20", "normkd")]
    assert (kd.runs, kd.failed, kd.best_mean) == (2, 1, pytest.approx(70.5))
    assert (nk.runs, nk.failed, nk.invalid, nk.best_mean) == (3, 0, 1, pytest.approx(72.25))
    d = nk.vs_kd_best
    assert (d.kind, d.n) == ("paired", 2)
    assert (d.mean, d.low, d.high) == pytest.approx(t_interval([72.0 - 70.0, 72.5 - 71.0], T975[1]))

    md = _cli(failed_root)
    assert md.returncode == 0, md.stderr
    assert "| kd | 2 (1 failed) | 70.50 ± 0.71 |" in md.stdout and "| 3 (1 unfinished: 1/3; 1 invalid) |" in md.stdout
    invalid, failed = md.stdout.split("Invalid runs (")[1].split("Failed runs (not in any mean or difference):")
    assert (
        f"- `{failed_root / 'cifar100' / 'kd,res56,res20,seed:0,again'}` (cifar100/res56_res20/kd, seed 0): " in failed
    )
    assert "failed: epoch 3 step 17: non-finite training loss" in failed and "normkd-nan" not in failed
    assert "normkd-nan` (cifar100/res56_res20/normkd, seed 1): non-finite test_acc (nan) at epoch 1" in invalid
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(_cli(failed_root, "--format", "csv").stdout))}
    assert rows["kd"]["failed"] == "1" and rows["kd"]["failed_runs"].endswith(
        "seed:0,again: failed: epoch 3 step 17: non-finite training loss"
    )
    data = json.loads(_cli(failed_root, "--format", "json").stdout)
    assert [(f["method"], f["status"], f["seed"]) for f in data["failed"]] == [("kd", "failed", 0)]
    assert [(f["method"], f["status"], f["seed"]) for f in data["invalid"]] == [("normkd", "invalid", 1)]
    proc = _check(failed_root, tmp_path, {"min_best_acc": {"cifar100/res56_res20/normkd": 72.0}})
    assert proc.returncode == 1 and "normkd-nan: invalid run: non-finite test_acc (nan) at epoch 1" in proc.stderr
    shutil.rmtree(failed_root / "cifar100" / "normkd-nan")  # a failed run alone does not fail the check
    proc = _check(failed_root, tmp_path, {"min_best_acc": {"cifar100/res56_res20/normkd": 72.0}})
    assert proc.returncode == 0, proc.stderr


def test_check_required_counts_failed_runs_as_missing(tmp_path):
    failed = make_run(tmp_path, "kd,res56,res20,seed:0", [60.0], finished=False)
    with open(failed / "worklog.txt", "a") as f:
        f.write("failed\tout of memory\n")
    rows = aggregate(discover_runs([tmp_path])[0])
    assert cli.check(
        rows, {"required": ["cifar100/res56_res20/kd"], "min_best_acc": {"cifar100/res56_res20/kd": 1}}
    ) == [
        "cifar100/res56_res20/kd: no runs (1 failed) (minimum 1.00)",
        "cifar100/res56_res20/kd: required run missing (1 failed)",
    ]


# --- a passing check means something: numbers no run can have, finished means every epoch ------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("150.00", "test_acc 150 is outside [0, 100] at epoch 2"),
        ("1e300", "test_acc 1e+300 is outside [0, 100] at epoch 2"),
        ("-40", "test_acc -40 is outside [0, 100] at epoch 2"),
        ("nan", "non-finite test_acc (nan) at epoch 2"),
        ("inf", "non-finite test_acc (inf) at epoch 2"),
    ],
)
def test_impossible_accuracies_make_a_run_invalid_in_no_mean_and_the_check_fails(runs_root, tmp_path, value, problem):
    bad = make_run(runs_root, "normkd-3", [60.0, 70.0, 65.0], config=cfg("normkd", seed=3))
    text = (bad / "worklog.txt").read_text().replace("test_acc: 70.00", f"test_acc: {value}")
    (bad / "worklog.txt").write_text(text.replace("best_acc\t70.00", f"best_acc\t{value}"))
    (run,) = [r for r in discover_runs([runs_root])[0] if r.path == bad]
    assert (run.status, run.problem) == ("invalid", problem)
    nk = {(r.pair, r.method): r for r in aggregate(discover_runs([runs_root])[0])}[("res56_res20", "normkd")]
    assert (nk.runs, nk.finished, nk.invalid, nk.failed) == (3, 2, 1, 0)
    assert (nk.best_mean, nk.last_mean) == (pytest.approx((72.0 + 72.5) / 2), pytest.approx((71.0 + 72.5) / 2))

    md = _cli(runs_root).stdout
    assert "| 3 (1 unfinished: 1/3; 1 invalid) | 72.25 ± 0.35 |" in md
    assert f"- `{bad}` (cifar100/res56_res20/normkd, seed 3): {problem}" in md.split("Invalid runs (")[1]
    assert [f["path"] for f in json.loads(_cli(runs_root, "--format", "json").stdout)["invalid"]] == [str(bad)]
    proc = _check(runs_root, tmp_path, {"min_best_acc": {"cifar100/res56_res20/normkd": 72.0}})
    assert proc.returncode == 1 and f"{bad}: invalid run: {problem}" in proc.stderr


@pytest.mark.parametrize(
    ("worklog", "problem"),
    [
        ("best_acc\t99.00", "a best_acc line without any epoch block before it"),
        (host_worklog([60.0, 70.0]), "best_acc after epochs 1-2 (2 blocks), not after epochs 1-3"),
        (host_worklog([60.0, 70.0, 65.0], finished=False) + "best_acc\t75.00", "best_acc 75.00 is not the best"),
    ],
)
def test_a_best_acc_line_that_ends_no_finished_worklog_is_no_finished_run(runs_root, tmp_path, worklog, problem):
    folder = runs_root / "cifar100" / "kd-3"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg("kd", seed=3, epochs=3)))
    (folder / "worklog.txt").write_text(worklog)
    (run,) = [r for r in discover_runs([runs_root])[0] if r.path == folder]
    assert not run.finished and run.status == "invalid" and run.problem.startswith(problem)
    kd = {(r.pair, r.method): r for r in aggregate(discover_runs([runs_root])[0])}[("res56_res20", "kd")]
    assert (kd.runs, kd.finished, kd.invalid, kd.best_mean) == (2, 2, 1, pytest.approx(70.5))
    proc = _check(runs_root, tmp_path, {"min_best_acc": {"cifar100/res56_res20/kd": 70.0}})
    assert proc.returncode == 1 and f"{folder}: invalid run: {problem}" in proc.stderr
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg("kd", "resnet32x4", "resnet8x4", seed=3, epochs=3)))
    rows = aggregate(discover_runs([runs_root])[0])  # the only KD run of its pair: none counts
    (row,) = [r for r in rows if (r.pair, r.method) == ("res32x4_res8x4", "kd")]
    assert (row.runs, row.finished, row.invalid, row.best_mean) == (0, 0, 1, None)
    assert "cifar100/res32x4_res8x4/kd: required run missing (1 invalid)" in cli.check(
        rows, {"required": ["cifar100/res32x4_res8x4/kd"]}
    )


# --- paths ---------------------------------------------------------------------------------------


def test_nonexistent_path_is_an_error(runs_root):
    proc = _cli(runs_root, runs_root / "nowhere")
    assert proc.returncode == 2 and f"no such file or directory: {runs_root / 'nowhere'}" in proc.stderr
    assert proc.stdout == ""


def test_path_without_runs_is_reported(runs_root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _cli(empty, runs_root)
    assert proc.returncode == 0 and f"no run (folder with a worklog.txt) under {empty}" in proc.stderr
    assert f"under {runs_root}\n" not in proc.stderr and "| kd |" in proc.stdout


def test_run_folders_behind_symbolic_links_are_followed_each_once_and_a_loop_ends(tmp_path):
    real = make_run(tmp_path / "store", "normkd,res56,res20,seed:0", [60.0, 70.0], config=cfg("normkd"))
    out = tmp_path / "out" / "cifar100"
    out.mkdir(parents=True)
    (out / "again").symlink_to(real)
    (out / "linked").symlink_to(real)  # the same run twice: counted once
    (out / "loop").symlink_to(tmp_path / "out")  # a link back up the tree
    (out / "store").symlink_to(tmp_path / "store", target_is_directory=True)
    runs, skipped = discover_runs([tmp_path / "out"])
    assert [r.path for r in runs] == [out / "again"] and skipped == []
    proc = _cli(tmp_path / "out")
    assert proc.returncode == 0 and "| cifar100 | res56_res20 | normkd | 1 | 70.00 |" in proc.stdout, proc.stderr
    assert "no run" not in proc.stderr
    th = tmp_path / "th.yaml"
    th.write_text(yaml.safe_dump({"min_best_acc": {"cifar100/res56_res20/normkd": 70.0}}))
    assert _cli(tmp_path / "out", "--check", th).returncode == 0


def test_paths_that_cannot_be_read_are_named_as_skipped_and_a_check_of_nothing_fails(tmp_path):
    root = tmp_path / "out"
    dangling = root / "cifar100" / "kd,res56,res20,seed:0"
    dangling.mkdir(parents=True)
    (dangling / "worklog.txt").symlink_to(tmp_path / "moved" / "worklog.txt")
    (root / "cifar100" / "kd,res56,res20,seed:1").symlink_to(tmp_path / "gone")  # a dangling run folder link
    (root / "self").symlink_to(root / "self")  # a link that loops on itself
    runs, skipped = discover_runs([root])
    assert runs == [] and skipped == [
        (
            root / "cifar100" / "kd,res56,res20,seed:0" / "worklog.txt",
            f"a symbolic link to {tmp_path}/moved/worklog.txt that is dangling",
        ),
        (root / "cifar100" / "kd,res56,res20,seed:1", f"a symbolic link to {tmp_path}/gone that is dangling"),
        (root / "self", f"a symbolic link to {root}/self that loops"),
    ]
    proc = _cli(root)
    assert proc.returncode == 0 and proc.stdout.count("\n- `") == 3, proc.stdout
    assert proc.stdout.split("Skipped (could not be read):\n\n")[1] == "".join(
        f"- `{p}`: {why}\n" for p, why in skipped
    )
    th = tmp_path / "th.yaml"
    th.write_text("{}\n")  # no threshold at all: still nothing to pass
    proc = _cli(root, "--check", th)
    assert proc.returncode == 1 and "- no run found: nothing to check" in proc.stderr


# --- --check: intervals and trainer names ----------------------------------------------------------


def test_beats_with_ci_passes_when_interval_is_above_zero(paired_root, tmp_path):
    proc = _check(paired_root, tmp_path, {"beats_with_ci": ["cifar100/res56_res20/normkd>kd"]})
    assert proc.returncode == 0, proc.stderr


def test_beats_with_ci_failures(runs_root, tmp_path):
    th = {
        "beats_with_ci": [
            "cifar100/res56_res20/normkd>kd",  # paired n=2, interval straddles 0
            "cifar100/res56_res20/normkd>dkd",  # DKD has one unseeded run: Welch without interval
            "cifar100/res110_res32/normkd>kd",
            "cifar100/res32x4_res8x4/normdkd>dkd",
        ]
    }
    _, low, high = t_interval([72.0 - 70.0, 72.5 - 71.0], T975[1])
    assert cli.check(aggregate(discover_runs([runs_root])[0]), th) == [
        f"cifar100/res56_res20/normkd>kd: 95 % interval of normkd − kd in best top-1 is [{low:+.2f}, {high:+.2f}] "
        "(paired n=2), not above 0",
        "cifar100/res56_res20/normkd>dkd: too few runs for a 95 % interval (welch n=2/1); "
        "normkd − dkd in best top-1 = +0.75",
        "cifar100/res110_res32/normkd>kd: cifar100/res110_res32/normkd: no runs",
        "cifar100/res32x4_res8x4/normdkd>dkd: no single dkd row on cifar100/res32x4_res8x4 trained alike (trainer base)",
    ]
    proc = _check(runs_root, tmp_path, th)
    assert (
        proc.returncode == 1
        and "regression check failed (4)" in proc.stderr
        and "(paired n=2), not above" in proc.stderr
    )


@pytest.mark.parametrize("entry", ["cifar100/res56_res20/normkd", "res56_res20/normkd>kd", "a/b/c>d>e", "a/b/c>x/kd"])
def test_beats_with_ci_rejects_malformed_entries(runs_root, tmp_path, entry):
    proc = _check(runs_root, tmp_path, {"beats_with_ci": [entry]})
    assert (
        proc.returncode not in (0, 1)
        and f"section beats_with_ci: {entry!r} is not dataset/pair/method>baseline" in proc.stderr
    )


def test_check_names_with_trainers(runs_root):
    make_run(runs_root, "normkd-fast-0", [62.0, 73.0], config=cfg("normkd", seed=0, trainer="fast"))
    make_run(runs_root, "dkd-fast-0", [62.0, 74.0], config=cfg("dkd", "resnet32x4", "resnet8x4", trainer="fast"))
    rows = aggregate(discover_runs([runs_root])[0])
    assert "normkd (fast)" in {r.method for r in rows}
    assert (
        cli.check(
            rows,
            {
                "min_best_acc": {
                    "cifar100/res56_res20/normkd (fast)": 73.0,
                    "cifar100/res56_res20/normkd (base)": 72.25,
                    "cifar100/res32x4_res8x4/dkd": 74.0,  # only the fast trainer has DKD runs there
                },
                "required": ["cifar100/res32x4_res8x4/dkd (fast)"],
            },
        )
        == []
    )
    assert cli.check(
        rows, {"required": ["cifar100/res56_res20/normkd"], "min_best_acc": {"cifar100/res32x4_res8x4/dkd (base)": 1}}
    ) == [
        "cifar100/res32x4_res8x4/dkd (base): no runs (minimum 1.00)",
        "cifar100/res56_res20/normkd: ambiguous: rows of several trainers match (cifar100/res56_res20/normkd (base), "
        "cifar100/res56_res20/normkd (fast)); name one",
    ]
    # the fast NormKD against KD: no fast KD, so the host's KD, unpaired
    (failure,) = cli.check(rows, {"beats_with_ci": ["cifar100/res56_res20/normkd (fast)>kd"]})
    assert failure.endswith("too few runs for a 95 % interval (welch n=1/2); normkd (fast) − kd in best top-1 = +2.50")
    (failure,) = cli.check(rows, {"beats_with_ci": ["cifar100/res56_res20/normkd (fast)>kd (fast)"]})
    assert failure.endswith("no single kd row on cifar100/res56_res20 trained alike (trainer fast)")


def test_cli_import_stays_light():
    code = "import sys, normkd_plugin.leaderboard.cli; print(sorted({'scipy', 'mdistiller'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def _run_with(root, name, epochs, seed, acc, method="NORMKD"):
    folder = root / "cifar100" / name
    folder.mkdir(parents=True)
    cfg = {
        "DATASET": {"TYPE": "cifar100", "ROOT": f"/data/{name}"},
        "DISTILLER": {"TYPE": method, "TEACHER": "resnet56", "STUDENT": "resnet20"},
        "SOLVER": {"EPOCHS": epochs, "TRAINER": "fast", "LR": 0.05},
        "EXPERIMENT": {"SEED": seed},
        "LOG": {"PREFIX": str(root)},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    blocks = "".join(
        f"{'-' * 25}\nepoch: {e}\nlr: 0.05\ntest_acc: {acc:.2f}\n{'-' * 25}\n" for e in range(1, epochs + 1)
    )
    (folder / "worklog.txt").write_text(blocks + f"best_acc\t{acc:.2f}")


def test_runs_of_different_settings_are_never_averaged(tmp_path):
    """Two schedules of the same method land in two rows labelled by what differs; paths and seeds do not split."""
    for seed, acc in ((0, 60.0), (1, 62.0)):
        _run_with(tmp_path, f"short{seed}", 2, seed, acc)
        _run_with(tmp_path, f"long{seed}", 3, seed, acc + 10)
    rows = [r for r in aggregate(discover_runs([tmp_path])[0]) if r.base_method == "normkd"]
    assert sorted((r.setting, r.runs, r.best_mean) for r in rows) == [
        ("SOLVER.EPOCHS=2", 2, pytest.approx(61.0)),
        ("SOLVER.EPOCHS=3", 2, pytest.approx(71.0)),
    ]
    md = _cli(tmp_path).stdout
    assert "| normkd (fast) [SOLVER.EPOCHS=2] | 2 |" in md and "| normkd (fast) [SOLVER.EPOCHS=3] | 2 |" in md


def test_published_numbers_are_shown_for_every_trainer_and_compared_on_their_schedule(tmp_path):
    _run_with(tmp_path, "kd0", 240, 0, 70.0, method="KD")
    _run_with(tmp_path, "kd1", 2, 0, 60.0, method="KD")  # a short run is never compared with the published 240
    rows = {r.setting: r for r in aggregate(discover_runs([tmp_path])[0])}
    full, short = rows["SOLVER.EPOCHS=240"], rows["SOLVER.EPOCHS=2"]
    assert full.method == short.method == "kd (fast)"
    assert full.published == short.published == pytest.approx(70.66)
    assert full.diff_vs_published == pytest.approx(70.0 - 70.66) and short.diff_vs_published is None


def _real_run(root, cfg_name, seed, acc, *opts):
    """A finished run folder whose config.yaml is a real normkd-train config (every node, all defaults)."""
    from normkd_plugin.config import load_config, run_name

    options = ["SOLVER.TRAINER", "fast", "SOLVER.LR_DECAY_STAGES", "[]", "EXPERIMENT.SEED", str(seed), *opts]
    cfg = load_config(cfg_name, options)
    folder = root / run_name(cfg, options)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(cfg.dump())
    blocks = [
        f"{'-' * 25}\nepoch: {e}\nlr: 0.05\ntest_acc: {acc:.2f}\n{'-' * 25}\n" for e in range(1, cfg.SOLVER.EPOCHS + 1)
    ]
    (folder / "worklog.txt").write_text("".join(blocks) + f"best_acc\t{acc:.2f}")


@needs_mdistiller
def test_baselines_are_rows_trained_alike(tmp_path):
    """KD at 2 and 3 epochs, NormKD only at 3: NormKD is compared with the 3-epoch KD row, never the other."""
    for seed in (0, 1):
        _real_run(tmp_path, "cifar100/kd/res56_res20", seed, 41.0, "SOLVER.EPOCHS", "2")
        _real_run(tmp_path, "cifar100/kd/res56_res20", seed, 76.0 + seed, "SOLVER.EPOCHS", "3")
        _real_run(tmp_path, "cifar100/normkd/res56_res20", seed, 75.0 + seed / 10, "SOLVER.EPOCHS", "3")
    rows = aggregate(discover_runs([tmp_path])[0])
    (nk,) = [r for r in rows if r.base_method == "normkd"]
    assert nk.setting == "" and nk.gain_vs_kd == pytest.approx(75.05 - 76.5)
    assert nk.vs_kd_best.kind == "paired" and nk.vs_kd_best.mean == pytest.approx(75.05 - 76.5)
    (failure,) = cli.check(rows, {"beats_with_ci": ["cifar100/res56_res20/normkd (fast)>kd (fast)"]})
    assert failure.endswith("is [-7.17, +4.27] (paired n=2), not above 0")  # mean -1.45 ± t(1)·0.45


@needs_mdistiller
def test_a_pack_wide_override_of_another_method_does_not_split_kd(tmp_path):
    """--cfg kd --cfg normkd NORMKD.TEMPERATURE_NORM 1.5 beside a default pack: KD runs stay one row."""
    for seed, extra in ((0, ["NORMKD.TEMPERATURE_NORM", "1.5"]), (1, [])):
        _real_run(tmp_path, "cifar100/kd/res56_res20", seed, 70.0 + seed, *extra)
    (kd,) = aggregate(discover_runs([tmp_path])[0])
    assert (kd.setting, kd.runs) == ("", 2)


# --- duplicate runs ------------------------------------------------------------------------------


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("worklog.txt", "config.yaml"):
        if (src / name).is_file():
            (dst / name).write_text((src / name).read_text())
    return dst


@pytest.fixture
def duplicated_root(tmp_path):
    """NormKD seeds 0 and 1 trained into runs/pack and copied, worklogs and all, to output/sweep; KD once."""
    for seed, kd, ours in ((0, 70.0, 71.5), (1, 71.0, 71.8)):
        _run_with(tmp_path, f"kd{seed}", 2, seed, kd, method="KD")
        _run_with(tmp_path, f"runs/pack/normkd{seed}", 2, seed, ours)
        _copy_run(
            tmp_path / "cifar100" / f"runs/pack/normkd{seed}", tmp_path / "cifar100" / f"output/sweep/normkd{seed}"
        )
    return tmp_path


def test_identical_runs_of_a_seed_are_one_run(duplicated_root):
    base = duplicated_root / "cifar100"
    paths = [base / "runs", base / "output", base / "kd0", base / "kd1"]  # the copies found before the originals
    rows = {r.method: r for r in aggregate(discover_runs(paths)[0])}
    nk = rows["normkd (fast)"]
    assert (nk.runs, nk.duplicates, nk.best_mean) == (2, 2, pytest.approx((71.5 + 71.8) / 2))
    # the first by path is counted, wherever the search found it
    assert sorted((c.path, r.path) for c, r in nk.copies) == [
        (base / f"runs/pack/normkd{s}", base / f"output/sweep/normkd{s}") for s in (0, 1)
    ]
    assert sorted(r.path for r in nk.members) == [base / f"output/sweep/normkd{s}" for s in (0, 1)]
    d = nk.vs_kd_best
    assert (d.kind, d.n, d.note) == ("paired", 2, "")
    assert (d.mean, d.low, d.high) == pytest.approx(t_interval([71.5 - 70.0, 71.8 - 71.0], T975[1]))
    # the same as leaderboarding one copy
    (one,) = [
        r for r in aggregate(discover_runs([base / "runs", base / "kd0", base / "kd1"])[0]) if r.base_method == "normkd"
    ]
    assert (one.runs, one.duplicates, one.vs_kd_best) == (2, 0, d)


def test_duplicates_are_listed_in_every_format(duplicated_root):
    base = duplicated_root / "cifar100"
    md = _cli(duplicated_root)
    assert md.returncode == 0, md.stderr
    assert "| normkd (fast) | 2 (2 duplicates) | 71.65 ± 0.21 |" in md.stdout and "paired n=2" in md.stdout
    listed = md.stdout.split("Duplicate runs (the same worklog as a counted run; counted once):")[1]
    for s in (0, 1):
        assert (
            f"- `{base / f'runs/pack/normkd{s}'}` (cifar100/res56_res20/normkd (fast), seed {s}): "
            f"duplicate of `{base / f'output/sweep/normkd{s}'}`" in listed
        )
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(_cli(duplicated_root, "--format", "csv").stdout))}
    assert (rows["normkd (fast)"]["runs"], rows["normkd (fast)"]["duplicates"]) == ("2", "2")
    assert rows["normkd (fast)"]["duplicate_runs"] == "; ".join(
        f"{base / f'runs/pack/normkd{s}'}: duplicate of {base / f'output/sweep/normkd{s}'}" for s in (0, 1)
    )
    assert rows["kd (fast)"]["duplicate_runs"] == "" and rows["kd (fast)"]["duplicates"] == "0"
    data = json.loads(_cli(duplicated_root, "--format", "json").stdout)
    assert data["duplicates"] == [
        {
            "path": str(base / f"runs/pack/normkd{s}"),
            "dataset": "cifar100",
            "pair": "res56_res20",
            "method": "normkd (fast)",
            "seed": s,
            "duplicate_of": str(base / f"output/sweep/normkd{s}"),
        }
        for s in (0, 1)
    ]
    assert data["failed"] == [] and "copies" not in data["rows"][0]


def test_genuine_repeats_of_a_seed_stay_repeats(duplicated_root):
    """Another result for seed 0, or the same accuracies with another training loss, is a second run."""
    base = duplicated_root / "cifar100"
    _run_with(duplicated_root, "output/rerun/normkd0", 2, 0, 72.4)
    again = _copy_run(base / "runs/pack/normkd1", base / "output/rerun/normkd1")
    text = (again / "worklog.txt").read_text()
    (again / "worklog.txt").write_text(text.replace("lr: 0.05", "lr: 0.05\ntrain_loss: 1.25", 1))
    (nk,) = [r for r in aggregate(discover_runs([duplicated_root])[0]) if r.base_method == "normkd"]
    assert (nk.runs, nk.duplicates) == (4, 2)
    d = nk.vs_kd_best
    assert (d.kind, d.n, d.n_baseline, d.note) == ("welch", 4, 2, "seed 0, 1 repeated, not paired")
    assert d.mean == pytest.approx((71.5 + 72.4 + 71.8 + 71.8) / 4 - 70.5)


def test_unseeded_failed_and_other_cell_runs_are_never_duplicates(tmp_path):
    first = make_run(tmp_path, "kd,res56,res20", [60.0, 70.0])  # no seed: cannot tell a copy from a rerun
    _copy_run(first, tmp_path / "cifar100" / "kd,res56,res20,again")
    failed = make_run(tmp_path, "kd,res56,res20,seed:0", [60.0], finished=False)
    (failed / "worklog.txt").write_text(host_worklog([60.0], finished=False) + "failed\tout of memory\n")
    _copy_run(failed, tmp_path / "cifar100" / "kd,res56,res20,seed:0,again")
    runs = discover_runs([tmp_path])[0]
    assert len(runs) == 4
    kept, copies = split_duplicates(runs)
    assert (kept, copies) == (runs, [])
    (row,) = aggregate(runs)
    assert (row.runs, row.failed, row.duplicates) == (2, 2, 0)
    # one seed, one worklog, but the fast trainer: another cell, so both are counted
    make_run(tmp_path, "kd,res56,res20,seed:3", [60.0, 70.0])
    make_run(tmp_path, "kd,res56,res20,seed:3,SOLVER.TRAINER:fast", [60.0, 70.0])
    assert sorted((r.method, r.runs, r.duplicates) for r in aggregate(discover_runs([tmp_path])[0])) == [
        ("kd", 3, 0),
        ("kd (fast)", 1, 0),
    ]


def test_runs_with_no_epoch_yet_are_never_duplicates(tmp_path):
    """Two runs of one seed just started (empty worklogs) look alike but are not copies."""
    make_run(tmp_path, "kd-a", [], finished=False, config=cfg("kd", seed=4))
    make_run(tmp_path, "kd-b", [], finished=False, config=cfg("kd", seed=4))
    runs = discover_runs([tmp_path])[0]
    assert len(runs) == 2 and split_duplicates(runs) == (runs, [])


# --- curves --------------------------------------------------------------------------------------


def test_curves_legend_names_settings_when_they_differ(duplicated_root):
    pytest.importorskip("matplotlib")
    _run_with(duplicated_root, "long/normkd0", 3, 0, 73.0)
    runs = [r for r in discover_runs([duplicated_root])[0] if r.method == "normkd"]
    fig = curves_figure(runs)
    (ax,) = fig.axes
    labels = sorted(t.get_text() for t in ax.get_legend().get_texts())
    assert labels == [
        "res56_res20 normkd (fast) [SOLVER.EPOCHS=2] seed 0",  # the copies of runs/pack are drawn once
        "res56_res20 normkd (fast) [SOLVER.EPOCHS=2] seed 1",
        "res56_res20 normkd (fast) [SOLVER.EPOCHS=3] seed 0",
    ]
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
    assert ticks and all(t == int(t) for t in ticks), ticks  # 1..3 epochs: without it, ticks every 0.25
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_curves_legend_without_settings_when_runs_are_alike(paired_root, tmp_path):
    pytest.importorskip("matplotlib")
    runs = [r for r in discover_runs([paired_root])[0] if r.method == "normkd"]
    out = tmp_path / "curves.png"
    assert sorted(plot_curves(runs, str(out))) == [f"res56_res20 normkd (base) seed {s}" for s in (0, 1, 2)]
    assert _png_size(out)[0] > 0


def test_select_matching_no_run_is_an_error(runs_root, tmp_path):
    curves, bars = tmp_path / "curves.png", tmp_path / "bars.png"
    proc = _cli(runs_root, "--curves", curves, "--plot", bars, "--select", "nope")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "normkd-leaderboard: --select 'nope' matches no run (of 7 found)"
    assert not curves.exists() and not bars.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _cli(empty, "--curves", curves)
    assert proc.returncode == 2 and proc.stdout == "" and not curves.exists()
    assert proc.stderr.strip() == "normkd-leaderboard: --curves: no run to draw (of 0 found)"


def test_bars_split_by_settings_and_published_markers_only_beside_the_published_schedule(tmp_path):
    pytest.importorskip("matplotlib")
    from normkd_plugin.leaderboard.render import bars_figure

    for seed, acc in ((0, 60.0), (1, 62.0)):
        _run_with(tmp_path / "short", f"short{seed}", 2, seed, acc)
        _run_with(tmp_path / "short", f"long{seed}", 3, seed, acc + 10)
    rows = aggregate(discover_runs([tmp_path / "short"])[0])
    ax = bars_figure(rows).axes[0]
    xs = sorted(round(p.get_x() + p.get_width() / 2, 6) for p in ax.patches)
    assert len(xs) == len(set(xs)) == 2  # the two settings side by side, neither hiding the other
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["normkd (fast) [SOLVER.EPOCHS=2]", "normkd (fast) [SOLVER.EPOCHS=3]"]
    assert "not of the published schedule" in ax.get_title()  # no 240-epoch markers, and the title says why
    assert ax.get_ylim()[1] <= 72.0 + 5 + 1e-9  # the scale is the runs', not flattened by a marker at 70+

    _run_with(tmp_path / "full", "full0", 240, 0, 70.0, method="KD")
    ax = bars_figure(aggregate(discover_runs([tmp_path / "full"])[0])).axes[0]
    assert sorted(ax.get_legend_handles_labels()[1]) == ["kd (fast)", "published DKD", "published KD"]
    assert ax.get_title() == ""


# -- the leaderboard at scale ----------------------------------------------------------------------------


def _host_worklog(epochs: int, end: str = "best_acc\t70.00") -> str:
    from normkd_plugin.worklog import block

    record = dict(train_acc=51.5, train_loss=1.25, test_acc=61.0, test_acc_top5=88.5, test_loss=1.5)
    blocks = [block(e, 0.05 / e, {**record, "test_acc": 60.0 + e / 7}) for e in range(1, epochs + 1)]
    return "".join(blocks) + end


def test_a_junk_worklog_is_quoted_at_most_200_characters(tmp_path, capsys):
    run = tmp_path / "cifar100" / "kd,res56,res20,seed:0"
    run.mkdir(parents=True)
    (run / "worklog.txt").write_text("x" * 10_000_000)  # one 10 MB line
    other = tmp_path / "cifar100" / "kd,res56,res20,seed:1"
    other.mkdir()
    (other / "worklog.txt").write_text(_host_worklog(3).replace("test_acc: ", "test_acc: " + "9" * 5000 + "x", 1))
    runs, problems = discover_runs([tmp_path])
    assert not runs and len(problems) == 2
    assert all(len(why) < 400 for _, why in problems), [len(w) for _, w in problems]
    assert "(10000000 characters)" in problems[0][1]
    cli.main([str(tmp_path)])
    out = capsys.readouterr()
    assert len(out.out) + len(out.err) < 5000


@needs_mdistiller
def test_config_sections_are_read_as_a_whole_parse_reads_them(tmp_path):
    from normkd_plugin.config import load_config
    from normkd_plugin.leaderboard.results import load_config_text

    text = load_config("cifar100/normdkd/res56_res20", ["EXPERIMENT.SEED", "4"]).dump()
    assert "&id001" in text  # an alias across sections the reader does not need
    full = yaml.safe_load(text)
    part = load_config_text(text)
    assert set(part) == {"DATASET", "DISTILLER", "EXPERIMENT", "SOLVER", "NORMDKD"}
    assert all(part[k] == full[k] for k in part)
    assert load_config_text("- not\n- a mapping\n") == {}


@needs_mdistiller
def test_configs_one_key_apart_read_apart_and_no_two_reads_share_a_section():
    """Dumps one key apart, in a section read (SOLVER.LR) or in the method's node (NORMDKD.BETA), read as their
    whole parses in any order; a read shares nothing with another read of the same text (runs stay apart)."""
    from normkd_plugin.config import load_config
    from normkd_plugin.leaderboard.results import load_config_text

    texts = [
        load_config("cifar100/normdkd/res56_res20", opts).dump()
        for opts in ([], ["SOLVER.LR", "0.07"], ["NORMDKD.BETA", "3.0"])
    ]
    full = [yaml.safe_load(text) for text in texts]
    assert full[0]["SOLVER"] != full[1]["SOLVER"] and full[0]["NORMDKD"] != full[2]["NORMDKD"]
    for k in [0, 1, 2, 2, 1, 0]:
        part = load_config_text(texts[k])
        assert all(part[name] == full[k][name] for name in ("SOLVER", "NORMDKD")), k
    first, second = load_config_text(texts[0]), load_config_text(texts[0])
    first["SOLVER"]["LR"], first["NORMDKD"]["BETA"] = -1.0, -1.0
    assert second["SOLVER"] == full[0]["SOLVER"] and second["NORMDKD"] == full[0]["NORMDKD"]
