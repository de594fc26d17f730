"""Model room: ResNet-18 at any width and its BL-k split into shared backbone and private head."""

from colnet_mpi.models.resnet import (
    STAGE_NAMES,
    STEMS,
    BasicBlock,
    ResNet,
    resnet18,
    stage_channels,
)
from colnet_mpi.models.split import (
    PRIVATIZATION_LEVELS,
    backbone_out_channels,
    backbone_stage_names,
    build_backbone,
    build_head,
    head_stage_names,
    split_resnet,
)

__all__ = [
    "PRIVATIZATION_LEVELS",
    "STAGE_NAMES",
    "STEMS",
    "BasicBlock",
    "ResNet",
    "backbone_out_channels",
    "backbone_stage_names",
    "build_backbone",
    "build_head",
    "head_stage_names",
    "resnet18",
    "split_resnet",
    "stage_channels",
]
