"""Progress during local training: one callback per epoch, a line for long epochs."""

from __future__ import annotations

import torch

from colnet_mpi.config import load_config
from colnet_mpi.federation.stages import EPOCH_LINE_SECONDS, epoch_line
from colnet_mpi.node import Node
from tests.conftest import ROOT


def _node() -> Node:
    cfg = load_config(
        ROOT / "configs" / "quickstart.toml", ["model.width=4", "data.samples_per_node=32"]
    )
    return Node(cfg, 3, torch.device("cpu"))


def test_progress_reports_each_epoch_and_changes_nothing() -> None:
    seen: list[tuple[int, float, float, float]] = []
    train, val = _node().train_local(3, None, lambda *a: seen.append(a))
    assert [s[0] for s in seen] == [1, 2, 3]
    assert [s[1] for s in seen] == train and [s[2] for s in seen] == val
    assert all(s[3] > 0 for s in seen)
    assert _node().train_local(3) == (train, val)  # the callback does not change training


def test_epoch_line_names_round_epoch_losses_and_time() -> None:
    line = epoch_line(3, 15, 1, 2, (0.41234, 0.39876), 34.52)
    assert (
        line.strip() == "round 3/15 epoch 1/2: train loss 0.4123, val loss 0.3988 (34.5s on rank 0)"
    )
    assert EPOCH_LINE_SECONDS > 0


def test_steps_per_epoch_fixes_the_batches_of_every_epoch() -> None:
    """training.steps_per_epoch = k: every epoch takes k full batches from back-to-back fresh
    permutations of the node's training split, whatever its size; 0 keeps one pass."""
    base = ["model.width=4", "data.samples_per_node=32", "training.batch_size=8"]
    path = ROOT / "configs" / "quickstart.toml"
    one_pass = Node(load_config(path, base), 3, torch.device("cpu"))
    n = len(one_pass.train_loader.dataset)  # type: ignore[arg-type]
    assert 8 < n < 32 and len(one_pass.train_loader) == -(-n // 8)
    node = Node(load_config(path, [*base, "training.steps_per_epoch=7"]), 3, torch.device("cpu"))
    assert len(node.train_loader) == 7
    passes = []
    for _ in range(2):
        batches = [y for _, y in node.train_loader]
        assert [len(y) for y in batches] == [8] * 7
        order = list(node.train_loader.sampler)
        assert len(order) == 56 and sorted(order[:n]) == list(range(n))
        assert sorted(order[n : 2 * n]) == list(range(n))  # the second permutation is whole too
        passes.append(order)
    assert passes[0] != passes[1]  # each epoch draws afresh
    train, val = node.train_local(2)
    assert len(train) == len(val) == 2 and all(t == t for t in train)
