"""Datasets and partitioning: each node builds only its own shard and its group's test split.

Embedded datasets (no download): ``digits`` (scikit-learn's real handwritten digits, split into
the label groups ``low_digits`` 0-5 and ``high_digits`` 6-9) and ``synthetic_faces`` (procedural
faces with the tasks ``attributes`` and ``landmarks``). Everything here is pure numpy/torch; no MPI.
"""

from __future__ import annotations

from .base import (
    LANDMARK_NAMES,
    TASK_KINDS,
    DataSizes,
    NodeData,
    TaskSpec,
    check_task_spec_labels,
)
from .digits import DIGITS_TASKS, build_digits_node_data
from .faces import FACE_ATTRIBUTES, FACES_TASKS, build_faces_node_data

EMBEDDED_DATASETS: tuple[str, ...] = ("digits", "synthetic_faces")

_TASKS = {"digits": DIGITS_TASKS, "synthetic_faces": FACES_TASKS}
_BUILDERS = {"digits": build_digits_node_data, "synthetic_faces": build_faces_node_data}

__all__ = [
    "EMBEDDED_DATASETS",
    "FACE_ATTRIBUTES",
    "LANDMARK_NAMES",
    "TASK_KINDS",
    "DataSizes",
    "NodeData",
    "TaskSpec",
    "build_node_data",
    "dataset_tasks",
    "known_datasets",
]


def known_datasets() -> tuple[str, ...]:
    """Return the names of all datasets ``build_node_data`` can build."""
    return EMBEDDED_DATASETS


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
    directory of on-disk datasets; the embedded datasets ignore it.
    """
    _check_dataset(dataset)
    tasks = _TASKS[dataset]
    if task not in tasks:
        raise ValueError(
            f"unknown task {task!r} for dataset {dataset!r}; allowed: {', '.join(tasks)}"
        )
    if not isinstance(sizes, DataSizes):
        raise ValueError(f"sizes={sizes!r} must be a DataSizes instance")
    del root  # embedded datasets need no files
    node = _BUILDERS[dataset](task, position, group_size, seed=seed, sizes=sizes)
    for split in (node.train, node.val, node.test):
        check_task_spec_labels(node.task, split.tensors[1])
    return node
