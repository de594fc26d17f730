"""Task-aware clustering: signal fusion, spectral proposals and the rank-wide consensus.

These are the pure parts of ColNet's stage 3. Each node fuses its own
signals into an affinity matrix over the indices it saw and proposes labels with spectral
clustering; the proposals of all nodes are then turned into one partition by a deterministic
co-association consensus that every rank computes identically.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from scipy.linalg import eigh, qr, svd
from scipy.sparse.csgraph import laplacian
from scipy.sparse.linalg import eigsh

from colnet_mpi.metrics.partition import adjusted_rand

__all__ = [
    "adjusted_rand",
    "canonical_labels",
    "coassociation",
    "consensus_partition",
    "cosine_matrix",
    "eigengap_k",
    "fuse_affinity",
    "leader_flags",
    "leader_position",
    "partition_stamp",
    "qr_assignment",
    "spectral_embedding",
    "spectral_labels",
]

_ZERO_REL = 1e-12  # a row whose norm is below this fraction of the largest row norm counts as zero


def _check_int(name: str, value: object, minimum: int, allowed: str = "") -> int:
    """Return ``value`` as an int, or raise ValueError naming it and the allowed range."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or int(value) < minimum:  # type: ignore[call-overload]
        raise ValueError(f"{name} must be {allowed or f'an integer >= {minimum}'}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def cosine_matrix(
    vectors: torch.Tensor | Sequence[torch.Tensor], *, centered: bool = True
) -> np.ndarray:
    """Return the (n, n) cosine similarities between the rows of ``vectors`` (shape (n, P), or a
    sequence of n one-dimensional tensors of length P, which need not be stacked first).

    With ``centered=True`` (our default) the mean row is subtracted first, so entry ``[p, q]`` is
    the cosine between the deviations of backbones p and q from the mean of this node's view. All
    nodes start from one shared backbone initialisation, which makes the raw cosines all close to 1;
    the deviations carry the task signal. ``centered=False`` gives the paper's literal cosine of the
    flattened parameters. A zero row (after centering) has cosine 0 to every other row; the
    diagonal is always 1. Computed in float64 on the vectors' device (one (n, P) float64 matrix,
    centred in place); returned as numpy.
    """
    if isinstance(vectors, torch.Tensor):
        if vectors.dim() != 2 or vectors.shape[0] == 0:
            raise ValueError(
                f"vectors must have shape (n, P) with n >= 1, got {tuple(vectors.shape)}"
            )
        x = vectors.detach().to(torch.float64, copy=True)  # centred in place below
    else:
        rows = list(vectors)
        if not rows or not all(isinstance(r, torch.Tensor) and r.dim() == 1 for r in rows):
            raise ValueError("vectors must be a 2-D tensor or a non-empty sequence of 1-D tensors")
        if len({r.numel() for r in rows}) != 1:
            raise ValueError(
                f"vectors must have equal lengths, got {sorted({r.numel() for r in rows})}"
            )
        x = torch.empty((len(rows), rows[0].numel()), dtype=torch.float64, device=rows[0].device)
        for i, r in enumerate(rows):
            x[i].copy_(r.detach())
    # one pass: a finite float64 sum of float32-range values proves every value finite
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError("vectors must contain only finite values, got NaN or inf")
    scale = float(torch.linalg.vector_norm(x, dim=1).max()) if x.shape[1] else 0.0
    if centered:
        x -= x.mean(dim=0, keepdim=True)
    gram = (x @ x.T).cpu().numpy()
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    nonzero = norms > _ZERO_REL * scale if scale > 0.0 else np.zeros_like(norms, dtype=bool)
    inv = np.where(nonzero, 1.0 / np.where(nonzero, norms, 1.0), 0.0)
    cos = gram * inv[:, None] * inv[None, :]
    cos = np.clip(0.5 * (cos + cos.T), -1.0, 1.0)
    np.fill_diagonal(cos, 1.0)
    return cos


def _square(name: str, x: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix, got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} must have the same shape as cosine {shape}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must contain only finite values, got NaN or inf")
    return a


def _zscore_similarity(x: np.ndarray, tau: float) -> np.ndarray:
    sym = 0.5 * (x + x.T)
    std = float(sym.std())
    if std == 0.0:
        z = np.zeros_like(sym)
    else:
        z = (sym - sym.mean()) / std
    return np.exp(-z / tau)


def fuse_affinity(
    cosine: np.ndarray,
    loss: np.ndarray,
    jacobian: np.ndarray,
    *,
    alpha: float,
    beta: float,
    gamma: float,
    tau_loss: float,
    tau_jacobian: float,
) -> np.ndarray:
    """Fuse the three clustering signals into one non-negative affinity matrix S.

    ``C+ = (1 + C) / 2``; ``loss`` (Λ) and ``jacobian`` (J) are symmetrised ``X <- (X + X^T)/2``,
    z-scored over all their entries (population std; a constant matrix gives zeros) and mapped to
    ``exp(-X / tau)``. ``S = alpha*C+ + beta*Λ_sim + gamma*J_sim`` with ``S[p, p] = 1``. The
    weights must be >= 0 and sum to 1 (within 1e-6); the temperatures must be > 0.
    """
    c = _square("cosine", cosine)
    lam = _square("loss", loss, c.shape)
    jac = _square("jacobian", jacobian, c.shape)
    if c.min() < -1.0 - 1e-6 or c.max() > 1.0 + 1e-6:
        raise ValueError(f"cosine entries must lie in [-1, 1], got range [{c.min()}, {c.max()}]")
    weights = {"alpha": alpha, "beta": beta, "gamma": gamma}
    for key, val in weights.items():
        if not math.isfinite(float(val)) or float(val) < 0.0:
            raise ValueError(f"{key} must be finite and >= 0, got {val!r}")
    total = float(alpha) + float(beta) + float(gamma)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"alpha + beta + gamma must equal 1 (tolerance 1e-6), got {total!r}")
    for key, val in {"tau_loss": tau_loss, "tau_jacobian": tau_jacobian}.items():
        if not math.isfinite(float(val)) or float(val) <= 0.0:
            raise ValueError(f"{key} must be finite and > 0, got {val!r}")
    c_plus = (1.0 + np.clip(c, -1.0, 1.0)) / 2.0
    s = (
        float(alpha) * c_plus
        + float(beta) * _zscore_similarity(lam, float(tau_loss))
        + float(gamma) * _zscore_similarity(jac, float(tau_jacobian))
    )
    s = 0.5 * (s + s.T)
    np.fill_diagonal(s, 1.0)
    return s


def _affinity(affinity: np.ndarray) -> np.ndarray:
    a = _square("affinity", affinity)
    if a.min() < 0.0:
        raise ValueError(f"affinity entries must be >= 0, got minimum {a.min()!r}")
    return 0.5 * (a + a.T)


def eigengap_k(affinity: np.ndarray, k_max: int) -> int:
    """Pick the number of clusters K by the largest eigengap of the normalised Laplacian.

    With eigenvalues ``l_1 <= ... <= l_n`` of ``L = I - D^-1/2 S D^-1/2`` (degrees include the
    diagonal of S; rows of zero degree are left unnormalised), K is the ``k`` in
    ``1 .. min(k_max, n - 1)`` with the largest ``l_{k+1} - l_k`` (the smallest such k on ties).
    Returns 1 for a single index.
    """
    a = _affinity(affinity)
    k_max = _check_int("k_max", k_max, 1)
    n = a.shape[0]
    top = min(k_max, n - 1)
    if top < 1:
        return 1
    deg = a.sum(axis=1)
    inv_sqrt = np.where(deg > 0.0, 1.0 / np.sqrt(np.where(deg > 0.0, deg, 1.0)), 0.0)
    lap = np.eye(n) - inv_sqrt[:, None] * a * inv_sqrt[None, :]
    eig = np.sort(np.linalg.eigvalsh(0.5 * (lap + lap.T)))
    gaps = np.diff(eig)[:top]
    return int(np.argmax(gaps)) + 1


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Relabel so cluster ids appear in order of first occurrence; -1 ("unseen") stays -1.

    Two labelings that describe the same partition give identical canonical arrays.
    """
    lab = np.asarray(labels)
    if lab.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {lab.shape}")
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.equal(np.mod(lab, 1), 0)):
            raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    lab = lab.astype(np.int64)
    if lab.size and lab.min() < -1:
        raise ValueError(f"labels must be >= -1 (-1 = unseen), got {int(lab.min())}")
    out = np.full(lab.shape, -1, dtype=np.int64)
    mapping: dict[int, int] = {}
    for i, v in enumerate(lab.tolist()):
        if v == -1:
            continue
        if v not in mapping:
            mapping[v] = len(mapping)
        out[i] = mapping[v]
    return out


def spectral_embedding(affinity: np.ndarray, k: int, *, seed: int) -> np.ndarray:
    """The ``k`` smallest eigenvectors of the normalised Laplacian, scaled back by the degrees.

    ``L = I - D^-1/2 S D^-1/2`` (``scipy.sparse.csgraph.laplacian(normed=True)``, unit diagonal);
    its ``k`` eigenvectors of smallest eigenvalue come from ARPACK in shift-invert mode around
    ``-1e-5`` with tolerance 0 and a start vector drawn uniformly from [-1, 1] by
    ``numpy.random.RandomState(seed)``; should ARPACK fail, from a dense ``scipy.linalg.eigh``.
    Each eigenvector is divided by ``sqrt(D)`` and its sign fixed so that its entry of largest
    magnitude is positive. Returns shape (n, k). This is the embedding scikit-learn's
    ``SpectralClustering(affinity="precomputed")`` computes with its default ARPACK solver; the
    unit tests check that the labels agree, so runs keep their results without importing
    scikit-learn (about 50 MB per rank and a second of start-up).
    """
    a = np.asarray(affinity, dtype=np.float64)
    n = a.shape[0]
    lap, root_deg = laplacian(a, normed=True, return_diag=True)
    lap = np.array(lap, dtype=np.float64)
    lap.flat[:: n + 1] = 1.0
    start = np.random.RandomState(seed).uniform(-1.0, 1.0, n)
    try:
        _, vectors = eigsh(lap, k=k, sigma=-1e-5, which="LM", tol=0, v0=start)
    except RuntimeError:  # ARPACK did not converge: the dense solver cannot fail that way
        _, vectors = eigh(lap, check_finite=False)
    emb = vectors.T[:k] / root_deg
    biggest = np.argmax(np.abs(emb), axis=1)
    emb *= np.sign(emb[np.arange(emb.shape[0]), biggest])[:, None]
    return np.ascontiguousarray(emb.T)


def qr_assignment(embedding: np.ndarray) -> np.ndarray:
    """Discrete labels from a spectral embedding by column-pivoted QR (Damle, Minden and Ying).

    The pivots of a QR factorisation of the embedding's transpose pick ``k`` representative rows;
    the orthogonal polar factor of those rows rotates the embedding, and each index takes the
    column of largest magnitude. Deterministic, no k-means restarts.
    """
    emb = np.asarray(embedding, dtype=np.float64)
    k = emb.shape[1]
    _, _, pivots = qr(emb.T, pivoting=True)
    left, _, right_h = svd(emb[pivots[:k], :].T)
    rotated = np.abs(emb @ (left @ right_h.conj()))
    return rotated.argmax(axis=1)


def spectral_labels(affinity: np.ndarray, k: int, *, seed: int) -> np.ndarray:
    """Cluster a precomputed affinity matrix into ``k`` groups with normalised spectral clustering.

    :func:`spectral_embedding` into ``k`` dimensions, then :func:`qr_assignment` (the same
    labels as scikit-learn's ``SpectralClustering(affinity="precomputed",
    assign_labels="cluster_qr", random_state=seed)``). ``k`` is clipped to ``n``; ``k == 1``
    gives all zeros and ``k == n`` gives every index its own cluster. Returns canonical labels
    (see :func:`canonical_labels`).
    """
    a = _affinity(affinity)
    n = a.shape[0]
    k = min(_check_int("k", k, 1), n)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    if n <= k:
        return np.arange(n, dtype=np.int64)
    return canonical_labels(qr_assignment(spectral_embedding(a, k, seed=int(seed))))


def _proposals(proposals: np.ndarray) -> np.ndarray:
    p = np.asarray(proposals)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"proposals must have shape (V, N) with V, N >= 1, got {p.shape}")
    if not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"proposals must be an integer array, got dtype {p.dtype}")
    p = p.astype(np.int64)
    if p.min() < -1:
        raise ValueError(f"proposal labels must be >= -1 (-1 = unseen), got {int(p.min())}")
    return p


def coassociation(proposals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Build the co-association matrix of a set of label proposals.

    ``proposals`` has shape (V, N): row v holds proposer v's labels over the N world indices, -1
    where v did not see the index. Returns ``(A, counts)`` where ``counts[p, q]`` is the number of
    proposers that saw both p and q and ``A[p, q]`` the fraction of those that put p and q in the
    same cluster (0 where ``counts`` is 0); ``A[p, p] = 1``.
    """
    p = _proposals(proposals)
    v, n = p.shape
    seen = (p >= 0).astype(np.int64)
    counts = seen.T @ seen
    same = np.zeros((n, n), dtype=np.int64)
    for row in p:
        ids = canonical_labels(row)
        k = int(ids.max()) + 1 if ids.size and ids.max() >= 0 else 0
        if k == 0:
            continue
        onehot = np.zeros((n, k), dtype=np.int64)
        mask = ids >= 0
        onehot[np.flatnonzero(mask), ids[mask]] = 1
        same += onehot @ onehot.T
    a = np.zeros((n, n), dtype=np.float64)
    np.divide(same, counts, out=a, where=counts > 0)
    np.fill_diagonal(a, 1.0)
    return a, counts


def consensus_partition(proposals: np.ndarray, k: int | None) -> np.ndarray:
    """Agree on one partition of the N world indices from all nodes' proposals.

    Deterministic (no randomness): identical input gives identical output on every rank. ``k``
    None means "auto": the median, rounded down, of the number of distinct labels per proposal
    (proposals that saw nothing are left out of the median). Average-linkage agglomerative
    clustering on the distance ``1 - A`` (``A`` from :func:`coassociation`) is cut after exactly
    ``N - k`` merges, so ties never change the number of groups; ``k`` is clipped to [1, N].
    Returns canonical labels (group 0 contains index 0). Unanimous proposals with k None (or k
    equal to their number of groups) give back that common partition.
    """
    p = _proposals(proposals)
    n = p.shape[1]
    if k is None:
        distinct = [len(set(row[row >= 0].tolist())) for row in p]
        distinct = [d for d in distinct if d > 0]
        k_eff = int(math.floor(float(np.median(distinct)))) if distinct else 1
    else:
        k_eff = _check_int("k", k, 1, "None ('auto') or an integer >= 1")
    k_eff = max(1, min(k_eff, n))
    if k_eff == n:
        return np.arange(n, dtype=np.int64)
    if k_eff == 1:
        return np.zeros(n, dtype=np.int64)
    a, _ = coassociation(p)
    dist = 1.0 - 0.5 * (a + a.T)
    np.fill_diagonal(dist, 0.0)
    dist = np.clip(dist, 0.0, 1.0)
    # imported here: scipy.cluster pulls in scipy.spatial (0.3 s per rank), which runs with
    # fixed groups never need
    from scipy.cluster.hierarchy import cut_tree, linkage
    from scipy.spatial.distance import squareform

    z = linkage(squareform(dist, checks=False), method="average")
    # cut_tree applies merges in order of height and breaks equal heights by tree position, not by
    # linkage row; heights replaced by the row index make it apply exactly the first N - k rows
    by_row = z.copy()
    by_row[:, 2] = np.arange(n - 1, dtype=np.float64)
    return canonical_labels(cut_tree(by_row, n_clusters=k_eff)[:, 0])


def leader_position(round_index: int, group_size: int) -> int:
    """Position of this round's leader among the group's members sorted by world rank.

    ``round_index`` is 1-based; the leader rotates round-robin: ``(round_index - 1) % group_size``.
    """
    r = _check_int("round_index", round_index, 1, "an integer >= 1 (rounds are 1-based)")
    return (r - 1) % _check_int("group_size", group_size, 1)


def partition_stamp(groups: np.ndarray) -> int:
    """A 24-bit CRC of a partition's canonical labels (exact in float32, so that it can travel
    in a model message's header): equal partitions, however labelled, get equal stamps."""
    labels = canonical_labels(np.asarray(groups)).astype(np.int64)
    return zlib.crc32(labels.tobytes()) & 0xFFFFFF


def leader_flags(groups: np.ndarray, round_index: int) -> np.ndarray:
    """bool flags of each group's leader in round ``round_index`` (see :func:`leader_position`).

    ``groups[i]`` is node i's group id; -1 (quarantined) leads nothing.
    """
    g = np.asarray(groups)
    flags = np.zeros(g.size, dtype=bool)
    for label in np.unique(g[g >= 0]):
        members = np.flatnonzero(g == label)
        flags[members[leader_position(round_index, members.size)]] = True
    return flags
