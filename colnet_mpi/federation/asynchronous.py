"""Asynchronous rounds (``federation.mode = "async"``): every node runs its own round counter.

No collective or barrier over the world runs per round. A node's round ``r``:

1. trains locally (``stages.train``, serving its mailbox after every training step, so that
   what it sends keeps moving and what comes in is taken in while it trains; with
   ``federation.catch_up = L``, while it is ``L`` or more rounds behind the most advanced
   neighbour it has heard of, one epoch only or, with ``federation.catch_up_train = "head"``,
   its private head alone on the mix of its group-mates' newest versions, the backbone frozen
   (``"features"``: on the frozen backbone's features, computed once per backbone):
   every node posts a small progress note to its neighbours after each round; with
   ``federation.lockstep_deadline``, in a round whose partition waits for every node's proposal
   of that round, it stops training once every neighbour has posted that round's backbone,
   :meth:`AsyncRounds.deadline`) and posts its
   backbone, versioned ``r``, to its neighbours (non-blocking; only the newest version per
   sender is kept by the receivers); with ``clustering.backbone_sketch`` it posts the
   clustering payload alone (with the backbone's sketch) and, once the round's partition is
   known (step 3), the whole backbone to its group-mates only;
2. in the rounds that cluster, waits until it holds every neighbour's version ``>= r - S``
   (``federation.max_staleness``; -1: any version, so only until a first one is in), proposes
   a partition from those versions and starts the agreement of epoch ``r``: a non-blocking
   all-gather of every node's proposal;
3. takes the partition of round ``r``: the agreed result of epoch ``r - L`` (``L = 0`` when
   ``S = 0``, else 1; round 1 and ``clustering.until`` as in :func:`epoch_for`), identical on
   every rank for the same ``r``. Round 1 waits for epoch 1 (so it is lock-step), unless
   ``federation.first_round = "local"``: then round 1 has no groups (steps 4 and 5 do nothing)
   and epoch 1 applies from round 2; a node that lacks a neighbour's first view at step 2 of
   round 1 makes its round-1 proposal at step 2 of round 2 instead (waiting there for the
   views), before any later one;
4. waits for its group-mates' versions ``>= r - S`` and mixes them with its own:
   weights ``w_j * staleness_decay ** (r - v_j)`` (a robust intra rule instead combines the
   versions' updates from the node's start of the round);
5. if it leads its group in round ``r`` (the same rotation as synchronous mode), posts the group
   delta (the mix of the versions not ahead of ``r`` minus its start) to every node outside its
   group, waits for the other groups' deltas ``>= r - S``, runs HCA on the newest delta of each
   group and posts the update to its group; members apply the newest leader update they hold
   (waiting for one ``>= r - S``), once, scaled by the share of their mix whose versions had not
   applied it yet (each backbone carries the tag of the last update its sender applied). With
   the ``mean`` cross aggregator (the ``fedper`` scheme) leaders post their group's backbone
   (that mix itself) instead of a delta, and the update is the equal-weight mean of the newest
   group backbones minus their own, so that at ``S = 0`` every node ends the round with the
   mean of the groups, as in synchronous mode. With ``federation.leader_stand_in``, a member
   whose leader has not posted its backbone of round ``r`` does the leader's part itself
   (:meth:`AsyncRounds.stands_in`) and otherwise waits for the leader's update of round ``r``,
   and deltas are made of the versions of round ``r`` alone;
6. evaluates, sends its record to the writer rank (point-to-point), and saves its checkpoint at
   its own round boundary every ``run.checkpoint_every`` rounds.

Stopping: after ``training.rounds`` or once ``federation.time_budget`` seconds have passed, a
node posts that it is done and keeps serving messages (and the agreements the others will still
start) until every rank is done. Waits count a done peer as present.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from colnet_mpi.algorithms.clustering import adjusted_rand, leader_flags, partition_stamp
from colnet_mpi.algorithms.fedavg import (
    group_delta,
    staleness_weights,
    streamed_average,
    uncarried_share,
    weighted_average,
)
from colnet_mpi.algorithms.hca import apply_update, hca_update
from colnet_mpi.comm import mailbox as mb
from colnet_mpi.comm.mailbox import Agreement, Mailbox
from colnet_mpi.comm.transport import ReceiveError, check_vector
from colnet_mpi.federation import stages
from colnet_mpi.federation.checkpoint import backbone_checksum
from colnet_mpi.federation.context import RoundContext
from colnet_mpi.federation.cross import MeanOfGroups
from colnet_mpi.federation.grouping import TaskAwareClustering
from colnet_mpi.federation.intra import GatheredRule
from colnet_mpi.federation.recording import append_row, round_values
from colnet_mpi.federation.stop import Preempted, corrupt_hook, test_hook
from colnet_mpi.metrics.reader import carry_forward

if TYPE_CHECKING:
    from colnet_mpi.federation.loop import Federation

#: Header of every model message (float32): version (the sender's round), then for DELTA and
#: RESULT the partition stamp and a flag (RESULT: 1 = an update follows, 0 = none this round),
#: for BACKBONE the round and sender of the last leader update the sender had applied (so that
#: a receiver knows whether the version already holds an update); last the sender's FedAvg weight.
HEADER = 4
#: Seconds a node that catches up (``federation.catch_up``) may spend at most taking in what
#: has arrived before it decides how many epochs its round trains.
CATCH_UP_DRAIN = 2.0
#: ... and how long it goes on waiting for a message under way once nothing has come in.
DRAIN_QUIET = 0.05


def epoch_for(
    r: int, lag: int, start: int, until: int, held: bool | None = None, first_local: bool = False
) -> int | None:
    """The agreement epoch whose partition round ``r`` uses; None: keep the last one; 0: none
    yet (the node is in no group this round).

    Epoch ``e`` is started by every rank in its round ``e`` (from ``start``, the first round of
    this process, to ``until``; 0: no end). ``held``: whether this process begins with a partition
    (restored by a resume; default: ``start > 1``). Rounds whose epoch ``r - lag`` would come
    before ``start`` keep a held partition; without one, the first rounds of the process use
    epoch ``start`` (agreed in lock-step), or, from a fresh start with ``first_local``
    (``federation.first_round = "local"``), round 1 uses none and round 2 on epoch ``r - lag``.
    After ``until`` (or ``start``, when the process begins without a partition), rounds use that
    last epoch.
    """
    if held is None:
        held = start > 1
    e = r - lag
    if e < start:
        if held:
            return None
        if first_local and start == 1:
            return 0
        e = start
    last = until if held or not until else max(until, start)
    if last and e > last:
        e = last
    return e if e >= start else None


def whole(x: float, low: int, high: int) -> bool:
    """Whether ``x`` (a number read from a message) is a whole number in ``low..high``."""
    return math.isfinite(x) and x == int(x) and low <= x <= high


def header_problem(kind: int, head: list[float], rounds: int, n: int) -> str:
    """What is wrong with the :data:`HEADER` of a model message of ``kind``; "" when nothing.

    A version outside 1..``rounds`` would stand as a sender's newest for the rest of the run
    (newer versions replace only older ones), so such a buffer is refused like one with a NaN.
    BACKBONE and MIX: the round (0..``rounds``) and sender (-1: none yet, else a rank below
    ``n``) of the last leader update applied, and a FedAvg weight >= 0. DELTA and RESULT: a
    flag of 0 or 1 (a DELTA always 1), then 0."""
    version, a, b, c = head
    if not whole(version, 1, rounds):
        return f"version {version!r} outside 1..{rounds}"
    if kind in (mb.BACKBONE, mb.MIX):
        if not (whole(a, 0, rounds) and whole(b, -1, n - 1)):
            return f"last update applied (round {a!r}, rank {b!r}) out of range"
        if c < 0:
            return f"a FedAvg weight of {c!r}"
        return ""
    if not (b in (0.0, 1.0) and (kind != mb.DELTA or b == 1.0) and c == 0.0):
        return f"header fields {b!r}, {c!r} where a flag of 0 or 1 and 0 belong"
    return ""


def control_problem(kind: int, data: np.ndarray, rounds: int, record_width: int) -> str:
    """What is wrong with a control message (not a model buffer) of ``kind``; "" when nothing.

    Control messages come from this program on other ranks, so a malformed one is a bug or a
    rank of another version: the run stops with this text rather than write a wrong row or
    wait for a round that will not come. Sizes: RECORD a round then one record of
    ``record_width``; DONE and CHECKPOINT two numbers; MARKED, STOP and PROGRESS one. Rounds
    (of RECORD, DONE, CHECKPOINT, MARKED) lie in 0..``rounds`` (0: none yet; RECORD from 1)."""
    sizes = {
        mb.RECORD: 1 + record_width,
        mb.DONE: 2,
        mb.CHECKPOINT: 2,
        mb.MARKED: 1,
        mb.STOP: 1,
        mb.PROGRESS: 1,
    }
    if kind not in sizes:
        return f"unknown message kind {kind}"
    if data.size != sizes[kind]:
        return f"{data.size} numbers where {sizes[kind]} belong"
    if kind in (mb.STOP, mb.PROGRESS):
        return ""  # a progress note outside 1..rounds is ignored (see AsyncRounds.handle)
    first = float(data[0])
    low = 1 if kind == mb.RECORD else 0
    if not whole(first, low, rounds):
        return f"round {first!r} outside {low}..{rounds}"
    if kind == mb.CHECKPOINT and int(data[1]) < 0:
        return f"a checkpoint of {int(data[1])} bytes"
    return ""


def behind(r: int, catch_up: int, newest: int) -> bool:
    """Whether a node that has finished ``r - 1`` rounds catches up in round ``r``: the most
    advanced neighbour it has heard of has finished ``newest``, ``catch_up`` or more rounds
    ahead (``catch_up`` 0: never)."""
    return bool(catch_up) and newest - (r - 1) >= catch_up


def catch_up_epochs(r: int, full: int, catch_up: int, newest: int) -> int:
    """Local epochs of round ``r`` under ``federation.catch_up_train = "epochs"``: one while the
    node is behind (:func:`behind`), else ``full``."""
    return 1 if behind(r, catch_up, newest) else full


class AsyncRounds:
    """The asynchronous round loop of one rank (see the module text)."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        cfg = fed.config
        topo = fed.topology
        self.n, self.rank = topo.size, topo.rank
        self.rounds = cfg.training.rounds
        self.S = cfg.federation.max_staleness  # -1: unbounded
        self.lag = 0 if self.S == 0 else 1
        self.until = cfg.clustering.until
        self.first_local = cfg.federation.first_round == "local"
        # whether this process began with a partition (a resume restored one); set by run()
        self.held_at_start = False
        # first_round = "local": round 1's context while its proposal waits for the views of
        # the neighbours not heard from yet (made at the start of a later round's exchange)
        self.deferred: RoundContext | None = None
        self.mail = Mailbox(topo, fed.transport)
        self.agreement = Agreement(topo)
        # newest version held per sender: (round, backbone, grouper payload, weight)
        self.held: dict[int, tuple[int, torch.Tensor, torch.Tensor | None, float]] = {}
        # the (round, sender) of the last leader update each held version had applied
        self.held_tag: dict[int, tuple[int, int]] = {}
        # what this round mixed, by rank (the own backbone included): (mixing weight, version,
        # the version's update tag, backbone), taken before later arrivals replace them
        self.mixed: dict[int, tuple[float, int, tuple[int, int], torch.Tensor]] = {}
        # newest group delta and leader update held per sender: (round, stamp, delta) and
        # (round, stamp, flag, update)
        self.deltas: dict[int, tuple[int, int, torch.Tensor]] = {}
        self.results: dict[int, tuple[int, int, int, torch.Tensor]] = {}
        self.applied = (0, -1)  # (round, sender) of the last leader update applied
        self.done: dict[int, int] = {}  # rank -> its last round
        # federation.catch_up: rank -> the newest round a neighbour reported finished (PROGRESS)
        self.catch_up = cfg.federation.catch_up
        self.progress: dict[int, int] = {}
        self.stand_in = cfg.federation.leader_stand_in
        self.stood_in_before = False  # the first stand-in is logged, once per process
        # (rank, what) -> the round a refused message of that peer stood for: a refused buffer
        # stands for that peer's contribution, and the round goes on without it; ``what``: the
        # slot it would have filled ("view", "held", "delta" or "result", see :meth:`_slot`)
        self.refused_in: dict[tuple[int, str], int] = {}
        self.current = 0  # this node's round
        # what the last record counted: refused buffers up to its evaluation, bytes sent and
        # received up to the record; what comes after goes to the next round's record
        self.refusals_counted = 0
        self.bytes_counted = (0, 0)
        self.stop_asked = ""
        self.marked = 0  # the newest checkpoint round the writer rank recorded for all ranks
        # writer rank: records waiting for their row, and finished checkpoints per round
        self.records: dict[int, dict[int, np.ndarray]] = {}
        self.next_row = 1
        # writer rank: every node's newest test metrics written, for the job log (``_shown``)
        self.last_evaluation: dict[str, np.ndarray] = {}
        self.saved: dict[int, dict[int, int]] = {}
        self.done_saved: dict[int, int] = {}  # rank -> the last round it saved (DONE message)
        self.saved_by: dict[int, int] = {}  # rank -> the newest checkpoint note received
        self.numel = fed.node.flat.pack().numel()
        self.record_width = fed.spec.width()  # of the RECORD messages the writer rank takes in
        # what the grouper sends with each backbone (fixed, so that the first arrivals can be
        # checked before this node has built its own)
        self.payload_numel = int(getattr(fed.grouper, "payload_size", 0))
        self.start_round = 1
        grouper = fed.grouper  # agreements only for a clustering grouper (fixed groups need none)
        self.clusterer = grouper if isinstance(grouper, TaskAwareClustering) else None
        # clustering.backbone_sketch: BACKBONE messages carry the clustering payload alone (its
        # backbone sketch standing for the backbone), kept per sender in ``views``; the whole
        # backbone goes to the group-mates only (MIX messages, kept in ``held``)
        self.sketched = not getattr(grouper, "sends_backbone", True)
        self.views: dict[int, tuple[int, torch.Tensor]] = {}
        # cross-group stage: HCA over group deltas of the trainable entries, or (``mean``) the
        # mean of whole group backbones; the length of what DELTA and RESULT messages carry
        self.mean_cross = isinstance(fed.cross, MeanOfGroups)
        self.cross_numel = self.numel if self.mean_cross else fed.node.flat.n_trainable
        self.cross_psi = 1.0 if self.mean_cross else cfg.hca.psi  # weight of a leader update

    # -- schedule ------------------------------------------------------------------------------
    @property
    def until_epoch(self) -> int:
        """The last round that starts an agreement epoch (0: every round): ``clustering.until``,
        or this process's first round when it began without a partition to keep."""
        if not self.until or self.held_at_start:
            return self.until
        return max(self.until, self.start_round)

    def clusters(self, r: int) -> bool:
        """Whether round ``r`` starts an agreement epoch (a clustering grouper, until reached)."""
        return self.clusterer is not None and (not self.until_epoch or r <= self.until_epoch)

    def epoch_for(self, r: int) -> int | None:
        """The epoch whose partition round ``r`` uses (see :func:`epoch_for`)."""
        return epoch_for(
            r, self.lag, self.start_round, self.until, self.held_at_start, self.first_local
        )

    @property
    def last_epoch(self) -> int:
        """The last epoch any rank can start."""
        return min(self.until_epoch, self.rounds) if self.until_epoch else self.rounds

    # -- messages ------------------------------------------------------------------------------
    def _model(
        self, src: int, kind: int, data: torch.Tensor, length: int, what: str
    ) -> torch.Tensor | None:
        try:
            where = f"rank {self.rank}: {what} from rank {src}"
            check_vector(data, HEADER + length, where)
            problem = header_problem(kind, data[:HEADER].tolist(), self.rounds, self.n)
            if problem:
                raise ReceiveError(f"{where}: {problem}")
        except ReceiveError as err:
            self.fed.transport.rejected.append((src, str(err)))
            # the round the refused buffer stands for: its version when that is readable (one
            # ahead arrives before this node's round gets there), else this node's round
            v = float(data[0]) if data.numel() else float("nan")
            known = whole(v, 1, self.rounds)
            self.refused_in[(src, self._slot(kind))] = int(v) if known else self.current
            return None
        return data

    def _slot(self, kind: int) -> str:
        """What a model message of ``kind`` fills: a clustering view (sketched BACKBONE), a held
        backbone (MIX; BACKBONE unless sketched), a group delta or a leader update."""
        if kind == mb.BACKBONE:
            return "view" if self.sketched else "held"
        return {mb.MIX: "held", mb.DELTA: "delta", mb.RESULT: "result"}[kind]

    def refused(self, j: int, what: str, r: int) -> bool:
        """Whether a refused message of peer ``j`` stands for its ``what`` in round ``r``."""
        got = self.refused_in.get((j, what))
        return got is not None and self.recent(got, r)

    def handle(self, src: int, kind: int, data: Any) -> None:
        """One arrived message (called from :meth:`serve`)."""
        cross = self.cross_numel
        if kind == mb.BACKBONE and self.sketched:
            data = self._model(src, kind, data, self.payload_numel, "clustering view")
            if data is not None and (src not in self.views or int(data[0]) > self.views[src][0]):
                self.views[src] = (int(data[0]), data[HEADER:])
        elif kind in (mb.BACKBONE, mb.MIX):
            extra_numel = 0 if kind == mb.MIX else self.payload_numel
            data = self._model(src, kind, data, self.numel + extra_numel, "backbone")
            if data is None:
                return
            v = int(data[0])
            if src not in self.held or v > self.held[src][0]:
                b = data[HEADER : HEADER + self.numel]
                extra = data[HEADER + self.numel :] if extra_numel > 0 else None
                self.held[src] = (v, b, extra, float(data[3]))
                self.held_tag[src] = (int(data[1]), int(data[2]))
        elif kind == mb.DELTA:
            data = self._model(src, kind, data, cross, "group delta")
            if data is not None and (src not in self.deltas or int(data[0]) > self.deltas[src][0]):
                self.deltas[src] = (int(data[0]), int(data[1]), data[HEADER:])
        elif kind == mb.RESULT:
            data = self._model(src, kind, data, cross, "leader update")
            if data is not None and (
                src not in self.results or int(data[0]) > self.results[src][0]
            ):
                self.results[src] = (int(data[0]), int(data[1]), int(data[2]), data[HEADER:])
        else:
            self._control(src, kind, data)

    def _control(self, src: int, kind: int, data: np.ndarray) -> None:
        """An arrived control message (see :func:`control_problem`)."""
        problem = control_problem(kind, data, self.rounds, self.record_width)
        if problem:
            raise RuntimeError(
                f"rank {self.rank}: a malformed message (kind {kind}) from rank {src}: {problem}"
            )
        if kind == mb.DONE:
            self.done[src] = int(data[0])
            self.done_saved[src] = int(data[1])
        elif kind == mb.PROGRESS:
            if 0 < int(data[0]) <= self.rounds:  # else: not a round, ignored
                self.progress[src] = max(self.progress.get(src, 0), int(data[0]))
        elif kind == mb.STOP:
            self.stop_asked = self.stop_asked or "a stop signal on another rank"
        elif kind == mb.MARKED:
            self.marked = max(self.marked, int(data[0]))
            if self.fed.checkpoints is not None:
                self.fed.checkpoints.prune_before(self.marked)
        elif kind == mb.RECORD and self.rank == 0:
            self.records.setdefault(int(data[0]), {})[src] = data[1:]
        elif kind == mb.CHECKPOINT and self.rank == 0:
            self._saved(src, int(data[0]), int(data[1]))

    def serve(self) -> int:
        """Take in what has arrived; on the writer rank, write the rows that are complete.
        Returns how many messages were taken in."""
        handled = self.mail.poll(self.handle)
        if self.rank == 0:
            self._write_rows()
        return handled

    def drain(self, most: float = CATCH_UP_DRAIN) -> None:
        """Serve until no message is arriving or was just taken in (at most ``most`` seconds).

        Messages from one sender arrive in the order they were sent, and a large one moves only
        while the receiver calls MPI: a node that has trained for a long time finds its peers'
        progress notes queued behind the backbones they posted meanwhile."""
        now = time.perf_counter()
        end, quiet = now + most, now + DRAIN_QUIET
        while now < end:
            if self.serve():
                quiet = now + DRAIN_QUIET
            elif not self.mail.receiving() or now > quiet:
                break  # nothing under way, or a transfer that waits on its busy sender
            now = time.perf_counter()

    def wait(self, ready: Any, what: str, peers: list[int]) -> None:
        """Serve messages until ``ready()`` (bounded by the watchdog)."""

        def check() -> bool:
            self.serve()
            return bool(ready())

        self.fed.topology.watchdog.wait(check, what, peers)

    def recent(self, version: int, r: int) -> bool:
        """Whether a version of round ``version`` may be used in round ``r``: staleness at most
        S (unbounded: any version)."""
        return self.S < 0 or r - version <= self.S

    def _wanted(self, r: int) -> str:
        return "(a first version)" if self.S < 0 else f"of round {r - self.S} or newer"

    def fresh(self, j: int, r: int, view: bool = False) -> bool:
        """Whether the version held of peer ``j`` may be used in round ``r`` (``view``: its
        clustering view, which is the backbone message itself unless sketched)."""
        if view and self.sketched:
            return j in self.views and self.recent(self.views[j][0], r)
        return j in self.held and self.recent(self.held[j][0], r)

    def present(self, j: int, r: int, view: bool = False) -> bool:
        """Whether round ``r`` may go on without waiting more for peer ``j``: a version it may
        use (with unbounded staleness: any version at all), a refused one of the same age, or
        the peer is done."""
        if self.fresh(j, r, view) or j in self.done:
            return True
        return self.refused(j, "view" if view and self.sketched else "held", r)

    def local_training(self, r: int) -> tuple[int, Callable[[int], bool] | None]:
        """Local epochs of round ``r`` and which of them train the head alone (see
        :func:`stages.train`), from the progress notes that have arrived. Behind
        (:func:`behind`), a node trains one epoch (``federation.catch_up_train = "epochs"``,
        decided before the round) or the head alone (``"head"`` and ``"features"``, decided
        before each epoch: a head-only epoch costs less, so a node that falls behind during its
        round switches at once; before the first such epoch it takes the mix of its
        group-mates, :meth:`_pull`)."""
        full = self.fed.config.training.local_epochs
        if not self.catch_up:
            return full, None
        if self.fed.config.federation.catch_up_train == "epochs":
            self.drain()
            newest = max(self.progress.values(), default=0)
            return catch_up_epochs(r, full, self.catch_up, newest), None
        pulled = False

        def head_only(_epoch: int) -> bool:
            nonlocal pulled
            self.drain()
            if not behind(r, self.catch_up, max(self.progress.values(), default=0)):
                return False
            if not pulled:
                self._pull(r)
                pulled = True
            return True

        return full, head_only

    def deadline(self, r: int) -> Callable[[], bool] | None:
        """``federation.lockstep_deadline``: in a round whose partition is agreed from every
        node's proposal of that same round (:meth:`epoch_for` is ``r``), a test asked after each
        training step that is True once every neighbour has posted its backbone (clustering
        view) of round ``r`` or later, had one of that round refused, or is done: all of them
        then wait for this node's view and proposal, so it stops training. None in the other
        rounds (nobody waits for this node's training there)."""
        if not self.fed.config.federation.lockstep_deadline:
            return None
        if not self.clusters(r) or self.epoch_for(r) != r:
            return None
        neighbours = self.fed.topology.neighbours
        slot = "view" if self.sketched else "held"
        kept = self.views if self.sketched else self.held

        def posted(j: int) -> bool:
            if j in self.done or (j in kept and kept[j][0] >= r):
                return True
            return self.refused_in.get((j, slot), 0) >= r

        return lambda: bool(neighbours) and all(posted(j) for j in neighbours)

    # -- the round -----------------------------------------------------------------------------
    def round(self, r: int) -> RoundContext:
        """Round ``r`` of this node (see the module text)."""
        fed, topo = self.fed, self.fed.topology
        watchdog = topo.watchdog
        ctx = RoundContext(r, self.n)
        self.current = r
        self._new_counters()
        t_round = time.perf_counter()

        def stage(name: str) -> float:
            watchdog.at(r, name)
            test_hook(f"stage.{name}", r, self.rank)
            return time.perf_counter()

        t = stage("local_train")
        stop = self.deadline(r)
        stages.train(fed, ctx, *self.local_training(r), idle=self.serve, stop=stop)
        ctx.seconds["local_train"] = time.perf_counter() - t
        if stop is not None and ctx.trained < 1.0:
            fed.log(
                f"rank {self.rank}: round {r}: every neighbour waits for this node's proposal; "
                f"local training stopped at {ctx.trained:.0%} of its steps"
            )
        self.serve()
        groups = self._exchange_and_group(ctx)
        t = stage("intra")
        self._mix(ctx, groups)
        ctx.seconds["intra"] = time.perf_counter() - t
        t = stage("cross")
        if self._cross(ctx):
            ctx.seconds["cross"] = time.perf_counter() - t
        t = stage("evaluate")
        stages.evaluate(fed, ctx)
        self.refusals_counted = len(fed.transport.rejected)
        ctx.seconds["evaluate"] = time.perf_counter() - t
        ctx.seconds["total"] = time.perf_counter() - t_round
        ctx.clock = time.perf_counter() - fed.clock0
        watchdog.round_finished(ctx.seconds["total"])
        fed.state.finish_round(r, ctx.groups)
        return ctx

    def _new_counters(self) -> None:
        """Start the counters of a new round with what came after the last record counted
        (messages refused, sent and taken in between rounds, while a node records, saves its
        checkpoint and serves), so that every refusal and byte is in some round's record."""
        tr = self.fed.transport
        sent, received = self.bytes_counted
        late = tr.rejected[self.refusals_counted :]
        late_sent, late_received = tr.bytes_sent - sent, tr.bytes_received - received
        tr.reset_counters()
        tr.rejected.extend(late)
        tr.bytes_sent, tr.bytes_received = late_sent, late_received
        self.refusals_counted, self.bytes_counted = 0, (0, 0)

    def _pull(self, r: int) -> None:
        """Before the first epoch of round ``r`` that trains the head alone: take the
        staleness-weighted mix of the own backbone and the newest versions held of the last
        partition's group-mates (weighed as in step 4; before any round had groups, those of the
        partition this round will use, once agreed). The backbone does not change while the
        head trains, so the head learns on the backbone the round ends near instead of the one
        it started from."""
        fed = self.fed
        groups = fed.state.home_groups
        if not fed.state.has_partition:
            # no round had groups yet (federation.first_round = "local"): the partition this
            # round will use, if its agreement has finished; else none to pull from
            e = self.epoch_for(r)
            if not e or not self.agreement.ready(e):
                return
            groups = self._agreed(e, r)
        mates = [
            int(j)
            for j in np.flatnonzero(groups == groups[self.rank])
            if j != self.rank and int(j) in fed.topology.neighbours and self.fresh(int(j), r)
        ]
        if fed.intra is None or not mates:
            return
        mix, _ = self._weighted_mix(fed.node.flat.pack(), mates, r)
        fed.node.flat.unpack(mix, keep_batchnorm=fed.config.federation.local_bn)

    def _weighted_mix(
        self, own: torch.Tensor, peers: list[int], r: int, start: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[float]]:
        """The mix of step 4 in round ``r``: ``own`` (the node's FedAvg weight, age 0) and the
        newest held versions of ``peers``, weighted ``w_j * staleness_decay ** (r - v_j)``.
        Returns the mix (``own``'s dtype) and the weights, own first. With a robust intra rule
        (``defense.aggregation``, or the scheme's) the rule combines the versions' updates
        from ``start`` (this node's start of the round; None: ``own``) instead, the weights
        going to the rules that take weights (``norm_clipped_mean``)."""
        rows = [own, *(self.held[j][1] for j in peers)]
        age = [0, *(r - self.held[j][0] for j in peers)]
        base = [self.fed.weight(), *(self.held[j][3] for j in peers)]
        w = staleness_weights(base, age, self.fed.config.federation.staleness_decay)
        intra = self.fed.intra
        if not isinstance(intra, GatheredRule) or intra.rule == "mean":
            return streamed_average(rows, w).to(own.dtype), w
        ref = (own if start is None else start).double()
        updates = torch.stack([row.double() - ref for row in rows])
        return (ref + intra.combine(updates, w)).to(own.dtype), w

    def _exchange_and_group(self, ctx: RoundContext) -> np.ndarray:
        """Post the backbone, propose (in clustering rounds), take the round's partition."""
        fed, r = self.fed, ctx.r
        watchdog = fed.topology.watchdog
        t = time.perf_counter()
        watchdog.at(r, "exchange")
        neighbours = fed.topology.neighbours
        if fed.grouper is not None:
            ctx.payload = fed.grouper.payload(ctx, ctx.own)
            extra = [] if ctx.payload is None else [ctx.payload.to(ctx.own.device).reshape(-1)]
            assert (0 if ctx.payload is None else ctx.payload.numel()) == self.payload_numel
            head = self._backbone_head(ctx)
            live = [j for j in neighbours if j not in self.done]
            sent = fed.attack.upload(r, ctx.own)  # attack.kind = "bad_buffer": a corrupted copy
            body = torch.cat([head, *extra] if self.sketched else [head, sent, *extra])
            if corrupt_hook(r, self.rank):
                body[HEADER] = float("nan")
            self.mail.post(live, mb.BACKBONE, body, latest=True)
        propose = self.clusters(r)
        if self.deferred is not None:  # round 1's proposal first (epochs start in order)
            self._wait_for_views(self.deferred.r, neighbours)
        elif propose and self.epoch_for(r) == 0:
            # first_round = "local": round 1 needs no partition, so it does not wait for the
            # views of neighbours not heard from yet; it proposes once it holds them
            if not all(self.present(j, r, view=True) for j in neighbours):
                self.deferred, propose = ctx, False
        if propose:
            self._wait_for_views(r, neighbours)
        ctx.seconds["exchange"] = time.perf_counter() - t
        t = time.perf_counter()
        watchdog.at(r, "clustering")
        if self.deferred is not None and self.deferred is not ctx:
            self._propose(self.deferred, neighbours)
            self.deferred = None
        if propose:
            self._propose(ctx, neighbours)
        groups = self._partition(ctx)
        ctx.groups = groups
        ctx.leaders = leader_flags(groups, r)
        ctx.seconds["clustering"] = time.perf_counter() - t
        if self.sketched and fed.intra is not None and groups[self.rank] >= 0:
            # the mates of this round's partition (the same on every rank) mix whole backbones
            same = np.flatnonzero(groups == groups[self.rank])
            mates = [int(j) for j in same if int(j) in neighbours and j != self.rank]
            self.mail.post(
                [j for j in mates if j not in self.done],
                mb.MIX,
                torch.cat([self._backbone_head(ctx), fed.attack.upload(r, ctx.own)]),
                latest=True,
            )
        return groups

    def _wait_for_views(self, r: int, neighbours: list[int]) -> None:
        """Wait until every neighbour's view may be used by a proposal of round ``r``."""
        self.wait(
            lambda: all(self.present(j, r, view=True) for j in neighbours),
            f"its neighbours' {'views' if self.sketched else 'backbones'} {self._wanted(r)}",
            neighbours,
        )

    def _propose(self, ctx: RoundContext, neighbours: list[int]) -> None:
        """Round ``ctx.r``'s proposal from the views held, and the start of its agreement."""
        assert self.clusterer is not None
        self._view(ctx, neighbours)
        ctx.view_own = ctx.own
        self.clusterer.propose(ctx)
        assert ctx.proposal is not None
        self.agreement.start(ctx.r, np.concatenate([ctx.proposal, [0]]))

    def _backbone_head(self, ctx: RoundContext) -> torch.Tensor:
        """The header of this round's BACKBONE and MIX messages (see :data:`HEADER`)."""
        return ctx.own.new_tensor([ctx.r, *self.applied, self.fed.weight()])

    def _view(self, ctx: RoundContext, peers: list[int]) -> None:
        """The held versions of ``peers`` that round ``ctx.r`` may use, as the context's
        received backbones and payloads; their staleness goes to the record."""
        ctx.received, ctx.payloads = {}, {}
        for j in peers:
            if not self.fresh(j, ctx.r, view=True):
                continue
            if self.sketched:
                v, ctx.payloads[j] = self.views[j]
            else:
                v, b, extra, _ = self.held[j]
                ctx.received[j] = b
                if extra is not None:
                    ctx.payloads[j] = extra
            ctx.staleness[j] = ctx.r - v

    def _partition(self, ctx: RoundContext) -> np.ndarray:
        """Round ``r``'s partition: fixed groups, the agreed epoch, or the last one kept."""
        fed, r = self.fed, ctx.r
        if fed.grouper is None:
            ctx.k = 0
            return np.arange(self.n, dtype=np.int64)
        if self.clusterer is None:
            fed.grouper.assign(ctx)  # the true task groups: no collective
            return ctx.groups
        e = self.epoch_for(r)
        if e is None:
            stages.keep_partition(fed, ctx)
            return ctx.groups
        if e == 0:  # federation.first_round = "local": in no group before the first partition
            ctx.k = 0
            return np.full(self.n, -1, dtype=np.int64)
        self.wait(
            lambda: self.agreement.ready(e),
            f"every rank's grouping proposal of round {e}",
            [j for j in range(self.n) if j != self.rank],
        )
        ctx.groups = self._agreed(e, r)
        if ctx.proposal is None:  # this round proposed nothing: K of the partition used
            ctx.k = int(np.unique(ctx.groups[ctx.groups >= 0]).size)
        return ctx.groups

    def _agreed(self, e: int, r: int) -> np.ndarray:
        """The partition of the finished agreement epoch ``e`` as round ``r`` uses it (the
        same on every rank: ranks that had stopped are left out)."""
        assert self.clusterer is not None
        table = self.agreement.results[e]
        scratch = RoundContext(r, self.n)
        scratch.quarantined = table[:, -1].astype(bool)
        self.clusterer.settle(scratch, table[:, :-1])  # sets scratch.groups only
        return scratch.groups

    def _mix(self, ctx: RoundContext, groups: np.ndarray) -> None:
        """Staleness-weighted mean of the group-mates' newest versions and the own backbone."""
        fed, r = self.fed, ctx.r
        ctx.new = ctx.own
        self.mixed = {self.rank: (1.0, r, self.applied, ctx.own)}
        mates = [int(j) for j in np.flatnonzero(groups == groups[self.rank]) if j != self.rank]
        mates = [j for j in mates if j in fed.topology.neighbours]
        if fed.intra is not None and mates and groups[self.rank] >= 0:
            self.wait(
                lambda: all(self.present(j, r) for j in mates),
                f"its group-mates' backbones {self._wanted(r)}",
                mates,
            )
            used = [j for j in mates if self.fresh(j, r)]
            if used:
                for j in used:
                    ctx.staleness[j] = r - self.held[j][0]
                ctx.new, w = self._weighted_mix(ctx.own, used, r, ctx.start)
                self.mixed = {self.rank: (w[0], r, self.applied, ctx.own)}
                for j, wj in zip(used, w[1:], strict=True):
                    self.mixed[j] = (wj, self.held[j][0], self.held_tag[j], self.held[j][1])
        ctx.intra_new = ctx.new

    def _cross(self, ctx: RoundContext) -> bool:
        """Leaders: HCA over the newest group deltas (``mean``: the mean of the newest group
        backbones); members: the newest leader update, or, with ``federation.leader_stand_in``
        and a leader that has not trained the round, what a leader would compute
        (:meth:`_lead`); with that option, otherwise the leader's update of the round."""
        fed, r = self.fed, ctx.r
        groups = ctx.groups
        labels = np.unique(groups[groups >= 0])
        ctx.n_groups = int(labels.size)
        mine = int(groups[self.rank])
        if not fed.cross.active or ctx.n_groups < 2 or mine < 0:
            return False
        ctx.cross_ran = True
        stamp = partition_stamp(groups)
        members = [int(j) for j in np.flatnonzero(groups == mine) if j != self.rank]
        if ctx.leaders[self.rank]:
            update = self._lead(ctx, labels, mine, stamp)
            flag = 0.0 if update is None else 1.0
            body = update if update is not None else ctx.intra_new.new_zeros(self.cross_numel)
            if corrupt_hook(r, self.rank, "result"):
                body = body.clone()
                body[0] = float("nan")
            self.mail.post(
                [j for j in members if j not in self.done],
                mb.RESULT,
                torch.cat([body.new_tensor([r, stamp, flag, 0]), body]),
            )
            self.applied = (r, self.rank)
            ctx.leader_staleness = 0.0
            return True
        leader = int(np.flatnonzero(ctx.leaders & (groups == mine))[0])
        if self.stands_in(leader, r):
            self._lead(ctx, labels, mine, stamp)
            # this node holds its group's update of round r now: the leader's own result of
            # round r, when it comes, is not applied on top of it
            self.applied = (r, leader)
            ctx.stood_in = True
            ctx.leader_staleness = 0.0
            if not self.stood_in_before:
                self.stood_in_before = True
                fed.log(
                    f"rank {self.rank}: round {r}: its leader (rank {leader}) has not trained "
                    "this round yet; this node stands in for it (federation.leader_stand_in; "
                    "said once)"
                )
            return True

        def held_result() -> tuple[int, int] | None:
            found = [
                (self.results[j][0], j)
                for j in members
                if j in self.results and self.results[j][1] == stamp
            ]
            return max(found) if found else None

        # leader_stand_in: a neighbour leader has trained round r (else this node stood in),
        # so its update of round r is on its way: wait for that one rather than go on without
        # any (a leader that is not a neighbour may be far behind: the rule of S holds there)
        on_its_way = self.stand_in and leader in fed.topology.neighbours
        newest_round = r if on_its_way else -1

        def ready() -> bool:
            got = held_result()
            if got is not None and self.recent(got[0], r) and got[0] >= newest_round:
                return True
            return leader in self.done or self.refused(leader, "result", r)

        self.wait(ready, f"the update of its leader (rank {leader})", [leader])
        got = held_result()
        if got is not None and self.recent(got[0], r) and got > self.applied:
            v, _, flag, update = self.results[got[1]]
            # mixed versions that had applied this update (or a newer one) already carry it:
            # add it for the rest of the mix only, so that it counts once
            mixed = list(self.mixed.values())
            share = uncarried_share([m[0] for m in mixed], [m[2] for m in mixed], got)
            if flag and share > 0.0:
                ctx.new = apply_update(
                    ctx.intra_new, update, self.cross_psi * share, self.cross_numel
                )
            ctx.leader_staleness = float(r - v)
            self.applied = got
        return True

    def stands_in(self, leader: int, r: int) -> bool:
        """``federation.leader_stand_in``: whether this member of a group led by ``leader`` in
        round ``r`` computes the cross-group update itself. True when the leader is a neighbour
        (its versions and progress notes arrive here) that is done, or whose newest round
        heard of (backbone, clustering view or progress note) is before ``r``: it has not
        trained round ``r`` yet, so its update of round ``r`` would come after this node's
        round, too late to be applied (a member applies only updates newer than its last).
        At S = 0 a leader has always posted round ``r`` before its members mix."""
        if not self.stand_in or leader not in self.fed.topology.neighbours:
            return False
        if leader in self.done:
            return self.done[leader] < r
        heard = [self.progress.get(leader, 0)]
        heard += [kept[leader][0] for kept in (self.held, self.views) if leader in kept]
        return max(heard) < r

    def _lead(
        self, ctx: RoundContext, labels: np.ndarray, mine: int, stamp: int
    ) -> torch.Tensor | None:
        """A leader's part of step 5 (also a stand-in's): post this group's delta (``mean``:
        its backbone) to every node outside the group, wait for the other groups' newest ones
        (staleness at most S), and aggregate them into ``ctx.new``. Returns the update (None
        when no other group's delta could be used); ``stamp``: the partition's."""
        r, groups = ctx.r, ctx.groups
        p = self.fed.node.flat.n_trainable
        others = [int(j) for j in np.flatnonzero((groups >= 0) & (groups != mine))]
        mix = self._round_mix(ctx)
        delta = mix if self.mean_cross else group_delta(mix, ctx.start, p)
        head = delta.new_tensor([r, stamp, 1, 0])
        body = torch.cat([head, delta])
        if corrupt_hook(r, self.rank, "delta"):
            body[HEADER] = float("nan")
        self.mail.post([j for j in others if j not in self.done], mb.DELTA, body)
        need = [int(h) for h in labels if h != mine]

        def newest(h: int) -> tuple[int, int] | None:
            """(round, sender) of the newest delta of group h under this partition."""
            found = [
                (self.deltas[j][0], j)
                for j in map(int, np.flatnonzero(groups == h))
                if j in self.deltas and self.deltas[j][1] == stamp
            ]
            return max(found) if found else None

        def delta_ready(h: int) -> bool:
            got = newest(h)
            if got is not None and self.recent(got[0], r):
                return True
            group = [int(j) for j in np.flatnonzero(groups == h)]
            if any(self.refused(j, "delta", r) for j in group):
                return True  # that group's delta was refused: HCA goes on without it
            return all(j in self.done for j in group)

        self.wait(lambda: all(delta_ready(h) for h in need), "the other groups' deltas", others)
        rows: list[torch.Tensor] = []
        row = 0
        for h in labels:
            if h == mine:
                row = len(rows)
                rows.append(delta)
                continue
            got = newest(int(h))
            if got is not None and self.recent(got[0], r):
                rows.append(self.deltas[got[1]][2])
                ctx.delta_staleness[got[1]] = r - got[0]
        if len(rows) < 2:
            return None
        ctx.row = row
        ctx.deltas = torch.stack(rows)
        return self._mean_of_groups(ctx) if self.mean_cross else self._hca(ctx)

    def _round_mix(self, ctx: RoundContext) -> torch.Tensor:
        """The leader's mix for its group delta: of the versions mixed, those not ahead of its
        round (the own one always), so that the delta is the group's progress of about one
        round, not the several rounds of faster group-mates (the node itself keeps the full
        mix). With ``federation.leader_stand_in``, those of its round only: a stale version
        minus this round's start is not progress but the way back to an older backbone."""
        low = ctx.r if self.stand_in else 0
        keep = [m for m in self.mixed.values() if low <= m[1] <= ctx.r]
        if len(keep) == len(self.mixed):
            return ctx.intra_new
        rows = [row for _, _, _, row in keep]
        return streamed_average(rows, [w for w, _, _, _ in keep]).to(ctx.own.dtype)

    def _mean_of_groups(self, ctx: RoundContext) -> torch.Tensor:
        """The ``mean`` cross aggregator over the group backbones in ``ctx.deltas``: the update
        (their equal-weight mean minus this group's), added to the leader's own mix."""
        assert ctx.deltas is not None
        rows = ctx.deltas
        update = (weighted_average(rows.double()) - rows[ctx.row].double()).to(rows.dtype)
        ctx.new = apply_update(ctx.intra_new, update, self.cross_psi, self.cross_numel)
        return update

    def _hca(self, ctx: RoundContext) -> torch.Tensor | None:
        """HCA over ``ctx.deltas``: the update (None when it cannot run); the new backbone in
        ``ctx.new`` and the solver's figures in ``ctx.hca``."""
        fed = self.fed
        cfg = fed.config.hca
        assert ctx.deltas is not None
        res = hca_update(ctx.deltas.double(), alpha=cfg.alpha)
        update = res.update.to(ctx.intra_new.dtype)
        ctx.new = apply_update(ctx.intra_new, update, cfg.psi, fed.node.flat.n_trainable)
        if not res.solver_ok:
            fed.log(f"round {ctx.r}: HCA solver failed ({res.message}); used uniform weights")
        ctx.hca = {
            "hca/weights": float(res.weights[ctx.row]),
            "hca/mean_delta_norm": res.mean_delta_norm,
            "hca/update_norm": res.update_norm,
            "hca/solver_ok": int(res.solver_ok),
        }
        return update

    # -- records and checkpoints --------------------------------------------------------------
    def record(self, ctx: RoundContext) -> None:
        """This node-round's record to the writer rank (point-to-point)."""
        packed = self.fed.spec.pack(round_values(self.fed, ctx))
        tr = self.fed.transport
        self.bytes_counted = (tr.bytes_sent, tr.bytes_received)
        if self.rank == 0:
            self.records.setdefault(ctx.r, {})[0] = packed
        else:
            extra = [0.0] if corrupt_hook(ctx.r, self.rank, "record") else []
            self.mail.post([0], mb.RECORD, np.concatenate([[ctx.r], packed, extra]))

    def _write_rows(self) -> None:
        """Writer rank: append every complete row in order (a node done before a round leaves
        that round's entries at their defaults)."""
        fed = self.fed
        while self.next_row <= self.rounds:
            r = self.next_row
            if len(self.done) == self.n and r > max(self.done.values()):
                break  # every node is done before this round: no row
            got = self.records.get(r, {})
            missing = [j for j in range(self.n) if j not in got]
            if any(j not in self.done or self.done[j] >= r for j in missing):
                break
            blank = fed.spec.pack({})
            gathered = np.stack([got.get(j, blank) for j in range(self.n)])
            unpacked = fed.spec.unpack(gathered)
            groups = unpacked["round/group"].astype(np.int64)
            present = groups >= 0
            ari = float("nan")
            if fed.grouper is not None and present.any():
                ari = adjusted_rand(fed.true_labels[present], groups[present])
            append_row(fed, r, gathered, ari, self._shown(unpacked))
            self.records.pop(r, None)
            self.next_row = r + 1
        self._mark_checkpoints()

    def _shown(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The test metrics the job log gives for a row: a node that did not run the round (it
        had finished) with its last evaluation, as ``colnet-mpi report`` counts it."""
        ran = ~np.isnan(row["round/clock"].astype(float))
        shown = {}
        for name in ("round/test_loss", "round/test_f1_micro"):
            last = self.last_evaluation.get(name, np.full(self.n, np.nan))
            shown[name], self.last_evaluation[name] = carry_forward(last, row[name], ran)
        return shown

    def save(self, r: int) -> None:
        """This node's checkpoint of round ``r``; the writer rank is told its size."""
        fed = self.fed
        assert fed.checkpoints is not None
        t0 = time.perf_counter()
        fed.checkpoints.save(r, fed.state_dict(), {"backbone_checksum": backbone_checksum(fed)})
        fed.saved_round = r
        message = np.array([r, fed.checkpoints.last_bytes], dtype=np.int64)
        if self.rank == 0:
            self._saved(0, r, int(message[1]))
        else:
            self.mail.post([0], mb.CHECKPOINT, message)
        fed.checkpoint_seconds += time.perf_counter() - t0

    def _saved(self, rank: int, r: int, nbytes: int) -> None:
        self.saved.setdefault(r, {})[rank] = nbytes
        self.saved_by[rank] = max(self.saved_by.get(rank, 0), r)

    def _mark_checkpoints(self) -> None:
        """Writer rank: name in the file the newest round that every rank has saved and whose
        row is written; tell every rank, so that each removes its older files."""
        fed = self.fed
        complete = [
            r for r, ranks in self.saved.items() if len(ranks) == self.n and r < self.next_row
        ]
        if not complete or max(complete) <= self.marked:
            return
        r = max(complete)
        if fed.writer is not None and fed.checkpoints is not None:
            directory = str(fed.checkpoints.directory.resolve())
            fed.writer.mark_checkpoint(r, directory, sum(self.saved[r].values()))
        self.marked = r
        for old in [k for k in self.saved if k <= r]:
            del self.saved[old]
        others = [j for j in range(1, self.n)]
        self.mail.post(others, mb.MARKED, np.array([r], dtype=np.int64))
        if fed.checkpoints is not None:
            fed.checkpoints.prune_before(r)

    # -- the run -------------------------------------------------------------------------------
    def _stop_reason(self, r: int) -> str:
        fed = self.fed
        budget = fed.config.federation.time_budget
        if fed.stop is not None and fed.stop.received and not self.stop_asked:
            self.stop_asked = fed.stop.received
            self.mail.post(
                [j for j in range(self.n) if j != self.rank], mb.STOP, np.zeros(1, np.int64)
            )
        if self.stop_asked:
            return "stop"
        if budget and time.perf_counter() - fed.clock0 >= budget:
            return "budget"
        return ""

    def run(self, start_round: int = 1) -> None:
        """This node's rounds from ``start_round``, then the closing handshake."""
        fed = self.fed
        self.start_round = start_round
        self.held_at_start = start_round > 1 and fed.state.has_partition
        self.next_row = start_round
        every = fed.config.run.checkpoint_every
        fed.saved_round = start_round - 1
        self.marked = start_round - 1
        why = ""
        last = start_round - 1
        try:
            for r in range(start_round, self.rounds + 1):
                why = self._stop_reason(r)
                if why:
                    break
                ctx = self.round(r)
                last = r
                fed.topology.watchdog.at(r, "record")
                self.record(ctx)
                if self.catch_up:
                    live = [j for j in fed.topology.neighbours if j not in self.done]
                    self.mail.post(live, mb.PROGRESS, np.array([r], dtype=np.int64))
                if fed.checkpoints is not None and every and (r % every == 0 or r == self.rounds):
                    fed.topology.watchdog.at(r, "checkpoint")
                    self.save(r)
                self.serve()
            self._finish(last, why)
        finally:
            self.mail.free()
            self.agreement.free()
        if why == "stop":
            raise Preempted(f"{self.stop_asked} after round {last}")
        if why == "budget":
            fed.log(f"rank {self.rank}: time budget reached after round {last}")

    def _finish(self, last: int, why: str) -> None:
        """Tell every rank this one is done, join the epochs the others will still start, and
        serve until every rank is done and (writer rank) every row is written."""
        fed, topo = self.fed, self.fed.topology
        if why == "stop" and fed.checkpoints is not None and fed.saved_round < last:
            self.save(last)
        self.done[self.rank] = last
        self.done_saved[self.rank] = fed.saved_round
        others = [j for j in range(self.n) if j != self.rank]
        self.mail.post(others, mb.DONE, np.array([last, fed.saved_round], dtype=np.int64))
        if self.clusterer is not None:
            stopped = np.concatenate([np.full(self.n, -1, dtype=np.int64), [1]])
            # (from this process's first round: a proposal put off in round 1 may be unmade)
            for e in range(self.start_round, self.last_epoch + 1):
                if not self.agreement.started(e):
                    self.agreement.start(e, stopped)
        topo.watchdog.at(last, "finishing")

        def finished() -> bool:
            if len(self.done) < self.n or self.agreement.pending():
                return False
            if self.rank == 0:
                if self.next_row <= max(self.done.values()):
                    return False  # rows still to write
                if any(self.saved_by.get(j, 0) < s for j, s in self.done_saved.items()):
                    return False  # checkpoint notes still to come
                self._mark_checkpoints()
            if self.mail.sending():
                return False
            return self.mail.closing()

        self.wait(finished, "every rank to finish its rounds", others)
