"""Embedded label-heterogeneity data: scikit-learn's bundled handwritten digits in class groups.

Group ``low_digits`` holds classes 0-5 (labels 0-5, like CIFAR-10's six animals) and group
``high_digits`` holds classes 6-9 (labels 0-3, like the four objects); ``digits_012``,
``digits_345`` and ``digits_6789`` split the classes into three groups. Images are the real 8x8
scans (values 0-16), normalised with fixed constants and upsampled bilinearly to ``image_size``.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .base import DataSizes, NodeData, TaskSpec, check_node_position, check_seed
from .partition import STREAM_HOLDOUT, STREAM_TRAIN_VAL, make_rng, partition_pool, split_train_val
from .partition import task_stream as _task_stream

DATASET_NAME = "digits"

#: Digit classes of each task, in label order (label = position in the tuple).
DIGIT_CLASSES: dict[str, tuple[int, ...]] = {
    "low_digits": (0, 1, 2, 3, 4, 5),
    "high_digits": (6, 7, 8, 9),
    # three label groups (configs/digits_three_groups.toml)
    "digits_012": (0, 1, 2),
    "digits_345": (3, 4, 5),
    "digits_6789": (6, 7, 8, 9),
}

#: Fixed normalisation constants in raw pixel units (0-16): mean and std over all 1,797 images.
DIGITS_MEAN = 4.884
DIGITS_STD = 6.017

DIGITS_TASKS: dict[str, TaskSpec] = {
    name: TaskSpec(name=name, kind="single_label", num_outputs=len(classes), group=name)
    for name, classes in DIGIT_CLASSES.items()
}


def _digits_file() -> Path | None:
    """scikit-learn's ``datasets/data/digits.csv.gz``, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")  # a top-level package: located, not executed
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


@lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    """Load (and cache) the bundled digits: images float32 [1797, 8, 8] and targets int64.

    Read straight from the CSV file scikit-learn ships (64 pixel values and the class per row,
    what ``sklearn.datasets.load_digits`` returns): importing scikit-learn would cost every rank
    about 50 MB and a second. Falls back to ``load_digits`` should the file move.
    """
    path = _digits_file()
    if path is not None:
        with gzip.open(path, "rt") as text:
            table = np.loadtxt(text, delimiter=",")
        images = table[:, :-1].reshape(-1, 8, 8).astype(np.float32)
        targets = table[:, -1].astype(np.int64)
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.asarray(bunch.images, dtype=np.float32)
        targets = np.asarray(bunch.target, dtype=np.int64)
    if images.shape != (1797, 8, 8) or targets.shape != (1797,):
        raise RuntimeError(
            f"the bundled digits have an unexpected shape {images.shape} / {targets.shape}; "
            "expected 1,797 8x8 images (scikit-learn's load_digits)"
        )
    images.setflags(write=False)
    targets.setflags(write=False)
    return images, targets


def group_pool(task: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(dataset_indices, labels)`` of the task group's pool, in dataset order.

    ``dataset_indices`` index into ``sklearn.datasets.load_digits()``; ``labels`` are the task's
    labels (position of the digit in ``DIGIT_CLASSES[task]``).
    """
    if task not in DIGIT_CLASSES:
        raise ValueError(
            f"unknown task {task!r} for dataset {DATASET_NAME!r}; "
            f"allowed: {', '.join(DIGIT_CLASSES)}"
        )
    _, targets = _load_raw()
    classes = np.asarray(DIGIT_CLASSES[task])
    idx = np.flatnonzero(np.isin(targets, classes))
    lookup = np.full(10, -1, dtype=np.int64)
    lookup[classes] = np.arange(len(classes))
    return idx, lookup[targets[idx]]


def _to_tensors(indices: np.ndarray, labels: np.ndarray, image_size: int) -> TensorDataset:
    """Normalise, upsample and wrap the given dataset indices as a ``TensorDataset``."""
    images, _ = _load_raw()
    x = torch.from_numpy((images[indices] - DIGITS_MEAN) / DIGITS_STD).unsqueeze(1)
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.to(torch.float32).contiguous()
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    return TensorDataset(x, y)


def build_digits_node_data(
    task: str, position: int, group_size: int, *, seed: int, sizes: DataSizes
) -> NodeData:
    """Build one node's digits shard for ``task`` plus its group's common test split.

    The group's pool (all images of its classes) is permuted with a generator seeded from
    ``(seed, task)``, identical on every node of the group. The first 20 % (or
    ``sizes.test_samples`` if > 0) form the common test split; the rest is split evenly over the
    nodes, this node's slice is truncated to ``sizes.samples_per_node`` if that is > 0 and
    smaller, and then shuffled (seeded by seed, task and position) and split 80/20 into train/val.
    """
    check_seed(seed)
    check_node_position(position, group_size)
    pool_idx, pool_labels = group_pool(task)
    stream = _task_stream(DATASET_NAME, task)
    test_sel, node_sel = partition_pool(
        len(pool_idx),
        group_size=group_size,
        position=position,
        rng=make_rng(seed, stream, STREAM_HOLDOUT),
        test_samples=sizes.test_samples,
        samples_per_node=sizes.samples_per_node,
    )
    train_sel, val_sel = split_train_val(
        node_sel, make_rng(seed, stream, STREAM_TRAIN_VAL, position)
    )
    test_sel = np.sort(test_sel)
    size = sizes.image_size
    return NodeData(
        task=DIGITS_TASKS[task],
        train=_to_tensors(pool_idx[train_sel], pool_labels[train_sel], size),
        val=_to_tensors(pool_idx[val_sel], pool_labels[val_sel], size),
        test=_to_tensors(pool_idx[test_sel], pool_labels[test_sel], size),
        channels=1,
        image_size=size,
    )
