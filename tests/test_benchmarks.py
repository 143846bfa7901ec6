"""benchmarks/: the scripts run on a CPU with a few steps, so that they cannot rot between GPU runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO, needs_mdistiller

pytestmark = needs_mdistiller


def test_pack_speed_times_serial_and_fused_packs_on_a_cpu(tmp_path, small_cifar_npz):
    from normkd_plugin.engine.fuse_speed import read_table

    out, table = tmp_path / "pack_speed.md", tmp_path / "fuse_speed.csv"
    cmd = [
        sys.executable, "benchmarks/pack_speed.py", "--device", "cpu", "--data", str(small_cifar_npz),
        "--pairs", "res56_res20", "--precisions", "fp32", "--sizes", "1,4", "--iters", "1", "--warmup", "1",
        "--workers", "0", "--out", str(out), "--table", str(table),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        m.group(1): m
        for m in re.finditer(
            r"^\| res56_res20 \| fp32 \| – \| (\d+ \w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)× \| nan× \| nan \|  \|$",
            out.read_text(),
            re.M,
        )
    }
    assert set(rows) == {"1 solo", "4 serial", "4 fused"}, out.read_text()
    assert all(float(m.group(2)) > 0 for m in rows.values())
    assert rows["1 solo"].group(4) == "1.000"  # each run's cost is quoted as a ratio to the solo run
    (measured,) = read_table(table)  # K = 4: serial against fused, as the rows say (to their 2 decimals)
    assert (measured.student, measured.precision, measured.runs) == ("resnet20", "fp32", 4)
    assert f"{measured.serial_ms:.2f}" == rows["4 serial"].group(2) and f"{measured.fused_ms:.2f}" == rows[
        "4 fused"
    ].group(2)
    assert measured.device.startswith("CPU")


def test_a_failing_case_is_a_row_and_a_failed_fused_case_is_infinitely_slow(
    tmp_path, small_cifar_npz, monkeypatch, capsys
):
    """The fused layout raising (as a capture or an allocation can on a GPU): its row says so, the serial row and
    the table go on, and the measurement tells FUSE auto not to fuse."""
    import importlib.util
    import math
    from types import SimpleNamespace

    import torch

    from normkd_plugin.engine import layout
    from normkd_plugin.engine.fuse_speed import read_table

    spec = importlib.util.spec_from_file_location("pack_speed", REPO / "benchmarks" / "pack_speed.py")
    pack_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack_speed)

    def out_of_memory(self):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    monkeypatch.setattr(layout.FusedStudents, "step", out_of_memory)  # the fused students' SGD step
    out, table = tmp_path / "pack_speed.md", tmp_path / "fuse_speed.csv"
    monkeypatch.setattr(sys, "argv", [
        "pack_speed.py", "--device", "cpu", "--data", str(small_cifar_npz), "--pairs", "res56_res20",
        "--precisions", "fp32", "--sizes", "4", "--iters", "1", "--warmup", "1", "--workers", "0",
        "--out", str(out), "--table", str(table),
    ])  # fmt: skip
    pack_speed.main()
    text = out.read_text()
    assert re.search(r"^\| res56_res20 \| fp32 \| – \| 4 serial \| [\d.]+ \|", text, re.M)
    assert (
        "| 4 fused | – | – | – | – | – | failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB |" in text
    )
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    (measured,) = read_table(table)
    assert measured.fused_ms == math.inf and measured.serial_ms > 0 and "out of memory" in measured.note
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    graph = SimpleNamespace(graph=None, failure="operation not permitted when stream is capturing")
    assert pack_speed.graph_note(SimpleNamespace(graph=graph), cuda) == (
        "eager: graph capture failed (operation not permitted when stream is capturing)"
    )
    assert pack_speed.graph_note(SimpleNamespace(graph=SimpleNamespace(graph=object(), failure="")), cuda) == ""
    assert pack_speed.graph_note(SimpleNamespace(graph=graph), cpu) == ""


def test_imagenet_pack_times_packs_and_solo_runs_in_both_settings_on_a_cpu(tmp_path):
    out = tmp_path / "imagenet_pack.md"
    cmd = [
        sys.executable, "benchmarks/imagenet_pack.py", "--device", "cpu", "--methods", "kd,normkd",
        "--images", "1", "--batch", "1", "--iters", "1", "--warmup", "0", "--workers", "0", "--repeats", "1",
        "--decode", "host", "--decode-sides", "300,400", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    number = r"([\d.]+(?:e-?\d+)?)"
    rows = {
        m.group(1): m
        for m in re.finditer(
            rf"^\| (\w+)-bound \| host \| [^|]+ \| [^|]+ \| {number} \| {number} \| {number} \| (\d+)% \| (\d+)% \|",
            out.read_text(),
            re.M,
        )
    }
    assert set(rows) == {"compute", "decode"}, out.read_text()
    for m in rows.values():
        solo, pack, ratio = (float(m.group(i)) for i in (2, 3, 4))
        assert solo > 0 and pack > 0 and ratio > 0
        assert abs(ratio - pack / solo) < 1e-3 + 1e-3 * ratio  # the ratio is pack / solo as printed
        assert all(0 <= int(m.group(i)) <= 100 for i in (5, 6))
    assert "kd,normkd" in out.read_text() and "Load average" in out.read_text()


def test_imagenet_loader_times_the_host_loader_and_the_tensor_pipeline_on_a_cpu(tmp_path):
    out = tmp_path / "imagenet_loader.md"
    cmd = [
        sys.executable, "benchmarks/imagenet_loader.py", "--device", "cpu", "--images", "32", "--batch-size", "4",
        "--workers", "0,1", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^\| (train|val) \| (\d) \| (\d+) \| (\d+) \| ([\d.]+)x \|$", out.read_text(), re.M)
    assert [(split, workers) for split, workers, *_ in rows] == [
        ("train", "0"),
        ("train", "1"),
        ("val", "0"),
        ("val", "1"),
    ]
    assert all(int(host) > 0 and int(tensor) > 0 for _, _, host, tensor, _ in rows), out.read_text()
