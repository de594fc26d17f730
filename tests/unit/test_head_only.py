"""Unit tests for catching up with the head alone (``federation.catch_up_train = "head"``): what
a head-only step costs, that it leaves the backbone bit-identical while the head learns, when a
node counts as behind, and the config checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from colnet_mpi.config import ConfigError, FederationConfig
from colnet_mpi.federation.asynchronous import behind, catch_up_epochs
from colnet_mpi.models import build_backbone, build_head
from colnet_mpi.models.cost import forward_macs, head_only_cost
from colnet_mpi.tasks import make_optimizer, train_epoch


def split(privatization: int, width: int = 4, outputs: int = 5) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    b = build_backbone(width=width, stem="cifar", in_channels=3, privatization=privatization)
    h = build_head(width=width, privatization=privatization, num_outputs=outputs)
    return b, h


def test_forward_macs_counts_convolutions_and_linear_layers_by_hand() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),  # 4 x 8 x 8 outputs, 3*3*3 each
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3, padding=1, groups=2),  # 4 x 8 x 8 outputs, (4/2)*3*3 each
        nn.Flatten(),
        nn.Linear(256, 10),
    )
    x = torch.randn(2, 3, 8, 8)
    bn = net[1]
    assert isinstance(bn, nn.BatchNorm2d)
    before = bn.running_mean.clone()
    net.train()
    macs, out = forward_macs(net, x)
    assert macs == 2 * (256 * 27 + 256 * 18 + 10 * 256)
    assert out.shape == (2, 10) and not out.requires_grad
    assert net.training and torch.equal(bn.running_mean, before)  # mode and statistics kept


def test_head_only_cost_grows_with_the_private_stages_and_ignores_width() -> None:
    x = torch.randn(2, 3, 32, 32)
    costs = [head_only_cost(*split(k), x) for k in (0, 1, 2)]
    assert 1 / 3 <= costs[0] < costs[1] < costs[2] < 1.0, costs
    assert costs[1] == pytest.approx(0.49, abs=0.02)  # BL-1: about half a full step
    assert head_only_cost(*split(1, width=16), x) == pytest.approx(costs[1], abs=0.01)


@pytest.mark.parametrize("head_only", [True, False])
def test_head_only_epoch_leaves_the_backbone_bit_identical(head_only: bool) -> None:
    b, h = split(1)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    head_before = [p.detach().clone() for p in h.parameters()]
    params = list(b.parameters()) + list(h.parameters())
    opt = make_optimizer("adamw", params, lr=1e-2, weight_decay=5e-3)
    torch.manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4, 5)).float()) for _ in range(3)]
    loss = train_epoch(
        b, h, batches, "multi_label", opt, torch.device("cpu"), grad_clip=1.0, head_only=head_only
    )
    assert loss == loss  # not NaN
    same = all(torch.equal(before[k], v) for k, v in b.state_dict().items())
    assert same is head_only  # weights and BatchNorm statistics: frozen only with head_only
    assert all(not torch.equal(a, p) for a, p in zip(head_before, h.parameters(), strict=True))
    assert b.training is not head_only and h.training


def test_between_steps_runs_after_every_step() -> None:
    b, h = split(1)
    opt = make_optimizer("adam", list(b.parameters()) + list(h.parameters()), lr=1e-3)
    batches = [(torch.randn(2, 3, 32, 32), torch.randn(2, 5)) for _ in range(4)]
    steps: list[int] = []
    train_epoch(
        b, h, batches, "multi_label", opt, torch.device("cpu"), grad_clip=None,
        between_steps=lambda: steps.append(len(steps)),
    )  # fmt: skip
    assert steps == [0, 1, 2, 3]


def test_behind_and_catch_up_epochs() -> None:
    # a node that has finished r - 1 rounds, the most advanced neighbour newest
    assert behind(5, 1, 5) and behind(5, 2, 6) and not behind(5, 2, 5)
    assert not behind(5, 0, 50)  # off
    assert not behind(1, 1, 0)  # nothing heard yet
    assert catch_up_epochs(5, 2, 1, 5) == 1 and catch_up_epochs(5, 2, 1, 4) == 2


def test_catch_up_train_config_checks() -> None:
    assert FederationConfig().catch_up_train == "epochs"
    ok = FederationConfig(mode="async", catch_up=1, catch_up_train="head")
    assert ok.catch_up_train == "head"
    with pytest.raises(ConfigError, match=r"federation.catch_up_train = 'heads'.*'epochs', 'head'"):
        FederationConfig(mode="async", catch_up=1, catch_up_train="heads")
    with pytest.raises(ConfigError, match=r"catch_up_train = 'head' needs federation.catch_up"):
        FederationConfig(mode="async", catch_up_train="head")


def test_stop_ends_the_pass_after_the_step_it_answers_true() -> None:
    b, h = split(1)
    opt = make_optimizer("adam", list(b.parameters()) + list(h.parameters()), lr=1e-3)
    batches = [(torch.randn(2, 3, 32, 32), torch.randn(2, 5)) for _ in range(4)]
    steps: list[int] = []
    loss = train_epoch(
        b, h, batches, "multi_label", opt, torch.device("cpu"), grad_clip=None,
        between_steps=lambda: steps.append(len(steps)), stop=lambda: len(steps) == 2,
    )  # fmt: skip
    assert steps == [0, 1] and loss == loss


def test_a_node_stopped_mid_epoch_reports_that_share_of_it() -> None:
    """train_local of three epochs (10 steps each) with ``after_step`` answering True at the
    17th step: the first epoch is whole, the second stops after 7 steps and is the last (two
    losses, steps_taken 17, its cost 0.7); every step was told its epoch's start, the share of
    the epoch's steps taken and its cost."""
    from tests.unit.test_head_features import node

    n = node("head", "data.samples_per_node=125", "training.batch_size=10")  # 100 train: 10 steps
    assert len(n.train_loader) == 10
    seen: list[tuple[float, float, float]] = []

    def after_step(started: float, share: float, cost: float) -> bool:
        seen.append((started, share, cost))
        return len(seen) == 17

    train, val = n.train_local(3, after_step=after_step)
    assert len(train) == len(val) == 2 and n.steps_taken == 17
    assert n.epoch_costs == [1.0, pytest.approx(0.7)]
    assert [s for _, s, _ in seen[:10]] == pytest.approx([k / 10 for k in range(1, 11)])
    assert [s for _, s, _ in seen[10:]] == pytest.approx([k / 10 for k in range(1, 8)])
    assert len({t for t, _, _ in seen[:10]}) == 1 and seen[10][0] > seen[9][0]
    assert {c for _, _, c in seen} == {1.0}
