"""install.py: the one set-up command (this package with its test extra, and mdistiller as an editable checkout)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from conftest import REPO, needs_mdistiller

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


def _install_requires() -> list[str]:
    """setup.py's install_requires, read from its source."""
    for node in ast.walk(ast.parse((REPO / "setup.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no install_requires")


@needs_mdistiller
def test_scipy_is_required_because_mdistillers_distillers_import_it():
    """mdistiller needs scipy to import its distillers and does not declare it; this package must install it."""
    code = "import sys; sys.modules['scipy'] = None; import {}"
    for module, needs_scipy in (("mdistiller.distillers", True), ("mdistiller.engine.trainer", False)):
        proc = subprocess.run([sys.executable, "-c", code.format(module)], capture_output=True, text=True)
        assert (proc.returncode != 0 and "No module named 'scipy" in proc.stderr) == needs_scipy, (module, proc.stderr)
    assert "scipy" in _install_requires()


def test_ci_runs_the_two_set_up_commands_the_readme_shows_first():
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["python install.py", "python -m pytest -n auto"]
    ci = (REPO / ".ci" / "run").read_text()
    assert all(command in ci.splitlines() or f"  {command}" in ci.splitlines() for command in commands)


CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _install(tmp_path, *args: str, dists: tuple[tuple[str, str, list[str]], ...] = ()) -> subprocess.CompletedProcess:
    """``install.py --dry-run ARGS`` run by a Python without site-packages (so without torch) that sees only
    ``dists`` (name, version, Requires-Dist lines), written as installed distributions' metadata."""
    site = tmp_path / "site"
    site.mkdir(parents=True)
    for name, version, requires in dists:
        info = site / f"{name}-{version}.dist-info"
        info.mkdir()
        lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        (info / "METADATA").write_text("\n".join([*lines, *(f"Requires-Dist: {r}" for r in requires)]) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "MDISTILLER_SRC"}
    env["PYTHONPATH"] = str(site)
    return subprocess.run(
        [sys.executable, "-S", str(REPO / "install.py"), "--dry-run", *args], capture_output=True, text=True, env=env
    )


def test_torch_cpu_installs_pytorchs_cpu_build_first(tmp_path):
    out = _install(tmp_path, "--torch", "cpu")
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first == f"{sys.executable} -m pip install torch torchvision --index-url {CPU_INDEX}"
    assert second.startswith(f"{sys.executable} -m pip install -e '{REPO}[test]' -e 'git+https://github.com/")
    assert CPU_INDEX not in _install(tmp_path / "default").stdout  # without --torch cpu: pip's torch


def test_torch_cpu_keeps_a_cpu_build_that_is_there(tmp_path):
    cpu = (("torch", "2.5.1+cpu", ["filelock", "sympy"]), ("torchvision", "0.20.1+cpu", []))
    out = _install(tmp_path, "--torch", "cpu", dists=cpu)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "torch 2.5.1+cpu is a CPU build already; keeping it"
    assert len(lines) == 2 and CPU_INDEX not in out.stdout and "-m pip install -e" in lines[1]


def test_torch_cpu_adds_torchvision_to_a_cpu_torch_without_reinstalling_it(tmp_path):
    out = _install(tmp_path, "--torch", "cpu", dists=(("torch", "2.5.1", ["filelock"]),))  # macOS-style: no label
    assert out.returncode == 0  # the installed version is pinned: pip adds torchvision and keeps torch as it is
    assert (
        out.stdout.splitlines()[0]
        == f"{sys.executable} -m pip install torch==2.5.1 torchvision --index-url {CPU_INDEX}"
    )


def test_torch_cpu_over_a_cuda_build_is_refused_in_one_line(tmp_path):
    cuda = ("torch", "2.5.1", ['nvidia-cudnn-cu12==9.1.0.70; platform_system == "Linux"', "filelock"])
    out = _install(tmp_path, "--torch", "cpu", dists=(cuda, ("torchvision", "0.20.1", [])))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        "install.py: --torch cpu: this Python already has torch 2.5.1, a CUDA build; uninstall it first "
        "(pip uninstall torch torchvision) or use a fresh environment"
    ]
    labelled = (("torch", "2.5.1+cu121", []),)
    assert _install(tmp_path / "cu", "--torch", "cpu", dists=labelled).returncode == 2
    assert _install(tmp_path / "pypi", dists=labelled).returncode == 0  # without --torch cpu nothing is checked


def test_the_wheel_carries_the_mit_license(tmp_path):
    import shutil
    import zipfile

    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside setup.py
    src.mkdir()
    for name in ("setup.py", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for folder in ("normkd_plugin", "configs"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("normkd_plugin-*.whl")
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        license_text = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/licenses/LICENSE"))).decode()
    assert "License: MIT" in metadata.splitlines() and "License-File: LICENSE" in metadata.splitlines()
    assert license_text.startswith("MIT License\n") and "normkd-plugin contributors" in license_text.splitlines()[2]
