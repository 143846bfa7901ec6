"""engine/graph.py: which batches run eagerly, captured or replayed; a failed capture never re-trains a batch."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch


class _Graph:
    def __init__(self, log):
        self.log = log

    def replay(self):
        self.log.append("replay")


@pytest.fixture
def fake_cuda(monkeypatch):
    """Stand-ins for the stream and graph calls, so the bookkeeping runs on a CPU."""
    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)


def _run(graph, log, full=5, key=1):
    def eager(images, targets, epoch):
        log.append(int(images[0][0]))

    def batch(k):
        return [torch.tensor([k])], [torch.tensor([k])]

    return graph.run(eager, batch, full, epoch=1, key=key)


def test_failed_capture_trains_every_batch_once(fake_cuda, monkeypatch):
    from normkd_plugin.engine.graph import StepGraph

    graph, log = StepGraph(step=None, zero_grad=lambda: None, enabled=True), []

    def broken(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graph, "capture", broken)
    assert _run(graph, log) == 5
    assert log == [0, 1, 2, 3, 4]  # batch 0 trained once, by the capture's warm-up
    assert not graph.enabled and graph.graph is None
    assert graph.failure == "operation not permitted when stream is capturing"  # for a benchmark's row
    log.clear()
    _run(graph, log, key=2)
    assert log == [0, 1, 2, 3, 4]  # later epochs: plain eager


def test_capture_once_per_key_then_replay(fake_cuda, monkeypatch):
    from normkd_plugin.engine.graph import StepGraph

    graph, log = StepGraph(step=None, zero_grad=lambda: None, enabled=True), []

    def capture(first, epoch, key):
        log.append("capture")
        graph.graph, graph.key = _Graph(log), key
        graph.static = ([torch.zeros(1, dtype=torch.long)], [torch.zeros(1, dtype=torch.long)])

    monkeypatch.setattr(graph, "capture", capture)
    _run(graph, log, key=1)
    assert log == [0, "capture", "replay", "replay", "replay", "replay"]
    log.clear()
    _run(graph, log, key=1)  # same key (same learning rates, warm-up factors and runs): replays only
    assert log == ["replay"] * 5
    log.clear()
    _run(graph, log, key=2)  # a new key (an LR decay, say): warm-up batch, capture again
    assert log == [0, "capture", "replay", "replay", "replay", "replay"]


def test_disabled_or_single_batch_runs_eagerly():
    from normkd_plugin.engine.graph import StepGraph

    log = []
    _run(StepGraph(step=None, zero_grad=lambda: None, enabled=False), log)
    assert log == [0, 1, 2, 3, 4]
    log.clear()
    _run(StepGraph(step=None, zero_grad=lambda: None, enabled=True), log, full=1)
    assert log == [0]


def test_capture_is_thread_local(fake_cuda, monkeypatch):
    """The real capture path, torch.cuda.graph recorded: captured in capture_error_mode="thread_local", so a
    loader's pin-memory thread may allocate pinned memory or query events during the capture."""
    import inspect

    from normkd_plugin.engine.graph import StepGraph

    real_graph, calls, log = torch.cuda.graph, [], []

    def graph(cuda_graph, **kwargs):
        inspect.signature(real_graph).bind(cuda_graph, **kwargs)  # arguments torch.cuda.graph takes
        calls.append(kwargs)
        return contextlib.nullcontext()

    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: _Graph(log))
    captured = []
    step_graph = StepGraph(
        step=lambda images, targets, epoch: captured.append(int(images[0][0])), zero_grad=lambda: None, enabled=True
    )
    assert _run(step_graph, log) == 5
    assert calls == [{"capture_error_mode": "thread_local"}]
    assert captured == [0] and log == [0, "replay", "replay", "replay", "replay"]
