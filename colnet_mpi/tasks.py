"""Per-task losses, metrics, training/evaluation loops and optimizer factories (pure torch)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import Parameter

from colnet_mpi.metrics.names import METRIC_NAMES

__all__ = [
    "METRIC_NAMES",
    "OPTIMIZER_NAMES",
    "TASK_KINDS",
    "BatchHook",
    "MetricAccumulator",
    "evaluate",
    "loss_function",
    "make_optimizer",
    "make_scheduler",
    "train_epoch",
]

#: Kinds of task a node can learn.
TASK_KINDS: tuple[str, ...] = ("single_label", "multi_label", "landmarks")

# METRIC_NAMES: keys of the dict returned by MetricAccumulator.result and evaluate.

#: Names accepted by :func:`make_optimizer`.
OPTIMIZER_NAMES: tuple[str, ...] = ("sgd", "adam", "adamw")

LossFn = Callable[[Tensor, Tensor], Tensor]

#: ``batch_hook(index, x, y) -> (x, y)`` of :func:`train_epoch`: replaces a batch before its step.
BatchHook = Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]]


def _check_kind(kind: Any) -> str:
    """Return ``kind`` if it is one of :data:`TASK_KINDS`, else raise ValueError."""
    if kind not in TASK_KINDS:
        raise ValueError(f"task kind must be one of {TASK_KINDS}, got {kind!r}")
    return str(kind)


def _cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits [n, C] against class indices [n]."""
    return F.cross_entropy(outputs, targets.long())


def _bce_with_logits(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy of logits [n, L] against 0/1 targets [n, L]."""
    return F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype))


def _mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error over all elements of [n, D] outputs and targets."""
    return F.mse_loss(outputs, targets.to(outputs.dtype))


_LOSSES: dict[str, LossFn] = {
    "single_label": _cross_entropy,
    "multi_label": _bce_with_logits,
    "landmarks": _mse,
}


def loss_function(kind: str) -> LossFn:
    """Return the mean loss for a task kind.

    ``single_label``: cross-entropy (int64 class targets); ``multi_label``: BCE with logits
    (0/1 targets); ``landmarks``: MSE over all coordinates (float targets [n, 10]).

    Raises:
        ValueError: if ``kind`` is not in :data:`TASK_KINDS`.
    """
    return _LOSSES[_check_kind(kind)]


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """Elementwise ``num / den`` in float64, with 0 where ``den`` is 0."""
    num = num.to(torch.float64)
    den = den.to(torch.float64)
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


class MetricAccumulator:
    """Accumulates loss and per-class TP/FP/FN counts over batches; result() gives the metrics.

    Predictions: argmax for ``single_label``; ``sigmoid >= 0.5`` per label for ``multi_label``.
    Micro scores pool the counts of all classes (labels); macro scores average per-class scores
    with equal weight, counting an undefined score (zero denominator) as 0, like scikit-learn's
    ``zero_division=0``. For ``landmarks`` only the loss is defined; the others are NaN.
    """

    def __init__(self, kind: str, num_outputs: int) -> None:
        self.kind = _check_kind(kind)
        if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
            raise ValueError(f"num_outputs must be an integer >= 1, got {num_outputs!r}")
        self.num_outputs = num_outputs
        self._loss_fn = loss_function(kind)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.num_samples = 0
        self.loss_sum = 0.0
        self.tp = torch.zeros(self.num_outputs, dtype=torch.int64)
        self.fp = torch.zeros(self.num_outputs, dtype=torch.int64)
        self.fn = torch.zeros(self.num_outputs, dtype=torch.int64)

    def _check_shapes(self, outputs: Tensor, targets: Tensor) -> None:
        """Raise ValueError if outputs/targets do not fit this task."""
        n = outputs.shape[0] if outputs.dim() > 0 else -1
        if outputs.dim() != 2 or outputs.shape[1] != self.num_outputs:
            raise ValueError(
                f"outputs must have shape [n, {self.num_outputs}], got {tuple(outputs.shape)}"
            )
        if self.kind == "single_label":
            if tuple(targets.shape) != (n,):
                raise ValueError(
                    f"single_label targets must have shape [{n}], got {tuple(targets.shape)}"
                )
        elif tuple(targets.shape) != tuple(outputs.shape):
            raise ValueError(
                f"{self.kind} targets must have shape {tuple(outputs.shape)}, "
                f"got {tuple(targets.shape)}"
            )

    @torch.no_grad()
    def update(self, outputs: Tensor, targets: Tensor) -> None:
        """Add one batch: model outputs [n, num_outputs] and its targets."""
        self._check_shapes(outputs, targets)
        n = int(outputs.shape[0])
        if n == 0:
            return
        outputs = outputs.detach()
        if self.kind == "single_label":
            labels = targets.long()
            if bool(((labels < 0) | (labels >= self.num_outputs)).any()):
                raise ValueError(
                    f"single_label targets must lie in [0, {self.num_outputs}), got values in "
                    f"[{int(labels.min())}, {int(labels.max())}]"
                )
        self.loss_sum += float(self._loss_fn(outputs, targets)) * n
        self.num_samples += n
        if self.kind == "single_label":
            pred = outputs.argmax(dim=1)
            hits = labels[pred == labels]
            tp = torch.bincount(hits, minlength=self.num_outputs)
            fp = torch.bincount(pred, minlength=self.num_outputs) - tp
            fn = torch.bincount(labels, minlength=self.num_outputs) - tp
        elif self.kind == "multi_label":
            pred = torch.sigmoid(outputs) >= 0.5
            truth = targets > 0.5
            tp = (pred & truth).sum(dim=0)
            fp = (pred & ~truth).sum(dim=0)
            fn = (~pred & truth).sum(dim=0)
        else:
            return
        self.tp += tp.cpu()
        self.fp += fp.cpu()
        self.fn += fn.cpu()

    def result(self) -> dict[str, float]:
        """Return the metrics (keys :data:`METRIC_NAMES`); all NaN if nothing was accumulated."""
        nan = float("nan")
        out = dict.fromkeys(METRIC_NAMES, nan)
        if self.num_samples == 0:
            return out
        out["loss"] = self.loss_sum / self.num_samples
        if self.kind == "landmarks":
            return out
        tp, fp, fn = self.tp, self.fp, self.fn
        stp, sfp, sfn = tp.sum(), fp.sum(), fn.sum()
        out["precision_micro"] = float(_ratio(stp, stp + sfp))
        out["recall_micro"] = float(_ratio(stp, stp + sfn))
        out["f1_micro"] = float(_ratio(2 * stp, 2 * stp + sfp + sfn))
        out["precision_macro"] = float(_ratio(tp, tp + fp).mean())
        out["recall_macro"] = float(_ratio(tp, tp + fn).mean())
        out["f1_macro"] = float(_ratio(2 * tp, 2 * tp + fp + fn).mean())
        return out


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    """Move a batch tensor to ``device`` (asynchronously where the source is pinned)."""
    return x.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(
    backbone: nn.Module,
    head: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    kind: str,
    num_outputs: int,
    device: torch.device,
) -> dict[str, float]:
    """Evaluate ``head(backbone(x))`` over ``loader`` and return the metrics of METRIC_NAMES.

    Both modules run in eval mode; their previous train/eval modes are restored afterwards.
    """
    acc = MetricAccumulator(kind, num_outputs)
    was_training = (backbone.training, head.training)
    backbone.eval()
    head.eval()
    try:
        for x, y in loader:
            x, y = _to_device(x, device), _to_device(y, device)
            acc.update(head(backbone(x)), y)
    finally:
        backbone.train(was_training[0])
        head.train(was_training[1])
    return acc.result()


def train_epoch(
    backbone: nn.Module,
    head: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    kind: str,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    grad_clip: float | None,
    batch_hook: BatchHook | None = None,
    head_only: bool = False,
    between_steps: Callable[[], object] | None = None,
    stop: Callable[[], bool] | None = None,
) -> float:
    """Train ``head(backbone(x))`` for one pass over ``loader``; return the mean loss per sample.

    Both modules are put in train mode (and left there; the backbone in eval mode with
    ``head_only``). If ``grad_clip`` is given, the gradient norm over all trained parameters is
    clipped to it before every step. Returns NaN for an empty loader. ``batch_hook`` (used by
    the attacks) is called as ``hook(i, x, y)`` with the 0-based batch index and the batch
    already on ``device``, before the gradients are zeroed; the step is taken on the ``(x, y)``
    it returns.

    ``head_only``: the backbone is frozen instead: it runs in eval mode without gradients (its
    weights and BatchNorm statistics stay as they are, bit for bit) and only the head learns;
    the optimizer skips parameters without a gradient. ``between_steps()`` is called after
    every step (asynchronous mode serves its mailbox there). ``stop()``, asked after every step
    (after ``between_steps``): True ends the pass there (the mean is over the steps taken).

    Raises:
        ValueError: on an unknown kind or a ``grad_clip`` that is not a finite number > 0.
    """
    loss_fn = loss_function(kind)
    if grad_clip is not None and not (
        isinstance(grad_clip, (int, float)) and math.isfinite(grad_clip) and grad_clip > 0
    ):
        raise ValueError(f"grad_clip must be None or a finite number > 0, got {grad_clip!r}")
    trained = head.parameters() if head_only else chain(backbone.parameters(), head.parameters())
    params = [p for p in trained if p.requires_grad]
    backbone.train(not head_only)
    head.train()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for i, (x, y) in enumerate(loader):
        x, y = _to_device(x, device), _to_device(y, device)
        if batch_hook is not None:
            x, y = batch_hook(i, x, y)
        optimizer.zero_grad(set_to_none=True)
        if head_only:
            with torch.no_grad():
                z = backbone(x)
            loss = loss_fn(head(z), y)
        else:
            loss = loss_fn(head(backbone(x)), y)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if between_steps is not None:
            between_steps()
        n = int(x.shape[0])
        total += loss.detach().to(torch.float64) * n
        count += n
        if stop is not None and stop():
            break
    if count == 0:
        return float("nan")
    return float(total) / count


class _EagerOptimizer:
    """Mixin: a torch optimizer's own methods without the wrappers it carries for ``torch.compile``.

    torch wraps ``step``, ``zero_grad``, ``add_param_group``, ``state_dict`` and
    ``load_state_dict`` so that its compiler skips them; the first call of any of them imports
    ``torch._dynamo`` (and sympy with it): about 80 MB more per process and 1.2 s, on every rank,
    for a package that never compiles. These overrides call the wrapped functions directly (found
    with ``inspect.unwrap``), so the arithmetic and the state dicts are torch's own, bit for bit;
    ``step`` runs under ``no_grad`` as the wrapper does for a non-differentiable optimizer. Mixed
    in before the torch class: ``class EagerSGD(_EagerOptimizer, torch.optim.SGD)``.
    """

    _torch_class: type[torch.optim.Optimizer]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        inspect.unwrap(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        inspect.unwrap(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return inspect.unwrap(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inspect.unwrap(torch.optim.Optimizer.load_state_dict)(self, state_dict)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        with torch.no_grad():
            return inspect.unwrap(self._torch_class.step)(self, closure)


class EagerSGD(_EagerOptimizer, torch.optim.SGD):  # type: ignore[misc]  # step's overloads
    """``torch.optim.SGD`` without the compiler wrappers (see :class:`_EagerOptimizer`)."""

    _torch_class = torch.optim.SGD


class EagerAdam(_EagerOptimizer, torch.optim.Adam):  # type: ignore[misc]  # step's overloads
    """``torch.optim.Adam`` without the compiler wrappers (see :class:`_EagerOptimizer`)."""

    _torch_class = torch.optim.Adam


class EagerAdamW(_EagerOptimizer, torch.optim.AdamW):  # type: ignore[misc]  # step's overloads
    """``torch.optim.AdamW`` without the compiler wrappers (see :class:`_EagerOptimizer`)."""

    _torch_class = torch.optim.AdamW


def make_optimizer(
    name: str,
    params: Iterable[Parameter],
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """Build an optimizer by name: ``"sgd"`` (with momentum), ``"adam"`` or ``"adamw"``.

    ``momentum`` only applies to SGD; Adam/AdamW ignore it (they use their default betas).

    Raises:
        ValueError: on an unknown name, lr not finite > 0, momentum outside [0, 1) or
            weight_decay not finite >= 0.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"optimizer name must be one of {OPTIMIZER_NAMES}, got {name!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if name == "sgd":
        return EagerSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return EagerAdam(params, lr=lr, weight_decay=weight_decay)
    return EagerAdamW(params, lr=lr, weight_decay=weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, lr_decay: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """Return ``ExponentialLR(optimizer, gamma=lr_decay)``; the caller steps it once per epoch.

    Raises:
        ValueError: if ``lr_decay`` is not in (0, 1] (1 means a constant learning rate).
    """
    if not (0.0 < lr_decay <= 1.0):
        raise ValueError(f"lr_decay must lie in (0, 1], got {lr_decay!r}")
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=lr_decay)
