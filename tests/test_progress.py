"""Progress: a bar per epoch on a terminal with the job's rate and ETA, one line per epoch otherwise."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from conftest import fast_opts, needs_data, needs_mdistiller
from normkd_plugin.progress import JobProgress


def test_a_bar_counts_the_host_steps_and_a_line_ends_each_epoch(monkeypatch, caplog):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    p = JobProgress(epochs=4, done=2, steps_per_epoch=5, interactive=True)
    p.start_epoch(3)
    for _ in range(5):
        p.step()
    assert p.bar.n == 5 and p.bar.total == 5
    assert "job 50.0%" in p.bar.postfix and "it/s" in p.bar.postfix and "ETA" in p.bar.postfix
    with caplog.at_level(logging.INFO, logger="normkd_plugin.progress"):
        p.end_epoch()
    assert p.bar is None and "epoch 3/4" in err.getvalue()
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("epoch 3/4 done in ") and "(5 steps); job 50.0%, " in line and "ETA" in line


def test_without_a_terminal_no_bar_is_drawn(monkeypatch, caplog):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    p = JobProgress(epochs=2, done=0, steps_per_epoch=3)  # StringIO is not a terminal
    with caplog.at_level(logging.INFO, logger="normkd_plugin.progress"):
        for epoch in (1, 2):
            p.start_epoch(epoch)
            for _ in range(3):
                p.step()
            p.end_epoch()
    assert p.bar is None and err.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "job 50.0%" in lines[0] and "job 100.0%, " in lines[1] and "ETA 0s" in lines[1]


def test_other_ranks_report_nothing(monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    p = JobProgress(epochs=1, done=0, steps_per_epoch=2, show=False, interactive=True)
    with caplog.at_level(logging.INFO, logger="normkd_plugin.progress"):
        p.start_epoch(1)
        p.step()
        p.end_epoch()
    assert p.bar is None and not caplog.records and sys.stderr.getvalue() == ""


@needs_mdistiller
@needs_data
@pytest.mark.parametrize("terminal", [True, False])
def test_a_fast_run_shows_its_progress(tmp_path, small_cifar_npz, teacher_resnet56, monkeypatch, caplog, terminal):
    from normkd_plugin import progress, train

    seen = []
    real_step = progress.JobProgress.step

    def step(self):
        seen.append(self.bar.n if self.bar is not None else None)
        real_step(self)

    monkeypatch.setattr(progress.JobProgress, "step", step)
    err = io.StringIO()
    err.isatty = lambda: terminal
    monkeypatch.setattr(sys, "stderr", err)
    argv = ["--cfg", "cifar100/normkd/res56_res20", "--device", "cpu", "SOLVER.BATCH_SIZE", "16"]
    argv += fast_opts(small_cifar_npz, teacher_resnet56, tmp_path / "o", 0, "SOLVER.FAST.ITERS_PER_EPOCH", "3")
    with caplog.at_level(logging.INFO, logger="normkd_plugin.progress"):
        train.main(argv)
    lines = [r.getMessage() for r in caplog.records if r.name == "normkd_plugin.progress"]
    assert [line.split(" done")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert "(3 steps); job 50.0%" in lines[0] and "(3 steps); job 100.0%" in lines[1]
    if terminal:  # the bar moved once per host step
        assert seen == [0, 1, 2, 0, 1, 2] and "epoch 1/2" in err.getvalue() and "it/s" in err.getvalue()
    else:
        assert seen == [None] * 6 and "it/s]" not in err.getvalue()
