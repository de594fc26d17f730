"""The stages of a round, in order. Each takes the federation and the round's context and
returns whether it ran (a stage the scheme skips is recorded as 0 s); the strategies (grouper,
intra and cross aggregators) and the defenses do the choosing inside.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from colnet_mpi.algorithms.clustering import canonical_labels, leader_flags
from colnet_mpi.comm.buffers import checksum
from colnet_mpi.federation.context import RoundContext
from colnet_mpi.metrics.names import METRIC_NAMES
from colnet_mpi.node import return_free_memory

if TYPE_CHECKING:
    from colnet_mpi.config import Config
    from colnet_mpi.federation.loop import Federation


#: Seconds between two calls of the idle callback while an emulated straggler waits.
IDLE_SLICE = 0.02
#: With ``training.epoch_seconds``, the share of an epoch's paced seconds over which its
#: training steps are spread (:func:`step_pace`); the rest is left for its validation.
STEP_SHARE = 0.9
#: A local epoch that takes at least this long gets a progress line (rank 0's, in the job log),
#: so that a long GPU round does not look hung.
EPOCH_LINE_SECONDS = 10.0


def epoch_line(
    r: int, rounds: int, epoch: int, epochs: int, losses: tuple[float, float], seconds: float
) -> str:
    """The progress line of one long local epoch."""
    return (
        f"  round {r}/{rounds} epoch {epoch}/{epochs}: train loss {losses[0]:.4g}, "
        f"val loss {losses[1]:.4g} ({seconds:.1f}s on rank 0)"
    )


def straggler(
    fed: Federation, on_cpu: bool, idle: Callable[[], object] | None = None
) -> Callable[..., float]:
    """The simulation aids for stragglers on one machine, applied after each local epoch:
    ``[[nodes]] slowdown`` alone stretches the epoch to ``slowdown`` times its work (on CPU its
    CPU time, so that ranks sharing the cores do not make the simulated hardware slower still);
    with ``training.epoch_seconds`` the epoch lasts ``slowdown x epoch_seconds x cost`` of wall
    time (one device of a set speed per node; ``cost``, given with each epoch: its work as a
    fraction of a full epoch's, below 1 for an epoch of the head alone). Returns the epoch's
    seconds after the wait. ``idle`` (asynchronous mode: serving the mailbox) is called every
    :data:`IDLE_SLICE` seconds of the wait instead of sleeping through it."""
    slowdown = fed.config.nodes[fed.topology.rank].slowdown
    full_pace = fed.config.training.epoch_seconds * slowdown
    cpu_mark = time.process_time()
    warned = False

    def stretch(seconds: float, cost: float = 1.0) -> float:
        nonlocal cpu_mark, warned
        pace = full_pace * cost
        if pace > 0.0:
            if seconds > pace and not warned:
                warned = True
                fed.log(
                    f"rank {fed.topology.rank}: a local epoch took {seconds:.2f} s, more than "
                    f"the {pace:.2f} s that training.epoch_seconds x slowdown allows; the "
                    "emulated pace is not held (raise training.epoch_seconds)"
                )
            wait = max(0.0, pace - seconds)
        elif slowdown > 1.0:
            work = time.process_time() - cpu_mark if on_cpu else seconds
            wait = (slowdown - 1.0) * work
        else:
            return seconds
        sleep_until(time.perf_counter() + wait, idle)
        cpu_mark = time.process_time()
        return seconds + wait

    return stretch


def sleep_until(end: float, idle: Callable[[], object] | None = None) -> None:
    """Wait until ``time.perf_counter()`` reaches ``end``, calling ``idle`` every
    :data:`IDLE_SLICE` seconds (without ``idle``: one sleep)."""
    while (left := end - time.perf_counter()) > 0.0:
        if idle is not None:
            idle()
        time.sleep(min(left, IDLE_SLICE) if idle is not None else left)


def step_pace(
    fed: Federation, idle: Callable[[], object] | None = None
) -> Callable[[float, float, float], None] | None:
    """With ``training.epoch_seconds``, the emulated device's pace inside an epoch: called
    after each training step as ``pace(started, share, cost)`` (the epoch's start, the share of
    its steps taken, its cost as in :func:`straggler`), it waits until that share of the epoch's
    paced seconds (of its first :data:`STEP_SHARE`) has passed, so that the work of an epoch is
    spread over it as on a device of that speed (what the node has trained by any time is what
    such a device would have). The epoch's end is still paced by :func:`straggler`. None
    without ``epoch_seconds``."""
    slowdown = fed.config.nodes[fed.topology.rank].slowdown
    full_pace = fed.config.training.epoch_seconds * slowdown
    if full_pace <= 0.0:
        return None

    def pace(started: float, share: float, cost: float) -> None:
        sleep_until(started + STEP_SHARE * full_pace * cost * min(share, 1.0), idle)

    return pace


def train(
    fed: Federation,
    ctx: RoundContext,
    epochs: int | None = None,
    head_only: Callable[[int], bool] | None = None,
    idle: Callable[[], object] | None = None,
    stop: Callable[[], bool] | None = None,
) -> bool:
    """Stage 1: local training (attack hooks: poisoned batches, then boost / weight clipping).

    ``epochs``: fewer than ``training.local_epochs`` (asynchronous catch-up); the epochs not
    trained are recorded as NaN. ``head_only(epoch)`` (asynchronous catch-up of the head),
    asked before each epoch: True for an epoch in which the backbone stays frozen and only the
    private head learns (counted in ``ctx.head_epochs``; paced at its cost, which the node
    reports in ``node.epoch_costs``: lower still on stored features). ``idle``
    (asynchronous mode: serving the mailbox) is called after every training step and while an
    emulated straggler waits, so that messages keep moving while the node trains. ``stop()``
    (asynchronous ``federation.lockstep_deadline``), asked after every training step: True ends
    the local training there. The share of the round's full local training steps taken goes to
    ``ctx.trained``."""
    node, attack, r = fed.node, fed.attack, ctx.r
    t = fed.config.training
    epochs = t.local_epochs if epochs is None else epochs
    stretch = straggler(fed, node.device.type == "cpu", idle)
    alone: list[bool] = []

    def decide(epoch: int) -> bool:
        alone.append(head_only is not None and head_only(epoch))
        return alone[-1]

    def progress(epoch: int, train_loss: float, val_loss: float, seconds: float) -> None:
        cost = node.epoch_costs[epoch - 1] if t.epoch_seconds else 1.0
        seconds = stretch(seconds, cost)
        if seconds >= EPOCH_LINE_SECONDS:
            fed.log(epoch_line(r, t.rounds, epoch, epochs, (train_loss, val_loss), seconds))

    pace = step_pace(fed, idle)

    def after_step(started: float, share: float, cost: float) -> bool:
        if pace is not None:
            pace(started, share, cost)
        return stop is not None and stop()

    ctx.start = node.flat.pack().clone()
    hook = attack.batch_hook(r, node.backbone, node.head)
    per_step = after_step if pace is not None or stop is not None else None
    train_loss, val_loss = node.train_local(epochs, hook, progress, decide, idle, per_step)
    ctx.head_epochs = sum(alone)
    full = t.local_epochs * len(node.train_loader)
    ctx.trained = node.steps_taken / full if full else 1.0
    missing = [math.nan] * (t.local_epochs - len(train_loss))
    ctx.train_loss, ctx.val_loss = train_loss + missing, val_loss + missing
    attack.after_training(r, ctx.start, node.flat, (node.backbone, node.head), node.train_loader)
    ctx.own = ctx.new = node.flat.pack()
    return True


def exchange(fed: Federation, ctx: RoundContext) -> bool:
    """Stage 2: one buffer to each neighbour, theirs back; refused buffers are left out of
    everything that follows."""
    if fed.grouper is None:
        return False
    upload = fed.attack.upload(ctx.r, ctx.own)
    expected = None if upload is ctx.own else ctx.own.numel()
    ctx.payload = fed.grouper.payload(ctx, upload)
    if ctx.payload is None:
        ctx.received = fed.transport.exchange(upload, expected=expected)
        return True
    if not getattr(fed.grouper, "sends_backbone", True):
        # clustering.backbone_sketch: the payload (with a sketch of the backbone) travels alone
        mine = ctx.payload.to(upload.device)
        ctx.payloads = fed.transport.exchange(
            mine, expected=None if expected is None else mine.numel()
        )
        ctx.received = {}
        return True
    # one buffer per neighbour: the backbone, then what the grouper sends with it
    n, extra = ctx.own.numel(), ctx.payload.numel()
    both = torch.cat([upload.reshape(-1), ctx.payload.to(upload.device)])
    got = fed.transport.exchange(both, expected=None if expected is None else n + extra)
    ctx.received = {j: v[:n] for j, v in got.items()}
    ctx.payloads = {j: v[n:] for j, v in got.items()}
    return True


def group(fed: Federation, ctx: RoundContext) -> bool:
    """Stage 3a/3b: screening, the grouper's agreed partition, leaders, group communicators."""
    if fed.grouper is None:
        return False
    ctx.view_own = ctx.own
    if fed.config.defense.screening:
        fed.defense.prescreen(ctx)
    if frozen(fed.config, ctx.r, fed.state.round):
        keep_partition(fed, ctx)
    else:
        fed.grouper.assign(ctx)
    ctx.leaders = leader_flags(ctx.groups, ctx.r)
    fed.topology.set_groups(ctx.groups, ctx.leaders)
    return True


def frozen(config: Config, r: int, finished: int) -> bool:
    """Whether round ``r`` keeps the last partition (``clustering.until``) instead of clustering;
    never before a round has finished on this rank."""
    until = config.clustering.until
    return bool(until) and r > until and finished > 0


def keep_partition(fed: Federation, ctx: RoundContext) -> None:
    """The last finished round's partition (quarantined nodes: -1) as this round's."""
    groups = canonical_labels(fed.state.home_groups)
    ctx.groups = np.where(ctx.quarantined, -1, groups)
    ctx.k = int(np.unique(groups).size)


def intra(fed: Federation, ctx: RoundContext) -> bool:
    """Stage 3c: the group's aggregate (FedAvg, or the rule a defense asks for)."""
    ctx.intra_new = ctx.new
    if fed.intra is None or fed.topology.isolated:
        return False
    ctx.contribution = fed.attack.contribution(ctx.r, ctx.own)
    ctx.weight = fed.weight()
    fed.intra.aggregate(ctx)
    ctx.intra_new = ctx.new
    return True


def cross(fed: Federation, ctx: RoundContext) -> bool:
    """Stage 4: the leaders combine the groups."""
    topo = fed.topology
    labels = np.unique(ctx.groups[ctx.groups >= 0])
    ctx.n_groups = int(labels.size)
    ctx.cross_ran = fed.cross.active and ctx.n_groups > 1 and not topo.isolated
    if not ctx.cross_ran:
        return False
    d = fed.config.defense
    ctx.verify = d.verify_leader and fed.cross.verifiable and topo.group_size > 1
    ctx.row = int(np.searchsorted(labels, ctx.groups[topo.rank]))
    fed.cross.combine(ctx)
    return True


def redistribute(fed: Federation, ctx: RoundContext) -> bool:
    """Stage 5: the leader sends the combined backbone back to its group; members check it."""
    if not ctx.cross_ran:
        return False
    topo, tr = fed.topology, fed.transport
    sent = fed.attack.broadcast(ctx.r, ctx.new, topo.is_leader)
    received = tr.group_broadcast(sent)
    if not topo.is_leader:
        ctx.new = received
    if ctx.verify:
        shape = (ctx.n_groups, fed.node.flat.n_trainable)
        ctx.deltas = tr.group_broadcast_rows(ctx.deltas, shape)
        if not topo.is_leader:
            ctx.new = fed.defense.check_leader(ctx, ctx.new)
    elif (
        not topo.is_leader
        and tr.rejected
        and tr.rejected[-1][0] == int(topo.group_members[topo.leader_rank_in_group])
    ):
        ctx.defended.leader_rejected = 1  # a non-finite broadcast: kept the group result
        ctx.new = ctx.intra_new
    return True


def tested(config: Config, r: int) -> bool:
    """Whether round ``r`` measures test metrics (``run.evaluate_every``; the final round always)."""
    return r % config.run.evaluate_every == 0 or r == config.training.rounds


def evaluate(fed: Federation, ctx: RoundContext) -> bool:
    """The round's new backbone into the model, then test metrics (in the rounds that measure
    them; NaN in the others) and the backbone checksum."""
    node, local_bn = fed.node, fed.config.federation.local_bn
    if fed.intra is not None:
        node.flat.unpack(ctx.new, keep_batchnorm=local_bn)
    if tested(fed.config, ctx.r):
        ctx.test = node.evaluate(node.test_loader)
        return_free_memory()
    else:
        ctx.test = {m: math.nan for m in METRIC_NAMES}
    ctx.checksum = checksum(node.flat.shared_part(node.flat.pack(), local_batchnorm=local_bn))
    for src, _reason in fed.transport.rejected:
        ctx.defended.refused[src] = 1
    return True


Stage = Callable[["Federation", RoundContext], bool]

#: (timer name, stage) in the order a round runs them.
ROUND: tuple[tuple[str, Stage], ...] = (
    ("local_train", train),
    ("exchange", exchange),
    ("clustering", group),
    ("intra", intra),
    ("cross", cross),
    ("redistribute", redistribute),
    ("evaluate", evaluate),
)

#: The stages that only compute (no MPI inside), which the ranks of a host take in turns under
#: ``run.host_slots``: stage -> what the turn is for (in the watchdog's messages).
TURN_STAGES = {"local_train": "train", "evaluate": "evaluate"}
