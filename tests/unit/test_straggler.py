"""Unit tests for the straggler simulation aids applied after each local epoch: ``[[nodes]]
slowdown`` alone (stretch by the epoch's work) and with ``training.epoch_seconds`` (a fixed
emulated pace per node, warned about once when the machine cannot hold it, spread over the
epoch's steps)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from colnet_mpi.federation.stages import STEP_SHARE, step_pace, straggler


def fed(slowdown: float, epoch_seconds: float) -> SimpleNamespace:
    logged: list[str] = []
    config = SimpleNamespace(
        nodes=[SimpleNamespace(slowdown=1.0), SimpleNamespace(slowdown=slowdown)],
        training=SimpleNamespace(epoch_seconds=epoch_seconds),
    )
    return SimpleNamespace(
        config=config, topology=SimpleNamespace(rank=1), log=logged.append, logged=logged
    )


def timed(stretch, seconds: float, *cost: float) -> tuple[float, float]:
    t0 = time.perf_counter()
    out = stretch(seconds, *cost)
    return out, time.perf_counter() - t0


def test_no_aid_returns_at_once():
    f = fed(1.0, 0.0)
    out, took = timed(straggler(f, on_cpu=True), 0.7)
    assert out == 0.7 and took < 0.05 and not f.logged


def test_pace_fills_each_epoch_to_slowdown_times_epoch_seconds():
    f = fed(2.0, 0.1)  # 0.2 s per epoch for this node
    stretch = straggler(f, on_cpu=True)
    out, took = timed(stretch, 0.05)
    assert out == pytest.approx(0.2) and took >= 0.149
    out, took = timed(stretch, 0.15)
    assert out == pytest.approx(0.2) and 0.049 <= took < 0.2
    assert not f.logged


def test_a_cheaper_epoch_is_paced_at_its_cost():
    """An epoch of the head alone (cost 0.5) lasts half the node's pace; the next full one all."""
    f = fed(2.0, 0.1)  # 0.2 s per full epoch for this node
    stretch = straggler(f, on_cpu=True)
    out, took = timed(stretch, 0.02, 0.5)
    assert out == pytest.approx(0.1) and 0.079 <= took < 0.15
    out, took = timed(stretch, 0.02)
    assert out == pytest.approx(0.2) and took >= 0.179
    assert not f.logged


def test_the_idle_callback_runs_through_the_wait():
    """Asynchronous mode serves its mailbox while an emulated straggler waits: every 20 ms of
    the wait, not once at its end; the wait lasts as long as without it."""
    f = fed(2.0, 0.1)  # 0.2 s per epoch: 0.15 s to wait after a 0.05 s epoch
    calls: list[float] = []
    stretch = straggler(f, on_cpu=True, idle=lambda: calls.append(time.perf_counter()))
    t0 = time.perf_counter()
    out, took = timed(stretch, 0.05)
    assert out == pytest.approx(0.2) and 0.149 <= took < 0.25
    assert 6 <= len(calls) <= 9, len(calls)
    assert calls[0] - t0 < 0.01 and max(calls) - t0 > 0.12  # from the start to the end


def test_an_epoch_longer_than_the_pace_is_not_shortened_and_warned_about_once():
    f = fed(3.0, 0.01)
    stretch = straggler(f, on_cpu=False)
    for _ in range(3):
        out, took = timed(stretch, 0.5)
        assert out == 0.5 and took < 0.05
    (line,) = f.logged
    assert "rank 1" in line and "0.50 s" in line and "0.03 s" in line
    assert "training.epoch_seconds" in line


def test_slowdown_without_pace_stretches_by_the_work():
    f = fed(2.0, 0.0)
    # on a GPU the epoch's wall time is the work: sleep as long again
    out, took = timed(straggler(f, on_cpu=False), 0.1)
    assert out == pytest.approx(0.2) and took >= 0.099
    # on CPU the epoch's CPU time is the work (here: almost none since the function was made)
    stretch = straggler(f, on_cpu=True)
    out, took = timed(stretch, 0.1)
    assert 0.1 <= out < 0.15 and took < 0.05


def test_steps_are_paced_through_the_epoch():
    """training.epoch_seconds spreads an epoch's steps over the first STEP_SHARE of its pace:
    after half of them the node has waited until half of that share has passed (at the step's
    cost; serving the mailbox meanwhile), a step already late waits no more, and a share past
    the end waits no longer than the whole. No pace without epoch_seconds."""
    assert step_pace(fed(3.0, 0.0)) is None
    calls: list[float] = []
    pace = step_pace(fed(2.0, 0.1), idle=lambda: calls.append(0.0))  # 0.2 s per full epoch
    assert pace is not None
    t0 = time.perf_counter()
    pace(t0, 0.5, 1.0)
    took = time.perf_counter() - t0
    assert STEP_SHARE * 0.1 - 0.001 <= took < STEP_SHARE * 0.1 + 0.03, took
    assert calls  # served while it waited
    t0 = time.perf_counter()
    pace(t0, 0.5, 0.5)  # an epoch of the head alone: half the pace
    took = time.perf_counter() - t0
    assert STEP_SHARE * 0.05 - 0.001 <= took < STEP_SHARE * 0.05 + 0.03, took
    t0 = time.perf_counter()
    pace(t0 - 1.0, 0.9, 1.0)  # behind its pace: no wait
    assert time.perf_counter() - t0 < 0.01
    t0 = time.perf_counter()
    pace(t0, 3.0, 1.0)  # never past the epoch's step share
    assert time.perf_counter() - t0 < STEP_SHARE * 0.2 + 0.03
