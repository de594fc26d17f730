"""What one round knows on this rank as its stages run: inputs, intermediate results, record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from colnet_mpi.metrics.names import STAGES


@dataclass
class Defended:
    """What this rank's defenses saw in one round (the ``defense/*`` datasets)."""

    n: int
    excluded: int = 0  # 1: this node's contribution was left out of its group's aggregate
    reason: int = 0  # index into EXCLUSION_REASONS
    norm_score: float = float("nan")
    cosine_score: float = float("nan")
    leader_rejected: int = 0  # 1: this node refused its leader's broadcast
    verify_error: float = float("nan")  # relative error found when checking the leader
    refused: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (n,): 1 = refused j

    def __post_init__(self) -> None:
        if self.refused.size != self.n:
            self.refused = np.zeros(self.n)

    def values(self) -> dict[str, Any]:
        """The record fields of this rank's defenses."""
        return {
            "defense/excluded": self.excluded,
            "defense/reason": self.reason,
            "defense/norm_score": self.norm_score,
            "defense/cosine_score": self.cosine_score,
            "defense/leader_rejected": self.leader_rejected,
            "defense/verify_error": self.verify_error,
            "defense/refused": self.refused,
        }


def _tensor() -> torch.Tensor:
    return torch.empty(0)


@dataclass
class RoundContext:
    """One round on one rank. Stages read what earlier stages wrote and add their own results.

    Backbones are flat vectors in the :class:`~colnet_mpi.comm.buffers.FlatState` layout
    (trainable parameters first, then BatchNorm statistics).
    """

    r: int  # the round, 1-based
    n: int  # nodes in the federation
    seconds: dict[str, float] = field(default_factory=dict)
    # stage 1
    start: torch.Tensor = field(default_factory=_tensor)  # backbone at the start of the round
    own: torch.Tensor = field(default_factory=_tensor)  # backbone after local training
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    head_epochs: int = 0  # asynchronous catch-up: local epochs that trained the head alone
    trained: float = 1.0  # share of the round's full local training steps taken
    # stage 2
    received: dict[int, torch.Tensor] = field(default_factory=dict)  # neighbours' backbones
    payload: torch.Tensor | None = None  # what the grouper sent with the own backbone
    payloads: dict[int, torch.Tensor] = field(default_factory=dict)  # and the neighbours' ones
    # stage 3a/3b
    quarantined: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    view_own: torch.Tensor = field(default_factory=_tensor)  # own backbone as clustering sees it
    groups: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    leaders: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    k: int = 0
    proposal: np.ndarray | None = None  # (n,) this node's proposed labels
    affinity: np.ndarray | None = None  # (2, n, n) fused affinity and cosine matrices
    signals: np.ndarray | None = None  # (2, n) loss and Jacobian norm of each seen backbone
    # stage 3c
    contribution: torch.Tensor = field(default_factory=_tensor)  # what went into the group
    weight: float = 1.0  # this node's FedAvg weight
    new: torch.Tensor = field(default_factory=_tensor)  # the node's backbone as it evolves
    intra_new: torch.Tensor = field(default_factory=_tensor)  # the group's aggregate
    group_delta: torch.Tensor | None = None  # known to the leader (to all with verification)
    # stages 4-5
    row: int = 0  # this group's row among the leaders
    n_groups: int = 1
    deltas: torch.Tensor | None = None  # the leaders' group deltas (leaders; all when verified)
    verify: bool = False
    cross_ran: bool = False
    hca: dict[str, float | int] = field(default_factory=dict)  # record fields of the solve
    # asynchronous mode: r minus the round of each peer's backbone used, of the leader result
    staleness: np.ndarray = field(default_factory=lambda: np.zeros(0))
    leader_staleness: float = float("nan")
    delta_staleness: np.ndarray = field(default_factory=lambda: np.zeros(0))  # leaders: by sender
    stood_in: bool = False  # federation.leader_stand_in: aggregated in place of its leader
    # evaluation
    test: dict[str, float] = field(default_factory=dict)
    clock: float = float("nan")  # seconds since the first round of this process began
    checksum: int = 0
    defended: Defended = field(default_factory=lambda: Defended(0))

    def __post_init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.defended = Defended(self.n)
        self.quarantined = np.zeros(self.n, dtype=bool)
        self.groups = np.arange(self.n, dtype=np.int64)
        self.leaders = np.ones(self.n, dtype=bool)
        self.staleness = np.full(self.n, np.nan)
        self.delta_staleness = np.full(self.n, np.nan)
