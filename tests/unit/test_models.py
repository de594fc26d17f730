"""Unit tests for colnet_mpi.models: torchvision parity, BL-k split, builders, validation."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from colnet_mpi.models import (
    PRIVATIZATION_LEVELS,
    STEMS,
    backbone_out_channels,
    build_backbone,
    build_head,
    resnet18,
    split_resnet,
)

STEM_KEYS = ["conv1", "bn1", "relu", "maxpool"]
EXPECTED_BACKBONE = {
    0: STEM_KEYS + ["layer1", "layer2", "layer3", "layer4"],
    1: STEM_KEYS + ["layer1", "layer2", "layer3"],
    2: STEM_KEYS + ["layer1", "layer2"],
}
EXPECTED_HEAD = {
    0: ["avgpool", "flatten", "fc"],
    1: ["layer4", "avgpool", "flatten", "fc"],
    2: ["layer3", "layer4", "avgpool", "flatten", "fc"],
}


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_matches_torchvision_names_shapes_and_count() -> None:
    ours = resnet18()
    ref = torchvision.models.resnet18()
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)
    for key in ref_sd:
        assert ours_sd[key].shape == ref_sd[key].shape, key
        assert ours_sd[key].dtype == ref_sd[key].dtype, key
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    assert _n_params(ours) == _n_params(ref) == 11_689_512


def test_same_forward_as_torchvision_with_its_weights() -> None:
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10).eval()
    # Perturb BN statistics so that their use in eval mode is actually exercised.
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    ours = resnet18(num_outputs=10).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_same_init_scheme_as_torchvision_under_same_seed() -> None:
    torch.manual_seed(123)
    ref = torchvision.models.resnet18()
    torch.manual_seed(123)
    ours = resnet18()
    for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_init_statistics() -> None:
    torch.manual_seed(0)
    model = resnet18(width=16, stem="cifar", num_outputs=5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # Kaiming normal, fan_out: std = sqrt(2 / (out_channels * k * k)).
    w = model.layer4[0].conv2.weight
    expected = (2.0 / (w.shape[0] * w.shape[2] * w.shape[3])) ** 0.5
    assert abs(w.std().item() - expected) / expected < 0.05


def test_channels_and_width() -> None:
    model = resnet18(width=8, stem="cifar", num_outputs=3, in_channels=1)
    assert model.conv1.weight.shape == (8, 1, 3, 3)
    assert model.layer1[0].conv1.out_channels == 8
    assert model.layer2[0].conv1.out_channels == 16
    assert model.layer3[0].conv1.out_channels == 32
    assert model.layer4[0].conv1.out_channels == 64
    assert model.fc.weight.shape == (3, 64)
    out = model(torch.randn(2, 1, 16, 16))
    assert out.shape == (2, 3)


def test_cifar_stem_keeps_resolution() -> None:
    model = resnet18(width=4, stem="cifar", num_outputs=10).eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.bias is None
    assert isinstance(model.maxpool, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stem_out = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    assert stem_out.shape == (2, 4, 32, 32)
    imagenet = resnet18(width=4, stem="imagenet", num_outputs=10).eval()
    with torch.no_grad():
        stem_out = imagenet.maxpool(imagenet.relu(imagenet.bn1(imagenet.conv1(x))))
    assert stem_out.shape == (2, 4, 8, 8)


@pytest.mark.parametrize("k", PRIVATIZATION_LEVELS)
def test_split_is_exact(k: int) -> None:
    torch.manual_seed(1)
    model = resnet18(width=4, stem="cifar", num_outputs=6)
    # Train mode for a step so BN running stats differ from their initial values.
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    model.eval()
    backbone, head = split_resnet(model, k)
    assert list(dict(backbone.named_children())) == EXPECTED_BACKBONE[k]
    assert list(dict(head.named_children())) == EXPECTED_HEAD[k]

    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        z = backbone(x)
        assert z.shape[1] == backbone_out_channels(4, k)
        torch.testing.assert_close(head(z), model(x), rtol=0, atol=0)

    full = set(model.state_dict())
    b_keys, h_keys = set(backbone.state_dict()), set(head.state_dict())
    assert not b_keys & h_keys
    assert b_keys | h_keys == full
    # Same objects: parameters are shared, not copied.
    model_params = {id(p) for p in model.parameters()}
    shared = {id(p) for p in backbone.parameters()} | {id(p) for p in head.parameters()}
    assert shared == model_params


def test_split_shares_parameters_under_update() -> None:
    model = resnet18(width=4, stem="cifar", num_outputs=2)
    backbone, _ = split_resnet(model, 1)
    with torch.no_grad():
        backbone.layer1[0].conv1.weight.fill_(0.25)
    assert torch.all(model.layer1[0].conv1.weight == 0.25)


def test_split_torchvision_model() -> None:
    ref = torchvision.models.resnet18(num_classes=4).eval()
    backbone, head = split_resnet(ref, 1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(head(backbone(x)), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("k", PRIVATIZATION_LEVELS)
@pytest.mark.parametrize("stem", STEMS)
def test_builders_match_full_model(k: int, stem: str) -> None:
    width, outputs = 4, 3
    model = resnet18(width=width, stem=stem, num_outputs=outputs, in_channels=2).eval()
    backbone = build_backbone(width=width, stem=stem, in_channels=2, privatization=k).eval()
    head = build_head(width=width, privatization=k, num_outputs=outputs).eval()
    assert list(dict(backbone.named_children())) == EXPECTED_BACKBONE[k]
    assert list(dict(head.named_children())) == EXPECTED_HEAD[k]

    full = model.state_dict()
    b_sd, h_sd = backbone.state_dict(), head.state_dict()
    assert not set(b_sd) & set(h_sd)
    assert set(b_sd) | set(h_sd) == set(full)
    for key, value in {**b_sd, **h_sd}.items():
        assert value.shape == full[key].shape, key
    # Keys of the backbone keep the full model's order.
    assert list(b_sd) == [key for key in full if key in b_sd]

    # With the full model's weights loaded, the built pair computes the same function.
    backbone.load_state_dict({key: full[key] for key in b_sd}, strict=True)
    head.load_state_dict({key: full[key] for key in h_sd}, strict=True)
    x = torch.randn(3, 2, 32, 32)
    with torch.no_grad():
        z = backbone(x)
        assert z.shape[1] == backbone_out_channels(width, k)
        torch.testing.assert_close(head(z), model(x), rtol=0, atol=0)


def test_builder_init_scheme() -> None:
    torch.manual_seed(0)
    backbone = build_backbone(width=8, stem="cifar", in_channels=3, privatization=1)
    head = build_head(width=8, privatization=2, num_outputs=4)
    for m in [*backbone.modules(), *head.modules()]:
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    w = head.layer4[1].conv1.weight
    expected = (2.0 / (w.shape[0] * 9)) ** 0.5
    assert abs(w.std().item() - expected) / expected < 0.05


def test_seeding_is_left_to_caller() -> None:
    torch.manual_seed(7)
    a = build_backbone(width=4, stem="cifar", in_channels=3, privatization=1)
    torch.manual_seed(7)
    b = build_backbone(width=4, stem="cifar", in_channels=3, privatization=1)
    c = build_backbone(width=4, stem="cifar", in_channels=3, privatization=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(b.conv1.weight, c.conv1.weight)


def test_backbone_out_channels_values() -> None:
    assert backbone_out_channels(64, 0) == 512
    assert backbone_out_channels(64, 1) == 256
    assert backbone_out_channels(64, 2) == 128
    assert backbone_out_channels(16, 1) == 64


@pytest.mark.parametrize("width", [0, -4, 2.5, "8", True, None])
def test_bad_width(width: object) -> None:
    with pytest.raises(ValueError, match="width"):
        resnet18(width=width)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="width"):
        build_backbone(width=width, stem="cifar", in_channels=3, privatization=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="width"):
        build_head(width=width, privatization=1, num_outputs=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="width"):
        backbone_out_channels(width, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("stem", ["resnet", "CIFAR", "", None])
def test_bad_stem(stem: object) -> None:
    with pytest.raises(ValueError, match="stem.*imagenet"):
        resnet18(stem=stem)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stem"):
        build_backbone(width=4, stem=stem, in_channels=3, privatization=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [-1, 3, 4, 1.5, "1", None, True])
def test_bad_privatization(k: object) -> None:
    model = resnet18(width=4, stem="cifar", num_outputs=2)
    with pytest.raises(ValueError, match="privatization"):
        split_resnet(model, k)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="privatization"):
        build_backbone(width=4, stem="cifar", in_channels=3, privatization=k)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="privatization"):
        build_head(width=4, privatization=k, num_outputs=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="privatization"):
        backbone_out_channels(4, k)  # type: ignore[arg-type]


def test_bad_in_channels_and_outputs() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        resnet18(in_channels=0)
    with pytest.raises(ValueError, match="in_channels"):
        build_backbone(width=4, stem="cifar", in_channels=-1, privatization=0)
    with pytest.raises(ValueError, match="num_outputs"):
        resnet18(num_outputs=0)
    with pytest.raises(ValueError, match="num_outputs"):
        build_head(width=4, privatization=0, num_outputs=0)


def test_split_rejects_non_resnet() -> None:
    with pytest.raises(ValueError, match="missing"):
        split_resnet(nn.Sequential(nn.Linear(2, 2)), 1)
