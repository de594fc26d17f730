"""Comm-layer checks under mpiexec -n 2/4/6: exchange, group/leader collectives, receive checks."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import numpy as np
import torch
from _check import run_checks
from mpi4py import MPI

from colnet_mpi.comm import shared
from colnet_mpi.comm.topology import Topology, neighbours_of
from colnet_mpi.comm.transport import Transport

P = 1000


def vector_of(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(P, generator=g)


def all_vectors(size: int) -> np.ndarray:
    return np.stack([vector_of(r).numpy() for r in range(size)])


def partition(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved groups (even / odd ranks); leaders = the second member where there is one."""
    groups = np.arange(size) % 2
    leaders = np.zeros(size, dtype=bool)
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        leaders[members[1 % members.size]] = True
    return groups, leaders


# How the exchange reaches the neighbours: shared memory for the whole (one-host) job, messages
# only, two pretend hosts (even and odd ranks: shared memory inside each, messages across), and
# a host whose shared-memory file system has no room (every rank falls back to messages).
VARIANTS = ("shared", "messages", "two_hosts", "no_room", "no_window")


@contextlib.contextmanager
def transport(topo: Topology, variant: str) -> Iterator[Transport]:
    """A CPU transport of ``variant``; checks that the exchange took the path it names."""
    host = topo.world.Split(color=topo.rank % 2, key=topo.rank) if variant == "two_hosts" else None
    tr = Transport(
        topo,
        torch.device("cpu"),
        shared_memory="no" if variant == "messages" else "auto",
        host=host,
    )
    real, real_allocate = shared.shm_free_bytes, shared.allocate
    if variant == "no_room":
        shared.shm_free_bytes = lambda folder=shared.SHM_FOLDER: 0
    if variant == "no_window":  # an MPI without shared windows

        def refuse(values: int, host: MPI.Intracomm) -> MPI.Win:
            raise NotImplementedError("no shared windows here")

        shared.allocate = refuse
    try:
        yield tr
    finally:
        shared.shm_free_bytes, shared.allocate = real, real_allocate
        if host is not None:
            host.Free()
    share = tr._share
    if variant == "messages":
        assert share is None
    elif variant in ("no_room", "no_window") or (variant == "two_hosts" and topo.size < 3):
        assert share is not None and not share.enabled, variant
    else:
        assert share is not None and share.enabled, variant
        same_host = [r for r in range(topo.size) if variant == "shared" or (r - topo.rank) % 2 == 0]
        mates = [r for r in same_host if r != topo.rank]
        assert [r for r in range(topo.size) if share.holds(r)] == mates


def check_exchange_full(comm: MPI.Comm) -> None:
    for variant in VARIANTS:
        with Topology(comm, kind="full") as topo, transport(topo, variant) as tr:
            for _ in range(2):  # a second exchange reuses the window and the buffers
                got = tr.exchange(vector_of(topo.rank))
                assert sorted(got) == neighbours_of(topo.rank, topo.size, "full"), variant
                for src, vec in got.items():
                    assert torch.equal(vec, vector_of(src)), (
                        f"wrong data from rank {src} ({variant})"
                    )
            assert tr.bytes_sent == tr.bytes_received == 2 * (topo.size - 1) * P * 4, variant


def check_exchange_ring(comm: MPI.Comm) -> None:
    for variant in VARIANTS:
        with Topology(comm, kind="ring") as topo, transport(topo, variant) as tr:
            got = tr.exchange(vector_of(topo.rank))
            expected = sorted(
                {(topo.rank - 1) % topo.size, (topo.rank + 1) % topo.size} - {topo.rank}
            )
            assert sorted(got) == expected, variant
            for src, vec in got.items():
                assert torch.equal(vec, vector_of(src)), variant


def check_group_mean_and_leaders(comm: MPI.Comm) -> None:
    with Topology(comm) as topo:
        tr = Transport(topo, torch.device("cpu"))
        groups, leaders = partition(topo.size)
        topo.set_groups(groups, leaders)
        members = np.flatnonzero(groups == groups[topo.rank])
        assert topo.group.Get_size() == members.size
        assert topo.group_members == members.tolist()
        ref = all_vectors(topo.size)
        mean = tr.group_sum(vector_of(topo.rank)) / members.size
        np.testing.assert_allclose(mean.numpy(), ref[members].mean(axis=0), rtol=1e-5, atol=1e-6)
        # reduce onto the leader
        total = tr.reduce_to_leader(vector_of(topo.rank))
        if topo.is_leader:
            assert total is not None
            np.testing.assert_allclose(
                total.numpy(), ref[members].sum(axis=0), rtol=1e-5, atol=1e-5
            )
            # leaders' communicator: one member per group, ordered by group id
            n_groups = np.unique(groups).size
            assert topo.leaders.Get_size() == n_groups
            stacked = tr.leaders_allgather(vector_of(topo.rank))
            leader_ranks = [
                int(np.flatnonzero(leaders & (groups == g))[0]) for g in range(n_groups)
            ]
            np.testing.assert_array_equal(stacked.numpy(), ref[leader_ranks])
        else:
            assert total is None and topo.leaders == MPI.COMM_NULL
        # broadcast from the leader reaches every member bit for bit
        leader = int(np.flatnonzero(leaders & (groups == groups[topo.rank]))[0])
        got = tr.group_broadcast(vector_of(topo.rank))
        assert torch.equal(got, vector_of(leader))
        # a new partition rebuilds the communicators
        topo.set_groups(np.zeros(topo.size, dtype=int), np.eye(1, topo.size, 0, dtype=bool)[0])
        assert topo.group.Get_size() == topo.size


def check_receive_refuses_bad_buffers(comm: MPI.Comm) -> None:
    """Rank 1 sends rank 0 a short, a long, a one-value-longer, a NaN and an Inf buffer through
    the real exchange:
    rank 0 refuses it (names rank 1), keeps every other peer's buffer and the job goes on."""
    rank, size = comm.Get_rank(), comm.Get_size()
    for variant, bad in itertools.product(VARIANTS, ("short", "long", "one_more", "nan", "inf")):
        with Topology(comm, kind="full") as topo, transport(topo, variant) as tr:
            tr.reset_counters()
            if rank == 1:
                payload = vector_of(1).clone()
                if bad == "short":
                    payload = payload[: P // 2].clone()
                elif bad == "long":  # beyond the receive buffer: a truncation error
                    payload = torch.cat([payload, payload[:3]])
                elif bad == "one_more":  # fits the spare value: counted
                    payload = torch.cat([payload, payload[:1]])
                else:
                    payload[7] = float(bad)
                got = tr.exchange(payload, expected=P)  # a faulty sender: everyone gets it
            else:
                got = tr.exchange(vector_of(rank))
            expected_peers = [r for r in range(size) if r != rank and r != 1]
            if rank == 1:
                expected_peers = [r for r in range(size) if r != 1]
            assert sorted(got) == expected_peers, (variant, bad, sorted(got))
            for src, vec in got.items():
                assert torch.equal(vec, vector_of(src))
            if rank != 1:
                assert [who for who, _ in tr.rejected] == [1], (variant, tr.rejected)
                assert "rank 1" in tr.rejected[0][1]
            else:
                assert tr.rejected == []
            topo.world.Barrier()


def check_gather_and_refused_broadcast(comm: MPI.Comm) -> None:
    """gather_to_leader stacks the members' rows in group order; a NaN broadcast is refused."""
    with Topology(comm) as topo:
        tr = Transport(topo, torch.device("cpu"))
        groups, leaders = partition(topo.size)
        topo.set_groups(groups, leaders)
        members = np.flatnonzero(groups == groups[topo.rank])
        rows = tr.gather_to_leader(vector_of(topo.rank))
        if topo.is_leader:
            assert rows is not None
            np.testing.assert_array_equal(rows.numpy(), all_vectors(topo.size)[members])
        else:
            assert rows is None
        tr.reset_counters()
        payload = vector_of(topo.rank).clone()
        if topo.is_leader:
            payload[0] = float("nan")
        got = tr.group_broadcast(payload)
        if topo.is_leader or members.size == 1:
            assert tr.rejected == []
        else:
            leader = int(members[topo.leader_rank_in_group])
            assert torch.equal(got, vector_of(topo.rank))  # kept its own
            assert [who for who, _ in tr.rejected] == [leader]


if __name__ == "__main__":
    run_checks(
        [
            check_exchange_full,
            check_exchange_ring,
            check_group_mean_and_leaders,
            check_receive_refuses_bad_buffers,
            check_gather_and_refused_broadcast,
        ]
    )
