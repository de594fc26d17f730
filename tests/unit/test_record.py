"""Unit tests for colnet_mpi.metrics.record: packing a rank's record, gathering it into rows."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest

from colnet_mpi.metrics.record import FIELDS, RecordSpec, axis_of
from colnet_mpi.metrics.writer import ResultsWriter, result_layout
from tests.unit.test_writer import METRICS, STAGES

NAN = math.nan

# Every dataset a rank packs: (shape of one node's value in letters, default), written out from
# the record: "e" one value per local epoch, "n" one per node, "nn" node-by-node.
PACKED: dict[str, tuple[str, float]] = {
    "epoch/train_loss": ("e", NAN),
    "epoch/val_loss": ("e", NAN),
    **{f"round/test_{m}": ("", NAN) for m in METRICS},
    "round/group": ("", -1),
    "round/leader": ("", 0),
    "round/backbone_checksum": ("", 0),
    "round/bytes_sent": ("", 0),
    "round/bytes_received": ("", 0),
    **{f"round/seconds/{s}": ("", 0.0) for s in STAGES},
    "round/clock": ("", NAN),
    "round/partition_stamp": ("", -1),
    "async/staleness": ("n", NAN),
    "async/leader_staleness": ("", NAN),
    "async/delta_staleness": ("n", NAN),
    "async/stood_in": ("", 0),
    "async/head_epochs": ("", 0),
    "async/trained": ("", NAN),
    "hca/weights": ("", NAN),
    "hca/mean_delta_norm": ("", NAN),
    "hca/update_norm": ("", NAN),
    "hca/solver_ok": ("", -1),
    "clustering/k": ("", 0),
    "attack/active": ("", 0),
    "defense/excluded": ("", 0),
    "defense/reason": ("", 0),
    "defense/norm_score": ("", NAN),
    "defense/cosine_score": ("", NAN),
    "defense/leader_rejected": ("", 0),
    "defense/verify_error": ("", NAN),
    "defense/refused": ("n", 0),
    "clustering/proposal": ("n", -1),
    "clustering/loss": ("n", NAN),
    "clustering/jacobian": ("n", NAN),
    "clustering/affinity": ("nn", NAN),
    "clustering/cosine": ("nn", NAN),
}
AFFINITY = {"clustering/affinity", "clustering/cosine"}
EPOCH = {"epoch/train_loss", "epoch/val_loss"}
REDUCED = {"hca/mean_delta_norm", "hca/update_norm", "hca/solver_ok", "clustering/k"}
WRITER = {"epoch/round": (), "clustering/ari": ()}  # computed by the writer rank


def dims(letters: str, n: int, e: int) -> tuple[int, ...]:
    return tuple({"e": e, "n": n}[c] for c in letters)


def packed_names(affinity: bool) -> list[str]:
    return [k for k in PACKED if affinity or k not in AFFINITY]


def random_values(rng: np.random.Generator, n: int, e: int, affinity: bool) -> dict:
    return {name: rng.normal(size=dims(PACKED[name][0], n, e)) for name in packed_names(affinity)}


def expected_row(name: str, n: int) -> tuple[int, ...]:
    """Shape of one dataset row, from the documented layout (independent of the spec's code)."""
    if name in WRITER or name in REDUCED:
        return ()
    if name in EPOCH:
        return (n,)
    return (n, *dims(PACKED[name][0], n, 1))


# ---------------------------------------------------------------------------------------------
def test_fields_are_the_documented_datasets() -> None:
    assert {f.name for f in FIELDS} == set(PACKED) | set(WRITER)
    assert len({f.name for f in FIELDS}) == len(FIELDS)  # no name declared twice


@pytest.mark.parametrize("affinity", [True, False])
@pytest.mark.parametrize("e", [1, 2, 3])
@pytest.mark.parametrize("n", range(1, 8))
def test_pack_unpack_round_trip(n: int, e: int, affinity: bool) -> None:
    rng = np.random.default_rng(100 * n + 10 * e + affinity)
    spec = RecordSpec(n, e, record_affinity=affinity)
    values = [random_values(rng, n, e, affinity) for _ in range(n)]
    width = sum(int(np.prod(dims(PACKED[k][0], n, e))) for k in packed_names(affinity))
    vectors = [spec.pack(v) for v in values]
    for vec in vectors:
        assert vec.shape == (width,) and vec.dtype == np.float64
    assert spec.width() == width
    cols = spec.unpack(np.stack(vectors))
    assert set(cols) == set(packed_names(affinity))
    for name, col in cols.items():
        expected = np.stack([v[name] for v in values])
        assert col.shape == (n, *dims(PACKED[name][0], n, e)), name
        np.testing.assert_array_equal(col, expected, err_msg=name)


@pytest.mark.parametrize("n", [1, 4])
def test_missing_fields_take_their_defaults(n: int) -> None:
    e = 2
    spec = RecordSpec(n, e, record_affinity=True)
    cols = spec.unpack(spec.pack({})[None])
    for name, (letters, default) in PACKED.items():
        col = cols[name]
        assert col.shape == (1, *dims(letters, n, e)), name
        if math.isnan(default):
            assert np.isnan(col).all(), name
        else:
            assert (col == default).all(), name
    # the documented markers, spelled out
    assert (cols["clustering/proposal"] == -1).all()
    assert (cols["hca/solver_ok"] == -1).all()
    assert np.isnan(cols["hca/weights"]).all()
    assert (cols["round/group"] == -1).all()


def test_partial_record_keeps_given_values() -> None:
    spec = RecordSpec(3, 2, record_affinity=False)
    cols = spec.unpack(spec.pack({"round/group": 2, "epoch/train_loss": [0.5, 0.25]})[None])
    assert cols["round/group"][0] == 2
    np.testing.assert_array_equal(cols["epoch/train_loss"][0], [0.5, 0.25])
    assert cols["round/leader"][0] == 0
    assert np.isnan(cols["epoch/val_loss"]).all()


@pytest.mark.parametrize(
    "name",
    ["round/unknown", "clustering/ari", "epoch/round", "clustering/affinity"],
)
def test_unknown_or_not_packed_names_raise_key_error(name: str) -> None:
    # ari and epoch/round are the writer's; affinity is absent without record_affinity
    spec = RecordSpec(3, 2, record_affinity=False)
    with pytest.raises(KeyError, match=name):
        spec.pack({name: 0.0, "round/group": 1})


def test_scalar_fills_a_whole_field() -> None:
    n, e = 3, 2
    spec = RecordSpec(n, e, record_affinity=True)
    cols = spec.unpack(
        spec.pack({"defense/refused": 1, "clustering/affinity": 0.5, "epoch/val_loss": 7.0})[None]
    )
    np.testing.assert_array_equal(cols["defense/refused"][0], np.ones(n))
    np.testing.assert_array_equal(cols["clustering/affinity"][0], np.full((n, n), 0.5))
    np.testing.assert_array_equal(cols["epoch/val_loss"][0], np.full(e, 7.0))


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("clustering/affinity", (3,)),  # a row would be copied into every row of the matrix
        ("clustering/affinity", (1, 3)),
        ("clustering/affinity", (3, 3, 1)),
        ("defense/refused", (1,)),  # one entry would be copied to every node
        ("defense/refused", (4,)),
        ("clustering/proposal", (3, 3)),
        ("round/group", (3,)),
        ("round/group", (1,)),
        ("epoch/train_loss", (3,)),
        ("epoch/train_loss", (1,)),
        ("epoch/train_loss", (2, 1)),
    ],
)
def test_wrongly_shaped_values_raise_naming_the_field(name: str, shape: tuple) -> None:
    spec = RecordSpec(3, 2, record_affinity=True)
    with pytest.raises(ValueError, match=name):
        spec.pack({name: np.zeros(shape)})


# ---------------------------------------------------------------------------------------------
def gather(spec: RecordSpec, values: list[dict]) -> np.ndarray:
    return np.stack([spec.pack(v) for v in values])


@pytest.mark.parametrize("affinity", [True, False])
@pytest.mark.parametrize(("n", "e"), [(1, 1), (2, 3), (5, 2), (7, 1)])
def test_rows_per_node_fields_and_epoch_transpose(n: int, e: int, affinity: bool) -> None:
    rng = np.random.default_rng(n * e)
    spec = RecordSpec(n, e, record_affinity=affinity)
    values = [random_values(rng, n, e, affinity) for _ in range(n)]
    computed = {"epoch/round": np.full(e, 4), "clustering/ari": 0.75}
    rows = spec.rows(gather(spec, values), computed)
    assert set(rows) == set(packed_names(affinity)) | set(WRITER)
    for name in EPOCH:
        got = np.asarray(rows[name])
        assert got.shape == (e, n)
        for i in range(n):
            for j in range(e):
                assert got[j, i] == values[i][name][j]
    for name in set(packed_names(affinity)) - EPOCH - REDUCED:
        np.testing.assert_array_equal(rows[name], np.stack([v[name] for v in values]), name)
    np.testing.assert_array_equal(rows["epoch/round"], [4] * e)
    assert rows["clustering/ari"] == 0.75


def test_solver_ok_is_the_worst_leader_status() -> None:
    spec = RecordSpec(5, 1, record_affinity=False)
    leader = [1, 0, 1, 0, 1]
    status = [1, 0, 1, 0, -1]  # non-leaders' 0s must not count
    values = [{"round/leader": a, "hca/solver_ok": s} for a, s in zip(leader, status, strict=True)]
    assert spec.rows(gather(spec, values), {"epoch/round": [1], "clustering/ari": 0})[
        "hca/solver_ok"
    ] == min(s for a, s in zip(leader, status, strict=True) if a)
    values[4]["hca/solver_ok"] = 1
    rows = spec.rows(gather(spec, values), {"epoch/round": [1], "clustering/ari": 0})
    assert rows["hca/solver_ok"] == 1
    values[2]["hca/solver_ok"] = 0
    rows = spec.rows(gather(spec, values), {"epoch/round": [1], "clustering/ari": 0})
    assert rows["hca/solver_ok"] == 0


def test_solver_ok_without_leader_is_minus_one() -> None:
    spec = RecordSpec(3, 1, record_affinity=False)
    values = [{"round/leader": 0, "hca/solver_ok": 1} for _ in range(3)]
    rows = spec.rows(gather(spec, values), {"epoch/round": [1], "clustering/ari": 0})
    assert rows["hca/solver_ok"] == -1


@pytest.mark.parametrize("name", ["hca/mean_delta_norm", "hca/update_norm"])
def test_leader_values_are_the_finite_one_or_nan(name: str) -> None:
    spec = RecordSpec(4, 1, record_affinity=False)
    computed = {"epoch/round": [1], "clustering/ari": 0}
    values: list[dict] = [{}, {name: 2.5}, {}, {name: 2.5}]  # the others report NaN
    assert spec.rows(gather(spec, values), computed)[name] == 2.5
    assert math.isnan(spec.rows(gather(spec, [{}] * 4), computed)[name])


def test_clustering_k_is_nanmax() -> None:
    spec = RecordSpec(4, 1, record_affinity=False)
    values = [{"clustering/k": k} for k in (2, 3, NAN, 1)]
    rows = spec.rows(gather(spec, values), {"epoch/round": [1], "clustering/ari": 0})
    assert rows["clustering/k"] == 3
    assert (
        spec.rows(gather(spec, [{}] * 4), {"epoch/round": [1], "clustering/ari": 0})["clustering/k"]
        == 0
    )


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("affinity", [True, False])
@pytest.mark.parametrize(("n", "e"), [(1, 1), (3, 2), (6, 3)])
def test_layout_rows_match_rows(n: int, e: int, affinity: bool) -> None:
    spec = RecordSpec(n, e, record_affinity=affinity)
    layout = spec.layout()
    expected_names = set(packed_names(affinity)) | set(WRITER)
    assert set(layout) == expected_names
    for name in expected_names:
        assert layout[name].row == expected_row(name, n), name
    values = [random_values(np.random.default_rng(i), n, e, affinity) for i in range(n)]
    rows = spec.rows(gather(spec, values), {"epoch/round": np.full(e, 1), "clustering/ari": 0.1})
    for name, value in rows.items():  # epoch datasets: e rows per round; others: one row
        expected = (e, *layout[name].row) if axis_of(name) == "epoch" else layout[name].row
        assert np.shape(value) == expected, name


def test_layout_dtypes() -> None:
    layout = RecordSpec(3, 2, record_affinity=True).layout()
    assert layout["round/leader"].dtype == "i1"
    assert layout["hca/solver_ok"].dtype == "i1"
    assert layout["round/group"].dtype == "i4"
    assert layout["clustering/proposal"].dtype == "i4"
    assert layout["round/bytes_sent"].dtype == "i8"
    assert layout["round/backbone_checksum"].dtype == "i8"
    assert layout["clustering/affinity"].dtype == "f4"
    assert layout["epoch/train_loss"].dtype == "f8"


def test_axis_of() -> None:
    for name in ("epoch/train_loss", "epoch/val_loss", "epoch/round"):
        assert axis_of(name) == "epoch"
    for name in ("round/test_loss", "hca/solver_ok", "clustering/affinity", "defense/refused"):
        assert axis_of(name) == "round"
    assert axis_of("epoch/something_new") == "epoch"  # unknown: by prefix
    assert axis_of("round/something_new") == "round"
    assert axis_of("other") == "round"


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("affinity", [True, False])
@pytest.mark.parametrize("n", [1, 3, 5])
def test_writer_layout_is_the_spec_layout(n: int, affinity: bool) -> None:
    for e in (1, 2, 3):  # one row per epoch: the epoch count is not part of a row
        assert (
            result_layout(n, record_affinity=affinity)
            == RecordSpec(n, e, record_affinity=affinity).layout()
        )


@pytest.mark.parametrize("affinity", [True, False])
def test_writer_appends_spec_rows(tmp_path, affinity: bool) -> None:
    n, e = 3, 2
    path = tmp_path / "run.h5"
    writer = ResultsWriter(
        path,
        attrs={"config": "", "world_size": n},
        node_names=["a", "b", "c"],
        node_tasks=["attributes"] * n,
        true_groups=["attributes"] * n,
        record_affinity=affinity,
    )
    spec = RecordSpec(n, e, record_affinity=affinity)
    rng = np.random.default_rng(5)
    rounds = []
    for r in (1, 2):
        node_values = []
        for i in range(n):
            v = random_values(rng, n, e, affinity)
            v["round/group"] = i % 2
            v["round/leader"] = int(i < 2)
            v["hca/solver_ok"] = 1
            v["clustering/k"] = 2
            v["clustering/proposal"] = rng.integers(0, 2, size=n)
            node_values.append(v)
        rows = spec.rows(
            gather(spec, node_values), {"epoch/round": np.full(e, r), "clustering/ari": 0.5}
        )
        writer.append(rows)
        rounds.append(rows)
    with h5py.File(path, "r") as f:
        assert ("clustering/affinity" in f) == affinity
        assert f["epoch/train_loss"].shape == (2 * e, n)
        np.testing.assert_array_equal(f["epoch/round"][()], [1] * e + [2] * e)
        np.testing.assert_array_equal(
            f["epoch/train_loss"][()], np.vstack([r["epoch/train_loss"] for r in rounds])
        )
        assert f["round/group"].shape == (2, n)
        np.testing.assert_array_equal(f["round/group"][()], [[0, 1, 0]] * 2)
        np.testing.assert_array_equal(f["hca/solver_ok"][()], [1, 1])
        np.testing.assert_array_equal(f["clustering/k"][()], [2, 2])
        assert f["clustering/proposal"].shape == (2, n, n)
        np.testing.assert_array_equal(
            f["clustering/proposal"][()], np.stack([r["clustering/proposal"] for r in rounds])
        )
        np.testing.assert_allclose(
            f["round/test_loss"][()], np.stack([r["round/test_loss"] for r in rounds])
        )
        if affinity:
            assert f["clustering/affinity"].shape == (2, n, n, n)
