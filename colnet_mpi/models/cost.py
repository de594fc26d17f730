"""What a training step costs, counted in multiply-adds of the convolutions and linear layers.

Used to pace a node that trains its private head only (``federation.catch_up_train = "head"``)
when ``training.epoch_seconds`` emulates one device per node: such a step runs the backbone
forward without gradients and the head forward and backward, so it costs a known fraction of a
full step. Counting is by forward hooks on one batch (no compiler, no profiler), and the
backward pass of a layer is taken as twice its forward (the gradients of its input and of its
weights), the usual estimate.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["forward_macs", "head_only_cost"]


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


def head_only_cost(backbone: nn.Module, head: nn.Module, x: torch.Tensor) -> float:
    """The cost of a training step of the head alone (backbone forward without gradients, head
    forward and backward) as a fraction of a full step (both forward and backward), for the
    batch ``x``: ``(B + 3 H) / (3 (B + H))`` with B and H the forward multiply-adds of backbone
    and head. BL-1 ResNet-18: about 0.48, at any width."""
    b, z = forward_macs(backbone, x)
    h, _ = forward_macs(head, z)
    if b + h == 0:
        return 1.0
    return (b + 3 * h) / (3 * (b + h))
