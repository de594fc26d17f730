"""Unit tests for colnet_mpi.tasks: losses, metrics vs scikit-learn, loops, optimizer factory."""

from __future__ import annotations

import copy
import math
import platform
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support
from torch import nn

from colnet_mpi.models import build_backbone, build_head
from colnet_mpi.tasks import (
    METRIC_NAMES,
    TASK_KINDS,
    MetricAccumulator,
    evaluate,
    loss_function,
    make_optimizer,
    make_scheduler,
    train_epoch,
)
from tests.conftest import run_python

CPU = torch.device("cpu")


def _sk_scores(y_true: np.ndarray, y_pred: np.ndarray, labels: list[int] | None) -> dict:
    out = {}
    for avg in ("micro", "macro"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=avg, zero_division=0
        )
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = p, r, f
    return out


Batch = tuple[torch.Tensor, torch.Tensor]


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[Batch]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


# ---------------------------------------------------------------- losses


def test_loss_functions_against_numpy() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 4))
    labels = rng.integers(0, 4, size=7)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    ce = -log_softmax[np.arange(7), labels].mean()
    got = loss_function("single_label")(torch.tensor(logits), torch.tensor(labels))
    assert math.isclose(float(got), ce, rel_tol=1e-9)

    bits = rng.integers(0, 2, size=(7, 4)).astype(float)
    prob = 1 / (1 + np.exp(-logits))
    bce = -(bits * np.log(prob) + (1 - bits) * np.log(1 - prob)).mean()
    got = loss_function("multi_label")(torch.tensor(logits), torch.tensor(bits))
    assert math.isclose(float(got), bce, rel_tol=1e-9)

    pts = rng.normal(size=(7, 4))
    got = loss_function("landmarks")(torch.tensor(logits), torch.tensor(pts))
    assert math.isclose(float(got), ((logits - pts) ** 2).mean(), rel_tol=1e-9)


@pytest.mark.parametrize("kind", ["", "regression", "single-label", None])
def test_unknown_kind(kind: object) -> None:
    with pytest.raises(ValueError, match="kind"):
        loss_function(kind)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        MetricAccumulator(kind, 3)  # type: ignore[arg-type]


# ---------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_label_metrics_match_sklearn(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n, c = 97, 6
    # Classes 4 and 5 never occur as targets; skewed logits make some classes never predicted.
    targets = torch.randint(0, 4, (n,), generator=gen)
    outputs = torch.randn(n, c, generator=gen)
    outputs[:, 3] -= 5.0
    acc = MetricAccumulator("single_label", c)
    for x, y in _batches(outputs, targets, 13):
        acc.update(x, y)
    res = acc.result()
    assert tuple(res) == METRIC_NAMES
    expected = _sk_scores(targets.numpy(), outputs.argmax(1).numpy(), labels=list(range(c)))
    for key, value in expected.items():
        assert math.isclose(res[key], value, rel_tol=1e-12, abs_tol=1e-12), key
    ce = nn.functional.cross_entropy(outputs.double(), targets).item()
    assert math.isclose(res["loss"], ce, rel_tol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_label_metrics_match_sklearn(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n, labels = 64, 5
    targets = (torch.rand(n, labels, generator=gen) < 0.3).float()
    targets[:, 4] = 0.0  # a label that is never true
    outputs = torch.randn(n, labels, generator=gen)
    outputs[:, 2] = -3.0  # a label that is never predicted
    acc = MetricAccumulator("multi_label", labels)
    for x, y in _batches(outputs, targets, 10):
        acc.update(x, y)
    res = acc.result()
    pred = (1 / (1 + np.exp(-outputs.numpy())) >= 0.5).astype(int)
    expected = _sk_scores(targets.numpy().astype(int), pred, labels=None)
    for key, value in expected.items():
        assert math.isclose(res[key], value, rel_tol=1e-12, abs_tol=1e-12), key
    x, y = outputs.double().numpy(), targets.double().numpy()
    prob = 1 / (1 + np.exp(-x))
    bce = -(y * np.log(prob) + (1 - y) * np.log(1 - prob)).mean()
    assert math.isclose(res["loss"], bce, rel_tol=1e-5)


def test_single_label_perfect_and_hand_counted() -> None:
    acc = MetricAccumulator("single_label", 3)
    targets = torch.tensor([0, 1, 2, 2])
    acc.update(nn.functional.one_hot(targets, 3).float() * 10, targets)
    res = acc.result()
    for key in METRIC_NAMES[1:]:
        assert res[key] == 1.0
    # Hand-counted: predictions [0, 0, 2, 1] vs targets [0, 1, 2, 2].
    acc = MetricAccumulator("single_label", 3)
    acc.update(nn.functional.one_hot(torch.tensor([0, 0, 2, 1]), 3).float(), targets)
    res = acc.result()
    assert res["precision_micro"] == pytest.approx(0.5)
    # per class P: 1/2, 0, 1  R: 1, 0, 1/2  F1: 2/3, 0, 2/3
    assert res["precision_macro"] == pytest.approx(0.5)
    assert res["recall_macro"] == pytest.approx(0.5)
    assert res["f1_macro"] == pytest.approx(4 / 9)


def test_landmarks_metrics() -> None:
    rng = np.random.default_rng(3)
    out, tgt = rng.normal(size=(23, 10)) * 5, rng.normal(size=(23, 10)) * 5
    acc = MetricAccumulator("landmarks", 10)
    for x, y in _batches(
        torch.tensor(out, dtype=torch.float32), torch.tensor(tgt, dtype=torch.float32), 8
    ):
        acc.update(x, y)
    res = acc.result()
    assert math.isclose(res["loss"], float(((out - tgt) ** 2).mean()), rel_tol=1e-5)
    for key in METRIC_NAMES[1:]:
        assert math.isnan(res[key]), key


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_empty_accumulator_is_nan(kind: str) -> None:
    res = MetricAccumulator(kind, 10).result()
    assert set(res) == set(METRIC_NAMES)
    assert all(math.isnan(v) for v in res.values())


def test_accumulator_rejects_bad_input() -> None:
    acc = MetricAccumulator("single_label", 3)
    with pytest.raises(ValueError, match="outputs"):
        acc.update(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        acc.update(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="targets"):
        acc.update(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="targets"):
        MetricAccumulator("landmarks", 10).update(torch.zeros(2, 10), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="num_outputs"):
        MetricAccumulator("multi_label", 0)


# ---------------------------------------------------------------- loops


class _ModeRecorder(nn.Module):
    """Identity that records the module's training flag at every call."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return x


def test_evaluate_uses_eval_mode_and_restores() -> None:
    torch.manual_seed(0)
    rec_b, rec_h = _ModeRecorder(), _ModeRecorder()
    backbone = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), rec_b)
    head = nn.Sequential(rec_h, nn.Linear(6, 3))
    backbone.train()
    head.eval()
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    res = evaluate(backbone, head, _batches(x, y, 6), "single_label", 3, CPU)
    assert rec_b.modes and not any(rec_b.modes) and not any(rec_h.modes)
    assert backbone.training and not head.training
    assert rec_b.training and not rec_h.training
    with torch.no_grad():
        backbone.eval()
        logits = head(backbone(x))
    expected = nn.functional.cross_entropy(logits, y).item()
    assert math.isclose(res["loss"], expected, rel_tol=1e-5)
    assert math.isclose(res["precision_micro"], (logits.argmax(1) == y).float().mean().item())


def test_evaluate_restores_mode_on_error() -> None:
    backbone, head = nn.Linear(4, 3), nn.Linear(3, 3)
    backbone.train()
    head.train()
    bad = [(torch.randn(2, 4), torch.randn(2, 3))]  # float 2-D targets for single_label
    with pytest.raises(ValueError):
        evaluate(backbone, head, bad, "single_label", 3, CPU)
    assert backbone.training and head.training


def _blobs(seed: int, n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    centers = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
    return centers[y] + 0.5 * torch.randn(n, 4, generator=gen), y


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_train_epoch_lowers_loss(kind: str) -> None:
    torch.manual_seed(0)
    x, labels = _blobs(0)
    if kind == "single_label":
        y, outputs = labels, 3
    elif kind == "multi_label":
        y, outputs = nn.functional.one_hot(labels, 3).float(), 3
    else:
        y, outputs = torch.cat([x, -x, x[:, :2]], dim=1) * 3, 10
    backbone = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
    head = nn.Linear(16, outputs)
    opt = make_optimizer("adam", [*backbone.parameters(), *head.parameters()], lr=1e-2)
    loader = _batches(x, y, 16)
    before = evaluate(backbone, head, loader, kind, outputs, CPU)["loss"]
    losses = [train_epoch(backbone, head, loader, kind, opt, CPU, grad_clip=1.0) for _ in range(8)]
    after = evaluate(backbone, head, loader, kind, outputs, CPU)["loss"]
    assert losses[-1] < 0.7 * losses[0]
    assert after < 0.7 * before
    assert backbone.training and head.training


def test_train_epoch_returns_sample_weighted_mean() -> None:
    torch.manual_seed(0)
    x, y = _blobs(1, n=10)
    backbone, head = nn.Identity(), nn.Linear(4, 3)
    # lr is tiny but > 0 so parameters barely move; compare to per-batch losses before training.
    opt = make_optimizer("sgd", head.parameters(), lr=1e-12)
    loader = _batches(x, y, 4)  # batches of 4, 4, 2
    with torch.no_grad():
        per_batch = [nn.functional.cross_entropy(head(bx), by).item() for bx, by in loader]
    expected = (4 * per_batch[0] + 4 * per_batch[1] + 2 * per_batch[2]) / 10
    got = train_epoch(backbone, head, loader, "single_label", opt, CPU, grad_clip=None)
    assert math.isclose(got, expected, rel_tol=1e-5)
    assert math.isnan(train_epoch(backbone, head, [], "single_label", opt, CPU, grad_clip=None))


def test_train_epoch_clips_gradient_norm() -> None:
    torch.manual_seed(0)
    x, y = _blobs(2, n=16)
    backbone = nn.Linear(4, 8)
    head = nn.Linear(8, 3)
    params = [*backbone.parameters(), *head.parameters()]
    start = torch.cat([p.detach().flatten().clone() for p in params])
    lr, clip = 1.0, 1e-3
    opt = make_optimizer("sgd", params, lr=lr)
    train_epoch(backbone, head, [(x, y)], "single_label", opt, CPU, grad_clip=clip)
    moved = torch.cat([p.detach().flatten() for p in params]) - start
    # One plain SGD step with a clipped gradient moves parameters by at most lr * clip.
    assert moved.norm().item() <= lr * clip * (1 + 1e-4)
    assert moved.norm().item() > 0.5 * lr * clip  # the raw gradient norm is far above clip


@pytest.mark.parametrize("clip", [0.0, -1.0, float("nan"), float("inf")])
def test_train_epoch_bad_clip(clip: float) -> None:
    opt = make_optimizer("sgd", nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="grad_clip"):
        train_epoch(nn.Identity(), nn.Linear(2, 2), [], "single_label", opt, CPU, grad_clip=clip)


def test_train_epoch_with_resnet_split() -> None:
    torch.manual_seed(0)
    backbone = build_backbone(width=4, stem="cifar", in_channels=1, privatization=1)
    head = build_head(width=4, privatization=1, num_outputs=2)
    # Class = whether the image's left half is brighter than its right half.
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 8, 8, generator=gen)
    y = (x[..., :4].mean(dim=(1, 2, 3)) > x[..., 4:].mean(dim=(1, 2, 3))).long()
    x[..., :4] += y.view(-1, 1, 1, 1).float() * 0.5
    loader = _batches(x, y, 8)
    opt = make_optimizer(
        "adamw", [*backbone.parameters(), *head.parameters()], lr=1e-2, weight_decay=1e-4
    )
    losses = [
        train_epoch(backbone, head, loader, "single_label", opt, CPU, grad_clip=1.0)
        for _ in range(6)
    ]
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- optimizers and schedulers


def test_make_optimizer_types_and_settings() -> None:
    layer = nn.Linear(3, 2)
    sgd = make_optimizer("sgd", layer.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.9, 1e-3)
    adam = make_optimizer("adam", layer.parameters(), lr=5e-4)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["weight_decay"] == 0.0
    adamw = make_optimizer("adamw", layer.parameters(), lr=5e-5, weight_decay=5e-3)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["lr"] == 5e-5 and adamw.param_groups[0]["weight_decay"] == 5e-3
    assert len(adamw.param_groups[0]["params"]) == 2


@pytest.mark.parametrize(
    ("name", "plain"),
    [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)],
)
def test_optimizers_step_bit_identically_to_torchs_own(name: str, plain: type) -> None:
    """Ours skip torch's compiler wrappers: same parameters, states and state dicts, bit for bit,
    through steps, a learning-rate schedule and a state-dict round trip."""
    torch.manual_seed(0)
    ours_model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    theirs_model = copy.deepcopy(ours_model)
    settings = {"lr": 0.05, "weight_decay": 1e-3}
    ours = make_optimizer(name, ours_model.parameters(), momentum=0.9, **settings)
    if name == "sgd":
        settings["momentum"] = 0.9
    theirs = plain(theirs_model.parameters(), **settings)
    schedules = [make_scheduler(ours, 0.9), make_scheduler(theirs, 0.9)]
    for step in range(5):
        x = torch.randn(8, 6)
        for model, opt, sched in zip(
            (ours_model, theirs_model), (ours, theirs), schedules, strict=True
        ):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
            sched.step()
        if step == 2:  # a checkpoint round trip in the middle
            ours.load_state_dict(copy.deepcopy(ours.state_dict()))
    for a, b in zip(ours_model.parameters(), theirs_model.parameters(), strict=True):
        assert torch.equal(a, b)
    mine, yours = ours.state_dict(), theirs.state_dict()
    assert mine["param_groups"] == yours["param_groups"]
    for key in yours["state"]:
        for field, value in yours["state"][key].items():
            assert torch.equal(mine["state"][key][field], value), (key, field)


def test_optimizers_never_load_the_compiler() -> None:
    code = (
        "import sys, torch\n"
        "from colnet_mpi.tasks import make_optimizer, make_scheduler\n"
        "m = torch.nn.Linear(3, 2)\n"
        "for name in ('sgd', 'adam', 'adamw'):\n"
        "    opt = make_optimizer(name, m.parameters(), lr=0.1)\n"
        "    sched = make_scheduler(opt, 0.9)\n"
        "    opt.zero_grad(); m(torch.ones(1, 3)).sum().backward(); opt.step(); sched.step()\n"
        "    opt.load_state_dict(opt.state_dict())\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    run_python(code)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "rmsprop", "lr": 0.1}, "optimizer name"),
        ({"name": "SGD", "lr": 0.1}, "optimizer name"),
        ({"name": "sgd", "lr": 0.0}, "lr"),
        ({"name": "sgd", "lr": float("nan")}, "lr"),
        ({"name": "sgd", "lr": 0.1, "momentum": 1.0}, "momentum"),
        ({"name": "sgd", "lr": 0.1, "momentum": -0.1}, "momentum"),
        ({"name": "adamw", "lr": 0.1, "weight_decay": -1e-3}, "weight_decay"),
    ],
)
def test_make_optimizer_errors(kwargs: dict, match: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        make_optimizer(name, nn.Linear(2, 2).parameters(), **kwargs)


def test_make_scheduler_decays_per_step() -> None:
    opt = make_optimizer("adam", nn.Linear(2, 2).parameters(), lr=0.1)
    sched = make_scheduler(opt, 0.9)
    assert isinstance(sched, torch.optim.lr_scheduler.ExponentialLR)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9**3)


@pytest.mark.parametrize("decay", [0.0, -0.5, 1.5, float("nan")])
def test_make_scheduler_errors(decay: float) -> None:
    opt = make_optimizer("sgd", nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="lr_decay"):
        make_scheduler(opt, decay)


def test_deterministic_mode_without_the_compiler() -> None:
    code = (
        "import sys, torch\n"
        "from colnet_mpi.cli import use_deterministic_algorithms\n"
        "use_deterministic_algorithms()\n"
        "assert torch.are_deterministic_algorithms_enabled()\n"
        "assert torch.is_deterministic_algorithms_warn_only_enabled()\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    run_python(code)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="malloc_trim is glibc's; elsewhere return_free_memory is a documented no-op",
)
def test_return_free_memory_gives_freed_heap_pages_back() -> None:
    code = (
        "import torch\n"
        "from colnet_mpi.bench import memory_now\n"
        "from colnet_mpi.node import return_free_memory\n"
        "big = torch.ones(20_000_000 // 4); del big  # glibc now serves 8 MB blocks from the heap\n"
        "chunks = [torch.ones(8_000_000 // 4) for _ in range(40)]\n"
        "keep = chunks[1::2]  # every other block stays: the freed ones are holes in the heap\n"
        "del chunks\n"
        "held = memory_now()[1]\n"
        "return_free_memory()\n"
        "print(held - memory_now()[1])\n"
    )
    assert float(run_python(code).stdout) > 120e6  # 20 holes of 8 MB back to the system


_FREED_STEP = (
    "import torch\n"
    "from colnet_mpi.bench import memory_now\n"
    "from colnet_mpi.node import keep_heap_between_steps\n"
    "applied = keep_heap_between_steps() if MODE == 'keep' else None\n"
    "blocks = [torch.ones(n * 1_000_000 // 4) for n in (16, 8, 4, 2) * 8]  # a step's activations\n"
    "held = memory_now()[1]\n"
    "del blocks  # the end of its backward pass\n"
    "print(applied, held - memory_now()[1])\n"
)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt's thresholds are glibc's; elsewhere keep_heap_between_steps does nothing",
)
def test_kept_heap_holds_a_steps_freed_blocks_for_the_next_one() -> None:
    default = run_python("MODE = 'system'\n" + _FREED_STEP).stdout.split()
    kept = run_python("MODE = 'keep'\n" + _FREED_STEP).stdout.split()
    # 240 MB freed: by default glibc hands it back to the system (the next step faults it in
    # again, page by page); kept, it stays with the process
    assert float(default[1]) > 200e6
    assert kept[0] == "True"
    assert float(kept[1]) < 20e6


def test_kept_heap_leaves_a_users_malloc_settings_alone(monkeypatch) -> None:
    from colnet_mpi.node import keep_heap_between_steps

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert keep_heap_between_steps() is False


@pytest.mark.parametrize(
    ("active", "stage", "trims"),
    [
        (True, "intra", 1),  # every rank of the host is awake: freed pages go back at once
        (True, "exchange", 1),
        (True, "local_train", 1),  # before waiting for the turn
        (False, "intra", 0),  # one rank per slot anyway: no turns, no extra trims
        (None, "intra", 0),  # host_slots = 0
    ],
)
def test_turns_hand_the_heap_back_around_the_stages(monkeypatch, active, stage, trims) -> None:
    from contextlib import contextmanager
    from types import SimpleNamespace

    from colnet_mpi.federation import loop

    calls: list[int] = []
    monkeypatch.setattr(loop, "return_free_memory", lambda: calls.append(1))

    @contextmanager
    def turn(what):
        yield

    turns = None if active is None else SimpleNamespace(active=active, turn=turn)
    fed = SimpleNamespace(turns=turns, node=SimpleNamespace(device=torch.device("cpu")))
    with loop.Federation._turn(fed, stage):
        assert calls == ([1] if stage == "local_train" and active else [])
    assert len(calls) == trims
