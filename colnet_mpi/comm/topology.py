"""The one owner of communicators: world duplicate, neighbour graph, group and leader communicators."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

import numpy as np
from mpi4py import MPI

from colnet_mpi.comm.graphs import TOPOLOGIES, neighbours_of
from colnet_mpi.comm.watchdog import Watchdog

__all__ = ["TOPOLOGIES", "Topology", "neighbours_of"]


class Topology:
    """Builds, hands out and frees every communicator of a run.

    ``world`` is a private duplicate of the parent communicator, so library traffic never mixes with
    anything else in the process. ``group`` and ``leaders`` are rebuilt by :meth:`set_groups` each
    round (``MPI.COMM_NULL`` where this rank is not a member) and freed by :meth:`free`. Every
    wait on them goes through ``watchdog`` (``timeout`` seconds, None: automatic).
    """

    def __init__(
        self,
        parent: MPI.Comm | None = None,
        *,
        kind: str = "full",
        timeout: float | None = None,
        degree: int = 4,
        seed: int = 0,
    ) -> None:
        self.world: MPI.Comm = (parent if parent is not None else MPI.COMM_WORLD).Dup()
        self.watchdog = Watchdog(self.world, timeout)
        self.rank: int = self.world.Get_rank()
        self.size: int = self.world.Get_size()
        self.kind = kind
        self.neighbours: list[int] = neighbours_of(
            self.rank, self.size, kind, degree=degree, seed=seed
        )
        shared = self.world.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank: int = shared.Get_rank()
        self.local_size: int = shared.Get_size()
        shared.Free()
        self.group: MPI.Comm = MPI.COMM_NULL
        self.leaders: MPI.Comm = MPI.COMM_NULL
        self._groups_key: bytes | None = None
        self.group_ids = np.zeros(self.size, dtype=np.int64)
        self.is_leader = False
        self.isolated = False  # quarantined by screening this round (group id -1)
        self.group_members: list[int] = [self.rank]
        self.leader_ranks: list[int] = []  # world ranks in the leaders' communicator
        self.leader_rank_in_group = 0
        self._owned: list[Any] = []  # objects with a collective free() (shared windows)

    # -- per-round groups -------------------------------------------------------------------
    def set_groups(self, group_ids: np.ndarray, leader_flags: np.ndarray) -> None:
        """Make the group and leader communicators match the agreed partition (collective).

        ``group_ids`` and ``leader_flags`` must be identical on every rank; the group communicator
        is only rebuilt when the partition changed, the leader communicator every call. A group
        id of -1 quarantines a rank for the round: it is alone in its group communicator and not
        in the leaders' communicator.
        """
        group_ids = np.asarray(group_ids, dtype=np.int64)
        leader_flags = np.asarray(leader_flags, dtype=bool)
        if group_ids.shape != (self.size,) or leader_flags.shape != (self.size,):
            raise ValueError(
                f"group ids {group_ids.shape} and leader flags {leader_flags.shape} must both have "
                f"shape ({self.size},)"
            )
        my_group = int(group_ids[self.rank])
        self.isolated = my_group < 0
        if self.isolated:  # quarantined this round: a group of its own, not among the leaders
            if leader_flags[self.rank]:
                raise ValueError(f"rank {self.rank} is quarantined (group -1) and cannot lead")
            members = [self.rank]
            leader = self.rank
            color = int(max(group_ids.max(), 0)) + 1 + self.rank
        else:
            members = [int(r) for r in np.flatnonzero(group_ids == my_group)]
            leaders_here = [r for r in members if leader_flags[r]]
            if len(leaders_here) != 1:
                raise ValueError(
                    f"group {my_group} has {len(leaders_here)} leaders; exactly one is required"
                )
            leader = leaders_here[0]
            color = my_group
        key = group_ids.tobytes()
        self.watchdog.fence(self.world, "the new group communicators")
        if key != self._groups_key:
            self._free(self.group)
            self.group = self.world.Split(color=color, key=self.rank)
            self._groups_key = key
        self._free(self.leaders)
        self.is_leader = bool(leader_flags[self.rank]) and not self.isolated
        self.leaders = self.world.Split(
            color=0 if self.is_leader else MPI.UNDEFINED, key=max(my_group, 0)
        )
        self.group_ids = group_ids
        self.leader_ranks = [int(r) for r in np.flatnonzero(leader_flags & (group_ids >= 0))]
        self.group_members = members
        self.leader_rank_in_group = members.index(leader)

    @property
    def group_size(self) -> int:
        """Members in this rank's group."""
        return len(self.group_members)

    # -- lifetime -----------------------------------------------------------------------------
    @staticmethod
    def _free(comm: MPI.Comm) -> None:
        if comm != MPI.COMM_NULL:
            comm.Free()

    def adopt(self, owned: Any) -> None:
        """Free ``owned`` (it has a collective ``free()``) together with the communicators."""
        self._owned.append(owned)

    def free(self) -> None:
        """Free every communicator this object created (idempotent)."""
        while self._owned:
            self._owned.pop().free()
        self._free(self.group)
        self._free(self.leaders)
        self.group = MPI.COMM_NULL
        self.leaders = MPI.COMM_NULL
        self._groups_key = None
        self.watchdog.free()
        if self.world != MPI.COMM_NULL:
            self.world.Free()
            self.world = MPI.COMM_NULL

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    # -- small helpers ---------------------------------------------------------------------
    def hostnames(self) -> list[str]:
        """Host name of every rank (fixed-width bytes through a numeric Allgather)."""
        width = 64
        mine = np.zeros(width, dtype=np.uint8)
        raw = socket.gethostname().encode()[:width]
        mine[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        allnames = np.zeros((self.size, width), dtype=np.uint8)
        self.watchdog.fence(self.world, "every rank's host name")
        self.world.Allgather([mine, MPI.UNSIGNED_CHAR], [allnames, MPI.UNSIGNED_CHAR])
        return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in allnames]

    def cpus_for_rank(self, at_once: int = 0) -> int:
        """CPU threads this rank may use: SLURM's grant, else its affinity shared among the
        host's ranks that compute at once (``at_once``; 0: all of them, see ``run.host_slots``)."""
        slurm = os.environ.get("SLURM_CPUS_PER_TASK")
        if slurm and slurm.isdigit() and int(slurm) > 0:
            return int(slurm)
        try:
            affinity = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - macOS
            affinity = os.cpu_count() or 1
        total = os.cpu_count() or affinity
        if affinity < total:  # the launcher already bound this rank to its own cores
            return max(1, affinity)
        sharing = min(at_once, self.local_size) if at_once > 0 else self.local_size
        return max(1, affinity // sharing)


def host_members(
    world: MPI.Comm,
    watchdog: Watchdog,
    what: str,
    *,
    host: MPI.Comm | None = None,
    flag: bool = True,
) -> tuple[MPI.Comm, list[int], list[bool]]:
    """(Collective) the ranks of this rank's host: their communicator (the world's
    ``COMM_TYPE_SHARED`` split, or a duplicate of ``host`` where a test pretends hosts), the
    world rank of each in host order, and each one's ``flag``. ``what`` names the purpose in
    the watchdog's messages."""
    comm = (
        host.Dup()
        if host is not None
        else world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    )
    mine = np.array([world.Get_rank(), 1 if flag else 0], dtype=np.int64)
    table = np.zeros((comm.Get_size(), 2), dtype=np.int64)
    watchdog.fence(comm, f"the ranks of this host ({what})")
    comm.Allgather([mine, MPI.INT64_T], [table, MPI.INT64_T])
    return comm, [int(r) for r in table[:, 0]], [bool(f) for f in table[:, 1]]


def mpi_library() -> str:
    """First line of the MPI library's version string."""
    return MPI.Get_library_version().strip().splitlines()[0].strip()


def agree(
    world: MPI.Comm, error: str | None, watchdog: Watchdog | None = None
) -> list[tuple[int, str]]:
    """Collectively learn which ranks hit an error before training (numeric Allgather only).

    Returns ``[(rank, message)]`` for the lowest failing rank (its message is broadcast as bytes),
    or an empty list when every rank is fine. Every rank gets the same answer, so all of them can
    stop together instead of some waiting forever in the next collective.
    """
    flags = np.zeros(world.Get_size(), dtype=np.int32)
    mine = np.array([1 if error else 0], dtype=np.int32)
    _fence(watchdog, world, "every rank's start-up checks")
    world.Allgather([mine, MPI.INT], [flags, MPI.INT])
    failing = np.flatnonzero(flags)
    if failing.size == 0:
        return []
    root = int(failing[0])
    return [(root, bcast_text(world, error or "", root=root, watchdog=watchdog))]


def _fence(watchdog: Watchdog | None, comm: MPI.Comm, what: str) -> None:
    if watchdog is not None:
        watchdog.fence(comm, what)


def bcast_text(
    world: MPI.Comm,
    text: str,
    *,
    root: int = 0,
    width: int = 4096,
    watchdog: Watchdog | None = None,
) -> str:
    """``root``'s ``text`` (its first ``width`` bytes) on every rank, as a fixed-width byte buffer."""
    buf = np.zeros(width, dtype=np.uint8)
    if world.Get_rank() == root:
        raw = text.encode()[:width]
        buf[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    _fence(watchdog, world, f"a message from rank {root}")
    world.Bcast([buf, MPI.UNSIGNED_CHAR], root=root)
    return bytes(buf).rstrip(b"\0").decode(errors="replace")


def bcast_ints(
    world: MPI.Comm,
    values: Sequence[int] | np.ndarray,
    *,
    root: int = 0,
    watchdog: Watchdog | None = None,
) -> np.ndarray:
    """``root``'s int64 vector on every rank (all ranks pass a vector of the same length)."""
    buf = np.ascontiguousarray(values, dtype=np.int64).copy()
    _fence(watchdog, world, f"numbers from rank {root}")
    world.Bcast([buf, MPI.INT64_T], root=root)
    return buf


def _allgather(
    world: MPI.Comm, values: object, dtype: type, watchdog: Watchdog | None, what: str
) -> np.ndarray:
    """Allgather a small vector of the same length from every rank -> (size, length)."""
    mine: np.ndarray = np.ascontiguousarray(values, dtype=dtype)
    out: np.ndarray = np.empty((world.Get_size(), mine.size), dtype=dtype)
    kind = MPI.DOUBLE if dtype is np.float64 else MPI.INT64_T
    _fence(watchdog, world, what)
    world.Allgather([mine, kind], [out, kind])
    return out


def floats_allgather(
    world: MPI.Comm,
    values: Sequence[float] | np.ndarray,
    *,
    watchdog: Watchdog | None = None,
    what: str = "every rank's numbers",
) -> np.ndarray:
    """Allgather a small float64 vector of the same length from every rank -> (size, length)."""
    return _allgather(world, values, np.float64, watchdog, what)


def ints_allgather(
    world: MPI.Comm,
    values: Sequence[int] | np.ndarray,
    *,
    watchdog: Watchdog | None = None,
    what: str = "every rank's numbers",
) -> np.ndarray:
    """Allgather a small int64 vector of the same length from every rank -> (size, length)."""
    return _allgather(world, values, np.int64, watchdog, what)
