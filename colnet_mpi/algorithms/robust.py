"""Byzantine-robust group aggregation, update screening and leader verification (pure, no MPI)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from colnet_mpi.algorithms.fedavg import weighted_average
from colnet_mpi.algorithms.hca import hca_update

__all__ = [
    "ROBUST_RULES",
    "ScreenResult",
    "VerifyResult",
    "clip_scales",
    "coordinate_median",
    "finite_rows",
    "local_norm_scores",
    "mean_of_finite_rows",
    "norm_clipped_mean",
    "quarantine_vote",
    "robust_aggregate",
    "screen_updates",
    "trimmed_mean",
    "verify_hca",
]

#: Rules accepted by :func:`robust_aggregate` ("mean" is the plain FedAvg of fedavg.py).
ROBUST_RULES: tuple[str, ...] = ("mean", "median", "trimmed_mean", "norm_clipped_mean")

_NORM_EPS = 1e-12  # norms at or below this count as zero


def _check_updates(updates: torch.Tensor, *, finite: bool = True) -> torch.Tensor:
    """Validate an ``(m, p)`` floating tensor with ``m >= 1`` (and only finite values)."""
    if not isinstance(updates, torch.Tensor):
        raise ValueError(f"updates must be a torch.Tensor, got {type(updates).__name__}")
    if updates.dim() != 2 or updates.shape[0] == 0:
        raise ValueError(f"updates must have shape (m, p) with m >= 1, got {tuple(updates.shape)}")
    if not updates.is_floating_point():
        raise ValueError(f"updates must have a floating dtype, got {updates.dtype}")
    if finite and not bool(torch.isfinite(updates).all()):
        bad = [i for i in range(updates.shape[0]) if not bool(torch.isfinite(updates[i]).all())]
        raise ValueError(
            f"updates must contain only finite values (screen them first), got NaN or inf in rows {bad}"
        )
    return updates


def _median_rows(sorted_rows: torch.Tensor) -> torch.Tensor:
    """Median along dim 0 of already sorted rows; mean of the two middle rows for even m."""
    m = sorted_rows.shape[0]
    if m % 2 == 1:
        return sorted_rows[m // 2].clone()
    return 0.5 * (sorted_rows[m // 2 - 1] + sorted_rows[m // 2])


def coordinate_median(
    updates: torch.Tensor, weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Coordinate-wise median of the rows of ``updates`` (shape ``(m, p)``) as a ``(p,)`` vector.

    For an even ``m`` each coordinate is the mean of its two middle values (as ``numpy.median``).
    ``weights`` is accepted only so that every rule has the same call shape and is ignored: the
    median counts each node once, whatever its sample count, so a node cannot buy influence with a
    large claimed weight. The rule is translation-equivariant, so passing the members' deltas from
    a common start and adding the start back gives the same result as passing the full vectors.
    Non-finite values raise ``ValueError`` (screen the updates first).
    """
    del weights
    u = _check_updates(updates)
    return _median_rows(torch.sort(u, dim=0).values)


def trimmed_mean(
    updates: torch.Tensor, trim: float, weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Coordinate-wise trimmed mean of the rows of ``updates`` (shape ``(m, p)``).

    With ``k = floor(trim * m)`` the ``k`` lowest and the ``k`` highest values of every coordinate
    are dropped and the remaining ``m - 2k`` are averaged with equal weight (the convention of
    ``scipy.stats.trim_mean``); ``trim = 0`` is the plain mean. ``trim`` is the fraction cut from
    *each* side and must lie in ``[0, 0.5)``. ``weights`` is ignored, as in
    :func:`coordinate_median`. Translation-equivariant like the median.
    """
    del weights
    u = _check_updates(updates)
    m = u.shape[0]
    beta = float(trim)
    if not math.isfinite(beta) or beta < 0.0 or beta >= 0.5:
        raise ValueError(f"trim must lie in [0, 0.5) (fraction cut from each side), got {trim!r}")
    k = int(beta * m)
    if m - 2 * k < 1:  # pragma: no cover - impossible for trim < 0.5, kept as a guard
        raise ValueError(f"trim {beta} with m = {m} drops {k} per side and leaves no value")
    if k == 0:
        return u.mean(dim=0)
    return torch.sort(u, dim=0).values[k : m - k].mean(dim=0)


def norm_clipped_mean(
    updates: torch.Tensor,
    weights: Sequence[float] | None = None,
    clip: float | None = None,
    *,
    auto_factor: float = 1.0,
) -> torch.Tensor:
    """Weighted mean of the rows of ``updates`` after clipping each row's L2 norm.

    Row ``u_i`` becomes ``u_i * min(1, tau / ||u_i||)``. ``tau`` is ``clip`` when given (a finite
    number > 0); with ``clip=None`` it is ``auto_factor`` times the median of the row norms (the
    "auto" threshold: at most half the rows are shrunk when ``auto_factor = 1``). The clipped rows
    are averaged with :func:`colnet_mpi.algorithms.fedavg.weighted_average` (``weights`` as there).
    When no row exceeds ``tau`` the result is exactly that plain weighted mean.

    Unlike the median this rule is *not* translation-equivariant: pass deltas from the group's
    common start (trainable part, or the whole vector) and add the result back to the start.
    """
    u = _check_updates(updates)
    norms = torch.linalg.vector_norm(u.to(torch.float64), dim=1)
    if clip is None:
        factor = float(auto_factor)
        if not math.isfinite(factor) or factor <= 0.0:
            raise ValueError(f"auto_factor must be a finite number > 0, got {auto_factor!r}")
        tau = factor * float(_median_rows(torch.sort(norms).values.unsqueeze(1))[0])
    else:
        tau = float(clip)
        if not math.isfinite(tau) or tau <= 0.0:
            raise ValueError(f"clip must be None (auto) or a finite number > 0, got {clip!r}")
    scale = torch.ones_like(norms)
    over = norms > tau
    scale[over] = tau / norms[over]
    clipped = u * scale.to(u.dtype).unsqueeze(1)
    return weighted_average(clipped, weights)


def robust_aggregate(
    updates: torch.Tensor,
    rule: str,
    weights: Sequence[float] | None = None,
    *,
    trim: float = 0.1,
    clip: float | None = None,
    auto_factor: float = 1.0,
) -> torch.Tensor:
    """Apply one of :data:`ROBUST_RULES` to ``updates`` (shape ``(m, p)``); config-driven entry.

    ``"mean"`` is ``weighted_average(updates, weights)``; ``"median"``, ``"trimmed_mean"`` (with
    ``trim``) and ``"norm_clipped_mean"`` (with ``weights``, ``clip``, ``auto_factor``) are the
    functions of this module.
    """
    if rule == "mean":
        return weighted_average(_check_updates(updates), weights)
    if rule == "median":
        return coordinate_median(updates)
    if rule == "trimmed_mean":
        return trimmed_mean(updates, trim)
    if rule == "norm_clipped_mean":
        return norm_clipped_mean(updates, weights, clip, auto_factor=auto_factor)
    raise ValueError(f"rule must be one of {ROBUST_RULES}, got {rule!r}")


@dataclass(frozen=True)
class ScreenResult:
    """Outcome of :func:`screen_updates` for ``m`` updates (all sequences have length ``m``)."""

    keep: torch.Tensor
    """bool[m]: True for the updates to aggregate this round."""
    flagged: torch.Tensor
    """bool[m]: True where a test failed (kept anyway when screening was suspended)."""
    norm_scores: torch.Tensor
    """float64[m]: ``||u_i|| / median_j ||u_j||`` over the finite updates (NaN when undefined)."""
    cosine_scores: torch.Tensor
    """float64[m]: cosine of ``u_i`` to the coordinate-wise median of the other finite updates
    (of all three when there are three; NaN when undefined)."""
    reasons: list[str]
    """Why each update was flagged ("non-finite", the failed tests), "" when it passed."""
    note: str
    """Round-level remark: "" normally; says when tests were skipped or screening suspended."""


def _loo_medians(u: torch.Tensor) -> list[torch.Tensor]:
    """For each row ``i``, the coordinate-wise median of all rows except ``i`` (needs m >= 2).

    One sort of the ``(m, p)`` matrix; removing row ``i`` shifts the sorted positions at or above
    its rank down by one, so the middle of the remaining ``m - 1`` values is read off directly.
    """
    m = u.shape[0]
    values, order = torch.sort(u, dim=0)
    ranks = torch.empty_like(order)
    ranks.scatter_(0, order, torch.arange(m, device=u.device).unsqueeze(1).expand_as(order))
    q = m - 1

    def at(rank_i: torch.Tensor, h: int) -> torch.Tensor:
        return torch.where(rank_i > h, values[h], values[h + 1])

    out = []
    for i in range(m):
        r = ranks[i]
        if q % 2 == 1:
            out.append(at(r, (q - 1) // 2))
        else:
            out.append(0.5 * (at(r, q // 2 - 1) + at(r, q // 2)))
    return out


def screen_updates(
    updates: torch.Tensor, norm_ratio: float, min_cosine: float, *, exclude_norm: bool = True
) -> ScreenResult:
    """Flag the updates of a group that are outliers against the others (rows of ``(m, p)``).

    Tests, in order:

    1. *non-finite*: a row with any NaN/inf is always excluded (it cannot be aggregated).
    2. *norm*: ``s_i = ||u_i|| / median_j ||u_j||`` over the finite rows; flagged when
       ``s_i > norm_ratio`` or ``s_i < 1 / norm_ratio`` (``norm_ratio >= 1``; ``inf`` disables).
       If the median norm is zero, zero rows score 1 and non-zero rows score inf.
       With ``exclude_norm=False`` the scores are still computed but a failed norm test flags
       nothing (the caller clips those rows instead, see :func:`clip_scales`).
    3. *cosine*: ``c_i`` = cosine of ``u_i`` to the coordinate-wise median of the *other* finite
       rows (a leave-one-out median, so an outlier neither sets its own reference nor, being one
       value among several, moves the reference of the honest rows much); flagged when
       ``c_i < min_cosine`` (``min_cosine`` in ``[-1, 1]``; ``-1`` disables). With exactly three
       finite rows the median of the other two would be their mean, which one outlier drags
       anywhere, so there the reference is the median of all three. Undefined (NaN, test not
       applied) when ``u_i`` or its reference is zero; the norm test covers zero rows.

    Majority rule: the relative tests assume an honest majority, so they may exclude at most
    ``(f - 1) // 2`` of the ``f`` finite rows. If more are flagged, the group is too heterogeneous
    (or the thresholds too tight) for the tests to mean anything; then no finite row is excluded,
    ``flagged`` and ``reasons`` still say what failed, and ``note`` says screening was suspended.

    With ``f <= 2`` finite rows there is no majority to compare against: only the non-finite test
    applies, the scores are still reported (informative only) and ``note`` says so.
    Rows should be deltas from the group's common start (the trainable part), not full vectors.
    """
    u = _check_updates(updates, finite=False)
    ratio = float(norm_ratio)
    if math.isnan(ratio) or ratio < 1.0:
        raise ValueError(f"norm_ratio must be >= 1 (inf disables the test), got {norm_ratio!r}")
    cos_min = float(min_cosine)
    if not math.isfinite(cos_min) or not -1.0 <= cos_min <= 1.0:
        raise ValueError(
            f"min_cosine must lie in [-1, 1] (-1 disables the test), got {min_cosine!r}"
        )
    m = u.shape[0]
    finite = torch.isfinite(u).all(dim=1).cpu()
    idx = [i for i in range(m) if bool(finite[i])]
    f = len(idx)
    norm_scores = torch.full((m,), math.nan, dtype=torch.float64)
    cosine_scores = torch.full((m,), math.nan, dtype=torch.float64)
    reasons = ["" if bool(finite[i]) else "non-finite" for i in range(m)]
    flagged = ~finite
    if f == 0:
        return ScreenResult(
            ~flagged, flagged.clone(), norm_scores, cosine_scores, reasons, "no finite update"
        )
    uf = u[idx].to(torch.float64)
    norms = torch.linalg.vector_norm(uf, dim=1).cpu()
    med = float(_median_rows(torch.sort(norms).values.unsqueeze(1))[0])
    if med > _NORM_EPS:
        s = norms / med
    else:
        s = torch.where(norms > _NORM_EPS, math.inf, 1.0).to(torch.float64)
    norm_scores[idx] = s
    if f >= 2:
        refs = _loo_medians(uf) if f != 3 else [coordinate_median(uf)] * 3
        for j, i in enumerate(idx):
            ref_norm = float(torch.linalg.vector_norm(refs[j]))
            if float(norms[j]) > _NORM_EPS and ref_norm > _NORM_EPS:
                dot = float(torch.dot(uf[j], refs[j]))
                cosine_scores[i] = max(-1.0, min(1.0, dot / (float(norms[j]) * ref_norm)))
    if f <= 2:
        note = f"only {f} finite update(s): relative tests not applied, only the non-finite test"
        keep = finite.clone()
        return ScreenResult(keep, flagged.clone(), norm_scores, cosine_scores, reasons, note)
    rel_flag = torch.zeros(m, dtype=torch.bool)
    for i in idx:
        why = []
        si = float(norm_scores[i])
        if exclude_norm and (si > ratio or si < 1.0 / ratio):
            why.append(f"norm ratio {si:.3g} outside [{1.0 / ratio:.3g}, {ratio:.3g}]")
        ci = float(cosine_scores[i])
        if not math.isnan(ci) and ci < cos_min:
            why.append(f"cosine {ci:.3g} < {cos_min:.3g}")
        if why:
            rel_flag[i] = True
            reasons[i] = "; ".join(why)
    n_flag = int(rel_flag.sum())
    limit = (f - 1) // 2
    note = ""
    if n_flag > limit:
        note = (
            f"{n_flag} of {f} finite updates flagged, more than the {limit} screening may exclude: "
            "screening suspended, all finite updates kept"
        )
        keep = finite.clone()
    else:
        keep = finite & ~rel_flag
    return ScreenResult(keep, flagged | rel_flag, norm_scores, cosine_scores, reasons, note)


def clip_scales(norm_scores: torch.Tensor, norm_ratio: float) -> torch.Tensor:
    """Factors that bring too-large updates back to their reference norm (float64, same length).

    A row whose norm score (its norm over its reference norm, as from :func:`screen_updates` or
    :func:`local_norm_scores`) is above ``norm_ratio`` gets ``1 / score``: multiplied by it, the
    update keeps its direction and gets the reference norm (a scaled-boost update becomes the
    honest one again). Every other row, NaN and infinite scores included, gets 1 (non-finite rows
    are the non-finite test's business).
    """
    s = torch.as_tensor(norm_scores, dtype=torch.float64).cpu()
    ratio = float(norm_ratio)
    if not ratio >= 1.0:
        raise ValueError(f"norm_ratio must be >= 1, got {norm_ratio!r}")
    out = torch.ones_like(s)
    over = torch.isfinite(s) & (s > ratio)
    out[over] = 1.0 / s[over]
    return out


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_hca`."""

    ok: bool
    """True when the received update is within the tolerance of the recomputed one."""
    rel_error: float
    """``||received - recomputed|| / max(||recomputed||, eps)`` (inf for a non-finite one)."""
    recomputed: torch.Tensor
    """The HCA update recomputed from the deltas (dtype/device of ``received_update``)."""


def verify_hca(
    deltas: torch.Tensor,
    received_update: torch.Tensor,
    alpha: float,
    tolerance: float = 1e-3,
    *,
    eps: float = 1e-12,
) -> VerifyResult:
    """Check a leader's HCA update against a recomputation from the leaders' deltas ``(G, P)``.

    Recomputes ``hca_update(deltas.double(), alpha).update``. That is deterministic for identical
    input on one machine (fixed SLSQP start and settings, float64), but members may run other
    BLAS builds or devices, and the update may reach them through a float32 backbone, so the test
    is relative: accepted when ``||received - recomputed|| / max(||recomputed||, eps) <= tolerance``.
    The default ``1e-3`` leaves room for float32 transport and rejects a ×2 scaling (error 1) or
    added noise of relative norm >= 1e-3. A non-finite received update is rejected (error inf).
    ``deltas`` must be finite (``ValueError`` otherwise, from ``hca_update``).
    """
    if not isinstance(received_update, torch.Tensor):
        raise ValueError(
            f"received_update must be a torch.Tensor, got {type(received_update).__name__}"
        )
    tol = float(tolerance)
    if math.isnan(tol) or tol < 0.0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    if not isinstance(deltas, torch.Tensor) or deltas.dim() != 2:
        shape = tuple(deltas.shape) if isinstance(deltas, torch.Tensor) else type(deltas).__name__
        raise ValueError(f"deltas must be a (G, P) torch.Tensor, got {shape}")
    if tuple(received_update.shape) != (deltas.shape[1],):
        raise ValueError(
            f"received_update must have shape ({deltas.shape[1]},) to match the deltas, "
            f"got {tuple(received_update.shape)}"
        )
    res = hca_update(deltas.detach().to(torch.float64), alpha)
    recomputed = res.update
    out = recomputed.to(received_update.dtype).to(received_update.device)
    recv = received_update.detach().to(torch.float64).to(recomputed.device)
    if not bool(torch.isfinite(recv).all()):
        return VerifyResult(False, math.inf, out)
    err = float(torch.linalg.vector_norm(recv - recomputed))
    rel = err / max(float(torch.linalg.vector_norm(recomputed)), float(eps))
    return VerifyResult(rel <= tol, rel, out)


def local_norm_scores(updates: torch.Tensor, neighbours: int | None = None) -> torch.Tensor:
    """``||u_i||`` over the median norm of the rows most similar to ``u_i`` (float64[m]).

    For mixed populations (nodes of different tasks update at different scales, e.g. a landmark
    regression and an attribute classifier), a global median norm hides a boosted update; its
    closest rows by cosine, the updates of its own task, do not. ``neighbours`` is how many of
    the other rows form the reference (default ``max(1, (m - 1) // 2)``; with an even count
    the lower of the two middle norms is taken, so one outlier among two neighbours cannot lift
    the reference). A non-finite row
    scores inf; a row that is the only finite one, or whose reference norm is zero while its own
    is not, scores inf when non-zero and 1 when zero.
    """
    u = _check_updates(updates, finite=False).double()
    m = u.shape[0]
    finite = torch.isfinite(u).all(dim=1)
    scores = torch.full((m,), math.inf, dtype=torch.float64)
    idx = torch.nonzero(finite).flatten()
    if idx.numel() == 0:
        return scores
    f = u[idx]
    norms = torch.linalg.vector_norm(f, dim=1)
    k = max(1, (idx.numel() - 1) // 2) if neighbours is None else int(neighbours)
    if k < 1:
        raise ValueError(f"neighbours must be >= 1, got {neighbours!r}")
    unit = f / norms.clamp_min(_NORM_EPS).unsqueeze(1)
    cos = unit @ unit.T
    cos.fill_diagonal_(-math.inf)
    for a in range(idx.numel()):
        others = min(k, idx.numel() - 1)
        if others == 0:
            scores[idx[a]] = math.nan
            continue
        nearest = torch.topk(cos[a], others).indices
        ref = float(torch.median(norms[nearest]))
        own = float(norms[a])
        if ref > _NORM_EPS:
            scores[idx[a]] = own / ref
        else:
            scores[idx[a]] = 1.0 if own <= _NORM_EPS else math.inf
    return scores


def finite_rows(rows: torch.Tensor) -> torch.Tensor:
    """bool mask of the rows of a 2-D tensor whose values are all finite."""
    return torch.isfinite(rows).all(dim=1)


def mean_of_finite_rows(rows: torch.Tensor, own_row: int) -> torch.Tensor | None:
    """Equal-weight mean of the finite rows (FedPer's cross-group mean of group backbones).

    None when row ``own_row`` itself is not finite (the caller keeps its own value).
    """
    usable = finite_rows(rows)
    return rows[usable].mean(dim=0) if bool(usable[own_row]) else None


def quarantine_vote(verdicts: np.ndarray, *, refused_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """Majority vote over every node's screening verdicts about every other node.

    ``verdicts[i, j]``: node i's verdict on node j (-1 not tested, 0 passed, 1 flagged, 2 its
    buffer was refused). Node j is an *outlier* when a strict majority of the nodes that tested
    it flagged it or refused its buffer. Returns ``(outlier, quarantined)``: ``quarantined`` is
    ``outlier`` or, with ``refused_only``, only the nodes a strict majority refused (their
    too-large updates are clipped instead). Every rank computes the same answer from the same
    all-gathered verdicts.
    """
    v = np.asarray(verdicts)
    if v.ndim != 2 or v.shape[0] != v.shape[1]:
        raise ValueError(f"verdicts must be a square (n, n) matrix, got shape {v.shape}")
    tested = (v >= 0).sum(axis=0)
    outlier = 2 * (v >= 1).sum(axis=0) > tested
    if not refused_only:
        return outlier, outlier
    return outlier, 2 * (v == 2).sum(axis=0) > tested
