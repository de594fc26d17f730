"""Seeded, deterministic partitioning helpers: test hold-out, even IID shards, 80/20 train/val."""

from __future__ import annotations

import zlib

import numpy as np

#: Fraction of a node's shard used for training; the rest is its validation split (paper: 80/20).
TRAIN_FRACTION = 0.8

#: Fraction of a group's pool held out as the group's common test split when no size is given.
DEFAULT_TEST_FRACTION = 0.2

# Sub-stream codes so that the different random decisions of one task never share a generator.
STREAM_HOLDOUT = 0
STREAM_TRAIN_VAL = 1
STREAM_POOL = 2  # order of an on-disk group's training pool before sharding


def task_stream(dataset: str, task: str) -> int:
    """Return a stable non-negative integer identifying ``(dataset, task)`` for seeding.

    Uses CRC-32 (not Python's salted ``hash``), so it is the same on every rank and every run.
    """
    return zlib.crc32(f"{dataset}/{task}".encode())


def make_rng(seed: int, *keys: int) -> np.random.Generator:
    """Return a numpy Generator seeded from ``seed`` and the integer ``keys`` (all >= 0)."""
    entropy = [int(seed), *(int(k) for k in keys)]
    for value in entropy:
        if value < 0:
            raise ValueError(f"seed key {value} must be >= 0; got keys {entropy}")
    return np.random.default_rng(entropy)


def shard(items: np.ndarray, parts: int, position: int) -> np.ndarray:
    """Return shard ``position`` of ``items`` split evenly into ``parts`` (``numpy.array_split``).

    Shard sizes differ by at most one; the first ``len(items) % parts`` shards get the extra item.
    Shards are contiguous, disjoint and cover everything.
    """
    if parts < 1:
        raise ValueError(f"parts={parts} must be >= 1")
    if not 0 <= position < parts:
        raise ValueError(f"position={position} must be between 0 and parts-1={parts - 1}")
    return np.array_split(np.asarray(items), parts)[position]


def train_val_sizes(n_items: int, train_fraction: float = TRAIN_FRACTION) -> tuple[int, int]:
    """Return ``(n_train, n_val)`` for a shard of ``n_items``: ``n_train = round(f * n)``.

    Both parts are kept non-empty; a shard of fewer than 2 items is refused.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction={train_fraction} must be strictly between 0 and 1")
    if n_items < 2:
        raise ValueError(
            f"a node's shard of {n_items} sample(s) is too small for a train/val split; "
            "at least 2 are needed"
        )
    n_train = int(round(train_fraction * n_items))
    n_train = min(max(n_train, 1), n_items - 1)
    return n_train, n_items - n_train


def split_train_val(
    indices: np.ndarray, rng: np.random.Generator, train_fraction: float = TRAIN_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle ``indices`` with ``rng`` and split them ``(train, val)`` by ``train_fraction``."""
    indices = np.asarray(indices)
    n_train, _ = train_val_sizes(len(indices), train_fraction)
    shuffled = indices[rng.permutation(len(indices))]
    return shuffled[:n_train], shuffled[n_train:]


def holdout_size(n_pool: int, test_samples: int = 0) -> int:
    """Return how many of ``n_pool`` items form the common test split.

    ``test_samples > 0`` asks for exactly that many; 0 means ``DEFAULT_TEST_FRACTION`` of the pool
    (rounded, at least 1). At least one item per node must remain, which the caller checks.
    """
    if test_samples < 0:
        raise ValueError(f"test_samples={test_samples} must be >= 0 (0 = default)")
    if test_samples > 0:
        n_test = test_samples
    else:
        n_test = max(1, int(round(DEFAULT_TEST_FRACTION * n_pool)))
    if n_test >= n_pool:
        raise ValueError(
            f"test_samples={n_test} must be smaller than the group's pool of {n_pool} samples"
        )
    return n_test


def partition_pool(
    n_pool: int,
    *,
    group_size: int,
    position: int,
    rng: np.random.Generator,
    test_samples: int = 0,
    samples_per_node: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Split a group's pool of ``n_pool`` items and return ``(test_idx, node_idx)``.

    A permutation drawn from ``rng`` (which must be seeded identically on every node of the group)
    puts the first ``holdout_size(n_pool, test_samples)`` items into the group's common test
    split; the remaining items are split evenly (``shard``) over the ``group_size`` nodes
    and this node takes shard ``position``, truncated to ``samples_per_node`` items if that is
    > 0 and smaller. Returned arrays hold indices into the pool.
    """
    if samples_per_node < 0:
        raise ValueError(f"samples_per_node={samples_per_node} must be >= 0 (0 = even share)")
    n_test = holdout_size(n_pool, test_samples)
    order = rng.permutation(n_pool)
    test_idx, rest = order[:n_test], order[n_test:]
    if len(rest) < group_size:
        raise ValueError(
            f"after holding out {n_test} test samples, {len(rest)} remain for "
            f"group_size={group_size} nodes; lower test_samples or the group size"
        )
    node_idx = shard(rest, group_size, position)
    if samples_per_node > 0:
        node_idx = node_idx[:samples_per_node]
    return test_idx, node_idx
