"""The five-stage round: the one place that combines local training, the algorithms and the comm layer.

A *scheme* (``none``, ``intra``, ``fedper``, ``colnet``) is only a choice of which stages run and how
the cross-group stage combines groups; every scheme runs this same loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from colnet_mpi.algorithms.clustering import (
    adjusted_rand,
    canonical_labels,
    consensus_partition,
    cosine_matrix,
    eigengap_k,
    fuse_affinity,
    leader_position,
    spectral_labels,
)
from colnet_mpi.algorithms.hca import hca_update
from colnet_mpi.algorithms.robust import (
    clip_scales,
    local_norm_scores,
    robust_aggregate,
    screen_updates,
    verify_hca,
)
from colnet_mpi.algorithms.signals import loss_and_jacobian
from colnet_mpi.attacks.plan import AttackPlan, finite_rows, relative_difference
from colnet_mpi.comm.buffers import FlatState, checksum
from colnet_mpi.comm.topology import Topology, ints_allgather
from colnet_mpi.comm.transport import Transport
from colnet_mpi.config import Config
from colnet_mpi.data import DataSizes, NodeData, TaskSpec, build_node_data, dataset_tasks
from colnet_mpi.metrics.writer import EXCLUSION_REASONS, STAGES, TEST_METRICS, ResultsWriter
from colnet_mpi.models import build_backbone, build_head
from colnet_mpi.tasks import (
    BatchHook,
    evaluate,
    loss_function,
    make_optimizer,
    make_scheduler,
    train_epoch,
)


@dataclass(frozen=True)
class Scheme:
    """Which stages an aggregation scheme runs; ``cross`` is None, ``"mean"`` or ``"hca"``."""

    name: str
    exchange: bool
    cluster: bool
    intra: bool
    cross: str | None


SCHEMES: dict[str, Scheme] = {
    "none": Scheme("none", exchange=False, cluster=False, intra=False, cross=None),
    "intra": Scheme("intra", exchange=True, cluster=True, intra=True, cross=None),
    "fedper": Scheme("fedper", exchange=True, cluster=True, intra=True, cross="mean"),
    "colnet": Scheme("colnet", exchange=True, cluster=True, intra=True, cross="hca"),
}


def _seed(*parts: int) -> int:
    """A 63-bit seed derived from several integers (stable across runs and platforms)."""
    return int(
        np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1
    )


def _loader(
    split: Dataset[Any],
    batch_size: int,
    workers: int,
    pin_memory: bool,
    generator: torch.Generator | None = None,
) -> DataLoader[Any]:
    """A loader over ``split``, shuffled by ``generator`` if one is given (the training loader).

    Worker processes (``data.workers`` > 0) start from a fork server rather than by forking this
    rank: forking a process that has initialised MPI is unsafe with some interconnects.
    """
    return DataLoader(
        split,
        batch_size=batch_size,
        shuffle=generator is not None,
        generator=generator,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        multiprocessing_context="forkserver" if workers > 0 else None,
    )


class Node:
    """This rank's federation node: its data shard, backbone, private head and optimizer."""

    def __init__(self, config: Config, rank: int, device: torch.device) -> None:
        self.config = config
        self.rank = rank
        self.device = device
        node_cfg = config.nodes[rank]
        self.name = node_cfg.name
        self.task: TaskSpec = dataset_tasks(config.data.dataset)[node_cfg.task]
        peers = [i for i, n in enumerate(config.nodes) if n.task == node_cfg.task]
        seed = config.run.seed
        self.data: NodeData = build_node_data(
            config.data.dataset,
            node_cfg.task,
            peers.index(rank),
            len(peers),
            seed=seed,
            sizes=DataSizes(
                samples_per_node=config.data.samples_per_node,
                test_samples=config.data.test_samples,
                image_size=config.data.image_size,
            ),
            root=config.data.root or None,
        )
        m = config.model
        stem = m.resolved_stem(self.data.image_size)

        def backbone() -> torch.nn.Module:
            return build_backbone(
                width=m.width,
                stem=stem,
                in_channels=self.data.channels,
                privatization=m.privatization,
            ).to(device)

        torch.manual_seed(_seed(seed, 1))  # one shared backbone initialisation for every node
        self.backbone = backbone()
        torch.manual_seed(_seed(seed, 2, rank))  # heads are initialised per node
        self.head = build_head(
            width=m.width, privatization=m.privatization, num_outputs=self.task.num_outputs
        ).to(device)
        self.scratch = backbone()  # holds peers' backbones during clustering
        self.flat = FlatState(self.backbone)
        self.scratch_flat = FlatState(self.scratch)
        opt = config.training.optimizer_for(self.task.kind)
        params = list(self.backbone.parameters()) + list(self.head.parameters())
        self.optimizer = make_optimizer(
            opt.name, params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay
        )
        self.scheduler = make_scheduler(self.optimizer, opt.lr_decay)
        self.loss_fn = loss_function(self.task.kind)
        t = config.training
        gen = torch.Generator().manual_seed(_seed(seed, 3, rank))
        workers, pin = config.data.workers, device.type == "cuda"
        # local training iterates the augmented view (if the dataset has one), never val/test
        self.train_loader = _loader(self.data.training_view(), t.batch_size, workers, pin, gen)
        self.val_loader = _loader(self.data.val, t.eval_batch_size, workers, pin)
        self.test_loader = _loader(self.data.test, t.eval_batch_size, workers, pin)
        # clustering signals: the first items of the un-augmented training split
        n_probe = min(len(self.data.train), config.clustering.max_batches * t.batch_size)
        self.probe_batches = []
        for i in range(0, n_probe, t.batch_size):
            items = [self.data.train[j] for j in range(i, min(i + t.batch_size, n_probe))]
            x, y = default_collate(items)
            self.probe_batches.append((x.to(device), y.to(device)))
        torch.manual_seed(_seed(seed, 4, rank))

    @property
    def n_train(self) -> int:
        """Training samples of this node."""
        return len(self.data.train)

    def train_local(
        self, epochs: int, batch_hook: BatchHook | None = None
    ) -> tuple[list[float], list[float]]:
        """Stage 1: E local epochs; returns per-epoch training and validation losses.

        ``batch_hook`` (an attack's) may replace each training batch before its step.
        """
        train, val = [], []
        clip = self.config.training.grad_clip or None
        for _ in range(epochs):
            train.append(
                train_epoch(
                    self.backbone,
                    self.head,
                    self.train_loader,
                    self.task.kind,
                    self.optimizer,
                    self.device,
                    grad_clip=clip,
                    batch_hook=batch_hook,
                )
            )
            self.scheduler.step()
            val.append(self.evaluate(self.val_loader)["loss"])
        return train, val

    def evaluate(self, loader: DataLoader[tuple[torch.Tensor, ...]]) -> dict[str, float]:
        """Task metrics of the current (backbone, head) on a loader."""
        return evaluate(
            self.backbone, self.head, loader, self.task.kind, self.task.num_outputs, self.device
        )

    def signals(self, vector: torch.Tensor, generator: torch.Generator) -> tuple[float, float]:
        """Loss and mean Jacobian norm of the model (backbone ``vector``, own head) on local data."""
        self.scratch_flat.unpack(vector)
        c = self.config.clustering
        return loss_and_jacobian(
            self.scratch,
            self.head,
            self.probe_batches,
            self.loss_fn,
            estimator=c.jacobian,
            probes=c.probes,
            generator=generator,
        )


@dataclass
class Defended:
    """What this rank's defenses saw in one round (the ``defense/*`` datasets)."""

    n: int
    excluded: int = 0  # 1: this node's contribution was left out of its group's aggregate
    reason: int = 0  # index into EXCLUSION_REASONS
    norm_score: float = float("nan")
    cosine_score: float = float("nan")
    leader_rejected: int = 0  # 1: this node refused its leader's broadcast
    verify_error: float = float("nan")  # relative error found when checking the leader
    refused: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (n,): 1 = refused j

    def __post_init__(self) -> None:
        if self.refused.size != self.n:
            self.refused = np.zeros(self.n)


DEFENSE_COLUMNS = (
    "attacking",
    "excluded",
    "reason",
    "norm_score",
    "cosine_score",
    "leader_rejected",
    "verify_error",
)


@dataclass
class RoundResult:
    """What one rank knows after a round (packed into one float64 record for the writer)."""

    train_loss: list[float]
    val_loss: list[float]
    test: dict[str, float]
    group: int
    leader: int
    checksum: int
    bytes_sent: int
    bytes_received: int
    seconds: dict[str, float]
    proposal: np.ndarray
    affinity: (
        np.ndarray
    )  # (2, n, n): fused affinity S and cosine C over world indices (NaN = unseen)
    signals: (
        np.ndarray
    )  # (2, n): loss and Jacobian norm of each seen backbone with this node's head
    hca_weight: float = float("nan")
    hca_mean_delta_norm: float = float("nan")
    hca_update_norm: float = float("nan")
    hca_solver_ok: int = -1  # 1 ok, 0 failed (uniform weights used), -1 not run
    k: int = 0
    groups: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    attacking: int = 0
    defense: Defended = field(default_factory=lambda: Defended(0))

    def pack(self) -> np.ndarray:
        """One flat float64 record (same length on every rank)."""
        head = [
            *self.train_loss,
            *self.val_loss,
            *(self.test[m] for m in TEST_METRICS),
            self.group,
            self.leader,
            self.checksum,
            self.bytes_sent,
            self.bytes_received,
            *(self.seconds.get(s, 0.0) for s in STAGES),
            self.hca_weight,
            self.hca_mean_delta_norm,
            self.hca_update_norm,
            self.hca_solver_ok,
            self.k,
            self.attacking,
            self.defense.excluded,
            self.defense.reason,
            self.defense.norm_score,
            self.defense.cosine_score,
            self.defense.leader_rejected,
            self.defense.verify_error,
        ]
        return np.concatenate(
            [
                np.asarray(head, dtype=np.float64),
                self.defense.refused.astype(np.float64),
                self.proposal.astype(np.float64),
                self.signals.reshape(-1).astype(np.float64),
                self.affinity.reshape(-1).astype(np.float64),
            ]
        )


def _any_value(column: np.ndarray) -> float:
    """The value the leaders reported (identical on all of them), NaN when no leader ran HCA."""
    finite = column[~np.isnan(column)]
    return float(finite.max()) if finite.size else float("nan")


def n_true_groups(labels: np.ndarray) -> int:
    """Number of distinct task groups."""
    return int(np.unique(labels).size)


def _reason_code(reason: str, kept: bool) -> int:
    """Index into EXCLUSION_REASONS for a screening reason text."""
    if kept:
        return 0
    if "non-finite" in reason:
        return EXCLUSION_REASONS.index("non-finite")
    norm, cosine = "norm" in reason, "cosine" in reason
    if norm and cosine:
        return EXCLUSION_REASONS.index("norm+cosine")
    return EXCLUSION_REASONS.index("cosine" if cosine else "norm")


def unpack_records(records: np.ndarray, epochs: int, n: int) -> dict[str, np.ndarray]:
    """Split the gathered (n, len) records into named columns (the inverse of RoundResult.pack)."""
    cols: dict[str, np.ndarray] = {}
    i = 0

    def take(name: str, width: int) -> None:
        nonlocal i
        cols[name] = records[:, i : i + width]
        i += width

    take("train_loss", epochs)
    take("val_loss", epochs)
    for m in TEST_METRICS:
        take(f"test_{m}", 1)
    for name in ("group", "leader", "checksum", "bytes_sent", "bytes_received"):
        take(name, 1)
    for s in STAGES:
        take(f"seconds/{s}", 1)
    for name in ("hca_weight", "hca_mean_delta_norm", "hca_update_norm", "hca_solver_ok", "k"):
        take(name, 1)
    for name in DEFENSE_COLUMNS:
        take(name, 1)
    take("refused", n)
    take("proposal", n)
    take("loss", n)
    take("jacobian", n)
    take("affinity", n * n)
    take("cosine", n * n)
    return cols


class Federation:
    """Runs the rounds of one node (this rank) against its peers."""

    def __init__(
        self,
        config: Config,
        topology: Topology,
        node: Node,
        writer: ResultsWriter | None,
        log: Callable[[str], None],
    ) -> None:
        self.config = config
        self.topology = topology
        self.node = node
        self.writer = writer
        self.log = log
        self.scheme = SCHEMES[config.federation.scheme]
        self.transport = Transport(topology, node.device, config.federation.cuda_aware)
        n = topology.size
        self.true_groups = [
            dataset_tasks(config.data.dataset)[nd.task].group for nd in config.nodes
        ]
        names = sorted(set(self.true_groups))
        self.true_labels = np.array([names.index(g) for g in self.true_groups])
        self.record_affinity = config.clustering.record_affinity == "yes" or (
            config.clustering.record_affinity == "auto" and n <= 64
        )
        self.epochs_done = 0
        # each node's last real group (quarantine, -1, does not change it); round 1: one shared
        # initial backbone, so everyone is everyone's group-mate
        self.home_groups = np.zeros(n, dtype=np.int64)
        self.attack = AttackPlan(
            config.attack,
            topology.rank,
            kind=node.task.kind,
            num_outputs=node.task.num_outputs,
            seed=_seed(config.run.seed, 7, topology.rank),
            device=node.device,
        )

    # -- stages ------------------------------------------------------------------------------------
    def _cluster(
        self,
        r: int,
        own: torch.Tensor,
        received: dict[int, torch.Tensor],
        quarantined: np.ndarray,
    ) -> tuple:
        """Stage 3a/3b: this node's proposal from its own view, then the agreed partition.

        Quarantined nodes (``quarantined[j]``) are left out of every view and of the consensus;
        they get group -1. A quarantined node proposes nothing but still joins the collective.
        """
        cfg = self.config.clustering
        topo = self.topology
        n = topo.size
        proposal = np.full(n, -1, dtype=np.int64)
        world_aff = np.full((2, n, n), np.nan, dtype=np.float64)
        signals = np.full((2, n), np.nan)
        k = 0
        if not quarantined[topo.rank]:
            view = [topo.rank, *(j for j in sorted(received) if not quarantined[j])]
            vectors = torch.stack([own, *(received[j] for j in view[1:])])
            p = self.node.flat.n_trainable
            cos = cosine_matrix(vectors[:, :p], centered=cfg.cosine == "centered")
            gen = torch.Generator(device=self.node.device).manual_seed(
                _seed(self.config.run.seed, 5, topo.rank, r)
            )
            losses, jacobians = zip(*(self.node.signals(v, gen) for v in vectors), strict=False)
            m = len(view)
            loss_m = np.tile(np.asarray(losses, dtype=np.float64), (m, 1))
            jac_m = np.tile(np.asarray(jacobians, dtype=np.float64), (m, 1))
            affinity = fuse_affinity(
                cos,
                loss_m,
                jac_m,
                alpha=cfg.alpha,
                beta=cfg.beta,
                gamma=cfg.gamma,
                tau_loss=cfg.tau_loss,
                tau_jacobian=cfg.tau_jacobian,
            )
            k = cfg.k if isinstance(cfg.k, int) else eigengap_k(affinity, min(cfg.k_max, m))
            k = min(k, m)
            labels = spectral_labels(affinity, k, seed=_seed(self.config.run.seed, 6, r) % (2**31))
            proposal[view] = labels
            world_aff[0][np.ix_(view, view)] = affinity
            world_aff[1][np.ix_(view, view)] = cos
            signals[0, view] = losses
            signals[1, view] = jacobians
        proposals = ints_allgather(topo.world, proposal)
        active = np.flatnonzero(~quarantined)
        want = min(cfg.k, active.size) if isinstance(cfg.k, int) else None
        groups = np.full(n, -1, dtype=np.int64)
        groups[active] = consensus_partition(proposals[np.ix_(active, active)], want)
        return proposal, world_aff, signals, groups, int(k)

    def _prescreen(
        self,
        own: torch.Tensor,
        start: torch.Tensor,
        received: dict[int, torch.Tensor],
        defended: Defended,
    ) -> tuple[np.ndarray, torch.Tensor]:
        """Update screening before clustering (``defense.screening``): which nodes to quarantine.

        Every node tests the updates of its group-mates of the last round it was not quarantined
        in (their backbones started from the same point as its own, so ``backbone - start`` is
        their update, plus any drift of a node that sat out; in round 1, everyone)
        with a norm test against the most similar updates (``local_norm_scores``): nodes of other
        tasks may update at another scale, a boosted update is large against its own task's.
        Only too-large updates are flagged here; refused buffers count as flagged. A node is an
        outlier for the round when a strict majority of the nodes that tested it flagged it; the
        decision is the same on every rank. With ``norm_action = "exclude"`` outliers are
        quarantined; with ``"clip"`` only nodes whose buffers a majority refused are, and every
        node rescales the too-large updates in its own view (``received`` is changed in place).
        Returns the quarantine flags and this node's own vector for its clustering view.
        """
        topo = self.topology
        n = topo.size
        verdict = np.full(n, -1, dtype=np.int64)  # -1 not tested, 0 passed, 1 flagged, 2 refused
        for src, _reason in self.transport.rejected:
            verdict[src] = 2
        home = self.home_groups
        mates = [topo.rank, *(j for j in sorted(received) if home[j] == home[topo.rank])]
        p = self.node.flat.n_trainable
        rows = torch.stack([own[:p] - start[:p], *(received[j][:p] - start[:p] for j in mates[1:])])
        scores = local_norm_scores(rows.double())
        ratio = self.config.defense.norm_ratio
        for i, j in enumerate(mates):
            if not math.isnan(float(scores[i])):  # NaN: nobody to compare with, untested
                verdict[j] = int(not float(scores[i]) <= ratio)
        verdicts = ints_allgather(topo.world, verdict)
        tested = (verdicts >= 0).sum(axis=0)
        outlier = 2 * (verdicts >= 1).sum(axis=0) > tested
        defended.norm_score = float(scores[0])
        if self.config.defense.norm_action == "exclude":
            quarantined = outlier
        else:
            quarantined = 2 * (verdicts == 2).sum(axis=0) > tested
            scale = clip_scales(scores, ratio)
            for i, j in enumerate(mates[1:], start=1):
                if float(scale[i]) != 1.0:
                    received[j] = start + (received[j] - start) * float(scale[i])
            if float(scale[0]) != 1.0:
                own = start + (own - start) * float(scale[0])
            if outlier[topo.rank] and not quarantined[topo.rank]:
                defended.reason = EXCLUSION_REASONS.index("clipped")
        if quarantined[topo.rank]:
            defended.excluded = 1
            finite = bool(torch.isfinite(rows[0]).all())
            defended.reason = EXCLUSION_REASONS.index("norm" if finite else "non-finite")
        return quarantined, own

    def _leaders(self, groups: np.ndarray, r: int) -> np.ndarray:
        flags = np.zeros(groups.size, dtype=bool)
        for g in np.unique(groups[groups >= 0]):  # -1: quarantined, leads nothing
            members = np.flatnonzero(groups == g)
            flags[members[leader_position(r, members.size)]] = True
        return flags

    def _weight(self) -> float:
        """This node's FedAvg weight."""
        equal = self.config.federation.intra_weights == "equal"
        return 1.0 if equal else float(self.node.n_train)

    def _robust_intra(
        self, contribution: torch.Tensor, start: torch.Tensor, defended: Defended
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 3c with defenses: every member gathers the members' updates, screens them and
        applies the robust rule; all members compute the same result (no leader involved).

        Updates are taken from the group's common starting backbone (the leader's start when the
        members' starts differ, i.e. the group changed this round). Non-finite rows are always
        left out; screening and the rule follow ``[defense]``. Returns the group's new backbone
        and the reference it was built on.
        """
        d = self.config.defense
        tr, flat = self.transport, self.node.flat
        if tr.group_all_equal(checksum(start)):
            reference = start
        else:
            reference = tr.group_broadcast(start)
        weight = contribution.new_tensor([self._weight()])
        rows = tr.group_allgather(torch.cat([contribution - reference, weight]))
        updates, weights = rows[:, :-1], rows[:, -1]
        p = flat.n_trainable
        clip = d.screening and d.norm_action == "clip"
        screen = screen_updates(
            updates[:, :p].double(),
            norm_ratio=d.norm_ratio if d.screening else math.inf,
            min_cosine=d.min_cosine if d.screening else -1.0,
            exclude_norm=not clip,
        )
        keep = screen.keep & finite_rows(updates).to(screen.keep.device) & torch.isfinite(weights)
        me = self.topology.group_members.index(self.topology.rank)
        reason = screen.reasons[me]
        defended.excluded = int(not bool(keep[me]))
        defended.reason = _reason_code(reason, bool(keep[me]))
        norm_scores = screen.norm_scores
        if clip and int(finite_rows(updates).sum()) >= 3:
            # too-large updates back to the norm of their most similar rows (a member of another
            # task in the group must not hide a boost, as in the pre-clustering test), kept
            norm_scores = local_norm_scores(updates[:, :p].double())
            scale = clip_scales(norm_scores, d.norm_ratio)
            updates = updates * scale.to(updates).unsqueeze(1)
            if bool(keep[me]) and float(scale[me]) != 1.0:
                defended.reason = EXCLUSION_REASONS.index("clipped")
        defended.norm_score = float(norm_scores[me])
        defended.cosine_score = float(screen.cosine_scores[me])
        if screen.note and me == self.topology.leader_rank_in_group:
            self.log(f"  screening in the group led by rank {self.topology.rank}: {screen.note}")
        if not bool(keep.any()):  # nothing usable: keep the common start
            return reference.clone(), reference
        aggregate = robust_aggregate(
            updates[keep].double(),
            d.aggregation,
            weights[keep].double().tolist(),
            trim=d.trim,
            clip=d.clip or None,
        )
        return reference + aggregate.to(reference.dtype), reference

    def round(self, r: int) -> RoundResult:
        """Run round ``r`` (1-based) on this rank and return its record."""
        cfg = self.config
        node, topo, tr, scheme, attack = (
            self.node,
            self.topology,
            self.transport,
            self.scheme,
            self.attack,
        )
        n = topo.size
        seconds = dict.fromkeys(STAGES, 0.0)
        tr.reset_counters()
        defended = Defended(n)
        t_round = time.perf_counter()

        def timed(stage: str, t0: float) -> float:
            now = time.perf_counter()
            seconds[stage] += now - t0
            return now

        # Stage 1: local training (attack hooks: poisoned batches, then boost / weight clipping)
        t = time.perf_counter()
        start = node.flat.pack().clone()
        hook = attack.batch_hook(r, node.backbone, node.head)
        train_loss, val_loss = node.train_local(cfg.training.local_epochs, hook)
        attack.after_training(r, start, node.flat, (node.backbone, node.head), node.train_loader)
        t = timed("local_train", t)

        proposal = np.full(n, -1, dtype=np.int64)
        affinity = np.full((2, n, n), np.nan)
        signals = np.full((2, n), np.nan)
        groups = np.arange(n, dtype=np.int64)
        leaders = np.ones(n, dtype=bool)
        result_kw: dict[str, float | int] = {}
        k = 0
        own = node.flat.pack()
        if scheme.exchange:
            # Stage 2: backbone exchange with the neighbours (one buffer, one message each);
            # refused buffers (wrong size, non-finite) are left out of everything that follows
            upload = attack.upload(r, own)
            received = tr.exchange(upload, expected=None if upload is own else own.numel())
            t = timed("exchange", t)
        if scheme.cluster:
            # Stage 3a/3b: task-aware clustering and the agreed partition
            quarantined = np.zeros(n, dtype=bool)
            view_own = own
            if cfg.defense.screening:
                quarantined, view_own = self._prescreen(own, start, received, defended)
            if cfg.federation.grouping == "tasks":  # fixed groups, as in the authors' code
                groups, k = canonical_labels(self.true_labels), n_true_groups(self.true_labels)
                groups = np.where(quarantined, -1, groups)
            else:
                proposal, affinity, signals, groups, k = self._cluster(
                    r, view_own, received, quarantined
                )
            leaders = self._leaders(groups, r)
            topo.set_groups(groups, leaders)
            t = timed("clustering", t)
        new = own
        d = cfg.defense
        p = node.flat.n_trainable
        group_delta: torch.Tensor | None = None  # known to the leader (to all with verification)
        if scheme.intra and not topo.isolated:
            # Stage 3c: FedAvg inside the group, or the robust rule when a defense asks for it
            contribution = attack.contribution(r, own)
            robust = d.aggregation != "mean" or d.screening
            w = self._weight()
            if not robust:
                summed = tr.group_sum(torch.cat([contribution * w, own.new_tensor([w])]))
                if bool(torch.isfinite(summed).all()):
                    new = summed[:-1] / summed[-1]
                else:  # a member sent non-finite values: every member saw it, all fall back
                    robust = True
                    if topo.is_leader:
                        self.log(f"round {r}: non-finite values in the group sum; screening them")
            if robust:
                new, reference = self._robust_intra(contribution, start, defended)
                group_delta = new[:p] - reference[:p]
            t = timed("intra", t)
        intra_new = new
        n_groups = int(np.unique(groups[groups >= 0]).size)
        cross_ran = scheme.cross is not None and n_groups > 1 and not topo.isolated
        if cross_ran:
            # Stage 4: leaders combine the groups
            verify = d.verify_leader and scheme.cross == "hca" and topo.group_size > 1
            row = int(np.searchsorted(np.unique(groups[groups >= 0]), groups[topo.rank]))
            deltas: torch.Tensor | None = None
            if scheme.cross == "hca":
                if group_delta is None:
                    part = torch.cat([(contribution[:p] - start[:p]) * w, own.new_tensor([w])])
                    if verify:  # every member needs the group delta to check its leader
                        total: torch.Tensor | None = tr.group_sum(part)
                    else:
                        total = tr.reduce_to_leader(part)
                    if total is not None:
                        group_delta = total[:-1] / total[-1]
                if topo.is_leader:
                    assert group_delta is not None
                    deltas = tr.leaders_allgather(group_delta)
                    new, result_kw = self._hca(r, intra_new, deltas, row)
            elif topo.is_leader:  # "mean": FedPer-style equal-weight mean of the group backbones
                backbones = tr.leaders_allgather(new)
                usable = finite_rows(backbones)
                new = backbones[usable].mean(dim=0) if bool(usable[row]) else new
            t = timed("cross", t)
            # Stage 5: the leader sends the combined backbone back to its group
            sent = attack.broadcast(r, new, topo.is_leader)
            received_new = tr.group_broadcast(sent)
            if not topo.is_leader:
                new = received_new
            if verify:
                shape = (n_groups, p)
                deltas = tr.group_broadcast_rows(deltas, shape)
                if not topo.is_leader:
                    assert group_delta is not None
                    new = self._check_leader(r, new, intra_new, deltas, group_delta, row, defended)
            elif (
                not topo.is_leader
                and tr.rejected
                and tr.rejected[-1][0] == int(topo.group_members[topo.leader_rank_in_group])
            ):
                defended.leader_rejected = 1  # a non-finite broadcast: kept the group result
                new = intra_new
            t = timed("redistribute", t)
        if scheme.intra:
            node.flat.unpack(new, keep_batchnorm=cfg.federation.local_bn)

        test = node.evaluate(node.test_loader)
        shared = node.flat.shared_part(node.flat.pack(), local_batchnorm=cfg.federation.local_bn)
        digest = checksum(shared)
        t = timed("evaluate", t)
        seconds["total"] = time.perf_counter() - t_round
        for src, _reason in tr.rejected:
            defended.refused[src] = 1
        self.home_groups = np.where(groups >= 0, groups, self.home_groups)
        return RoundResult(
            train_loss=train_loss,
            val_loss=val_loss,
            test=test,
            group=int(groups[topo.rank]),
            leader=int(leaders[topo.rank]),
            checksum=digest,
            bytes_sent=tr.bytes_sent,
            bytes_received=tr.bytes_received,
            seconds=seconds,
            proposal=proposal,
            affinity=affinity,
            signals=signals,
            k=k,
            groups=groups,
            attacking=int(attack.active(r)),
            defense=defended,
            **result_kw,  # type: ignore[arg-type]
        )

    def _hca(
        self, r: int, intra_new: torch.Tensor, deltas: torch.Tensor, row: int
    ) -> tuple[torch.Tensor, dict[str, float | int]]:
        """Stage 4 on a leader: HCA over the leaders' finite deltas, added to the group result."""
        cfg = self.config
        usable = finite_rows(deltas)
        if not bool(usable[row]) or int(usable.sum()) < 2:
            self.log(f"round {r}: leader {self.topology.rank} skipped HCA (non-finite deltas)")
            return intra_new, {}
        res = hca_update(deltas[usable].double(), alpha=cfg.hca.alpha)
        new = intra_new.clone()
        p = self.node.flat.n_trainable
        new[:p] += cfg.hca.psi * res.update.to(new.dtype)
        if not res.solver_ok:
            self.log(f"round {r}: HCA solver failed ({res.message}); used uniform weights")
        return new, dict(
            hca_weight=float(res.weights[int(usable[:row].sum())]),
            hca_mean_delta_norm=res.mean_delta_norm,
            hca_update_norm=res.update_norm,
            hca_solver_ok=int(res.solver_ok),
        )

    def _check_leader(
        self,
        r: int,
        received: torch.Tensor,
        intra_new: torch.Tensor,
        deltas: torch.Tensor,
        group_delta: torch.Tensor,
        row: int,
        defended: Defended,
    ) -> torch.Tensor:
        """Leader verification on a member: recompute HCA from the leader's deltas (after checking
        this group's own row) and compare with the broadcast; on a mismatch keep the recomputed
        result and record the leader as suspect."""
        cfg = self.config
        tol = cfg.defense.tolerance
        p = self.node.flat.n_trainable
        own_row_error = relative_difference(deltas[row], group_delta)
        honest, _ = self._hca(r, intra_new, deltas, row)
        error = max(own_row_error, relative_difference(received, honest))
        if cfg.hca.psi > 0 and bool(torch.isfinite(received).all()):
            # the paper-level check: the trainable update against a fresh HCA solve
            update = (received[:p] - intra_new[:p]).double() / cfg.hca.psi
            usable = finite_rows(deltas)
            if bool(usable[row]) and int(usable.sum()) >= 2:
                check = verify_hca(deltas[usable], update, cfg.hca.alpha, tol)
                error = max(
                    own_row_error,
                    check.rel_error,
                    relative_difference(received[p:], intra_new[p:])
                    if received.numel() > p
                    else 0.0,
                )
        defended.verify_error = error
        if error <= tol:
            return received
        defended.leader_rejected = 1
        leader = int(self.topology.group_members[self.topology.leader_rank_in_group])
        self.log(
            f"round {r}: rank {self.topology.rank} rejected the broadcast of leader {leader} "
            f"(relative error {error:.3g} > {tol:g})"
        )
        return honest

    def record(self, r: int, result: RoundResult) -> dict[str, np.ndarray] | None:
        """Gather every rank's record onto rank 0 and append it to the results file."""
        gathered = self.transport.gather_records(result.pack(), root=0)
        if gathered is None:
            return None
        n = self.topology.size
        e = self.config.training.local_epochs
        cols = unpack_records(gathered, e, n)
        groups = cols["group"][:, 0].astype(np.int64)
        ari = adjusted_rand(self.true_labels, groups) if self.scheme.cluster else float("nan")
        leader_rows = np.flatnonzero(cols["leader"][:, 0] == 1)
        solver = cols["hca_solver_ok"][leader_rows, 0]
        rows: dict[str, np.ndarray | float | int] = {
            "epoch/train_loss": cols["train_loss"].T,
            "epoch/val_loss": cols["val_loss"].T,
            "epoch/round": np.full(e, r),
            "round/group": groups,
            "round/leader": cols["leader"][:, 0],
            "round/backbone_checksum": cols["checksum"][:, 0],
            "round/bytes_sent": cols["bytes_sent"][:, 0],
            "round/bytes_received": cols["bytes_received"][:, 0],
            "clustering/proposal": cols["proposal"],
            "clustering/loss": cols["loss"],
            "clustering/jacobian": cols["jacobian"],
            "clustering/ari": ari,
            "clustering/k": int(np.nanmax(cols["k"][:, 0])) if n else 0,
            "hca/weights": cols["hca_weight"][:, 0],
            "hca/mean_delta_norm": _any_value(cols["hca_mean_delta_norm"][:, 0]),
            "hca/update_norm": _any_value(cols["hca_update_norm"][:, 0]),
            "hca/solver_ok": int(solver.min()) if solver.size else -1,
        }
        for m in TEST_METRICS:
            rows[f"round/test_{m}"] = cols[f"test_{m}"][:, 0]
        for s in STAGES:
            rows[f"round/seconds/{s}"] = cols[f"seconds/{s}"][:, 0]
        rows["attack/active"] = cols["attacking"][:, 0]
        for name in DEFENSE_COLUMNS[1:]:
            rows[f"defense/{name}"] = cols[name][:, 0]
        rows["defense/refused"] = cols["refused"]
        if self.record_affinity:
            rows["clustering/affinity"] = cols["affinity"].reshape(n, n, n)
            rows["clustering/cosine"] = cols["cosine"].reshape(n, n, n)
        if self.writer is not None:
            self.writer.append(rows)
        self.log(self._summary(r, rows, ari))
        return {k: np.asarray(v) for k, v in rows.items()}

    def _summary(self, r: int, rows: dict, ari: float) -> str:
        """The one progress line per round."""
        parts = [f"round {r:>3}/{self.config.training.rounds}"]
        parts.append(f"{float(np.max(rows['round/seconds/total'])):6.1f}s")
        tasks = dataset_tasks(self.config.data.dataset)
        for name in dict.fromkeys(nd.task for nd in self.config.nodes):
            idx = [i for i, nd in enumerate(self.config.nodes) if nd.task == name]
            if tasks[name].kind == "landmarks":
                parts.append(f"{name} loss={np.mean(rows['round/test_loss'][idx]):.3f}")
            else:
                parts.append(f"{name} f1={np.mean(rows['round/test_f1_micro'][idx]):.3f}")
        if self.scheme.cluster:
            parts.append(f"ARI={ari:.2f}")
            parts.append("groups=" + "".join(str(int(g)) for g in rows["round/group"]))
        return "  ".join(parts)

    def run(self) -> None:
        """All rounds; the writer (rank 0) appends and closes the file after every round."""
        for r in range(1, self.config.training.rounds + 1):
            result = self.round(r)
            self.record(r, result)
            # nobody starts the next round before round r is on disk: a crash later loses nothing
            self.topology.world.Barrier()
