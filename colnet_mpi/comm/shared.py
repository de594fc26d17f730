"""Vectors shared in memory between the ranks of one host (an MPI-3 shared-memory window).

Ranks on the same host need not copy each other's backbones through MPI messages: each rank
writes its vector once into its own segment of a window that every rank of the host maps, and
its neighbours there read (check, then use) that segment in place. One exchange is collective
over the host's ranks, who must all take part in the same order:

1. a polled non-blocking ``Allgather`` of every rank's value count. Once it is complete every
   rank has arrived, so no rank still reads what was written in the previous exchange, and
   segments may be rewritten;
2. the window is reallocated when a count exceeds its capacity (the same decision everywhere);
3. every rank writes its vector into its own segment; ``Sync``, fence, ``Sync``;
4. every rank returns views of its neighbours' segments. They stay valid until its next
   exchange and must not be written to (other ranks read the same memory).

The window is only ever allocated when the host's shared-memory file system has room for it
(twice what it needs is free); otherwise, and when the MPI library cannot allocate it, every
rank of the host falls back to messages (said once in the job log).
"""

from __future__ import annotations

import os
import socket
import sys

import numpy as np
import torch
from mpi4py import MPI

from colnet_mpi.comm.topology import host_members
from colnet_mpi.comm.watchdog import SPIN, Watchdog

SHM_FOLDER = "/dev/shm"  # where MPI libraries put shared windows on Linux


def shm_free_bytes(folder: str = SHM_FOLDER) -> int:
    """Free bytes of the shared-memory file system (a large number where there is none to ask)."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return 2**62
    return int(st.f_bavail) * int(st.f_frsize)


def allocate(values: int, host: MPI.Intracomm) -> MPI.Win:
    """(Collective) a shared window of ``values`` float32 per rank of ``host``."""
    return MPI.Win.Allocate_shared(values * 4, 4, comm=host)


class HostShare:
    """One float32 segment per rank of a host, readable in place by the other ranks there.

    ``host``: the communicator of the ranks that share memory (default: the world's
    ``COMM_TYPE_SHARED`` split; a test may pass any split of ``world`` to pretend other hosts).
    ``wanted``: whether this rank can use it (its vectors live in host memory); the host uses
    the window only when every rank there wants it.
    """

    def __init__(
        self,
        world: MPI.Comm,
        watchdog: Watchdog,
        *,
        wanted: bool = True,
        host: MPI.Comm | None = None,
    ) -> None:
        self.watchdog = watchdog
        #: the host's communicator; the world rank of every rank on this host, in host order
        self.host, self.world_ranks, wants = host_members(
            world, watchdog, "shared memory", host=host, flag=wanted
        )
        self.index = self.host.Get_rank()
        self.enabled = all(wants) and self.host.Get_size() > 1
        #: the other ranks of this host (named when a wait for them lasts too long)
        self.peers = [r for i, r in enumerate(self.world_ranks) if i != self.index]
        self.capacity = 0  # values per segment
        self.win: MPI.Win | None = None
        self.segments: list[torch.Tensor] = []

    def holds(self, world_rank: int) -> bool:
        """Whether ``world_rank``'s vectors reach this rank through the window."""
        return self.enabled and world_rank in self.peers

    def _release(self) -> None:
        if self.win is not None:
            self.segments = []
            self.win.Unlock_all()
            self.win.Free()
            self.win = None
            self.capacity = 0

    def _give_up(self, why: str) -> None:
        """Messages from now on, said once per host in the job log."""
        self.enabled = False
        if self.index == 0:
            print(
                f"colnet-mpi: ranks {self.world_ranks} on {socket.gethostname()} exchange by "
                f"messages, not shared memory: {why}",
                file=sys.stderr,
                flush=True,
            )

    def _least(self, value: int) -> int:
        """(Collective) the smallest ``value`` over the host's ranks."""
        out = np.zeros(1, dtype=np.int64)
        self.host.Allreduce(
            [np.array([value], dtype=np.int64), MPI.INT64_T], [out, MPI.INT64_T], op=MPI.MIN
        )
        return int(out[0])

    def _grow(self, values: int) -> None:
        """(Collective) a window of ``values`` per rank, or none at all when memory is short."""
        self._release()
        size = self.host.Get_size()
        need, free = size * values * 4, self._least(shm_free_bytes())
        if 2 * need > free:  # the same decision on every rank
            self._give_up(
                f"{SHM_FOLDER} has {free:,} bytes free; the window needs {need:,} (and twice that free)"
            )
            return
        host = self.host
        assert isinstance(host, MPI.Intracomm)
        try:
            win = allocate(values, host)
        except (MPI.Exception, NotImplementedError):  # an MPI that cannot: messages instead
            win = None
        # not made on every rank: nobody uses it (one made on some ranks only is left alone:
        # freeing it would need them all)
        if not self._least(0 if win is None else 1):
            self._give_up("the MPI library could not allocate a shared window")
            return
        assert win is not None
        self.win = win
        self.win.Lock_all()
        self.capacity = values
        for i in range(size):
            buf, _ = self.win.Shared_query(i)
            array = np.frombuffer(buf, dtype=np.float32, count=values)  # type: ignore[call-overload]
            self.segments.append(torch.from_numpy(array))

    def publish(
        self, vec: torch.Tensor, *, spin: float = SPIN
    ) -> dict[int, tuple[torch.Tensor, int]] | None:
        """(Collective over the host) write ``vec``; return ``{world rank: (segment, count)}``.

        The segment views hold ``count`` values written by that rank (unchecked: the caller
        checks them). None when the window could not be allocated (every rank of the host then
        gets None, and falls back to messages). ``spin``: seconds of polling without pauses
        while waiting for the host's other ranks to arrive.
        """
        counts = np.zeros(self.host.Get_size(), dtype=np.int64)
        mine = np.array([vec.numel()], dtype=np.int64)
        # the agreement on the counts is also the first fence: it waits for the host's slowest
        # trainer (polled with pauses)
        request = self.host.Iallgather([mine, MPI.INT64_T], [counts, MPI.INT64_T])
        self.watchdog.wait(request.Test, "its backbone", self.peers, spin=spin)
        need = int(counts.max())
        if need > self.capacity:
            self._grow(need)
        if not self.enabled:
            return None
        self.segments[self.index][: vec.numel()].copy_(vec.reshape(-1))
        assert self.win is not None
        self.win.Sync()
        request = self.host.Ibarrier()
        self.watchdog.wait(request.Test, "the backbones under way", self.peers, busy=True)
        self.win.Sync()
        return {
            r: (self.segments[i][: int(counts[i])], int(counts[i]))
            for i, r in enumerate(self.world_ranks)
            if i != self.index
        }

    def free(self) -> None:
        """(Collective over the host) free the window and the communicator (idempotent)."""
        self._release()
        if self.host != MPI.COMM_NULL:
            self.host.Free()
            self.host = MPI.COMM_NULL
