"""Point-to-point messages of asynchronous mode: posted without waiting, received as they come.

A :class:`Mailbox` owns a duplicate of the run's world communicator, so its traffic never
matches a synchronous call. Senders never block: :meth:`Mailbox.post` starts a non-blocking
send and keeps the buffer alive until it completes. For versioned model data (``latest=True``)
at most :data:`IN_FLIGHT` sends per destination and tag are under way; a newer one waits in a
single slot that the next newer one replaces, so a slow receiver costs a fast sender neither
memory nor time. Receivers call :meth:`Mailbox.poll` (from every wait and between the stages of
a round): it matches each announced message, posts its receive into a buffer of the announced
size and hands completed ones to the caller; it never waits for a message to be announced or
for data to arrive.

Only numeric buffers cross: float32 tensors for model data (device memory where the MPI is
CUDA-aware, host memory otherwise), float64 arrays for records, int64 arrays for control
messages. Checking contents is the caller's job (``transport.check_vector``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from colnet_mpi.comm.topology import Topology
from colnet_mpi.comm.transport import Transport

#: Message kinds (tags) and the element type each travels as.
BACKBONE, DELTA, RESULT, RECORD, DONE, CHECKPOINT, MARKED, STOP, MIX, PROGRESS = range(41, 51)
KIND_DTYPE = {
    BACKBONE: "f4",
    MIX: "f4",
    DELTA: "f4",
    RESULT: "f4",
    RECORD: "f8",
    DONE: "i8",
    CHECKPOINT: "i8",
    MARKED: "i8",
    STOP: "i8",
    PROGRESS: "i8",
}
#: Versioned model sends under way per destination and kind before newer ones are coalesced.
IN_FLIGHT = 2

_MPI_TYPE = {"f4": MPI.FLOAT, "f8": MPI.DOUBLE, "i8": MPI.INT64_T}
_SIZE = {"f4": 4, "f8": 8, "i8": 8}


@dataclass
class _Outbox:
    """The sends under way to one destination with one tag, and the newest one waiting."""

    under_way: list[tuple[MPI.Request, Any]] = field(default_factory=list)
    waiting: Any = None


class Mailbox:
    """Non-blocking, newest-first point-to-point messaging for one rank (see the module text)."""

    def __init__(self, topology: Topology, transport: Transport) -> None:
        self.comm: MPI.Comm = topology.world.Dup()
        self.rank = topology.rank
        self.transport = transport  # buffer placement (device / host) and byte counters
        self._out: dict[tuple[int, int], _Outbox] = {}
        self._incoming: list[tuple[int, int, Any, MPI.Request]] = []
        self._barrier: MPI.Request | None = None

    # -- sending ---------------------------------------------------------------------------------
    def _wire(self, kind: int, data: Any) -> Any:
        if KIND_DTYPE[kind] == "f4":
            return self.transport._wire(data)
        return np.ascontiguousarray(data, dtype=KIND_DTYPE[kind])

    def _buf(self, kind: int, data: Any) -> list[Any]:
        if isinstance(data, torch.Tensor):
            return self.transport._buf(data)
        return [data, _MPI_TYPE[KIND_DTYPE[kind]]]

    def _start(self, dest: int, kind: int, wire: Any) -> tuple[MPI.Request, Any]:
        request = self.comm.Isend(self._buf(kind, wire), dest=dest, tag=kind)
        n = wire.numel() if isinstance(wire, torch.Tensor) else wire.size
        self.transport.bytes_sent += n * _SIZE[KIND_DTYPE[kind]]
        return request, wire

    def post(self, dests: list[int], kind: int, data: Any, *, latest: bool = False) -> None:
        """Send ``data`` to every rank in ``dests`` without waiting.

        ``latest``: only the newest matters (versioned model data): with :data:`IN_FLIGHT` sends
        to a destination still under way, ``data`` replaces the one waiting to go there.
        """
        if not dests:
            return
        wire = self._wire(kind, data)  # one buffer shared by every destination
        for dest in dests:
            box = self._out.setdefault((dest, kind), _Outbox())
            self._retire(box)
            if latest and len(box.under_way) >= IN_FLIGHT:
                box.waiting = wire
            else:
                box.under_way.append(self._start(dest, kind, wire))

    @staticmethod
    def _retire(box: _Outbox) -> None:
        box.under_way = [(q, w) for q, w in box.under_way if not q.Test()]

    def pump(self) -> None:
        """Retire completed sends and start the waiting ones that now have room."""
        for (dest, kind), box in self._out.items():
            self._retire(box)
            if box.waiting is not None and len(box.under_way) < IN_FLIGHT:
                box.under_way.append(self._start(dest, kind, box.waiting))
                box.waiting = None

    def sending(self) -> bool:
        """Whether any send is still under way or waiting."""
        self.pump()
        return any(box.under_way or box.waiting is not None for box in self._out.values())

    # -- receiving -------------------------------------------------------------------------------
    def poll(self, handle: Callable[[int, int, Any], None]) -> int:
        """Match what has been announced, start its receive, and pass every completed message
        to ``handle(source, kind, data)`` in arrival order; never waits. Returns how many
        messages were handled."""
        self.pump()
        status = MPI.Status()
        while True:
            message = self.comm.Improbe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status)
            if message is None:
                break
            kind, src = status.Get_tag(), status.Get_source()
            if kind not in KIND_DTYPE:  # not ours: take it off the queue and drop it
                message.Recv([np.empty(max(status.Get_count(MPI.BYTE), 1), np.uint8), MPI.BYTE])
                continue
            dtype = KIND_DTYPE[kind]
            count = -(-max(status.Get_count(MPI.BYTE), 0) // _SIZE[dtype])  # whole, rounded up
            if dtype == "f4":
                buf: Any = self.transport._empty(count)
            else:
                buf = np.empty(count, dtype=dtype)
            self.transport.bytes_received += count * _SIZE[dtype]
            self._incoming.append((src, kind, buf, message.Irecv(self._buf(kind, buf))))
        still = []
        for src, kind, buf, request in self._incoming:
            if request.Test():
                handle(src, kind, self.transport._back(buf) if dtype_is_model(kind) else buf)
            else:
                still.append((src, kind, buf, request))
        handled = len(self._incoming) - len(still)
        self._incoming = still
        return handled

    def receiving(self) -> bool:
        """Whether a matched message is still arriving."""
        return bool(self._incoming)

    # -- the end -----------------------------------------------------------------------------------
    def closing(self) -> bool:
        """Start (once) and test the closing barrier: True when every rank has started it, i.e.
        every rank's sends are complete. Call only once this rank sends nothing more."""
        if self._barrier is None:
            self._barrier = self.comm.Ibarrier()
        return bool(self._barrier.Test())

    def free(self) -> None:
        """Free the communicator (idempotent)."""
        if self.comm != MPI.COMM_NULL:
            self.comm.Free()
            self.comm = MPI.COMM_NULL


def dtype_is_model(kind: int) -> bool:
    """Whether messages of ``kind`` carry model data (float32 tensors)."""
    return KIND_DTYPE[kind] == "f4"


class Agreement:
    """Non-blocking all-gathers of small int64 vectors, started in the same order on every rank
    (one per agreement epoch) on a communicator of their own, and tested without waiting."""

    def __init__(self, topology: Topology) -> None:
        self.comm: MPI.Comm = topology.world.Dup()
        self.size = topology.size
        self._pending: dict[int, tuple[MPI.Request, np.ndarray, np.ndarray]] = {}
        self.results: dict[int, np.ndarray] = {}

    def start(self, epoch: int, values: np.ndarray) -> None:
        """This rank's contribution to ``epoch`` (every rank starts epochs in the same order)."""
        mine = np.ascontiguousarray(values, dtype=np.int64)
        out = np.empty((self.size, mine.size), dtype=np.int64)
        request = self.comm.Iallgather([mine, MPI.INT64_T], [out, MPI.INT64_T])
        self._pending[epoch] = (request, mine, out)

    def started(self, epoch: int) -> bool:
        """Whether this rank has started ``epoch``."""
        return epoch in self._pending or epoch in self.results

    def ready(self, epoch: int) -> bool:
        """Whether ``epoch``'s result is here (tests every pending epoch)."""
        for e, (request, _, out) in list(self._pending.items()):
            if request.Test():
                self.results[e] = out
                del self._pending[e]
        return epoch in self.results

    def pending(self) -> bool:
        """Whether any started epoch has not completed."""
        self.ready(-1)
        return bool(self._pending)

    def free(self) -> None:
        """Free the communicator (idempotent)."""
        if self.comm != MPI.COMM_NULL:
            self.comm.Free()
            self.comm = MPI.COMM_NULL
