"""Watchdog checks under mpiexec -n 3: bounded waits that pass, a mismatched wait, a stopped rank.

The last check stops the highest rank with SIGSTOP; the others must give up after the limit,
name it, and end the job with MPI_Abort (exit code 3), which also removes the stopped process.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
from _check import run_checks
from mpi4py import MPI

from colnet_mpi.comm.watchdog import Watchdog, WatchdogTimeout


def check_waits_that_complete_return(comm: MPI.Comm) -> None:
    """Fences, probes and requests that complete return at once and leave no message behind."""
    dog = Watchdog(comm, timeout=5.0, grace=1.0)
    rank, size = comm.Get_rank(), comm.Get_size()
    for _ in range(3):
        dog.fence(comm, "a fence")
    right, left = (rank + 1) % size, (rank - 1) % size
    out = np.full(4, rank, dtype=np.int64)
    sends = [comm.Isend([out, MPI.INT64_T], dest=right, tag=7)]
    status = MPI.Status()
    message = dog.probe(comm, left, 7, status, "a number")
    got = np.empty(4, dtype=np.int64)
    message.Recv([got, MPI.INT64_T])
    dog.requests(sends, "the send to the right")
    assert got.tolist() == [left] * 4
    assert not comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
    dog.free()


def check_mismatched_wait_names_no_silent_rank(comm: MPI.Comm) -> None:
    """Rank 0 waits for a message nobody sends while the others wait in a fence rank 0 never
    joins: everyone times out, every rank answers the census, and no rank is called silent."""
    mine = comm.Dup()
    dog = Watchdog(mine, timeout=1.0, grace=1.0)
    dog.at(2, "exchange" if mine.Get_rank() == 0 else "intra")
    t0 = time.perf_counter()
    try:
        if mine.Get_rank() == 0:
            dog.probe(mine, 1, 99, MPI.Status(), "its backbone")
        else:
            dog.fence(mine, "the group sum", [1, 2])
    except WatchdogTimeout as err:
        text = str(err)
    else:
        raise AssertionError("no timeout")
    waited = time.perf_counter() - t0
    assert 1.0 <= waited < 4.0, waited
    me = mine.Get_rank()
    assert text.startswith(
        f"watchdog: rank {me} waited 1s (limit 1s, federation.timeout) in round 2"
    ), text
    assert "every rank answered" in text and "silent:" not in text, text
    if me == 0:
        assert "for its backbone with rank 1" in text, text
        assert "waiting in round 2, intra" in text, text
    else:
        assert "for the group sum with ranks 1, 2" in text, text
        assert "rank 0 waiting in round 2, exchange" in text, text
    # the pending barrier and census messages stay on this communicator; it is not used again


def stopped_rank_is_named(comm: MPI.Comm) -> None:
    dog = Watchdog(comm, timeout=2.0, grace=1.0)
    dog.at(4, "cross")
    dog.fence(comm, "a fence before the stop")
    last = comm.Get_size() - 1
    if comm.Get_rank() == last:
        os.kill(os.getpid(), signal.SIGSTOP)
    t0 = time.perf_counter()
    try:
        dog.fence(comm, "the leaders' sum")
    except WatchdogTimeout as err:
        # one write for the whole line: with PYTHONUNBUFFERED a plain print writes the text and
        # its newline separately, and the other rank's line may land in between
        print(
            f"rank {comm.Get_rank()} gave up after {time.perf_counter() - t0:.1f}s: {err}\n",
            end="",
            flush=True,
        )
        time.sleep(2.0)  # the other waiting rank gives up too (its grace is 1 s), even when loaded
        comm.Abort(3)
    print("not reached", flush=True)
    sys.exit(1)


if __name__ == "__main__":
    world = MPI.COMM_WORLD
    run_checks([check_waits_that_complete_return, check_mismatched_wait_names_no_silent_rank])
    stopped_rank_is_named(world.Dup())
