"""benchmarks/: the scripts run on a CPU with a few steps, so that they cannot rot between GPU runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO, needs_mdistiller

pytestmark = needs_mdistiller


def test_pack_speed_times_serial_and_fused_packs_on_a_cpu(tmp_path, small_cifar_npz):
    out = tmp_path / "pack_speed.md"
    cmd = [
        sys.executable, "benchmarks/pack_speed.py", "--device", "cpu", "--data", str(small_cifar_npz),
        "--pairs", "res56_res20", "--precisions", "fp32", "--sizes", "1,4", "--iters", "1", "--warmup", "1",
        "--workers", "0", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        m.group(1): m
        for m in re.finditer(
            r"^\| res56_res20 \| fp32 \| (\d+ \w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)×", out.read_text(), re.M
        )
    }
    assert set(rows) == {"1 solo", "4 serial", "4 fused"}, out.read_text()
    assert all(float(m.group(2)) > 0 for m in rows.values())
    assert rows["1 solo"].group(4) == "1.000"  # each run's cost is quoted as a ratio to the solo run
