"""engine/fit.py: the order in which fit calls the hooks, a hook that stops the job, and closing after an error.

The pack here is a stand-in with what fit reads of one (``runs``, ``epochs``, ``behind``,
``run_epoch``, ``close``): what trains is tested against the host and the solo runs elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from normkd_plugin.engine.fit import Hook, fit
from normkd_plugin.engine.pack import EpochResult


@dataclass(eq=False)
class _Run:
    name: str
    epoch: int = 0
    status: str = "active"
    best_acc: float = 0.0


@dataclass
class _Pack:
    runs: list
    epochs: int = 3
    steps: int = 2
    log: list = field(default_factory=list)
    fail_at: int = 0  # raise in this epoch

    def behind(self):
        active = [r for r in self.runs if r.status == "active" and r.epoch < self.epochs]
        first = min((r.epoch for r in active), default=None)
        return [r for r in active if r.epoch == first]

    def run_epoch(self, runs, epoch, on_batch=None):
        if epoch == self.fail_at:
            raise RuntimeError("a step failed")
        for step in range(self.steps):
            on_batch(step)
            self.log.append(("step", epoch, step))
        for run in runs:
            run.epoch = epoch
        return [EpochResult(run, epoch, 0.1, record={"test_acc": 1.0}) for run in runs]

    def close(self):
        self.log.append("pack closed")


class _Recorder(Hook):
    def __init__(self, log, stop_before=None):
        self.log, self.stop_before = log, stop_before

    def before_fit(self, pack):
        self.log.append("before_fit")

    def stops_before(self, epoch, runs):
        self.log.append(("stops_before", epoch))
        return epoch == self.stop_before

    def before_epoch(self, epoch, runs):
        self.log.append(("before_epoch", epoch, [r.name for r in runs]))

    def before_step(self, epoch, step):
        self.log.append(("before_step", epoch, step))

    def after_epoch(self, epoch, results):
        self.log.append(("after_epoch", epoch, [r.run.name for r in results]))

    def after_fit(self, finished):
        self.log.append(("after_fit", [r.name for r in finished]))

    def close(self):
        self.log.append("hook closed")


def test_hooks_around_every_epoch_and_step_in_order_runs_behind_first():
    log: list = []
    pack = _Pack([_Run("a", epoch=1), _Run("b")], epochs=2, log=log)
    fit(pack, [_Recorder(log)])
    assert log == [
        "before_fit",
        ("stops_before", 1), ("before_epoch", 1, ["b"]),  # b, left behind by a kill, catches up first
        ("before_step", 1, 0), ("step", 1, 0), ("before_step", 1, 1), ("step", 1, 1), ("after_epoch", 1, ["b"]),
        ("stops_before", 2), ("before_epoch", 2, ["a", "b"]),
        ("before_step", 2, 0), ("step", 2, 0), ("before_step", 2, 1), ("step", 2, 1), ("after_epoch", 2, ["a", "b"]),
        ("after_fit", ["a", "b"]),
        "pack closed", "hook closed",
    ]  # fmt: skip
    assert [r.status for r in pack.runs] == ["finished", "finished"]


def test_a_hook_that_stops_the_job_leaves_the_runs_active_and_unfinished():
    log: list = []
    pack = _Pack([_Run("a")], epochs=3, log=log)
    fit(pack, [_Recorder(log, stop_before=2)])
    assert ("before_epoch", 2, ["a"]) not in log and ("after_fit", []) in log
    assert (pack.runs[0].epoch, pack.runs[0].status) == (1, "active")
    assert log[-2:] == ["pack closed", "hook closed"]


def test_an_error_in_an_epoch_still_closes_the_pack_and_every_hook_last_first():
    log: list = []
    pack = _Pack([_Run("a")], epochs=3, log=log, fail_at=2)

    class Second(Hook):
        def close(self):
            log.append("second closed")

    with pytest.raises(RuntimeError, match="a step failed"):
        fit(pack, [_Recorder(log), Second()])
    assert not any(entry[0] == "after_fit" for entry in log if isinstance(entry, tuple))
    assert log[-3:] == ["pack closed", "second closed", "hook closed"]
