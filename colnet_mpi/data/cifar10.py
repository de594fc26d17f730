"""CIFAR-10 from disk (torchvision's ``cifar-10-batches-py`` layout) in the paper's two label groups.

Group ``animals``: bird, cat, deer, dog, frog, horse (labels 0-5); group ``objects``: airplane,
automobile, ship, truck (labels 0-3). A node keeps only its own shard and its group's test images,
as uint8 in memory; images are converted, augmented (training view only) and normalised per item.
The batch files are Python pickles written by the dataset's authors; they are read from the local
data directory only, never from the network, and with an unpickler that can build nothing but
arrays, containers, numbers and text (a crafted file cannot run code).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .augment import CifarAugment, normalise_cifar
from .base import (
    DataSizes,
    LabelledDataset,
    NodeData,
    TaskSpec,
    check_node_position,
    check_seed,
    locate_dataset_folder,
)
from .partition import (
    STREAM_HOLDOUT,
    STREAM_POOL,
    STREAM_TRAIN_VAL,
    make_rng,
    shard,
    split_train_val,
    task_stream,
)

DATASET_NAME = "cifar10"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
EXPECTED_FILES: tuple[str, ...] = (*TRAIN_FILES, TEST_FILE, META_FILE)

#: The official class order of CIFAR-10 (the label ids stored in the batch files).
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

#: Classes of each task, in label order (label = position in the tuple).
TASK_CLASSES: dict[str, tuple[str, ...]] = {
    "animals": ("bird", "cat", "deer", "dog", "frog", "horse"),
    "objects": ("airplane", "automobile", "ship", "truck"),
}

CIFAR10_TASKS: dict[str, TaskSpec] = {
    name: TaskSpec(name=name, kind="single_label", num_outputs=len(classes), group=name)
    for name, classes in TASK_CLASSES.items()
}

#: Side of the (square) CIFAR-10 images.
CIFAR10_IMAGE_SIZE = 32
_PIXELS = 3 * CIFAR10_IMAGE_SIZE * CIFAR10_IMAGE_SIZE


def how_to_obtain(root: str) -> str:
    """The sentence that tells a user how to put CIFAR-10 under ``root``."""
    return (
        "To obtain it, run on a machine with internet access "
        f"python -c \"import torchvision; torchvision.datasets.CIFAR10('{root}', download=True)\" "
        f"(or unpack cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html) and "
        f"copy the folder {FOLDER}/ to {root}/ on this machine."
    )


def _layout(root: str) -> str:
    """The expected layout, for error messages."""
    return f"{root}/{FOLDER}/{{{', '.join(EXPECTED_FILES)}}}"


def find_folder(root: str | os.PathLike[str]) -> Path:
    """Return the ``cifar-10-batches-py`` folder for ``root`` (its parent or the folder itself).

    Raises FileNotFoundError naming the path, the expected files and how to obtain them if the
    root or the folder is missing, or if any of the expected files is missing.
    """
    base = Path(root).absolute()
    folder = locate_dataset_folder(
        base,
        FOLDER,
        EXPECTED_FILES,
        what="CIFAR-10",
        layout=_layout(str(base)),
        how=how_to_obtain(str(base)),
    )
    missing = [name for name in EXPECTED_FILES if not (folder / name).is_file()]
    if missing:
        parent = str(folder.parent)
        raise FileNotFoundError(
            f"CIFAR-10 in {str(folder)!r} is incomplete: missing {', '.join(missing)}; "
            f"expected {_layout(parent)}. {how_to_obtain(parent)}"
        )
    return folder


#: The only callables a CIFAR-10 batch file may name: rebuilding numpy arrays and Python 3's
#: encoding of bytes. Anything else (``os.system``, ``builtins.eval``, ...) is refused unrun.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds only containers, numbers, text, bytes and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve the allowed globals only; refuse every other one before it is imported."""
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: a CIFAR-10 batch holds only arrays, lists, "
                "numbers and text"
            )
        if module == "_codecs":
            import codecs

            return codecs.encode
        core = getattr(np, "_core", None) or np.core
        if module.endswith("multiarray"):
            return getattr(core.multiarray, name)
        if module.endswith("numeric"):
            return getattr(core.numeric, name)
        return getattr(np, name)


def _unpickle(path: Path) -> dict[Any, Any]:
    """Load one pickled dict of the dataset; a truncated, foreign or code-carrying file raises
    ValueError (only the objects a batch file holds can be built; see ``_BatchUnpickler``)."""
    try:
        with open(path, "rb") as fh:
            entry = _BatchUnpickler(fh, encoding="bytes").load()
    except Exception as err:  # a damaged pickle can raise almost anything
        raise ValueError(
            f"CIFAR-10 file {str(path)!r} could not be read ({type(err).__name__}: {err}); it is "
            f"probably truncated or not from the python version of CIFAR-10. "
            f"{how_to_obtain(str(path.parent.parent))}"
        ) from err
    if not isinstance(entry, dict):
        raise ValueError(
            f"CIFAR-10 file {str(path)!r} holds a {type(entry).__name__}, not a dict. "
            f"{how_to_obtain(str(path.parent.parent))}"
        )
    return entry


def _field(entry: dict[Any, Any], key: str) -> Any:
    """``entry[key]`` whether the pickle stored its keys as bytes or as str."""
    if key.encode() in entry:
        return entry[key.encode()]
    return entry.get(key)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file: images uint8 ``[n, 3, 32, 32]`` and labels int64 ``[n]`` (ids 0-9)."""
    entry = _unpickle(path)
    data, labels = _field(entry, "data"), _field(entry, "labels")
    problem = None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        problem = "its 'data' is not a 2-D uint8 array"
    elif data.shape[1] != _PIXELS:
        problem = f"its images have {data.shape[1]} values, not 3x32x32 = {_PIXELS}"
    elif labels is None or len(labels) != data.shape[0]:
        problem = f"it has {data.shape[0]} images but {0 if labels is None else len(labels)} labels"
    else:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
            problem = "its labels are not all in 0-9"
    if problem is not None:
        raise ValueError(
            f"CIFAR-10 file {str(path)!r} is not a valid batch: {problem}. "
            f"{how_to_obtain(str(path.parent.parent))}"
        )
    images = data.reshape(-1, 3, CIFAR10_IMAGE_SIZE, CIFAR10_IMAGE_SIZE)
    return images, labels


def check_meta(path: Path) -> None:
    """Check that ``batches.meta`` lists the ten classes in the official order."""
    names = _field(_unpickle(path), "label_names")
    decoded = None
    if isinstance(names, (list, tuple)):
        decoded = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    if decoded != CIFAR10_CLASSES:
        raise ValueError(
            f"CIFAR-10 file {str(path)!r} lists the classes {decoded!r}, expected "
            f"{CIFAR10_CLASSES!r}. {how_to_obtain(str(path.parent.parent))}"
        )


def _task_lookup(task: str) -> np.ndarray:
    """Map official class ids 0-9 to the task's labels (-1 for classes of the other group)."""
    lookup = np.full(len(CIFAR10_CLASSES), -1, dtype=np.int64)
    for label, name in enumerate(TASK_CLASSES[task]):
        lookup[CIFAR10_CLASSES.index(name)] = label
    return lookup


def _keep_task(path: Path, lookup: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images and task labels of ``path`` whose classes belong to the task, in file order."""
    images, ids = read_batch(path)
    labels = lookup[ids]
    keep = labels >= 0
    return images[keep], labels[keep]


class CifarImages(LabelledDataset):
    """uint8 CIFAR-10 images with their labels; items are normalised float ``[3, 32, 32]``.

    With ``augment=True`` every item is a fresh random augmentation (``CifarAugment``) before
    normalisation; the training view and the plain splits share the same uint8 storage.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, augment: bool = False):
        self.images = images
        self.labels = labels
        self.augment = CifarAugment() if augment else None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index].to(torch.float32) / 255.0
        if self.augment is not None:
            image = self.augment(image)
        return normalise_cifar(image), self.labels[index]

    def augmented(self) -> CifarImages:
        """The same images and labels, augmented per item (the training view)."""
        return CifarImages(self.images, self.labels, augment=True)


def build_cifar10_node_data(
    task: str, position: int, group_size: int, *, seed: int, sizes: DataSizes, root: str
) -> NodeData:
    """Build one node's CIFAR-10 shard for ``task`` plus its group's common test split.

    The group's pool (every official training image of its classes, in file order) is permuted
    with a generator seeded from ``(seed, task)``, identical on every node of the group, and
    split evenly (``shard``) over the ``group_size`` nodes; node ``position`` takes its
    slice, truncated to ``sizes.samples_per_node`` if that is > 0 and smaller, and splits it
    80/20 into train/val (seeded by seed, task and position). The test split is every image of
    the group's classes in ``test_batch`` (or a seeded subset of ``sizes.test_samples``).
    """
    check_seed(seed)
    check_node_position(position, group_size)
    if task not in TASK_CLASSES:
        raise ValueError(
            f"unknown task {task!r} for dataset {DATASET_NAME!r}; "
            f"allowed: {', '.join(TASK_CLASSES)}"
        )
    if sizes.image_size not in (0, CIFAR10_IMAGE_SIZE):
        raise ValueError(
            f"image_size={sizes.image_size} is not allowed for {DATASET_NAME!r}: its images are "
            f"{CIFAR10_IMAGE_SIZE}x{CIFAR10_IMAGE_SIZE}; use {CIFAR10_IMAGE_SIZE} or 0 (native)"
        )
    folder = find_folder(root)
    check_meta(folder / META_FILE)
    lookup = _task_lookup(task)
    stream = task_stream(DATASET_NAME, task)

    parts = [_keep_task(folder / name, lookup) for name in TRAIN_FILES]
    pool_images = np.concatenate([p[0] for p in parts])
    pool_labels = np.concatenate([p[1] for p in parts])
    del parts
    order = make_rng(seed, stream, STREAM_POOL).permutation(len(pool_labels))
    node_sel = shard(order, group_size, position)
    if sizes.samples_per_node > 0:
        node_sel = node_sel[: sizes.samples_per_node]
    train_sel, val_sel = split_train_val(
        node_sel, make_rng(seed, stream, STREAM_TRAIN_VAL, position)
    )

    test_images, test_labels = _keep_task(folder / TEST_FILE, lookup)
    if sizes.test_samples > 0:
        if sizes.test_samples > len(test_labels):
            raise ValueError(
                f"test_samples={sizes.test_samples} is more than the {len(test_labels)} test "
                f"images of task {task!r} in {str(folder / TEST_FILE)!r}"
            )
        pick = make_rng(seed, stream, STREAM_HOLDOUT).permutation(len(test_labels))
        test_sel = np.sort(pick[: sizes.test_samples])
        test_images, test_labels = test_images[test_sel], test_labels[test_sel]

    def split(images: np.ndarray, labels: np.ndarray) -> CifarImages:
        return CifarImages(
            torch.from_numpy(np.ascontiguousarray(images)),
            torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
        )

    train = split(pool_images[train_sel], pool_labels[train_sel])
    return NodeData(
        task=CIFAR10_TASKS[task],
        train=train,
        val=split(pool_images[val_sel], pool_labels[val_sel]),
        test=split(test_images, test_labels),
        channels=3,
        image_size=CIFAR10_IMAGE_SIZE,
        train_augmented=train.augmented(),
    )
