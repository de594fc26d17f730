"""ResNet-18 built from scratch with torchvision-compatible parameter names, at any width."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "STEMS",
    "STAGE_NAMES",
    "BasicBlock",
    "ResNet",
    "resnet18",
    "stage_channels",
]

#: Input stems: ``"imagenet"`` (7x7 stride-2 conv + 3x3 max-pool) and ``"cifar"`` (3x3 stride-1
#: conv, no pooling, for 32x32 inputs).
STEMS: tuple[str, ...] = ("imagenet", "cifar")

#: Names of the four residual stages, in forward order (torchvision's names).
STAGE_NAMES: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")

# ResNet-18 uses two BasicBlocks in every stage; stages 2-4 halve the resolution.
_BLOCKS_PER_STAGE = (2, 2, 2, 2)
_STAGE_STRIDES = (1, 2, 2, 2)
_STAGE_MULTIPLIERS = (1, 2, 4, 8)


def _check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 1, else raise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_stem(stem: Any) -> str:
    """Return ``stem`` if it is one of :data:`STEMS`, else raise ValueError."""
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    return str(stem)


def stage_channels(width: int) -> tuple[int, int, int, int]:
    """Return the output channels of layer1..layer4 for base ``width`` (w, 2w, 4w, 8w)."""
    _check_positive_int("width", width)
    return (width, 2 * width, 4 * width, 8 * width)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        # Registration order fixes the state_dict order: conv1, bn1, relu, conv2, bn2, downsample.
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """Apply the residual block to a feature map ``x`` of shape [n, c, h, w]."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + shortcut
        return self.relu(out)


def make_stem(width: int, stem: str, in_channels: int) -> dict[str, nn.Module]:
    """Return the stem modules ``conv1, bn1, relu, maxpool`` (in that order) as a dict."""
    _check_positive_int("width", width)
    _check_stem(stem)
    _check_positive_int("in_channels", in_channels)
    if stem == "imagenet":
        conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        pool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    else:
        conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        pool = nn.Identity()
    return {
        "conv1": conv1,
        "bn1": nn.BatchNorm2d(width),
        "relu": nn.ReLU(inplace=True),
        "maxpool": pool,
    }


def make_stage(width: int, stage: int) -> nn.Sequential:
    """Return residual stage ``stage`` (1..4, i.e. ``layer<stage>``) for base ``width``.

    The stage's input has the channel count of the previous stage (``width`` for stage 1).
    """
    _check_positive_int("width", width)
    if stage not in (1, 2, 3, 4):
        raise ValueError(f"stage must be one of (1, 2, 3, 4), got {stage!r}")
    idx = stage - 1
    planes = width * _STAGE_MULTIPLIERS[idx]
    in_planes = width if idx == 0 else width * _STAGE_MULTIPLIERS[idx - 1]
    stride = _STAGE_STRIDES[idx]
    blocks: list[nn.Module] = []
    for b in range(_BLOCKS_PER_STAGE[idx]):
        block_in = in_planes if b == 0 else planes
        block_stride = stride if b == 0 else 1
        downsample = None
        if block_stride != 1 or block_in != planes:
            # Built before its block so default inits draw from the RNG in torchvision's order.
            downsample = nn.Sequential(
                nn.Conv2d(block_in, planes, 1, stride=block_stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        blocks.append(BasicBlock(block_in, planes, block_stride, downsample))
    return nn.Sequential(*blocks)


def init_weights(module: nn.Module) -> None:
    """Initialise in place: Kaiming-normal (fan_out, ReLU) convs, batch norms with weight 1, bias 0.

    Linear layers keep PyTorch's default initialisation (as torchvision does). Uses the global
    torch RNG; the caller seeds it.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1.0)
            nn.init.constant_(m.bias, 0.0)


class ResNet(nn.Module):
    """ResNet-18: stem, four stages of two BasicBlocks, global average pooling and a linear layer.

    Children are named like torchvision's ``resnet18`` (conv1, bn1, relu, maxpool, layer1..layer4,
    avgpool, fc), so at width 64 with the ImageNet stem the state_dicts are interchangeable.
    """

    def __init__(self, *, width: int, num_outputs: int, stem: str, in_channels: int) -> None:
        super().__init__()
        _check_positive_int("width", width)
        _check_positive_int("num_outputs", num_outputs)
        _check_stem(stem)
        _check_positive_int("in_channels", in_channels)
        self.width = width
        self.stem = stem
        self.in_channels = in_channels
        self.num_outputs = num_outputs
        for name, mod in make_stem(width, stem, in_channels).items():
            self.add_module(name, mod)
        self.layer1 = make_stage(width, 1)
        self.layer2 = make_stage(width, 2)
        self.layer3 = make_stage(width, 3)
        self.layer4 = make_stage(width, 4)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_outputs)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Map images [n, in_channels, h, w] to outputs [n, num_outputs]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # type: ignore[operator]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)

    def extra_repr(self) -> str:
        """Summarise the configuration in ``repr``."""
        return (
            f"width={self.width}, stem={self.stem!r}, in_channels={self.in_channels}, "
            f"num_outputs={self.num_outputs}"
        )


def resnet18(
    *, width: int = 64, num_outputs: int = 1000, stem: str = "imagenet", in_channels: int = 3
) -> ResNet:
    """Build a randomly initialised ResNet-18 (BasicBlock, [2, 2, 2, 2]).

    Stage channels are ``width, 2*width, 4*width, 8*width``. With the defaults the parameter and
    buffer names and shapes equal ``torchvision.models.resnet18()``. ``stem="cifar"`` replaces the
    first conv by a 3x3 stride-1 conv and drops the max-pool. Initialisation draws from the global
    torch RNG (seed it before calling).

    Raises:
        ValueError: if width, num_outputs or in_channels is not an int >= 1, or stem not in STEMS.
    """
    return ResNet(width=width, num_outputs=num_outputs, stem=stem, in_channels=in_channels)
