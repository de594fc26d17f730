"""Defense policy of a round: screening before clustering (the quarantine vote), screening inside
groups, and members checking their leader's broadcast. The maths is in ``algorithms/robust.py``;
this module decides who is tested, by whom, and what happens to an outlier.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from colnet_mpi.algorithms.robust import (
    clip_scales,
    finite_rows,
    local_norm_scores,
    quarantine_vote,
    screen_updates,
    verify_hca,
)
from colnet_mpi.attacks.plan import relative_difference
from colnet_mpi.comm.topology import ints_allgather
from colnet_mpi.federation.context import Defended, RoundContext
from colnet_mpi.metrics.names import EXCLUSION_REASONS

if TYPE_CHECKING:
    from colnet_mpi.federation.loop import Federation


def reason_code(reason: str, kept: bool) -> int:
    """Index into EXCLUSION_REASONS for a screening reason text."""
    if kept:
        return 0
    if "non-finite" in reason:
        return EXCLUSION_REASONS.index("non-finite")
    norm, cosine = "norm" in reason, "cosine" in reason
    if norm and cosine:
        return EXCLUSION_REASONS.index("norm+cosine")
    return EXCLUSION_REASONS.index("cosine" if cosine else "norm")


class Defense:
    """The ``[defense]`` policy of one rank."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.config = fed.config.defense

    def prescreen(self, ctx: RoundContext) -> None:
        """Update screening before clustering (``defense.screening``): which nodes to quarantine.

        Every node tests the updates of its group-mates of the last round it was not quarantined
        in (their backbones started from the same point as its own, so ``backbone - start`` is
        their update, plus any drift of a node that sat out; in round 1, everyone) with a norm
        test against the most similar updates (``local_norm_scores``): nodes of other tasks may
        update at another scale, a boosted update is large against its own task's. Only
        too-large updates are flagged here; refused buffers count as flagged. The verdicts are
        all-gathered and voted on (``quarantine_vote``), so the decision is the same on every
        rank. With ``norm_action = "exclude"`` outliers are quarantined; with ``"clip"`` only
        nodes whose buffers a majority refused are, and every node rescales the too-large
        updates in its own view (``ctx.received`` is changed in place). Sets
        ``ctx.quarantined`` and ``ctx.view_own``.
        """
        fed = self.fed
        topo = fed.topology
        own, start, received, defended = ctx.own, ctx.start, ctx.received, ctx.defended
        n = topo.size
        verdict = np.full(n, -1, dtype=np.int64)  # -1 not tested, 0 passed, 1 flagged, 2 refused
        for src, _reason in fed.transport.rejected:
            verdict[src] = 2
        home = fed.state.home_groups
        mates = [topo.rank, *(j for j in sorted(received) if home[j] == home[topo.rank])]
        p = fed.node.flat.n_trainable
        rows = torch.stack([own[:p] - start[:p], *(received[j][:p] - start[:p] for j in mates[1:])])
        scores = local_norm_scores(rows.double())
        ratio = self.config.norm_ratio
        for i, j in enumerate(mates):
            if not math.isnan(float(scores[i])):  # NaN: nobody to compare with, untested
                verdict[j] = int(not float(scores[i]) <= ratio)
        verdicts = ints_allgather(
            topo.world, verdict, watchdog=topo.watchdog, what="every rank's screening verdict"
        )
        clip = self.config.norm_action == "clip"
        outlier, quarantined = quarantine_vote(verdicts, refused_only=clip)
        defended.norm_score = float(scores[0])
        if clip:
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
        ctx.quarantined, ctx.view_own = quarantined, own

    def screen_group(
        self, updates: torch.Tensor, weights: torch.Tensor, defended: Defended
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Screening inside a group over its members' gathered ``updates`` (rows in group order).

        Non-finite rows are always left out; with ``defense.screening`` norm and cosine
        outliers are too (or, with ``norm_action = "clip"``, too-large updates are rescaled to
        the norm of their most similar rows and kept). Records this member's verdict in
        ``defended``. Returns the (possibly rescaled) updates and the rows to keep.
        """
        d = self.config
        fed = self.fed
        p = fed.node.flat.n_trainable
        clip = d.screening and d.norm_action == "clip"
        screen = screen_updates(
            updates[:, :p].double(),
            norm_ratio=d.norm_ratio if d.screening else math.inf,
            min_cosine=d.min_cosine if d.screening else -1.0,
            exclude_norm=not clip,
        )
        keep = screen.keep & finite_rows(updates).to(screen.keep.device) & torch.isfinite(weights)
        me = fed.topology.group_members.index(fed.topology.rank)
        reason = screen.reasons[me]
        defended.excluded = int(not bool(keep[me]))
        defended.reason = reason_code(reason, bool(keep[me]))
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
        if screen.note and me == fed.topology.leader_rank_in_group:
            fed.log(f"  screening in the group led by rank {fed.topology.rank}: {screen.note}")
        return updates, keep

    def check_leader(self, ctx: RoundContext, received: torch.Tensor) -> torch.Tensor:
        """Leader verification on a member: recompute the cross-group result from the leader's
        deltas (after checking this group's own row) and compare with the broadcast; on a
        mismatch keep the recomputed result and record the leader as suspect."""
        fed = self.fed
        hca = fed.config.hca
        tol = self.config.tolerance
        deltas, row, defended = ctx.deltas, ctx.row, ctx.defended
        assert deltas is not None and ctx.group_delta is not None
        p = fed.node.flat.n_trainable
        own_row_error = relative_difference(deltas[row], ctx.group_delta)
        honest = fed.cross.leader_result(ctx, deltas)
        error = max(own_row_error, relative_difference(received, honest))
        if hca.psi > 0 and bool(torch.isfinite(received).all()):
            # the paper-level check: the trainable update against a fresh HCA solve
            update = (received[:p] - ctx.intra_new[:p]).double() / hca.psi
            usable = finite_rows(deltas)
            if bool(usable[row]) and int(usable.sum()) >= 2:
                check = verify_hca(deltas[usable], update, hca.alpha, tol)
                error = max(
                    own_row_error,
                    check.rel_error,
                    relative_difference(received[p:], ctx.intra_new[p:])
                    if received.numel() > p
                    else 0.0,
                )
        defended.verify_error = error
        if error <= tol:
            return received
        defended.leader_rejected = 1
        leader = int(fed.topology.group_members[fed.topology.leader_rank_in_group])
        fed.log(
            f"round {ctx.r}: rank {fed.topology.rank} rejected the broadcast of leader {leader} "
            f"(relative error {error:.3g} > {tol:g})"
        )
        return honest
