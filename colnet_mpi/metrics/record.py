"""The per-round record, declared once: what each rank packs, how the writer gathers it into
dataset rows, the HDF5 layout, and which axis the reader cuts each dataset along.

Every rank fills a mapping ``{dataset name: value}`` for its node (missing entries take the
field's default), :meth:`RecordSpec.pack` flattens it into one float64 vector of the same length
on every rank, the vectors are gathered onto the writer rank, and :meth:`RecordSpec.rows` turns the
gathered matrix into one row per dataset. Adding a dataset means adding one :class:`Field` here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from colnet_mpi.metrics.names import METRIC_NAMES, STAGES

__all__ = ["FIELDS", "NODE_DATASETS", "Field", "RecordSpec", "Series", "axis_of"]

Reduce = Callable[[np.ndarray, Mapping[str, np.ndarray]], float | int]


@dataclass(frozen=True)
class Series:
    """One appendable dataset: its dtype and the shape of one row (after the round/epoch axis)."""

    dtype: str
    row: tuple[int, ...]


@dataclass(frozen=True)
class Field:
    """One dataset of the results file.

    ``shape`` is the shape of one node's value, in letters: ``""`` a number, ``"n"`` one value
    per node of the federation, ``"nn"`` a node-by-node matrix, ``"e"`` one value per local epoch
    of the round. ``source = "node"``: every rank packs its value; the dataset row stacks them
    (``axis = "epoch"``: one row per epoch instead, nodes along the row), or ``reduce`` turns the
    gathered column into one number per round. ``source = "writer"``: the writer rank computes
    the value itself (passed to :meth:`RecordSpec.rows`). ``optional`` names a switch that must
    be on for the dataset to exist (``"affinity"``: the N x N x N matrices). ``description``
    and ``unit`` (``"1"`` dimensionless, ``"s"``, ``"bytes"``, ``""`` for ids, codes and flags)
    become the dataset's attributes; :attr:`dims` names its axes.
    """

    name: str
    dtype: str
    shape: str = ""
    axis: str = "round"
    source: str = "node"
    default: float = math.nan
    reduce: Reduce | None = None
    optional: str = ""
    description: str = ""
    unit: str = ""

    @property
    def dims(self) -> str:
        """The dataset's axes, comma-separated: ``"round,node"``, ``"epoch,node"``, ``"round"``,
        ``"round,node,node"``, ... (the same rule as :meth:`RecordSpec.layout`'s row shapes)."""
        if self.source == "writer" or self.reduce is not None:
            return self.axis
        if self.axis == "epoch":
            return "epoch,node"
        return ",".join([self.axis, "node", *("epoch" if c == "e" else "node" for c in self.shape)])


def _leader_value(column: np.ndarray, _cols: Mapping[str, np.ndarray]) -> float:
    """The value the leaders reported (identical on all of them), NaN when no leader ran HCA."""
    finite = column[~np.isnan(column)]
    return float(finite.max()) if finite.size else float("nan")


def _solver_status(column: np.ndarray, cols: Mapping[str, np.ndarray]) -> int:
    """Worst solver status over this round's leaders (-1 when none ran HCA)."""
    status = column[cols["round/leader"] == 1]
    return int(status.min()) if status.size else -1


def _largest_k(column: np.ndarray, _cols: Mapping[str, np.ndarray]) -> int:
    """The K the nodes used (the largest proposal's)."""
    return int(np.nanmax(column)) if column.size else 0


#: What a test metric of ``round/test_<metric>`` is, for its ``description`` attribute.
_METRIC_TEXT = {
    "loss": "test loss of the node's model on its own task",
    "precision_micro": "test precision (micro average) on the node's task; NaN where not applicable",
    "recall_micro": "test recall (micro average) on the node's task; NaN where not applicable",
    "f1_micro": "test F1 (micro average) on the node's task; NaN where not applicable",
    "precision_macro": "test precision (macro average) on the node's task; NaN where not applicable",
    "recall_macro": "test recall (macro average) on the node's task; NaN where not applicable",
    "f1_macro": "test F1 (macro average) on the node's task; NaN where not applicable",
}

#: Every dataset of a results file, in the order a record is packed.
FIELDS: tuple[Field, ...] = (
    Field(
        "epoch/train_loss",
        "f8",
        "e",
        axis="epoch",
        unit="1",
        description="training loss of each local epoch (NaN: an epoch a node catching up "
        "skipped, federation.catch_up)",
    ),
    Field(
        "epoch/val_loss",
        "f8",
        "e",
        axis="epoch",
        unit="1",
        description="validation loss after each local epoch (NaN: skipped, as above)",
    ),
    Field(
        "epoch/round",
        "i4",
        axis="epoch",
        source="writer",
        description="the round (1-based) each local epoch belongs to",
    ),
    *(
        Field(
            f"round/test_{m}",
            "f8",
            unit="1",
            description=_METRIC_TEXT.get(m, f"test {m} after the round"),
        )
        for m in METRIC_NAMES
    ),
    Field(
        "round/group",
        "i4",
        default=-1,
        description="agreed group id (ids in order of first member); -1 = quarantined",
    ),
    Field("round/leader", "i1", default=0, description="1 for the round's group leaders"),
    Field(
        "round/backbone_checksum",
        "i8",
        default=0,
        description="CRC-32 of the backbone after the round (equal within a group)",
    ),
    Field(
        "round/bytes_sent",
        "i8",
        default=0,
        unit="bytes",
        description="model-data payload handed to MPI in the round",
    ),
    Field(
        "round/bytes_received",
        "i8",
        default=0,
        unit="bytes",
        description="model-data payload received from MPI in the round",
    ),
    *(
        Field(
            f"round/seconds/{s}",
            "f8",
            default=0.0,
            unit="s",
            description=f"wall-clock time of the {s} stage (0 where the scheme skips it)",
        )
        for s in STAGES
    ),
    Field(
        "round/clock",
        "f8",
        unit="s",
        description="wall-clock seconds from the start of this process's first round to the "
        "end of this node's round (asynchronous nodes end a round at different times)",
    ),
    Field(
        "round/partition_stamp",
        "i8",
        default=-1,
        description="24-bit CRC of the partition this node used in the round (canonical "
        "labels): equal on every node that used the same partition",
    ),
    Field(
        "async/staleness",
        "f8",
        "n",
        unit="1",
        description="asynchronous mode: this round minus the round of each peer's backbone the "
        "node used (negative: the peer was ahead); NaN where not used and in synchronous mode",
    ),
    Field(
        "async/leader_staleness",
        "f8",
        unit="1",
        description="asynchronous mode: this round minus the round of the leader result the "
        "node applied; NaN where none was applied and in synchronous mode",
    ),
    Field(
        "async/delta_staleness",
        "f8",
        "n",
        unit="1",
        description="asynchronous mode, group leaders and members standing in for one: this "
        "round minus the round of each other group's delta their cross-group aggregation used "
        "(by the rank that sent it); NaN elsewhere and in synchronous mode",
    ),
    Field(
        "async/stood_in",
        "i1",
        default=0,
        description="asynchronous mode, federation.leader_stand_in: 1 where the node computed "
        "its group's cross-group update itself, its leader not having posted its backbone of the "
        "round",
    ),
    Field(
        "async/head_epochs",
        "i2",
        default=0,
        description="asynchronous mode: local epochs of the round in which the node, catching "
        "up, trained its private head alone with the backbone frozen (federation.catch_up_train "
        '= "head" or "features")',
    ),
    Field(
        "async/trained",
        "f8",
        unit="1",
        description="share of the round's full local training (training.local_epochs epochs) "
        "whose steps the node took: below 1 where federation.catch_up trained one epoch or "
        "federation.lockstep_deadline ended the training early; 1 in synchronous mode",
    ),
    Field(
        "hca/weights",
        "f8",
        unit="1",
        description="HCA solver weight of each leader (NaN for non-leaders)",
    ),
    Field(
        "hca/mean_delta_norm",
        "f8",
        reduce=_leader_value,
        unit="1",
        description="norm of the leaders' mean delta (NaN when HCA did not run)",
    ),
    Field(
        "hca/update_norm",
        "f8",
        reduce=_leader_value,
        unit="1",
        description="norm of the HCA update (NaN when HCA did not run)",
    ),
    Field(
        "hca/solver_ok",
        "i1",
        default=-1,
        reduce=_solver_status,
        description="1 solver converged, 0 fell back to uniform weights, -1 HCA not run",
    ),
    Field(
        "clustering/k",
        "i4",
        default=0,
        reduce=_largest_k,
        unit="1",
        description="number of clusters K used in the round",
    ),
    Field(
        "clustering/ari",
        "f8",
        source="writer",
        unit="1",
        description="adjusted Rand index of the agreed partition vs. the true groups",
    ),
    Field("attack/active", "i1", default=0, description="1 where the node attacked in the round"),
    Field(
        "defense/excluded",
        "i1",
        default=0,
        description="1: left out of its group's aggregate (or quarantined)",
    ),
    Field(
        "defense/reason",
        "i1",
        default=0,
        description="why excluded: index into the root attribute defense_reasons",
    ),
    Field(
        "defense/norm_score",
        "f8",
        unit="1",
        description="screening score: update norm / reference norm",
    ),
    Field(
        "defense/cosine_score",
        "f8",
        unit="1",
        description="screening score: cosine of the update to the others' median",
    ),
    Field(
        "defense/leader_rejected",
        "i1",
        default=0,
        description="1: the node refused its leader's broadcast",
    ),
    Field(
        "defense/verify_error",
        "f8",
        unit="1",
        description="relative error the node measured when checking its leader's broadcast",
    ),
    Field(
        "defense/refused",
        "i1",
        "n",
        default=0,
        description="[i, j] = 1: node i refused a buffer from node j",
    ),
    Field(
        "clustering/proposal",
        "i4",
        "n",
        default=-1,
        description="node i's proposed labels over world indices (-1 = unseen)",
    ),
    Field(
        "clustering/loss",
        "f8",
        "n",
        unit="1",
        description="[i, q]: loss of node q's backbone with node i's head",
    ),
    Field(
        "clustering/jacobian",
        "f8",
        "n",
        unit="1",
        description="[i, q]: mean Jacobian norm of node q's backbone with node i's head",
    ),
    Field(
        "clustering/affinity",
        "f4",
        "nn",
        optional="affinity",
        unit="1",
        description="node i's affinity over world indices: the fused S (paper signals) or "
        "max(E, 0) of the evidence kept over rounds (resemblance signals); NaN = unseen pair",
    ),
    Field(
        "clustering/cosine",
        "f4",
        "nn",
        optional="affinity",
        unit="1",
        description="node i's backbone cosine matrix over world indices (resemblance signals "
        "with backbone_weight = 0: the data-profile cosine); NaN = unseen pair",
    ),
)

#: The per-node string datasets under ``nodes/`` (written once, not part of the record):
#: ``{name: (description, unit, dims)}``.
NODE_DATASETS: dict[str, tuple[str, str, str]] = {
    "nodes/name": ("name of each node (world rank order)", "", "node"),
    "nodes/task": ("task each node learns", "", "node"),
    "nodes/true_group": ("true task group of each node (for the clustering ARI)", "", "node"),
}

_AXIS = {f.name: f.axis for f in FIELDS}


def axis_of(name: str) -> str:
    """``"round"`` or ``"epoch"``: the axis a dataset grows along (unknown names: by prefix)."""
    return _AXIS.get(name, "epoch" if name.startswith("epoch/") else "round")


class RecordSpec:
    """The record of a run with ``n`` nodes and ``epochs`` local epochs per round."""

    def __init__(self, n: int, epochs: int, *, record_affinity: bool) -> None:
        self.n = n
        self.epochs = epochs
        self.fields = tuple(f for f in FIELDS if not f.optional or record_affinity)
        self.packed = tuple(f for f in self.fields if f.source == "node")

    def _dims(self, shape: str) -> tuple[int, ...]:
        return tuple(self.epochs if c == "e" else self.n for c in shape)

    def layout(self) -> dict[str, Series]:
        """Every appendable dataset: its dtype and row shape."""
        out = {}
        for f in self.fields:
            if f.source == "writer" or f.reduce is not None:
                row: tuple[int, ...] = ()
            elif f.axis == "epoch":
                row = (self.n,)
            else:
                row = (self.n, *self._dims(f.shape))
            out[f.name] = Series(f.dtype, row)
        return out

    def attributes(self) -> dict[str, dict[str, str]]:
        """``{dataset name: {"description", "unit", "dims"}}`` for every dataset of the file
        (the record's and the ``nodes/`` ones), set as HDF5 attributes by the writer."""
        out = {
            name: {"description": d, "unit": u, "dims": dims}
            for name, (d, u, dims) in NODE_DATASETS.items()
        }
        for f in self.fields:
            out[f.name] = {"description": f.description, "unit": f.unit, "dims": f.dims}
        return out

    def width(self) -> int:
        """Length of one rank's packed record."""
        return sum(int(np.prod(self._dims(f.shape))) for f in self.packed)

    def pack(self, values: Mapping[str, Any]) -> np.ndarray:
        """One node's values as one flat float64 vector (the same length on every rank)."""
        unknown = set(values) - {f.name for f in self.packed}
        if unknown:
            raise KeyError(f"not fields of a rank's record: {', '.join(sorted(unknown))}")
        parts = []
        for f in self.packed:
            dims = self._dims(f.shape)
            value = np.asarray(values.get(f.name, f.default), dtype=np.float64)
            if value.shape != dims:
                if value.ndim != 0:  # only a number fills a whole field
                    raise ValueError(f"{f.name}: a value of shape {value.shape}, expected {dims}")
                value = np.broadcast_to(value, dims)
            parts.append(value.reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0)

    def unpack(self, gathered: np.ndarray) -> dict[str, np.ndarray]:
        """Split gathered records ``(n, width)`` into ``{name: (n, *shape)}``."""
        cols: dict[str, np.ndarray] = {}
        i = 0
        for f in self.packed:
            dims = self._dims(f.shape)
            size = int(np.prod(dims))
            cols[f.name] = gathered[:, i : i + size].reshape(gathered.shape[0], *dims)
            i += size
        return cols

    def rows(
        self, gathered: np.ndarray, computed: Mapping[str, Any]
    ) -> dict[str, np.ndarray | float | int]:
        """The round's rows of every dataset from the gathered records and the writer's values."""
        cols = self.unpack(gathered)
        out: dict[str, np.ndarray | float | int] = {}
        for f in self.fields:
            if f.source == "writer":
                out[f.name] = computed[f.name]
            elif f.reduce is not None:
                out[f.name] = f.reduce(cols[f.name], cols)
            elif f.axis == "epoch":
                out[f.name] = cols[f.name].T
            else:
                out[f.name] = cols[f.name]
        return out
