"""One rank's attack for a run: which hook fires at which stage in which round (no MPI here)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from colnet_mpi.attacks.adversarial import clip_weights, fgsm
from colnet_mpi.attacks.labels import label_flip_hook
from colnet_mpi.attacks.updates import boost, corrupt_buffer, manipulate, reestimate_batchnorm
from colnet_mpi.comm.buffers import FlatState
from colnet_mpi.config import AttackConfig
from colnet_mpi.tasks import BatchHook, loss_function


class AttackPlan:
    """The hooks the round calls; each returns its input unchanged unless this rank attacks now.

    Stages: ``batch_hook`` (local training: label flip, AT2FL's FGSM batches),
    ``after_training`` (boost with BatchNorm re-estimation, AT2FL's weight clipping),
    ``upload`` / ``contribution`` (what the node sends to its neighbours / into its group's
    aggregation: a bad buffer), ``broadcast`` (what a leader sends back to its group: aggregation
    manipulation, only in rounds where this node leads).
    """

    def __init__(
        self,
        config: AttackConfig,
        rank: int,
        *,
        kind: str,
        num_outputs: int,
        seed: int,
        device: torch.device,
    ) -> None:
        self.config = config
        self.rank = rank
        self.kind = kind
        self.num_outputs = num_outputs
        self.device = device
        if config.kind == "label_flip" and rank in config.nodes and kind == "landmarks":
            raise ValueError(
                f"attack.kind = 'label_flip' cannot attack node {rank}: its task is landmark "
                "regression (no labels to flip); choose other attack.nodes"
            )
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The attack's random state (its generator), for checkpoints."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`."""
        self.generator.set_state(state["generator"])

    def active(self, r: int) -> bool:
        """Whether this rank attacks in round ``r``."""
        return self.config.active(self.rank, r)

    # -- stage 1: local training -----------------------------------------------------------------
    def batch_hook(self, r: int, backbone: nn.Module, head: nn.Module) -> BatchHook | None:
        """The per-batch hook of local training in round ``r`` (None: train normally)."""
        c = self.config
        if not self.active(r):
            return None
        if c.kind == "label_flip":
            return label_flip_hook(self.kind, self.num_outputs, c.flip_probability, self.generator)
        if c.kind == "at2fl":
            loss_fn = loss_function(self.kind)

            def adversarial(index: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
                if index < c.adversarial_batches:
                    return fgsm(lambda v: head(backbone(v)), loss_fn, x, y, c.epsilon), y
                return x, y

            return adversarial
        return None

    def after_training(
        self,
        r: int,
        start: Tensor,
        flat: FlatState,
        modules: tuple[nn.Module, nn.Module],
        batches: Iterable[tuple[Tensor, Tensor]],
    ) -> None:
        """Boost the trained backbone away from ``start`` (then re-estimate BatchNorm), or clip
        AT2FL's weights. ``flat`` is the node's FlatState; ``modules`` its (backbone, head)."""
        c = self.config
        if not self.active(r):
            return
        if c.kind == "boost":
            boosted = boost(
                start,
                flat.pack(),
                c.boost_scale,
                c.boost_clamp or None,
                n_trainable=flat.n_trainable,
            )
            flat.unpack(boosted)
            if c.bn_batches:
                reestimate_batchnorm(nn.Sequential(*modules), batches, max_batches=c.bn_batches)
        elif c.kind == "at2fl" and c.weight_clip:
            clip_weights(modules, c.weight_clip)

    # -- stages 2-3: what the node sends ----------------------------------------------------------
    def upload(self, r: int, vector: Tensor) -> Tensor:
        """The backbone this node sends to its neighbours (a corrupted copy for ``bad_buffer``)."""
        if self.active(r) and self.config.kind == "bad_buffer":
            return corrupt_buffer(vector, self.config.buffer_fault, self.generator)
        return vector

    def contribution(self, r: int, vector: Tensor) -> Tensor:
        """What this node puts into its group's aggregation.

        Collectives need equal sizes, so a ``bad_buffer`` node with a size fault sends NaN here.
        """
        if self.active(r) and self.config.kind == "bad_buffer":
            mode = self.config.buffer_fault if self.config.buffer_fault in ("nan", "inf") else "nan"
            return corrupt_buffer(vector, mode, self.generator)
        return vector

    # -- stage 5: what a leader sends back ----------------------------------------------------------
    def broadcast(self, r: int, vector: Tensor, leading: bool) -> Tensor:
        """What this node broadcasts as its group's leader (manipulated by a malicious leader)."""
        c = self.config
        if leading and self.active(r) and c.kind == "manipulate":
            return manipulate(vector, c.manipulation, c.manipulation_factor, self.generator)
        return vector


def relative_difference(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / max(||b||, tiny)`` in float64 (inf when ``a`` is not finite)."""
    if not bool(torch.isfinite(a).all()):
        return math.inf
    a64, b64 = a.double(), b.double()
    scale = max(float(torch.linalg.vector_norm(b64)), 1e-12)
    return float(torch.linalg.vector_norm(a64 - b64)) / scale
