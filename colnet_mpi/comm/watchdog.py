"""No MPI wait blocks forever: every wait of a run goes through one :class:`Watchdog`.

Blocking collectives are preceded by a *fence*, a non-blocking barrier on the same communicator
that is polled; once every member has reached the fence, the collective itself runs as before
(same call, same numbers). Point-to-point waits poll their requests and probes. A wait that lasts
longer than the limit ends the job with :class:`WatchdogTimeout`, whose message names the silent
rank(s) and where every rank was.

Finding the silent rank: when a wait expires, the waiting rank asks every other rank where it
is (a small numeric message on a communicator of its own, the *census*). Ranks that are
themselves waiting answer from their polling loop; a rank that is stopped, hung in a device call
or gone does not answer within a short grace period and is named silent.

The limit: ``federation.timeout`` seconds, or with ``"auto"``
``max(AUTO_FLOOR, AUTO_FACTOR * reference)`` where the reference is the longest round this rank
has seen, or (in the first round and at start-up) the time this rank has spent in the current
round so far: a peer is given several times this rank's own pace before it is declared silent.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import numpy as np
from mpi4py import MPI

AUTO_FLOOR = 600.0  # seconds: never less under "auto" (start-up on a busy shared file system)
AUTO_FACTOR = 5.0  # a peer may be this many times slower than this rank's own rounds
_yield = getattr(os, "sched_yield", lambda: None)  # POSIX; a no-op where absent
SPIN = 0.002  # seconds of tight polling before the loop starts to sleep between tests
MAX_PAUSE = 0.005  # longest sleep between two tests of a pending wait
ASK, ANSWER = 901, 902  # census tags
TEXT = 48  # bytes of the place name in a census answer
ANSWER_LEN = 3 + TEXT // 8  # int64: round, waiting flag, milliseconds there, then the place


class WatchdogTimeout(RuntimeError):
    """A peer was silent for longer than the limit; the message names it and the stage."""


def _ranks(ranks: Sequence[int], most: int = 12) -> str:
    shown = ", ".join(str(r) for r in ranks[:most])
    more = f" and {len(ranks) - most} more" if len(ranks) > most else ""
    return ("rank " if len(ranks) == 1 else "ranks ") + shown + more


class Watchdog:
    """Bounded waits for one rank of one communicator (usually the run's world duplicate)."""

    def __init__(
        self, world: MPI.Comm, timeout: float | None = None, *, grace: float | None = None
    ) -> None:
        self.census: MPI.Comm = world.Dup()
        self.rank = world.Get_rank()
        self.size = world.Get_size()
        self.timeout = timeout  # None: "auto"
        self.grace = grace
        self.round = 0
        self.place = "start-up"
        now = time.perf_counter()
        self._round_start = now
        self._place_start = now
        self._waiting = False
        self.longest_round = 0.0
        self._answers: list[tuple[MPI.Request, np.ndarray]] = []

    # -- where this rank is ----------------------------------------------------------------------
    def at(self, r: int, place: str) -> None:
        """Record that this rank is now in round ``r`` at ``place`` (a stage name)."""
        now = time.perf_counter()
        if r != self.round:
            self._round_start = now
        self.round, self.place, self._place_start = r, place, now

    def round_finished(self, seconds: float) -> None:
        """A round of ``seconds`` ended: it feeds the automatic limit."""
        self.longest_round = max(self.longest_round, seconds)

    def limit(self) -> float:
        """Seconds a wait starting now may last."""
        if self.timeout is not None:
            return self.timeout
        elapsed = time.perf_counter() - self._round_start
        return max(AUTO_FLOOR, AUTO_FACTOR * max(self.longest_round, elapsed))

    # -- waits ---------------------------------------------------------------------------------------
    def wait(
        self,
        done: Callable[[], bool],
        what: str,
        peers: Sequence[int] = (),
        *,
        busy: bool = False,
        spin: float = SPIN,
        patience: float = 1.0,
    ) -> None:
        """Poll ``done`` until it returns True; past the limit raise :class:`WatchdogTimeout`.

        ``what`` says what is awaited and ``peers`` the world ranks it depends on (named in the
        message; a list that the caller shrinks as peers answer names only the missing ones).
        While waiting, census questions from other ranks are answered. ``busy``: never sleep
        between polls, for transfers already under way (MPI moves data only while it is called);
        ``spin``: seconds of polling without pauses before the sleeps begin; ``patience``: a
        factor on the limit, for a wait known to span that many peers' work (a turn far down a
        host's chain; at least 1).
        """
        if done():
            return
        start = time.perf_counter()
        limit = self.limit() * max(1.0, patience)
        pause = 0.0
        self._waiting = True
        try:
            while True:
                self._serve()
                if done():
                    return
                now = time.perf_counter()
                if now - start > limit:
                    raise WatchdogTimeout(self._expired(what, peers, now - start, limit))
                if not busy and now - start > spin:
                    time.sleep(pause)
                    pause = min(MAX_PAUSE, pause * 2 or 1e-4)
                else:
                    # hand the core over if another process is ready to run (returns at once
                    # otherwise): with more ranks than cores, the rank that still has to send
                    # gets to run instead of waiting out this one's time slice
                    _yield()
        finally:
            self._waiting = False

    def requests(
        self,
        requests: list[MPI.Request],
        what: str,
        peers: Sequence[int] = (),
        *,
        busy: bool = False,
        patience: float = 1.0,
    ) -> None:
        """Wait for every request in ``requests`` (``busy``, ``patience``: see :meth:`wait`)."""
        self.wait(
            lambda: bool(MPI.Request.Testall(requests)), what, peers, busy=busy, patience=patience
        )

    def fence(self, comm: MPI.Comm, what: str, members: Sequence[int] = ()) -> None:
        """Wait until every member of ``comm`` reached this point (a polled non-blocking barrier).

        ``members``: the world ranks of ``comm``, for the message (empty: the whole world).
        """
        if comm == MPI.COMM_NULL or comm.Get_size() == 1:
            return
        request = comm.Ibarrier()
        self.wait(request.Test, what, members)

    def probe(
        self, comm: MPI.Comm, source: int, tag: int, status: MPI.Status, what: str
    ) -> MPI.Message:
        """A matched probe for one message from ``source`` (world rank of ``comm``)."""
        found: list[MPI.Message] = []

        def arrived() -> bool:
            message = comm.Improbe(source=source, tag=tag, status=status)
            if message is None:
                return False
            found.append(message)
            return True

        self.wait(arrived, what, [source])
        return found[0]

    # -- the census ----------------------------------------------------------------------------
    def _answer(self) -> np.ndarray:
        text = np.zeros(TEXT, dtype=np.uint8)
        raw = self.place.encode()[:TEXT]
        text[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        ms = int(1000 * (time.perf_counter() - self._place_start))
        head = np.array([self.round, int(self._waiting), ms], dtype=np.int64)
        return np.concatenate([head, text.view(np.int64)])

    def _serve(self) -> None:
        """Answer every pending census question (non-blocking)."""
        status = MPI.Status()
        while self.census.Iprobe(source=MPI.ANY_SOURCE, tag=ASK, status=status):
            question = np.empty(1, dtype=np.int64)
            self.census.Recv([question, MPI.INT64_T], source=status.Get_source(), tag=ASK)
            answer = self._answer()
            request = self.census.Isend([answer, MPI.INT64_T], dest=status.Get_source(), tag=ANSWER)
            self._answers.append((request, answer))
        self._answers = [(q, a) for q, a in self._answers if not q.Test()]

    def _expired(self, what: str, peers: Sequence[int], waited: float, limit: float) -> str:
        """Ask every rank where it is; the message for :class:`WatchdogTimeout`."""
        others = [r for r in range(self.size) if r != self.rank]
        question = np.array([self.rank], dtype=np.int64)
        asks = [self.census.Isend([question, MPI.INT64_T], dest=r, tag=ASK) for r in others]
        grace = self.grace if self.grace is not None else min(10.0, max(1.0, limit / 20))
        answers: dict[int, np.ndarray] = {}
        status = MPI.Status()
        end = time.perf_counter() + grace
        # Serve until the grace period is over even with every answer in: other ranks that gave
        # up at the same moment ask too, and must not take this one for silent.
        while time.perf_counter() < end:
            self._serve()
            if len(answers) < len(others) and self.census.Iprobe(
                source=MPI.ANY_SOURCE, tag=ANSWER, status=status
            ):
                buf = np.empty(ANSWER_LEN, dtype=np.int64)
                self.census.Recv([buf, MPI.INT64_T], source=status.Get_source(), tag=ANSWER)
                answers[status.Get_source()] = buf
            else:
                time.sleep(0.002)
        del asks  # never completed by a silent rank; the job is about to end
        silent = [r for r in others if r not in answers]
        where = f"round {self.round}, {self.place}" if self.round else self.place
        parts = [
            f"watchdog: rank {self.rank} waited {waited:.0f}s (limit {limit:.0f}s, "
            f"federation.timeout) in {where} for {what}"
            + (f" with {_ranks(list(peers))}" if peers else "")
        ]
        if silent:
            parts.append(
                f"silent: {_ranks(silent)} (no answer within {grace:.0f}s: stopped, hung or gone)"
            )
        else:
            parts.append("every rank answered: a mismatched wait, not a lost peer")
        places: dict[str, list[int]] = {}
        for r, buf in sorted(answers.items()):
            text = bytes(buf[3:].view(np.uint8)).rstrip(b"\0").decode(errors="replace")
            state = "waiting" if buf[1] else "busy"
            at = f"round {buf[0]}, {text}" if buf[0] else text
            places.setdefault(f"{state} in {at}", []).append(r)
        parts += [f"{_ranks(ranks)} {place}" for place, ranks in places.items()]
        return "; ".join(parts)

    def free(self) -> None:
        """Free the census communicator (idempotent)."""
        if self.census != MPI.COMM_NULL:
            self.census.Free()
            self.census = MPI.COMM_NULL
