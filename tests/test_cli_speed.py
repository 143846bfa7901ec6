"""The command lines that never touch a tensor start without importing torch (about 1-2 s of start-up saved)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Runs one console script in a fresh interpreter, then reports whether torch got imported.
PROBE = textwrap.dedent(
    """
    import sys
    from importlib.metadata import entry_points

    name, *args = sys.argv[1:]
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == name]
    sys.argv = [name, *args]
    try:
        ep.load()()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    print("EXIT", code, "TORCH", "torch" in sys.modules, file=sys.stderr)
    """
)


@pytest.mark.parametrize(
    "argv",
    [
        ["normkd-configs"],
        ["normkd-configs", "--help"],
        ["normkd-configs", "--method", "normkd", "--dataset", "cifar100"],
        ["normkd-configs", "--method", "vanilla"],
        ["normkd-sweep", "--help"],
        ["normkd-sweep", "--methods", "kd,normkd", "--seeds", "0,1"],  # prints the commands, runs nothing
        ["normkd-leaderboard", "--help"],
        ["normkd-train", "--help"],
        ["normkd-teachers", "--help"],
    ],
    ids=" ".join,
)
def test_light_command_lines_do_not_import_torch(argv):
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "EXIT 0 TORCH False", proc.stderr[-3000:]
    assert proc.stdout.strip()  # the command did its job (help text, table or commands)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["normkd-train", "--cfg", "cifar100/normkd/res56_res2"], "--cfg 'cifar100/normkd/res56_res2' is neither"),
        (["normkd-train", "--cfg", "cifar100/kd/res56_res20", "--seeds", "0,x"], "--seeds '0,x': expected"),
        (["normkd-train", "--cfg", "cifar100/kd/res56_res20", "--time-limit", "soon"], "--time-limit"),
        (["normkd-train", "--cfg", "cifar100/kd/res56_res20", "SOLVER.LR"], "SOLVER.LR has no VALUE"),
        (["normkd-sweep", "--pairs", "res56_res20", "SOLVER.LR", "--run"], "SOLVER.LR has no VALUE"),
        (["normkd-teachers", "--from", "/nonexistent/cifar_teachers.tar"], "--from /nonexistent/cifar_teachers.tar"),
    ],
    ids=lambda x: " ".join(x) if isinstance(x, list) else None,
)
def test_bad_input_is_refused_before_torch_is_imported(argv, message):
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "EXIT 2 TORCH False", proc.stderr[-3000:]
    assert message in lines[-2] and lines[-2].startswith(f"{argv[0]}: ")


def test_the_probe_sees_torch_when_it_is_imported():
    """The probe itself can fail: normkd-train --list-distillers imports torch, and the probe reports it."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "normkd-train", "--list-distillers"], capture_output=True, text=True, timeout=300
    )
    assert proc.stderr.strip().splitlines()[-1] == "EXIT 0 TORCH True", proc.stderr[-3000:]


def test_package_names_still_resolve_lazily():
    code = (
        "import sys, normkd_plugin as n; assert 'torch' not in sys.modules; "
        "assert callable(n.normkd_loss) and callable(n.normdkd_loss) and callable(n.per_sample_temperature); "
        "assert 'torch' in sys.modules and issubclass(n.PluginError, RuntimeError) and n.Plugin.__name__ == 'Plugin'; "
        "from normkd_plugin import register, normkd_loss; assert normkd_loss is n.normkd_loss; "
        "assert set(n.__all__) <= set(dir(n))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import normkd_plugin

        normkd_plugin.nope  # noqa: B018
