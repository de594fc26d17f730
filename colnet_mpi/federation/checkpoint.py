"""Per-rank checkpoints at round boundaries: numeric HDF5 files, written atomically, never pickled.

A state is a tree of dicts, lists and tuples whose leaves are tensors, arrays, numbers, strings or
None (what ``state_dict()`` methods return). :func:`write_tree` stores its structure as JSON text
and every tensor and array as a slice of one flat numeric dataset per dtype; :func:`read_tree`
rebuilds it. Nothing in a file can run code when it is read (no pickle).

Each rank writes ``<dir>/rank<rank>.round<r>.ckpt`` (an HDF5 file) through a temporary file that is flushed to disk
(``fsync``) and then renamed over the final name, so a crash while writing leaves the previous
round's file untouched. The results file names the last round whose files are complete on every
rank (``checkpoint_round``); older files are removed only after that is recorded.
"""

from __future__ import annotations

import json
import math
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
#: numpy dtypes a tensor or array may have in a checkpoint
_DTYPES = frozenset(
    {"bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64"}
    | {"float16", "float32", "float64"}
)


def write_tree(group: h5py.Group, name: str, obj: Any) -> None:
    """Store ``obj`` as ``group[name]`` (see the module docstring for what ``obj`` may hold).

    The structure goes into one JSON attribute (``tree``); every tensor and array is a slice of
    one flat dataset per dtype, so a whole state is a handful of HDF5 objects, quick to write.
    """
    blobs: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}

    def leaf(kind: str, arr: np.ndarray, where: str, torch_dtype: str = "") -> dict[str, Any]:
        dt = arr.dtype.name
        if dt not in _DTYPES:
            raise TypeError(f"{where}: arrays of dtype {arr.dtype} cannot be stored")
        offset = sizes.get(dt, 0)
        blobs.setdefault(dt, []).append(np.ascontiguousarray(arr).reshape(-1))
        sizes[dt] = offset + arr.size
        out = {kind: dt, "at": offset, "shape": list(arr.shape)}
        if torch_dtype:
            out["torch"] = torch_dtype
        return out

    def encode(o: Any, where: str) -> Any:
        if isinstance(o, Mapping):
            items = []
            for key, value in o.items():
                if isinstance(key, bool) or not isinstance(key, (str, int)):
                    raise TypeError(f"{where}: key {key!r} is neither text nor an integer")
                items.append(
                    ["i" if isinstance(key, int) else "s", key, encode(value, f"{where}/{key}")]
                )
            return {"dict": items}
        if isinstance(o, (list, tuple)):
            kind = "tuple" if isinstance(o, tuple) else "list"
            return {kind: [encode(v, f"{where}[{i}]") for i, v in enumerate(o)]}
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu()
            return leaf("tensor", t.numpy(), where, str(t.dtype).removeprefix("torch."))
        if isinstance(o, np.ndarray):
            return leaf("ndarray", o, where)
        if o is None or isinstance(o, (bool, str)):
            return o
        if isinstance(o, (np.bool_, np.integer, np.floating)):
            return o.item()
        if isinstance(o, (int, float)):
            return {"float": repr(o)} if isinstance(o, float) and not math.isfinite(o) else o
        raise TypeError(f"{where}: cannot store a {type(o).__name__}")

    tree = encode(obj, f"{group.name.rstrip('/')}/{name}")
    sub = group.create_group(name)
    sub.attrs["tree"] = json.dumps(tree, allow_nan=False)
    for dt, parts in blobs.items():
        # written part by part: a concatenated copy would double the state in memory, on every
        # rank at the same moment
        data = sub.create_dataset(dt, shape=(sizes[dt],), dtype=np.dtype(dt))
        at = 0
        for part in parts:
            if part.size:
                data[at : at + part.size] = part
                at += part.size


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_tree(group: h5py.Group) -> Any:
    """The value :func:`write_tree` stored at ``group``."""
    try:
        tree = json.loads(_text(group.attrs["tree"]))
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{group.name}: not a stored state ({err})") from err
    blobs: dict[str, np.ndarray] = {}

    def array(node: dict[str, Any], kind: str) -> np.ndarray:
        dt = node[kind]
        if dt not in _DTYPES or dt not in group:
            raise CheckpointError(f"{group.name}: no data of dtype {dt!r}")
        if dt not in blobs:
            blobs[dt] = group[dt][()]
        size = int(np.prod(node["shape"], dtype=np.int64))
        part = blobs[dt][int(node["at"]) : int(node["at"]) + size]
        if part.size != size:
            raise CheckpointError(f"{group.name}: {dt} data is shorter than its index says")
        return part.reshape(node["shape"]).copy()

    def decode(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if "dict" in node:
            return {(int(k) if t == "i" else str(k)): decode(v) for t, k, v in node["dict"]}
        if "list" in node:
            return [decode(v) for v in node["list"]]
        if "tuple" in node:
            return tuple(decode(v) for v in node["tuple"])
        if "tensor" in node:
            return torch.from_numpy(array(node, "tensor")).to(getattr(torch, node["torch"]))
        if "ndarray" in node:
            return array(node, "ndarray")
        if "float" in node:
            return float(node["float"])
        raise CheckpointError(f"{group.name}: unknown entry {sorted(node)}")

    return decode(tree)


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
        self.last_bytes = 0

    def path(self, r: int) -> Path:
        """This rank's file for round ``r``."""
        return self.directory / f"rank{self.rank:05d}.round{r:06d}.ckpt"

    def save(self, r: int, state: Mapping[str, Any], attrs: Mapping[str, Any]) -> Path:
        """Write ``state`` as this rank's checkpoint of round ``r``, atomically."""
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

    def prune_before(self, r: int) -> None:
        """Remove this rank's files of rounds before ``r`` (asynchronous mode: the newest round
        every rank has saved, which the results file names)."""
        if not self.directory.is_dir():
            return
        for p in self.directory.glob(f"rank{self.rank:05d}.round*.ckpt"):
            m = _NAME.search(p.name)
            if m is not None and int(m.group(2)) < r:
                p.unlink(missing_ok=True)


# -- a federation's checkpoints (collective) ----------------------------------------------------
def backbone_checksum(fed: Federation) -> int:
    """CRC-32 of the shared part of this node's backbone (as ``round/backbone_checksum``)."""
    flat = fed.node.flat
    return checksum(flat.shared_part(flat.pack(), local_batchnorm=fed.config.federation.local_bn))


def save_checkpoint(fed: Federation, r: int) -> None:
    """Collective: every rank saves its state of round ``r``; then the results file names the
    round and older files go (the previous checkpoint stays until this one is complete).

    The time this takes on the rank (waiting for the slowest one included) is added to
    ``fed.checkpoint_seconds``."""
    assert fed.checkpoints is not None
    t0 = time.perf_counter()
    fed.checkpoints.save(r, fed.state_dict(), {"backbone_checksum": backbone_checksum(fed)})
    world = fed.topology.world
    size = np.zeros(1)
    mine = np.array([float(fed.checkpoints.last_bytes)])
    fed.topology.watchdog.fence(world, "every rank's checkpoint")
    world.Reduce([mine, MPI.DOUBLE], [size, MPI.DOUBLE], op=MPI.SUM, root=0)
    if fed.writer is not None:
        fed.writer.mark_checkpoint(r, str(fed.checkpoints.directory.resolve()), int(size[0]))
    fed.topology.watchdog.fence(world, "the checkpoint to be recorded")
    fed.checkpoints.prune(keep=r)
    fed.checkpoint_seconds += time.perf_counter() - t0


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
