"""Shared data types (task specs, size settings, per-node data) and argument checks for datasets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

TASK_KINDS: tuple[str, ...] = ("single_label", "multi_label", "landmarks")

#: Number of outputs of a landmark task: 5 points, each as (x, y).
NUM_LANDMARK_OUTPUTS = 10

#: Order of the 10 landmark outputs (CelebA's aligned-landmark column order). Which eye or mouth
#: corner is called "left" is each dataset's own convention, documented with it: synthetic_faces
#: uses the subject's left (shown on the image's right, larger x); CelebA's files, kept as they
#: are, call the image-left point (smaller x) "left" (see ``celeba.py``).
LANDMARK_NAMES: tuple[str, ...] = (
    "left_eye_x",
    "left_eye_y",
    "right_eye_x",
    "right_eye_y",
    "nose_x",
    "nose_y",
    "left_mouth_x",
    "left_mouth_y",
    "right_mouth_x",
    "right_mouth_y",
)

#: Smallest and largest square image side that the embedded datasets produce.
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 512


@dataclass(frozen=True)
class TaskSpec:
    """What one task asks of a node: its name, kind, output count and true task group."""

    name: str
    kind: str
    num_outputs: int
    group: str

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(
                f"task kind {self.kind!r} of task {self.name!r} is unknown; "
                f"allowed: {', '.join(TASK_KINDS)}"
            )
        if self.num_outputs < 1:
            raise ValueError(f"num_outputs={self.num_outputs} of task {self.name!r} must be >= 1")


@dataclass(frozen=True)
class DataSizes:
    """How much data a node builds and how large its images are.

    ``samples_per_node``: train+val samples per node before the 80/20 split; 0 means the dataset's
    default (digits: the node's even share of its group's pool; synthetic_faces: 200).
    ``test_samples``: size of the group's common test split; 0 means the dataset's default
    (digits: 20 % of the group's pool; synthetic_faces: 200).
    On-disk datasets: ``samples_per_node`` 0 = the node's even share of its group's pool, and
    ``test_samples`` 0 = the whole official test split of the group (a seeded subset if > 0).
    ``image_size``: side length in pixels of the square images produced; 0 = the dataset's
    native size, only for the on-disk datasets (see ``image_size_problem`` in ``data``).
    """

    samples_per_node: int = 0
    test_samples: int = 0
    image_size: int = 32

    def __post_init__(self) -> None:
        for name in ("samples_per_node", "test_samples", "image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"DataSizes.{name}={value!r} must be an integer")
        if self.samples_per_node < 0:
            raise ValueError(
                f"DataSizes.samples_per_node={self.samples_per_node} must be >= 0 "
                "(0 = dataset default)"
            )
        if self.test_samples < 0:
            raise ValueError(
                f"DataSizes.test_samples={self.test_samples} must be >= 0 (0 = dataset default)"
            )
        if self.image_size != 0 and not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(
                f"DataSizes.image_size={self.image_size} must be between "
                f"{MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE}, or 0 for an on-disk dataset's native size"
            )


class LabelledDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A map-style dataset of ``(x, y)`` items whose labels are all held in ``labels``.

    Used by the on-disk datasets, whose images are decoded (and augmented) per item.
    """

    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


#: A split of a node's data: the embedded datasets use TensorDatasets, the on-disk ones not.
Split = TensorDataset | LabelledDataset


def split_labels(split: Split) -> torch.Tensor:
    """Return the label tensor ``y`` of a whole split without touching its images."""
    if isinstance(split, TensorDataset):
        return split.tensors[1]
    return split.labels


@dataclass
class NodeData:
    """One node's data: its task, its own train/val shard and its group's common test split.

    Every split is a dataset of ``(x, y)`` items: x float32 ``[channels, H, W]``; y int64 scalar
    (single_label), float32 ``[A]`` of 0/1 (multi_label) or float32 ``[10]`` pixel coordinates in
    ``LANDMARK_NAMES`` order (landmarks). The embedded datasets hold ``TensorDataset``s of square
    images (H = W = ``image_size``). ``image_size`` is the longer image side, which is what picks
    the model's stem. ``train_augmented``, if set, is the training split with random augmentation,
    the view that local training iterates; ``train`` itself is never augmented.
    """

    task: TaskSpec
    train: Split
    val: Split
    test: Split
    channels: int
    image_size: int
    train_augmented: Split | None = None

    def training_view(self) -> Split:
        """The split that local training iterates: the augmented view if there is one."""
        return self.train if self.train_augmented is None else self.train_augmented


def check_node_position(position: int, group_size: int) -> None:
    """Raise ValueError unless ``0 <= position < group_size`` with both plain integers."""
    for name, value in (("position", position), ("group_size", group_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}={value!r} must be an integer")
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    if not 0 <= position < group_size:
        raise ValueError(f"position={position} must be between 0 and group_size-1={group_size - 1}")


def check_seed(seed: int) -> None:
    """Raise ValueError unless ``seed`` is a non-negative integer (numpy seeding needs that)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")


def check_task_spec_labels(task: TaskSpec, y: torch.Tensor) -> None:
    """Raise ValueError if the label tensor ``y`` does not fit ``task`` (dtype, shape, range)."""
    if task.kind == "single_label":
        ok = y.dtype == torch.int64 and y.dim() == 1
        if ok and y.numel() > 0:
            ok = int(y.min()) >= 0 and int(y.max()) < task.num_outputs
    else:
        ok = y.dtype == torch.float32 and y.dim() == 2 and y.shape[1] == task.num_outputs
    if not ok:
        raise ValueError(
            f"labels of dtype {y.dtype} and shape {tuple(y.shape)} do not fit task {task.name!r} "
            f"({task.kind}, {task.num_outputs} outputs)"
        )


def locate_dataset_folder(
    root: str | Path, folder: str, names: Sequence[str], *, what: str, layout: str, how: str
) -> Path:
    """Return ``<root>/<folder>`` or ``root`` itself when it already is that folder.

    ``root`` is the folder itself when it has that name or holds one of ``names``. Raises
    FileNotFoundError naming the path, the expected ``layout`` and ``how`` to obtain the data
    when the root or the folder is missing. ``what`` names the dataset in messages.
    """
    base = Path(root).absolute()
    if not base.is_dir():
        raise FileNotFoundError(
            f"{what} data root {str(base)!r} (data.root) does not exist or is not a directory; "
            f"expected {layout}. {how}"
        )
    if (base / folder).is_dir():
        return base / folder
    if base.name == folder or any((base / name).exists() for name in names):
        return base
    raise FileNotFoundError(
        f"{what} folder {str(base / folder)!r} not found (data.root = {str(base)!r}); "
        f"expected {layout}. {how}"
    )
