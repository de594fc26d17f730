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
from colnet_mpi.comm.topology import ints_allgather
from colnet_mpi.federation.context import RoundContext
from colnet_mpi.node import derive_seed

if TYPE_CHECKING:
    from colnet_mpi.federation.loop import Federation


class Grouper(Protocol):
    """Decides the partition of the round (collectively: every rank must agree)."""

    def __init__(self, fed: Federation) -> None: ...

    def assign(self, ctx: RoundContext) -> None:
        """Set ``ctx.groups`` and ``ctx.k`` (and any diagnostics)."""


class TrueTasks:
    """The true task groups, fixed (as in the authors' code): isolates aggregation from clustering."""

    def __init__(self, fed: Federation) -> None:
        self.labels = fed.true_labels

    def assign(self, ctx: RoundContext) -> None:
        """Every node with its task group; quarantined nodes get -1."""
        ctx.groups = np.where(ctx.quarantined, -1, canonical_labels(self.labels))
        ctx.k = int(np.unique(self.labels).size)


class TaskAwareClustering:
    """The paper's task-aware clustering: a proposal from each node's view, then a consensus."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed

    def assign(self, ctx: RoundContext) -> None:
        """This node's proposal from its own view, then the agreed partition.

        Quarantined nodes are left out of every view and of the consensus; they get group -1.
        A quarantined node proposes nothing but still joins the collective.
        """
        fed = self.fed
        cfg = fed.config.clustering
        seed = fed.config.run.seed
        topo = fed.topology
        n = topo.size
        quarantined = ctx.quarantined
        proposal = np.full(n, -1, dtype=np.int64)
        world_aff = np.full((2, n, n), np.nan, dtype=np.float64)
        signals = np.full((2, n), np.nan)
        k = 0
        if not quarantined[topo.rank]:
            view = [topo.rank, *(j for j in sorted(ctx.received) if not quarantined[j])]
            vectors = torch.stack([ctx.view_own, *(ctx.received[j] for j in view[1:])])
            p = fed.node.flat.n_trainable
            cos = cosine_matrix(vectors[:, :p], centered=cfg.cosine == "centered")
            gen = torch.Generator(device=fed.node.device).manual_seed(
                derive_seed(seed, 5, topo.rank, ctx.r)
            )
            losses, jacobians = zip(*(fed.node.signals(v, gen) for v in vectors), strict=False)
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
            labels = spectral_labels(affinity, k, seed=derive_seed(seed, 6, ctx.r) % (2**31))
            proposal[view] = labels
            world_aff[0][np.ix_(view, view)] = affinity
            world_aff[1][np.ix_(view, view)] = cos
            signals[0, view] = losses
            signals[1, view] = jacobians
        proposals = ints_allgather(
            topo.world, proposal, watchdog=topo.watchdog, what="every rank's grouping proposal"
        )
        active = np.flatnonzero(~quarantined)
        want = min(cfg.k, active.size) if isinstance(cfg.k, int) else None
        groups = np.full(n, -1, dtype=np.int64)
        groups[active] = consensus_partition(proposals[np.ix_(active, active)], want)
        ctx.proposal, ctx.affinity, ctx.signals = proposal, world_aff, signals
        ctx.groups, ctx.k = groups, int(k)
