"""run_folder.py, run_files.py, lifecycle.py: atomic writes, the folder lock, start guards, worklog cut-back, resume fallback, and SIGKILL at any moment."""

from __future__ import annotations

import io
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_same_run, fast_opts, needs_mdistiller

BLOCK = "-------------------------\nepoch: {e}\nlr: 0.05\ntest_acc: 1.00\n-------------------------\n"


def _folder(tmp_path, name="run"):
    from normkd_plugin.run_folder import RunFolder

    return RunFolder(tmp_path / name)


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from normkd_plugin.run_files import atomic_write

    target = tmp_path / "latest"
    target.write_bytes(b"old")

    def broken(f):
        f.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]  # no temporary file left


def test_lock_refuses_a_second_holder_naming_its_pid(tmp_path):
    from normkd_plugin.errors import RunError

    first, second = _folder(tmp_path), _folder(tmp_path)
    first.lock()
    first.lock()  # idempotent for its holder
    with pytest.raises(RunError, match=rf"in use by another run \(PID {os.getpid()}\)"):
        second.lock()
    first.unlock()
    second.lock()
    second.unlock()


def test_lock_held_by_another_process(tmp_path):
    from normkd_plugin.errors import RunError

    code = textwrap.dedent(f"""
        import sys, time
        from normkd_plugin.run_folder import RunFolder
        RunFolder({str(tmp_path / "run")!r}).lock()
        print("locked", flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=rf"PID {holder.pid}\)"):
            _folder(tmp_path).lock()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    _folder(tmp_path).lock()  # the kernel released the dead holder's lock


@pytest.mark.parametrize(
    ("files", "status"),
    [
        ({}, "new"),
        ({".lock": ""}, "new"),
        ({"worklog.txt": BLOCK.format(e=1)}, "started"),
        ({"latest": "x"}, "started"),
        ({"worklog.txt": BLOCK.format(e=1) + "best_acc\t1.00"}, "finished"),
        ({"worklog.txt": BLOCK.format(e=1) + "failed\tepoch 2 step 3 of 4: non-finite training loss\n"}, "failed"),
        # finished is every epoch of SOLVER.EPOCHS, then best_acc equal to the best test_acc (worklog.finished)
        ({"worklog.txt": "best_acc\t1.00"}, "started"),
        ({"worklog.txt": BLOCK.format(e=1) + "best_acc\t1.00", "config.yaml": "SOLVER:\n  EPOCHS: 2\n"}, "started"),
        ({"worklog.txt": BLOCK.format(e=1) + "best_acc\t9.00"}, "started"),
    ],
)
def test_status_and_start_guards(tmp_path, files, status):
    from normkd_plugin.errors import RunError

    folder = _folder(tmp_path)
    folder.path.mkdir()
    for name, text in files.items():
        (folder.path / name).write_text(text)
    from normkd_plugin.lifecycle import RunLife, decision

    assert folder.status() == status
    if status == "new":
        assert decision(folder, resume=False) == "start"
        assert decision(folder, resume=True) == "start"  # --resume is resume-or-start
    else:
        advice = "set EXPERIMENT.NAME" if status == "finished" else "add --resume .* EXPERIMENT.NAME"
        with pytest.raises(RunError, match=f"already holds a {status} run; {advice}"):
            decision(folder, resume=False)
        has_state = "latest" in files
        expected = {"finished": "skip"}.get(status, "resume" if has_state else "start")  # no checkpoint: again
        assert decision(folder, resume=True) == expected
        life = RunLife(folder, resume=True)
        try:  # the lifecycle decides the same, holding the folder's lock
            assert life.decide() == expected and life.mode == expected
            with pytest.raises(RunError, match="in use by another run"):
                _folder(tmp_path).lock()
        finally:
            life.close()


def test_status_counts_the_epochs_of_this_commands_config(tmp_path):
    from normkd_plugin.run_folder import RunFolder

    folder = RunFolder(tmp_path / "run", "run", "SOLVER:\n  EPOCHS: 2\n")
    folder.path.mkdir()
    (folder.path / "config.yaml").write_text("SOLVER:\n  EPOCHS: 1\n")
    (folder.path / "worklog.txt").write_text(BLOCK.format(e=1) + "best_acc\t1.00")
    assert folder.status() == "started"
    (folder.path / "worklog.txt").write_text(BLOCK.format(e=1) + BLOCK.format(e=2) + "best_acc\t1.00")
    from normkd_plugin.lifecycle import decision

    assert folder.status() == "finished" and decision(folder, resume=True) == "skip"


def test_cut_worklog_keeps_complete_blocks_up_to_the_epoch(tmp_path):
    folder = _folder(tmp_path)
    folder.path.mkdir()
    half = "-------------------------\nepoch: 4\nlr: 0.0"
    (folder.path / "worklog.txt").write_text("".join(BLOCK.format(e=e) for e in (1, 2, 3)) + half)
    folder.cut_worklog(2)
    assert (folder.path / "worklog.txt").read_text() == BLOCK.format(e=1) + BLOCK.format(e=2)
    assert folder.has_epoch(2) and not folder.has_epoch(3)
    (folder.path / "worklog.txt").write_text(BLOCK.format(e=1) + "failed\tepoch 2 step 1 of 4: x\n")
    folder.cut_worklog(1)
    assert (folder.path / "worklog.txt").read_text() == BLOCK.format(e=1)


def test_load_state_falls_back_to_the_newest_readable_checkpoint(tmp_path, caplog):
    from normkd_plugin.errors import RunError

    folder = _folder(tmp_path)
    folder.path.mkdir()
    for epoch in (1, 2):
        folder.save(f"epoch_{epoch}", {"epoch": epoch, "model": {}})
    (folder.path / "latest").write_bytes(b"")  # a file emptied by a crash of an older writer
    with caplog.at_level("WARNING"):
        assert folder.load_state()["epoch"] == 2
    assert "unreadable checkpoint latest" in caplog.text
    for name in ("epoch_1", "epoch_2"):
        data = (folder.path / name).read_bytes()
        (folder.path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(RunError, match=r"no readable checkpoint in .*latest \(.*epoch_\d \("):
        folder.load_state()


def test_resume_refuses_a_changed_config_but_not_moved_paths(tmp_path):
    from normkd_plugin.errors import RunError

    folder = _folder(tmp_path)
    folder.path.mkdir()
    saved = "SOLVER:\n  LR: 0.05\n  EPOCHS: 240\n  FAST:\n    CUDA_GRAPH: true\nDATASET:\n  ROOT: /data/a\nLOG:\n  PREFIX: out\n"
    folder.write_text("config.yaml", saved)
    folder.check_config(saved.replace("/data/a", "/mnt/b").replace("out", "elsewhere"))
    folder.check_config(saved + "SOLVER_NEW_KEY: 1\n")  # a key the saved file predates is not compared
    folder.check_config(saved.replace("CUDA_GRAPH: true", "CUDA_GRAPH: false"))  # how, not what, is trained
    with pytest.raises(RunError, match=r"started with another config \(SOLVER.LR 0.05 -> 0.01\); resume with the same"):
        folder.check_config(saved.replace("0.05", "0.01"))


def test_written_files_follow_the_umask(tmp_path):
    from normkd_plugin.run_files import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "latest", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "latest").stat().st_mode & 0o777 == 0o644


def test_stale_temporary_files_are_removed_by_the_lock_holder(tmp_path):
    folder = _folder(tmp_path)
    folder.path.mkdir()
    (folder.path / ".latest.abc123.tmp").write_bytes(b"half")
    folder.lock()
    assert not (folder.path / ".latest.abc123.tmp").exists()


# -- SIGKILL at any moment, then --resume: bitwise the run that was never interrupted ------------


def _killable(point: str, marker: str, argv: list[str], threads: int) -> None:
    """``normkd-train argv`` in a process forked by the forkserver (which has imported torch, so it starts in a
    fraction of a second), on the test's number of threads (the same float rounding as the reference), that
    stops at ``point`` (writes ``marker``, then waits for the test's SIGKILL)."""
    from normkd_plugin import run_files, run_folder, train
    from normkd_plugin.engine.fit import Hook

    torch.set_num_threads(threads)

    def stop_here():
        Path(marker).write_text("at " + point)
        time.sleep(600)  # the test kills this process now

    class StopAt(Hook):
        def before_step(self, epoch, step):  # epoch 2, as its second training step starts
            if point == "mid-step" and epoch == 2 and step == 1:
                stop_here()

        def before_epoch(self, epoch, runs):  # epoch 2 fully committed, epoch 3 not started
            if point == "after-epoch" and epoch == 3:
                stop_here()

    latest_writes = [0]
    if point == "mid-write":  # half of epoch 2's `latest` written to its temporary file
        real_write = run_files.atomic_write

        def atomic_write(path, write):
            if Path(path).name == "latest":
                latest_writes[0] += 1
                if latest_writes[0] == 2:
                    buf = io.BytesIO()
                    write(buf)

                    def half(f):
                        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                        f.flush()
                        stop_here()

                    return real_write(path, half)
            return real_write(path, write)

        run_folder.atomic_write = atomic_write
    elif point == "between-writes":  # epoch 2's `latest` in place; student files, best, worklog not yet
        real_bytes = run_folder.RunFolder.write_bytes

        def write_bytes(self, name, data):
            real_bytes(self, name, data)
            if name == "latest":
                latest_writes[0] += 1
                if latest_writes[0] == 2:
                    stop_here()

        run_folder.RunFolder.write_bytes = write_bytes
    elif point == "mid-worklog":  # epoch 2's worklog block half appended
        real_append = run_folder.RunFolder.append

        def append(self, text):
            if "epoch: 2" in text:
                real_append(self, text[: len(text) // 2])
                stop_here()
            real_append(self, text)

        run_folder.RunFolder.append = append
    train.main(argv, hooks=[StopAt()])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, small_cifar_npz, teacher_resnet56):
    from normkd_plugin import train

    prefix = tmp_path_factory.mktemp("uninterrupted")
    train.main(_argv(small_cifar_npz, teacher_resnet56, prefix))
    return next((prefix / "cifar100").iterdir())


def _argv(root, teacher, prefix):
    opts = fast_opts(root, teacher, prefix, 3, "SOLVER.EPOCHS", "3", "SOLVER.LR_DECAY_STAGES", "[2]")
    return ["--cfg", "cifar100/normdkd/res56_res20", "--device", "cpu", *opts]


@needs_mdistiller
@pytest.mark.parametrize("point", ["mid-step", "mid-write", "between-writes", "mid-worklog", "after-epoch"])
def test_sigkill_at_any_moment_then_resume_is_bitwise_the_uninterrupted_run(
    tmp_path, small_cifar_npz, teacher_resnet56, reference_run, point
):
    from normkd_plugin import train

    argv = _argv(small_cifar_npz, teacher_resnet56, tmp_path)
    marker = tmp_path / "marker"
    child = multiprocessing.get_context("forkserver").Process(
        target=_killable, args=(point, str(marker), argv, torch.get_num_threads())
    )
    child.start()
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.exitcode is None, (
                f"the child exited ({child.exitcode}) before the kill point (its stderr above)"
            )
            assert time.monotonic() < deadline, "the child never reached the kill point"
            time.sleep(0.05)
    finally:
        child.kill()  # SIGKILL
        child.join()
    assert child.exitcode == -signal.SIGKILL
    (folder,) = list((tmp_path / "cifar100").iterdir())
    assert folder.name == reference_run.name
    if point == "mid-write":
        assert any(p.name.startswith(".latest.") for p in folder.iterdir())  # the half-written file
    train.main(["--resume", *argv])
    assert_same_run(folder, reference_run)
    for name in ("best", "student_best", "student_latest"):
        a, b = (torch.load(d / name, weights_only=False) for d in (folder, reference_run))
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
    assert not any(p.name.endswith(".tmp") for p in folder.iterdir())
    assert (folder / "worklog.txt").read_text().count("best_acc") == 1


def test_redo_epoch_restores_what_follows_latest(tmp_path):
    """A kill after `latest` of epoch 2: redo writes the worklog block, student_latest and (a best epoch) best."""
    folder = _folder(tmp_path)
    folder.path.mkdir()
    (folder.path / "worklog.txt").write_text(BLOCK.format(e=1) + "-------------------------\nepoch: 2\nlr")
    record = {"train_acc": 1.0, "train_loss": 4.5, "test_acc": 2.0, "test_acc_top5": 9.0, "test_loss": 4.4}
    state = {"epoch": 2, "model": {"w": torch.ones(2)}, "lr": 0.05, "record": record, "saved_best": True}
    folder.redo_epoch(state, {"model": {"w": torch.ones(2)}}, save_freq=2)
    text = (folder.path / "worklog.txt").read_text()
    assert text.startswith(BLOCK.format(e=1)) and text.count("epoch: 2") == 1 and "test_acc: 2.00" in text
    assert {"best", "student_best", "student_latest", "epoch_2", "student_2"} <= {p.name for p in folder.path.iterdir()}
    folder.redo_epoch(state, {"model": {"w": torch.ones(2)}}, save_freq=2)  # idempotent
    assert (folder.path / "worklog.txt").read_text() == text


def test_a_refused_start_leaves_no_empty_folder(tmp_path):
    folder = _folder(tmp_path)
    folder.lock()
    folder.unlock()
    assert not folder.path.exists()  # nothing but the lock was there
    folder.lock()
    (folder.path / "config.yaml").write_text("SOLVER: {}\n")
    folder.unlock()
    assert (folder.path / "config.yaml").is_file()


def test_a_refused_start_leaves_no_empty_dataset_folder(tmp_path):
    from normkd_plugin.run_folder import RunFolder

    prefix = tmp_path / "output"
    folder = RunFolder(prefix / "cifar100" / "normkd,res56,res20")
    folder.lock()
    folder.unlock()
    assert list(tmp_path.iterdir()) == []  # LOG.PREFIX/<dataset>/ made for the run: removed with it
    other = RunFolder(prefix / "cifar100" / "kd,res56,res20")
    other.lock()
    (other.path / "worklog.txt").write_text("")
    folder.lock()
    folder.unlock()
    other.unlock()
    assert [p.name for p in (prefix / "cifar100").iterdir()] == ["kd,res56,res20"]  # a parent in use stays


# -- a state knows whose it is: identity, records, config.yaml and worklog rebuilt from it --------------


def _short_argv(root, teacher, prefix, seed, cfg="cifar100/normkd/res56_res20"):
    opts = fast_opts(
        root, teacher, prefix, seed, "SOLVER.EPOCHS", "3", "SOLVER.LR_DECAY_STAGES", "[2]",
        "SOLVER.FAST.ITERS_PER_EPOCH", "1",
    )  # fmt: skip
    return ["--cfg", cfg, "--device", "cpu", *opts]


@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory, small_cifar_npz, teacher_resnet56):
    """Seeds 0 and 1 of a 3-epoch run, each stopped before epoch 3 (latest at epoch 2): {seed: prefix}."""
    from conftest import interrupted_at
    from normkd_plugin import train

    out = {}
    for seed in (0, 1):
        prefix = tmp_path_factory.mktemp(f"stopped{seed}")
        with pytest.raises((SystemExit, KeyboardInterrupt)):
            train.main(_short_argv(small_cifar_npz, teacher_resnet56, prefix, seed), hooks=[interrupted_at(3)])
        out[seed] = prefix
    return out


def _copy_run(stopped_runs, seed, tmp_path):
    """A copy of the stopped run of ``seed`` under a fresh LOG.PREFIX: (prefix, run folder)."""
    import shutil

    prefix = tmp_path / "prefix"
    shutil.copytree(stopped_runs[seed], prefix)
    (folder,) = list((prefix / "cifar100").iterdir())
    return prefix, folder


def _resume(argv, capsys):
    """--resume argv in this process: (exit code, stderr)."""
    from normkd_plugin import train

    try:
        train.main(["--resume", *argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def _worklog_of_records(folder):
    from conftest import load_state
    from normkd_plugin.worklog import block

    state = load_state(folder)
    return "".join(block(r["epoch"], r["lr"], r["record"]) for r in state["records"])


@needs_mdistiller
def test_resume_refuses_a_latest_copied_from_another_run(
    tmp_path, stopped_runs, small_cifar_npz, teacher_resnet56, capsys
):
    import shutil

    prefix, folder = _copy_run(stopped_runs, 0, tmp_path)
    (other,) = list((stopped_runs[1] / "cifar100").iterdir())
    shutil.copy(other / "latest", folder / "latest")  # another seed's state in this run's folder
    before = (folder / "worklog.txt").read_text()
    code, err = _resume(_short_argv(small_cifar_npz, teacher_resnet56, prefix, 0), capsys)
    assert code == 2
    assert f"{folder}/latest is a state of run 'cifar100/{other.name}' (seed 1)" in err
    assert f"not of this folder's run 'cifar100/{folder.name}' (seed 0)" in err
    assert (folder / "worklog.txt").read_text() == before and "best_acc" not in before


@needs_mdistiller
@pytest.mark.parametrize("config_yaml", ["deleted", "empty", "binary"])
def test_resume_without_config_yaml_checks_the_state_and_rewrites_config_yaml(
    tmp_path, stopped_runs, small_cifar_npz, teacher_resnet56, capsys, caplog, config_yaml
):
    import yaml

    prefix, folder = _copy_run(stopped_runs, 0, tmp_path)
    saved = (folder / "config.yaml").read_text()
    {"deleted": lambda p: p.unlink(), "empty": lambda p: p.write_text(""), "binary": lambda p: p.write_bytes(
        b"\x00\xff\xfe garbage \x89PNG")}[config_yaml](folder / "config.yaml")  # fmt: skip
    other = tmp_path / "other.yaml"  # the same run name, another LR and temperature
    from normkd_plugin.config import resolve_config

    cfg = yaml.safe_load(resolve_config("cifar100/normkd/res56_res20").read_text())
    cfg["SOLVER"]["LR"], cfg["NORMKD"]["TEMPERATURE_NORM"] = 0.2, 3.0
    other.write_text(yaml.safe_dump(cfg))
    argv = _short_argv(small_cifar_npz, teacher_resnet56, prefix, 0)
    code, err = _resume([*argv[:1], str(other), *argv[2:]], capsys)
    assert code == 2
    assert f"{folder}/latest was trained with another config than this command's" in err
    assert "SOLVER.LR 0.05 -> 0.2" in err and "TEMPERATURE_NORM" in err
    assert "best_acc" not in (folder / "worklog.txt").read_text()
    with caplog.at_level("WARNING"):
        code, err = _resume(argv, capsys)
    assert code == 0, err
    assert (
        f"config.yaml was {dict(deleted='missing', binary='damaged').get(config_yaml, config_yaml)}; rewritten"
        in caplog.text
    )
    assert (folder / "config.yaml").read_text() == saved
    assert re.search(r"\nbest_acc\t\d+\.\d\d$", (folder / "worklog.txt").read_text())


@needs_mdistiller
@pytest.mark.parametrize(
    "damage",
    ["cut in the closing dashes", "cut inside epoch 1", "deleted", "binary garbage", "a block lost and one added"],
)
def test_resume_rebuilds_a_worklog_that_disagrees_with_the_records(
    tmp_path, stopped_runs, small_cifar_npz, teacher_resnet56, capsys, caplog, damage
):
    prefix, folder = _copy_run(stopped_runs, 0, tmp_path)
    path = folder / "worklog.txt"
    text = path.read_text()
    assert text.count("epoch: ") == 2 and text.endswith("-" * 25 + "\n")
    if damage == "cut in the closing dashes":
        path.write_text(text[:-5])
    elif damage == "cut inside epoch 1":
        path.write_text(text[: text.index("test_acc")])
    elif damage == "deleted":
        path.unlink()
    elif damage == "binary garbage":
        path.write_bytes(b"\x00\x9f" * 200)
    else:
        path.write_text(text.replace("epoch: 1\n", "epoch: 7\n"))
    with caplog.at_level("WARNING"):
        code, err = _resume(_short_argv(small_cifar_npz, teacher_resnet56, prefix, 0), capsys)
    assert code == 0, err
    rebuilt = [r.getMessage() for r in caplog.records if "rebuilt from the checkpoint's records" in r.getMessage()]
    assert len(rebuilt) == 1 and "epochs 1-2" in rebuilt[0]
    final = path.read_text()
    assert final == _worklog_of_records(folder) + final[final.rindex("best_acc") :]
    assert [int(x.split()[0]) for x in final.split("epoch: ")[1:]] == [1, 2, 3]

    from normkd_plugin.leaderboard.results import read_run  # the leaderboard counts the run, whole

    assert read_run(folder) is not None


@needs_mdistiller
def test_a_state_from_before_identities_still_resumes_with_a_warning(
    tmp_path, stopped_runs, small_cifar_npz, teacher_resnet56, capsys, caplog
):
    from conftest import load_state

    prefix, folder = _copy_run(stopped_runs, 0, tmp_path)
    state = load_state(folder)
    del state["identity"], state["records"]
    torch.save(state, folder / "latest")
    with caplog.at_level("WARNING"):
        code, err = _resume(_short_argv(small_cifar_npz, teacher_resnet56, prefix, 0), capsys)
    assert code == 0, err
    assert "a state from before identities" in caplog.text
    final = load_state(folder)
    assert [r["epoch"] for r in final["records"]] == [1, 2, 3]  # seeded from the worklog, then carried on
    assert final["identity"]["run"] == f"cifar100/{folder.name}" and final["identity"]["seed"] == 0


# -- a run knows what it learned from: its teacher's and its data's contents ----------------------------


def _sha256(path) -> str:
    import hashlib
    from pathlib import Path

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _learned(teacher, root, shards=("train-0-of-1.npz", "test-0-of-1.npz")) -> dict:
    """What a run on the npz ``root`` with ``teacher`` records, from the files themselves."""
    return {
        "teacher": {"path": os.path.abspath(teacher), "sha256": _sha256(teacher)},
        "data": {"root": os.path.abspath(root), "files": {name: _sha256(root / name) for name in shards}},
    }


def _other_teacher(teacher, path):
    """A resnet56 checkpoint of other weights: the real teacher with one tensor changed (the same size)."""
    state = torch.load(teacher, map_location="cpu", weights_only=True)
    state["fc.bias"] = state["fc.bias"] + 0.5
    torch.save(state, path)
    return path


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


@needs_mdistiller
def test_a_run_records_its_teacher_and_data_at_its_start(stopped_runs, small_cifar_npz, teacher_resnet56):
    import yaml

    from conftest import load_state
    from normkd_plugin.config import load_config

    (folder,) = list((stopped_runs[0] / "cifar100").iterdir())
    expected = _learned(teacher_resnet56, small_cifar_npz)
    assert load_state(folder)["identity"]["learned_from"] == expected
    assert load_state(folder, "best")["identity"]["learned_from"] == expected
    assert yaml.safe_load((folder / "provenance.yaml").read_text()) == expected
    load_config(str(folder / "config.yaml"))  # config.yaml stays the host's config: it loads as one


@needs_mdistiller
def test_resume_refuses_another_teacher_naming_both_files(
    tmp_path, stopped_runs, small_cifar_npz, teacher_resnet56, capsys
):
    prefix, folder = _copy_run(stopped_runs, 0, tmp_path)
    other = _other_teacher(teacher_resnet56, tmp_path / "other.pt")
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    code, err = _resume(_short_argv(small_cifar_npz, other, prefix, 0), capsys)
    assert code == 2
    assert _last_line(err) == (
        f"normkd-train: --resume: {folder}/latest was trained with another teacher than this command's (teacher "
        f"{teacher_resnet56} (sha256 {_sha256(teacher_resnet56)[:12]}) -> {other} (sha256 {_sha256(other)[:12]})); "
        "resume with the files it started with (moved or copied is fine), or start a new run with another "
        "EXPERIMENT.NAME"
    )
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == {name: data for name, data in before.items() if name != ".lock"}  # nothing touched


@needs_mdistiller
def test_resume_refuses_other_data_naming_the_file_and_both_digests(
    tmp_path, stopped_runs, small_cifar_npz, teacher_resnet56, capsys
):
    import shutil

    import numpy as np

    prefix, folder = _copy_run(stopped_runs, 0, tmp_path)
    root = tmp_path / "data"
    shutil.copytree(small_cifar_npz, root)
    with np.load(root / "train-0-of-1.npz") as z:
        images, labels = z["images"], z["labels"].copy()
    labels[0] = (labels[0] + 1) % 100  # one label of 56
    np.savez(root / "train-0-of-1.npz", images=images, labels=labels)
    old, new = _sha256(small_cifar_npz / "train-0-of-1.npz"), _sha256(root / "train-0-of-1.npz")
    code, err = _resume(_short_argv(root, teacher_resnet56, prefix, 0), capsys)
    assert code == 2
    assert _last_line(err).startswith(
        f"normkd-train: --resume: {folder}/latest was trained on other data than this command's (data in "
        f"{small_cifar_npz} -> {root}: train-0-of-1.npz sha256 {old[:12]} -> sha256 {new[:12]}); "
    )
    assert "best_acc" not in (folder / "worklog.txt").read_text()


@needs_mdistiller
def test_resume_with_the_teacher_and_data_copied_elsewhere_continues_and_records_the_new_paths(
    tmp_path, stopped_runs, small_cifar_npz, teacher_resnet56, capsys
):
    import shutil

    import yaml

    from conftest import load_state

    prefix, folder = _copy_run(stopped_runs, 0, tmp_path)
    teacher, root = tmp_path / "moved" / "teacher.pt", tmp_path / "data"
    teacher.parent.mkdir()
    shutil.copy(teacher_resnet56, teacher)
    shutil.copytree(small_cifar_npz, root)
    code, err = _resume(_short_argv(root, teacher, prefix, 0), capsys)
    assert code == 0, err
    state = load_state(folder)
    assert state["epoch"] == 3 and "best_acc" in (folder / "worklog.txt").read_text()
    assert state["identity"]["learned_from"] == _learned(teacher, root)
    assert _learned(teacher, root)["teacher"]["sha256"] == _sha256(teacher_resnet56)
    assert yaml.safe_load((folder / "provenance.yaml").read_text()) == _learned(teacher, root)


@needs_mdistiller
def test_a_folder_from_before_the_records_resumes_and_records_them(
    tmp_path, stopped_runs, small_cifar_npz, teacher_resnet56, capsys, caplog
):
    import yaml

    from conftest import load_state

    prefix, folder = _copy_run(stopped_runs, 0, tmp_path)
    state = load_state(folder)
    state["identity"].pop("learned_from", None)  # as today's states are written
    torch.save(state, folder / "latest")
    (folder / "provenance.yaml").unlink(missing_ok=True)
    with caplog.at_level("WARNING"):
        code, err = _resume(_short_argv(small_cifar_npz, teacher_resnet56, prefix, 0), capsys)
    assert code == 0, err
    assert "no record of the teacher and data it learned from" in caplog.text
    assert load_state(folder)["identity"]["learned_from"] == _learned(teacher_resnet56, small_cifar_npz)
    assert yaml.safe_load((folder / "provenance.yaml").read_text()) == _learned(teacher_resnet56, small_cifar_npz)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_sent_to_the_process_waits_for_the_commit_while_other_threads_run(signum):
    """The kernel may give a process-directed signal to any thread (tensorboard's, a loader's): it still waits."""
    import threading

    from normkd_plugin.errors import Interrupted
    from normkd_plugin.run_files import held_signals

    def on_term(signum, frame):
        raise Interrupted(signum)

    old = signal.signal(signal.SIGTERM, on_term)  # as normkd-train's stop_signals turns SIGTERM into a stop
    release = threading.Event()
    others = [threading.Thread(target=release.wait) for _ in range(4)]
    for thread in others:
        thread.start()
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with held_signals():
                os.kill(os.getpid(), signum)
                for _ in range(20):  # bytecode boundaries at which a pending Python handler would run
                    time.sleep(0.01)
                done.append("block ended")
    finally:
        release.set()
        for thread in others:
            thread.join()
        signal.signal(signal.SIGTERM, old)
    assert done == ["block ended"]
