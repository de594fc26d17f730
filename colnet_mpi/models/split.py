"""Backbone/head builders and the BL-k split of ResNet-18 (k final stages move into the head)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn

from colnet_mpi.models.resnet import (
    STAGE_NAMES,
    _check_positive_int,
    _check_stem,
    init_weights,
    make_stage,
    make_stem,
    stage_channels,
)

__all__ = [
    "PRIVATIZATION_LEVELS",
    "STEM_NAMES",
    "backbone_out_channels",
    "backbone_stage_names",
    "build_backbone",
    "build_head",
    "head_stage_names",
    "split_resnet",
]

#: Privatization levels BL-k: k = number of final residual stages kept in the (private) head.
PRIVATIZATION_LEVELS: tuple[int, ...] = (0, 1, 2)

#: Names of the stem modules, in forward order.
STEM_NAMES: tuple[str, ...] = ("conv1", "bn1", "relu", "maxpool")


def _check_privatization(privatization: Any) -> int:
    """Return ``privatization`` if it is a valid BL level, else raise ValueError."""
    if isinstance(privatization, bool) or privatization not in PRIVATIZATION_LEVELS:
        raise ValueError(
            f"privatization must be one of {PRIVATIZATION_LEVELS}, got {privatization!r}"
        )
    return int(privatization)


def backbone_stage_names(privatization: int) -> tuple[str, ...]:
    """Return the residual stages in the backbone at BL-``privatization`` (e.g. layer1..layer3)."""
    k = _check_privatization(privatization)
    return STAGE_NAMES[: len(STAGE_NAMES) - k]


def head_stage_names(privatization: int) -> tuple[str, ...]:
    """Return the residual stages in the head at BL-``privatization`` (("layer4",) for BL-1)."""
    k = _check_privatization(privatization)
    return STAGE_NAMES[len(STAGE_NAMES) - k :]


def backbone_out_channels(width: int, privatization: int) -> int:
    """Return the channel count of the backbone's output feature map z (8w, 4w or 2w)."""
    channels = stage_channels(width)
    return channels[len(backbone_stage_names(privatization)) - 1]


def build_backbone(*, width: int, stem: str, in_channels: int, privatization: int) -> nn.Sequential:
    """Build a freshly initialised backbone: stem + the first ``4 - privatization`` stages.

    The result is an ``nn.Sequential`` whose children carry torchvision's names (conv1, bn1, relu,
    maxpool, layer1, ...), so its state_dict keys equal the matching keys of :func:`resnet18`.
    Its output is the feature map z fed to the head. Draws from the global torch RNG.

    Raises:
        ValueError: on an invalid width, stem, in_channels or privatization.
    """
    _check_positive_int("width", width)
    _check_stem(stem)
    _check_positive_int("in_channels", in_channels)
    stages = backbone_stage_names(privatization)
    children: OrderedDict[str, nn.Module] = OrderedDict(make_stem(width, stem, in_channels))
    for name in stages:
        children[name] = make_stage(width, STAGE_NAMES.index(name) + 1)
    backbone = nn.Sequential(children)
    init_weights(backbone)
    return backbone


def build_head(*, width: int, privatization: int, num_outputs: int) -> nn.Sequential:
    """Build a freshly initialised head: the private stages + avgpool + flatten + fc.

    BL-0: avgpool, flatten, fc; BL-1: layer4 first; BL-2: layer3 and layer4 first. ``fc`` is
    ``Linear(8 * width, num_outputs)``. Children use torchvision's names. Draws from the global
    torch RNG.

    Raises:
        ValueError: on an invalid width, privatization or num_outputs.
    """
    _check_positive_int("width", width)
    _check_positive_int("num_outputs", num_outputs)
    children: OrderedDict[str, nn.Module] = OrderedDict()
    for name in head_stage_names(privatization):
        children[name] = make_stage(width, STAGE_NAMES.index(name) + 1)
    children["avgpool"] = nn.AdaptiveAvgPool2d((1, 1))
    children["flatten"] = nn.Flatten(1)
    children["fc"] = nn.Linear(8 * width, num_outputs)
    head = nn.Sequential(children)
    init_weights(head)
    return head


def split_resnet(model: nn.Module, privatization: int) -> tuple[nn.Sequential, nn.Sequential]:
    """Split a ResNet-18 into ``(backbone, head)`` at BL-``privatization``.

    Works for :func:`resnet18` models and for torchvision's ``resnet18``. The two parts reuse the
    model's own submodules (no copies), so they share parameters and buffers with ``model`` and
    ``head(backbone(x))`` equals ``model(x)``.

    Raises:
        ValueError: on an invalid privatization level or a model lacking ResNet-18's children.
    """
    k = _check_privatization(privatization)
    required = (*STEM_NAMES, *STAGE_NAMES, "avgpool", "fc")
    missing = [name for name in required if not isinstance(getattr(model, name, None), nn.Module)]
    if missing:
        raise ValueError(
            f"model must be a ResNet-18 with children {required}; missing {missing} "
            f"in {type(model).__name__}"
        )
    back: OrderedDict[str, nn.Module] = OrderedDict(
        (name, model.get_submodule(name)) for name in (*STEM_NAMES, *backbone_stage_names(k))
    )
    front: OrderedDict[str, nn.Module] = OrderedDict(
        (name, model.get_submodule(name)) for name in (*head_stage_names(k), "avgpool")
    )
    front["flatten"] = nn.Flatten(1)
    front["fc"] = model.get_submodule("fc")
    return nn.Sequential(back), nn.Sequential(front)
