"""install.py: the one set-up command (this package with its test extra, and mdistiller as an editable checkout)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

COMMIT = "a08d46f10d6102bd6e3f258ca5ac880b020ea259"


def _dry(env_src: str | None, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MDISTILLER_SRC"}
    if env_src is not None:
        env["MDISTILLER_SRC"] = env_src
    return subprocess.run(
        [sys.executable, str(REPO / "install.py"), "--dry-run", *args], capture_output=True, text=True, env=env
    )


def test_with_network_mdistiller_is_an_editable_clone_at_the_pinned_commit(tmp_path):
    out = _dry(None, "--src", str(tmp_path))
    assert out.returncode == 0, out.stderr
    clone = f"git+https://github.com/megvii-research/mdistiller@{COMMIT}#egg=mdistiller"
    assert f"-m pip install -e '{REPO}[test]' -e '{clone}' --src {tmp_path}" in out.stdout


def test_a_local_checkout_is_installed_editable(tmp_path):
    (tmp_path / "setup.py").write_text("")
    out = _dry(str(tmp_path))
    assert out.returncode == 0 and out.stdout.strip().endswith(f"-e '{REPO}[test]' -e {tmp_path}")


def test_a_folder_that_is_no_checkout_is_refused(tmp_path):
    out = _dry(str(tmp_path))
    assert out.returncode == 2 and "is not an mdistiller checkout (no setup.py)" in out.stderr


def test_the_pinned_commit_is_the_one_setup_py_names():
    assert COMMIT in (REPO / "setup.py").read_text() and COMMIT in (REPO / "install.py").read_text()


def test_ci_runs_the_two_set_up_commands_the_readme_shows_first():
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["python install.py", "python -m pytest -n auto"]
    ci = (REPO / ".ci" / "run").read_text()
    assert all(command in ci.splitlines() or f"  {command}" in ci.splitlines() for command in commands)
