"""Turns of a host's ranks (``run.host_slots``) under mpiexec -n 2/4/6.

Each check runs for 1, 2 and 3 slots, on the real host (all ranks of the job) and on two
pretend hosts (even and odd ranks). It asserts what the turns promise: at most ``slots`` ranks
of a host inside a turn at any moment, each chain in host order, every turn taken once; a
hand-over out of step refused; a wait far down a chain allowed as many limits as ranks ahead;
a rank stopped inside its turn named by the next one.
"""

from __future__ import annotations

import time

import numpy as np
from _check import run_checks
from mpi4py import MPI

from colnet_mpi.comm.turns import TURN, HostTurns
from colnet_mpi.comm.watchdog import Watchdog, WatchdogTimeout

TURNS = 3  # turns every rank takes in a check


def hosts(comm: MPI.Comm) -> list[tuple[str, MPI.Comm | None]]:
    """(name, host communicator to pretend, None: the real one)."""
    two = comm.Split(color=comm.Get_rank() % 2, key=comm.Get_rank())
    return [("one host", None), ("two hosts", two)]


def check_at_most_slots_at_once_in_host_order(comm: MPI.Comm) -> None:
    """Intervals of every turn, gathered: overlap, order and count per pretend host."""
    rank, size = comm.Get_rank(), comm.Get_size()
    dog = Watchdog(comm, timeout=60.0)
    for name, host in hosts(comm):
        for slots in (1, 2, 3):
            turns = HostTurns(comm, dog, slots, host=host)
            spans = np.zeros((TURNS, 2))
            # one machine: the monotonic clock is the same in every process
            for t in range(TURNS):
                with turns.turn("train"):
                    spans[t, 0] = time.perf_counter()
                    time.sleep(0.02 + 0.01 * ((rank + t) % 3))
                    spans[t, 1] = time.perf_counter()
            members = turns.world_ranks
            assert turns.taken == TURNS
            turns.free()
            table = np.zeros((size, TURNS, 2))
            comm.Allgather([spans, MPI.DOUBLE], [table, MPI.DOUBLE])
            for t in range(TURNS):
                for h, r in enumerate(members):
                    if h >= slots:  # starts after the rank `slots` places up has finished
                        before = members[h - slots]
                        assert table[r, t, 0] >= table[before, t, 1], (name, slots, t, h)
                # at most `slots` of this host's ranks inside a turn at any start time
                for r in members:
                    at = table[r, t, 0]
                    inside = sum(1 for q in members if table[q, t, 0] <= at < table[q, t, 1])
                    assert inside <= slots, (name, slots, t, inside)
        if host is not None:
            host.Free()
    dog.free()


def check_active_only_with_more_ranks_than_slots(comm: MPI.Comm) -> None:
    """``active``: whether anyone on the host ever waits."""
    dog = Watchdog(comm, timeout=60.0)
    size = comm.Get_size()
    for slots in (1, size - 1 if size > 1 else 1, size, size + 1):
        turns = HostTurns(comm, dog, slots)
        assert turns.active == (size > slots), (slots, turns.active)
        turns.free()
    dog.free()


def check_hand_over_out_of_step_is_refused(comm: MPI.Comm) -> None:
    """A hand-over carrying the wrong turn number is refused, naming both turn numbers."""
    dog = Watchdog(comm, timeout=20.0)
    turns = HostTurns(comm, dog, 1)
    host = turns.comm.Get_rank()
    if host == 0:
        bad = np.array([7], dtype=np.int64)
        turns.comm.Send([bad, MPI.INT64_T], dest=1, tag=TURN)
    elif host == 1:
        try:
            with turns.turn("train"):
                raise AssertionError("entered a turn on a refused hand-over")
        except RuntimeError as err:
            assert "out of step" in str(err) and "turn 7" in str(err) and "turn 0" in str(err)
        else:
            raise AssertionError("no error")
    turns.free()
    dog.free()


def check_long_chains_get_more_patience(comm: MPI.Comm) -> None:
    """With a 1 s limit and 0.7 s per turn, the third rank of a chain waits 1.4 s: allowed,
    because two ranks are ahead of it (without that factor the watchdog would give up)."""
    size = comm.Get_size()
    sub = comm.Split(color=0 if comm.Get_rank() < 3 else MPI.UNDEFINED, key=comm.Get_rank())
    if sub != MPI.COMM_NULL and size >= 3:
        dog = Watchdog(sub, timeout=1.0, grace=0.5)
        turns = HostTurns(sub, dog, 1, host=sub)
        t0 = time.perf_counter()
        with turns.turn("train"):
            waited = time.perf_counter() - t0
            time.sleep(0.7)
        if turns.place == 2:
            assert waited > 1.0, waited
        turns.free()
        dog.free()
    if sub != MPI.COMM_NULL:
        sub.Free()
    comm.Barrier()


def check_stopped_turn_is_named(comm: MPI.Comm) -> None:
    """Rank 0 stays 2.5 s inside its turn without answering (as a hung device call would):
    rank 1, next in the chain, gives up after its 1 s limit, naming rank 0 as silent and what
    it waited for."""
    sub = comm.Split(color=0 if comm.Get_rank() < 2 else MPI.UNDEFINED, key=comm.Get_rank())
    if sub != MPI.COMM_NULL and comm.Get_size() >= 2:
        dog = Watchdog(sub, timeout=1.0, grace=0.5)
        dog.at(3, "local_train")
        turns = HostTurns(sub, dog, 1, host=sub)
        if sub.Get_rank() == 0:
            with turns.turn("train"):
                time.sleep(2.5)
        else:
            try:
                with turns.turn("train"):
                    raise AssertionError("took a turn that was never handed over")
            except WatchdogTimeout as err:
                text = str(err)
                assert "in round 3, local_train for its turn to train (after rank 0 of " in text
                assert "silent: rank 0" in text, text
            else:
                raise AssertionError("no timeout")
        turns.free()
        dog.free()
    if sub != MPI.COMM_NULL:
        sub.Free()
    comm.Barrier()


if __name__ == "__main__":
    run_checks(
        [
            check_at_most_slots_at_once_in_host_order,
            check_active_only_with_more_ranks_than_slots,
            check_hand_over_out_of_step_is_refused,
            check_long_chains_get_more_patience,
            check_stopped_turn_is_named,
        ]
    )
