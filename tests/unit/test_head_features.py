"""Unit tests for catching up with the head on stored features (``federation.catch_up_train =
"features"``): the costs of its parts, that an epoch on stored features trains the head as an
epoch of the head alone does (same samples, same order, the backbone untouched), when the
features are computed again, and the config checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from colnet_mpi.config import ConfigError, load_config
from colnet_mpi.data import DataSizes, build_node_data
from colnet_mpi.data.catalog import AUGMENTED_DATASETS, EMBEDDED_DATASETS
from colnet_mpi.models import build_backbone, build_head
from colnet_mpi.models.cost import catch_up_costs, head_only_cost
from colnet_mpi.node import Node

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "configs" / "quickstart.toml"
SMALL = ["model.width=4", "data.samples_per_node=40", "federation.mode=async"]
SMALL += ["federation.catch_up=1"]


def node(catch_up_train: str, *sets: str) -> Node:
    cfg = load_config(QUICK, [*SMALL, f"federation.catch_up_train={catch_up_train}", *sets])
    return Node(cfg, 0, torch.device("cpu"))


def state(module: torch.nn.Module) -> list[torch.Tensor]:
    return [v.clone() for v in module.state_dict().values()]


def test_catch_up_costs_add_up_and_match_bl1() -> None:
    torch.manual_seed(0)
    b = build_backbone(width=4, stem="cifar", in_channels=3, privatization=1)
    h = build_head(width=4, privatization=1, num_outputs=5)
    c = catch_up_costs(b, h, torch.randn(2, 3, 32, 32))
    # a head-alone step = the backbone's forward pass + the head's step on its features
    assert c.head == pytest.approx(c.head_on_features + c.features)
    assert c.head == head_only_cost(b, h, torch.randn(2, 3, 32, 32))
    assert c.head_on_features == pytest.approx(0.22, abs=0.02)
    assert c.features == pytest.approx(0.26, abs=0.02)


@pytest.mark.parametrize("privatization", [0, 2])
def test_more_private_stages_cost_more_on_features(privatization: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)

    def costs(k: int):
        b = build_backbone(width=4, stem="cifar", in_channels=3, privatization=k)
        return catch_up_costs(b, build_head(width=4, privatization=k, num_outputs=5), x)

    bl1, other = costs(1), costs(privatization)
    assert (other.head_on_features > bl1.head_on_features) is (privatization > 1)
    assert 0.0 < other.features < 1.0 / 3.0 + 1e-9


def test_an_epoch_on_stored_features_trains_the_head_like_an_epoch_of_the_head_alone() -> None:
    plain, stored = node("head"), node("features")
    backbone = state(plain.backbone)
    assert all(torch.equal(a, b) for a, b in zip(backbone, state(stored.backbone), strict=True))
    assert all(
        torch.equal(a, b) for a, b in zip(state(plain.head), state(stored.head), strict=True)
    )
    losses = [n.train_local(2, head_only=lambda _e: True)[0] for n in (plain, stored)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    for a, b in zip(state(plain.head), state(stored.head), strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # the backbone stays bit-identical, and both nodes drew the same samples from the generator
    assert all(torch.equal(a, b) for a, b in zip(backbone, state(stored.backbone), strict=True))
    assert torch.equal(plain.generator.get_state(), stored.generator.get_state())
    # the features were computed once, for the first epoch; the second reused them
    c = stored.catch_up_costs
    first = c.head_on_features + c.features * stored.n_train / stored.epoch_samples
    assert stored.epoch_costs == pytest.approx([first, c.head_on_features])
    assert plain.epoch_costs == pytest.approx([c.head, c.head])


def test_features_are_computed_again_only_when_the_backbone_changed() -> None:
    n = node("features", "training.steps_per_epoch=3")
    assert n.epoch_samples == 3 * n.config.training.batch_size
    assert n.refresh_features() and not n.refresh_features()
    assert n.features is not None
    _, z, y = n.features
    assert z.shape[0] == y.shape[0] == n.n_train and not z.requires_grad
    # a full epoch moves the backbone: its features are stale, and are computed again
    n.train_local(1)
    assert n.epoch_costs == [1.0]
    assert n.refresh_features()
    # BatchNorm statistics alone count too
    bn = next(m for m in n.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.running_mean is not None
    bn.running_mean += 1.0
    calls: list[int] = []
    assert n.refresh_features(lambda: calls.append(1)) and not n.refresh_features()
    # the mailbox is served after every batch of the pass
    assert len(calls) == -(-n.n_train // n.config.training.eval_batch_size) >= 1
    # every batch of an epoch on features: the loader's batch size, three steps
    batches = list(n.head_on_features())
    assert len(batches) == 3 and all(b[0].shape[0] == n.config.training.batch_size for b in batches)


def test_features_refused_for_augmented_datasets_with_the_choices_named(tmp_path: Path) -> None:
    assert set(AUGMENTED_DATASETS) == {"cifar10", "celeba"}
    text = QUICK.read_text()
    text = text[: text.index("[[nodes]]")] + '[[nodes]]\ntask = "animals"\ncount = 2\n'
    cfg = tmp_path / "cifar.toml"
    cfg.write_text(text)
    sets = [*SMALL, "data.dataset=cifar10", f"data.root={tmp_path}"]
    assert load_config(cfg, [*sets, "federation.catch_up_train=head"]).data.dataset == "cifar10"
    with pytest.raises(
        ConfigError,
        match=r'catch_up_train = "features" .*\'cifar10\'.*augmented.*"head".*digits, synthetic_faces',
    ):
        load_config(cfg, [*sets, "federation.catch_up_train=features"])
    ok = load_config(QUICK, [*SMALL, "federation.catch_up_train=features"])
    assert ok.federation.catch_up_train == "features"


@pytest.mark.parametrize("dataset", EMBEDDED_DATASETS)
def test_embedded_datasets_are_not_augmented(dataset: str) -> None:
    """The catalog's list agrees with the builders for the datasets built without files (the
    on-disk ones: tests/unit/test_data_disk.py builds them from fabricated files)."""
    task = {"digits": "low_digits", "synthetic_faces": "attributes"}[dataset]
    data = build_node_data(dataset, task, 0, 1, seed=0, sizes=DataSizes(samples_per_node=20))
    assert (data.train_augmented is not None) is (dataset in AUGMENTED_DATASETS)
