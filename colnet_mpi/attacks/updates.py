"""Update-stage and aggregation-stage attacks: scaled boost, leader manipulation, bad buffers."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "CORRUPT_MODES",
    "MANIPULATE_MODES",
    "boost",
    "corrupt_buffer",
    "manipulate",
    "reestimate_batchnorm",
]

#: Modes of :func:`manipulate`.
MANIPULATE_MODES: tuple[str, ...] = ("scale", "noise")

#: Modes of :func:`corrupt_buffer`.
CORRUPT_MODES: tuple[str, ...] = ("nan", "inf", "short", "long")


def _check_vector(name: str, v: Tensor) -> None:
    if not isinstance(v, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() != 1 or not v.is_floating_point():
        raise ValueError(
            f"{name} must be a 1-D floating tensor, got shape {tuple(v.shape)} and {v.dtype}"
        )


def boost(
    prev: Tensor,
    new: Tensor,
    scale: float = 5.0,
    clamp: float | None = 1000.0,
    *,
    n_trainable: int | None = None,
) -> Tensor:
    """Return the boosted upload ``prev + scale * (new - prev)``, clamped to ``[-clamp, clamp]``.

    ``prev`` and ``new`` are flat backbone vectors (FlatState layout: trainable parameters first,
    then float buffers). Only the first ``n_trainable`` entries (all when None) are boosted and
    clamped; the buffer tail is copied from ``new`` untouched, because extrapolating BatchNorm
    running variances can make them negative. Re-estimate the statistics for the boosted weights
    with :func:`reestimate_batchnorm` after unpacking. ``clamp=None`` disables clamping.
    A new tensor is returned; the inputs are not modified.
    """
    _check_vector("prev", prev)
    _check_vector("new", new)
    if prev.shape != new.shape:
        raise ValueError(f"prev and new must match, got {tuple(prev.shape)} and {tuple(new.shape)}")
    s = float(scale)
    if not math.isfinite(s):
        raise ValueError(f"scale must be finite, got {scale!r}")
    p = new.numel() if n_trainable is None else int(n_trainable)
    if not 0 <= p <= new.numel():
        raise ValueError(f"n_trainable must lie in [0, {new.numel()}], got {n_trainable!r}")
    out = new.detach().clone()
    head = prev[:p] + s * (new[:p] - prev[:p])
    if clamp is not None:
        c = float(clamp)
        if not math.isfinite(c) or c <= 0.0:
            raise ValueError(f"clamp must be None or a finite number > 0, got {clamp!r}")
        head = head.clamp(-c, c)
    out[:p] = head
    return out


@torch.no_grad()
def reestimate_batchnorm(
    module: nn.Module,
    batches: Iterable[Tensor | tuple[Tensor, ...] | list[Tensor]],
    *,
    max_batches: int | None = None,
) -> int:
    """Recompute every BatchNorm running mean/variance of ``module`` from ``batches``.

    Each BatchNorm layer's statistics are reset and its momentum set to None (a cumulative
    average), then ``module`` runs forward in train mode on up to ``max_batches`` batches
    (inputs, or tuples whose first item is the input; moved to the device of the module's
    first parameter or buffer); momenta and the train/eval mode are restored afterwards. The result is
    the average of the per-batch means and unbiased variances. Returns the number of batches used;
    with none the statistics are left reset (mean 0, variance 1). No gradient is computed.
    """
    if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 0):
        raise ValueError(f"max_batches must be None or an integer >= 0, got {max_batches!r}")
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    device = next(itertools.chain(module.parameters(), module.buffers())).device
    momenta = [m.momentum for m in bns]
    was_training = module.training
    used = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        module.train()
        for batch in batches:
            if max_batches is not None and used >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            module(x.to(device))
            used += 1
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        module.train(was_training)
    return used


def _device_of(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def manipulate(
    update: Tensor,
    mode: str = "scale",
    factor: float = 2.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Return what a malicious leader broadcasts in place of ``update`` (any float tensor).

    ``"scale"``: ``factor * update`` (the reference attack multiplies every tensor of the HCA
    result by 2.0). ``"noise"``: ``update + n`` with Gaussian ``n`` rescaled to
    ``||n|| = factor * ||update||`` (a zero ``update`` is returned unchanged). Noise is drawn on
    the generator's device (CPU without one) and moved to ``update``'s device.
    """
    if not isinstance(update, Tensor) or not update.is_floating_point():
        raise ValueError("update must be a floating torch.Tensor")
    f = float(factor)
    if not math.isfinite(f):
        raise ValueError(f"factor must be finite, got {factor!r}")
    if mode == "scale":
        return update.detach() * f
    if mode != "noise":
        raise ValueError(f"mode must be one of {MANIPULATE_MODES}, got {mode!r}")
    if f < 0.0:
        raise ValueError(f"factor (relative noise norm) must be >= 0, got {factor!r}")
    u64 = update.detach().to(torch.float64)
    norm = float(torch.linalg.vector_norm(u64))
    noise = torch.randn(
        tuple(update.shape), generator=generator, device=_device_of(generator), dtype=torch.float64
    ).to(update.device)
    noise_norm = float(torch.linalg.vector_norm(noise))
    if norm == 0.0 or noise_norm == 0.0:
        return update.detach().clone()
    return (u64 + noise * (f * norm / noise_norm)).to(update.dtype)


def corrupt_buffer(
    vector: Tensor,
    mode: str,
    generator: torch.Generator | None = None,
    *,
    count: int = 1,
) -> Tensor:
    """Return a corrupted copy of a flat buffer, as a faulty or malicious node would send it.

    ``"nan"`` / ``"inf"``: ``count`` distinct entries, drawn uniformly, set to NaN / +inf.
    ``"short"``: the last ``count`` entries dropped. ``"long"``: ``count`` zeros appended.
    ``vector`` is not modified. Positions are drawn on the generator's device (CPU without one).
    """
    _check_vector("vector", vector)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an integer >= 1, got {count!r}")
    n = vector.numel()
    v = vector.detach()
    if mode in ("nan", "inf"):
        if count > n:
            raise ValueError(f"count {count} exceeds the {n} entries of the vector")
        pos = torch.randperm(n, generator=generator, device=_device_of(generator))[:count]
        out = v.clone()
        out[pos.to(v.device)] = math.nan if mode == "nan" else math.inf
        return out
    if mode == "short":
        if count > n:
            raise ValueError(f"count {count} exceeds the {n} entries of the vector")
        return v[: n - count].clone()
    if mode == "long":
        return torch.cat([v, v.new_zeros(count)])
    raise ValueError(f"mode must be one of {CORRUPT_MODES}, got {mode!r}")
