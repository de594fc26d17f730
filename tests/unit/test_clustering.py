from math import comb

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

from colnet_mpi.algorithms.clustering import (
    adjusted_rand,
    canonical_labels,
    coassociation,
    consensus_partition,
    cosine_matrix,
    eigengap_k,
    fuse_affinity,
    leader_position,
    spectral_labels,
)

FUSE = {"alpha": 0.5, "beta": 0.3, "gamma": 0.2, "tau_loss": 1.0, "tau_jacobian": 1.0}


# ----------------------------------------------------------------- planted federation helpers
def planted_backbones(seed, truth, p=400):
    """Shared initialisation + one random direction per group + per-node noise."""
    rng = np.random.default_rng(seed)
    theta0 = 3.0 * rng.normal(size=p)
    directions = rng.normal(size=(truth.max() + 1, p))
    b = theta0 + 0.3 * directions[truth] + 0.15 * rng.normal(size=(truth.size, p))
    return b, rng


def view_signals(b, truth, node, view, rng):
    """Signals as node `node` sees them: Λ[p, q] and J[p, q] depend only on q (its own head)."""
    cos = cosine_matrix(torch.tensor(b[view]))
    same = truth[view] == truth[node]
    loss_q = np.where(same, 0.4, 2.3) + 0.1 * rng.normal(size=len(view))
    jac_q = np.where(same, 1.0, 1.6) + 0.1 * rng.normal(size=len(view))
    m = len(view)
    return cos, np.tile(loss_q, (m, 1)), np.tile(jac_q, (m, 1))


def full_view(node, n):
    return [node] + [q for q in range(n) if q != node]


def same_partition(a, b):
    return np.array_equal(canonical_labels(np.asarray(a)), canonical_labels(np.asarray(b)))


# ----------------------------------------------------------------- cosine
def test_cosine_uncentered_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 30))
    expected = (x @ x.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(x, axis=1))
    got = cosine_matrix(torch.tensor(x), centered=False)
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_cosine_centered_is_cosine_of_deviations():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 20)).astype(np.float32)
    dev = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    norms = np.linalg.norm(dev, axis=1)
    expected = (dev @ dev.T) / np.outer(norms, norms)
    np.testing.assert_allclose(cosine_matrix(torch.tensor(x)), expected, atol=1e-7)


def test_cosine_zero_vectors():
    x = torch.zeros(3, 6)
    x[1] = torch.arange(6.0)
    got = cosine_matrix(x, centered=False)
    np.testing.assert_array_equal(got, np.eye(3))
    # identical rows: every deviation from the mean is zero
    same = torch.ones(4, 5)
    np.testing.assert_array_equal(cosine_matrix(same), np.eye(4))


def test_centering_reveals_groups_hidden_by_shared_init():
    truth = np.array([0, 0, 0, 1, 1, 1])
    b, _ = planted_backbones(3, truth)
    raw = cosine_matrix(torch.tensor(b), centered=False)
    assert raw.min() > 0.9  # the shared initialisation dominates the literal cosine
    cen = cosine_matrix(torch.tensor(b))
    within = truth[:, None] == truth[None, :]
    assert cen[within].min() > 0.2 and cen[~within].max() < -0.2


def test_cosine_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        cosine_matrix(torch.ones(3))
    bad = torch.ones(2, 3)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        cosine_matrix(bad)
    with pytest.raises(ValueError, match="finite"):
        cosine_matrix([torch.ones(3), torch.tensor([1.0, float("inf"), 2.0])])
    with pytest.raises(ValueError, match="equal lengths"):
        cosine_matrix([torch.ones(3), torch.ones(4)])
    with pytest.raises(ValueError, match="sequence of 1-D"):
        cosine_matrix([])


@pytest.mark.parametrize("centered", [True, False])
def test_cosine_of_rows_equals_cosine_of_the_stack_and_leaves_input_alone(centered):
    rows = [torch.randn(1000, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    stacked = torch.stack(rows).double()
    before = stacked.clone()
    expected = cosine_matrix(stacked, centered=centered)
    assert torch.equal(stacked, before)  # centring happens on a copy
    np.testing.assert_array_equal(cosine_matrix(rows, centered=centered), expected)


# ----------------------------------------------------------------- fusion
def test_fuse_matches_independent_formula():
    rng = np.random.default_rng(2)
    n = 5
    c = np.clip(rng.normal(scale=0.5, size=(n, n)), -1, 1)
    c = (c + c.T) / 2
    lam = rng.uniform(0, 3, size=(n, n))
    jac = rng.uniform(1, 2, size=(n, n))
    a, b_, g, tl, tj = 0.2, 0.5, 0.3, 0.7, 1.3

    def sim(x, tau):
        y = (x + x.T) / 2
        z = (y - y.mean()) / y.std()
        return np.exp(-z / tau)

    expected = a * (1 + c) / 2 + b_ * sim(lam, tl) + g * sim(jac, tj)
    np.fill_diagonal(expected, 1.0)
    got = fuse_affinity(c, lam, jac, alpha=a, beta=b_, gamma=g, tau_loss=tl, tau_jacobian=tj)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert np.all(got >= 0) and np.allclose(got, got.T)


def test_fuse_constant_signals_give_ones():
    c = np.eye(3)
    got = fuse_affinity(c, np.full((3, 3), 2.0), np.full((3, 3), 5.0), **FUSE)
    expected = 0.5 * (1 + c) / 2 + 0.3 + 0.2
    np.fill_diagonal(expected, 1.0)
    np.testing.assert_allclose(got, expected)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": 0.5, "beta": 0.5, "gamma": 0.5}, "must equal 1"),
        ({"alpha": -0.1, "beta": 0.6, "gamma": 0.5}, "alpha"),
        ({"tau_loss": 0.0}, "tau_loss"),
        ({"tau_jacobian": -1.0}, "tau_jacobian"),
    ],
)
def test_fuse_rejects_bad_parameters(kwargs, match):
    args = {**FUSE, **kwargs}
    with pytest.raises(ValueError, match=match):
        fuse_affinity(np.eye(2), np.ones((2, 2)), np.ones((2, 2)), **args)


def test_fuse_rejects_bad_matrices():
    with pytest.raises(ValueError, match="same shape"):
        fuse_affinity(np.eye(2), np.ones((3, 3)), np.ones((2, 2)), **FUSE)
    with pytest.raises(ValueError, match="square"):
        fuse_affinity(np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 3)), **FUSE)
    lam = np.ones((2, 2))
    lam[0, 1] = np.inf
    with pytest.raises(ValueError, match="finite"):
        fuse_affinity(np.eye(2), lam, np.ones((2, 2)), **FUSE)


# ----------------------------------------------------------------- spectral + planted groups
@pytest.mark.parametrize("truth", [[0, 0, 0, 1, 1, 1], [0, 1, 0, 1, 1, 0]])
@pytest.mark.parametrize("seed", range(5))
def test_planted_groups_recovered_from_every_view_and_by_consensus(truth, seed):
    truth = np.array(truth)
    n = truth.size
    b, rng = planted_backbones(seed, truth)
    proposals = np.full((n, n), -1, dtype=np.int64)
    for node in range(n):
        view = full_view(node, n)
        s = fuse_affinity(*view_signals(b, truth, node, view, rng), **FUSE)
        labels = spectral_labels(s, 2, seed=seed)
        assert labels[0] == 0
        assert adjusted_rand(truth[view], labels) == 1.0, f"node {node} view"
        proposals[node, view] = labels
    agreed = consensus_partition(proposals, None)
    assert adjusted_rand(truth, agreed) == 1.0
    assert agreed[0] == 0
    np.testing.assert_array_equal(agreed, consensus_partition(proposals, 2))


def test_spectral_k_edge_cases():
    s = np.ones((3, 3))
    np.testing.assert_array_equal(spectral_labels(s, 1, seed=0), [0, 0, 0])
    np.testing.assert_array_equal(spectral_labels(s, 3, seed=0), [0, 1, 2])
    np.testing.assert_array_equal(spectral_labels(s, 7, seed=0), [0, 1, 2])
    np.testing.assert_array_equal(spectral_labels(np.ones((1, 1)), 2, seed=0), [0])
    with pytest.raises(ValueError, match="k must"):
        spectral_labels(s, 0, seed=0)
    with pytest.raises(ValueError, match=">= 0"):
        spectral_labels(-np.ones((3, 3)), 2, seed=0)


def test_spectral_disconnected_blocks_without_warning(recwarn):
    s = np.kron(np.eye(2), np.ones((3, 3)))  # two disconnected components
    labels = spectral_labels(s, 2, seed=1)
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])
    assert not [w for w in recwarn if "fully connected" in str(w.message)]


# ----------------------------------------------------------------- eigengap
def block_affinity(sizes, inside=1.0, across=0.05, seed=0):
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    s = np.where(truth[:, None] == truth[None, :], inside, across)
    s = s + 0.02 * rng.uniform(size=s.shape)
    return (s + s.T) / 2


def test_eigengap_two_and_three_blocks():
    assert eigengap_k(block_affinity([3, 3]), 5) == 2
    assert eigengap_k(block_affinity([2, 4, 3]), 6) == 3
    assert eigengap_k(block_affinity([2, 4, 3]), 2) <= 2
    assert eigengap_k(np.ones((1, 1)), 4) == 1
    assert eigengap_k(np.ones((4, 4)), 3) == 1
    with pytest.raises(ValueError, match="k_max"):
        eigengap_k(np.ones((2, 2)), 0)


# ----------------------------------------------------------------- labels
def test_canonical_labels():
    got = canonical_labels(np.array([5, 5, 2, -1, 2, 7]))
    np.testing.assert_array_equal(got, [0, 0, 1, -1, 1, 2])
    np.testing.assert_array_equal(canonical_labels(np.array([-1, 3, 0])), [-1, 0, 1])
    np.testing.assert_array_equal(canonical_labels(np.array([], dtype=int)), [])
    with pytest.raises(ValueError, match=">= -1"):
        canonical_labels(np.array([0, -2]))


def test_adjusted_rand_against_pair_counting():
    a = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    b = np.array([1, 1, 0, 0, 2, 2, 2, 2])
    table = np.zeros((3, 3), dtype=int)
    for x, y in zip(a, b, strict=True):
        table[x, y] += 1
    idx = sum(comb(int(v), 2) for v in table.ravel())
    ra = sum(comb(int(v), 2) for v in table.sum(1))
    rb = sum(comb(int(v), 2) for v in table.sum(0))
    expected_idx = ra * rb / comb(a.size, 2)
    expected = (idx - expected_idx) / ((ra + rb) / 2 - expected_idx)
    assert adjusted_rand(a, b) == pytest.approx(expected)
    assert adjusted_rand(a, np.array([7, 7, 7, 3, 3, 9, 9, 9])) == 1.0


def test_leader_position_rotates():
    assert [leader_position(r, 3) for r in range(1, 8)] == [0, 1, 2, 0, 1, 2, 0]
    assert [leader_position(r, 1) for r in range(1, 4)] == [0, 0, 0]
    with pytest.raises(ValueError, match="round_index"):
        leader_position(0, 3)
    with pytest.raises(ValueError, match="group_size"):
        leader_position(1, 0)


# ----------------------------------------------------------------- co-association / consensus
def test_coassociation_by_hand():
    proposals = np.array([[0, 0, 1, -1], [1, 0, 0, 0], [-1, 2, 2, 5]])
    a, counts = coassociation(proposals)
    expected_counts = np.array([[2, 2, 2, 1], [2, 3, 3, 2], [2, 3, 3, 2], [1, 2, 2, 2]])
    np.testing.assert_array_equal(counts, expected_counts)
    expected = np.array(
        [
            [1, 1 / 2, 0, 0],
            [1 / 2, 1, 2 / 3, 1 / 2],
            [0, 2 / 3, 1, 1 / 2],
            [0, 1 / 2, 1 / 2, 1],
        ]
    )
    np.testing.assert_allclose(a, expected)


def test_coassociation_unseen_pair_is_zero():
    a, counts = coassociation(np.array([[0, -1], [-1, 0]]))
    np.testing.assert_array_equal(counts, [[1, 0], [0, 1]])
    np.testing.assert_array_equal(a, np.eye(2))


def test_coassociation_rejects_bad_input():
    with pytest.raises(ValueError, match="integer"):
        coassociation(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=">= -1"):
        coassociation(np.array([[0, -3]]))
    with pytest.raises(ValueError, match="shape"):
        coassociation(np.array([0, 1]))


@pytest.mark.parametrize("seed", range(4))
def test_unanimous_proposals_give_common_partition(seed):
    rng = np.random.default_rng(seed)
    n = 9
    common = rng.integers(0, 3, size=n)
    common[:3] = [0, 1, 2]
    rows = []
    for _ in range(5):
        relabel = rng.permutation(10)[:3]  # same partition, different label ids
        rows.append(relabel[common])
    proposals = np.array(rows)
    expected = canonical_labels(common)
    np.testing.assert_array_equal(consensus_partition(proposals, None), expected)
    np.testing.assert_array_equal(consensus_partition(proposals, 3), expected)


def test_consensus_is_deterministic_and_order_free():
    rng = np.random.default_rng(4)
    proposals = rng.integers(0, 3, size=(7, 8))
    proposals[rng.uniform(size=proposals.shape) < 0.3] = -1
    first = consensus_partition(proposals, 3)
    for _ in range(3):
        np.testing.assert_array_equal(consensus_partition(proposals.copy(), 3), first)
    np.testing.assert_array_equal(consensus_partition(proposals[::-1].copy(), 3), first)
    assert len(set(first.tolist())) == 3 and first[0] == 0


def ring_views(n, width=1):
    return [sorted({(i + d) % n for d in range(-width, width + 1)}) for i in range(n)]


def test_partial_ring_views_with_truthful_proposers():
    truth = np.array([0, 0, 0, 1, 1, 1])
    proposals = np.full((6, 6), -1, dtype=np.int64)
    for i, view in enumerate(ring_views(6)):
        proposals[i, view] = canonical_labels(truth[view])
    assert (proposals == -1).sum() == 18
    assert adjusted_rand(truth, consensus_partition(proposals, None)) == 1.0
    assert adjusted_rand(truth, consensus_partition(proposals, 2)) == 1.0


def test_partial_ring_views_with_forced_splits():
    """Views that lie inside one group are split anyway when K = 2 is forced."""
    truth = np.array([0, 0, 0, 1, 1, 1])
    n = truth.size
    b, rng = planted_backbones(0, truth)
    proposals = np.full((n, n), -1, dtype=np.int64)
    for i, view in enumerate(ring_views(n)):
        view = [i] + [q for q in view if q != i]
        s = fuse_affinity(*view_signals(b, truth, i, view, rng), **FUSE)
        proposals[i, view] = spectral_labels(s, 2, seed=0)
    # the within-group views (nodes 1 and 4) cannot be right with two clusters of three nodes
    assert any(len(set(proposals[i][proposals[i] >= 0].tolist())) == 2 for i in (1, 4))
    agreed = consensus_partition(proposals, 2)
    assert adjusted_rand(truth, agreed) == 1.0


def test_consensus_k_clipping_and_errors():
    proposals = np.array([[0, 1, 2, 3]])
    np.testing.assert_array_equal(consensus_partition(proposals, 10), [0, 1, 2, 3])
    np.testing.assert_array_equal(consensus_partition(proposals, 1), [0, 0, 0, 0])
    np.testing.assert_array_equal(consensus_partition(np.array([[-1, -1]]), None), [0, 0])
    with pytest.raises(ValueError, match="k must"):
        consensus_partition(proposals, 0)


def test_consensus_auto_k_uses_median_rounded_down():
    # proposals with 2, 3 and 3 distinct labels -> median 3; with 2, 3 -> median 2.5 -> 2
    base = np.array([0, 0, 1, 1, 2, 2])
    p3 = np.stack([np.array([0, 0, 1, 1, 1, 1]), base, base])
    assert len(set(consensus_partition(p3, None).tolist())) == 3
    p2 = np.stack([np.array([0, 0, 1, 1, 1, 1]), base])
    assert len(set(consensus_partition(p2, None).tolist())) == 2


def test_consensus_exact_k_despite_ties():
    # three unanimous blocks but k = 2: distances tie at 1, yet exactly two groups come out
    proposals = np.tile(np.array([0, 0, 1, 1, 2, 2]), (3, 1))
    out = consensus_partition(proposals, 2)
    assert len(set(out.tolist())) == 2
    # blocks are never split: every block lies inside one agreed group
    for block in ([0, 1], [2, 3], [4, 5]):
        assert len(set(out[block].tolist())) == 1


def first_merges_partition(proposals, k):
    """Reference: the groups after the first N - k rows of average linkage on 1 - A, by set union."""
    a, _ = coassociation(proposals)
    n = a.shape[0]
    dist = np.clip(1.0 - 0.5 * (a + a.T), 0.0, 1.0)
    np.fill_diagonal(dist, 0.0)
    z = linkage(squareform(dist, checks=False), method="average")
    members = [{i} for i in range(n)]
    for left, right in z[: n - k, :2].astype(int):
        members.append(members[left] | members[right])
        members[left], members[right] = set(), set()
    labels = np.empty(n, dtype=np.int64)
    for g, group in enumerate(m for m in members if m):
        labels[sorted(group)] = g
    return canonical_labels(labels)


@pytest.mark.parametrize("seed", range(6))
def test_consensus_is_the_cut_after_n_minus_k_merges_even_with_ties(seed):
    # few proposers and labels make many equal merge heights; the cut must follow linkage order
    rng = np.random.default_rng(seed)
    for _ in range(40):
        n = int(rng.integers(3, 11))
        columns = rng.integers(-1, 2, size=(int(rng.integers(1, 4)), max(1, n // 2)))
        proposals = columns[:, rng.integers(0, columns.shape[1], size=n)]
        for k in range(2, n):
            out = consensus_partition(proposals, k)
            np.testing.assert_array_equal(out, first_merges_partition(proposals, k))
            assert out.dtype == np.int64 and len(set(out.tolist())) == k


def test_consensus_output_independent_of_label_names():
    rng = np.random.default_rng(9)
    proposals = rng.integers(0, 2, size=(5, 6))
    renamed = np.where(proposals >= 0, 1 - proposals, -1)
    for k in (None, 2, 3):
        assert same_partition(consensus_partition(proposals, k), consensus_partition(renamed, k))


# ------------------------------------------- the spectral step without scikit-learn at run time
def _random_affinities(seed, cases):
    """Random, block-structured, disconnected (ties) and coarsely rounded symmetric affinities."""
    rng = np.random.default_rng(seed)
    for trial in range(cases):
        n = int(rng.integers(3, 30))
        k = int(rng.integers(2, min(n - 1, 6) + 1))
        kind = trial % 4
        if kind == 0:
            a = rng.random((n, n))
        elif kind == 1:
            g = rng.integers(0, k, n)
            a = 0.9 * (g[:, None] == g[None, :]) + 0.2 * rng.random((n, n))
        elif kind == 2:
            g = rng.integers(0, k, n)
            a = (g[:, None] == g[None, :]).astype(np.float64)
        else:
            a = np.round(rng.random((n, n)), 1)
        yield 0.5 * (a + a.T), k, int(rng.integers(0, 10_000))


def test_spectral_labels_equal_scikit_learns_spectral_clustering():
    import warnings

    from sklearn.cluster import SpectralClustering

    for a, k, seed in _random_affinities(7, 120):
        model = SpectralClustering(
            n_clusters=k, affinity="precomputed", assign_labels="cluster_qr", random_state=seed
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = canonical_labels(model.fit_predict(a))
        np.testing.assert_array_equal(spectral_labels(a, k, seed=seed), theirs)


def test_spectral_falls_back_to_dense_solver_when_arpack_fails(monkeypatch):
    from colnet_mpi.algorithms import clustering

    truth = np.repeat(np.arange(3), 4)
    a = 0.9 * (truth[:, None] == truth[None, :]) + 0.05
    expected = spectral_labels(a, 3, seed=1)

    def failing(*args, **kwargs):
        raise RuntimeError("ARPACK error -1: No convergence")

    monkeypatch.setattr(clustering, "eigsh", failing)
    np.testing.assert_array_equal(spectral_labels(a, 3, seed=1), expected)
    np.testing.assert_array_equal(expected, truth)


def test_adjusted_rand_equals_scikit_learn_to_the_last_bit():
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(3)
    for trial in range(400):
        n = int(rng.integers(0, 50))
        t = rng.integers(0, int(rng.integers(1, 7)), n)
        p = t.copy() if trial % 5 == 0 else rng.integers(-1, int(rng.integers(1, 7)), n)
        assert adjusted_rand(t, p) == adjusted_rand_score(t, p)
    with pytest.raises(ValueError, match="equal length"):
        adjusted_rand(np.zeros(3), np.zeros(4))
