"""The resemblance signals of the default clustering, on planted groups (pure maths, no MPI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from colnet_mpi.algorithms.clustering import adjusted_rand, cosine_matrix, spectral_labels
from colnet_mpi.algorithms.resemblance import (
    UpdateSketch,
    accumulate,
    affinity_from_evidence,
    choose_k,
    mix,
    partition,
    profile_similarity,
    reliable_weights,
    silhouette,
)


def cluster(affinity: np.ndarray, k: int) -> np.ndarray:
    return spectral_labels(affinity, k, seed=0)


def planted_profiles(k: int, per: int, seed: int, noise: float) -> tuple[np.ndarray, torch.Tensor]:
    """Per node a vector = shared part + its group's direction + noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), per)
    shared = 3.0 * rng.normal(size=400)
    groups = rng.normal(size=(k, 400))
    x = shared + groups[labels] + noise * rng.normal(size=(labels.size, 400))
    return labels, torch.tensor(x, dtype=torch.float32)


def noise_channel(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    return cosine_matrix(torch.tensor(rng.normal(size=(n, 400)), dtype=torch.float32))


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("given", [True, False])
def test_planted_groups_are_found_with_a_noise_channel_beside_them(k: int, given: bool) -> None:
    """2, 3 and 4 groups of 3 nodes, with noise; a second channel that is pure noise gets a
    weight near 0 from its silhouette; ARI = 1 with K given and with K chosen."""
    for seed in range(3):
        labels, x = planted_profiles(k, 3, seed, noise=1.0)
        signal = cosine_matrix(x)
        channels = [signal, noise_channel(labels.size, seed)]
        want = k if given else None
        weights = reliable_weights(channels, [0.5, 0.5], want, 6, cluster)
        assert weights[0] > 3 * weights[1], weights
        chosen, found = partition(mix(channels, weights), want, 6, cluster)
        assert chosen == k
        assert adjusted_rand(labels, found) == 1.0, (seed, found)


def test_evidence_over_rounds_outvotes_one_wrong_round() -> None:
    """A round whose signal says a wrong partition does not flip the accumulated evidence."""
    labels, x = planted_profiles(2, 3, 0, noise=0.5)
    right = cosine_matrix(x)
    wrong_labels = np.array([0, 1, 0, 1, 0, 1])
    wrong = np.where(wrong_labels[:, None] == wrong_labels[None, :], 0.8, -0.4)
    evidence = accumulate(None, right, 0.5)
    evidence = accumulate(evidence, right, 0.5)
    evidence = accumulate(evidence, wrong, 0.5)
    _, found = partition(evidence, 2, 8, cluster)
    assert adjusted_rand(labels, found) == 1.0
    _, alone = partition(wrong, 2, 8, cluster)  # memory 0 would have followed the wrong round
    assert adjusted_rand(wrong_labels, alone) == 1.0


def test_accumulate_keeps_what_a_round_did_not_see() -> None:
    prev = np.array([[1.0, 0.5], [0.5, np.nan]])
    new = np.array([[np.nan, -0.5], [-0.5, 0.2]])
    out = accumulate(prev, new, 0.25)
    assert out[0, 0] == 1.0 and out[1, 1] == 0.2
    assert out[0, 1] == pytest.approx(0.25 * 0.5 - 0.75 * 0.5)
    assert np.array_equal(accumulate(None, new, 0.9), new, equal_nan=True)
    with pytest.raises(ValueError, match="memory"):
        accumulate(prev, new, 1.0)


def test_mix_rescales_weights_where_a_channel_is_missing() -> None:
    a = np.array([[1.0, 0.2], [0.2, 1.0]])
    b = np.array([[1.0, np.nan], [np.nan, 1.0]])
    out = mix([a, b], [1.0, 3.0])
    assert out[0, 1] == pytest.approx(0.2)  # only channel a saw the pair
    assert out[0, 0] == pytest.approx(1.0)
    assert np.isnan(mix([b], [1.0])[0, 1])
    with pytest.raises(ValueError, match="weights"):
        mix([a], [-1.0])


def test_affinity_has_no_floor() -> None:
    """Unrelated (negative) pairs get 0 up to the connectivity term; the diagonal is 0."""
    s = np.array([[1.0, 0.9, -0.5], [0.9, 1.0, -0.2], [-0.5, -0.2, 1.0]])
    a = affinity_from_evidence(s)
    assert a[0, 1] == pytest.approx(0.9 + 0.9e-3)
    assert a[0, 2] == a[1, 2] == pytest.approx(0.9e-3)
    assert np.all(np.diag(a) == 0.0) and np.allclose(a, a.T)


def test_silhouette_and_choose_k() -> None:
    labels, x = planted_profiles(3, 3, 7, noise=0.5)
    s = cosine_matrix(x)
    assert silhouette(s, labels) > 0.5
    assert silhouette(s, np.zeros(9)) == -1.0
    k, found = choose_k(s, 6, cluster)
    assert k == 3 and adjusted_rand(labels, found) == 1.0
    assert choose_k(s[:2, :2], 6, cluster)[0] == 1  # too few nodes to split


def test_sketch_is_exact_for_small_vectors_and_unbiased_for_large_ones() -> None:
    g = torch.Generator().manual_seed(0)
    small = UpdateSketch(10, 1024, seed=3)
    v = torch.randn(10, generator=g)
    assert small.exact and torch.equal(small(v), v)
    big = UpdateSketch(200_000, 2048, seed=3)
    assert not big.exact and big(torch.randn(200_000, generator=g)).numel() == 2048
    base = torch.randn(200_000, generator=g)
    for target in (0.9, 0.5, 0.0):
        other = target * base + (1 - target**2) ** 0.5 * torch.randn(200_000, generator=g)
        exact = float(torch.nn.functional.cosine_similarity(base, other, dim=0))
        sketched = float(torch.nn.functional.cosine_similarity(big(base), big(other), dim=0))
        assert abs(sketched - exact) < 4 / 2048**0.5, (target, exact, sketched)
    again = UpdateSketch(200_000, 2048, seed=3)
    assert torch.equal(again(base), big(base))  # every rank builds the same sketch
    with pytest.raises(ValueError, match="200000"):
        big(torch.zeros(5))


def test_profile_similarity_ignores_model_quality_and_own_models() -> None:
    """Rows of a loss table agree within a group even when one model is bad for everyone and
    each node's own model is far better on its data (both effects are removed)."""
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 4)
    n = labels.size
    quality = np.exp(rng.normal(size=n))  # per model, for everyone
    scale = np.exp(rng.normal(size=n))  # per node (its task's loss scale)
    mismatch = np.where(labels[:, None] == labels[None, :], 1.0, 2.0)
    table = scale[:, None] * quality[None, :] * mismatch * np.exp(0.05 * rng.normal(size=(n, n)))
    np.fill_diagonal(table, 1e-3)  # own models: far better
    table[5, 2] = np.nan  # node 5 did not see model 2
    sim = profile_similarity(table)
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(n, dtype=bool)
    assert sim[same & off].min() > 0.5 and sim[~same].max() < -0.2
    assert np.allclose(sim, sim.T) and np.all(np.diag(sim) == 1.0)


def test_auto_k_does_not_split_off_a_node_that_resembles_no_one() -> None:
    """Three similar nodes and three that are each unlike every other node: two groups, not
    a group of one beside them."""
    s = np.full((6, 6), -0.3)
    s[:3, :3] = 0.45
    s[3, 5] = s[5, 3] = -0.15
    np.fill_diagonal(s, 1.0)
    k, labels = choose_k(s, 5, cluster)
    assert k == 2 and adjusted_rand([0, 0, 0, 1, 1, 1], labels) == 1.0


def test_backbone_sketch_estimates_centred_cosines_within_its_error() -> None:
    """Sketching is linear, so centring the sketches is sketching the centred backbones: the
    centred cosine of m-entry sketches of six 200k-value backbones in two planted groups stays
    within a few 1/sqrt(m) of the exact one, and gives the same partition."""
    rng = np.random.default_rng(5)
    n, p, m = 6, 200_000, 4096
    start = rng.normal(size=p)
    groups = rng.normal(size=(2, p)) * 0.05
    labels = np.array([0, 0, 0, 1, 1, 1])
    x = torch.tensor(start + groups[labels] + 0.05 * rng.normal(size=(n, p)), dtype=torch.float32)
    sk = UpdateSketch(p, m, seed=9)
    sketched = torch.stack([sk(row) for row in x])
    exact, approx = cosine_matrix(x), cosine_matrix(sketched)
    assert np.abs(exact - approx).max() < 4 / np.sqrt(m)
    centred = torch.stack([sk(row) for row in x - x.mean(0)])
    torch.testing.assert_close(centred, sketched - sketched.mean(0), rtol=0, atol=1e-3)
    assert adjusted_rand(labels, cluster(affinity_from_evidence(approx), 2)) == 1.0


def test_backbone_sketch_needs_signals_that_use_no_whole_model() -> None:
    from colnet_mpi.config import ConfigError, config_from_dict

    nodes = [{"task": "attributes", "count": 2}, {"task": "landmarks", "count": 2}]
    ok = config_from_dict({"clustering": {"backbone_sketch": 512}, "nodes": nodes})
    assert ok.clustering.backbone_sketch == 512
    for clustering, extra, needle in [
        ({"signals": "paper"}, {}, 'signals = "paper"'),
        ({"loss_weight": 0.2}, {}, "loss_weight = 0.2"),
        ({}, {"defense": {"screening": True}}, "defense.screening"),
        ({"backbone_sketch": -1}, {}, "backbone_sketch"),
    ]:
        raw = {"clustering": {"backbone_sketch": 512, **clustering}, "nodes": nodes, **extra}
        with pytest.raises(ConfigError, match=needle):
            config_from_dict(raw)
