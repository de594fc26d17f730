import itertools
import math

import numpy as np
import pytest
import torch

import colnet_mpi.algorithms.hca as hca_mod
from colnet_mpi.algorithms.hca import (
    HCA_EPS,
    hca_objective,
    hca_update,
    solve_hca_weights,
)


def ref_objective(w, d, c):
    """Objective from the vectors themselves: <D^T w, g_bar> + c sqrt(||D^T w||^2 + eps)."""
    gw = d.T @ w
    return float(gw @ d.mean(axis=0) + c * math.sqrt(gw @ gw + HCA_EPS))


def ref_update(d, w, alpha):
    """Closed-form HCA update for given weights, written independently in float64 numpy."""
    g_bar = d.mean(axis=0)
    c = alpha * np.linalg.norm(g_bar)
    gw = d.T @ w
    lam = c / np.linalg.norm(gw)
    return (g_bar + lam * gw) / (1.0 + alpha**2)


def simplex_grid(g, step):
    m = round(1.0 / step)
    pts = [
        np.array([*c, m - sum(c)], dtype=np.float64) / m
        for c in itertools.product(range(m + 1), repeat=g - 1)
        if sum(c) <= m
    ]
    return np.stack(pts)


def conflicting_deltas(rng, g, p):
    a = rng.normal(size=p)
    d = 0.5 * rng.normal(size=(g, p))
    d[0] += 3.0 * a
    d[1] -= 1.2 * a  # d_1 opposes d_0, which dominates the mean: plain averaging hurts d_1
    return d


@pytest.mark.parametrize("g,step", [(2, 1e-3), (3, 0.01)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solver_beats_dense_simplex_grid(g, step, seed):
    rng = np.random.default_rng(seed)
    alpha = 0.4
    d = conflicting_deltas(rng, g, 25)
    res = hca_update(torch.tensor(d), alpha)
    assert res.solver_ok and res.message == ""
    assert res.weights.shape == (g,)
    assert np.all(res.weights >= -1e-12) and abs(res.weights.sum() - 1.0) < 1e-9
    c = alpha * np.linalg.norm(d.mean(axis=0))
    grid = simplex_grid(g, step)
    values = np.array([ref_objective(w, d, c) for w in grid])
    best = grid[np.argmin(values)]
    f_solver = ref_objective(res.weights, d, c)
    assert f_solver <= values.min() + 1e-9 * max(1.0, abs(values.min()))
    # the public objective (through the Gram matrix) agrees with the vector form
    assert hca_objective(res.weights, d @ d.T, c) == pytest.approx(f_solver, rel=1e-9, abs=1e-12)
    # the update is the closed form at the solver weights, and close to the grid optimum's
    u = res.update.numpy()
    np.testing.assert_allclose(u, ref_update(d, res.weights, alpha), rtol=1e-9, atol=1e-12)
    u_grid = ref_update(d, best, alpha)
    tol = 0.02 if g == 2 else 0.06
    assert np.linalg.norm(u - u_grid) <= tol * np.linalg.norm(u_grid)


def test_one_delta_is_identity():
    d = torch.randn(1, 9)
    res = hca_update(d)
    assert torch.equal(res.update, torch.zeros(9))
    assert res.update.dtype == d.dtype
    np.testing.assert_array_equal(res.weights, [1.0])
    assert res.solver_ok and res.update_norm == 0.0
    assert res.mean_delta_norm == pytest.approx(float(d.norm()), rel=1e-6)


@pytest.mark.parametrize("alpha", [0.4, 0.7])
def test_identical_deltas_by_hand(alpha):
    rng = np.random.default_rng(5)
    v = rng.normal(size=13)
    d = np.stack([v, v, v])
    res = hca_update(torch.tensor(d), alpha)
    # g_bar = v, g_w = v for every w on the simplex, lambda = alpha -> v (1 + alpha) / (1 + alpha^2)
    np.testing.assert_allclose(res.update.numpy(), v * (1 + alpha) / (1 + alpha**2), rtol=1e-9)
    assert res.solver_ok


def test_orthogonal_deltas_all_gain():
    d = np.eye(3)[:2] * np.array([[2.0], [1.0]])
    res = hca_update(torch.tensor(d))
    u = res.update.numpy()
    assert np.all(d @ u > 0)
    np.testing.assert_allclose(u, ref_update(d, res.weights, 0.4), rtol=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_conflict_averse_properties(seed):
    """Check what the dual implies.

    x* = U (1 + a^2) = g_bar + c u maximises min_i <d_i, x> over the ball ||x - g_bar|| <= c.
    Hence (i) min_i <d_i, x*> equals the optimal objective, (ii) it is at least
    min_i <d_i, g_bar>, (iii) no point of the ball does better, and (iv) with c >= ||g_bar||
    (alpha >= 1) the objective is >= 0 by Cauchy-Schwarz, so U conflicts with no delta.
    """
    rng = np.random.default_rng(100 + seed)
    g = int(rng.integers(2, 5))
    d = conflicting_deltas(rng, g, 30)
    g_bar = d.mean(axis=0)
    assert (d @ g_bar).min() < 0  # plain averaging conflicts with some delta
    for alpha in (0.4, 1.0, 1.5):
        res = hca_update(torch.tensor(d), alpha)
        assert res.solver_ok
        c = alpha * np.linalg.norm(g_bar)
        x_star = res.update.numpy() * (1 + alpha**2)
        worst = (d @ x_star).min()
        assert worst == pytest.approx(ref_objective(res.weights, d, c), rel=1e-5, abs=1e-6)
        assert worst >= (d @ g_bar).min() - 1e-9
        dirs = rng.normal(size=(2000, d.shape[1]))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        radii = c * rng.uniform(0, 1, size=(2000, 1)) ** (1 / d.shape[1])
        ball = g_bar + radii * dirs
        assert (ball @ d.T).min(axis=1).max() <= worst + 1e-9
        # points on the sphere near the optimal direction u do not do better either
        u = (x_star - g_bar) / c
        near = u + 0.05 * rng.normal(size=(2000, d.shape[1]))
        near = g_bar + c * near / np.linalg.norm(near, axis=1, keepdims=True)
        assert (near @ d.T).min(axis=1).max() <= worst + 1e-9
        if alpha >= 1.0:
            assert np.all(d @ res.update.numpy() >= -1e-9)


def test_norms_reported():
    rng = np.random.default_rng(7)
    d = rng.normal(size=(3, 40))
    res = hca_update(torch.tensor(d, dtype=torch.float32))
    assert res.update.dtype == torch.float32 and res.update.shape == (40,)
    assert res.mean_delta_norm == pytest.approx(np.linalg.norm(d.mean(axis=0)), rel=1e-6)
    assert res.update_norm == pytest.approx(float(np.linalg.norm(res.update.numpy())), rel=1e-6)


def test_zero_deltas_give_zero_update():
    res = hca_update(torch.zeros(3, 5))
    assert torch.equal(res.update, torch.zeros(5)) and res.solver_ok
    assert res.mean_delta_norm == 0.0 and res.update_norm == 0.0
    np.testing.assert_allclose(res.weights, np.full(3, 1 / 3))


def test_opposite_deltas_cancel():
    v = torch.randn(7, dtype=torch.float64)
    res = hca_update(torch.stack([v, -v]))
    assert res.mean_delta_norm == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(res.update, torch.zeros(7, dtype=torch.float64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_deltas_raise(bad):
    d = torch.randn(3, 4)
    d[1, 2] = bad
    with pytest.raises(ValueError, match="finite"):
        hca_update(d)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="shape"):
        hca_update(torch.randn(5))
    with pytest.raises(ValueError, match="alpha"):
        hca_update(torch.randn(2, 5), alpha=-0.1)
    with pytest.raises(ValueError, match="c must"):
        solve_hca_weights(np.eye(2), -1.0)
    with pytest.raises(ValueError, match="square"):
        solve_hca_weights(np.ones((2, 3)), 0.1)


def test_solution_invariant_to_scale_of_deltas():
    # exact up to HCA_EPS, which is negligible while ||g_w||^2 >> 1e-8
    rng = np.random.default_rng(11)
    d = conflicting_deltas(rng, 3, 20)
    w1 = hca_update(torch.tensor(d)).weights
    w2 = hca_update(torch.tensor(d * 1e-1)).weights
    w3 = hca_update(torch.tensor(d * 1e3)).weights
    np.testing.assert_allclose(w1, w2, atol=1e-4)
    np.testing.assert_allclose(w1, w3, atol=1e-4)


def test_solver_failure_falls_back_to_uniform(monkeypatch):
    class Fake:
        success = False
        message = "Iteration limit reached"
        x = np.array([0.9, 0.1, 0.0])

    monkeypatch.setattr(hca_mod, "minimize", lambda *a, **k: Fake())
    rng = np.random.default_rng(3)
    d = rng.normal(size=(3, 10))
    res = hca_update(torch.tensor(d))
    assert not res.solver_ok and "Iteration limit" in res.message
    np.testing.assert_allclose(res.weights, np.full(3, 1 / 3))
    np.testing.assert_allclose(res.update.numpy(), ref_update(d, np.full(3, 1 / 3), 0.4), rtol=1e-9)


def test_infeasible_solver_result_rejected(monkeypatch):
    class Fake:
        success = True
        message = "Optimization terminated successfully"
        x = np.array([0.8, 0.8])

    monkeypatch.setattr(hca_mod, "minimize", lambda *a, **k: Fake())
    w, ok, msg = solve_hca_weights(np.array([[2.0, -1.0], [-1.0, 1.0]]), 0.3)
    assert not ok and "infeasible" in msg
    np.testing.assert_allclose(w, [0.5, 0.5])
