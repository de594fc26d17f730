"""Tiny CIFAR-10 and CelebA trees fabricated in torchvision's on-disk layouts, for the tests."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from colnet_mpi.data.celeba import CELEBA_ATTRIBUTES, LANDMARK_COLUMNS
from colnet_mpi.data.cifar10 import CIFAR10_CLASSES

CIFAR_PER_CLASS = 20  # images per class in each fabricated batch file
CELEBA_CODES = {0: 40, 1: 8, 2: 12}  # images per official partition in the fabricated CelebA
#: (landmark point, colour channel) of the dots drawn: left eye red, right eye green, nose blue
DOTS = ((0, 0), (1, 1), (2, 2))


@dataclass
class CifarTree:
    """A fabricated CIFAR-10 tree: every image carries its id in its first two red pixels."""

    parent: Path
    classes: dict[int, int] = field(default_factory=dict)  # id -> official class
    train_ids: set[int] = field(default_factory=set)
    test_ids: set[int] = field(default_factory=set)
    raw: dict[int, np.ndarray] = field(default_factory=dict)  # id -> uint8 [3, 32, 32]

    @property
    def folder(self) -> Path:
        return self.parent / "cifar-10-batches-py"


def write_cifar(parent: Path, per_class: int = CIFAR_PER_CLASS) -> CifarTree:
    tree = CifarTree(parent)
    tree.folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    next_id = 0
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        labels = np.repeat(np.arange(10), per_class)
        rng.shuffle(labels)
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        ids = np.arange(next_id, next_id + len(labels))
        next_id += len(labels)
        data[:, 0], data[:, 1] = ids % 256, ids // 256
        for i, c in zip(ids, labels, strict=True):
            tree.classes[int(i)] = int(c)
            tree.raw[int(i)] = data[i - ids[0]].reshape(3, 32, 32)
        (tree.test_ids if name == "test_batch" else tree.train_ids).update(ids.tolist())
        entry = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": data}
        with open(tree.folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    with open(tree.folder / "batches.meta", "wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    return tree


def ids_of(split) -> set[int]:
    images = split.images
    return set((images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist())


@dataclass
class CelebATree:
    """A fabricated CelebA tree with its ground truth (by image name)."""

    parent: Path
    codes: dict[str, int] = field(default_factory=dict)
    attributes: dict[str, np.ndarray] = field(default_factory=dict)
    landmarks: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.parent / "celeba"


def write_celeba(parent: Path) -> CelebATree:
    """218x178 JPEGs, black with coloured 5x5 dots on the eyes and nose, and the three text files."""
    tree = CelebATree(parent)
    images = tree.folder / "img_align_celeba"
    images.mkdir(parents=True)
    rng = np.random.default_rng(2)
    codes = np.concatenate([np.full(n, c) for c, n in CELEBA_CODES.items()])
    rng.shuffle(codes)
    n = len(codes)
    names = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    attrs = rng.choice([-1, 1], size=(n, 40))
    low = np.array([60, 105, 100, 105, 84, 128, 66, 150, 100, 150])
    marks = low + rng.integers(0, 10, size=(n, 10))
    for name, code, a, m in zip(names, codes, attrs, marks, strict=True):
        tree.codes[name], tree.attributes[name], tree.landmarks[name] = int(code), a, m
        pixels = np.zeros((218, 178, 3), dtype=np.uint8)
        for point, channel in DOTS:
            x, y = m[2 * point], m[2 * point + 1]
            pixels[y - 2 : y + 3, x - 2 : x + 3, channel] = 255
        Image.fromarray(pixels).save(images / name, quality=100, subsampling=0)
    rows = "\n".join(
        f"{nm} " + " ".join(f"{v:2d}" for v in a) for nm, a in zip(names, attrs, strict=True)
    )
    (tree.folder / "list_attr_celeba.txt").write_text(
        f"{n}\n{' '.join(CELEBA_ATTRIBUTES)} \n{rows}\n"
    )
    rows = "\n".join(
        f"{nm} " + " ".join(f"{v:4d}" for v in m) for nm, m in zip(names, marks, strict=True)
    )
    (tree.folder / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\n{' '.join(LANDMARK_COLUMNS)}\n{rows}\n"
    )
    rows = "\n".join(f"{nm} {c}" for nm, c in zip(names, codes, strict=True))
    (tree.folder / "list_eval_partition.txt").write_text(rows + "\n")
    return tree
