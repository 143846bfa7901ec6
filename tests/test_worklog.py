"""worklog.py: the host's worklog.txt written byte for byte as mdistiller writes it, read back, and the one
meaning of a finished run and of numbers no run can have."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from conftest import needs_mdistiller
from normkd_plugin import worklog

RECORD = dict(train_acc=51.5, train_loss=1.25, test_acc=61.0, test_acc_top5=88.5, test_loss=1.5)


def logged(accs, lr=0.05, end=None) -> str:
    """Blocks of epochs 1..len(accs) with these test_acc values, then ``end`` (default: the best as best_acc)."""
    text = "".join(worklog.block(e, lr, {**RECORD, "test_acc": acc}) for e, acc in enumerate(accs, 1))
    return text + (worklog.best_line(max(accs)) if end is None else end)


@needs_mdistiller
def test_blocks_and_the_last_line_are_byte_for_byte_what_mdistiller_writes(tmp_path, capsys):
    """mdistiller's own BaseTrainer.log and BaseTrainer.train write a worklog; ours is the same bytes."""
    from collections import OrderedDict

    from mdistiller.engine.trainer import BaseTrainer

    writer = SimpleNamespace(add_scalar=lambda *a: None, flush=lambda: None)
    cfg = SimpleNamespace(LOG=SimpleNamespace(WANDB=False), SOLVER=SimpleNamespace(EPOCHS=0))
    host = SimpleNamespace(tf_writer=writer, cfg=cfg, best_acc=-1, log_path=str(tmp_path))
    epochs = [  # (lr, log_dict): a decayed numpy-like lr, values that round up, down and to an even digit
        (0.05, (59.994, 2.0, 12.345, 40.0, 4.6049)),
        (0.005, (61.125, 1.875, 33.335, 66.666, 3.14159)),
        (5e-4, (99.999, 0.0, 12.0, 100.0, 1234.5678)),
    ]
    ours = ""
    for epoch, (lr, values) in enumerate(epochs, 1):
        record = OrderedDict(zip(RECORD, values))
        BaseTrainer.log(host, lr, epoch, record)
        ours += worklog.block(epoch, lr, record)
    BaseTrainer.train(host)  # no epoch left to train: it writes the best_acc line
    ours += worklog.best_line(max(values[2] for _, values in epochs))
    assert (tmp_path / "worklog.txt").read_bytes() == ours.encode()
    capsys.readouterr()

    log = worklog.read(tmp_path / "worklog.txt")
    assert [e["epoch"] for e in log.epochs] == [1, 2, 3] and [e["lr"] for e in log.epochs] == [0.05, 0.01, 0.0]
    assert [e["test_acc"] for e in log.epochs] == [12.35, 33.34, 12.0] and log.best_acc == 33.34
    assert worklog.finished(log, 3) and worklog.invalid(log, 3) is None


def test_failed_line_and_the_lines_cut_back_to_an_epoch():
    text = logged([10.0, 20.0], end=worklog.failed_line("epoch 3 step 2 of 4: non-finite training loss"))
    assert text.endswith("\nfailed\tepoch 3 step 2 of 4: non-finite training loss" + os.linesep)
    log = worklog.parse(text)
    assert log.failed == "epoch 3 step 2 of 4: non-finite training loss" and log.best_acc is None
    assert worklog.blocks_through(text, 1) == logged([10.0], end="")
    assert [r["epoch"] for r in worklog.records(text)] == [1, 2]
    assert worklog.records(text)[1]["record"] == {**RECORD, "test_acc": 20.0}


def test_parse_reads_blocks_and_the_last_line():
    log = worklog.parse(logged([10.0, 20.0, 15.0]))
    assert [e["epoch"] for e in log.epochs] == [1, 2, 3] and log.best_acc == 20.0 and log.failed is None
    assert log.epochs[1] == {"epoch": 2, "lr": 0.05, **RECORD, "test_acc": 20.0}
    assert worklog.parse(logged([10.0], end="")).best_acc is None
    log = worklog.parse(logged([10.0, 20.0], end="failed\tepoch 3 step 17: non-finite training loss\n"))
    assert log.failed == "epoch 3 step 17: non-finite training loss" and log.best_acc is None
    assert worklog.parse(logged([10.0], end="failed\t")).failed == "no reason given"
    half = logged([10.0, 20.0], end="")[:-30]  # a block cut off by a kill: left out
    assert [e["epoch"] for e in worklog.parse(half).epochs] == [1]


def one_block(epoch: int, acc: float) -> str:
    return worklog.block(epoch, 0.05, {**RECORD, "test_acc": acc})


@pytest.mark.parametrize(
    "text, message",
    [
        ("-------------------------\nepoch: 1\ntest_acc: lots\n", "line 3: test_acc has non-numeric value 'lots'"),
        # 9 lines per block: the third block's epoch line is line 20, a best_acc after two blocks line 19
        (logged([10, 20], end="") + one_block(2, 21), "line 20: epoch 2 repeats"),
        (one_block(1, 10) + one_block(3, 20) + one_block(2, 21), r"line 20: epoch 2 goes back \(previous epoch 3\)"),
        (logged([10, 20]) + one_block(3, 21), "line 19: text after the best_acc value: '-----"),
        (logged([10, 20]) + "best_acc\t20.00", "line 19: text after the best_acc value: 'best_acc"),
        (logged([10, 20]) + "\nbest_acc\t20.00", r"line 20: .* after the best_acc line \(line 19\)"),
        (logged([10], end="failed\tboom\n") + one_block(2, 20), r"line 11: .* failed line \(line 10\)"),
        (logged([10], end="failed: boom\n"), "line 10: malformed failed line"),
        (logged([10], end="-" * 25 + "\nepoch: 2\nbest_acc\t10.00"), "line 12: best_acc line inside"),
        ("x" * 500 + "\n", r"line 1: 'x{200}'\.\.\. \(500 characters\) outside a dashed block"),
    ],
)
def test_malformed_worklogs_are_errors_naming_the_line(text, message):
    with pytest.raises(worklog.WorklogError, match=message):
        worklog.parse(text)
    assert worklog.status(text) == "started"


@pytest.mark.parametrize("end", ["best_acc\t70.00", "", "best_acc\t70.00\n\n", "failed\tepoch 3: nan\n"])
def test_the_fast_path_reads_host_worklogs_as_the_general_parser_does(end, monkeypatch):
    text = logged([60.0 + e / 7 for e in range(1, 41)], end=end).replace("test_loss: 1.50", "test_loss: nan", 1)
    fast = worklog.parse(text)
    monkeypatch.setattr(worklog, "_parse_host_worklog", lambda text: None)
    slow = worklog.parse(text)
    assert repr(fast) == repr(slow) and len(fast.epochs) == 40


@pytest.mark.parametrize(
    ("text", "last_epoch", "finished"),
    [
        (logged([10.0, 30.0, 20.0]), 3, True),
        (logged([10.0, 30.0, 20.0]), None, True),  # the last epoch unknown: the last logged one
        (logged([10.0, 30.0, 20.0], end=""), 3, False),  # no best_acc line yet
        ("best_acc\t70.00", None, False),  # a best_acc line alone
        ("best_acc\t70.00", 3, False),
        (logged([10.0, 30.0]), 3, False),  # best_acc before the last epoch
        (logged([10.0, 30.0, 20.0]), 2, False),  # past the last epoch
        (logged([10.0, 30.0, 20.0]).replace("epoch: 1\n", "epoch: 0\n"), 3, False),  # epochs 0, 2, 3
        (logged([10.0, 30.0, 20.0], end="best_acc\t20.00"), 3, False),  # not the best logged test_acc
        (logged([10.0, 30.0, 20.0], end="best_acc\t30.01"), 3, False),
        (logged([10.0, 30.0, 20.0], end="best_acc\t30.004"), 3, True),  # equal to the printed two decimals
        (logged([10.0, 30.0], end="failed\tout of memory\n"), 2, False),
    ],
)
def test_finished_is_every_epoch_then_the_best_test_acc(text, last_epoch, finished):
    log = worklog.parse(text)
    assert worklog.finished(log, last_epoch) is finished
    assert worklog.status(text, last_epoch) == ("finished" if finished else "failed" if log.failed else "started")
    # a best_acc line that does not end a finished log makes the numbers invalid
    assert (worklog.invalid(log, last_epoch) is None) == (finished or log.best_acc is None)


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("test_acc: 30.00", "test_acc: 150.00", "test_acc 150 is outside [0, 100] at epoch 2"),
        ("test_acc: 30.00", "test_acc: 1e300", "test_acc 1e+300 is outside [0, 100] at epoch 2"),
        ("test_acc: 30.00", "test_acc: -40", "test_acc -40 is outside [0, 100] at epoch 2"),
        ("test_acc: 30.00", "test_acc: nan", "non-finite test_acc (nan) at epoch 2"),
        ("test_acc: 30.00", "test_acc: inf", "non-finite test_acc (inf) at epoch 2"),
        ("test_acc_top5: 88.50", "test_acc_top5: 100.01", "test_acc_top5 100.01 is outside [0, 100] at epoch 1"),
        ("train_acc: 51.50", "train_acc: -0.01", "train_acc -0.01 is outside [0, 100] at epoch 1"),
        ("train_loss: 1.25", "train_loss: nan", "non-finite train_loss (nan) at epoch 1"),
        ("lr: 0.05", "lr: -inf", "non-finite lr (-inf) at epoch 1"),
        ("best_acc\t30.00", "best_acc\t150.00", "best_acc 150 is outside [0, 100]"),
        ("best_acc\t30.00", "best_acc\tinf", "non-finite best_acc (inf)"),
        ("best_acc\t30.00", "best_acc\t31.00", "best_acc 31.00 is not the best logged test_acc (30.00)"),
    ],
)
def test_numbers_no_run_can_have_are_invalid(old, new, reason):
    text = logged([10.0, 30.0, 20.0])
    assert old in text and worklog.invalid(worklog.parse(text), 3) is None
    assert worklog.invalid(worklog.parse(text.replace(old, new, 1)), 3) == reason


def test_edges_of_the_valid_range_and_losses_above_100_are_valid():
    text = logged([0.0, 100.0]).replace("test_loss: 1.50", "test_loss: 250.00")
    assert worklog.invalid(worklog.parse(text), 2) is None and worklog.finished(worklog.parse(text), 2)
    assert (
        worklog.invalid(worklog.parse("best_acc\t70.00"), None) == "a best_acc line without any epoch block before it"
    )
    assert worklog.invalid(worklog.parse(logged([10.0, 30.0])), 3) == (
        "best_acc after epochs 1-2 (2 blocks), not after epochs 1-3"
    )


def test_a_binary_worklog_is_a_worklog_error_naming_the_byte(tmp_path):
    from normkd_plugin.run_folder import RunFolder

    path = tmp_path / "worklog.txt"
    path.write_bytes(logged([10.0]).encode()[:40] + b"\xff\x00binary")
    with pytest.raises(worklog.WorklogError, match=r"^not a text file: byte 40 \(0xff\) is not UTF-8$"):
        worklog.read(path)
    assert RunFolder(tmp_path).status() == "started"
    with pytest.raises(FileNotFoundError):
        worklog.read(tmp_path / "nowhere" / "worklog.txt")


def test_folder_status_reads_the_last_epoch_from_config_yaml(tmp_path):
    from normkd_plugin.run_folder import RunFolder

    assert RunFolder(tmp_path).status() == "new"
    (tmp_path / "worklog.txt").write_text(logged([10.0, 30.0]))
    assert RunFolder(tmp_path).status() == "finished"
    (tmp_path / "config.yaml").write_text("DATASET:\n  TYPE: cifar100\nSOLVER:\n  EPOCHS: 3\n  LR: 0.05\n")
    assert RunFolder(tmp_path).status() == "started"
    (tmp_path / "worklog.txt").write_text(logged([10.0, 30.0, 20.0]))
    assert RunFolder(tmp_path).status() == "finished"
    (tmp_path / "worklog.txt").write_text(logged([10.0], end=worklog.failed_line("boom")))
    assert RunFolder(tmp_path).status() == "failed"
    assert [worklog.last_epoch(t) for t in (None, "", "SOLVER: {EPOCHS: 240}", "SOLVER: {EPOCHS: x}", "[1", "- 1")] == [
        None,
        None,
        240,
        None,
        None,
        None,
    ]


def test_a_block_that_comes_again_replaces_the_earlier_blocks_from_its_epoch_on():
    """A host run killed between epoch 2's block and its checkpoint resumes from epoch 1 and logs 2 again: the
    repair view keeps the later history (the one its checkpoints continue), once."""
    first = [worklog.block(e, 0.05, {**RECORD, "test_acc": 10.0 * e}) for e in (1, 2, 3)]
    again = [worklog.block(e, 0.05, {**RECORD, "test_acc": 11.0 * e}) for e in (2, 3)]
    text = "".join(first) + "".join(again) + worklog.best_line(33.0)
    assert worklog.blocks_through(text, 3) == first[0] + "".join(again)
    assert worklog.blocks_through(text, 2) == first[0] + again[0]
    assert [r["epoch"] for r in worklog.records(text)] == [1, 2, 3]
