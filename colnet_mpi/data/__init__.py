"""Datasets and partitioning: each node builds only its own shard and its group's test split.

Embedded datasets (no download): ``digits`` (scikit-learn's real handwritten digits, split into
the label groups ``low_digits`` 0-5 and ``high_digits`` 6-9) and ``synthetic_faces`` (procedural
faces with the tasks ``attributes`` and ``landmarks``). On-disk datasets (read from ``root``, never
downloaded): ``cifar10`` (label groups ``animals`` and ``objects``) and ``celeba`` (tasks
``attributes`` and ``landmarks``). Everything here is pure numpy/torch; no MPI.

Importing this package imports no torch: the names, task names, image-size rule and disk
layouts come from ``catalog``; the builders and their types are loaded on first use (so that
config validation and ``check-config`` stay fast).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .catalog import (
    EMBEDDED_DATASETS,
    ON_DISK_DATASETS,
    image_size_problem,
    known_datasets,
)

if TYPE_CHECKING:
    from .base import LANDMARK_NAMES, TASK_KINDS, DataSizes, NodeData, TaskSpec
    from .faces import FACE_ATTRIBUTES

# names re-exported from the torch-based submodules, imported when first asked for
_LAZY = {
    "LANDMARK_NAMES": "base",
    "TASK_KINDS": "base",
    "DataSizes": "base",
    "NodeData": "base",
    "TaskSpec": "base",
    "FACE_ATTRIBUTES": "faces",
}

__all__ = [
    "EMBEDDED_DATASETS",
    "FACE_ATTRIBUTES",
    "LANDMARK_NAMES",
    "ON_DISK_DATASETS",
    "TASK_KINDS",
    "DataSizes",
    "NodeData",
    "TaskSpec",
    "build_node_data",
    "dataset_tasks",
    "image_size_problem",
    "known_datasets",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _tables() -> dict[str, dict[str, TaskSpec]]:
    """The task specs of every dataset (imports the builders, hence torch)."""
    from .celeba import CELEBA_TASKS
    from .cifar10 import CIFAR10_TASKS
    from .digits import DIGITS_TASKS
    from .faces import FACES_TASKS

    return {
        "digits": DIGITS_TASKS,
        "synthetic_faces": FACES_TASKS,
        "cifar10": CIFAR10_TASKS,
        "celeba": CELEBA_TASKS,
    }


def _check_dataset(dataset: str) -> None:
    """Raise ValueError naming ``dataset`` and the allowed names if it is unknown."""
    if dataset not in known_datasets():
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(known_datasets())}")


def dataset_tasks(dataset: str) -> dict[str, TaskSpec]:
    """Return the tasks of ``dataset`` as a fresh ``{task name: TaskSpec}`` dict."""
    _check_dataset(dataset)
    return dict(_tables()[dataset])


def build_node_data(
    dataset: str,
    task: str,
    position: int,
    group_size: int,
    *,
    seed: int,
    sizes: DataSizes,
    root: str | None = None,
) -> NodeData:
    """Build one node's train/val shard and its task group's common test split.

    ``position`` is this node's 0-based index among the ``group_size`` nodes that have ``task``.
    The result depends only on the arguments: nodes of one group get disjoint train/val samples
    and identical test splits, and no other node's data is generated. ``root`` is the data
    directory of on-disk datasets (the parent of the dataset's folder, as torchvision's
    ``root``, or that folder itself); the embedded datasets ignore it. Missing or incomplete
    files raise FileNotFoundError or ValueError naming the path and the expected files.
    """
    from .base import DataSizes, check_task_spec_labels, split_labels
    from .celeba import build_celeba_node_data
    from .cifar10 import build_cifar10_node_data
    from .digits import build_digits_node_data
    from .faces import build_faces_node_data

    _check_dataset(dataset)
    tasks = _tables()[dataset]
    if task not in tasks:
        raise ValueError(
            f"unknown task {task!r} for dataset {dataset!r}; allowed: {', '.join(tasks)}"
        )
    if not isinstance(sizes, DataSizes):
        raise ValueError(f"sizes={sizes!r} must be a DataSizes instance")
    problem = image_size_problem(dataset, sizes.image_size)
    if problem is not None:
        raise ValueError(f"image_size={sizes.image_size} is not allowed for {dataset!r}: {problem}")
    if dataset in ON_DISK_DATASETS:
        if not root:
            raise ValueError(
                f"dataset {dataset!r} is read from disk: set data.root to its directory"
            )
        disk = {"cifar10": build_cifar10_node_data, "celeba": build_celeba_node_data}[dataset]
        node = disk(task, position, group_size, seed=seed, sizes=sizes, root=root)
    else:
        embedded = {"digits": build_digits_node_data, "synthetic_faces": build_faces_node_data}
        node = embedded[dataset](task, position, group_size, seed=seed, sizes=sizes)
    for split in (node.train, node.val, node.test):
        check_task_spec_labels(node.task, split_labels(split))
    return node
