"""vjp_strategy="auto": the measured choice between vmap and a loop, and that it changes no number."""

from __future__ import annotations

import itertools

import pytest
import torch

from gradcam_batch.engine.explain import vjp
from gradcam_batch.engine.explain.vjp import AutoVjp, run_strategy


def _head():
    torch.manual_seed(0)
    w = torch.randn(6, 4)
    a = torch.randn(2, 4)
    scores, vjp_fn = torch.func.vjp(lambda x: torch.tanh(x) @ w.T, a)
    cot = torch.zeros(3, *scores.shape)
    for c in range(3):
        cot[c, :, c] = 1.0
    return vjp_fn, cot


def _clock(monkeypatch, vmap_s: float, loop_s: float):
    """perf_counter that makes each timed vmap call last vmap_s and each loop call loop_s."""
    durations = itertools.cycle([vmap_s, loop_s])
    state = {"t": 0.0, "start": True}

    def fake():
        if state["start"]:
            state["start"] = False
            return state["t"]
        state["t"] += next(durations)
        state["start"] = True
        return state["t"]

    monkeypatch.setattr(vjp.time, "perf_counter", fake)


@pytest.mark.parametrize(
    ("vmap_s", "loop_s", "expected"), [(1.0, 0.5, "loop"), (1.0, 0.95, "vmap"), (0.5, 1.0, "vmap")]
)
def test_loop_only_when_clearly_faster(monkeypatch, vmap_s, loop_s, expected):
    vjp_fn, cot = _head()
    _clock(monkeypatch, vmap_s, loop_s)
    auto = AutoVjp()
    grads = auto(vjp_fn, cot)
    assert auto.choices == {3: expected}
    torch.testing.assert_close(grads, run_strategy("vmap", vjp_fn, cot))
    # Decided once per class count: the next call measures nothing.
    monkeypatch.setattr(vjp.time, "perf_counter", lambda: pytest.fail("measured twice"))
    torch.testing.assert_close(auto(vjp_fn, cot), grads)


def test_one_class_takes_the_loop_unmeasured(monkeypatch):
    vjp_fn, cot = _head()
    monkeypatch.setattr(vjp.time, "perf_counter", lambda: pytest.fail("measured one class"))
    auto = AutoVjp()
    torch.testing.assert_close(auto(vjp_fn, cot[:1]), run_strategy("vmap", vjp_fn, cot[:1]))
    assert auto.choices == {1: "loop"}


def test_each_timed_call_is_fenced_by_a_device_sync(monkeypatch):
    """On CUDA a strategy's call returns once its kernels are queued: the clock must be read only after the
    device has finished, and started only once earlier work is done. The sync is injected here."""
    vjp_fn, cot = _head()
    events: list[str] = []
    ticks = itertools.count()
    monkeypatch.setattr(vjp.time, "perf_counter", lambda: (events.append("clock"), float(next(ticks)))[1])
    real = vjp.run_strategy
    monkeypatch.setattr(vjp, "run_strategy", lambda *args: (events.append("run"), real(*args))[1])
    seen: list[torch.device] = []
    auto = AutoVjp(sync=lambda device: (events.append("sync"), seen.append(device)))
    auto(vjp_fn, cot)
    timed = "".join({"clock": "c", "run": "r", "sync": "s"}[e] for e in events)
    # Two untimed warm-up runs, then per repeat and strategy: sync, clock, run, sync, clock.
    assert timed.startswith("rr")
    assert timed[2:] == "scrsc" * (2 * auto.repeats), timed
    assert set(seen) == {cot.device}


def test_the_default_sync_follows_the_device():
    assert vjp.device_sync(torch.device("cpu")) is None
    if torch.cuda.is_available():
        assert vjp.device_sync(torch.device("cuda")) is not None


@pytest.mark.gpu
def test_cuda_timing_synchronizes(monkeypatch):
    calls: list[object] = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: (calls.append(device), real(device))[1])
    torch.manual_seed(0)
    w = torch.randn(6, 4, device="cuda")
    scores, vjp_fn = torch.func.vjp(lambda x: torch.tanh(x) @ w.T, torch.randn(2, 4, device="cuda"))
    cot = torch.eye(6, device="cuda")[:3, None, :].expand(3, 2, 6).contiguous()
    auto = AutoVjp()
    auto(vjp_fn, cot)
    assert len(calls) == 4 * auto.repeats and auto.choices[3] in vjp.MEASURED
