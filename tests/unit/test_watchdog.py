"""The watchdog's limit and census answer, on a one-rank communicator (no mpiexec needed)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from mpi4py import MPI

from colnet_mpi.comm import watchdog as wd
from colnet_mpi.comm.watchdog import Watchdog, WatchdogTimeout


@pytest.fixture
def dog():
    d = Watchdog(MPI.COMM_SELF)
    yield d
    d.free()


def test_fixed_timeout_is_used_as_given(dog) -> None:
    dog.timeout = 12.5
    dog.round_finished(1000.0)
    assert dog.limit() == 12.5


def test_auto_limit_has_a_floor_and_follows_the_longest_round(dog) -> None:
    assert dog.limit() == wd.AUTO_FLOOR  # start-up: nothing measured yet
    dog.round_finished(50.0)
    dog.round_finished(300.0)
    dog.round_finished(20.0)
    assert dog.limit() == pytest.approx(wd.AUTO_FACTOR * 300.0)


def test_auto_limit_grows_with_the_time_spent_in_the_current_round(dog, monkeypatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    dog.at(1, "local_train")
    clock[0] += 400.0  # a long first round: the peers get five times this rank's pace
    assert dog.limit() == pytest.approx(wd.AUTO_FACTOR * 400.0)
    dog.at(1, "exchange")  # same round: the reference keeps counting from the round's start
    assert dog.limit() == pytest.approx(wd.AUTO_FACTOR * 400.0)
    dog.at(2, "local_train")  # a new round starts a new reference
    assert dog.limit() == wd.AUTO_FLOOR


def test_a_wait_that_never_completes_times_out_with_the_place(dog) -> None:
    dog.timeout = 0.05
    dog.grace = 0.05
    dog.at(3, "intra")
    t0 = time.perf_counter()
    with pytest.raises(WatchdogTimeout, match=r"rank 0 waited 0s .* in round 3, intra for a thing"):
        dog.wait(lambda: False, "a thing", [5])
    assert time.perf_counter() - t0 < 2.0


def test_a_wait_that_completes_returns(dog) -> None:
    calls = []

    def done() -> bool:
        calls.append(1)
        return len(calls) > 3

    dog.timeout = 5.0
    dog.wait(done, "soon")
    assert len(calls) == 4


def test_census_answer_round_trips(dog) -> None:
    dog.at(7, "redistribute")
    answer = dog._answer()
    assert answer.dtype == np.int64 and answer.size == wd.ANSWER_LEN
    assert answer[0] == 7 and answer[1] == 0
    assert bytes(answer[3:].view(np.uint8)).rstrip(b"\0") == b"redistribute"
