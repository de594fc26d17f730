"""Names shared by the writer, the reader and training (torch-free, so the report stays light)."""

from __future__ import annotations

#: Task metrics of one evaluation; stored per round as ``round/test_<metric>``.
METRIC_NAMES: tuple[str, ...] = (
    "loss",
    "precision_micro",
    "recall_micro",
    "f1_micro",
    "precision_macro",
    "recall_macro",
    "f1_macro",
)

#: Stages timed in ``round/seconds/<stage>``.
STAGES: tuple[str, ...] = (
    "local_train",
    "exchange",
    "clustering",
    "intra",
    "cross",
    "redistribute",
    "evaluate",
    "total",
)

#: Codes of ``defense/reason``: why a node's contribution was left out of its group's aggregate
#: (or, for "clipped", changed before it went in).
EXCLUSION_REASONS: tuple[str, ...] = (
    "kept",
    "non-finite",
    "norm",
    "cosine",
    "norm+cosine",
    "clipped",  # kept, its too-large update rescaled (defense.norm_action = "clip")
)
