"""The published field in the leaderboard: the transcribed numbers, a pair's runs ranked among them with the protocol
differences named, and the LaTeX table (compiled with pdflatex where it is installed)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from test_leaderboard import cfg, make_run

from normkd_plugin.leaderboard.field import entries

FIELD = Path(__file__).resolve().parents[1] / "normkd_plugin" / "leaderboard" / "field"
PUBLISHED = FIELD.parent / "published.csv"


def _csv_rows() -> list[dict]:
    """Every row of the field files, read here with the csv module alone."""
    return [row for path in sorted(FIELD.glob("*.csv")) for row in csv.DictReader(path.read_text().splitlines())]


def _comparable(row: dict, epochs: int) -> bool:
    """A published row is ranked beside runs of ``epochs`` epochs: same epochs, standard augmentation, not the teacher."""
    return row["method"] != "teacher" and row["epochs"] == str(epochs) and row["augmentation"] == "standard"


def _leaderboard(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "normkd_plugin.leaderboard.cli", *map(str, args)], capture_output=True, text=True
    )


def _seeds(root: Path, method: str, bests: list[float], epochs: int = 240, **kw) -> None:
    """Finished runs of ``method`` on res56_res20, one per seed, whose best epochs are ``bests`` (last: best − 0.3)."""
    for seed, best in enumerate(bests):
        accs = [best - 5] * (epochs - 2) + [best, best - 0.3]
        make_run(
            root, f"{method}-{seed}-{epochs}", accs, config=cfg(method, seed=seed, epochs=epochs, trainer="fast", **kw)
        )


@pytest.mark.quick
def test_field_holds_the_sources_numbers_once_each_and_agrees_with_published_csv():
    rows = _csv_rows()
    assert len(entries()) == len(rows)
    keys = [(r["dataset"], r["pair"], r["method"]) for r in rows]
    assert len(set(keys)) == len(keys)
    field = {k: float(r["top1"]) for k, r in zip(keys, rows)}
    published = list(csv.DictReader(PUBLISHED.read_text().splitlines()))
    for p in published:  # two transcriptions of the same READMEs must agree
        key = (p["dataset"], p["pair"])
        assert field[(*key, "kd")] == float(p["kd"]) and field[(*key, "dkd")] == float(p["dkd"]), key
        if p["dataset"] == "cifar100":
            assert field[(*key, "teacher")] == float(p["teacher_acc"]), key
            assert field[(*key, "none")] == float(p["student_acc"]), key
    for r in rows:  # MLKD's protocol is never lost
        strong = r["method"] in ("mlkd", "mlkd_ls")
        assert (r["augmentation"] == "strong") == strong and (r["epochs"] == "480") == strong, r
        assert r["source"] and r["label"]
    methods = {m for _, _, m in keys}
    assert {"fitnet", "at", "rkd", "crd", "ofd", "reviewkd", "kd", "dkd", "kd_dot"} <= methods
    assert {"kd_ls", "dkd_ls", "mlkd_ls", "mlkd", "ctkd"} <= methods


def _field_json(root: Path, *args) -> list[dict]:
    out = _leaderboard(root, "--format", "json", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["field"]


def test_runs_of_res56_res20_are_ranked_among_the_240_epoch_field(tmp_path):
    _seeds(tmp_path, "normkd", [71.9, 72.2, 71.8])
    _seeds(tmp_path, "kd", [70.5, 70.9])
    (table,) = _field_json(tmp_path, "--field")
    assert (table["dataset"], table["pair"], table["protocol"]) == ("cifar100", "res56_res20", "240 epochs")
    lines = {line["label"]: line for line in table["lines"]}
    published = [r for r in _csv_rows() if (r["dataset"], r["pair"]) == ("cifar100", "res56_res20")]
    ours = {"normkd (fast)": statistics.fmean([71.9, 72.2, 71.8]), "kd (fast)": statistics.fmean([70.5, 70.9])}
    for label, mean in ours.items():
        above = sum(float(r["top1"]) > mean for r in published if _comparable(r, 240))
        above += sum(other > mean for other in ours.values())
        assert lines[label]["rank"] == 1 + above, label
        assert lines[label]["best"] == pytest.approx(mean) and lines[label]["yours"]
    n = lines["normkd (fast)"]
    assert n["best_std"] == pytest.approx(statistics.stdev([71.9, 72.2, 71.8]))
    assert n["last"] == pytest.approx(statistics.fmean([71.6, 71.9, 71.5])) and n["runs"] == "3 seeds"
    for r in published:  # every published number is there, ranked only beside runs of its protocol
        line = lines[r["label"]]
        assert line["best"] == float(r["top1"]) and line["source"] == r["source"]
        assert (line["rank"] is not None) == _comparable(r, 240), r["label"]
    for label in ("MLKD", "MLKD+LS"):
        assert lines[label]["differs"] == ["480 epochs", "strong augmentation (RandAugment view)"]
    assert lines["teacher"]["differs"] == ["the teacher"]
    assert "best or last epoch not stated" in lines["CRD"]["differs"]
    assert [line["best"] for line in table["lines"]] == sorted((line["best"] for line in table["lines"]), reverse=True)


def test_short_runs_are_ranked_among_themselves_only(tmp_path):
    _seeds(tmp_path, "normkd", [40.0, 41.0], epochs=3)
    _seeds(tmp_path, "dkd", [42.0], epochs=3)
    (table,) = _field_json(tmp_path, "--field")
    assert table["protocol"] == "3 epochs"
    ranked = {line["label"]: line["rank"] for line in table["lines"] if line["rank"] is not None}
    assert ranked == {"dkd (fast)": 1, "normkd (fast)": 2}
    assert all("240 epochs" in line["differs"] for line in table["lines"] if line["label"] == "DKD")


def test_a_tie_with_a_published_number_shares_its_rank(tmp_path):
    make_run(tmp_path, "normkd-0", [50.0, 76.32, 76.0], config=cfg("normkd", "resnet32x4", "resnet8x4", epochs=240))
    (table,) = _field_json(tmp_path, "--field")
    lines = {line["label"]: line for line in table["lines"]}
    published = [r for r in _csv_rows() if r["pair"] == "res32x4_res8x4" and _comparable(r, 240)]
    expect = 1 + sum(float(r["top1"]) > 76.32 for r in published)
    assert lines["normkd"]["rank"] == lines["DKD"]["rank"] == expect
    assert lines["KD+DOT"]["rank"] is not None and lines["MLKD+LS"]["rank"] is None


def test_the_field_of_res32x4_res8x4_and_res56_res20_in_markdown_with_protocols(tmp_path):
    _seeds(tmp_path, "normkd", [71.9, 72.2])
    out = _leaderboard(tmp_path, "--field-of", "res32x4_res8x4")
    assert out.returncode == 0, out.stderr
    md = out.stdout
    for pair, yours in (("res56_res20", "your runs: 240 epochs"), ("res32x4_res8x4", "no runs of yours on this pair")):
        head = f"Published field, cifar100/{pair} ({yours}; rank: best-epoch top-1 among the rows of 240 epochs"
        assert head in md
        block = md.split(head)[1].split("Published field")[0]
        for r in (r for r in _csv_rows() if r["pair"] == pair):
            line = next(x for x in block.splitlines() if x.startswith("| ") and f"| {r['label']} | {r['top1']} |" in x)
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[4:8] == [
                r["runs"] or "not stated",
                r["epochs"] or "–",
                r["augmentation"],
                r["source"].split()[0],
            ]
            assert (cells[0] != "–") == _comparable(r, 240), line
    assert "| – | MLKD+LS | 78.28 |" in md and "480 epochs; strong augmentation (RandAugment view)" in md
    assert "| **normkd (fast)** | 72.05 ± 0.21 |" in md


def test_field_input_errors_are_one_line_and_exit_2(tmp_path):
    _seeds(tmp_path, "kd", [70.0])
    out = _leaderboard(tmp_path, "--field-of", "res56_res2")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith("normkd-leaderboard: --field 'res56_res2': no published field for this pair")
    assert "did you mean res56_res20" in out.stderr
    out = _leaderboard(tmp_path, "--format", "csv", "--field")
    assert out.returncode == 2 and out.stdout == "" and out.stderr.count("\n") == 1 and "--field" in out.stderr


def _latex(tmp_path: Path) -> str:
    runs = tmp_path / "runs"
    _seeds(runs, "normkd", [71.9, 72.2, 71.8])
    _seeds(runs, "kd", [70.5, 70.9], epochs=3)  # a second protocol: its own block, ranked apart
    make_run(runs, "normdkd-0", [50.0, 70.0], config=cfg("normdkd", "wrn_40_2", "vgg8", epochs=2))  # no published field
    out = _leaderboard(runs, "--format", "latex", "--field-of", "cifar100/res32x4_res8x4")
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_latex_rows_mark_sources_protocols_and_our_seeds(tmp_path):
    tex = _latex(tmp_path)
    assert tex.count("\\begin{tabular}") == 1 and "\\toprule" in tex and "\\bottomrule" in tex
    mean, std = statistics.fmean([71.9, 72.2, 71.8]), statistics.stdev([71.9, 72.2, 71.8])
    last_mean, last_std = statistics.fmean([71.6, 71.9, 71.5]), statistics.stdev([71.6, 71.9, 71.5])
    assert (
        f"NormKD (fast) & 3 & ${mean:.2f} \\pm {std:.2f}$ & ${last_mean:.2f} \\pm {last_std:.2f}$ & 240 & ours \\\\"
        in tex
    )
    assert "NormDKD & 1 & 70.00 & 70.00 & 2 & ours" in tex and "wrn\\_40\\_2 $\\rightarrow$ vgg8" in tex
    legend = re.findall(r"\\footnotesize ([a-z]): (.*)\} \\\\$", tex, re.MULTILINE)
    letter = {source.replace("\\_", "_"): key for key, source in legend}
    assert len(letter) == 5  # CRD, LSKD, and three parts of mdistiller's README
    block = tex.split("resnet32x4 $\\rightarrow$ resnet8x4")[1]
    for r in (r for r in _csv_rows() if r["pair"] == "res32x4_res8x4"):
        epochs = (r["epochs"] or "--") + ("$^\\dagger$" if r["augmentation"] == "strong" else "")
        star = "$^\\ast$" if not r["metric"] and r["method"] != "teacher" else ""
        row = f"{r['label']} & {r['runs'] or '--'} & {r['top1']}{star} & -- & {epochs} & {letter[r['source']]} \\\\"
        assert row in block, row


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed (texlive-latex-recommended)")
def test_latex_compiles_with_pdflatex(tmp_path):
    (tmp_path / "table.tex").write_text(_latex(tmp_path))
    (tmp_path / "paper.tex").write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n\\input{table}\n\\end{document}\n"
    )
    out = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "paper.tex"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:]
    assert (tmp_path / "paper.pdf").read_bytes()[:5] == b"%PDF-"
