"""Unit tests of the on-disk datasets (cifar10, celeba) on tiny trees fabricated in torchvision's layouts."""

from __future__ import annotations

import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from colnet_mpi.config import ConfigError, DataConfig
from colnet_mpi.data import (
    ON_DISK_DATASETS,
    DataSizes,
    NodeData,
    build_node_data,
    dataset_tasks,
    known_datasets,
)
from colnet_mpi.data.augment import CIFAR_MEAN, CIFAR_STD
from colnet_mpi.data.catalog import AUGMENTED_DATASETS
from colnet_mpi.data.celeba import CELEBA_ATTRIBUTES
from colnet_mpi.data.cifar10 import CIFAR10_CLASSES, TASK_CLASSES
from colnet_mpi.data.partition import train_val_sizes
from tests.fabricate import (
    CELEBA_CODES,
    CIFAR_PER_CLASS,
    DOTS,
    CelebATree,
    CifarTree,
    ids_of,
    write_celeba,
    write_cifar,
)


def cifar(tree: CifarTree, task: str, position: int, group_size: int, seed: int = 0, **sizes):
    return build_node_data(
        "cifar10",
        task,
        position,
        group_size,
        seed=seed,
        sizes=DataSizes(**sizes),
        root=str(tree.parent),
    )


@pytest.fixture(scope="module")
def cifar_tree(tmp_path_factory: pytest.TempPathFactory) -> CifarTree:
    return write_cifar(tmp_path_factory.mktemp("cifar"))


# ------------------------------------------------------------------------------ fabricated CelebA


def celeba(root: Path | str, task: str, position: int, group_size: int, seed: int = 0, **sizes):
    sizes.setdefault("image_size", 0)  # native 218x178 unless a test asks for a resize
    return build_node_data(
        "celeba", task, position, group_size, seed=seed, sizes=DataSizes(**sizes), root=str(root)
    )


@pytest.fixture(scope="module")
def celeba_tree(tmp_path_factory: pytest.TempPathFactory) -> CelebATree:
    return write_celeba(tmp_path_factory.mktemp("celeba"))


def copy_tree(src: Path, tmp_path: Path) -> Path:
    """A private copy of a fabricated tree (for tests that damage it); returns the new parent."""
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def names_of(node: NodeData, split: str) -> list[str]:
    return list(getattr(node, split).names)


# ------------------------------------------------------------------------------ registry and config


def test_registry_lists_the_on_disk_datasets() -> None:
    assert ON_DISK_DATASETS == ("cifar10", "celeba")
    assert set(ON_DISK_DATASETS) <= set(known_datasets())
    c = dataset_tasks("cifar10")
    assert (c["animals"].kind, c["animals"].num_outputs, c["animals"].group) == (
        "single_label",
        6,
        "animals",
    )
    assert (c["objects"].kind, c["objects"].num_outputs, c["objects"].group) == (
        "single_label",
        4,
        "objects",
    )
    f = dataset_tasks("celeba")
    assert (f["attributes"].kind, f["attributes"].num_outputs) == ("multi_label", 40)
    assert (f["landmarks"].kind, f["landmarks"].num_outputs, f["landmarks"].group) == (
        "landmarks",
        10,
        "landmarks",
    )
    assert len(CELEBA_ATTRIBUTES) == len(set(CELEBA_ATTRIBUTES)) == 40


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"dataset": "cifar10"}, ["data.root", "cifar-10-batches-py"]),
        ({"dataset": "celeba", "root": "  "}, ["data.root", "celeba/"]),
        ({"dataset": "cifar10", "root": "d", "image_size": 64}, ["data.image_size", "32"]),
        ({"dataset": "celeba", "root": "d", "image_size": 4}, ["data.image_size", "218x178"]),
        ({"dataset": "digits", "image_size": 0}, ["data.image_size", "on-disk"]),
        ({"workers": -1}, ["data.workers"]),
    ],
)
def test_config_rules_for_disk_data(kwargs: dict, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        DataConfig(**kwargs)
    for needle in needles:
        assert needle in str(err.value)


def test_config_accepts_the_documented_values() -> None:
    assert DataConfig(dataset="celeba", root="d", image_size=0).image_size == 0
    assert DataConfig(dataset="celeba", root="d", image_size=64).image_size == 64
    assert DataConfig(dataset="cifar10", root="d", image_size=0, workers=2).workers == 2
    assert DataConfig().workers == 0


# ------------------------------------------------------------------------------ CIFAR-10


def test_cifar_class_mapping_and_common_test_split(cifar_tree: CifarTree) -> None:
    for task, names in TASK_CLASSES.items():
        official = [CIFAR10_CLASSES.index(n) for n in names]
        nodes = [cifar(cifar_tree, task, p, 2) for p in range(2)]
        expected_test = {i for i in cifar_tree.test_ids if cifar_tree.classes[i] in official}
        for node in nodes:
            assert node.channels == 3 and node.image_size == 32
            assert ids_of(node.test) == expected_test  # all the group's test images, shared
            for split in (node.train, node.val, node.test):
                for img, label in zip(split.images, split.labels, strict=True):
                    i = int(img[0, 0, 0]) + 256 * int(img[0, 0, 1])
                    assert official[int(label)] == cifar_tree.classes[i]
        assert torch.equal(nodes[0].test.images, nodes[1].test.images)
    assert sorted(TASK_CLASSES["animals"]) == sorted(
        ("bird", "cat", "deer", "dog", "frog", "horse")
    )
    assert TASK_CLASSES["objects"] == ("airplane", "automobile", "ship", "truck")


def test_cifar_nodes_are_disjoint_cover_the_pool_and_split_80_20(cifar_tree: CifarTree) -> None:
    task = "animals"
    official = {CIFAR10_CLASSES.index(n) for n in TASK_CLASSES[task]}
    pool = {i for i in cifar_tree.train_ids if cifar_tree.classes[i] in official}
    assert len(pool) == 6 * 5 * CIFAR_PER_CLASS
    nodes = [cifar(cifar_tree, task, p, 3) for p in range(3)]
    shards = []
    for node in nodes:
        train, val = ids_of(node.train), ids_of(node.val)
        assert not train & val
        assert (len(train), len(val)) == train_val_sizes(len(train) + len(val))
        assert len(train) + len(val) == len(pool) // 3
        shards.append(train | val)
    assert set().union(*shards) == pool
    assert sum(len(s) for s in shards) == len(pool)
    # each shard holds a mix of classes (the pool was shuffled before sharding)
    for node in nodes:
        assert len(set(node.train.labels.tolist())) == 6


def test_cifar_seeding_truncation_and_test_subset(cifar_tree: CifarTree) -> None:
    a = cifar(cifar_tree, "objects", 1, 2, seed=4, samples_per_node=30, test_samples=25)
    b = cifar(cifar_tree, "objects", 1, 2, seed=4, samples_per_node=30, test_samples=25)
    c = cifar(cifar_tree, "objects", 1, 2, seed=5, samples_per_node=30, test_samples=25)
    other = cifar(cifar_tree, "objects", 0, 2, seed=4, samples_per_node=30, test_samples=25)
    assert (len(a.train), len(a.val), len(a.test)) == (24, 6, 25)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).images, getattr(b, split).images)
        assert torch.equal(getattr(a, split).labels, getattr(b, split).labels)
    assert ids_of(a.train) != ids_of(c.train)
    assert ids_of(a.test) == ids_of(other.test)  # the subset is common to the group
    assert ids_of(a.test) != ids_of(c.test)
    assert not (ids_of(a.train) | ids_of(a.val)) & (ids_of(other.train) | ids_of(other.val))
    full = cifar(cifar_tree, "objects", 1, 2, seed=4)
    assert ids_of(a.train) | ids_of(a.val) <= ids_of(full.train) | ids_of(full.val)
    with pytest.raises(ValueError, match="test_samples=81"):
        cifar(cifar_tree, "objects", 0, 2, test_samples=81)


def test_cifar_normalises_every_split_and_augments_only_training(cifar_tree: CifarTree) -> None:
    node = cifar(cifar_tree, "animals", 0, 2, samples_per_node=40, test_samples=20)
    mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(3, 1, 1)
    for split in (node.train, node.val, node.test):
        for k in range(3):
            x, y = split[k]
            raw = split.images[k]
            i = int(raw[0, 0, 0]) + 256 * int(raw[0, 0, 1])
            expected = (torch.from_numpy(cifar_tree.raw[i]).float() / 255 - mean) / std
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32
            assert torch.allclose(x, expected, atol=1e-6)
            assert torch.equal(split[k][0], x)  # plain splits are deterministic
            assert y.dtype == torch.int64
    aug = node.train_augmented
    assert aug is not None and node.training_view() is aug
    assert "cifar10" in AUGMENTED_DATASETS  # the catalog knows it (config checks read it)
    assert torch.equal(aug.labels, node.train.labels)
    torch.manual_seed(0)
    changed = sum(not torch.equal(aug[k][0], node.train[k][0]) for k in range(8))
    assert changed == 8
    torch.manual_seed(0)
    first = aug[0][0]
    torch.manual_seed(0)
    assert torch.equal(first, aug[0][0])  # seeded by torch's generator
    assert not torch.equal(aug[0][0], aug[0][0])  # a fresh augmentation per access
    # the embedded datasets are not augmented: their training view is the training split
    digits = build_node_data("digits", "low_digits", 0, 2, seed=0, sizes=DataSizes())
    assert digits.train_augmented is None and digits.training_view() is digits.train


def test_cifar_root_may_be_the_folder_itself(cifar_tree: CifarTree) -> None:
    a = cifar(cifar_tree, "objects", 0, 2, samples_per_node=20)
    b = build_node_data(
        "cifar10",
        "objects",
        0,
        2,
        seed=0,
        sizes=DataSizes(samples_per_node=20),
        root=str(cifar_tree.folder),
    )
    assert torch.equal(a.train.images, b.train.images)


def _raises(exc: type[Exception], needles: list[str], fn, *args, **kwargs) -> str:
    with pytest.raises(exc) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"
    return message


CIFAR_HOWTO = "torchvision.datasets.CIFAR10("


def test_cifar_missing_root_and_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    _raises(
        FileNotFoundError,
        [
            str(missing),
            "cifar-10-batches-py",
            "data_batch_1",
            "test_batch",
            "batches.meta",
            CIFAR_HOWTO,
        ],
        cifar,
        CifarTree(missing),
        "animals",
        0,
        1,
    )
    _raises(
        FileNotFoundError,
        [str(tmp_path / "cifar-10-batches-py"), "not found", "data_batch_5", CIFAR_HOWTO],
        cifar,
        CifarTree(tmp_path),
        "animals",
        0,
        1,
    )


def test_cifar_incomplete_and_damaged_trees(cifar_tree: CifarTree, tmp_path: Path) -> None:
    tree = CifarTree(copy_tree(cifar_tree.parent, tmp_path))
    (tree.folder / "data_batch_3").unlink()
    msg = _raises(
        FileNotFoundError,
        [str(tree.folder), "incomplete", "missing data_batch_3", "test_batch", CIFAR_HOWTO],
        cifar,
        tree,
        "animals",
        0,
        1,
    )
    assert "data_batch_2," not in msg.split("missing")[1].split(";")[0]  # only the absent file
    shutil.copy(cifar_tree.folder / "data_batch_3", tree.folder / "data_batch_3")
    blob = (tree.folder / "data_batch_2").read_bytes()
    (tree.folder / "data_batch_2").write_bytes(blob[: len(blob) // 3])
    _raises(
        ValueError,
        [str(tree.folder / "data_batch_2"), "truncated", CIFAR_HOWTO],
        cifar,
        tree,
        "objects",
        0,
        1,
    )
    shutil.copy(cifar_tree.folder / "data_batch_2", tree.folder / "data_batch_2")
    with open(tree.folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((3, 100), dtype=np.uint8), b"labels": [0, 1, 2]}, fh)
    _raises(ValueError, [str(tree.folder / "test_batch"), "3x32x32"], cifar, tree, "objects", 0, 1)
    with open(tree.folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [b"cat", b"dog"]}, fh)
    _raises(
        ValueError, [str(tree.folder / "batches.meta"), "airplane"], cifar, tree, "objects", 0, 1
    )


class _Payload:
    """Unpickling this runs a shell command (what a crafted batch file can do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["batches.meta", "data_batch_1", "test_batch"])
def test_cifar_file_that_would_run_code_is_refused_unrun(
    cifar_tree: CifarTree, tmp_path: Path, name: str
) -> None:
    tree = CifarTree(copy_tree(cifar_tree.parent, tmp_path))
    marker = tmp_path / "pwned"
    with open(tree.folder / name, "wb") as fh:
        pickle.dump({b"label_names": _Payload(marker), b"data": _Payload(marker)}, fh, protocol=2)
    # the ordinary pickle module would run it (the test's own check that the payload is live)
    with open(tree.folder / name, "rb") as fh:
        pickle.load(fh, encoding="bytes")
    assert marker.exists()
    marker.unlink()
    _raises(ValueError, [str(tree.folder / name), "refused to load"], cifar, tree, "objects", 0, 1)
    assert not marker.exists(), "the crafted file ran code"


def test_cifar_batches_from_numpy_pickles_still_load(cifar_tree: CifarTree, tmp_path: Path) -> None:
    """The allowed globals cover arrays pickled by this numpy with every protocol."""
    from colnet_mpi.data.cifar10 import read_batch

    images, labels = read_batch(cifar_tree.folder / "data_batch_1")
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"again_{protocol}"
        with open(path, "wb") as fh:
            pickle.dump(
                {b"data": images.reshape(len(images), -1), b"labels": labels.tolist()},
                fh,
                protocol=protocol,
            )
        again, again_labels = read_batch(path)
        assert np.array_equal(again, images) and np.array_equal(again_labels, labels)


# ------------------------------------------------------------------------------ CelebA


def test_celeba_40_40_split_is_disjoint_and_from_the_train_partition(
    celeba_tree: CelebATree,
) -> None:
    groups = {}
    for task in ("attributes", "landmarks"):
        nodes = [celeba(celeba_tree.parent, task, p, 2) for p in range(2)]
        shards = []
        for node in nodes:
            train, val = names_of(node, "train"), names_of(node, "val")
            assert (len(train), len(val)) == train_val_sizes(len(train) + len(val))
            assert not set(train) & set(val)
            shards.append(set(train) | set(val))
        assert not shards[0] & shards[1]
        groups[task] = shards[0] | shards[1]
        # the group's 40 % of the official training partition, nothing else
        assert len(groups[task]) == int(0.4 * CELEBA_CODES[0])
        assert {celeba_tree.codes[n] for n in groups[task]} == {0}
        # test = the official test partition, identical on every node and in both groups
        expected_test = sorted(n for n, c in celeba_tree.codes.items() if c == 2)
        for node in nodes:
            assert names_of(node, "test") == expected_test
    assert not groups["attributes"] & groups["landmarks"]
    again = celeba(celeba_tree.parent, "landmarks", 1, 2)
    assert names_of(again, "train") == names_of(
        celeba(celeba_tree.parent, "landmarks", 1, 2), "train"
    )
    other_seed = celeba(celeba_tree.parent, "landmarks", 1, 2, seed=9)
    assert set(names_of(again, "train")) != set(names_of(other_seed, "train"))


def test_celeba_labels_images_and_test_subset(celeba_tree: CelebATree) -> None:
    att = celeba(celeba_tree.parent, "attributes", 0, 2, test_samples=5, samples_per_node=5)
    lmk = celeba(celeba_tree.parent, "landmarks", 1, 3, test_samples=5)
    assert (len(att.train), len(att.val), len(att.test)) == (4, 1, 5)
    assert names_of(att, "test") == names_of(lmk, "test")
    assert {celeba_tree.codes[n] for n in names_of(att, "test")} == {2}
    assert att.image_size == 218 and att.channels == 3
    for node, truth in ((att, celeba_tree.attributes), (lmk, celeba_tree.landmarks)):
        for split in (node.train, node.val, node.test):
            for name, label in zip(split.names, split.labels, strict=True):
                expected = (truth[name] == 1) if node is att else truth[name]
                assert torch.equal(label, torch.tensor(expected, dtype=torch.float32))
    x, y = lmk.test[0]
    assert x.shape == (3, 218, 178) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.9
    # the red dot sits on the (image-left) left eye of the file
    weight = (x[0] - torch.maximum(x[1], x[2])).clamp(min=0)
    cx, cy = _centroid(weight)
    assert math.hypot(cx - float(y[0]), cy - float(y[1])) < 1.0
    assert all(
        float(s.labels[:, 0].max()) < float(s.labels[:, 2].min()) for s in (lmk.train, lmk.test)
    )


def test_celeba_resize_scales_landmarks(celeba_tree: CelebATree) -> None:
    node = celeba(celeba_tree.parent, "landmarks", 0, 2, image_size=48)
    assert node.image_size == 48
    x, y = node.test[0]
    assert x.shape == (3, 48, 48)
    raw = celeba_tree.landmarks[node.test.names[0]].astype(np.float64)
    assert math.isclose(float(y[0]), (raw[0] + 0.5) * 48 / 178 - 0.5, rel_tol=1e-5)
    assert math.isclose(float(y[1]), (raw[1] + 0.5) * 48 / 218 - 0.5, rel_tol=1e-5)
    for point, channel in DOTS:
        others = [c for c in range(3) if c != channel]
        weight = (x[channel] - torch.maximum(x[others[0]], x[others[1]])).clamp(min=0)
        cx, cy = _centroid(weight)
        assert math.hypot(cx - float(y[2 * point]), cy - float(y[2 * point + 1])) < 1.0


def _centroid(weight: torch.Tensor) -> tuple[float, float]:
    ys, xs = torch.meshgrid(
        torch.arange(weight.shape[0], dtype=torch.float64),
        torch.arange(weight.shape[1], dtype=torch.float64),
        indexing="ij",
    )
    w = weight.to(torch.float64)
    assert float(w.sum()) > 0.5, "no dot found"
    return float((w * xs).sum() / w.sum()), float((w * ys).sum() / w.sum())


def test_celeba_augmentation_moves_landmarks_with_the_image(celeba_tree: CelebATree) -> None:
    node = celeba(celeba_tree.parent, "landmarks", 0, 2)
    aug = node.train_augmented
    assert aug is not None and node.training_view() is aug
    assert "celeba" in AUGMENTED_DATASETS  # the catalog knows it (config checks read it)
    x_plain, y_plain = node.train[0]
    assert torch.equal(node.train[0][0], x_plain)  # the plain split is not augmented
    assert torch.equal(node.val[0][0], node.val[0][0]) and torch.equal(
        node.test[0][0], node.test[0][0]
    )
    torch.manual_seed(3)
    flips = set()
    for _ in range(12):
        x, y = aug[0]
        assert x.shape == (3, 218, 178)
        assert not torch.equal(x, x_plain)
        points = y.view(5, 2)
        found = {}
        for point, channel in DOTS:
            others = [c for c in range(3) if c != channel]
            found[point] = _centroid(
                (x[channel] - torch.maximum(x[others[0]], x[others[1]])).clamp(min=0)
            )
        # label 0 (image-left eye) is at the red dot unless the image was flipped (then green)
        red, green = found[0], found[1]
        flipped = red[0] > green[0]
        flips.add(flipped)
        left_dot, right_dot = (green, red) if flipped else (red, green)
        for dot, label in ((left_dot, points[0]), (right_dot, points[1]), (found[2], points[2])):
            assert math.hypot(dot[0] - float(label[0]), dot[1] - float(label[1])) < 1.0
        assert points[0, 0] < points[1, 0] and points[3, 0] < points[4, 0]
    assert flips == {False, True}
    att = celeba(celeba_tree.parent, "attributes", 0, 2)
    assert att.train_augmented is not None
    torch.manual_seed(0)
    xa, ya = att.train_augmented[0]
    assert torch.equal(ya, att.train[0][1]) and not torch.equal(xa, att.train[0][0])


def test_celeba_root_may_be_the_folder_itself(celeba_tree: CelebATree) -> None:
    a = celeba(celeba_tree.parent, "attributes", 1, 2)
    b = celeba(celeba_tree.folder, "attributes", 1, 2)
    assert names_of(a, "train") == names_of(b, "train")


CELEBA_HOWTO = "torchvision.datasets.CelebA("
CELEBA_FILES = ["img_align_celeba", "list_attr_celeba.txt", "list_landmarks_align_celeba.txt"]


def test_celeba_missing_root_and_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nothing"
    _raises(
        FileNotFoundError,
        [str(missing), *CELEBA_FILES, "list_eval_partition.txt", CELEBA_HOWTO],
        celeba,
        missing,
        "attributes",
        0,
        1,
    )
    _raises(
        FileNotFoundError,
        [str(tmp_path / "celeba"), "not found", *CELEBA_FILES, CELEBA_HOWTO],
        celeba,
        tmp_path,
        "landmarks",
        0,
        1,
    )


def test_celeba_incomplete_trees(celeba_tree: CelebATree, tmp_path: Path) -> None:
    parent = copy_tree(celeba_tree.parent, tmp_path)
    folder = parent / "celeba"
    (folder / "list_attr_celeba.txt").rename(folder / "attr.bak")
    _raises(
        FileNotFoundError,
        [str(folder), "missing list_attr_celeba.txt", "img_align_celeba", CELEBA_HOWTO],
        celeba,
        parent,
        "landmarks",
        0,
        1,
    )
    (folder / "attr.bak").rename(folder / "list_attr_celeba.txt")
    # an image that every node needs (a test image) is gone
    test_name = sorted(n for n, c in celeba_tree.codes.items() if c == 2)[3]
    (folder / "img_align_celeba" / test_name).unlink()
    _raises(
        FileNotFoundError,
        [str(folder / "img_align_celeba"), test_name, "1 of the", CELEBA_HOWTO],
        celeba,
        parent,
        "attributes",
        0,
        2,
    )
    shutil.copy(celeba_tree.folder / "img_align_celeba" / test_name, folder / "img_align_celeba")
    # an image no node needs (the official validation partition) is gone: the count check sees it
    val_name = next(n for n, c in celeba_tree.codes.items() if c == 1)
    (folder / "img_align_celeba" / val_name).unlink()
    total = sum(CELEBA_CODES.values())
    _raises(
        FileNotFoundError,
        [str(folder / "img_align_celeba"), f"holds {total - 1} JPEGs", f"lists {total} images"],
        celeba,
        parent,
        "attributes",
        0,
        2,
    )
    shutil.copy(celeba_tree.folder / "img_align_celeba" / val_name, folder / "img_align_celeba")
    # a truncated landmark file
    path = folder / "list_landmarks_align_celeba.txt"
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")
    _raises(ValueError, [str(path), "truncated", CELEBA_HOWTO], celeba, parent, "landmarks", 0, 2)
    # a foreign image size under image_size = 0
    shutil.copy(celeba_tree.folder / "list_landmarks_align_celeba.txt", path)
    node = celeba(parent, "landmarks", 0, 2)
    Image.new("RGB", (64, 64)).save(folder / "img_align_celeba" / node.test.names[0])
    _raises(
        ValueError,
        [node.test.names[0], "64x64", "data.image_size"],
        celeba,
        parent,
        "landmarks",
        0,
        2,
    )


def test_disk_dataset_without_root_is_refused(cifar_tree: CifarTree) -> None:
    with pytest.raises(ValueError, match="data.root"):
        build_node_data("cifar10", "animals", 0, 1, seed=0, sizes=DataSizes(), root=None)
    with pytest.raises(ValueError, match="image_size=16"):
        cifar(cifar_tree, "animals", 0, 1, image_size=16)


# ------------------------------------------------------------------------------ the node and the CLI


def _config(dataset: str, root: str, tasks: tuple[str, ...], **data):
    from colnet_mpi.config import ClusteringConfig, Config, ModelConfig, NodeConfig, TrainingConfig

    return Config(
        data=DataConfig(dataset=dataset, root=root, **data),
        model=ModelConfig(width=4),
        training=TrainingConfig(batch_size=4, eval_batch_size=8),
        clustering=ClusteringConfig(k=1, max_batches=2),
        nodes=tuple(NodeConfig(name=f"n{i}", task=t) for i, t in enumerate(tasks)),
    )


def test_node_trains_on_the_augmented_view_and_probes_the_plain_split(
    cifar_tree: CifarTree, celeba_tree: CelebATree
) -> None:
    from colnet_mpi.node import Node

    cpu = torch.device("cpu")
    cfg = _config("cifar10", str(cifar_tree.parent), ("animals",), samples_per_node=20, workers=2)
    node = Node(cfg, 0, cpu)
    assert node.train_loader.dataset is node.data.train_augmented
    assert node.val_loader.dataset is node.data.val and node.test_loader.dataset is node.data.test
    for loader in (node.train_loader, node.val_loader, node.test_loader):
        assert loader.num_workers == 2 and loader.persistent_workers and not loader.pin_memory
    assert cfg.model.resolved_stem(node.data.image_size) == "cifar"
    assert len(node.probe_batches) == 2
    for b, (x, y) in enumerate(node.probe_batches):
        expected = [node.data.train[j] for j in range(4 * b, 4 * b + 4)]
        assert torch.equal(x, torch.stack([e[0] for e in expected]))
        assert torch.equal(y, torch.stack([e[1] for e in expected]))

    lmk = Node(_config("celeba", str(celeba_tree.parent), ("landmarks",), image_size=0), 0, cpu)
    assert lmk.data.image_size == 218 and lmk.config.model.resolved_stem(218) == "imagenet"
    assert lmk.probe_batches[0][0].shape == (4, 3, 218, 178)
    assert torch.equal(lmk.probe_batches[0][1], lmk.data.train.labels[:4])
    assert lmk.train_loader.num_workers == 0 and not lmk.train_loader.persistent_workers

    # embedded data: the probe batches are exactly the first rows of the training tensors
    digits = Node(_config("digits", "", ("low_digits",), samples_per_node=40), 0, cpu)
    x_all, y_all = digits.data.train.tensors
    assert digits.train_loader.dataset is digits.data.train
    assert torch.equal(digits.probe_batches[1][0], x_all[4:8])
    assert torch.equal(digits.probe_batches[1][1], y_all[4:8])
