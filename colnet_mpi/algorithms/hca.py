"""Hyper conflict-averse (HCA) cross-group aggregation of backbone deltas."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize

__all__ = [
    "HCA_EPS",
    "HCAResult",
    "apply_update",
    "hca_objective",
    "hca_update",
    "solve_hca_weights",
]

HCA_EPS = 1e-8
"""Constant under the square root of the HCA objective (keeps it differentiable at U_w = 0)."""

_FEAS_TOL = 1e-6  # tolerance on bounds and on sum(w) = 1 when checking a solver result
_FTOL = 1e-12  # SLSQP stopping tolerance on the (rescaled, order-one) objective
_MAXITER = 500


@dataclass(frozen=True)
class HCAResult:
    """Outcome of one HCA aggregation over the leaders' deltas."""

    update: torch.Tensor
    """The combined update U~ of shape (P,), dtype/device of the deltas (zeros for one delta)."""
    weights: np.ndarray
    """Solver weights w over the G deltas (uniform [1.0] for one delta)."""
    solver_ok: bool
    """False when the solver failed and uniform weights were used instead."""
    mean_delta_norm: float
    """Euclidean norm of the mean delta g_bar."""
    update_norm: float
    """Euclidean norm of the update U~."""
    message: str
    """Why the solver result was rejected ("" when it was accepted)."""


def _check_gram(gram: np.ndarray) -> np.ndarray:
    g = np.asarray(gram, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] == 0:
        raise ValueError(f"gram must be a non-empty square (G, G) matrix, got shape {g.shape}")
    if not np.all(np.isfinite(g)):
        raise ValueError("gram must contain only finite values, got NaN or inf")
    return g


def _objective_and_grad(
    w: np.ndarray, gram: np.ndarray, c: float, eps: float
) -> tuple[float, np.ndarray]:
    n = gram.shape[0]
    g1 = gram.sum(axis=1) / n
    gw = gram @ w
    root = math.sqrt(max(float(w @ gw), 0.0) + eps)
    value = float(w @ g1) + c * root
    grad = g1 + (c / root) * gw
    return value, grad


def hca_objective(w: np.ndarray, gram: np.ndarray, c: float) -> float:
    """Return the HCA dual objective ``w^T G 1 / n + c * sqrt(w^T G w + HCA_EPS)``.

    ``gram`` is the (G, G) Gram matrix ``D D^T`` of the deltas and ``n = G``. The value equals
    ``<U_w, g_bar> + c * ||U_w||`` with ``U_w = D^T w`` (up to the small ``HCA_EPS``).
    """
    g = _check_gram(gram)
    wv = np.asarray(w, dtype=np.float64).reshape(-1)
    if wv.shape[0] != g.shape[0]:
        raise ValueError(f"w must have {g.shape[0]} entries to match gram, got {wv.shape[0]}")
    gs = 0.5 * (g + g.T)
    return _objective_and_grad(wv, gs, float(c), HCA_EPS)[0]


def solve_hca_weights(gram: np.ndarray, c: float) -> tuple[np.ndarray, bool, str]:
    """Minimise :func:`hca_objective` over the probability simplex with SLSQP.

    Starts from uniform weights with bounds [0, 1] and the equality ``sum(w) = 1`` and uses the
    analytic gradient. The problem is solved on ``gram / s`` (``s`` = largest diagonal entry) with
    ``c / sqrt(s)`` and ``HCA_EPS / s``, which has exactly the same minimiser but an objective of
    order one, so the stopping tolerance means the same at every scale of the deltas.

    Returns ``(w, ok, message)``. A result is accepted only when the solver reports success, the
    weights are finite and feasible (within 1e-6) and the objective is not above its value at the
    start; otherwise the uniform weights are returned with ``ok = False`` and the reason.
    """
    g = _check_gram(gram)
    c = float(c)
    if not math.isfinite(c) or c < 0.0:
        raise ValueError(f"c must be finite and >= 0, got {c!r}")
    n = g.shape[0]
    uniform = np.full(n, 1.0 / n)
    if n == 1:
        return np.ones(1), True, ""
    gs = 0.5 * (g + g.T)
    scale = float(np.max(np.diag(gs)))
    if scale <= 0.0:
        # every delta is zero: the objective is constant, uniform is optimal
        return uniform, True, ""
    gs = gs / scale
    cs = c / math.sqrt(scale)
    eps = HCA_EPS / scale

    def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
        return _objective_and_grad(w, gs, cs, eps)

    try:
        res = minimize(
            fun,
            uniform.copy(),
            jac=True,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * n,
            constraints=[
                {
                    "type": "eq",
                    "fun": lambda w: np.array([np.sum(w) - 1.0]),
                    "jac": lambda w: np.ones((1, w.shape[0])),
                }
            ],
            options={"ftol": _FTOL, "maxiter": _MAXITER},
        )
    except (ValueError, ArithmeticError) as exc:  # pragma: no cover - defensive
        return uniform, False, f"SLSQP raised {type(exc).__name__}: {exc}"
    w = np.asarray(res.x, dtype=np.float64)
    if not res.success:
        return uniform, False, f"SLSQP did not converge: {res.message}"
    if w.shape != (n,) or not np.all(np.isfinite(w)):
        return uniform, False, "SLSQP returned non-finite weights"
    if w.min() < -_FEAS_TOL or w.max() > 1.0 + _FEAS_TOL or abs(w.sum() - 1.0) > _FEAS_TOL:
        return uniform, False, f"SLSQP returned infeasible weights {w.tolist()}"
    w = np.clip(w, 0.0, 1.0)
    w = w / w.sum()
    f_start = fun(uniform)[0]
    f_end = fun(w)[0]
    if f_end > f_start + 1e-9 * max(1.0, abs(f_start)):
        return uniform, False, f"SLSQP ended above its start ({f_end!r} > {f_start!r})"
    return w, True, ""


def hca_update(deltas: torch.Tensor, alpha: float = 0.4) -> HCAResult:
    """Combine the leaders' backbone deltas (shape ``(G, P)``) into one HCA update.

    ``g_bar`` is the mean delta, ``c = alpha * ||g_bar||``, ``w`` minimises
    :func:`hca_objective` over the simplex, ``g_w = D^T w`` and
    ``U~ = (g_bar + c / ||g_w|| * g_w) / (1 + alpha^2)`` (the ``g_w`` term is dropped when
    ``||g_w||`` is negligible). The vectors are combined once, as ``D^T coef``, in float64; the
    update is returned in the deltas' dtype and device. One delta gives the identity (a zero
    update); all-zero deltas give a zero update. Non-finite deltas raise ``ValueError``.
    """
    if not isinstance(deltas, torch.Tensor):
        raise ValueError(f"deltas must be a torch.Tensor, got {type(deltas).__name__}")
    if deltas.dim() != 2 or deltas.shape[0] == 0:
        raise ValueError(f"deltas must have shape (G, P) with G >= 1, got {tuple(deltas.shape)}")
    if not deltas.is_floating_point():
        raise ValueError(f"deltas must have a floating dtype, got {deltas.dtype}")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0.0:
        raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
    if not bool(torch.isfinite(deltas).all()):
        raise ValueError("deltas must contain only finite values, got NaN or inf")
    n = deltas.shape[0]
    d64 = deltas.detach().to(torch.float64)
    g_bar = d64.mean(dim=0)
    mean_norm = float(torch.linalg.vector_norm(g_bar))
    if n == 1:
        return HCAResult(
            update=torch.zeros_like(deltas[0]),
            weights=np.ones(1),
            solver_ok=True,
            mean_delta_norm=mean_norm,
            update_norm=0.0,
            message="",
        )
    gram = (d64 @ d64.T).cpu().numpy()
    gram = 0.5 * (gram + gram.T)
    if not np.any(gram):
        return HCAResult(
            update=torch.zeros_like(deltas[0]),
            weights=np.full(n, 1.0 / n),
            solver_ok=True,
            mean_delta_norm=mean_norm,
            update_norm=0.0,
            message="",
        )
    c = alpha * mean_norm
    w, ok, message = solve_hca_weights(gram, c)
    gw_norm = math.sqrt(max(float(w @ gram @ w), 0.0))
    max_delta_norm = math.sqrt(float(np.max(np.diag(gram))))
    lam = c / gw_norm if (c > 0.0 and gw_norm > HCA_EPS * max_delta_norm) else 0.0
    coef = (np.full(n, 1.0 / n) + lam * w) / (1.0 + alpha * alpha)
    update64 = torch.as_tensor(coef, dtype=torch.float64, device=d64.device) @ d64
    update_norm = float(torch.linalg.vector_norm(update64))
    return HCAResult(
        update=update64.to(deltas.dtype),
        weights=w,
        solver_ok=ok,
        mean_delta_norm=mean_norm,
        update_norm=update_norm,
        message=message,
    )


def apply_update(
    backbone: torch.Tensor, update: torch.Tensor, psi: float, n_trainable: int
) -> torch.Tensor:
    """``backbone`` with ``psi * update`` added to its first ``n_trainable`` entries (a copy).

    The update is cast to the backbone's dtype; BatchNorm statistics (the tail) are unchanged.
    """
    out = backbone.clone()
    out[:n_trainable] += psi * update.to(out.dtype)
    return out
