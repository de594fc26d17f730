"""Ranks of one host that take turns at the heavy compute (``run.host_slots = k``).

With more ranks on a host than it has cores (or one device shared by several ranks), every rank
training at once makes each of them hold its training memory (activations, the allocator's
cache) at the same time, and they compete for the same cores. With ``k`` slots the host's ranks
(in host order ``0 … m-1``) form ``k`` chains: host rank ``h`` computes after host rank
``h - k`` has finished and hands over to ``h + k``. So at most ``k`` ranks of a host compute at
once, each with the host's cores divided by ``k`` (see ``Topology.cpus_for_rank``), and the
host's peak memory holds ``k`` training footprints instead of ``m``.

A turn covers only local work (no MPI collective may run inside one: a rank inside its turn
would wait for a rank still waiting for its own). The hand-over is a one-value message on a
communicator of its own that carries the number of turns taken so far, checked on arrival. The
wait for a turn goes through the watchdog, which allows a rank ``p`` places down its chain ``p``
times its usual limit (it waits for ``p`` ranks' work, not one).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from mpi4py import MPI

from colnet_mpi.comm.topology import host_members
from colnet_mpi.comm.watchdog import Watchdog

TURN = 3  # tag of the hand-over message


class HostTurns:
    """Turns of the ranks of one host, ``slots`` at a time (collective to build and to free).

    ``host``: the ranks that share the cores (default: the world's ``COMM_TYPE_SHARED`` split;
    a test may pass any split of ``world`` to pretend other hosts).
    """

    def __init__(
        self,
        world: MPI.Comm,
        watchdog: Watchdog,
        slots: int,
        *,
        host: MPI.Comm | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots = {slots} is not allowed; use 1 or more")
        self.watchdog = watchdog
        self.slots = slots
        #: the host's communicator; the world rank of every rank on this host, in host order
        self.comm, self.world_ranks, _ = host_members(world, watchdog, "turns", host=host)
        index, size = self.comm.Get_rank(), self.comm.Get_size()
        self.before = index - slots if index >= slots else None  # host index handing over to us
        self.after = index + slots if index + slots < size else None  # the one we hand over to
        self.place = index // slots  # ranks ahead of this one in its chain
        self.taken = 0  # turns this rank has finished
        self._sends: list[tuple[MPI.Request, np.ndarray]] = []
        self._token = np.zeros(1, dtype=np.int64)

    @property
    def active(self) -> bool:
        """Whether any rank of this host ever waits (more ranks than slots)."""
        return self.comm.Get_size() > self.slots

    @contextmanager
    def turn(self, what: str) -> Iterator[None]:
        """Wait for this rank's turn, run the body, hand over to the next rank of the chain.

        Every rank of the host must take the same turns in the same order. If the body raises,
        nothing is handed over: the job is ending anyway, and the watchdog names this rank to
        the ones behind it.
        """
        self._settle_sends()
        if self.before is not None:
            source = self.before
            request = self.comm.Irecv([self._token, MPI.INT64_T], source=source, tag=TURN)
            try:
                self.watchdog.requests(
                    [request],
                    f"its turn to {what} (after rank {self.world_ranks[source]} of this host)",
                    [self.world_ranks[source]],
                    patience=float(self.place),
                )
            except BaseException:
                request.Cancel()  # leave no receive behind to match a later hand-over
                request.Wait()
                raise
            if int(self._token[0]) != self.taken:
                raise RuntimeError(
                    f"turn hand-over out of step: rank {self.world_ranks[source]} finished turn "
                    f"{int(self._token[0])} but this rank expected turn {self.taken} ({what})"
                )
        yield
        if self.after is not None:
            token = np.array([self.taken], dtype=np.int64)
            request = self.comm.Isend([token, MPI.INT64_T], dest=self.after, tag=TURN)
            self._sends.append((request, token))
        self.taken += 1

    def _settle_sends(self) -> None:
        """Complete the hand-overs already sent (a one-value message completes at once)."""
        if self._sends:
            requests = [r for r, _ in self._sends]
            after = self.world_ranks[self.after] if self.after is not None else -1
            self.watchdog.requests(requests, "a turn hand-over to be taken", [after])
            self._sends.clear()

    def free(self) -> None:
        """(Collective over the host) complete the last hand-over and free the communicator."""
        if self.comm == MPI.COMM_NULL:
            return
        self._settle_sends()
        self.comm.Free()
        self.comm = MPI.COMM_NULL
