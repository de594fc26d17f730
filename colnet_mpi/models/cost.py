"""What a training step costs, counted in multiply-adds of the convolutions and linear layers.

Used to pace a node that trains its private head only (``federation.catch_up_train = "head"``
or ``"features"``) when ``training.epoch_seconds`` emulates one device per node: such a step
runs the backbone forward without gradients and the head forward and backward (on stored
features, ``"features"``: the head alone), so it costs a known fraction of a full step.
Counting is by forward hooks on one batch (no compiler, no profiler), and the backward pass of
a layer is taken as twice its forward (the gradients of its input and of its weights), the
usual estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CatchUpCosts", "catch_up_costs", "forward_macs", "head_only_cost"]


def _layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-adds of one forward call of a convolution or linear layer."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        per_output = (module.in_channels // module.groups) * kh * kw
        return int(output.numel()) * per_output
    if isinstance(module, nn.Linear):
        return int(output.numel()) * module.in_features
    return 0


def forward_macs(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Multiply-adds of ``module(x)`` (convolutions and linear layers; the rest is small next to
    them) and its output. Runs without gradients and leaves the module's mode and BatchNorm
    statistics as they were."""
    total = 0

    def hook(mod: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        total += _layer_macs(mod, out)

    handles = [
        m.register_forward_hook(hook)
        for m in module.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    training = module.training
    module.eval()  # no BatchNorm statistics move
    try:
        with torch.no_grad():
            out = module(x)
    finally:
        module.train(training)
        for h in handles:
            h.remove()
    return total, out


@dataclass(frozen=True)
class CatchUpCosts:
    """What the parts of a catch-up epoch cost, each as a fraction of a full training epoch
    (backbone and head, forward and backward) over the same samples."""

    head: float  # a step of the head alone: backbone forward without gradients, head both ways
    head_on_features: float  # the same step on features already computed: the head both ways
    features: float  # the backbone's forward pass alone (computing the features once)


def catch_up_costs(backbone: nn.Module, head: nn.Module, x: torch.Tensor) -> CatchUpCosts:
    """The :class:`CatchUpCosts` of the batch ``x``, from B and H, the forward multiply-adds of
    backbone and head: a full step costs ``3 (B + H)``, a head-alone step ``B + 3 H``, a step on
    stored features ``3 H`` and a feature pass ``B``. BL-1 ResNet-18, at any width: about 0.48,
    0.22 and 0.26."""
    b, z = forward_macs(backbone, x)
    h, _ = forward_macs(head, z)
    full = 3 * (b + h)
    if full == 0:
        return CatchUpCosts(1.0, 1.0, 0.0)
    return CatchUpCosts((b + 3 * h) / full, 3 * h / full, b / full)


def head_only_cost(backbone: nn.Module, head: nn.Module, x: torch.Tensor) -> float:
    """The cost of a training step of the head alone (backbone forward without gradients, head
    forward and backward) as a fraction of a full step, for the batch ``x``: ``(B + 3 H) /
    (3 (B + H))`` (:func:`catch_up_costs`). BL-1 ResNet-18: about 0.48, at any width."""
    return catch_up_costs(backbone, head, x).head
