"""Stopping a run early and cleanly: SLURM's warning signal before the time limit, SIGTERM, or
Ctrl-C (SIGINT).

The handlers only note the signal. The round loop asks :meth:`StopRequest.agreed` at fixed
points that every rank reaches (the start of a round, the end of local training); the answer is
one small Allreduce, so all ranks stop at the same point and none waits for a rank that left.
A second signal to the same rank ends that rank at once (exit 128 + signal number): the way out
when the next stop point is far away; the last complete checkpoint still resumes.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

import numpy as np
from mpi4py import MPI

from colnet_mpi.comm.watchdog import Watchdog

#: Exit code of a run stopped by a signal (BSD ``EX_TEMPFAIL``: try again later).
EXIT_PREEMPTED = 75

#: Signals that ask the run to stop: SLURM's ``--signal`` warning (USR1), SIGTERM and Ctrl-C.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Every rank agreed to stop at a point where the round cannot be finished."""


class StopRequest:
    """Notes the stop signals this rank received; agrees with the other ranks on stopping."""

    def __init__(self) -> None:
        self.received: str = ""
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        """Install the handlers (main thread only); :meth:`uninstall` restores the old ones."""
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._note)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before :meth:`install`."""
        for sig, old in self._previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._previous.clear()

    def _note(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received:  # asked twice: leave now
            os.write(
                2, f"colnet-mpi: {name} again; leaving without waiting for the others\n".encode()
            )
            os._exit(128 + signum)
        self.received = name

    def agreed(self, world: MPI.Comm, watchdog: Watchdog | None = None) -> str:
        """Collective: the signal's name if any rank received one, else ``""``."""
        mine = np.array(
            [STOP_SIGNALS.index(signal.Signals[self.received]) + 1 if self.received else 0]
        )
        mine = mine.astype(np.int32)
        out = np.zeros(1, dtype=np.int32)
        if watchdog is not None:
            watchdog.fence(world, "the stop-signal check")
        world.Allreduce([mine, MPI.INT], [out, MPI.INT], op=MPI.MAX)
        return STOP_SIGNALS[int(out[0]) - 1].name if out[0] else ""


def test_hook(where: str, r: int, rank: int) -> None:
    """Fault injection for the tests, at named points of a run; does nothing unless asked.

    ``COLNET_TEST_KILL=<where>:<round>:<rank>`` kills this process there with SIGKILL (a crash,
    e.g. half-way through writing a checkpoint); ``COLNET_TEST_SIGNAL=<where>:<round>:<rank>:<SIG>``
    sends it that signal (a preemption). ``rank`` may be ``*`` for every rank. Points:
    ``stage.<stage name>`` before each stage of a round, ``checkpoint`` inside a checkpoint write.
    """
    for var in ("COLNET_TEST_KILL", "COLNET_TEST_SIGNAL"):
        spec = os.environ.get(var, "")
        if not spec:
            continue
        parts = spec.split(":")
        if parts[:2] == [where, str(r)] and parts[2] in ("*", str(rank)):
            sig = signal.SIGKILL if var == "COLNET_TEST_KILL" else signal.Signals[parts[3]]
            os.kill(os.getpid(), sig)


def corrupt_hook(r: int, rank: int, what: str = "backbone") -> bool:
    """Test hook: ``COLNET_TEST_CORRUPT=<round>:<rank>`` makes that rank send a backbone with a
    NaN in that round of asynchronous mode (its receivers must refuse it and go on);
    ``<round>:<rank>:delta`` and ``<round>:<rank>:result`` a group delta or a leader update with
    a NaN (refused, the round goes on without it); ``<round>:<rank>:record`` a record one number
    too long (the writer rank must stop the run with a message that names it). ``rank`` may be
    ``*`` for every rank; several, separated by commas."""
    for spec in os.environ.get("COLNET_TEST_CORRUPT", "").split(","):
        parts = spec.split(":")
        if len(parts) < 2 or parts[0] != str(r) or parts[1] not in ("*", str(rank)):
            continue
        if (parts[2] if len(parts) > 2 else "backbone") == what:
            return True
    return False


def forced_groups(r: int) -> np.ndarray | None:
    """Test hook: ``COLNET_TEST_FORCE_GROUPS=<round>:<g0>,<g1>,…`` replaces the agreed partition
    of that round (every rank must see the same value), e.g. to check that clustering recovers
    from a wrong partition. None when unset or for other rounds."""
    spec = os.environ.get("COLNET_TEST_FORCE_GROUPS", "")
    if not spec or spec.split(":")[0] != str(r):
        return None
    return np.array([int(g) for g in spec.split(":")[1].split(",")], dtype=np.int64)
