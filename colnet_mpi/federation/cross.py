"""Cross-group aggregators: how the group leaders combine the groups (stage 4).

A cross aggregator runs on every member of every group when there is more than one group;
``combine`` must leave the leader's result in ``ctx.new`` (stage 5 broadcasts it to the group).
Members may take part in collectives on their group communicator (e.g. a reduce to the leader).
Register a new one in ``federation/schemes.py`` (``CROSS``) and name it in a scheme.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from colnet_mpi.algorithms.fedavg import mean_from_sum, with_weight
from colnet_mpi.algorithms.hca import apply_update, hca_update
from colnet_mpi.algorithms.robust import finite_rows, mean_of_finite_rows
from colnet_mpi.federation.context import RoundContext

if TYPE_CHECKING:
    from colnet_mpi.federation.loop import Federation


class CrossAggregator(Protocol):
    """Combines groups through their leaders."""

    #: False: the scheme has no cross-group stage (and no redistribution).
    active: bool
    #: True: members can recompute the leader's result (``defense.verify_leader``).
    verifiable: bool

    def __init__(self, fed: Federation) -> None: ...

    def combine(self, ctx: RoundContext) -> None:
        """Leave the combined backbone in ``ctx.new`` on the leader."""

    def leader_result(self, ctx: RoundContext, deltas: torch.Tensor) -> torch.Tensor:
        """What the leader must have computed from the leaders' ``deltas`` (verifiable rules)."""


class NoCross:
    """No cross-group stage: each group keeps its own aggregate."""

    active = False
    verifiable = False

    def __init__(self, fed: Federation) -> None:
        self.fed = fed

    def combine(self, ctx: RoundContext) -> None:
        """Nothing to do."""

    def leader_result(self, ctx: RoundContext, deltas: torch.Tensor) -> torch.Tensor:
        """Not verifiable: the group result stands."""
        return ctx.intra_new


class MeanOfGroups(NoCross):
    """FedPer-style: the equal-weight mean of the group backbones, sent to everyone."""

    active = True

    def combine(self, ctx: RoundContext) -> None:
        """Leaders all-gather their group backbones and average the finite ones."""
        fed = self.fed
        if fed.topology.is_leader:
            backbones = fed.transport.leaders_allgather(ctx.new)
            mean = mean_of_finite_rows(backbones, ctx.row)
            ctx.new = ctx.new if mean is None else mean


class HCA(NoCross):
    """ColNet's hyper-conflict-averse aggregation of the group deltas, added with weight psi."""

    active = True
    verifiable = True

    def combine(self, ctx: RoundContext) -> None:
        """Group delta onto the leader (onto every member with verification), then the solve."""
        fed = self.fed
        tr = fed.transport
        if ctx.group_delta is None:
            p = fed.node.flat.n_trainable
            part = with_weight(ctx.contribution[:p] - ctx.start[:p], ctx.weight)
            total = tr.group_sum(part) if ctx.verify else tr.reduce_to_leader(part)
            if total is not None:
                ctx.group_delta = mean_from_sum(total)
        if fed.topology.is_leader:
            assert ctx.group_delta is not None
            ctx.deltas = tr.leaders_allgather(ctx.group_delta)
            ctx.new = self.leader_result(ctx, ctx.deltas, record=True)

    def leader_result(
        self, ctx: RoundContext, deltas: torch.Tensor, *, record: bool = False
    ) -> torch.Tensor:
        """HCA over the leaders' finite deltas, added to the group result (``ctx.intra_new``).

        With ``record`` the solver's figures go to ``ctx.hca`` (the leader's record).
        """
        fed = self.fed
        cfg = fed.config.hca
        r, row = ctx.r, ctx.row
        usable = finite_rows(deltas)
        if not bool(usable[row]) or int(usable.sum()) < 2:
            fed.log(f"round {r}: leader {fed.topology.rank} skipped HCA (non-finite deltas)")
            return ctx.intra_new
        res = hca_update(deltas[usable].double(), alpha=cfg.alpha)
        new = apply_update(ctx.intra_new, res.update, cfg.psi, fed.node.flat.n_trainable)
        if not res.solver_ok:
            fed.log(f"round {r}: HCA solver failed ({res.message}); used uniform weights")
        if record:
            ctx.hca = {
                "hca/weights": float(res.weights[int(usable[:row].sum())]),
                "hca/mean_delta_norm": res.mean_delta_norm,
                "hca/update_norm": res.update_norm,
                "hca/solver_ok": int(res.solver_ok),
            }
        return new
