"""The HDF5 results file: one writer rank, appendable datasets, flushed (closed) every round."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from colnet_mpi.metrics.names import EXCLUSION_REASONS, METRIC_NAMES, STAGES
from colnet_mpi.metrics.record import RecordSpec, Series, axis_of

TEST_METRICS = METRIC_NAMES  # stored as round/test_<metric>

__all__ = [
    "EXCLUSION_REASONS",
    "STAGES",
    "TEST_METRICS",
    "ResultsWriter",
    "keep_previous",
    "mark_failed",
    "result_layout",
]


def now_iso() -> str:
    """Current UTC time as ISO 8601 text."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def result_layout(n_nodes: int, *, record_affinity: bool) -> dict[str, Series]:
    """Every appendable dataset of a results file for ``n_nodes`` nodes (from the record spec)."""
    return RecordSpec(n_nodes, 1, record_affinity=record_affinity).layout()


def keep_previous(path: Path) -> Path | None:
    """Move an existing results file (and its default checkpoint folder) out of the way, to
    ``<stem>.replaced-<UTC time>[-n]<suffix>`` next to it; returns the new name, None when there
    was nothing to move. A replaced run is renamed, never truncated: its records stay readable."""
    if not path.exists():
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    for n in range(1000):
        tail = f"-{n}" if n else ""
        kept = path.with_name(f"{path.stem}.replaced-{stamp}{tail}{path.suffix}")
        if not kept.exists():
            break
    os.replace(path, kept)
    folder = path.with_name(path.name + ".ckpt")
    if folder.is_dir():
        os.replace(folder, kept.with_name(kept.name + ".ckpt"))
    return kept


class ResultsWriter:
    """Creates and appends to one run's HDF5 file. Only one rank (the writer rank) makes one.

    The file is opened, appended and closed for every round, so a job killed between rounds
    leaves a complete, readable file, and another rank can mark it failed after a crash.
    Every open is without HDF5 file locking (``locking=False``): a reader that holds the file
    open (a notebook, ``colnet-mpi report``) must never make the writer's next open fail.
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
        resume_round: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        n = len(node_names)
        self.layout = result_layout(n, record_affinity=record_affinity)
        self.kept: Path | None = None  # where an overwritten earlier attempt went
        if resume_round is not None:
            self._truncate(resume_round, attrs)
            return
        if overwrite:
            self.kept = keep_previous(self.path)
        with h5py.File(self.path, "w-", locking=False) as f:
            for key, value in attrs.items():
                f.attrs[key] = value
            f.attrs["status"] = "running"
            f.attrs["started"] = now_iso()
            f.attrs["finished"] = ""
            f.attrs["checkpoint_round"] = 0  # the last round every rank's state is saved for
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
            # description / unit / dims of every dataset (nodes/ too), from the record spec
            spec = RecordSpec(n, 1, record_affinity=record_affinity)
            for name, attributes in spec.attributes().items():
                if name in f:
                    f[name].attrs.update(attributes)

    def append(self, rows: Mapping[str, np.ndarray | float | int]) -> None:
        """Append one or more rows to each named dataset and close the file (so it is on disk)."""
        _test_enospc(self.path, rows)
        with h5py.File(self.path, "a", locking=False) as f:
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

    def _truncate(self, rounds: int, attrs: Mapping[str, Any]) -> None:
        """Reopen an existing file to continue after round ``rounds``: every dataset is cut to
        those rounds (epochs: to the epochs of those rounds) and the run is marked running."""
        with h5py.File(self.path, "a", locking=False) as f:
            missing = [name for name in self.layout if name not in f]
            if missing:
                raise ValueError(f"{self.path}: no dataset {missing[0]!r}; not this run's file")
            epoch_rounds = np.asarray(f["epoch/round"][()])
            keep_epochs = int(np.count_nonzero(epoch_rounds <= rounds))
            for name in self.layout:
                keep = keep_epochs if axis_of(name) == "epoch" else rounds
                ds = f[name]
                if ds.shape[0] < keep:
                    raise ValueError(
                        f"{self.path}: {name} holds {ds.shape[0]} rows, fewer than {keep}"
                    )
                ds.resize(keep, axis=0)
            history = str(f.attrs.get("resumed", "") or "")
            for key, value in attrs.items():
                f.attrs[key] = value
            f.attrs["resumed"] = (history + "," if history else "") + f"{rounds}@{now_iso()}"
            f.attrs["status"] = "running"
            f.attrs["finished"] = ""

    def mark_checkpoint(self, r: int, directory: str, nbytes: int) -> None:
        """Record that every rank's checkpoint of round ``r`` is complete (and its size)."""
        with h5py.File(self.path, "a", locking=False) as f:
            f.attrs["checkpoint_round"] = r
            f.attrs["checkpoint_dir"] = directory
            f.attrs["checkpoint_count"] = int(f.attrs.get("checkpoint_count", 0)) + 1
            f.attrs["checkpoint_bytes"] = nbytes

    def add_checkpoint_seconds(self, seconds: float) -> None:
        """Add the writer rank's time spent checkpointing (summed over resumes)."""
        with h5py.File(self.path, "a", locking=False) as f:
            f.attrs["checkpoint_seconds"] = float(f.attrs.get("checkpoint_seconds", 0.0)) + seconds

    def set_attrs(self, **attrs: Any) -> None:
        """Set root attributes (e.g. ``status``)."""
        with h5py.File(self.path, "a", locking=False) as f:
            for key, value in attrs.items():
                f.attrs[key] = value

    def finish(self) -> None:
        """Mark the run finished."""
        self.set_attrs(status="finished", finished=now_iso())


def _test_enospc(path: Path, rows: Mapping[str, Any]) -> None:
    """Fault injection for the tests: ``COLNET_TEST_ENOSPC=<round>`` makes appending that round
    (the round named by its ``epoch/round`` rows) fail as on a full disk, before the file is touched."""
    spec = os.environ.get("COLNET_TEST_ENOSPC", "")
    if not spec or "epoch/round" not in rows:
        return
    rounds = np.asarray(rows["epoch/round"]).ravel()
    if rounds.size and str(int(rounds[-1])) == spec.strip():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


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
            with h5py.File(p, "a", locking=False) as f:
                if f.attrs.get("status") not in ("running", b"running"):
                    return False
                f.attrs["status"] = "failed"
                f.attrs["finished"] = now_iso()
                f.attrs["error"] = message[-4000:]
            return True
        except (OSError, BlockingIOError):
            time.sleep(0.3)
    return False
