"""Where a run can continue from: the results file's checkpoint, checked against the config
and world size before anything is built (torch-free, read by the writer rank only)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from colnet_mpi.config import Config, to_toml
from colnet_mpi.metrics.reader import flatten_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

#: Config keys that may differ on resume: they name files or set how far or how fast the run
#: goes, never what a finished round computes.
MAY_CHANGE: frozenset[str] = frozenset(
    {
        "run.name",
        "run.output",
        "run.checkpoint_every",
        "run.checkpoint_dir",
        "run.evaluate_every",
        "training.rounds",
        "training.epoch_seconds",
        "federation.cuda_aware",
        "federation.timeout",
        "data.root",
    }
)


#: Keys added after files were written without them, with the value that reproduces what the
#: older version did (a file that lacks one ran as if it were set to this).
ADDED_AS: dict[str, object] = {"federation.catch_up_train": "epochs"}


class ResumeError(ValueError):
    """The run cannot continue from this results file; the message says why."""


@dataclass(frozen=True)
class ResumePoint:
    """A run to continue after ``round`` from the checkpoints in ``directory``."""

    round: int
    directory: str
    checksums: np.ndarray  # round/backbone_checksum of that round, one per node
    recorded_rounds: int  # rounds the file holds (later ones are replaced)
    status: str


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def config_differences(stored_toml: str, config: Config) -> list[str]:
    """``key: stored -> new`` for every key that differs and may not change on resume. A key the
    stored config lacks (a file of an older version) is reported, unless :data:`ADDED_AS` says
    what the older version did."""
    old = tomllib.loads(stored_toml)
    new = tomllib.loads(to_toml(config))
    a, b = flatten_config(old), flatten_config(new)
    a = {**{k: v for k, v in ADDED_AS.items() if k in b}, **a}
    out = [
        f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}"
        for k in sorted(set(a) | set(b))
        if k not in MAY_CHANGE and a.get(k) != b.get(k)
    ]
    if old.get("nodes") != new.get("nodes"):
        out.append("nodes: the [[nodes]] list differs")
    return out


def resume_point(path: Path, config: Config, world_size: int) -> ResumePoint:
    """The checkpoint to continue ``path``'s run from, or :class:`ResumeError` saying why not."""
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as err:
        raise ResumeError(
            f"cannot resume from {str(path)!r}: not a readable HDF5 file ({err})"
        ) from err
    with f:
        attrs = {k: f.attrs[k] for k in f.attrs}
        if "config" not in attrs or "round/test_loss" not in f:
            raise ResumeError(f"cannot resume from {str(path)!r}: not a colnet-mpi results file")
        size = int(attrs.get("world_size", -1))
        if size != world_size:
            raise ResumeError(
                f"cannot resume {str(path)!r} with {world_size} ranks: it ran with {size}; launch "
                f"with mpiexec -n {size}"
            )
        diff = config_differences(_text(attrs["config"]), config)
        if diff:
            raise ResumeError(
                f"cannot resume {str(path)!r} with another config; these keys differ (stored -> "
                f"now): {'; '.join(diff)}. Only {', '.join(sorted(MAY_CHANGE))} may change"
            )
        r = int(attrs.get("checkpoint_round", 0))
        recorded = int(f["round/test_loss"].shape[0])
        if r <= 0:
            raise ResumeError(
                f"cannot resume {str(path)!r}: it has no complete checkpoint (run.checkpoint_every "
                f"= 0, or it stopped before the first one); start over with --overwrite"
            )
        if recorded < r:
            raise ResumeError(
                f"cannot resume {str(path)!r}: it records {recorded} rounds but names a checkpoint "
                f"of round {r}"
            )
        checksums = np.asarray(f["round/backbone_checksum"][r - 1], dtype=np.int64)
        directory = _text(attrs.get("checkpoint_dir", ""))
    if not Path(directory).is_dir():
        raise ResumeError(
            f"cannot resume {str(path)!r}: its checkpoint folder {directory!r} does not exist"
        )
    return ResumePoint(r, directory, checksums, recorded, _text(attrs.get("status", "")))
