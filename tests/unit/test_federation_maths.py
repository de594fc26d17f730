"""Unit tests for the pure helpers of a round in colnet_mpi.algorithms (no MPI)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from colnet_mpi.algorithms.clustering import leader_flags
from colnet_mpi.algorithms.fedavg import group_delta, mean_from_sum, with_weight
from colnet_mpi.algorithms.hca import apply_update
from colnet_mpi.algorithms.robust import finite_rows, mean_of_finite_rows, quarantine_vote


# -- fedavg ----------------------------------------------------------------------------------------
def test_with_weight_layout() -> None:
    v = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    out = with_weight(v, 3.0)
    assert out.dtype == v.dtype and out.shape == (4,)
    assert out.tolist() == [3.0, -6.0, 1.5, 3.0]
    assert v.tolist() == [1.0, -2.0, 0.5]  # input untouched


@pytest.mark.parametrize("seed", range(6))
def test_sum_of_shares_gives_numpy_weighted_mean(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m, p = int(rng.integers(1, 8)), int(rng.integers(1, 50))
    x = rng.normal(size=(m, p))
    w = rng.uniform(0.1, 500.0, size=m)
    if seed % 2:
        w = np.round(w)  # sample counts
    summed = sum(with_weight(torch.tensor(x[i]), float(w[i])) for i in range(m))
    got = mean_from_sum(summed)
    assert got.shape == (p,)
    np.testing.assert_allclose(got.numpy(), np.average(x, axis=0, weights=w), rtol=1e-12)


def test_equal_weights_give_plain_mean_in_float32() -> None:
    x = torch.randn(5, 17, dtype=torch.float32)
    summed = torch.stack([with_weight(row, 1.0) for row in x]).sum(dim=0)
    got = mean_from_sum(summed)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), x.numpy().mean(axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_trainable", [0, 1, 4, 7])
def test_group_delta_covers_trainable_entries_only(n_trainable: int) -> None:
    rng = np.random.default_rng(n_trainable)
    agg, ref = rng.normal(size=7), rng.normal(size=7)
    got = group_delta(torch.tensor(agg), torch.tensor(ref), n_trainable)
    assert got.shape == (n_trainable,)
    np.testing.assert_array_equal(got.numpy(), [agg[i] - ref[i] for i in range(n_trainable)])


# -- hca.apply_update ------------------------------------------------------------------------------
@pytest.mark.parametrize("psi", [1.0, 0.5, 0.0, -2.0])
@pytest.mark.parametrize("n_trainable", [0, 3, 10])
def test_apply_update_changes_first_entries_only(psi: float, n_trainable: int) -> None:
    rng = np.random.default_rng(7)
    backbone_np = rng.normal(size=10)
    update_np = rng.normal(size=n_trainable)
    backbone = torch.tensor(backbone_np)
    update = torch.tensor(update_np)
    out = apply_update(backbone, update, psi, n_trainable)
    expected = backbone_np.copy()
    for i in range(n_trainable):
        expected[i] = backbone_np[i] + psi * update_np[i]
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-15)
    assert torch.equal(out[n_trainable:], backbone[n_trainable:])  # BatchNorm tail untouched
    assert np.array_equal(backbone.numpy(), backbone_np)  # inputs not modified
    assert np.array_equal(update.numpy(), update_np)
    assert out.data_ptr() != backbone.data_ptr()


def test_apply_update_casts_to_the_backbone_dtype() -> None:
    backbone = torch.zeros(5, dtype=torch.float32)
    update = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    out = apply_update(backbone, update, 0.5, 3)
    assert out.dtype == torch.float32
    assert out.tolist() == [0.5, 1.0, 1.5, 0.0, 0.0]
    assert backbone.tolist() == [0.0] * 5


# -- robust: finite rows ---------------------------------------------------------------------------
def _rows_with_bad(seed: int, m: int, p: int, bad: dict[int, float]) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(m, p))
    for row, value in bad.items():
        x[row, (row * 3) % p] = value
    return x


def test_finite_rows() -> None:
    x = _rows_with_bad(0, 5, 4, {1: math.nan, 3: math.inf, 4: -math.inf})
    got = finite_rows(torch.tensor(x))
    assert got.dtype == torch.bool
    assert (
        got.tolist()
        == [bool(np.all(np.isfinite(r))) for r in x]
        == [
            True,
            False,
            True,
            False,
            False,
        ]
    )


@pytest.mark.parametrize("own", [0, 2])
def test_mean_of_finite_rows_skips_bad_rows(own: int) -> None:
    x = _rows_with_bad(1, 5, 6, {1: math.nan, 4: math.inf})
    got = mean_of_finite_rows(torch.tensor(x), own)
    assert got is not None
    np.testing.assert_allclose(got.numpy(), (x[0] + x[2] + x[3]) / 3, rtol=1e-12)


def test_mean_of_finite_rows_all_finite_is_plain_mean() -> None:
    x = _rows_with_bad(2, 4, 3, {})
    got = mean_of_finite_rows(torch.tensor(x), 3)
    assert got is not None
    np.testing.assert_allclose(got.numpy(), x.mean(axis=0), rtol=1e-12)


@pytest.mark.parametrize("own", [1, 4])
def test_mean_of_finite_rows_none_when_own_row_is_bad(own: int) -> None:
    x = _rows_with_bad(3, 5, 6, {1: math.nan, 4: -math.inf})
    assert mean_of_finite_rows(torch.tensor(x), own) is None


# -- robust: quarantine vote -----------------------------------------------------------------------
def _vote_by_hand(v: np.ndarray, refused_only: bool) -> tuple[list[bool], list[bool]]:
    n = v.shape[0]
    outlier, quarantined = [], []
    for j in range(n):
        testers = [v[i][j] for i in range(n) if v[i][j] != -1]
        bad = sum(1 for x in testers if x in (1, 2))
        refused = sum(1 for x in testers if x == 2)
        outlier.append(bad > len(testers) / 2)
        quarantined.append(refused > len(testers) / 2 if refused_only else outlier[-1])
    return outlier, quarantined


def test_quarantine_vote_strict_majority() -> None:
    # column j: the testers' verdicts on node j
    v = np.array(
        [
            [-1, 1, 1, 0, 2, 1],
            [1, -1, 0, 0, 2, -1],
            [0, 1, -1, 1, 0, -1],
            [1, 0, 1, -1, 2, -1],
        ]
    )
    v = np.vstack([v, np.full((2, 6), -1)])  # nodes 4, 5 tested nobody
    outlier, quarantined = quarantine_vote(v, refused_only=False)
    # node 0: 2 of 3 flagged -> out; node 1: 2 of 3; node 2: 2 of 3; node 3: 1 of 3 -> kept;
    # node 4: 3 of 4 refused -> out; node 5: its only tester flagged it -> out
    assert outlier.tolist() == [True, True, True, False, True, True]
    assert quarantined.tolist() == outlier.tolist()
    outlier, quarantined = quarantine_vote(v, refused_only=True)
    assert outlier.tolist() == [True, True, True, False, True, True]
    assert quarantined.tolist() == [False, False, False, False, True, False]


def test_quarantine_vote_tie_is_not_a_majority() -> None:
    v = np.array([[-1, 1, 2], [0, -1, 0], [-1, 1, -1]])
    # node 1: testers 0 (flag), 2 (flag) -> 2 of 2; node 2: testers 0 (refused), 1 (passed): tie
    outlier, quarantined = quarantine_vote(v, refused_only=True)
    assert outlier.tolist() == [False, True, False]
    assert quarantined.tolist() == [False, False, False]


def test_quarantine_vote_untested_node_is_kept() -> None:
    v = np.full((3, 3), -1)
    v[0, 1] = 1
    outlier, quarantined = quarantine_vote(v, refused_only=False)
    assert outlier.tolist() == [False, True, False]
    assert quarantined.tolist() == [False, True, False]


@pytest.mark.parametrize("refused_only", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_quarantine_vote_matches_direct_loop(seed: int, refused_only: bool) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    v = rng.choice([-1, 0, 1, 2], size=(n, n), p=rng.dirichlet(np.ones(4)))
    outlier, quarantined = quarantine_vote(v, refused_only=refused_only)
    want_outlier, want_quarantined = _vote_by_hand(v, refused_only)
    assert outlier.dtype == bool and quarantined.dtype == bool
    assert outlier.tolist() == want_outlier
    assert quarantined.tolist() == want_quarantined
    assert not np.any(quarantined & ~outlier)  # quarantined nodes are always outliers


@pytest.mark.parametrize("shape", [(2, 3), (4,), (2, 2, 2), (0, 3)])
def test_quarantine_vote_rejects_non_square(shape) -> None:
    with pytest.raises(ValueError, match="square"):
        quarantine_vote(np.zeros(shape, dtype=int), refused_only=False)


# -- clustering.leader_flags -----------------------------------------------------------------------
def _leaders_by_hand(groups: list[int], r: int) -> set[int]:
    leaders = set()
    for label in set(groups) - {-1}:
        members = sorted(i for i, g in enumerate(groups) if g == label)
        leaders.add(members[(r - 1) % len(members)])
    return leaders


def test_leader_flags_example() -> None:
    groups = np.array([1, 0, 1, -1, 0, 1, 2])
    assert np.flatnonzero(leader_flags(groups, 1)).tolist() == [0, 1, 6]
    assert np.flatnonzero(leader_flags(groups, 2)).tolist() == [2, 4, 6]
    assert np.flatnonzero(leader_flags(groups, 3)).tolist() == [1, 5, 6]
    assert np.flatnonzero(leader_flags(groups, 4)).tolist() == [0, 4, 6]


def test_leader_flags_all_quarantined() -> None:
    flags = leader_flags(np.full(4, -1), 3)
    assert flags.dtype == bool and not flags.any()


@pytest.mark.parametrize("seed", range(30))
def test_leader_flags_one_per_group_rotating(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    groups = rng.integers(-1, 4, size=n)
    for r in range(1, 9):
        flags = leader_flags(groups, r)
        assert flags.shape == (n,) and flags.dtype == bool
        assert set(np.flatnonzero(flags).tolist()) == _leaders_by_hand(groups.tolist(), r)
        for label in set(groups.tolist()) - {-1}:
            assert flags[groups == label].sum() == 1
        assert not flags[groups == -1].any()
