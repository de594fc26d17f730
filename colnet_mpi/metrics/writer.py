"""The HDF5 results file: one writer rank, appendable datasets, flushed (closed) every round."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from colnet_mpi.metrics.names import EXCLUSION_REASONS, METRIC_NAMES, STAGES

TEST_METRICS = METRIC_NAMES  # stored as round/test_<metric>

__all__ = [
    "EXCLUSION_REASONS",
    "STAGES",
    "TEST_METRICS",
    "ResultsWriter",
    "mark_failed",
    "result_layout",
]


def now_iso() -> str:
    """Current UTC time as ISO 8601 text."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Series:
    """One appendable dataset: its dtype and the shape of one row (after the round/epoch axis)."""

    dtype: str
    row: tuple[int, ...]


def result_layout(n_nodes: int, *, record_affinity: bool) -> dict[str, Series]:
    """Every appendable dataset of a results file (DESIGN §7 names) for ``n_nodes`` nodes."""
    n = n_nodes
    layout: dict[str, Series] = {
        "epoch/train_loss": Series("f8", (n,)),
        "epoch/val_loss": Series("f8", (n,)),
        "epoch/round": Series("i4", ()),
    }
    for m in TEST_METRICS:
        layout[f"round/test_{m}"] = Series("f8", (n,))
    layout.update(
        {
            "round/group": Series("i4", (n,)),
            "round/leader": Series("i1", (n,)),
            "round/backbone_checksum": Series("i8", (n,)),
            "round/bytes_sent": Series("i8", (n,)),
            "round/bytes_received": Series("i8", (n,)),
            "clustering/proposal": Series("i4", (n, n)),
            "clustering/loss": Series("f8", (n, n)),
            "clustering/jacobian": Series("f8", (n, n)),
            "clustering/ari": Series("f8", ()),
            "clustering/k": Series("i4", ()),
            "hca/weights": Series("f8", (n,)),
            "hca/mean_delta_norm": Series("f8", ()),
            "hca/update_norm": Series("f8", ()),
            "hca/solver_ok": Series("i1", ()),
        }
    )
    for stage in STAGES:
        layout[f"round/seconds/{stage}"] = Series("f8", (n,))
    layout.update(
        {
            "attack/active": Series("i1", (n,)),  # 1 where the node attacked in the round
            "defense/excluded": Series("i1", (n,)),  # 1: left out of its group's aggregate
            "defense/reason": Series("i1", (n,)),  # index into EXCLUSION_REASONS
            "defense/norm_score": Series("f8", (n,)),  # update norm / group median norm
            "defense/cosine_score": Series("f8", (n,)),  # cosine to the others' median
            "defense/refused": Series("i1", (n, n)),  # [i, j] = 1: node i refused j's buffer
            "defense/leader_rejected": Series("i1", (n,)),  # 1: refused its leader's broadcast
            "defense/verify_error": Series("f8", (n,)),  # relative error of the leader check
        }
    )
    if record_affinity:
        layout["clustering/affinity"] = Series("f4", (n, n, n))
        layout["clustering/cosine"] = Series("f4", (n, n, n))
    return layout


class ResultsWriter:
    """Creates and appends to one run's HDF5 file. Only one rank (the writer rank) makes one.

    The file is opened, appended and closed for every round, so a job killed between rounds
    leaves a complete, readable file, and another rank can mark it failed after a crash.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        attrs: Mapping[str, Any],
        node_names: Sequence[str],
        node_tasks: Sequence[str],
        true_groups: Sequence[str],
        record_affinity: bool,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        n = len(node_names)
        self.layout = result_layout(n, record_affinity=record_affinity)
        with h5py.File(self.path, "w" if overwrite else "w-") as f:
            for key, value in attrs.items():
                f.attrs[key] = value
            f.attrs["status"] = "running"
            f.attrs["started"] = now_iso()
            f.attrs["finished"] = ""
            f.attrs["defense_reasons"] = ",".join(EXCLUSION_REASONS)  # defense/reason codes
            str_dt = h5py.string_dtype()
            f.create_dataset("nodes/name", data=np.array(node_names, dtype=object), dtype=str_dt)
            f.create_dataset("nodes/task", data=np.array(node_tasks, dtype=object), dtype=str_dt)
            f.create_dataset(
                "nodes/true_group", data=np.array(true_groups, dtype=object), dtype=str_dt
            )
            for name, series in self.layout.items():
                f.create_dataset(
                    name,
                    shape=(0, *series.row),
                    maxshape=(None, *series.row),
                    dtype=series.dtype,
                    chunks=(
                        max(1, min(64, 2**20 // max(1, int(np.prod(series.row)) * 8))),
                        *series.row,
                    ),
                )

    def append(self, rows: Mapping[str, np.ndarray | float | int]) -> None:
        """Append one or more rows to each named dataset and close the file (so it is on disk)."""
        with h5py.File(self.path, "a") as f:
            for name, value in rows.items():
                series = self.layout[name]
                arr = np.asarray(value, dtype=series.dtype)
                if arr.shape == series.row:
                    arr = arr[None]
                if arr.shape[1:] != series.row:
                    raise ValueError(
                        f"{name}: rows of shape {arr.shape[1:]}, expected {series.row}"
                    )
                ds = f[name]
                start = ds.shape[0]
                ds.resize(start + arr.shape[0], axis=0)
                ds[start:] = arr

    def set_attrs(self, **attrs: Any) -> None:
        """Set root attributes (e.g. ``status``)."""
        with h5py.File(self.path, "a") as f:
            for key, value in attrs.items():
                f.attrs[key] = value

    def finish(self) -> None:
        """Mark the run finished."""
        self.set_attrs(status="finished", finished=now_iso())


def mark_failed(path: str | Path, message: str, *, attempts: int = 10) -> bool:
    """Best effort, from any rank: set ``status = failed`` and the error text in an existing results file.

    Retries for a few seconds in case the writer rank holds the file open at that moment.
    Returns True when the file was marked.
    """
    p = Path(path)
    for _ in range(attempts):
        if not p.is_file():
            return False
        try:
            with h5py.File(p, "a") as f:
                if f.attrs.get("status") not in ("running", b"running"):
                    return False
                f.attrs["status"] = "failed"
                f.attrs["finished"] = now_iso()
                f.attrs["error"] = message[-4000:]
            return True
        except (OSError, BlockingIOError):
            time.sleep(0.3)
    return False
