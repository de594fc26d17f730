"""Untargeted label flipping of an attacker's training targets (data-stage attack)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from colnet_mpi.tasks import BatchHook

__all__ = ["FLIP_KINDS", "flip_labels", "label_flip_hook"]

#: Task kinds that :func:`flip_labels` supports; ``landmarks`` (regression) has no labels to flip.
FLIP_KINDS: tuple[str, ...] = ("single_label", "multi_label")


def _draw_uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    """Uniform [0, 1) draws on the generator's device (CPU without a generator)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float64)


def flip_labels(
    y: Tensor,
    kind: str,
    num_classes: int,
    p: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Return ``(y_flipped, flipped_mask)``: each label (bit) flipped with probability ``p``.

    ``single_label`` (``y`` of shape ``[n]``, class indices): each selected label is replaced by a
    class drawn uniformly from the ``num_classes - 1`` *other* classes (needs ``num_classes >= 2``);
    the mask has shape ``[n]``. ``multi_label`` (``y`` of 0/1 values, shape ``[n, L]`` with
    ``L = num_classes``): each bit is inverted independently; ``p = 1`` is the bitwise inversion and
    the mask has the shape of ``y``. ``landmarks`` is regression with no classes: a
    ``ValueError`` names the supported kinds (:data:`FLIP_KINDS`) rather than inventing a flip.

    Draws come from ``generator`` on its own device (CPU without one) and are moved to ``y``'s
    device, so the result depends only on the generator's state. ``y`` is not modified; the
    result keeps its dtype and device.
    """
    if kind not in FLIP_KINDS:
        raise ValueError(
            f"label flipping supports the task kinds {FLIP_KINDS}, got {kind!r} "
            "(landmarks are regression targets with no class to flip to)"
        )
    prob = float(p)
    if not math.isfinite(prob) or not 0.0 <= prob <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p!r}")
    least = 2 if kind == "single_label" else 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < least:
        raise ValueError(
            f"num_classes must be an integer >= {least} for {kind}, got {num_classes!r}"
        )
    if kind == "single_label":
        if y.dim() != 1:
            raise ValueError(f"single_label targets must have shape [n], got {tuple(y.shape)}")
        labels = y.long()
        if y.numel() and bool(((labels < 0) | (labels >= num_classes)).any()):
            raise ValueError(f"single_label targets must lie in [0, {num_classes})")
        mask = (_draw_uniform(tuple(y.shape), generator) < prob).to(y.device)
        device = generator.device if generator is not None else torch.device("cpu")
        offset = torch.randint(
            1, num_classes, tuple(y.shape), generator=generator, device=device
        ).to(y.device)
        other = (labels + offset) % num_classes
        return torch.where(mask, other, labels).to(y.dtype), mask
    if y.dim() != 2 or y.shape[1] != num_classes:
        raise ValueError(
            f"multi_label targets must have shape [n, {num_classes}], got {tuple(y.shape)}"
        )
    mask = (_draw_uniform(tuple(y.shape), generator) < prob).to(y.device)
    return torch.where(mask, 1 - y, y), mask


def label_flip_hook(
    kind: str, num_classes: int, p: float, generator: torch.Generator | None = None
) -> BatchHook:
    """A ``train_epoch`` batch hook that flips each batch's targets afresh with :func:`flip_labels`.

    Prefer flipping the attacker's training targets once (a fixed poisoned data set); this hook
    re-draws the flips at every step, which only differs from that when ``p < 1`` or for
    single-label targets (another wrong class each time).
    """

    def hook(index: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        del index
        return x, flip_labels(y, kind, num_classes, p, generator)[0]

    return hook
