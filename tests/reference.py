"""Fingerprints of results files, to prove that a refactor or a resume changed nothing.

A fingerprint holds, for every dataset of a results file except the wall-clock timings
(``round/seconds/*``), its dtype, shape and a SHA-256 of its bytes, plus a few per-round,
per-node values in the clear (test loss, backbone checksum, group) so that a mismatch can be read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

#: Datasets that measure time and so differ between any two runs.
TIMED_PREFIX = "round/seconds/"
TIMED = ("round/clock",)
READABLE = ("round/test_loss", "round/backbone_checksum", "round/group")


def dataset_digests(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{name: {"dtype", "shape", "sha256"}}`` of every dataset except the timings."""
    out: dict[str, dict[str, Any]] = {}

    def visit(name: str, obj: Any) -> None:
        timed = name.startswith(TIMED_PREFIX) or name in TIMED
        if isinstance(obj, h5py.Dataset) and not timed:
            arr = np.ascontiguousarray(obj[()])
            if arr.dtype == object:  # variable-length strings
                raw = "\0".join(v.decode() if isinstance(v, bytes) else str(v) for v in arr.ravel())
                digest = hashlib.sha256(raw.encode()).hexdigest()
            else:
                digest = hashlib.sha256(arr.tobytes()).hexdigest()
            out[name] = {"dtype": str(arr.dtype), "shape": list(arr.shape), "sha256": digest}

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return out


def fingerprint(path: str | Path) -> dict[str, Any]:
    """Digests of every dataset and the readable per-round, per-node values."""
    with h5py.File(path, "r") as f:
        readable = {name: np.asarray(f[name][()]).tolist() for name in READABLE}
    return {"datasets": dataset_digests(path), "values": readable}


def differences(
    expected: dict[str, Any], actual: dict[str, Any], added: tuple[str, ...] = ()
) -> list[str]:
    """Human-readable list of what differs between two fingerprints (empty: identical).

    ``added``: datasets the results file gained after ``expected`` was recorded (not compared)."""
    out = []
    exp, act = expected["datasets"], actual["datasets"]
    for name in sorted(set(exp) | set(act)):
        if name not in act:
            out.append(f"{name}: missing")
        elif name not in exp and name in added:
            continue
        elif name not in exp:
            out.append(f"{name}: not in the reference")
        elif exp[name] != act[name]:
            out.append(f"{name}: {exp[name]} != {act[name]}")
    for name in READABLE:
        if expected["values"].get(name) != actual["values"].get(name):
            out.append(
                f"{name} values: {expected['values'].get(name)} != {actual['values'].get(name)}"
            )
    return out


def save(path: str | Path, data: dict[str, Any]) -> None:
    """Write a fingerprint (or a dict of them) as JSON."""
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
