"""AT2FL: local training on FGSM-perturbed mini-batches, then optional weight clipping."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from colnet_mpi.tasks import LossFn, loss_function, train_epoch

__all__ = ["at2fl_epoch", "clip_weights", "fgsm"]


def fgsm(
    model_fn: Callable[[Tensor], Tensor],
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    epsilon: float,
    *,
    clamp: tuple[float, float] | None = None,
) -> Tensor:
    """Return ``x + epsilon * sign(grad_x loss_fn(model_fn(x), y))`` as a detached tensor.

    Only the gradient with respect to ``x`` is computed (``torch.autograd.grad``), so the
    parameters' ``.grad`` fields are left as they were; modules run in whatever mode they are in
    (in train mode the forward pass also updates BatchNorm running statistics once). Values are
    clamped to ``clamp = (low, high)`` only when it is given.
    """
    eps = float(epsilon)
    if not math.isfinite(eps) or eps < 0.0:
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    if not x.is_floating_point():
        raise ValueError(f"x must have a floating dtype, got {x.dtype}")
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        loss = loss_fn(model_fn(xg), y)
        (grad,) = torch.autograd.grad(loss, xg)
    out = x.detach() + eps * grad.sign()
    if clamp is not None:
        out = out.clamp(float(clamp[0]), float(clamp[1]))
    return out


@torch.no_grad()
def clip_weights(modules: Iterable[nn.Module], limit: float) -> None:
    """Clamp every parameter of ``modules`` to ``[-limit, limit]`` in place (buffers untouched)."""
    lim = float(limit)
    if not math.isfinite(lim) or lim <= 0.0:
        raise ValueError(f"weight clip must be a finite number > 0, got {limit!r}")
    for m in modules:
        for p in m.parameters():
            p.clamp_(-lim, lim)


def at2fl_epoch(
    backbone: nn.Module,
    head: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    kind: str,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    epsilon: float,
    n_batches: int | None,
    grad_clip: float | None = None,
    weight_clip: float | None = None,
    adversarial_only: bool = False,
) -> float:
    """One AT2FL training epoch; returns the mean training loss per sample (as ``train_epoch``).

    Runs :func:`colnet_mpi.tasks.train_epoch` with a batch hook that replaces the inputs of the
    first ``n_batches`` mini-batches (all when None) by their FGSM versions
    ``x + epsilon * sign(grad_x L)``, computed against the current model just before the step
    on them; later batches are trained on unchanged. With ``adversarial_only`` the epoch stops
    after those ``n_batches`` (use that for an extra adversarial pass after normal training).
    Afterwards every parameter of ``backbone`` and ``head`` is clamped to ``±weight_clip`` when
    given. The loss and the FGSM gradient use the task's ``loss_function(kind)``.
    """
    if n_batches is not None and (
        isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 0
    ):
        raise ValueError(f"n_batches must be None or an integer >= 0, got {n_batches!r}")
    eps = float(epsilon)
    if not math.isfinite(eps) or eps < 0.0:
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    if weight_clip is not None and not (math.isfinite(weight_clip) and weight_clip > 0):
        raise ValueError(f"weight_clip must be None or a finite number > 0, got {weight_clip!r}")
    loss_fn = loss_function(kind)

    def model_fn(x: Tensor) -> Tensor:
        return head(backbone(x))

    def hook(index: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if n_batches is None or index < n_batches:
            return fgsm(model_fn, loss_fn, x, y, eps), y
        return x, y

    batches = loader
    if adversarial_only and n_batches is not None:
        batches = itertools.islice(loader, n_batches)
    loss = train_epoch(
        backbone, head, batches, kind, optimizer, device, grad_clip=grad_clip, batch_hook=hook
    )
    if weight_clip is not None:
        clip_weights((backbone, head), weight_clip)
    return loss
