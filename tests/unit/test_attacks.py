"""Unit tests for colnet_mpi.attacks: label flip, boost, BN re-estimation, AT2FL, bad buffers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, chisquare
from torch import nn

from colnet_mpi.attacks import (
    at2fl_epoch,
    boost,
    clip_weights,
    corrupt_buffer,
    fgsm,
    flip_labels,
    label_flip_hook,
    manipulate,
    reestimate_batchnorm,
)
from colnet_mpi.comm.buffers import FlatState
from colnet_mpi.tasks import loss_function, train_epoch

CPU = torch.device("cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- label flip -------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_single_label_flip_rate_and_uniform_other_class(p: float) -> None:
    c, n = 10, 20000
    y = torch.randint(0, c, (n,), generator=_gen(0))
    yf, mask = flip_labels(y, "single_label", c, p, _gen(1))
    assert yf.dtype == y.dtype and yf.shape == y.shape
    k = int(mask.sum())
    assert binomtest(k, n, p).pvalue > 1e-3
    assert torch.equal(mask, yf != y)  # a flipped label never keeps its class
    # offsets (new - old) mod c are uniform over 1..c-1
    off = ((yf[mask] - y[mask]) % c).numpy()
    counts = np.bincount(off, minlength=c)
    assert counts[0] == 0
    assert chisquare(counts[1:]).pvalue > 1e-3


def test_single_label_flip_p1_p0() -> None:
    y = torch.arange(10).repeat(50)
    yf, mask = flip_labels(y, "single_label", 10, 1.0, _gen(3))
    assert bool(mask.all()) and bool((yf != y).all())
    y0, m0 = flip_labels(y, "single_label", 10, 0.0, _gen(3))
    assert torch.equal(y0, y) and not bool(m0.any())
    # two classes and p = 1: the flip is forced
    yb = torch.tensor([0, 1, 1, 0])
    assert flip_labels(yb, "single_label", 2, 1.0, _gen(0))[0].tolist() == [1, 0, 0, 1]


def test_multi_label_flip() -> None:
    y = (torch.rand(4000, 8, generator=_gen(0)) < 0.3).float()
    inv, mask = flip_labels(y, "multi_label", 8, 1.0, _gen(1))
    assert torch.equal(inv, 1 - y) and bool(mask.all())
    same, mask0 = flip_labels(y, "multi_label", 8, 0.0, _gen(1))
    assert torch.equal(same, y) and not bool(mask0.any())
    yf, mask = flip_labels(y, "multi_label", 8, 0.25, _gen(2))
    assert mask.shape == y.shape and torch.equal(mask, yf != y)
    assert binomtest(int(mask.sum()), y.numel(), 0.25).pvalue > 1e-3
    assert set(torch.unique(yf).tolist()) <= {0.0, 1.0}


def test_flip_is_deterministic_and_does_not_touch_input() -> None:
    y = torch.randint(0, 5, (100,), generator=_gen(0))
    before = y.clone()
    a = flip_labels(y, "single_label", 5, 0.5, _gen(7))
    b = flip_labels(y, "single_label", 5, 0.5, _gen(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(y, before)


def test_flip_rejects_landmarks_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="landmarks.*regression|supports the task kinds"):
        flip_labels(torch.zeros(3, 10), "landmarks", 10, 1.0)
    with pytest.raises(ValueError, match="p must"):
        flip_labels(torch.zeros(3, dtype=torch.long), "single_label", 4, 1.5)
    with pytest.raises(ValueError, match="num_classes"):
        flip_labels(torch.zeros(3, dtype=torch.long), "single_label", 1, 0.5)
    with pytest.raises(ValueError, match=r"lie in \[0, 4\)"):
        flip_labels(torch.tensor([0, 4]), "single_label", 4, 0.5)


def test_label_flip_hook_flips_targets_only() -> None:
    hook = label_flip_hook("multi_label", 3, 1.0, _gen(0))
    x, y = torch.randn(4, 2), torch.tensor([[0.0, 1.0, 1.0]] * 4)
    x2, y2 = hook(0, x, y)
    assert x2 is x and torch.equal(y2, 1 - y)


# -- boost and BN re-estimation ---------------------------------------------------------------


def test_boost_scales_delta_on_trainable_part_and_clamps() -> None:
    g = _gen(0)
    prev, new = torch.randn(30, generator=g), torch.randn(30, generator=g)
    out = boost(prev, new, 5.0, None, n_trainable=20)
    torch.testing.assert_close(out[:20] - prev[:20], 5.0 * (new[:20] - prev[:20]))
    assert torch.equal(out[20:], new[20:])
    full = boost(prev, new, 5.0, None)
    torch.testing.assert_close(full - prev, 5.0 * (new - prev))
    big = boost(prev, new, 5000.0, 1000.0, n_trainable=20)
    assert float(big[:20].abs().max()) == 1000.0
    assert torch.equal(big[20:], new[20:])
    expect = (prev[:20] + 5000.0 * (new[:20] - prev[:20])).clamp(-1000.0, 1000.0)
    torch.testing.assert_close(big[:20], expect)
    torch.testing.assert_close(boost(prev, new, 1.0, None), new)


def test_boost_rejects_mismatch() -> None:
    with pytest.raises(ValueError, match="must match"):
        boost(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="n_trainable"):
        boost(torch.zeros(3), torch.zeros(3), n_trainable=4)


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def test_reestimate_batchnorm_sets_batch_statistics() -> None:
    net = _bn_net()
    net.eval()
    bn = net[1]
    bn.momentum = 0.1
    xs = [torch.randn(32, 4, generator=_gen(i)) * (i + 1) + i for i in range(3)]
    used = reestimate_batchnorm(net, [(x, torch.zeros(32)) for x in xs])
    assert used == 3 and not net.training and bn.momentum == 0.1
    with torch.no_grad():
        h = [net[0](x) for x in xs]
    mean = torch.stack([t.mean(0) for t in h]).mean(0)
    var = torch.stack([t.var(0, unbiased=True) for t in h]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    # max_batches limits the pass: one batch gives exactly that batch's statistics
    assert reestimate_batchnorm(net, xs, max_batches=1) == 1
    torch.testing.assert_close(bn.running_mean, h[0].mean(0))
    torch.testing.assert_close(bn.running_var, h[0].var(0, unbiased=True))
    assert reestimate_batchnorm(nn.Linear(2, 2), xs) == 0


def test_boost_then_reestimate_round_trip_through_flatstate() -> None:
    net = _bn_net()
    flat = FlatState(net)
    prev = flat.pack().clone()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    net(torch.randn(16, 4))  # training-mode forward moves the running stats
    new = flat.pack().clone()
    up = boost(prev, new, 5.0, 1000.0, n_trainable=flat.n_trainable)
    flat.unpack(up)
    reestimate_batchnorm(net, [torch.randn(16, 4, generator=_gen(9))])
    out = flat.pack()
    p = flat.n_trainable
    torch.testing.assert_close(out[:p] - prev[:p], 5.0 * (new[:p] - prev[:p]))
    assert not torch.equal(out[p:], new[p:])  # statistics re-estimated for the boosted weights


# -- FGSM and AT2FL ---------------------------------------------------------------------------


def test_fgsm_matches_independent_gradient() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x = torch.randn(8, 5)
    y = torch.randint(0, 3, (8,))
    xr = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(model(xr), y).backward()
    assert xr.grad is not None
    expect = x + 0.03 * xr.grad.sign()
    model.zero_grad(set_to_none=True)
    got = fgsm(model, loss_function("single_label"), x, y, 0.03)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    assert not got.requires_grad
    assert all(p.grad is None for p in model.parameters())  # only d/dx was computed
    clamped = fgsm(model, loss_function("single_label"), x, y, 10.0, clamp=(-1.0, 1.0))
    assert float(clamped.abs().max()) <= 1.0
    assert torch.equal(fgsm(model, loss_function("single_label"), x, y, 0.0), x)


def _setup(seed: int = 0) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
    head = nn.Linear(8, 4)
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.1)
    return backbone, head, opt


def _loader(n: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = _gen(42)
    return [
        (torch.randn(10, 6, generator=g), torch.randint(0, 4, (10,), generator=g)) for _ in range(n)
    ]


def _record_inputs(backbone: nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    backbone.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize("n_batches", [0, 2, 5])
def test_at2fl_perturbs_only_first_n_batches(n_batches: int) -> None:
    loader = _loader()
    backbone, head, opt = _setup()
    seen = _record_inputs(backbone)
    at2fl_epoch(backbone, head, loader, "single_label", opt, CPU, epsilon=0.03, n_batches=n_batches)
    # each perturbed batch is seen twice (FGSM forward, then the training forward)
    stepped = [seen[2 * i + 1] if i < n_batches else seen[n_batches + i] for i in range(5)]
    assert len(seen) == 5 + n_batches
    for i, (x, _) in enumerate(loader):
        diff = (stepped[i] - x).abs()
        if i < n_batches:
            torch.testing.assert_close(diff, torch.full_like(x, 0.03))
        else:
            assert torch.equal(stepped[i], x)


def test_at2fl_equals_train_epoch_on_fgsm_batches() -> None:
    loader = _loader(4)
    b1, h1, o1 = _setup()
    b2, h2, o2 = _setup()
    loss_fn = loss_function("single_label")
    loss = at2fl_epoch(b1, h1, loader, "single_label", o1, CPU, epsilon=0.05, n_batches=2)
    # the same steps by hand: FGSM against the current model just before each of the first 2
    total = 0.0
    for i, (x, y) in enumerate(loader):
        xi = fgsm(lambda t: h2(b2(t)), loss_fn, x, y, 0.05) if i < 2 else x
        o2.zero_grad()
        step_loss = loss_fn(h2(b2(xi)), y)
        step_loss.backward()
        o2.step()
        total += float(step_loss.detach()) * 10
    assert loss == pytest.approx(total / 40, rel=1e-6)
    for p1, p2 in zip(
        [*b1.parameters(), *h1.parameters()], [*b2.parameters(), *h2.parameters()], strict=True
    ):
        torch.testing.assert_close(p1, p2)


def test_at2fl_adversarial_only_and_weight_clip() -> None:
    loader = _loader()
    backbone, head, opt = _setup()
    seen = _record_inputs(backbone)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(20.0)
    at2fl_epoch(
        backbone, head, loader, "single_label", opt, CPU,
        epsilon=0.03, n_batches=2, weight_clip=5.0, adversarial_only=True,
    )  # fmt: skip
    assert len(seen) == 4  # two batches, two forwards each
    assert (
        max(float(p.detach().abs().max()) for p in [*backbone.parameters(), *head.parameters()])
        <= 5.0
    )
    assert float(head.bias.detach().abs().max()) == 5.0


def test_train_epoch_without_hook_unchanged_and_hook_sees_indices() -> None:
    loader = _loader(3)
    b1, h1, o1 = _setup()
    b2, h2, o2 = _setup()
    calls: list[int] = []

    def hook(i: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(i)
        return x, y

    a = train_epoch(b1, h1, loader, "single_label", o1, CPU, grad_clip=None)
    b = train_epoch(b2, h2, loader, "single_label", o2, CPU, grad_clip=None, batch_hook=hook)
    assert a == b and calls == [0, 1, 2]


def test_clip_weights_rejects_bad_limit() -> None:
    with pytest.raises(ValueError):
        clip_weights([nn.Linear(2, 2)], 0.0)


# -- malicious leader and bad buffers ---------------------------------------------------------


def test_manipulate_scale_and_noise() -> None:
    u = torch.randn(1000, generator=_gen(0))
    assert torch.equal(manipulate(u, "scale", 2.0), u * 2.0)
    for rel in (0.01, 0.5, 3.0):
        v = manipulate(u, "noise", rel, _gen(1))
        assert float((v - u).norm() / u.norm()) == pytest.approx(rel, rel=1e-5)
    assert torch.equal(manipulate(u, "noise", 0.5, _gen(4)), manipulate(u, "noise", 0.5, _gen(4)))
    z = torch.zeros(5)
    assert torch.equal(manipulate(z, "noise", 1.0, _gen(0)), z)
    with pytest.raises(ValueError, match="mode"):
        manipulate(u, "flip", 1.0)


def test_corrupt_buffer_modes() -> None:
    v = torch.arange(20, dtype=torch.float32)
    nan = corrupt_buffer(v, "nan", _gen(0), count=3)
    assert int(torch.isnan(nan).sum()) == 3 and nan.shape == v.shape
    assert torch.equal(nan[~torch.isnan(nan)], v[~torch.isnan(nan)])
    inf = corrupt_buffer(v, "inf", _gen(0))
    assert int(torch.isinf(inf).sum()) == 1 and not bool(torch.isnan(inf).any())
    assert torch.equal(corrupt_buffer(v, "short"), v[:-1])
    long = corrupt_buffer(v, "long", count=2)
    assert long.numel() == 22 and torch.equal(long[:20], v) and bool((long[20:] == 0).all())
    assert torch.equal(v, torch.arange(20, dtype=torch.float32))  # input untouched
    with pytest.raises(ValueError, match="mode"):
        corrupt_buffer(v, "zero")
    with pytest.raises(ValueError, match="count"):
        corrupt_buffer(v, "nan", count=21)
    assert math.isnan(float(corrupt_buffer(torch.ones(1), "nan")[0]))
