"""Unit tests for the embedded datasets and the partitioning helpers (colnet_mpi.data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from colnet_mpi.data import (
    EMBEDDED_DATASETS,
    FACE_ATTRIBUTES,
    LANDMARK_NAMES,
    TASK_KINDS,
    DataSizes,
    TaskSpec,
    build_node_data,
    dataset_tasks,
    known_datasets,
)
from colnet_mpi.data.faces import generate_faces
from colnet_mpi.data.partition import shard, split_train_val, train_val_sizes
from tests.conftest import run_python

DIGIT_GROUPS = {"low_digits": (0, 1, 2, 3, 4, 5), "high_digits": (6, 7, 8, 9)}


def _rows(x: torch.Tensor) -> set[bytes]:
    """Set of the raw bytes of every sample of ``x`` (one entry per image)."""
    arr = x.numpy()
    return {arr[i].tobytes() for i in range(len(arr))}


def _same(a, b) -> bool:
    """True if two TensorDatasets hold identical tensors."""
    return all(torch.equal(ta, tb) for ta, tb in zip(a.tensors, b.tensors, strict=True))


# ---------------------------------------------------------------- registry and validation


def test_known_datasets_and_tasks() -> None:
    assert EMBEDDED_DATASETS == ("digits", "synthetic_faces")
    assert known_datasets()[: len(EMBEDDED_DATASETS)] == EMBEDDED_DATASETS
    digits = dataset_tasks("digits")
    assert set(digits) == {"low_digits", "high_digits", "digits_012", "digits_345", "digits_6789"}
    assert digits["digits_6789"] == TaskSpec("digits_6789", "single_label", 4, "digits_6789")
    assert digits["low_digits"] == TaskSpec("low_digits", "single_label", 6, "low_digits")
    assert digits["high_digits"] == TaskSpec("high_digits", "single_label", 4, "high_digits")
    faces = dataset_tasks("synthetic_faces")
    assert set(faces) == {"attributes", "landmarks"}
    assert faces["attributes"].kind == "multi_label"
    assert faces["attributes"].num_outputs == len(FACE_ATTRIBUTES)
    assert 5 <= len(FACE_ATTRIBUTES) <= 8
    assert faces["landmarks"] == TaskSpec("landmarks", "landmarks", 10, "landmarks")
    assert len(LANDMARK_NAMES) == 10
    for spec in [*digits.values(), *faces.values()]:
        assert spec.kind in TASK_KINDS


def test_dataset_tasks_returns_a_copy() -> None:
    tasks = dataset_tasks("digits")
    tasks.clear()
    assert len(dataset_tasks("digits")) == 5


def test_unknown_dataset_and_task_raise() -> None:
    with pytest.raises(ValueError, match="'foo'.*digits, synthetic_faces"):
        dataset_tasks("foo")
    with pytest.raises(ValueError, match="'foo'"):
        build_node_data("foo", "low_digits", 0, 1, seed=0, sizes=DataSizes())
    with pytest.raises(ValueError, match="'animals'.*'digits'.*low_digits, high_digits"):
        build_node_data("digits", "animals", 0, 1, seed=0, sizes=DataSizes())
    with pytest.raises(ValueError, match="'smile'.*attributes, landmarks"):
        build_node_data("synthetic_faces", "smile", 0, 1, seed=0, sizes=DataSizes())


@pytest.mark.parametrize(
    ("position", "group_size", "match"),
    [(3, 3, "position=3"), (-1, 3, "position=-1"), (0, 0, "group_size=0")],
)
def test_bad_position_raises(position: int, group_size: int, match: str) -> None:
    for dataset, task in (("digits", "high_digits"), ("synthetic_faces", "landmarks")):
        with pytest.raises(ValueError, match=match):
            build_node_data(dataset, task, position, group_size, seed=0, sizes=DataSizes())


def test_bad_sizes_and_seed_raise() -> None:
    with pytest.raises(ValueError, match="samples_per_node=-1"):
        DataSizes(samples_per_node=-1)
    with pytest.raises(ValueError, match="test_samples=-5"):
        DataSizes(test_samples=-5)
    with pytest.raises(ValueError, match="image_size=4"):
        DataSizes(image_size=4)
    with pytest.raises(ValueError, match="seed=-1"):
        build_node_data("digits", "low_digits", 0, 1, seed=-1, sizes=DataSizes())
    with pytest.raises(ValueError, match="image_size=8"):
        build_node_data(
            "synthetic_faces", "attributes", 0, 1, seed=0, sizes=DataSizes(image_size=8)
        )
    with pytest.raises(ValueError, match="test_samples=5000"):
        build_node_data("digits", "low_digits", 0, 1, seed=0, sizes=DataSizes(test_samples=5000))


def test_task_spec_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="'regression'"):
        TaskSpec("x", "regression", 1, "x")


# ---------------------------------------------------------------- partition helpers


@pytest.mark.parametrize(
    ("n", "parts"), [(10, 3), (7, 7), (100, 6), (5, 1), (866, 3), (2, 5), (0, 4)]
)
def test_shards_cover_pool_evenly_larger_first(n: int, parts: int) -> None:
    items = np.arange(100, 100 + n)
    shards = [shard(items, parts, p) for p in range(parts)]
    np.testing.assert_array_equal(np.concatenate(shards), items)  # contiguous, in order, all
    base, extra = divmod(n, parts)
    assert [len(s) for s in shards] == [base + (1 if p < extra else 0) for p in range(parts)]
    for bad_parts, bad_position in ((parts, parts), (parts, -1), (0, 0)):
        with pytest.raises(ValueError, match="parts|position"):
            shard(items, bad_parts, bad_position)


def test_split_train_val_is_80_20_partition() -> None:
    idx = np.arange(100, 150)
    train, val = split_train_val(idx, np.random.default_rng(0))
    assert len(train) == 40 and len(val) == 10
    assert sorted(np.concatenate([train, val]).tolist()) == idx.tolist()
    assert train_val_sizes(7) == (6, 1)  # round(5.6) = 6
    with pytest.raises(ValueError, match="1 sample"):
        train_val_sizes(1)


# ---------------------------------------------------------------- digits


def _digits(task: str, position: int, group_size: int, *, seed: int = 0, **sizes):
    return build_node_data(
        "digits", task, position, group_size, seed=seed, sizes=DataSizes(**sizes)
    )


def test_digits_shapes_dtypes_and_split_sizes() -> None:
    for task, n_classes in (("low_digits", 6), ("high_digits", 4)):
        node = _digits(task, 1, 3, image_size=32)
        assert node.channels == 1 and node.image_size == 32
        n_node = len(node.train) + len(node.val)
        assert len(node.train) == round(0.8 * n_node)
        for split in (node.train, node.val, node.test):
            x, y = split.tensors
            assert x.dtype == torch.float32 and tuple(x.shape[1:]) == (1, 32, 32)
            assert y.dtype == torch.int64 and y.dim() == 1 and len(y) == len(x)
            assert int(y.min()) >= 0 and int(y.max()) < n_classes
        # the node's training labels contain every class of the group (IID shard)
        assert set(node.train.tensors[1].tolist()) == set(range(n_classes))


def test_bundled_digits_read_without_scikit_learn_equal_load_digits() -> None:
    from colnet_mpi.data import digits

    digits._load_raw.cache_clear()
    images, targets = digits._load_raw()
    bunch = load_digits()
    np.testing.assert_array_equal(images, bunch.images.astype(np.float32))
    np.testing.assert_array_equal(targets, bunch.target)
    code = (
        "import sys\n"
        "from colnet_mpi.data.digits import _load_raw\n"
        "images, targets = _load_raw()\n"
        "assert images.shape == (1797, 8, 8) and 'sklearn' not in sys.modules\n"
    )
    run_python(code)


def test_digits_pool_covers_class_sets_exactly() -> None:
    """At 8x8 every image is an original scan: test + all shards == the group's images."""
    bunch = load_digits()
    for task, classes in DIGIT_GROUPS.items():
        nodes = [_digits(task, p, 3, seed=11, image_size=8) for p in range(3)]
        xs, ys = [], []
        for split in [nodes[0].test] + [s for n in nodes for s in (n.train, n.val)]:
            xs.append(split.tensors[0])
            ys.append(split.tensors[1])
        x = torch.cat(xs).squeeze(1).numpy()
        y = torch.cat(ys).numpy()
        mask = np.isin(bunch.target, classes)
        expected = bunch.images[mask]
        mapping = {c: i for i, c in enumerate(classes)}
        expected_labels = np.array([mapping[t] for t in bunch.target[mask]])
        assert len(x) == mask.sum()
        # the normalisation is affine with fixed constants, so the extreme values map back to the
        # scans' 0 and 16; every other pixel must then land on an integer 0..16 again
        flat = x.reshape(len(x), -1)
        lo, hi = flat.min(), flat.max()
        raw = np.rint((flat - lo) / (hi - lo) * 16.0)
        assert np.allclose((flat - lo) / (hi - lo) * 16.0, raw, atol=1e-3)
        got = {raw[i].astype(np.int64).tobytes(): int(y[i]) for i in range(len(raw))}
        want = {
            expected[i].reshape(-1).astype(np.int64).tobytes(): int(expected_labels[i])
            for i in range(len(expected))
        }
        assert got == want


def test_digits_determinism_and_seed() -> None:
    a = _digits("low_digits", 0, 2, seed=5, image_size=16)
    b = _digits("low_digits", 0, 2, seed=5, image_size=16)
    c = _digits("low_digits", 0, 2, seed=6, image_size=16)
    for split in ("train", "val", "test"):
        assert _same(getattr(a, split), getattr(b, split))
        assert not _same(getattr(a, split), getattr(c, split))


def test_digits_positions_disjoint_and_test_shared() -> None:
    nodes = [_digits("high_digits", p, 3, seed=2, image_size=16) for p in range(3)]
    shards = [_rows(n.train.tensors[0]) | _rows(n.val.tensors[0]) for n in nodes]
    sizes = [len(n.train) + len(n.val) for n in nodes]
    assert [len(s) for s in shards] == sizes  # no duplicates inside a shard
    assert max(sizes) - min(sizes) <= 1
    for i in range(3):
        assert not _rows(nodes[i].train.tensors[0]) & _rows(nodes[i].val.tensors[0])
        for j in range(i + 1, 3):
            assert not shards[i] & shards[j]
        assert _same(nodes[i].test, nodes[0].test)
        assert not shards[i] & _rows(nodes[0].test.tensors[0])
    # default test split = 20 % of the group's pool
    pool = int(np.isin(load_digits().target, DIGIT_GROUPS["high_digits"]).sum())
    assert len(nodes[0].test) == round(0.2 * pool)


def test_digits_size_options() -> None:
    node = _digits("low_digits", 2, 3, samples_per_node=50, test_samples=100, image_size=12)
    assert len(node.train) == 40 and len(node.val) == 10 and len(node.test) == 100
    assert tuple(node.train.tensors[0].shape[1:]) == (1, 12, 12)
    # capping keeps the node inside its own share: still disjoint from the uncapped neighbour
    other = _digits("low_digits", 1, 3, test_samples=100, image_size=12)
    mine = _rows(node.train.tensors[0]) | _rows(node.val.tensors[0])
    assert not mine & (_rows(other.train.tensors[0]) | _rows(other.val.tensors[0]))


def test_digits_normalisation_uses_fixed_constants() -> None:
    nodes = [_digits("low_digits", p, 3, image_size=8) for p in range(2)]
    x_all = torch.cat([nodes[0].train.tensors[0], nodes[0].test.tensors[0]])
    assert abs(float(x_all.mean())) < 0.3 and 0.7 < float(x_all.std()) < 1.3
    # a blank pixel (raw 0) maps to the same value on every shard: constants are not per-shard
    assert float(nodes[0].train.tensors[0].min()) == float(nodes[1].train.tensors[0].min())


# ---------------------------------------------------------------- synthetic faces


def _faces(task: str, position: int, group_size: int, *, seed: int = 0, **sizes):
    return build_node_data(
        "synthetic_faces", task, position, group_size, seed=seed, sizes=DataSizes(**sizes)
    )


@pytest.mark.parametrize("size", [32, 64])
def test_faces_shapes_dtypes_and_landmarks_inside(size: int) -> None:
    att = _faces("attributes", 0, 2, samples_per_node=50, test_samples=20, image_size=size)
    lmk = _faces("landmarks", 1, 2, samples_per_node=50, test_samples=20, image_size=size)
    for node in (att, lmk):
        assert node.channels == 3 and node.image_size == size
        assert len(node.train) == 40 and len(node.val) == 10 and len(node.test) == 20
        for split in (node.train, node.val, node.test):
            x, y = split.tensors
            assert x.dtype == torch.float32 and tuple(x.shape[1:]) == (3, size, size)
            assert y.dtype == torch.float32 and len(y) == len(x)
    y_att = att.train.tensors[1]
    assert y_att.shape[1] == len(FACE_ATTRIBUTES)
    assert set(torch.unique(y_att).tolist()) <= {0.0, 1.0}
    y_lmk = lmk.train.tensors[1]
    assert y_lmk.shape[1] == 10
    assert float(y_lmk.min()) >= 0.0 and float(y_lmk.max()) <= size - 1
    x = lmk.train.tensors[0]
    assert abs(float(x.mean())) < 0.4 and 0.5 < float(x.std()) < 1.5


def test_faces_default_sizes() -> None:
    node = _faces("landmarks", 0, 1)
    assert len(node.train) == 160 and len(node.val) == 40 and len(node.test) == 200


def test_faces_determinism_and_seed() -> None:
    kw = {"samples_per_node": 20, "test_samples": 10, "image_size": 32}
    a = _faces("attributes", 1, 3, seed=7, **kw)
    b = _faces("attributes", 1, 3, seed=7, **kw)
    c = _faces("attributes", 1, 3, seed=8, **kw)
    for split in ("train", "val", "test"):
        assert _same(getattr(a, split), getattr(b, split))
        assert not torch.equal(getattr(a, split).tensors[0], getattr(c, split).tensors[0])


def test_faces_disjoint_shards_shared_test_and_disjoint_tasks() -> None:
    kw = {"samples_per_node": 30, "test_samples": 25, "image_size": 32}
    nodes = [_faces("attributes", p, 3, seed=1, **kw) for p in range(3)]
    other = _faces("landmarks", 0, 3, seed=1, **kw)
    shards = [_rows(n.train.tensors[0]) | _rows(n.val.tensors[0]) for n in nodes]
    assert all(len(s) == 30 for s in shards)
    test_rows = _rows(nodes[0].test.tensors[0])
    other_rows = (
        _rows(other.train.tensors[0]) | _rows(other.val.tensors[0]) | _rows(other.test.tensors[0])
    )
    for i in range(3):
        assert _same(nodes[i].test, nodes[0].test)
        assert not shards[i] & test_rows
        assert not shards[i] & other_rows
        for j in range(i + 1, 3):
            assert not shards[i] & shards[j]
    assert not test_rows & other_rows


def test_faces_sample_depends_only_on_its_index() -> None:
    whole = generate_faces(3, 9, 10, 0, 12, 32)
    part = generate_faces(3, 9, 10, 5, 4, 32)
    np.testing.assert_array_equal(part.images, whole.images[5:9])
    np.testing.assert_array_equal(part.attributes, whole.attributes[5:9])
    np.testing.assert_array_equal(part.landmarks, whole.landmarks[5:9])


def test_faces_attribute_rates_balanced() -> None:
    batch = generate_faces(0, 1, 10, 0, 500, 16)
    rates = batch.attributes.mean(axis=0)
    assert np.all(rates > 0.2) and np.all(rates < 0.8), dict(
        zip(FACE_ATTRIBUTES, rates, strict=True)
    )


def test_faces_landmarks_match_drawn_features() -> None:
    """Eye landmarks sit on dark pupils, mouth corners on red lips; left is the image's right."""
    batch = generate_faces(4, 2, 10, 0, 200, 64)
    lm = batch.landmarks.reshape(-1, 5, 2)
    cols = np.rint(lm[..., 0]).astype(int)
    rows = np.rint(lm[..., 1]).astype(int)
    n = np.arange(len(lm))[:, None]
    pix = batch.images.transpose(0, 2, 3, 1)[n, rows, cols]  # [n, 5, 3]
    eyes, corners = pix[:, :2], pix[:, 3:]
    assert np.all(eyes.max(axis=-1) < 0.35)
    assert np.all(corners[..., 0] - corners[..., 1] > 0.2)
    # the subject's left eye/mouth corner appears on the image's right side
    assert np.all(lm[:, 0, 0] > lm[:, 1, 0]) and np.all(lm[:, 3, 0] > lm[:, 4, 0])
    # nose below the eyes and above the mouth
    assert np.all(lm[:, 2, 1] > lm[:, :2, 1].max(axis=1))
    assert np.all(lm[:, 2, 1] < lm[:, 3:, 1].min(axis=1))
    # in-plane rotation of the eye line is within +-15 degrees and actually varies
    angle = np.degrees(np.arctan2(lm[:, 0, 1] - lm[:, 1, 1], lm[:, 0, 0] - lm[:, 1, 0]))
    assert np.all(np.abs(angle) <= 15.0 + 1e-3)
    assert angle.min() < -8.0 and angle.max() > 8.0


def test_faces_attributes_are_learnable_from_pixels() -> None:
    train = generate_faces(21, 5, 10, 0, 600, 32)
    test = generate_faces(21, 5, 11, 0, 200, 32)

    def features(images: np.ndarray) -> np.ndarray:
        # 2x2 average pooling keeps the check fast; colours and layout survive it
        n = len(images)
        return images.reshape(n, 3, 16, 2, 16, 2).mean(axis=(3, 5)).reshape(n, -1)

    x_train, x_test = features(train.images), features(test.images)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    scores = {}
    for j, name in enumerate(FACE_ATTRIBUTES):
        clf = LogisticRegression(C=0.01, solver="liblinear").fit(x_train, train.attributes[:, j])
        scores[name] = balanced_accuracy_score(test.attributes[:, j], clf.predict(x_test))
    assert all(s > 0.62 for s in scores.values()), scores
