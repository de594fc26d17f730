"""Unit tests for colnet_mpi.comm.buffers: flat packing of a backbone's state and the checksum."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from colnet_mpi.comm.buffers import FlatState, checksum
from colnet_mpi.models import build_backbone


def backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_backbone(width=4, stem="cifar", in_channels=3, privatization=1)


def bn_modules(module: nn.Module) -> dict[str, nn.Module]:
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
    }


def float_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of the module (parameters and buffers), cloned."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def randomise(module: nn.Module, seed: int) -> None:
    """Give every floating-point tensor (BN statistics included) new, distinct values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)


def test_layout_sizes_and_order():
    model = backbone()
    flat = FlatState(model)
    n_params = sum(p.numel() for p in model.parameters())
    n_float_buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    assert flat.n_trainable == n_params
    assert flat.numel == n_params + n_float_buffers
    assert flat.nbytes == 4 * flat.numel
    # trainable entries first, then buffers; offsets contiguous from 0
    kinds = [e.trainable for e in flat.entries]
    assert kinds == sorted(kinds, reverse=True)
    offset = 0
    for e in flat.entries:
        assert e.offset == offset
        offset += e.numel
    assert offset == flat.numel
    assert [e.name for e in flat.entries if e.trainable] == [n for n, _ in model.named_parameters()]


def test_num_batches_tracked_is_excluded():
    model = backbone()
    names = {e.name for e in FlatState(model).entries}
    tracked = [n for n, _ in model.named_buffers() if n.endswith("num_batches_tracked")]
    assert tracked, "the backbone should have BatchNorm layers"
    assert names.isdisjoint(tracked)
    assert any(n.endswith("running_mean") for n in names)
    assert any(n.endswith("running_var") for n in names)


def test_pack_copies_values_in_layout_order():
    model = backbone()
    randomise(model, 1)
    flat = FlatState(model)
    vec = flat.pack()
    assert vec.dtype == torch.float32 and vec.shape == (flat.numel,)
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    for e in flat.entries:
        torch.testing.assert_close(
            vec[e.offset : e.offset + e.numel], state[e.name].detach().reshape(-1), rtol=0, atol=0
        )
    # the trainable prefix is exactly the concatenated parameters
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(vec[: flat.n_trainable], expected)


def test_pack_into_given_buffer():
    model = backbone()
    flat = FlatState(model)
    out = torch.full((flat.numel,), float("nan"))
    result = flat.pack(out)
    assert result is out
    assert torch.equal(out, flat.pack())


def test_pack_unpack_round_trip_restores_exactly():
    model = backbone()
    randomise(model, 2)
    flat = FlatState(model)
    saved = flat.pack().clone()
    before = float_state(model)
    tracked_before = {
        k: v.clone() for k, v in model.state_dict().items() if not v.is_floating_point()
    }

    randomise(model, 3)  # modify every float tensor
    assert not torch.equal(flat.pack(), saved)

    flat.unpack(saved)
    after = float_state(model)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    for k, v in model.state_dict().items():
        if not v.is_floating_point():
            assert torch.equal(v, tracked_before[k])
    assert torch.equal(flat.pack(), saved)


def test_unpack_into_another_model_makes_it_identical():
    source, target = backbone(0), backbone(1)
    randomise(source, 4)
    FlatState(target).unpack(FlatState(source).pack())
    src, dst = float_state(source), float_state(target)
    for k in src:
        assert torch.equal(src[k], dst[k]), k


def test_unpack_keep_batchnorm_leaves_bn_alone():
    model = backbone()
    randomise(model, 5)
    flat = FlatState(model)
    before = float_state(model)
    bn_names = set(bn_modules(model))
    assert bn_names

    flat.unpack(torch.zeros(flat.numel), keep_batchnorm=True)
    after = float_state(model)
    changed_conv = 0
    for name, value in after.items():
        owner = name.rsplit(".", 1)[0]
        if owner in bn_names:
            assert torch.equal(value, before[name]), name  # weight, bias, running stats kept
        else:
            assert torch.count_nonzero(value) == 0, name  # everything else overwritten
            changed_conv += isinstance(model.get_submodule(owner), nn.Conv2d)
    assert changed_conv > 0


def test_batchnorm_mask_marks_exactly_bn_entries():
    model = backbone()
    flat = FlatState(model)
    bn_names = set(bn_modules(model))
    expected = torch.zeros(flat.numel, dtype=torch.bool)
    n_bn = 0
    for e in flat.entries:
        is_bn = e.name.rsplit(".", 1)[0] in bn_names
        assert e.batchnorm == is_bn, e.name
        if is_bn:
            expected[e.offset : e.offset + e.numel] = True
            n_bn += e.numel
    bn_total = sum(
        t.numel()
        for m in bn_modules(model).values()
        for t in [*m.parameters(), *m.buffers()]
        if t.is_floating_point()
    )
    assert n_bn == bn_total
    assert torch.equal(flat.batchnorm_mask, expected)


def test_shared_part_drops_exactly_bn_entries():
    model = backbone()
    randomise(model, 6)
    flat = FlatState(model)
    vec = flat.pack()
    assert flat.shared_part(vec, local_batchnorm=False) is vec

    shared = flat.shared_part(vec, local_batchnorm=True)
    bn_names = set(bn_modules(model))
    expected = torch.cat(
        [
            vec[e.offset : e.offset + e.numel]
            for e in flat.entries
            if e.name.rsplit(".", 1)[0] not in bn_names
        ]
    )
    assert torch.equal(shared, expected)
    bn_count = sum(e.numel for e in flat.entries if e.name.rsplit(".", 1)[0] in bn_names)
    assert shared.numel() == flat.numel - bn_count > 0


@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_size_vectors_raise(delta):
    model = backbone()
    flat = FlatState(model)
    wrong = torch.zeros(flat.numel + delta)
    before = float_state(model)
    with pytest.raises(ValueError, match=str(flat.numel)):
        flat.unpack(wrong)
    with pytest.raises(ValueError, match=str(flat.numel)):
        flat.pack(wrong)
    after = float_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_checksum_equal_for_identical_vectors():
    a = FlatState(backbone(0)).pack()
    b = a.clone()
    assert isinstance(checksum(a), int)
    assert checksum(a) == checksum(b)
    # two independently built identical models agree too
    assert checksum(FlatState(backbone(7)).pack()) == checksum(FlatState(backbone(7)).pack())


def test_checksum_changes_after_one_ulp():
    a = FlatState(backbone(0)).pack()
    for index in (0, a.numel() // 2, a.numel() - 1):
        b = a.clone()
        b[index] = torch.nextafter(a[index], torch.tensor(float("inf")))
        assert not torch.equal(a, b)
        assert checksum(a) != checksum(b)


def test_checksum_of_different_models_differs():
    assert checksum(FlatState(backbone(0)).pack()) != checksum(FlatState(backbone(1)).pack())
