"""Groupers: who aggregates with whom this round (stage 3a/3b).

A grouper sets ``ctx.groups`` (the agreed partition, identical on every rank; -1 = quarantined)
and ``ctx.k``, and may leave diagnostics in ``ctx.proposal``, ``ctx.affinity``, ``ctx.signals``.
It sees this node's backbone as ``ctx.view_own``, the neighbours' in ``ctx.received`` and the
quarantine decided by the defenses in ``ctx.quarantined``. Register a new one in
``federation/schemes.py`` (``GROUPERS``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from colnet_mpi.algorithms.clustering import (
    canonical_labels,
    consensus_partition,
    cosine_matrix,
    eigengap_k,
    fuse_affinity,
    spectral_labels,
)
from colnet_mpi.algorithms.resemblance import (
    UpdateSketch,
    accumulate,
    affinity_from_evidence,
    mix,
    partition,
    profile_similarity,
    reliable_weights,
)
from colnet_mpi.comm.topology import floats_allgather, ints_allgather
from colnet_mpi.federation.context import RoundContext
from colnet_mpi.federation.stop import forced_groups
from colnet_mpi.node import derive_seed

if TYPE_CHECKING:
    from colnet_mpi.federation.loop import Federation


class Grouper(Protocol):
    """Decides the partition of the round (collectively: every rank must agree)."""

    def __init__(self, fed: Federation) -> None: ...

    def assign(self, ctx: RoundContext) -> None:
        """Set ``ctx.groups`` and ``ctx.k`` (and any diagnostics)."""

    def payload(self, ctx: RoundContext, upload: torch.Tensor) -> torch.Tensor | None:
        """Numbers to send to every neighbour with the backbone (None: nothing)."""


class TrueTasks:
    """The true task groups, fixed (as in the authors' code): isolates aggregation from clustering."""

    def __init__(self, fed: Federation) -> None:
        self.labels = fed.true_labels

    def assign(self, ctx: RoundContext) -> None:
        """Every node with its task group; quarantined nodes get -1."""
        ctx.groups = np.where(ctx.quarantined, -1, canonical_labels(self.labels))
        ctx.k = int(np.unique(self.labels).size)

    def payload(self, ctx: RoundContext, upload: torch.Tensor) -> torch.Tensor | None:
        """Nothing besides the backbone."""
        return None


class TaskAwareClustering:
    """Task-aware clustering: a proposal from each node's view, then a consensus.

    ``clustering.signals = "resemblance"`` (default): update cosine, loss and Jacobian profiles,
    evidence kept over rounds (``algorithms/resemblance.py``); ``"paper"``: the paper's literal
    signals (backbone cosine, column-only loss and Jacobian views, this round only).
    """

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        cfg = fed.config.clustering
        self.resemblance = cfg.signals == "resemblance"
        self.sketch: UpdateSketch | None = None
        self.backbone_sketch: UpdateSketch | None = None
        self.data: torch.Tensor | None = None
        if self.resemblance and cfg.update_weight > 0:
            self.sketch = UpdateSketch(
                fed.node.flat.n_trainable,
                cfg.sketch,
                derive_seed(fed.config.run.seed, 8),
                fed.node.device,
            )
        if self.resemblance and cfg.backbone_sketch > 0:
            self.backbone_sketch = UpdateSketch(
                fed.node.flat.n_trainable,
                cfg.backbone_sketch,
                derive_seed(fed.config.run.seed, 9),
                fed.node.device,
            )
        if self.resemblance and cfg.data_weight > 0:
            # built before any training or restored checkpoint: under the shared initial backbone
            self.data = fed.node.data_profile()

    @property
    def payload_size(self) -> int:
        """Values :meth:`payload` sends (the same on every rank)."""
        parts = [self.data, self.sketch, self.backbone_sketch]
        sizes = [self.data.numel() if self.data is not None else 0]
        sizes += [s.dim for s in parts[1:] if isinstance(s, UpdateSketch)]
        return int(sum(sizes))

    @property
    def sends_backbone(self) -> bool:
        """False when the exchange carries a sketch of the backbone instead of the backbone."""
        return self.backbone_sketch is None

    def payload(self, ctx: RoundContext, upload: torch.Tensor) -> torch.Tensor | None:
        """Resemblance signals: the data profile, the sketch of this round's update, then (with
        ``clustering.backbone_sketch``) the sketch of the backbone that is sent in its place."""
        parts = [] if self.data is None else [self.data]
        sent = upload if upload.numel() == ctx.start.numel() else ctx.own
        if self.sketch is not None:
            p = self.sketch.n
            parts.append(self.sketch(sent[:p] - ctx.start[:p]).to(self.fed.node.device))
        if self.backbone_sketch is not None:
            p = self.backbone_sketch.n
            parts.append(self.backbone_sketch(sent[:p]).to(self.fed.node.device))
        return torch.cat(parts) if parts else None

    def assign(self, ctx: RoundContext) -> None:
        """This node's proposal from its own view, then the agreed partition.

        Quarantined nodes are left out of every view and of the consensus; they get group -1.
        A quarantined node proposes nothing but still joins the collectives.
        """
        self.propose(ctx)
        assert ctx.proposal is not None
        topo = self.fed.topology
        proposals = ints_allgather(
            topo.world, ctx.proposal, watchdog=topo.watchdog, what="every rank's grouping proposal"
        )
        self.settle(ctx, proposals)

    def propose(self, ctx: RoundContext) -> None:
        """This node's proposal (``ctx.proposal``, ``ctx.k``) and diagnostics from its view.

        Without ``clustering.loss_weight`` no collective runs here (asynchronous mode agrees on
        the proposals itself)."""
        if self.resemblance:
            self._assign_resemblance(ctx)
        else:
            self._assign_paper(ctx)

    def settle(self, ctx: RoundContext, proposals: np.ndarray) -> None:
        """The agreed partition from every rank's proposal ``(n, n)``: ``ctx.groups``, the same
        on every rank that passes the same proposals and quarantine."""
        cfg = self.fed.config.clustering
        active = np.flatnonzero(~ctx.quarantined)
        want = min(cfg.k, active.size) if isinstance(cfg.k, int) else None
        groups = np.full(ctx.n, -1, dtype=np.int64)
        groups[active] = consensus_partition(proposals[np.ix_(active, active)], want)
        forced = forced_groups(ctx.r)
        if forced is not None:
            groups = np.where(ctx.quarantined, -1, canonical_labels(forced))
        ctx.groups = groups

    def _view(self, ctx: RoundContext) -> list[int]:
        """This rank, then the neighbours it received from that are not quarantined."""
        q = ctx.quarantined
        heard = set(ctx.received) | set(ctx.payloads)
        return [self.fed.topology.rank, *(j for j in sorted(heard) if not q[j])]

    def _evaluate(self, ctx: RoundContext, vectors: list[torch.Tensor]) -> tuple[list, list]:
        """Loss and Jacobian norm of every backbone in ``vectors`` on this node's data."""
        fed = self.fed
        gen = torch.Generator(device=fed.node.device).manual_seed(
            derive_seed(fed.config.run.seed, 5, fed.topology.rank, ctx.r)
        )
        losses, jacobians = zip(*(fed.node.signals(v, gen) for v in vectors), strict=False)
        return list(losses), list(jacobians)

    def _proposed(self, ctx: RoundContext, proposal: np.ndarray, k: int, record: tuple) -> None:
        ctx.proposal, ctx.affinity, ctx.signals = proposal, record[0], record[1]
        ctx.k = int(k)

    def _propose(self, ctx: RoundContext, affinity: np.ndarray) -> tuple[int, np.ndarray]:
        """``(K, spectral labels of affinity)``: K from the config, or by the eigengap."""
        cfg, m = self.fed.config.clustering, affinity.shape[0]
        k = cfg.k if isinstance(cfg.k, int) else eigengap_k(affinity, min(cfg.k_max, m))
        k = min(k, m)
        seed = derive_seed(self.fed.config.run.seed, 6, ctx.r) % (2**31)
        return k, spectral_labels(affinity, k, seed=seed)

    def _assign_resemblance(self, ctx: RoundContext) -> None:
        fed, topo = self.fed, self.fed.topology
        cfg = fed.config.clustering
        n, rank = topo.size, topo.rank
        view = [] if ctx.quarantined[rank] else self._view(ctx)
        ix = np.ix_(view, view)
        centered = cfg.cosine == "centered"
        channels: list[np.ndarray] = []
        weights: list[float] = []

        def add(weight: float, rows: list[torch.Tensor]) -> None:
            m = np.full((n, n), np.nan)
            if view:
                m[ix] = cosine_matrix(rows, centered=centered)
            channels.append(m)
            weights.append(weight)

        payloads = [ctx.payload, *(ctx.payloads.get(j) for j in view[1:])] if view else []
        d = 0 if self.data is None else self.data.numel()
        u = d + (0 if self.sketch is None else self.sketch.dim)
        if self.data is not None:
            add(cfg.data_weight, [q[:d] for q in payloads if q is not None])
        if self.sketch is not None:
            add(cfg.update_weight, [q[d:u] for q in payloads if q is not None])
        vectors: list[torch.Tensor] = []
        if self.backbone_sketch is None and view:
            vectors = [ctx.view_own, *(ctx.received[j] for j in view[1:])]
        if cfg.backbone_weight > 0 and self.backbone_sketch is not None:
            add(cfg.backbone_weight, [q[u:] for q in payloads if q is not None])
        elif cfg.backbone_weight > 0:
            p = fed.node.flat.n_trainable
            add(cfg.backbone_weight, [v[:p] for v in vectors])
        recorded = channels[-1] if cfg.backbone_weight > 0 else channels[0]  # clustering/cosine
        signals = np.full((2, n), np.nan)
        if cfg.loss_weight > 0:  # every rank decides alike: the collective runs everywhere
            rows = np.full(2 * n, np.nan)
            if view:
                losses, jacobians = self._evaluate(ctx, vectors)
                rows[view] = losses
                rows[[n + j for j in view]] = jacobians
            table = floats_allgather(
                topo.world, rows, watchdog=topo.watchdog, what="every rank's loss profile"
            )
            channels.append(profile_similarity(table[:, :n]))
            weights.append(cfg.loss_weight)
            signals = np.stack([table[rank, :n], table[rank, n:]])
        proposal = np.full(n, -1, dtype=np.int64)
        world_aff = np.full((2, n, n), np.nan)
        k = 0
        if view:
            seed = derive_seed(fed.config.run.seed, 6, ctx.r) % (2**31)

            def cluster(affinity: np.ndarray, k: int) -> np.ndarray:
                return spectral_labels(affinity, k, seed=seed)

            want = cfg.k if isinstance(cfg.k, int) else None
            mine = [c[ix] for c in channels]
            mixed = np.full((n, n), np.nan)
            mixed[ix] = mix(mine, reliable_weights(mine, weights, want, cfg.k_max, cluster))
            fed.state.evidence = accumulate(fed.state.evidence, mixed, cfg.memory)
            evidence = fed.state.evidence[ix]
            k, labels = partition(evidence, want, cfg.k_max, cluster)
            proposal[view] = labels
            world_aff[0][ix] = affinity_from_evidence(evidence)
            world_aff[1][ix] = recorded[ix]
        self._proposed(ctx, proposal, k, (world_aff, signals))

    def _assign_paper(self, ctx: RoundContext) -> None:
        fed = self.fed
        cfg = fed.config.clustering
        topo = fed.topology
        n = topo.size
        quarantined = ctx.quarantined
        proposal = np.full(n, -1, dtype=np.int64)
        world_aff = np.full((2, n, n), np.nan, dtype=np.float64)
        signals = np.full((2, n), np.nan)
        k = 0
        if not quarantined[topo.rank]:
            view = self._view(ctx)
            vectors = torch.stack([ctx.view_own, *(ctx.received[j] for j in view[1:])])
            p = fed.node.flat.n_trainable
            cos = cosine_matrix(vectors[:, :p], centered=cfg.cosine == "centered")
            losses, jacobians = self._evaluate(ctx, list(vectors))
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
            k, labels = self._propose(ctx, affinity)
            proposal[view] = labels
            world_aff[0][np.ix_(view, view)] = affinity
            world_aff[1][np.ix_(view, view)] = cos
            signals[0, view] = losses
            signals[1, view] = jacobians
        self._proposed(ctx, proposal, k, (world_aff, signals))
