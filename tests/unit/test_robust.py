"""Unit tests for colnet_mpi.algorithms.robust: robust rules, screening, HCA verification."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import trim_mean

from colnet_mpi.algorithms.hca import hca_update
from colnet_mpi.algorithms.robust import (
    ROBUST_RULES,
    clip_scales,
    coordinate_median,
    norm_clipped_mean,
    robust_aggregate,
    screen_updates,
    trimmed_mean,
    verify_hca,
)
from colnet_mpi.attacks import manipulate


def _rows(seed: int, m: int, p: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(m, p))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 10])
def test_median_matches_numpy(m: int) -> None:
    u = _rows(m, m, 41)
    got = coordinate_median(torch.tensor(u))
    np.testing.assert_allclose(got.numpy(), np.median(u, axis=0), rtol=0, atol=1e-15)
    # weights are documented as ignored
    assert torch.equal(coordinate_median(torch.tensor(u), [1.0] * (m - 1) + [100.0]), got)


@pytest.mark.parametrize("m", [1, 3, 5, 8, 10, 13])
@pytest.mark.parametrize("trim", [0.0, 0.1, 0.2, 0.25, 0.4, 0.49])
def test_trimmed_mean_matches_scipy(m: int, trim: float) -> None:
    u = _rows(100 + m, m, 33)
    got = trimmed_mean(torch.tensor(u), trim)
    np.testing.assert_allclose(got.numpy(), trim_mean(u, trim, axis=0), rtol=1e-12, atol=1e-14)


def test_trimmed_mean_drops_floor_beta_m_per_side() -> None:
    # one coordinate, m = 10, trim 0.2 -> drop 2 per side -> mean of 3..8 (shifted values)
    u = torch.arange(10, dtype=torch.float64).unsqueeze(1)
    u[0, 0] = -1e9
    u[9, 0] = 1e9
    assert float(trimmed_mean(u, 0.2)[0]) == pytest.approx(np.mean(np.arange(2, 8)))
    assert float(trimmed_mean(u, 0.0)[0]) == pytest.approx(float(u.mean()))


@pytest.mark.parametrize("trim", [0.5, 0.7, -0.1, math.nan])
def test_trimmed_mean_rejects_bad_trim(trim: float) -> None:
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean(torch.zeros(4, 3), trim)


def test_median_and_trimmed_mean_are_translation_equivariant() -> None:
    u = torch.tensor(_rows(5, 6, 20))
    start = torch.tensor(_rows(6, 1, 20)[0])
    for fn in (coordinate_median, lambda x: trimmed_mean(x, 0.2)):
        torch.testing.assert_close(fn(u + start), start + fn(u), rtol=0, atol=1e-12)


def test_rules_reject_non_finite() -> None:
    u = torch.ones(3, 4)
    u[1, 2] = math.nan
    for rule in ROBUST_RULES[1:]:
        with pytest.raises(ValueError, match=r"rows \[1\]"):
            robust_aggregate(u, rule)


def test_norm_clipping_caps_norms_and_is_plain_mean_without_clipping() -> None:
    u = torch.tensor(_rows(7, 5, 30))
    norms = torch.linalg.vector_norm(u, dim=1)
    w = [1.0, 2.0, 3.0, 4.0, 5.0]
    # threshold above every norm: exactly the weighted mean
    big = float(norms.max()) * 1.01
    expect = (torch.tensor(w, dtype=u.dtype) / sum(w)) @ u
    torch.testing.assert_close(norm_clipped_mean(u, w, big), expect, rtol=1e-14, atol=1e-14)
    # small threshold: every row clipped to norm tau -> result is the mean of the rescaled rows
    tau = float(norms.min()) * 0.5
    clipped = u / norms.unsqueeze(1) * tau
    torch.testing.assert_close(norm_clipped_mean(u, None, tau), clipped.mean(0))
    assert float(torch.linalg.vector_norm(norm_clipped_mean(u, None, tau))) <= tau + 1e-12


def test_norm_clipping_auto_uses_median_norm() -> None:
    u = torch.zeros(5, 2, dtype=torch.float64)
    for i, n in enumerate([1.0, 2.0, 3.0, 4.0, 100.0]):
        u[i, 0] = n
    # median norm = 3 -> rows become 1, 2, 3, 3, 3 (in coordinate 0)
    assert float(norm_clipped_mean(u)[0]) == pytest.approx(12.0 / 5)
    assert float(norm_clipped_mean(u, auto_factor=2.0)[0]) == pytest.approx(16.0 / 5)  # tau 6
    # the planted big row barely moves the clipped mean, but dominates the plain one
    assert float(robust_aggregate(u, "mean")[0]) == pytest.approx(110.0 / 5)


def test_robust_aggregate_dispatch() -> None:
    u = torch.tensor(_rows(3, 5, 8))
    torch.testing.assert_close(robust_aggregate(u, "median"), coordinate_median(u))
    torch.testing.assert_close(robust_aggregate(u, "trimmed_mean", trim=0.2), trimmed_mean(u, 0.2))
    torch.testing.assert_close(
        robust_aggregate(u, "norm_clipped_mean", [1, 2, 3, 4, 5], clip=0.5),
        norm_clipped_mean(u, [1, 2, 3, 4, 5], 0.5),
    )
    with pytest.raises(ValueError, match="rule must be one of"):
        robust_aggregate(u, "krum")


# -- screening --------------------------------------------------------------------------------


def _honest(seed: int, m: int, p: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(p, generator=g, dtype=torch.float64)
    return base + 0.6 * torch.randn(m, p, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("m", [3, 5, 8])
def test_screen_keeps_honest_and_excludes_planted_outliers(seed: int, m: int) -> None:
    u = _honest(seed, m)
    clean = screen_updates(u, norm_ratio=3.0, min_cosine=0.0)
    assert bool(clean.keep.all()), clean.reasons
    assert clean.note == "" and not bool(clean.flagged.any())
    # big norm (boost-like): 10x an honest update
    big = u.clone()
    big[0] = 10.0 * u[0]
    res = screen_updates(big, norm_ratio=3.0, min_cosine=0.0)
    assert res.keep.tolist() == [False] + [True] * (m - 1), res.reasons
    assert "norm ratio" in res.reasons[0] and all(r == "" for r in res.reasons[1:])
    # opposite direction, same norm
    flip = u.clone()
    flip[m - 1] = -u[m - 1]
    res = screen_updates(flip, norm_ratio=3.0, min_cosine=0.0)
    assert res.keep.tolist() == [True] * (m - 1) + [False], res.reasons
    assert res.reasons[m - 1].startswith("cosine")
    assert float(res.cosine_scores[m - 1]) < 0.0 < float(res.cosine_scores[:-1].min())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("m", [3, 5])
def test_clip_mode_keeps_a_boosted_update_and_rescales_it(seed: int, m: int) -> None:
    """exclude_norm=False: a x10 update is kept, and clip_scales brings it back to the median
    norm with its direction; the cosine test still excludes a flipped update."""
    u = _honest(seed, m)
    big = u.clone()
    big[0] = 10.0 * u[0]
    big[m - 1] = -u[m - 1]
    res = screen_updates(big, norm_ratio=3.0, min_cosine=0.0, exclude_norm=False)
    assert res.keep.tolist() == [True] * (m - 1) + [False], res.reasons
    assert res.reasons[0] == "" and float(res.norm_scores[0]) > 3.0
    scale = clip_scales(res.norm_scores, 3.0)
    assert scale[1:].tolist() == [1.0] * (m - 1)
    clipped = big[0] * scale[0]
    median = float(torch.median(big.norm(dim=1)))  # odd m: the middle norm
    assert float(clipped.norm()) == pytest.approx(median, rel=1e-12)
    cos = float(clipped @ u[0] / (clipped.norm() * u[0].norm()))
    assert cos == pytest.approx(1.0, abs=1e-12)
    # the same rows with the default: the norm test flags the big one
    default = screen_updates(big, 3.0, 0.0)
    assert bool(default.flagged[0]) and "norm ratio" in default.reasons[0]


def test_clip_scales_leave_undefined_and_small_scores_alone() -> None:
    scores = torch.tensor([0.1, 1.0, 2.9, 3.0, 6.0, math.nan, math.inf], dtype=torch.float64)
    out = clip_scales(scores, 3.0)
    assert out.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0 / 6.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="norm_ratio"):
        clip_scales(scores, 0.5)


@pytest.mark.parametrize("m", [2, 3, 4, 5, 6])
def test_screen_scores_match_definitions(m: int) -> None:
    u = _honest(11, m)
    res = screen_updates(u, norm_ratio=3.0, min_cosine=0.0)
    norms = u.norm(dim=1).numpy()
    np.testing.assert_allclose(res.norm_scores.numpy(), norms / np.median(norms), rtol=1e-12)
    un = u.numpy()
    for i in range(m):
        ref = np.median(un if m == 3 else np.delete(un, i, axis=0), axis=0)
        cos = un[i] @ ref / (np.linalg.norm(un[i]) * np.linalg.norm(ref))
        assert float(res.cosine_scores[i]) == pytest.approx(cos, rel=1e-12)


def test_screen_excludes_non_finite_always() -> None:
    u = _honest(2, 4)
    u[1, 5] = math.nan
    u[3, 0] = math.inf
    res = screen_updates(u, norm_ratio=3.0, min_cosine=0.0)
    assert res.keep.tolist() == [True, False, True, False]
    assert res.reasons[1] == "non-finite" and res.reasons[3] == "non-finite"
    assert math.isnan(float(res.norm_scores[1]))
    # two finite rows left: relative tests not applied
    assert "relative tests not applied" in res.note


def test_screen_small_groups_apply_only_non_finite_test() -> None:
    u = torch.tensor([[1.0, 0.0], [-100.0, 0.0]], dtype=torch.float64)
    res = screen_updates(u, norm_ratio=2.0, min_cosine=0.5)
    assert res.keep.tolist() == [True, True]
    assert "only 2 finite" in res.note
    assert float(res.cosine_scores[0]) == pytest.approx(-1.0)
    one = screen_updates(torch.full((1, 3), math.nan), norm_ratio=2.0, min_cosine=0.5)
    assert one.keep.tolist() == [False] and one.note == "no finite update"


def test_screen_never_excludes_a_majority() -> None:
    # 4 of 5 rows flagged: screening suspended, all kept, flags still reported
    u = torch.zeros(5, 2, dtype=torch.float64)
    u[:, 0] = torch.tensor([1.0, 10.0, 100.0, 1000.0, 10000.0])
    res = screen_updates(u, norm_ratio=2.0, min_cosine=-1.0)
    assert bool(res.keep.all())
    assert int(res.flagged.sum()) == 4 and "suspended" in res.note
    # 2 of 5 flagged: both excluded (limit (5 - 1) // 2 = 2)
    u[:, 0] = torch.tensor([1.0, 1.1, 1.2, 50.0, 0.01])
    res = screen_updates(u, norm_ratio=2.0, min_cosine=-1.0)
    assert res.keep.tolist() == [True, True, True, False, False] and res.note == ""
    # 2 of 4 flagged: limit (4 - 1) // 2 = 1 -> suspended
    res = screen_updates(u[1:], norm_ratio=2.0, min_cosine=-1.0)
    assert bool(res.keep.all()) and "suspended" in res.note


def test_screen_zero_median_norm() -> None:
    u = torch.zeros(4, 3, dtype=torch.float64)
    u[2, 0] = 1.0
    res = screen_updates(u, norm_ratio=5.0, min_cosine=0.0)
    assert res.keep.tolist() == [True, True, False, True]
    assert math.isinf(float(res.norm_scores[2])) and float(res.norm_scores[0]) == 1.0


@pytest.mark.parametrize("bad", [dict(norm_ratio=0.5), dict(min_cosine=1.5)])
def test_screen_rejects_bad_thresholds(bad: dict) -> None:
    kw = dict(norm_ratio=2.0, min_cosine=0.0) | bad
    with pytest.raises(ValueError):
        screen_updates(torch.zeros(3, 2), **kw)


# -- leader verification ----------------------------------------------------------------------


def _deltas(seed: int, g: int = 3, p: int = 50) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    d = 0.5 * rng.normal(size=(g, p))
    a = rng.normal(size=p)
    d[0] += 3.0 * a
    d[1] -= 1.2 * a
    return torch.tensor(d)


def test_hca_update_is_bitwise_deterministic() -> None:
    d = _deltas(0)
    assert torch.equal(hca_update(d, 0.4).update, hca_update(d.clone(), 0.4).update)


@pytest.mark.parametrize("seed", range(4))
def test_verify_accepts_honest_and_rejects_manipulated(seed: int) -> None:
    d = _deltas(seed)
    honest = hca_update(d, 0.4).update
    ok = verify_hca(d, honest, 0.4)
    assert ok.ok and ok.rel_error == 0.0
    # float32 transport of the honest update still passes
    f32 = verify_hca(d.float(), honest.float(), 0.4)
    assert f32.ok and f32.rel_error < 1e-5 and f32.recomputed.dtype == torch.float32
    scaled = verify_hca(d, manipulate(honest, "scale", 2.0), 0.4)
    assert not scaled.ok and scaled.rel_error == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(seed)
    noisy = verify_hca(d, manipulate(honest, "noise", 0.05, gen), 0.4)
    assert not noisy.ok and noisy.rel_error == pytest.approx(0.05)
    nan = honest.clone()
    nan[3] = math.nan
    bad = verify_hca(d, nan, 0.4)
    assert not bad.ok and math.isinf(bad.rel_error)
    torch.testing.assert_close(bad.recomputed, honest)


def test_verify_single_group_expects_zero_update() -> None:
    d = _deltas(1)[:1]
    assert verify_hca(d, torch.zeros(50, dtype=torch.float64), 0.4).ok
    assert not verify_hca(d, torch.full((50,), 1e-3, dtype=torch.float64), 0.4).ok


def test_verify_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        verify_hca(_deltas(0), torch.zeros(49, dtype=torch.float64), 0.4)


# -- local_norm_scores ----------------------------------------------------------------------------
def _two_tasks(seed: int) -> torch.Tensor:
    """Three updates of one task and three of another, the second task at 3x the scale."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(1, 64, generator=g), torch.randn(1, 64, generator=g)
    return torch.cat(
        [a + 0.1 * torch.randn(3, 64, generator=g), 3 * (b + 0.1 * torch.randn(3, 64, generator=g))]
    )


@pytest.mark.parametrize("seed", range(5))
def test_local_norm_scores_find_a_boost_that_a_global_median_misses(seed):
    from colnet_mpi.algorithms.robust import local_norm_scores

    rows = _two_tasks(seed)
    rows[1] *= 5.0
    scores = local_norm_scores(rows)
    assert scores[1] > 4.0
    assert (torch.cat([scores[:1], scores[2:]]) < 1.5).all(), scores
    # against the global median the boosted row would pass a ratio-3 test
    norms = torch.linalg.vector_norm(rows, dim=1)
    assert norms[1] / norms.median() < 3.0


def test_local_norm_scores_non_finite_and_degenerate_rows():
    from colnet_mpi.algorithms.robust import local_norm_scores

    rows = _two_tasks(0)
    rows[4, 3] = float("nan")
    scores = local_norm_scores(rows)
    assert math.isinf(float(scores[4])) and torch.isfinite(scores[[0, 1, 2, 3, 5]]).all()
    assert local_norm_scores(torch.zeros(3, 4)).tolist() == [1.0, 1.0, 1.0]
    single = local_norm_scores(torch.ones(1, 4))
    assert math.isnan(float(single[0]))  # nothing to compare with
    lonely = torch.ones(2, 4)
    lonely[0, 0] = float("inf")
    assert math.isinf(float(local_norm_scores(lonely)[0]))
    assert math.isnan(float(local_norm_scores(lonely)[1]))
    with pytest.raises(ValueError, match="neighbours"):
        local_norm_scores(rows, neighbours=0)
