"""Federated averaging of flat parameter vectors (the intra-group aggregation of ColNet)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "group_delta",
    "mean_from_sum",
    "staleness_weights",
    "streamed_average",
    "weighted_average",
    "with_weight",
]


def weighted_average(vectors: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Average the rows of ``vectors`` (shape ``(n, P)``) into one ``(P,)`` vector.

    Without ``weights`` every row counts the same (plain FedAvg with equal weights, as in the
    paper). With ``weights`` (for instance local sample counts) row ``i`` counts
    ``weights[i] / sum(weights)``; weights must be finite, non-negative and have a positive sum.
    The result has the dtype and device of ``vectors``.
    """
    if not isinstance(vectors, torch.Tensor):
        raise ValueError(f"vectors must be a torch.Tensor, got {type(vectors).__name__}")
    if vectors.dim() != 2:
        raise ValueError(f"vectors must have shape (n, P), got shape {tuple(vectors.shape)}")
    if not vectors.is_floating_point():
        raise ValueError(f"vectors must have a floating dtype, got {vectors.dtype}")
    n = vectors.shape[0]
    if n == 0:
        raise ValueError("vectors must hold at least one row (n >= 1), got n = 0")
    if weights is None:
        return vectors.mean(dim=0)
    coef = torch.tensor(_shares(weights, n), dtype=vectors.dtype, device=vectors.device)
    return coef @ vectors


def _shares(weights: Sequence[float], n: int) -> list[float]:
    """``weights`` divided by their sum, after checking them (one per row, finite, >= 0, with a
    positive sum)."""
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"weights must have one entry per row: expected {n}, got {len(w)}")
    bad = [x for x in w if not math.isfinite(x) or x < 0.0]
    if bad:
        raise ValueError(f"weights must be finite and >= 0, got {bad[0]!r} in {w}")
    total = math.fsum(w)
    if total <= 0.0:
        raise ValueError(f"weights must have a positive sum, got sum {total!r} for {w}")
    return [x / total for x in w]


def streamed_average(rows: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The weighted mean of ``rows`` (each of shape ``(P,)``), accumulated in float64 one row
    at a time: :func:`weighted_average` of their float64 stack up to rounding, without holding
    the ``(n, P)`` float64 stack (memory O(P) whatever n is). Returns float64."""
    if not rows:
        raise ValueError("rows must hold at least one vector, got none")
    shares = _shares(weights, len(rows))
    first = rows[0]
    out = torch.zeros(first.numel(), dtype=torch.float64, device=first.device)
    for share, row in zip(shares, rows, strict=True):
        if row.shape != first.shape:
            raise ValueError(
                f"rows must have one shape, got {tuple(row.shape)} and {tuple(first.shape)}"
            )
        out.add_(row.reshape(-1).to(torch.float64), alpha=share)
    return out


def staleness_weights(
    weights: Sequence[float], staleness: Sequence[int], decay: float
) -> list[float]:
    """Mixing weights of versions that are ``staleness`` rounds old: ``weight * decay ** s``.

    A version from a peer that is ahead (``s < 0``) counts as fresh (``s = 0``); ``decay``
    is in (0, 1] (1: staleness does not matter).
    """
    if len(weights) != len(staleness):
        raise ValueError(f"{len(weights)} weights for {len(staleness)} staleness values")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {decay!r}")
    return [float(w) * decay ** max(0, int(s)) for w, s in zip(weights, staleness, strict=True)]


def uncarried_share(
    weights: Sequence[float], tags: Sequence[tuple[int, int]], update: tuple[int, int]
) -> float:
    """The share of a weighted mix that does not yet hold ``update``.

    ``update`` and ``tags`` are ``(round, sender)`` of leader updates, ordered as tuples: a
    version tagged with ``update`` or a newer one holds it (a node applies only updates newer
    than its last). Adding ``share * update`` to the mix makes the update count once, however
    many of the mixed versions had applied it already: 1 when none had, 0 when all had.
    """
    if len(weights) != len(tags):
        raise ValueError(f"{len(weights)} weights for {len(tags)} tags")
    total = float(sum(weights))
    if not total > 0.0:
        raise ValueError(f"the weights must have a positive sum, got {list(weights)!r}")
    carried = sum(float(w) for w, tag in zip(weights, tags, strict=True) if tuple(tag) >= update)
    return max(0.0, 1.0 - carried / total)


def with_weight(vector: torch.Tensor, weight: float) -> torch.Tensor:
    """``[weight * vector, weight]``: one member's share of a weighted group sum.

    Summing these over a group (one Allreduce) and passing the sum to :func:`mean_from_sum`
    gives the weighted mean without a second message for the total weight.
    """
    return torch.cat([vector * weight, vector.new_tensor([weight])])


def mean_from_sum(summed: torch.Tensor) -> torch.Tensor:
    """The weighted mean from a sum of :func:`with_weight` vectors (last entry: total weight)."""
    return summed[:-1] / summed[-1]


def group_delta(aggregate: torch.Tensor, reference: torch.Tensor, n_trainable: int) -> torch.Tensor:
    """A group's update of its trainable parameters: ``aggregate - reference`` over the first
    ``n_trainable`` entries (BatchNorm statistics are not part of a delta)."""
    return aggregate[:n_trainable] - reference[:n_trainable]
