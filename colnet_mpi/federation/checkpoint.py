"""Per-rank checkpoints at round boundaries: numeric HDF5 files, written atomically, never pickled.

A state is a tree of dicts, lists and tuples whose leaves are tensors, arrays, numbers, strings or
None (what ``state_dict()`` methods return). :func:`write_tree` stores it as HDF5 groups and
datasets (every object tagged with its kind) and :func:`read_tree` rebuilds it; nothing in a file
can run code when it is read.

Each rank writes ``<dir>/rank<rank>.round<r>.ckpt`` (an HDF5 file) through a temporary file that is flushed to disk
(``fsync``) and then renamed over the final name, so a crash while writing leaves the previous
round's file untouched. The results file names the last round whose files are complete on every
rank (``checkpoint_round``); older files are removed only after that is recorded.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import torch
from mpi4py import MPI

from colnet_mpi.comm.buffers import checksum
from colnet_mpi.federation.stop import test_hook

if TYPE_CHECKING:
    from colnet_mpi.federation.loop import Federation

FORMAT = 1
_NAME = re.compile(r"rank(\d+)\.round(\d+)\.ckpt$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or belongs to another run."""


# -- trees of numbers <-> HDF5 -------------------------------------------------------------------
def write_tree(group: h5py.Group, name: str, obj: Any) -> None:
    """Store ``obj`` under ``group[name]`` (see the module docstring for what ``obj`` may hold)."""
    if isinstance(obj, Mapping):
        sub = group.create_group(name)
        sub.attrs["kind"] = "dict"
        keys = []
        for i, (key, value) in enumerate(obj.items()):
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise TypeError(f"{sub.name}: key {key!r} is neither text nor an integer")
            keys.append(["i" if isinstance(key, int) else "s", key])
            write_tree(sub, str(i), value)
        sub.attrs["keys"] = json.dumps(keys)
        return
    if isinstance(obj, (list, tuple)):
        sub = group.create_group(name)
        sub.attrs["kind"] = "tuple" if isinstance(obj, tuple) else "list"
        sub.attrs["length"] = len(obj)
        for i, value in enumerate(obj):
            write_tree(sub, str(i), value)
        return
    if isinstance(obj, torch.Tensor):
        ds = group.create_dataset(name, data=obj.detach().cpu().numpy())
        ds.attrs["kind"] = "tensor"
        ds.attrs["dtype"] = str(obj.dtype).removeprefix("torch.")
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError(f"{group.name}/{name}: object arrays cannot be stored")
        group.create_dataset(name, data=obj).attrs["kind"] = "ndarray"
        return
    if obj is None:
        group.create_dataset(name, data=np.int8(0)).attrs["kind"] = "none"
    elif isinstance(obj, (bool, np.bool_)):
        group.create_dataset(name, data=np.int8(bool(obj))).attrs["kind"] = "bool"
    elif isinstance(obj, (int, np.integer)):
        v = int(obj)
        if -(2**63) <= v < 2**63:
            group.create_dataset(name, data=np.int64(v)).attrs["kind"] = "int"
        else:
            group.create_dataset(name, data=str(v)).attrs["kind"] = "bigint"
    elif isinstance(obj, (float, np.floating)):
        group.create_dataset(name, data=np.float64(obj)).attrs["kind"] = "float"
    elif isinstance(obj, str):
        group.create_dataset(name, data=obj).attrs["kind"] = "str"
    else:
        raise TypeError(f"{group.name}/{name}: cannot store a {type(obj).__name__}")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_tree(obj: h5py.Group | h5py.Dataset) -> Any:
    """The value :func:`write_tree` stored at ``obj``."""
    kind = _text(obj.attrs.get("kind", ""))
    if isinstance(obj, h5py.Group):
        if kind == "dict":
            keys = json.loads(_text(obj.attrs["keys"]))
            return {
                (int(k) if t == "i" else str(k)): read_tree(obj[str(i)])
                for i, (t, k) in enumerate(keys)
            }
        if kind in ("list", "tuple"):
            items = [read_tree(obj[str(i)]) for i in range(int(obj.attrs["length"]))]
            return tuple(items) if kind == "tuple" else items
        raise CheckpointError(f"{obj.name}: unknown group kind {kind!r}")
    data = obj[()]
    if kind == "tensor":
        dtype = getattr(torch, _text(obj.attrs["dtype"]))
        return torch.from_numpy(np.array(data)).to(dtype)
    if kind == "ndarray":
        return np.array(data)
    if kind == "none":
        return None
    if kind == "bool":
        return bool(data)
    if kind == "int":
        return int(data)
    if kind == "bigint":
        return int(_text(data))
    if kind == "float":
        return float(data)
    if kind == "str":
        return _text(data)
    raise CheckpointError(f"{obj.name}: unknown dataset kind {kind!r}")


# -- files ---------------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """This rank's checkpoint files in ``directory``."""

    def __init__(self, directory: str | Path, rank: int, world_size: int) -> None:
        self.directory = Path(directory)
        self.rank = rank
        self.world_size = world_size
        self.last_seconds = 0.0
        self.last_bytes = 0

    def path(self, r: int) -> Path:
        """This rank's file for round ``r``."""
        return self.directory / f"rank{self.rank:05d}.round{r:06d}.ckpt"

    def save(self, r: int, state: Mapping[str, Any], attrs: Mapping[str, Any]) -> Path:
        """Write ``state`` as this rank's checkpoint of round ``r``, atomically."""
        t0 = time.perf_counter()
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(r)
        tmp = final.with_name(final.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            f.attrs.update(
                {"format": FORMAT, "round": r, "rank": self.rank, "world_size": self.world_size}
            )
            f.attrs.update(dict(attrs))
            for key, value in state.items():
                write_tree(f, key, value)
            test_hook("checkpoint", r, self.rank)
        _fsync_path(tmp)
        os.replace(tmp, final)
        _fsync_path(self.directory)
        self.last_seconds = time.perf_counter() - t0
        self.last_bytes = final.stat().st_size
        return final

    def load(self, r: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """This rank's checkpoint of round ``r``: ``(state, attrs)``; checks whose it is."""
        path = self.path(r)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} is missing")
        try:
            with h5py.File(path, "r") as f:
                attrs = {k: f.attrs[k] for k in f.attrs}
                state = {key: read_tree(f[key]) for key in f}
        except OSError as err:
            raise CheckpointError(f"checkpoint {path} is not readable ({err})") from err
        found = (int(attrs.get("round", -1)), int(attrs.get("rank", -1)))
        size = int(attrs.get("world_size", -1))
        if found != (r, self.rank) or size != self.world_size:
            raise CheckpointError(
                f"checkpoint {path} holds round {found[0]} of rank {found[1]} of {size}, "
                f"expected round {r} of rank {self.rank} of {self.world_size}"
            )
        return state, attrs

    def prune(self, keep: int) -> None:
        """Remove this rank's files of other rounds than ``keep`` (and stale temporary files)."""
        if not self.directory.is_dir():
            return
        for p in self.directory.glob(f"rank{self.rank:05d}.round*.ckpt*"):
            m = _NAME.search(p.name)
            if p.name.endswith(".tmp") or (m is not None and int(m.group(2)) != keep):
                p.unlink(missing_ok=True)


# -- a federation's checkpoints (collective) ----------------------------------------------------
def backbone_checksum(fed: Federation) -> int:
    """CRC-32 of the shared part of this node's backbone (as ``round/backbone_checksum``)."""
    flat = fed.node.flat
    return checksum(flat.shared_part(flat.pack(), local_batchnorm=fed.config.federation.local_bn))


def save_checkpoint(fed: Federation, r: int) -> None:
    """Collective: every rank saves its state of round ``r``; then the results file names the
    round and older files go (the previous checkpoint stays until this one is complete)."""
    assert fed.checkpoints is not None
    fed.checkpoints.save(r, fed.state_dict(), {"backbone_checksum": backbone_checksum(fed)})
    world = fed.topology.world
    seconds = np.zeros(1)
    world.Reduce(
        [np.array([fed.checkpoints.last_seconds]), MPI.DOUBLE],
        [seconds, MPI.DOUBLE],
        op=MPI.MAX,
    )
    size = np.zeros(1)
    world.Reduce(
        [np.array([float(fed.checkpoints.last_bytes)]), MPI.DOUBLE],
        [size, MPI.DOUBLE],
        op=MPI.SUM,
    )
    if fed.writer is not None:
        fed.writer.mark_checkpoint(
            r, str(fed.checkpoints.directory.resolve()), seconds[0], int(size[0])
        )
    world.Barrier()
    fed.checkpoints.prune(keep=r)


def restore_checkpoint(fed: Federation, r: int, recorded: np.ndarray | None) -> None:
    """Load this rank's checkpoint of round ``r``; its backbone must match the file's
    checksum and, when given, the results file's ``round/backbone_checksum`` of round ``r``."""
    assert fed.checkpoints is not None
    state, attrs = fed.checkpoints.load(r)
    fed.load_state_dict(state)
    digest = backbone_checksum(fed)
    rank = fed.topology.rank
    expected = [int(attrs["backbone_checksum"])]
    if recorded is not None:
        expected.append(int(recorded[rank]))
    if any(digest != e for e in expected):
        raise CheckpointError(
            f"rank {rank}: the backbone restored from {fed.checkpoints.path(r)} has checksum "
            f"{digest}, the run recorded {expected}; the checkpoint does not belong to this run"
        )
