"""normkd-leaderboard on run folders written in the host's exact worklog.txt format."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from normkd_plugin.leaderboard import cli
from normkd_plugin.leaderboard.runs import WorklogError, discover_runs, parse_worklog
from normkd_plugin.leaderboard.table import aggregate


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
    folder = root / project / name
    folder.mkdir(parents=True)
    (folder / "worklog.txt").write_text(host_worklog(accs, finished))
    if config is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
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


def test_parse_host_worklog_finished_and_unfinished():
    log = parse_worklog(host_worklog([10.0, 20.0, 15.0]))
    assert [e["epoch"] for e in log.epochs] == [1, 2, 3]
    assert log.epochs[1]["test_acc"] == 20.0 and log.epochs[1]["test_acc_top5"] == 40.0 and log.epochs[0]["lr"] == 0.05
    assert log.best_acc == 20.0
    assert parse_worklog(host_worklog([10.0], finished=False)).best_acc is None
    with pytest.raises(WorklogError, match="line 3: test_acc has non-numeric value 'lots'"):
        parse_worklog("-------------------------\nepoch: 1\ntest_acc: lots\n")


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
        "| cifar100 | res56_res20 | kd | 2 | 70.50 ± 0.71 | 70.00 ± 0.71 | 90.00 | – | -1.00 | 70.66 | -0.16 |"
        in md.stdout
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
    assert proc.returncode != 0 and "unknown section(s) ['min_acc']" in proc.stderr


def test_check_function_lists_every_failure():
    assert cli.check([], {"required": ["a/b/c"], "min_best_acc": {"a/b/d": 1.0}}) == [
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


# --- failed and non-finite runs ------------------------------------------------------------------


def test_parse_failed_line():
    text = host_worklog([10.0, 20.0], finished=False) + "failed\tepoch 3 step 17: non-finite training loss\n"
    log = parse_worklog(text)
    assert log.failed == "epoch 3 step 17: non-finite training loss" and log.best_acc is None
    assert [e["epoch"] for e in log.epochs] == [1, 2]
    assert parse_worklog(host_worklog([10.0])).failed is None
    assert parse_worklog(host_worklog([10.0], finished=False) + "failed\t").failed == "no reason given"


def host_block(epoch: int, acc: float) -> str:
    return host_worklog([acc], finished=False).replace("epoch: 1", f"epoch: {epoch}", 1)


@pytest.mark.parametrize(
    "text, message",
    [
        # 9 lines per block: the third block's epoch line is line 20, a best_acc after two blocks line 19
        (host_worklog([10, 20], finished=False) + host_block(2, 21), "line 20: epoch 2 repeats"),
        (host_block(1, 10) + host_block(3, 20) + host_block(2, 21), r"line 20: epoch 2 goes back \(previous epoch 3\)"),
        (host_worklog([10, 20]) + host_block(3, 21), "line 19: text after the best_acc value: '-----"),
        (host_worklog([10, 20]) + "best_acc\t20.00", "line 19: text after the best_acc value: 'best_acc"),
        (host_worklog([10, 20]) + "\nbest_acc\t20.00", r"line 20: .* after the best_acc line \(line 19\)"),
        (
            host_worklog([10], finished=False) + "failed\tboom\n" + host_block(2, 20),
            r"line 11: .* failed line \(line 10\)",
        ),
        (host_worklog([10], finished=False) + "failed: boom\n", "line 10: malformed failed line"),
        (
            host_worklog([10], finished=False) + "-" * 25 + "\nepoch: 2\nbest_acc\t10.00",
            "line 12: best_acc line inside",
        ),
    ],
)
def test_malformed_worklogs_are_errors(text, message):
    with pytest.raises(WorklogError, match=message):
        parse_worklog(text)
