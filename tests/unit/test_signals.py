import math

import pytest
import torch
from torch import nn

from colnet_mpi.algorithms.signals import loss_and_jacobian


def make_models(seed=0, channels=3, out=4):
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.Dropout(0.5)
    )
    head = nn.Sequential(nn.Flatten(), nn.Linear(channels * 5 * 5, out))
    return backbone, head


def make_batches(seed=1, sizes=(7, 3, 5), out=4):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 1, 5, 5, generator=g), torch.randint(0, out, (n,), generator=g))
        for n in sizes
    ]


def test_linear_head_exact_jacobian_is_weight_norm():
    backbone, head = make_models()
    batches = make_batches()
    _, jac = loss_and_jacobian(backbone, head, batches, nn.functional.cross_entropy)
    w_norm = float(head[1].weight.detach().norm())
    assert jac == pytest.approx(w_norm, rel=1e-6)


def test_linear_head_hutchinson_close_to_weight_norm():
    backbone, head = make_models(out=6)
    batches = make_batches(sizes=(20,), out=6)
    gen = torch.Generator().manual_seed(123)
    _, jac = loss_and_jacobian(
        backbone,
        head,
        batches,
        nn.functional.cross_entropy,
        estimator="hutchinson",
        probes=50,
        generator=gen,
    )
    assert jac == pytest.approx(float(head[1].weight.detach().norm()), rel=0.1)


def test_nonlinear_head_exact_matches_functorch_jacobian():
    torch.manual_seed(4)
    backbone = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2))
    head = nn.Sequential(nn.Flatten(), nn.Linear(50, 8), nn.Tanh(), nn.Linear(8, 3))
    batches = make_batches(sizes=(4, 2), out=3)
    _, jac = loss_and_jacobian(backbone, head, batches, nn.functional.cross_entropy)
    backbone.eval()
    head.eval()
    norms = []
    with torch.no_grad():
        for x, _ in batches:
            z = backbone(x)
            for n in range(z.shape[0]):
                j = torch.autograd.functional.jacobian(lambda zz: head(zz[None])[0], z[n])
                norms.append(float(j.norm()))
    assert jac == pytest.approx(sum(norms) / len(norms), rel=1e-6)


def test_loss_is_sample_weighted_mean_of_loss_fn():
    backbone, head = make_models()
    batches = make_batches(sizes=(7, 3, 5))
    loss, _ = loss_and_jacobian(backbone, head, batches, nn.functional.cross_entropy)
    backbone.eval()
    head.eval()
    with torch.no_grad():
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        expected = float(nn.functional.cross_entropy(head(backbone(x)), y, reduction="mean"))
    assert loss == pytest.approx(expected, rel=1e-6)


def test_modes_restored_and_no_grad_left():
    backbone, head = make_models()
    backbone.train()
    head.eval()
    backbone[1].eval()  # a submodule in a different mode than its parent
    loss_and_jacobian(backbone, head, make_batches(), nn.functional.cross_entropy)
    assert backbone.training and not head.training and not backbone[1].training
    assert backbone[0].training and backbone[3].training
    for p in list(backbone.parameters()) + list(head.parameters()):
        assert p.grad is None


def test_eval_mode_used_during_call():
    backbone, head = make_models()
    backbone.train()
    head.train()
    batches = make_batches()
    first = loss_and_jacobian(backbone, head, batches, nn.functional.cross_entropy)
    second = loss_and_jacobian(backbone, head, batches, nn.functional.cross_entropy)
    # dropout and batch statistics would make repeated calls differ in train mode
    assert first == second
    # BatchNorm running statistics were not updated by the call
    assert torch.equal(backbone[1].running_mean, torch.zeros(3))


def test_works_under_outer_no_grad():
    backbone, head = make_models()
    with torch.no_grad():
        _, jac = loss_and_jacobian(backbone, head, make_batches(), nn.functional.cross_entropy)
    assert jac == pytest.approx(float(head[1].weight.detach().norm()), rel=1e-6)


def test_hutchinson_reproducible_with_generator():
    backbone, head = make_models()
    batches = make_batches()

    def run(seed):
        return loss_and_jacobian(
            backbone,
            head,
            batches,
            nn.functional.cross_entropy,
            estimator="hutchinson",
            probes=3,
            generator=torch.Generator().manual_seed(seed),
        )

    assert run(5) == run(5)
    assert run(5)[1] != run(6)[1]
    assert math.isfinite(run(5)[1])


def test_bad_arguments_raise():
    backbone, head = make_models()
    batches = make_batches()
    with pytest.raises(ValueError, match="estimator"):
        loss_and_jacobian(backbone, head, batches, nn.functional.cross_entropy, estimator="fast")
    with pytest.raises(ValueError, match="probes"):
        loss_and_jacobian(
            backbone, head, batches, nn.functional.cross_entropy, estimator="hutchinson", probes=0
        )
    with pytest.raises(ValueError, match="at least one sample"):
        loss_and_jacobian(backbone, head, [], nn.functional.cross_entropy)
