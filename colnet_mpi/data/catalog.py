"""What the datasets are, without building any: names, task names, image sizes, disk layouts.

Config validation, ``check-config`` and ``sweep --check`` read only this module, so that they never
import torch (the builders next to it do). The builders keep their own copies of these facts next
to their data; ``tests/unit/test_config.py`` checks that both agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EMBEDDED_DATASETS: tuple[str, ...] = ("digits", "synthetic_faces")
#: Datasets read from ``data.root`` (never downloaded); they need a root.
ON_DISK_DATASETS: tuple[str, ...] = ("cifar10", "celeba")
#: Datasets whose training view is randomly augmented (every pass sees other images).
AUGMENTED_DATASETS: tuple[str, ...] = ("cifar10", "celeba")

#: Task names of every dataset, in the builders' order (a task added to a builder goes here too).
TASK_NAMES: dict[str, tuple[str, ...]] = {
    "digits": ("low_digits", "high_digits", "digits_012", "digits_345", "digits_6789"),
    "synthetic_faces": ("attributes", "landmarks"),
    "cifar10": ("animals", "objects"),
    "celeba": ("attributes", "landmarks"),
}

#: Side of the (square) CIFAR-10 images.
CIFAR10_IMAGE_SIZE = 32
#: Smallest and largest square side any dataset produces (0 = native, on-disk only).
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 512
#: The procedural faces need room for their features.
MIN_FACE_IMAGE_SIZE = 16


def known_datasets() -> tuple[str, ...]:
    """Return the names of all datasets ``build_node_data`` can build."""
    return EMBEDDED_DATASETS + ON_DISK_DATASETS


def task_names(dataset: str) -> tuple[str, ...]:
    """The task names of ``dataset``; ValueError naming the allowed datasets if it is unknown."""
    if dataset not in TASK_NAMES:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(known_datasets())}")
    return TASK_NAMES[dataset]


def image_size_problem(dataset: str, image_size: int) -> str | None:
    """Say why ``image_size`` does not suit ``dataset`` (None if it does); the one place of the rule.

    Embedded datasets: a square side from 8 (``synthetic_faces``: 16) to 512. ``cifar10``: 32 or 0
    (native 32x32, never resized). ``celeba``: 0 = native 218x178 (height x width), or a square
    side from 8 to 512 that every image is resized to, its landmarks scaled with it.
    """
    if dataset == "cifar10":
        if image_size in (0, CIFAR10_IMAGE_SIZE):
            return None
        return f"CIFAR-10 images are 32x32; use {CIFAR10_IMAGE_SIZE} or 0 (native)"
    if image_size > MAX_IMAGE_SIZE:
        return f"it must be at most {MAX_IMAGE_SIZE} (the largest side the datasets produce)"
    if dataset == "celeba":
        if image_size == 0 or image_size >= MIN_IMAGE_SIZE:
            return None
        return f"use 0 (native 218x178) or a square side >= {MIN_IMAGE_SIZE} to resize CelebA to"
    if dataset == "synthetic_faces" and 0 < image_size < MIN_FACE_IMAGE_SIZE:
        return f"the synthetic faces need a side >= {MIN_FACE_IMAGE_SIZE}"
    if image_size < MIN_IMAGE_SIZE:
        return (
            f"it must be >= {MIN_IMAGE_SIZE} (0, the native size, is only for the on-disk "
            f"datasets {', '.join(ON_DISK_DATASETS)})"
        )
    return None


# ---------------------------------------------------------------------------------------------
# On-disk layouts: where a run looks for the files under data.root.


@dataclass(frozen=True)
class DiskLayout:
    """The folder an on-disk dataset lives in and what it must hold."""

    title: str  # for messages, e.g. "CIFAR-10"
    folder: str  # torchvision's folder name under its root
    files: tuple[str, ...]  # plain files the folder must hold
    dirs: tuple[str, ...] = ()  # sub-folders it must hold

    def expected(self, root: str) -> str:
        """The expected layout under ``root``, for messages."""
        names = [f"{d}/" for d in self.dirs] + list(self.files)
        return f"{root}/{self.folder}/{{{', '.join(names)}}}"


DISK_LAYOUTS: dict[str, DiskLayout] = {
    "cifar10": DiskLayout(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        files=(*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"),
    ),
    "celeba": DiskLayout(
        title="CelebA",
        folder="celeba",
        files=(
            "list_attr_celeba.txt",
            "list_landmarks_align_celeba.txt",
            "list_eval_partition.txt",
        ),
        dirs=("img_align_celeba",),
    ),
}


def data_root_problem(dataset: str, root: str) -> str | None:
    """Why ``data.root`` cannot serve ``dataset`` (None if it can, or needs no root).

    The same search as the builders': ``root`` holds the dataset's folder, or is that folder
    (by name, or because it holds one of the expected entries). Only names are looked at; the
    files' contents are checked when the data is built.
    """
    layout = DISK_LAYOUTS.get(dataset)
    if layout is None:
        return None
    base = Path(root).absolute()
    where = f"data.root = {root!r} (dataset {dataset!r})"
    if not base.is_dir():
        return (
            f"{where}: the {layout.title} data folder {str(base)!r} does not exist or is not a "
            f"directory; expected {layout.expected(str(base))}"
        )
    folder = base / layout.folder
    if not folder.is_dir():
        names = (*layout.dirs, *layout.files)
        if base.name == layout.folder or any((base / n).exists() for n in names):
            folder = base
        else:
            return (
                f"{where}: the {layout.title} folder {str(folder)!r} is missing; "
                f"expected {layout.expected(str(base))}"
            )
    missing = [f"{d}/" for d in layout.dirs if not (folder / d).is_dir()]
    missing += [f for f in layout.files if not (folder / f).is_file()]
    if missing:
        return (
            f"{where}: {layout.title} in {str(folder)!r} is incomplete: missing "
            f"{', '.join(missing)}; expected {layout.expected(str(folder.parent))}"
        )
    return None
