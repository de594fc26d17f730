"""Datasets and partitioning: each node builds only its own shard and its group's test split.

Embedded datasets (no download): ``digits`` (scikit-learn's real handwritten digits, split into
the label groups ``low_digits`` 0-5 and ``high_digits`` 6-9) and ``synthetic_faces`` (procedural
faces with the tasks ``attributes`` and ``landmarks``). On-disk datasets (read from ``root``, never
downloaded): ``cifar10`` (label groups ``animals`` and ``objects``) and ``celeba`` (tasks
``attributes`` and ``landmarks``). Everything here is pure numpy/torch; no MPI.
"""

from __future__ import annotations

from .base import (
    LANDMARK_NAMES,
    TASK_KINDS,
    DataSizes,
    NodeData,
    TaskSpec,
    check_task_spec_labels,
    split_labels,
)
from .celeba import CELEBA_TASKS, build_celeba_node_data
from .cifar10 import CIFAR10_IMAGE_SIZE, CIFAR10_TASKS, build_cifar10_node_data
from .digits import DIGITS_TASKS, build_digits_node_data
from .faces import FACE_ATTRIBUTES, FACES_TASKS, build_faces_node_data

EMBEDDED_DATASETS: tuple[str, ...] = ("digits", "synthetic_faces")
#: Datasets read from ``data.root`` (never downloaded); they need a root.
ON_DISK_DATASETS: tuple[str, ...] = ("cifar10", "celeba")

_TASKS = {
    "digits": DIGITS_TASKS,
    "synthetic_faces": FACES_TASKS,
    "cifar10": CIFAR10_TASKS,
    "celeba": CELEBA_TASKS,
}
_BUILDERS = {"digits": build_digits_node_data, "synthetic_faces": build_faces_node_data}
_DISK_BUILDERS = {"cifar10": build_cifar10_node_data, "celeba": build_celeba_node_data}

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


def known_datasets() -> tuple[str, ...]:
    """Return the names of all datasets ``build_node_data`` can build."""
    return EMBEDDED_DATASETS + ON_DISK_DATASETS


def image_size_problem(dataset: str, image_size: int) -> str | None:
    """Say why ``image_size`` does not suit ``dataset`` (None if it does); the one place of the rule.

    Embedded datasets: a square side >= 8. ``cifar10``: 32 or 0 (native 32x32, never resized).
    ``celeba``: 0 = native 218x178 (height x width), or a square side >= 8 that every image is
    resized to, its landmarks scaled with it.
    """
    if dataset == "cifar10":
        if image_size in (0, CIFAR10_IMAGE_SIZE):
            return None
        return f"CIFAR-10 images are 32x32; use {CIFAR10_IMAGE_SIZE} or 0 (native)"
    if dataset == "celeba":
        if image_size == 0 or image_size >= 8:
            return None
        return "use 0 (native 218x178) or a square side >= 8 to resize CelebA to"
    if image_size < 8:
        return (
            "it must be >= 8 (0, the native size, is only for the on-disk datasets "
            f"{', '.join(ON_DISK_DATASETS)})"
        )
    return None


def _check_dataset(dataset: str) -> None:
    """Raise ValueError naming ``dataset`` and the allowed names if it is unknown."""
    if dataset not in _TASKS:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(known_datasets())}")


def dataset_tasks(dataset: str) -> dict[str, TaskSpec]:
    """Return the tasks of ``dataset`` as a fresh ``{task name: TaskSpec}`` dict."""
    _check_dataset(dataset)
    return dict(_TASKS[dataset])


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
    _check_dataset(dataset)
    tasks = _TASKS[dataset]
    if task not in tasks:
        raise ValueError(
            f"unknown task {task!r} for dataset {dataset!r}; allowed: {', '.join(tasks)}"
        )
    if not isinstance(sizes, DataSizes):
        raise ValueError(f"sizes={sizes!r} must be a DataSizes instance")
    problem = image_size_problem(dataset, sizes.image_size)
    if problem is not None:
        raise ValueError(f"image_size={sizes.image_size} is not allowed for {dataset!r}: {problem}")
    if dataset in _DISK_BUILDERS:
        if not root:
            raise ValueError(
                f"dataset {dataset!r} is read from disk: set data.root to its directory"
            )
        builder = _DISK_BUILDERS[dataset]
        node = builder(task, position, group_size, seed=seed, sizes=sizes, root=root)
    else:
        node = _BUILDERS[dataset](task, position, group_size, seed=seed, sizes=sizes)
    for split in (node.train, node.val, node.test):
        check_task_spec_labels(node.task, split_labels(split))
    return node
