"""Resemblance signals for task-aware clustering (the default, ``clustering.signals = "resemblance"``).

Pure maths; the grouper in ``federation/grouping.py`` feeds it. Three ideas, each answering a
failure of the literal signals under label heterogeneity:

* **Update cosine.** The cosine between two nodes' *round updates* (backbone after local training
  minus backbone at the start of the round). Group-mates share a backbone after each round, so
  the cosine between backbones mostly repeats the last partition, right or wrong; the update is
  the direction the node's own data pulls in, whatever group it was in. Large backbones are
  compressed to a fixed-size sign sketch (:class:`UpdateSketch`) sent with the backbone.
* **Loss profiles.** Every node evaluates every backbone it sees on its own data (with its own
  head) and shares that row of losses. Two nodes resemble each other when their rows rise and
  fall together over the *other* models: a Pearson correlation of log-losses after removing each
  model's average (a model that is good or bad for everyone says nothing about who resembles
  whom). The same is done for the Jacobian norms.
* **Evidence over rounds.** Each channel is standardised over its off-diagonal entries, the
  channels are mixed with their weights, and the mix is averaged over rounds with an exponential
  moving average. The affinity handed to spectral clustering keeps only the positive part
  (pairs that resemble each other more than the average pair), so unrelated pairs sit at 0 and
  the eigengap finds the number of groups.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "UpdateSketch",
    "accumulate",
    "affinity_from_evidence",
    "choose_k",
    "mix",
    "profile_similarity",
    "silhouette",
]


class UpdateSketch:
    """A fixed-size random-sign sketch of length-``n`` vectors with ``dim`` entries.

    Entry ``i`` of the vector goes, multiplied by a random sign, into bucket ``i mod dim``; the
    buckets are summed. Inner products of sketches are unbiased estimates of the vectors' inner
    products; the relative error of a cosine is about ``1 / sqrt(dim)``. Every rank builds the
    same signs from ``seed``. With ``dim >= n`` (or ``dim == 0``) the vector itself is used.
    """

    def __init__(self, n: int, dim: int, seed: int, device: torch.device | None = None) -> None:
        if n < 1 or dim < 0:
            raise ValueError(f"a sketch needs n >= 1 and dim >= 0, got n={n}, dim={dim}")
        self.n = n
        self.exact = dim == 0 or dim >= n
        self.dim = n if self.exact else dim
        self.rows = -(-n // self.dim)  # ceil
        self.signs: torch.Tensor | None = None
        if not self.exact:
            gen = torch.Generator().manual_seed(int(seed) % (2**63))
            bits = torch.randint(0, 2, (self.rows * self.dim,), generator=gen, dtype=torch.int8)
            self.signs = (bits * 2 - 1).to(device or torch.device("cpu"))

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        """The sketch of ``vector`` (float32, ``dim`` entries)."""
        if vector.numel() != self.n:
            raise ValueError(f"the sketch is for {self.n} values, got {vector.numel()}")
        v = vector.detach().reshape(-1).to(torch.float32)
        if self.exact:
            return v.clone()
        assert self.signs is not None
        padded = torch.zeros(self.rows * self.dim, dtype=torch.float32, device=v.device)
        padded[: self.n] = v
        padded *= self.signs.to(v.device)
        return padded.view(self.rows, self.dim).sum(dim=0)


def profile_similarity(values: np.ndarray) -> np.ndarray:
    """How much two nodes' evaluation profiles agree -> (N, N) in [-1, 1], NaN where undefined.

    ``values[i, j]`` is node i's measurement (a loss, a Jacobian norm; > 0) of model j on its own
    data, NaN where i did not evaluate j. The diagonal (a node's own model with its co-trained
    head) is left out; log-values are centred per model (column), and rows ``a``, ``b`` are
    correlated over the models both evaluated other than ``a`` and ``b`` themselves (at least
    two). A constant row gives 0.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] != v.shape[1]:
        raise ValueError(f"values must be a square (N, N) matrix, got shape {v.shape}")
    n = v.shape[0]
    m = np.log(np.clip(v, 1e-12, None))
    m[~np.isfinite(v)] = np.nan
    np.fill_diagonal(m, np.nan)
    with np.errstate(all="ignore"):
        col = np.nanmean(m, axis=0) if n > 1 else np.zeros(n)
    m = m - np.where(np.isfinite(col), col, 0.0)[None, :]
    out = np.full((n, n), np.nan)
    for a in range(n):
        out[a, a] = 1.0
        for b in range(a + 1, n):
            both = np.isfinite(m[a]) & np.isfinite(m[b])
            both[[a, b]] = False
            if both.sum() < 2:
                continue
            x, y = m[a, both], m[b, both]
            x, y = x - x.mean(), y - y.mean()
            den = float(np.sqrt((x * x).sum() * (y * y).sum()))
            out[a, b] = out[b, a] = float((x * y).sum()) / den if den > 0 else 0.0
    return out


def mix(channels: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of similarity channels that share the range [-1, 1] (centred cosines,
    correlations), entry by entry; a channel that is NaN at an entry is left out there (the
    others' weights are rescaled), all-NaN gives NaN. Weight-0 channels are skipped."""
    if len(channels) != len(weights) or not channels:
        raise ValueError("give one weight per channel, and at least one channel")
    shape = np.asarray(channels[0]).shape
    total = np.zeros(shape)
    mass = np.zeros(shape)
    for channel, w in zip(channels, weights, strict=True):
        if w < 0 or not np.isfinite(w):
            raise ValueError(f"channel weights must be finite and >= 0, got {w!r}")
        if w == 0:
            continue
        c = np.asarray(channel, dtype=np.float64)
        if c.shape != shape:
            raise ValueError(f"channels must share one shape, got {c.shape} and {shape}")
        ok = np.isfinite(c)
        total[ok] += w * np.clip(c[ok], -1.0, 1.0)
        mass[ok] += w
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mass > 0, total / np.where(mass > 0, mass, 1.0), np.nan)


def accumulate(previous: np.ndarray | None, new: np.ndarray, memory: float) -> np.ndarray:
    """Exponential moving average ``memory * previous + (1 - memory) * new`` entry by entry.

    Where ``previous`` is NaN (never seen) the new value is taken; where ``new`` is NaN (not seen
    this round) the previous value is kept. ``memory = 0`` keeps only this round's evidence.
    """
    if not 0.0 <= memory < 1.0:
        raise ValueError(f"memory must be in [0, 1), got {memory!r}")
    new = np.asarray(new, dtype=np.float64)
    if previous is None:
        return new.copy()
    prev = np.asarray(previous, dtype=np.float64)
    if prev.shape != new.shape:
        raise ValueError(f"evidence of shape {prev.shape} cannot take a round of shape {new.shape}")
    both = np.isfinite(prev) & np.isfinite(new)
    out = np.where(np.isfinite(new), new, prev)
    out[both] = memory * prev[both] + (1.0 - memory) * new[both]
    return out


def affinity_from_evidence(evidence: np.ndarray) -> np.ndarray:
    """A non-negative affinity for spectral clustering from mixed similarity in [-1, 1].

    Only positive resemblance counts (``max(s, 0)``): with centred channels an unrelated pair
    sits near or below 0, so there is no floor and the graph falls apart into its groups. A tiny
    uniform term keeps the graph connected; the diagonal is 0; NaN counts as 0.
    """
    s = np.nan_to_num(np.asarray(evidence, dtype=np.float64), nan=0.0)
    a = np.clip(0.5 * (s + s.T), 0.0, None)
    np.fill_diagonal(a, 0.0)
    a += 1e-3 * max(float(a.max()), 1e-3)
    np.fill_diagonal(a, 0.0)
    return a


def silhouette(similarity: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of ``labels`` under the distance ``(1 - similarity) / 2`` (in [0, 1]).

    A point alone in its cluster scores 0; fewer than two clusters give -1 (never chosen)."""
    d = (1.0 - np.clip(np.nan_to_num(np.asarray(similarity, dtype=np.float64)), -1, 1)) / 2
    lab = np.asarray(labels)
    ids = np.unique(lab)
    if ids.size < 2:
        return -1.0
    scores = []
    for i in range(lab.size):
        own = (lab == lab[i]) & (np.arange(lab.size) != i)
        if not own.any():
            scores.append(0.0)
            continue
        a = d[i, own].mean()
        b = min(d[i, lab == other].mean() for other in ids if other != lab[i])
        scores.append((b - a) / max(a, b) if max(a, b) > 0 else 0.0)
    return float(np.mean(scores))


def choose_k(
    similarity: np.ndarray, k_max: int, cluster: Callable[[np.ndarray, int], np.ndarray]
) -> tuple[int, np.ndarray]:
    """``(K, labels)`` for K in ``2 .. min(k_max, n - 1)`` with the best silhouette of
    ``cluster(affinity, K)`` (the smallest K on ties); one group when fewer than 3 nodes.

    A partition with a group of one node is only taken for K = 2: a node that resembles no one
    (a backbone that drifted alone) scores a silhouette of 0 and would otherwise split off as
    its own group and then, alone, drift further."""
    s = np.asarray(similarity, dtype=np.float64)
    n = s.shape[0]
    if n < 3 or k_max < 2:
        return 1, np.zeros(n, dtype=np.int64)
    affinity = affinity_from_evidence(s)
    best: tuple[float, int, np.ndarray] | None = None
    for k in range(2, min(k_max, n - 1) + 1):
        labels = cluster(affinity, k)
        if k > 2 and np.bincount(labels).min() < 2:
            continue
        score = silhouette(s, labels)
        if best is None or score > best[0] + 1e-12:
            best = (score, k, labels)
    assert best is not None
    return best[1], best[2]


def partition(
    similarity: np.ndarray,
    k: int | None,
    k_max: int,
    cluster: Callable[[np.ndarray, int], np.ndarray],
) -> tuple[int, np.ndarray]:
    """``(K, labels)`` of a similarity matrix: ``k`` groups, or with ``k=None`` the K in
    ``2 .. k_max`` with the best silhouette (:func:`choose_k`)."""
    s = np.asarray(similarity, dtype=np.float64)
    if k is None:
        return choose_k(s, k_max, cluster)
    k = min(k, s.shape[0])
    return k, cluster(affinity_from_evidence(s), k)


def reliable_weights(
    channels: Sequence[np.ndarray],
    weights: Sequence[float],
    k: int | None,
    k_max: int,
    cluster: Callable[[np.ndarray, int], np.ndarray],
) -> list[float]:
    """Each channel's weight times how clearly it is grouped on its own: the silhouette of its
    own partition, floored at 0. A channel that is noise here (data profiles when all nodes
    hold the same kind of data; backbones right after a shared start) then barely counts. If no
    channel is grouped at all, the given weights are returned unchanged."""
    out = []
    for channel, w in zip(channels, weights, strict=True):
        if w <= 0:
            out.append(0.0)
            continue
        c = np.nan_to_num(np.asarray(channel, dtype=np.float64), nan=0.0)
        _, labels = partition(c, k, k_max, cluster)
        out.append(float(w) * max(silhouette(c, labels), 0.0))
    return out if sum(out) > 0 else [float(w) for w in weights]
