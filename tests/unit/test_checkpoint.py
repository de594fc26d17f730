"""Unit tests for colnet_mpi.federation.checkpoint: numeric HDF5 trees and per-rank files."""

from __future__ import annotations

import json
import math
import os

import h5py
import numpy as np
import pytest
import torch

from colnet_mpi.federation.checkpoint import (
    Checkpointer,
    CheckpointError,
    read_tree,
    write_tree,
)


def round_trip(tmp_path, obj, name: str = "x"):
    path = tmp_path / "tree.h5"
    with h5py.File(path, "w") as f:
        write_tree(f, name, obj)
    with h5py.File(path, "r") as f:
        return read_tree(f[name])


def assert_top_level(got: dict, want: dict) -> None:
    """A loaded checkpoint: the same entries (the file's top level is read in name order)."""
    assert sorted(got) == sorted(want)
    for k in want:
        assert_same(got[k], want[k], k)


def assert_same(a, b, where: str = "") -> None:
    """Structural equality that also compares container and leaf types and dtypes exactly."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k!r}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan()))
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


# -- trees ---------------------------------------------------------------------------------------
def test_nested_dicts_keep_key_types_and_order(tmp_path) -> None:
    tree = {
        "z": 1,
        3: "three",
        "a": {10: [1, 2], 2: {"x/y.z": None}, "": (3,)},  # '/' and '' are fine as keys
        -1: {},
        "0": "text key zero",
        0: "int key zero",
    }
    got = round_trip(tmp_path, tree)
    assert_same(got, tree)
    assert list(got) == ["z", 3, "a", -1, "0", 0]
    assert list(got["a"]) == [10, 2, ""]


def test_lists_and_tuples_stay_distinct(tmp_path) -> None:
    tree = {"l": [1, [2, 3], (4, 5)], "t": (1, [2], ()), "empty_list": [], "empty_tuple": ()}
    got = round_trip(tmp_path, tree)
    assert_same(got, tree)
    assert isinstance(got["l"][2], tuple) and isinstance(got["t"][1], list)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 4, dtype=torch.float32),
        torch.randn(5, dtype=torch.float64),
        torch.randn(2, 3, dtype=torch.float16),
        torch.tensor([-(2**62), 0, 2**62], dtype=torch.int64),
        torch.tensor([[0, 7], [200, 255]], dtype=torch.uint8),
        torch.tensor([-3, 4], dtype=torch.int32),
        torch.tensor([True, False, True]),
        torch.tensor(2.5),  # 0-d
        torch.tensor(7, dtype=torch.int64),  # 0-d integer (e.g. an optimizer step)
        torch.tensor(True),
        torch.zeros(0, 3),
        torch.arange(12.0).reshape(3, 4).T,  # not contiguous
        torch.ones(3, requires_grad=True) * 2,  # attached to a graph
        torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float32),
    ],
    ids=lambda t: f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}",
)
def test_tensors_keep_values_dtype_and_shape(tmp_path, tensor: torch.Tensor) -> None:
    got = round_trip(tmp_path, tensor)
    assert isinstance(got, torch.Tensor)
    assert got.dtype == tensor.dtype and got.shape == tensor.shape
    want = tensor.detach()
    if want.is_floating_point():
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    else:
        assert torch.equal(got, want)
    assert not got.requires_grad


@pytest.mark.parametrize(
    "array",
    [
        np.arange(6, dtype=np.int16).reshape(2, 3),
        np.random.default_rng(0).normal(size=(4, 2)),
        np.array([1.5, np.nan], dtype=np.float32),
        np.array([True, False]),
        np.array(3, dtype=np.uint64),
        np.array([2**64 - 1], dtype=np.uint64),
        np.zeros((0,), dtype=np.int64),
        np.zeros((0, 3), dtype=np.int64),  # e.g. no round's groups yet
    ],
    ids=lambda a: f"{a.dtype}{list(a.shape)}",
)
def test_numpy_arrays_keep_values_and_dtype(tmp_path, array: np.ndarray) -> None:
    got = round_trip(tmp_path, array)
    assert isinstance(got, np.ndarray)
    assert got.dtype == array.dtype and got.shape == array.shape
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -5,
        2**63 - 1,
        -(2**63),
        2**63,  # bigint from here
        -(2**63) - 1,
        3**100,
        -(7**50),
        0.1,
        -0.0,
        1e308,
        math.inf,
        -math.inf,
        math.nan,
        "",
        "text",
        "ünïcødé ✓ with\nnewline",
    ],
    ids=repr,
)
def test_scalars_round_trip_with_their_type(tmp_path, value) -> None:
    got = round_trip(tmp_path, value)
    assert type(got) is type(value)
    if isinstance(value, float) and math.isnan(value):
        assert math.isnan(got)
    else:
        assert got == value
        if isinstance(value, float):
            assert math.copysign(1.0, got) == math.copysign(1.0, value)


def test_numpy_scalars_become_python_numbers(tmp_path) -> None:
    got = round_trip(
        tmp_path, [np.int32(-4), np.float32(0.5), np.bool_(True), np.uint64(2**64 - 1)]
    )
    assert got == [-4, 0.5, True, 2**64 - 1]
    assert [type(v) for v in got] == [int, float, bool, int]


class _Thing:
    pass


@pytest.mark.parametrize(
    "bad",
    [
        {1, 2},
        np.array([1, "a"], dtype=object),
        lambda x: x,
        _Thing(),
        b"bytes",
        {"nested": [1, {"deep": {3}}]},
        {(1, 2): "tuple key"},
        {True: "bool key"},
        {1.5: "float key"},
    ],
    ids=["set", "object-array", "function", "instance", "bytes", "nested-set", "tuple-key",
         "bool-key", "float-key"],
)  # fmt: skip
def test_unsupported_objects_raise_type_error(tmp_path, bad) -> None:
    with h5py.File(tmp_path / "bad.h5", "w") as f, pytest.raises(TypeError):
        write_tree(f, "x", bad)


def test_unknown_kind_raises_checkpoint_error(tmp_path) -> None:
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("d", data=1).attrs["kind"] = "pickle"
        f.create_group("g").attrs["kind"] = "set"
        f.create_dataset("untagged", data=1)
    with h5py.File(path, "r") as f:
        for name in ("d", "g", "untagged"):
            with pytest.raises(CheckpointError, match=name):
                read_tree(f[name])


# -- a real optimizer ------------------------------------------------------------------------------
def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    return model, opt, sched


def _step(model, opt, sched, x, y) -> None:
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    sched.step()


def test_adamw_and_scheduler_resume_bit_identically(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(8, 5, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(6)
    ]
    model, opt, sched = _model_and_optimizer(0)
    for x, y in batches[:3]:
        _step(model, opt, sched, x, y)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
    }
    got = round_trip(tmp_path, state, "state")
    assert_same(dict(got["model"]), dict(state["model"]))
    assert_same(got["optimizer"], state["optimizer"])
    assert_same(got["scheduler"], state["scheduler"])

    fresh, fresh_opt, fresh_sched = _model_and_optimizer(1)  # other initial weights
    fresh.load_state_dict(got["model"])
    fresh_opt.load_state_dict(got["optimizer"])
    fresh_sched.load_state_dict(got["scheduler"])
    for x, y in batches[3:]:
        _step(model, opt, sched, x, y)
        _step(fresh, fresh_opt, fresh_sched, x, y)
        for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
            assert torch.equal(a, b)
        assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.9**6)


# -- files -----------------------------------------------------------------------------------------
def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "node": {"backbone": torch.randn(10, generator=g), "step": seed, "name": f"n{seed}"},
        "federation": {"round": seed, "groups": np.arange(4).reshape(1, 4)},
    }


def test_save_and_load(tmp_path) -> None:
    ckpt = Checkpointer(tmp_path / "ckpt", rank=2, world_size=4)
    state = _state(3)
    path = ckpt.save(3, state, {"backbone_checksum": 1234})
    assert path == ckpt.path(3) and path.is_file()
    assert path.parent == tmp_path / "ckpt"  # the folder is created
    assert ckpt.last_bytes == path.stat().st_size > 0
    got, attrs = ckpt.load(3)
    assert_top_level(got, state)
    assert int(attrs["backbone_checksum"]) == 1234
    assert (int(attrs["round"]), int(attrs["rank"]), int(attrs["world_size"])) == (3, 2, 4)
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


def test_load_missing_file(tmp_path) -> None:
    ckpt = Checkpointer(tmp_path, rank=0, world_size=2)
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.load(1)
    ckpt.save(1, _state(1), {})
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.load(2)
    with pytest.raises(CheckpointError, match="missing"):
        Checkpointer(tmp_path, rank=1, world_size=2).load(1)


def test_load_unreadable_file(tmp_path) -> None:
    ckpt = Checkpointer(tmp_path, rank=0, world_size=1)
    ckpt.path(1).write_bytes(b"not an HDF5 file at all")
    with pytest.raises(CheckpointError, match="not readable"):
        ckpt.load(1)


def test_load_checks_world_size(tmp_path) -> None:
    Checkpointer(tmp_path, rank=1, world_size=4).save(2, _state(2), {})
    with pytest.raises(CheckpointError) as info:
        Checkpointer(tmp_path, rank=1, world_size=5).load(2)
    message = str(info.value)
    assert "holds round 2 of rank 1 of 4" in message
    assert "expected round 2 of rank 1 of 5" in message


def test_load_checks_round_and_rank(tmp_path) -> None:
    ckpt = Checkpointer(tmp_path, rank=1, world_size=3)
    ckpt.save(2, _state(2), {})
    os.replace(ckpt.path(2), ckpt.path(5))  # a file under another round's name
    with pytest.raises(CheckpointError, match="expected round 5 of rank 1 of 3"):
        ckpt.load(5)
    other = Checkpointer(tmp_path, rank=0, world_size=3)
    other.save(4, _state(4), {})
    os.replace(other.path(4), ckpt.path(4))  # rank 0's file where rank 1 looks
    with pytest.raises(CheckpointError) as info:
        ckpt.load(4)
    assert "holds round 4 of rank 0 of 3" in str(info.value)
    assert "expected round 4 of rank 1 of 3" in str(info.value)


def test_crash_mid_write_keeps_previous_round_and_prune_removes_tmp(tmp_path) -> None:
    ckpt = Checkpointer(tmp_path, rank=0, world_size=2)
    state = _state(3)
    ckpt.save(3, state, {"backbone_checksum": 3})
    # a write that dies half-way (an unsupported leaf after some data is written)
    with pytest.raises(TypeError):
        ckpt.save(4, {"node": {"backbone": torch.ones(5)}, "bad": {1, 2}}, {})
    tmp = ckpt.path(4).with_name(ckpt.path(4).name + ".tmp")
    assert tmp.is_file() and not ckpt.path(4).exists()
    # and a truncated temporary file, as a SIGKILL during the write would leave
    tmp5 = ckpt.path(5).with_name(ckpt.path(5).name + ".tmp")
    tmp5.write_bytes(ckpt.path(3).read_bytes()[:100])
    got, attrs = ckpt.load(3)
    assert_top_level(got, state)
    with pytest.raises(CheckpointError):
        ckpt.load(4)
    ckpt.prune(keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.path(3).name]
    assert_top_level(ckpt.load(3)[0], state)


def test_save_after_a_failed_save_succeeds(tmp_path) -> None:
    ckpt = Checkpointer(tmp_path, rank=0, world_size=1)
    with pytest.raises(TypeError):
        ckpt.save(1, {"bad": object()}, {})
    ckpt.save(1, _state(1), {})
    assert_top_level(ckpt.load(1)[0], _state(1))
    assert not list(tmp_path.glob("*.tmp"))


def test_save_replaces_an_existing_file(tmp_path) -> None:
    ckpt = Checkpointer(tmp_path, rank=0, world_size=1)
    ckpt.save(1, _state(1), {})
    ckpt.save(1, _state(7), {})
    assert_top_level(ckpt.load(1)[0], _state(7))


def test_prune_keeps_one_round_of_this_rank_only(tmp_path) -> None:
    mine = Checkpointer(tmp_path, rank=1, world_size=3)
    others = [Checkpointer(tmp_path, rank=r, world_size=3) for r in (0, 2)]
    for r in (1, 2, 3):
        mine.save(r, _state(r), {})
        for o in others:
            o.save(r, _state(r), {})
    other_tmp = others[0].path(4).with_name(others[0].path(4).name + ".tmp")
    other_tmp.write_bytes(b"partial")
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("keep me")
    before = {p.name for p in tmp_path.iterdir()}
    mine.prune(keep=2)
    after = {p.name for p in tmp_path.iterdir()}
    assert before - after == {mine.path(1).name, mine.path(3).name}
    assert mine.path(2).name in after
    mine.load(2)
    for o in others:
        for r in (1, 2, 3):
            assert o.path(r).is_file()
    assert other_tmp.is_file() and unrelated.is_file()


def test_prune_without_folder_does_nothing(tmp_path) -> None:
    Checkpointer(tmp_path / "absent", rank=0, world_size=1).prune(keep=1)
    assert not (tmp_path / "absent").exists()


def test_file_holds_no_pickled_data(tmp_path) -> None:
    model, opt, sched = _model_and_optimizer(0)
    x, y = torch.randn(4, 5), torch.randn(4, 2)
    _step(model, opt, sched, x, y)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "misc": {"none": None, "big": 2**70, "text": "t", "flags": np.array([True, False])},
    }
    path = Checkpointer(tmp_path, rank=0, world_size=1).save(1, state, {"backbone_checksum": 9})
    plain = (h5py.h5t.INTEGER, h5py.h5t.FLOAT, h5py.h5t.ENUM)
    seen: list[str] = []

    def check(name: str, obj) -> None:
        seen.append(name)
        if isinstance(obj, h5py.Group):  # a stored state: its structure is JSON text
            json.loads(obj.attrs["tree"])
            return
        type_class = obj.id.get_type().get_class()
        assert type_class in plain, f"{name}: HDF5 type class {type_class}"
        if type_class == h5py.h5t.ENUM:  # only numpy bools are stored as enums
            assert obj.dtype == np.bool_, name
        assert obj.dtype.kind not in "OV", name  # no objects, no opaque bytes
        assert obj.ndim == 1, name  # one flat array per dtype
        obj[()]  # and every dataset reads without any Python object hook

    with h5py.File(path, "r") as f:
        f.visititems(check)
        for value in f.attrs.values():
            assert not isinstance(value, np.void)
    # the four states, each a group with its flat arrays (float32 weights, int64 counters, bools)
    assert {"model", "optimizer", "scheduler", "misc"} <= set(seen) and len(seen) >= 7, seen
