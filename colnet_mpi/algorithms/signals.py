"""Data-dependent clustering signals: a model's loss and head-Jacobian norm on local data."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ESTIMATORS", "loss_and_jacobian"]

ESTIMATORS = ("exact", "hutchinson")
"""Allowed values of the ``estimator`` argument of :func:`loss_and_jacobian`."""


def _module_device(module: nn.Module) -> torch.device | None:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return None


def _per_sample_sq_norm_exact(f: Tensor, z: Tensor) -> Tensor:
    """Per-sample squared Frobenius norm of df/dz, one autograd pass per output unit."""
    flat = f.reshape(f.shape[0], -1)
    total = torch.zeros(f.shape[0], dtype=torch.float64, device=f.device)
    units = flat.shape[1]
    for k in range(units):
        (grad,) = torch.autograd.grad(flat[:, k].sum(), z, retain_graph=k + 1 < units)
        total += grad.reshape(grad.shape[0], -1).double().pow(2).sum(dim=1)
    return total


def _per_sample_sq_norm_hutchinson(
    f: Tensor, z: Tensor, probes: int, generator: torch.Generator | None
) -> Tensor:
    """Hutchinson estimate of the per-sample squared norm: mean over probes of ||v^T J||^2."""
    total = torch.zeros(f.shape[0], dtype=torch.float64, device=f.device)
    draw_device = generator.device if generator is not None else f.device
    for i in range(probes):
        v = torch.randn(f.shape, generator=generator, device=draw_device, dtype=f.dtype)
        v = v.to(f.device)
        (grad,) = torch.autograd.grad(f, z, grad_outputs=v, retain_graph=i + 1 < probes)
        total += grad.reshape(grad.shape[0], -1).double().pow(2).sum(dim=1)
    return total / probes


def loss_and_jacobian(
    backbone: nn.Module,
    head: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    estimator: str = "exact",
    probes: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Mean loss and mean head-Jacobian norm of the model ``head(backbone(x))`` on ``batches``.

    Both modules run in eval mode (their previous modes, submodule by submodule, are restored
    afterwards), so samples are independent. For each batch ``z = backbone(x)`` is computed
    without gradients and ``f = head(z)`` with gradients with respect to ``z`` only.

    * loss: ``loss_fn(f, y)`` per batch (taken as the batch mean), weighted by the batch size.
    * Jacobian: per sample ``||df/dz||_F`` over the whole feature map ``z`` of that sample,
      averaged over samples. ``estimator="exact"`` does one vector-Jacobian product per output
      unit; ``"hutchinson"`` averages ``||v^T J||^2`` over ``probes`` draws ``v ~ N(0, I)`` (from
      ``generator`` if given) as an unbiased estimate of ``||J||_F^2``, then takes the root.

    Inputs are moved to the backbone's device. No parameter gets a ``.grad``.
    Returns ``(mean_loss, mean_jacobian_norm)`` as Python floats.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an integer >= 1, got {probes!r}")
    device = _module_device(backbone) or _module_device(head)
    modes = [(m, m.training) for m in backbone.modules()]
    modes += [(m, m.training) for m in head.modules()]
    backbone.eval()
    head.eval()
    loss_sum = 0.0
    jac_sum = 0.0
    samples = 0
    try:
        for x, y in batches:
            count = int(x.shape[0])
            if count == 0:
                continue
            if device is not None:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
            with torch.no_grad():
                z = backbone(x)
            z = z.detach().requires_grad_(True)
            with torch.enable_grad():
                f = head(z)
                with torch.no_grad():
                    batch_loss = float(loss_fn(f.detach(), y))
                if estimator == "exact":
                    sq = _per_sample_sq_norm_exact(f, z)
                else:
                    sq = _per_sample_sq_norm_hutchinson(f, z, probes, generator)
            loss_sum += batch_loss * count
            jac_sum += float(sq.clamp_min(0.0).sqrt().sum())
            samples += count
    finally:
        for module, was_training in modes:
            module.train(was_training)
    if samples == 0:
        raise ValueError("batches must hold at least one sample, got none")
    mean_loss = loss_sum / samples
    mean_jac = jac_sum / samples
    if not (math.isfinite(mean_loss) and math.isfinite(mean_jac)):
        raise ValueError(f"signals are not finite: loss {mean_loss!r}, jacobian {mean_jac!r}")
    return mean_loss, mean_jac
