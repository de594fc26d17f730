"""Asynchronous mode's mailbox and agreements under mpiexec (run by tests/mpi/test_mpi.py).

Checks: a fast sender's many versions reach a receiver that polls late as at most IN_FLIGHT + 1
messages, the newest among them, while the sender never holds more than IN_FLIGHT sends; every
rank's records arrive in full at rank 0; agreements started in the same order complete with every
rank's values, whatever order the ranks test them in; the closing barrier ends with nothing in
flight.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).parent))
from _check import run_checks  # noqa: E402

from colnet_mpi.comm import mailbox as mb  # noqa: E402
from colnet_mpi.comm.mailbox import IN_FLIGHT, Agreement, Mailbox  # noqa: E402
from colnet_mpi.comm.topology import Topology  # noqa: E402
from colnet_mpi.comm.transport import Transport  # noqa: E402

VERSIONS = 8
LENGTH = 200_000  # large enough for a rendezvous transfer


def poll_until(box: Mailbox, got: list, done, seconds: float = 30.0) -> None:
    end = time.monotonic() + seconds
    while not done():
        box.poll(lambda src, kind, data: got.append((src, kind, data)))
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def newest_version_wins(comm: MPI.Comm) -> None:
    topo = Topology(comm)
    box = Mailbox(topo, Transport(topo, torch.device("cpu")))
    rank, size = topo.rank, topo.size
    got: list = []
    if rank == 0:
        for v in range(1, VERSIONS + 1):
            box.post(
                list(range(1, size)), mb.BACKBONE, torch.full((LENGTH,), float(v)), latest=True
            )
            for (dest, _kind), out in box._out.items():
                assert len(out.under_way) <= IN_FLIGHT, (dest, len(out.under_way))
        box.post(list(range(1, size)), mb.DONE, np.array([VERSIONS]))
    comm.Barrier()  # receivers poll only now: the sender had to queue
    # as at the end of a run: the closing barrier is entered once nothing is left to send
    poll_until(box, got, lambda: not box.sending() and box.closing())
    if rank != 0:
        versions = [int(d[0]) for _, k, d in got if k == mb.BACKBONE]
        assert versions[-1] == VERSIONS and len(versions) <= IN_FLIGHT + 1, versions
        assert versions == sorted(versions), versions
        assert all(bool((d == d[0]).all()) for _, k, d in got if k == mb.BACKBONE)
        assert [int(d[0]) for _, k, d in got if k == mb.DONE] == [VERSIONS]
    box.free()
    topo.free()


def records_arrive_and_agreements_complete(comm: MPI.Comm) -> None:
    topo = Topology(comm)
    box = Mailbox(topo, Transport(topo, torch.device("cpu")))
    agree = Agreement(topo)
    rank, size = topo.rank, topo.size
    for e in range(1, 4):
        agree.start(e, np.array([rank, e * 10 + rank]))
    if rank != 0:
        for r in range(1, 6):
            box.post([0], mb.RECORD, np.array([r, rank, r * 100.0 + rank]))
    got: list = []
    if rank == 0:
        want = (size - 1) * 5
        poll_until(box, got, lambda: sum(k == mb.RECORD for _, k, _ in got) == want)
        seen = sorted((int(d[1]), int(d[0])) for _, k, d in got if k == mb.RECORD)
        assert seen == [(j, r) for j in range(1, size) for r in range(1, 6)], seen
        assert all(d[2] == d[0] * 100 + d[1] for _, k, d in got if k == mb.RECORD)
    order = [3, 1, 2] if rank % 2 else [1, 2, 3]
    for e in order:
        end = time.monotonic() + 30
        while not agree.ready(e):
            assert time.monotonic() < end
            box.poll(lambda *a: None)
        table = agree.results[e]
        assert table[:, 0].tolist() == list(range(size))
        assert table[:, 1].tolist() == [e * 10 + j for j in range(size)]
    assert not agree.pending()
    poll_until(box, got, lambda: not box.sending() and box.closing())
    agree.free()
    box.free()
    topo.free()


if __name__ == "__main__":
    run_checks([newest_version_wins, records_arrive_and_agreements_complete])
