"""Model-data transport: flat float32 buffers moved with upper-case (buffer) mpi4py calls only."""

from __future__ import annotations

import ctypes
import os
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from colnet_mpi.comm.shared import HostShare
from colnet_mpi.comm.topology import Topology

TRANSFER_PATHS = ("host", "cuda-aware", "host-staged")
#: Seconds the exchange polls for its neighbours' messages without pausing before it backs off
#: to short sleeps (the neighbours usually arrive within this; a slow trainer takes longer).
EXCHANGE_SPIN = 0.05


class ReceiveError(RuntimeError):
    """A received model buffer failed its checks (size or finite values)."""


def mpi_supports_cuda() -> bool:
    """Ask the MPI library itself whether it accepts CUDA device pointers (Open MPI / MPICH extensions).

    Falls back to the usual environment switches when the library has no query function.
    """
    lib = ctypes.CDLL(None)
    query = getattr(lib, "MPIX_Query_cuda_support", None)  # Open MPI
    if query is not None:
        try:
            return bool(query())
        except OSError:  # pragma: no cover - defensive
            pass
    gpu_query = getattr(lib, "MPIX_GPU_query_support", None)  # MPICH >= 4: (type, int*)
    if gpu_query is not None:
        flag = ctypes.c_int(0)
        try:
            if gpu_query(ctypes.c_int(1), ctypes.byref(flag)) == 0:  # MPIX_GPU_SUPPORT_CUDA = 1
                return bool(flag.value)
        except OSError:  # pragma: no cover - defensive
            pass
    return os.environ.get("MPICH_GPU_SUPPORT_ENABLED") == "1"


def check_vector(vec: torch.Tensor, expected: int, what: str) -> None:
    """Refuse a model vector of the wrong size or with non-finite values, naming where it came from."""
    if vec.numel() != expected:
        raise ReceiveError(f"{what}: got {vec.numel()} values, expected {expected}")
    # One pass without a temporary: a NaN or an infinity makes the sum NaN or infinite, so a
    # finite sum proves every value finite (a sum that overflows takes the exact test below).
    if bool(torch.isfinite(vec.sum())):
        return
    if not bool(torch.isfinite(vec).all()):
        bad = int((~torch.isfinite(vec)).sum())
        raise ReceiveError(f"{what}: {bad} of {expected} values are NaN or infinite")


class Transport:
    """Sends and receives flat backbone vectors for one rank; counts bytes per round.

    On CPU the tensors' memory is handed to MPI directly. On GPU the device buffer is handed to MPI
    when the library is CUDA-aware (``path == "cuda-aware"``); otherwise each message is staged
    through pinned host memory (``path == "host-staged"``). On CPU, neighbours on the same host
    exchange through one shared-memory window instead of messages (``shared_memory = "auto"``;
    ``"no"``: messages to everyone); ``host`` lets a test pretend which ranks share a host.
    """

    def __init__(
        self,
        topology: Topology,
        device: torch.device,
        cuda_aware: str = "auto",
        *,
        shared_memory: str = "auto",
        host: MPI.Comm | None = None,
    ):
        self.topology = topology
        self.device = device
        if shared_memory not in ("auto", "no"):
            raise ValueError(f"shared_memory = {shared_memory!r}; use 'auto' or 'no'")
        self.shared_memory = shared_memory
        self._host = host  # tests: pretend the ranks of this communicator share a host
        self._share: HostShare | None = None
        if device.type != "cuda":
            self.path = "host"
        elif cuda_aware == "yes" or (cuda_aware == "auto" and mpi_supports_cuda()):
            self.path = "cuda-aware"
        else:
            self.path = "host-staged"
        self.bytes_sent = 0
        self.bytes_received = 0
        self.rejected: list[tuple[int, str]] = []  # (sender rank, reason) refused this round
        self.last_exchange_numel = 0  # values per neighbour in the last exchange
        # receive buffers of the exchange, kept from round to round per sender: fresh ones would
        # be paged in by the kernel on every round (slower than the transfer itself on CPU);
        # what the exchange returns is only valid until the next exchange
        self._inbox: dict[int, torch.Tensor] = {}

    # -- buffer plumbing -------------------------------------------------------------------------
    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor in the memory MPI will touch (device or host)."""
        t = t.contiguous()
        if self.path == "host-staged":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t)
            return host
        return t

    def _back(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=False) if t.device != self.device else t

    def _empty(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.path == "host-staged":
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        return torch.empty(shape, dtype=dtype, device=self.device)

    @staticmethod
    def _buf(t: torch.Tensor) -> list[Any]:
        dtype = {torch.float32: MPI.FLOAT, torch.float64: MPI.DOUBLE}[t.dtype]
        if t.is_cuda:
            torch.cuda.current_stream(t.device).synchronize()
            return [t, dtype]  # __cuda_array_interface__
        return [t.numpy(), dtype]

    def _fence_group(self, what: str) -> None:
        """Wait (bounded by the watchdog) until every group member reached this collective."""
        topo = self.topology
        topo.watchdog.fence(topo.group, what, topo.group_members)

    def reset_counters(self) -> None:
        """Start counting the bytes (and refused buffers) of a new round."""
        self.bytes_sent = 0
        self.bytes_received = 0
        self.rejected = []

    # -- stage 2: neighbour exchange ----------------------------------------------------------
    def exchange(
        self, flat: torch.Tensor, tag: int = 17, *, expected: int | None = None
    ) -> dict[int, torch.Tensor]:
        """Send ``flat`` to every neighbour and receive theirs; bad buffers are refused, not used.

        Every rank uses the same buffer layout, so a peer's vector must have exactly ``expected``
        values (default: as many as ``flat``) and only finite ones. Neighbours on this rank's
        host read ``flat`` from shared memory (``shared_memory = "auto"``, host memory only; see
        :mod:`colnet_mpi.comm.shared`): written once, checked in place by each reader, the count
        known from the host's agreement. The others get messages: receives are posted before the
        sends, one value longer than expected, so a wrongly sized message is counted (or ends in a
        truncation error) and refused, never used.
        Refused senders are left out of the result and listed in ``self.rejected`` as
        ``(rank, reason)``; the job goes on. What is returned is valid until the next exchange
        and is read-only (a shared segment is read by every rank of the host).
        """
        numel = flat.numel() if expected is None else expected
        self.last_exchange_numel = numel
        world = self.topology.world
        neighbours = self.topology.neighbours
        send = self._wire(flat)
        # the host's ranks: the vector is written once into shared memory and read there in
        # place (None: no window on this host, every neighbour gets a message)
        share = self._host_share()
        segments = share.publish(send, spin=EXCHANGE_SPIN) if share is not None else None
        shared_from = segments or {}
        local = [j for j in neighbours if j in shared_from]
        remote = [j for j in neighbours if j not in local]
        # Receives are posted before anything is sent, into buffers kept per sender with one
        # value to spare: a message of the right size lands directly, a longer one by one value
        # is counted and refused, a longer one still ends its receive with a truncation error
        # (refused too; the job goes on), a shorter one is counted and refused.
        incoming: dict[int, tuple[torch.Tensor, MPI.Request, MPI.Status]] = {}
        for src in remote:
            buf = self._inbox.get(src)
            if buf is None or buf.numel() != numel + 1:
                buf = self._inbox[src] = self._empty(numel + 1)
            incoming[src] = (buf, world.Irecv(self._buf(buf), source=src, tag=tag), MPI.Status())
        sends = [world.Isend(self._buf(send), dest=dst, tag=tag) for dst in remote]
        if expected is None:  # checked while the sends are under way (a bad one ends the job)
            check_vector(flat, numel, f"rank {self.topology.rank}: own backbone before sending")
        watchdog = self.topology.watchdog
        waiting = list(remote)
        received: dict[int, torch.Tensor] = {}

        def take(src: int, vec: torch.Tensor, count: int, nbytes: int, truncated: str) -> None:
            """Check one arrived buffer (while the others may still be in flight)."""
            what = f"rank {self.topology.rank}: backbone from rank {src}"
            try:
                if truncated:
                    raise ReceiveError(f"{what} is longer than {numel} values ({truncated})")
                self.bytes_received += nbytes
                if count != numel:
                    raise ReceiveError(f"{what} has {count} values, expected {numel}")
                vec = vec[:numel]
                check_vector(vec, numel, what)
            except ReceiveError as err:
                self.rejected.append((src, str(err)))
                return
            received[src] = self._back(vec)

        for src in local:  # already written: check each in place
            vec, count = shared_from[src]
            take(src, vec, count, count * 4, "")

        def arrived() -> bool:
            for src in list(waiting):
                buf, request, status = incoming[src]
                try:
                    if not request.Test(status):
                        continue
                    truncated = ""
                except MPI.Exception as err:  # longer than the buffer: truncated
                    truncated = err.Get_error_string().splitlines()[0]
                waiting.remove(src)
                nbytes = 0 if truncated else max(status.Get_count(MPI.BYTE), 0)
                take(src, buf, status.Get_count(MPI.FLOAT), nbytes, truncated)
            return not waiting

        # the slowest trainer may still be training: poll, then back off to short sleeps; once a
        # first backbone is in, the others are under way too: poll without pauses
        watchdog.wait(
            lambda: arrived() or len(waiting) < len(remote),
            "its backbone",
            waiting,
            spin=EXCHANGE_SPIN,
        )
        watchdog.wait(arrived, "the backbones under way", waiting, busy=True)
        # polled without pauses too: a large message moves only while its sender calls MPI, so
        # a sender that sleeps between tests holds up the receivers that still wait for it
        watchdog.requests(sends, "its neighbours to take its backbone", remote, busy=True)
        self.bytes_sent += len(neighbours) * send.numel() * send.element_size()
        return {src: received[src] for src in neighbours if src in received}

    def shared_neighbours(self) -> int:
        """How many of this rank's neighbours its exchanges reach through shared memory."""
        share = self._share
        if share is None or not share.enabled:
            return 0
        return sum(share.holds(j) for j in self.topology.neighbours)

    def _host_share(self) -> HostShare | None:
        """The shared window of this rank's host (made on the first exchange; collective)."""
        if self.shared_memory == "no":
            return None
        if self._share is None:
            self._share = HostShare(
                self.topology.world,
                self.topology.watchdog,
                wanted=self.path == "host",
                host=self._host,
            )
            self.topology.adopt(self._share)
        return self._share if self._share.enabled else None

    # -- stage 3: intra-group FedAvg -----------------------------------------------------------
    def group_sum(self, vec: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of ``vec`` over the group communicator (returns a new tensor)."""
        comm = self.topology.group
        wire = self._wire(vec.clone())
        if self.topology.group_size > 1:
            self._fence_group("the group sum")
            comm.Allreduce(MPI.IN_PLACE, self._buf(wire), op=MPI.SUM)
            self.bytes_sent += wire.numel() * wire.element_size()
            self.bytes_received += wire.numel() * wire.element_size()
        return self._back(wire)

    def reduce_to_leader(self, vec: torch.Tensor) -> torch.Tensor | None:
        """Sum ``vec`` over the group onto its leader; the leader gets the sum, the others None."""
        topo = self.topology
        if topo.group_size == 1:
            return vec.clone()
        wire = self._wire(vec.clone())
        root = topo.leader_rank_in_group
        self._fence_group("the group sum on its leader")
        if topo.is_leader:
            topo.group.Reduce(MPI.IN_PLACE, self._buf(wire), op=MPI.SUM, root=root)
            self.bytes_received += wire.numel() * wire.element_size() * (topo.group_size - 1)
            return self._back(wire)
        topo.group.Reduce(self._buf(wire), None, op=MPI.SUM, root=root)
        self.bytes_sent += wire.numel() * wire.element_size()
        return None

    def group_allgather(self, vec: torch.Tensor) -> torch.Tensor:
        """Every member's ``vec`` stacked in group-rank order on every member -> (members, len).

        Used by the robust aggregation rules, which need the individual contributions; every
        member then computes the same deterministic aggregate. Rows are not checked here: the
        caller screens them (a non-finite row is excluded, not fatal).
        """
        topo = self.topology
        if topo.group_size == 1:
            return vec.clone().unsqueeze(0)
        wire = self._wire(vec)
        out = self._empty(topo.group_size, vec.numel())
        self._fence_group("every group member's update")
        topo.group.Allgather(self._buf(wire), self._buf(out))
        size = wire.numel() * wire.element_size()
        self.bytes_sent += size * (topo.group_size - 1)
        self.bytes_received += size * (topo.group_size - 1)
        return self._back(out)

    def group_all_equal(self, value: int) -> bool:
        """Whether every member of the group passed the same integer (e.g. a checksum)."""
        topo = self.topology
        if topo.group_size == 1:
            return True
        both = np.array([value, -value], dtype=np.int64)
        self._fence_group("the group's checksum comparison")
        topo.group.Allreduce(MPI.IN_PLACE, [both, MPI.INT64_T], op=MPI.MAX)
        return bool(both[0] == -both[1])

    def gather_to_leader(self, vec: torch.Tensor) -> torch.Tensor | None:
        """Every member's ``vec`` stacked in group-rank order on the leader -> (members, len).

        Used by the robust aggregation rules, which need the individual contributions. Rows are
        not checked here: the caller screens them (a non-finite row is excluded, not fatal).
        """
        topo = self.topology
        if topo.group_size == 1:
            return vec.clone().unsqueeze(0)
        wire = self._wire(vec)
        root = topo.leader_rank_in_group
        size = wire.numel() * wire.element_size()
        self._fence_group("the members' updates on the leader")
        if topo.is_leader:
            out = self._empty(topo.group_size, vec.numel())
            topo.group.Gather(self._buf(wire), self._buf(out), root=root)
            self.bytes_received += size * (topo.group_size - 1)
            return self._back(out)
        topo.group.Gather(self._buf(wire), None, root=root)
        self.bytes_sent += size
        return None

    # -- stage 4: leaders ---------------------------------------------------------------------
    def leaders_allgather(self, vec: torch.Tensor) -> torch.Tensor:
        """Every leader's vector, stacked in group order -> (leaders, len); leaders only."""
        comm = self.topology.leaders
        n = comm.Get_size()
        out = self._empty(n, vec.numel())
        wire = self._wire(vec)
        self.topology.watchdog.fence(
            comm, "every leader's group result", self.topology.leader_ranks
        )
        comm.Allgather(self._buf(wire), self._buf(out))
        self.bytes_sent += wire.numel() * 4 * (n - 1)
        self.bytes_received += wire.numel() * 4 * (n - 1)
        return self._back(out)  # rows unchecked: the caller leaves non-finite deltas out

    def leaders_sum(self, vec: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over the leaders' communicator; leaders only."""
        comm = self.topology.leaders
        wire = self._wire(vec.clone())
        if comm.Get_size() > 1:
            self.topology.watchdog.fence(comm, "the leaders' sum", self.topology.leader_ranks)
            comm.Allreduce(MPI.IN_PLACE, self._buf(wire), op=MPI.SUM)
            self.bytes_sent += wire.numel() * 4
            self.bytes_received += wire.numel() * 4
        return self._back(wire)

    # -- stage 5: redistribution ----------------------------------------------------------------
    def group_broadcast(self, vec: torch.Tensor) -> torch.Tensor:
        """The leader's ``vec`` on every member of the group (checked on arrival).

        A member that receives non-finite values keeps its own ``vec`` and records the leader in
        ``self.rejected``; the job goes on.
        """
        topo = self.topology
        if topo.group_size == 1:
            return vec
        wire = self._wire(vec.clone())
        self._fence_group("the leader's backbone")
        topo.group.Bcast(self._buf(wire), root=topo.leader_rank_in_group)
        size = wire.numel() * wire.element_size()
        if topo.is_leader:
            self.bytes_sent += size * (topo.group_size - 1)
        else:
            self.bytes_received += size
            leader = int(topo.group_members[topo.leader_rank_in_group])
            try:
                check_vector(
                    wire, vec.numel(), f"rank {topo.rank}: backbone broadcast by leader {leader}"
                )
            except ReceiveError as err:
                self.rejected.append((leader, str(err)))
                return vec
        return self._back(wire)

    def group_broadcast_rows(
        self, rows: torch.Tensor | None, shape: tuple[int, int]
    ) -> torch.Tensor:
        """The leader's ``rows`` (e.g. the leaders' deltas it used) on every member, unchecked.

        Members pass ``rows=None`` and the ``shape`` they expect; the caller checks the content.
        """
        topo = self.topology
        if topo.is_leader:
            assert rows is not None and tuple(rows.shape) == shape
            wire = self._wire(rows.to(torch.float32))
        else:
            wire = self._empty(*shape)
        if topo.group_size > 1:
            self._fence_group("the leader's rows")
            topo.group.Bcast(self._buf(wire), root=topo.leader_rank_in_group)
            size = wire.numel() * wire.element_size()
            if topo.is_leader:
                self.bytes_sent += size * (topo.group_size - 1)
            else:
                self.bytes_received += size
        return self._back(wire)

    # -- small per-round records -----------------------------------------------------------------
    def gather_records(self, record: np.ndarray, root: int = 0) -> np.ndarray | None:
        """Gather one float64 record per rank onto ``root`` -> (size, len) there, None elsewhere."""
        world = self.topology.world
        rec = np.ascontiguousarray(record, dtype=np.float64)
        out = (
            np.empty((world.Get_size(), rec.size), dtype=np.float64)
            if world.Get_rank() == root
            else None
        )
        self.topology.watchdog.fence(world, "every rank's round record")
        world.Gather([rec, MPI.DOUBLE], [out, MPI.DOUBLE] if out is not None else None, root=root)
        return out
