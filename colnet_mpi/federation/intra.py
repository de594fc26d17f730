"""Intra-group aggregators: how the members of a group combine their backbones (stage 3c).

An aggregator reads ``ctx.contribution`` (what this member puts in), ``ctx.start`` and
``ctx.weight`` and sets ``ctx.new`` (the group's backbone, identical on every member) and, when
it knows it, ``ctx.group_delta``. Register a new one in ``federation/schemes.py`` (``INTRA``);
``defense.aggregation`` selects it by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from colnet_mpi.algorithms.fedavg import group_delta, mean_from_sum, with_weight
from colnet_mpi.algorithms.robust import robust_aggregate
from colnet_mpi.comm.buffers import checksum
from colnet_mpi.federation.context import RoundContext

if TYPE_CHECKING:
    from colnet_mpi.federation.loop import Federation


class IntraAggregator(Protocol):
    """Combines a group's backbones; every member calls it (collectively) on its group."""

    def __init__(self, fed: Federation) -> None: ...

    def aggregate(self, ctx: RoundContext) -> None:
        """Set ``ctx.new`` (and ``ctx.group_delta`` if known)."""


class GatheredRule:
    """A rule over the members' individual updates: every member gathers them all, screens them
    (``federation/defense.py``) and applies :meth:`combine`; all compute the same result.

    Updates are taken from the group's common starting backbone (the leader's start when the
    members' starts differ, i.e. the group changed this round). Subclasses name a rule of
    ``algorithms/robust.py`` or override :meth:`combine`.
    """

    rule = "mean"

    def __init__(self, fed: Federation) -> None:
        self.fed = fed

    def combine(self, updates: torch.Tensor, weights: list[float]) -> torch.Tensor:
        """One update from the kept members' updates (float64 rows) and their weights."""
        d = self.fed.config.defense
        return robust_aggregate(updates, self.rule, weights, trim=d.trim, clip=d.clip or None)

    def aggregate(self, ctx: RoundContext) -> None:
        """Gather, screen and combine; sets ``ctx.new`` and ``ctx.group_delta``."""
        tr = self.fed.transport
        start = ctx.start
        if tr.group_all_equal(checksum(start)):
            reference = start
        else:
            reference = tr.group_broadcast(start)
        weight = ctx.contribution.new_tensor([ctx.weight])
        rows = tr.group_allgather(torch.cat([ctx.contribution - reference, weight]))
        updates, weights = rows[:, :-1], rows[:, -1]
        updates, keep = self.fed.defense.screen_group(updates, weights, ctx.defended)
        if not bool(keep.any()):  # nothing usable: keep the common start
            ctx.new = reference.clone()
        else:
            aggregate = self.combine(updates[keep].double(), weights[keep].double().tolist())
            ctx.new = reference + aggregate.to(reference.dtype)
        ctx.group_delta = group_delta(ctx.new, reference, self.fed.node.flat.n_trainable)


class FedAvg(GatheredRule):
    """FedAvg: one Allreduce of the weighted backbones. With screening on, or when a member sent
    non-finite values (every member sees that in the sum), the gathered path instead."""

    def aggregate(self, ctx: RoundContext) -> None:
        """Weighted mean of the members' backbones."""
        fed = self.fed
        if not fed.config.defense.screening:
            summed = fed.transport.group_sum(with_weight(ctx.contribution, ctx.weight))
            if bool(torch.isfinite(summed).all()):
                ctx.new = mean_from_sum(summed)
                return
            if fed.topology.is_leader:
                fed.log(f"round {ctx.r}: non-finite values in the group sum; screening them")
        super().aggregate(ctx)


class Median(GatheredRule):
    """Coordinate-wise median of the members' updates."""

    rule = "median"


class TrimmedMean(GatheredRule):
    """Coordinate-wise trimmed mean (``defense.trim`` dropped at each end)."""

    rule = "trimmed_mean"


class NormClippedMean(GatheredRule):
    """Mean of the updates clipped to ``defense.clip`` (0: the group's median norm)."""

    rule = "norm_clipped_mean"
