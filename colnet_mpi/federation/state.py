"""What the federation carries from one round to the next on a rank (besides the node's model).

Everything here is numeric and small, so that a checkpoint stores it as arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class FederationState:
    """Round index, grouping history and screening history of a federation of ``n`` nodes."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.round = 0  # the last finished round (0: none yet)
        # each node's last real group (quarantine, -1, does not change it); round 1: one shared
        # initial backbone, so everyone is everyone's group-mate
        self.home_groups = np.zeros(n, dtype=np.int64)
        self.groups = np.zeros((0, n), dtype=np.int64)  # the agreed partition of every round
        # the clustering evidence kept over rounds (resemblance signals); NaN: not seen yet
        self.evidence = np.full((n, n), np.nan)

    @property
    def has_partition(self) -> bool:
        """Whether any finished round had groups (asynchronous round 1 may have none)."""
        return bool((self.groups >= 0).any())

    def finish_round(self, r: int, groups: np.ndarray) -> None:
        """Remember round ``r``'s partition."""
        g = np.asarray(groups, dtype=np.int64)
        self.round = r
        self.home_groups = np.where(g >= 0, g, self.home_groups)
        self.groups = np.concatenate([self.groups, g[None]])

    def state_dict(self) -> dict[str, Any]:
        """Numeric state (copies)."""
        return {
            "round": self.round,
            "home_groups": self.home_groups.copy(),
            "groups": self.groups.copy(),
            "evidence": self.evidence.copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`, checking the shapes."""
        home = np.asarray(state["home_groups"], dtype=np.int64)
        groups = np.asarray(state["groups"], dtype=np.int64)
        if groups.size == 0:
            groups = groups.reshape(0, self.n)
        if home.shape != (self.n,) or groups.shape != (int(state["round"]), self.n):
            raise ValueError(
                f"federation state with home groups of shape {home.shape} and groups of shape "
                f"{groups.shape} does not fit {self.n} nodes at round {state['round']}"
            )
        # states saved before the clustering evidence existed have none: nothing seen yet
        evidence = np.asarray(state.get("evidence", np.full((self.n, self.n), np.nan)), float)
        if evidence.shape != (self.n, self.n):
            raise ValueError(
                f"clustering evidence of shape {evidence.shape} does not fit {self.n} nodes"
            )
        self.round = int(state["round"])
        self.home_groups = home
        self.groups = groups
        self.evidence = evidence
