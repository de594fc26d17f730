"""Unit tests for the notebook tables (reader.tidy / tidy_epochs) and the dataset attributes."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from colnet_mpi.metrics.record import FIELDS, RecordSpec
from colnet_mpi.metrics.writer import ResultsWriter

pd = pytest.importorskip("pandas")

from colnet_mpi.metrics.reader import tidy, tidy_epochs  # noqa: E402

NAMES = ["attributes-0", "attributes-1", "landmarks-0"]
TASKS = ["attributes", "attributes", "landmarks"]
GROUPS = ["attributes", "attributes", "landmarks"]
N, ROUNDS = len(NAMES), 3

# Per-node round datasets written out by hand (independent of the spec's code) -> column
COLUMNS = {
    "round/test_loss": "test_loss",
    "round/test_f1_micro": "test_f1_micro",
    "round/test_recall_macro": "test_recall_macro",
    "round/group": "group",
    "round/leader": "leader",
    "round/backbone_checksum": "backbone_checksum",
    "round/bytes_sent": "bytes_sent",
    "round/bytes_received": "bytes_received",
    "round/seconds/local_train": "seconds_local_train",
    "round/seconds/total": "seconds_total",
    "hca/weights": "hca_weights",
    "attack/active": "attack_active",
    "defense/excluded": "defense_excluded",
    "defense/reason": "defense_reason",
    "defense/norm_score": "defense_norm_score",
    "defense/verify_error": "defense_verify_error",
}
ROUND_SCALARS = {"clustering/ari": "clustering_ari", "clustering/k": "clustering_k"}
NOT_COLUMNS = {"defense_refused", "clustering_proposal", "clustering_loss", "clustering_affinity"}


def config(name: str, seed: int, epochs: int, *, rounds: int = ROUNDS) -> str:
    return (
        f'[run]\nname = "{name}"\nseed = {seed}\noutput = "results/{name}.h5"\n'
        f'[data]\ndataset = "synthetic"\n'
        f"[training]\nrounds = {rounds}\nlocal_epochs = {epochs}\nlr = 0.01\n"
    )


def write_run(
    path: Path,
    *,
    name: str,
    seed: int,
    epochs: int,
    rounds: int = ROUNDS,
    finish: bool = True,
    affinity: bool = False,
) -> None:
    """A results file as the writer rank makes it: spec rows of random node records."""
    writer = ResultsWriter(
        path,
        attrs={"config": config(name, seed, epochs, rounds=ROUNDS), "seed": seed, "world_size": N},
        node_names=NAMES,
        node_tasks=TASKS,
        true_groups=GROUPS,
        record_affinity=affinity,
    )
    spec = RecordSpec(N, epochs, record_affinity=affinity)
    rng = np.random.default_rng(seed * 100 + epochs)
    for r in range(1, rounds + 1):
        records = []
        for i in range(N):
            values: dict = {}
            for f in spec.packed:
                size = int(np.prod(spec._dims(f.shape)))
                if f.dtype.startswith("f"):
                    value = rng.normal(size=size)
                else:
                    value = rng.integers(0, 3, size=size)
                values[f.name] = value.reshape(spec._dims(f.shape)) if f.shape else value[0]
            values["round/leader"] = int(i == r % N)
            values["round/bytes_sent"] = int(rng.integers(0, 10**12))
            records.append(spec.pack(values))
        computed = {"epoch/round": np.full(epochs, r), "clustering/ari": float(rng.uniform())}
        writer.append(spec.rows(np.stack(records), computed))
    if finish:
        writer.finish()


@pytest.fixture
def three_runs(tmp_path: Path) -> list[Path]:
    """Two seeds of local_epochs = 1 and one of local_epochs = 2."""
    specs = [("sweep_0", 1, 1), ("sweep_1", 2, 1), ("sweep_2", 1, 2)]
    paths = []
    for name, seed, epochs in specs:
        path = tmp_path / f"{name}.h5"
        write_run(path, name=name, seed=seed, epochs=epochs)
        paths.append(path)
    return paths


def read(path: Path, name: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return np.asarray(f[name][()])


def test_tidy_one_row_per_run_round_node(three_runs: list[Path]) -> None:
    df = tidy([three_runs[0].parent])
    assert len(df) == 3 * ROUNDS * N
    assert not df.duplicated(["file", "round", "node"]).any()
    assert sorted(df["round"].unique()) == list(range(1, ROUNDS + 1))
    assert sorted(df["node"].unique()) == list(range(N))
    assert set(df["run"]) == {"sweep_0", "sweep_1", "sweep_2"}
    assert set(df["seed"]) == {1, 2}
    for column in ("file", "run", "seed", "round", "node", "node_name", "task", "true_group"):
        assert column in df.columns
    for column in [*COLUMNS.values(), *ROUND_SCALARS.values()]:
        assert column in df.columns, column
    assert not NOT_COLUMNS & set(df.columns)


def test_tidy_columns_are_the_differing_settings(three_runs: list[Path]) -> None:
    df = tidy(three_runs)
    assert "training.local_epochs" in df.columns
    for same in ("training.rounds", "training.lr", "data.dataset"):
        assert same not in df.columns
    for never in ("run.seed", "run.name", "run.output"):  # replicates, not settings
        assert never not in df.columns
    by_run = df.groupby("run")["training.local_epochs"].unique()
    assert {k: list(v) for k, v in by_run.items()} == {
        "sweep_0": [1],
        "sweep_1": [1],
        "sweep_2": [2],
    }


def test_tidy_values_are_the_datasets_at_round_and_node(three_runs: list[Path]) -> None:
    df = tidy(three_runs)
    for path in three_runs:
        rows = df[df["file"] == str(path)]
        assert len(rows) == ROUNDS * N
        for name, column in COLUMNS.items():
            data = read(path, name)
            assert data.shape == (ROUNDS, N)
            for _, row in rows.iterrows():
                expected = data[row["round"] - 1, row["node"]]
                np.testing.assert_equal(row[column], expected, err_msg=f"{path} {name}")
        for name, column in ROUND_SCALARS.items():
            data = read(path, name)
            for _, row in rows.iterrows():
                np.testing.assert_equal(row[column], data[row["round"] - 1])
        for _, row in rows.iterrows():
            assert row["node_name"] == NAMES[row["node"]]
            assert row["task"] == TASKS[row["node"]]
            assert row["true_group"] == GROUPS[row["node"]]
    # the integer datasets keep their integers (a checksum must not go through float)
    assert df["backbone_checksum"].dtype.kind == "i"
    assert df["bytes_sent"].dtype.kind == "i"


def test_tidy_has_no_bytes(three_runs: list[Path]) -> None:
    df = tidy(three_runs)
    for column in df.columns:
        assert not isinstance(column, bytes)
        values = df[column].tolist()
        assert not any(isinstance(v, bytes) for v in values), column
    assert {type(v) for v in df["node_name"]} == {str}
    assert {type(v) for v in df["file"]} == {str}
    assert {type(v) for v in df["run"]} == {str}


def test_tidy_every_node_round_dataset_of_the_spec_is_a_column(three_runs: list[Path]) -> None:
    df = tidy(three_runs[:1])
    with h5py.File(three_runs[0], "r") as f:
        node_round = [
            name
            for name in (fl.name for fl in FIELDS)
            if name in f and f[name].ndim == 2 and f[name].attrs["dims"] == "round,node"
        ]
    assert len(node_round) >= len(COLUMNS)
    for name in node_round:
        column = name.removeprefix("round/").replace("/", "_")
        assert column in df.columns, name


def test_tidy_epochs_rows(three_runs: list[Path]) -> None:
    df = tidy_epochs(three_runs)
    epochs = {"sweep_0": 1, "sweep_1": 1, "sweep_2": 2}
    assert len(df) == sum(e * ROUNDS * N for e in epochs.values())
    assert {"train_loss", "val_loss", "epoch", "round", "node", "node_name"} <= set(df.columns)
    assert "training.local_epochs" in df.columns
    for path in three_runs:
        rows = df[df["file"] == str(path)]
        e = epochs[path.stem]
        assert len(rows) == e * ROUNDS * N
        train = read(path, "epoch/train_loss")
        val = read(path, "epoch/val_loss")
        epoch_round = read(path, "epoch/round")
        for _, row in rows.iterrows():
            i = row["epoch"] - 1
            assert row["round"] == epoch_round[i]
            np.testing.assert_equal(row["train_loss"], train[i, row["node"]])
            np.testing.assert_equal(row["val_loss"], val[i, row["node"]])
        assert rows.groupby("round").size().tolist() == [e * N] * ROUNDS


def test_tidy_unfinished_run_cut_to_complete_rounds(tmp_path: Path) -> None:
    write_run(tmp_path / "done.h5", name="done", seed=1, epochs=1)
    write_run(tmp_path / "partial.h5", name="partial", seed=2, epochs=1, rounds=2, finish=False)
    with pytest.warns(UserWarning):
        df = tidy([tmp_path])
    assert set(df["run"]) == {"done"}
    with pytest.warns(UserWarning):
        df = tidy([tmp_path], include_unfinished=True)
    assert len(df) == (ROUNDS + 2) * N
    assert df[df["run"] == "partial"]["round"].max() == 2


@pytest.mark.parametrize("affinity", [False, True])
def test_every_dataset_has_description_unit_and_dims(tmp_path: Path, affinity: bool) -> None:
    path = tmp_path / "run.h5"
    write_run(path, name="x", seed=0, epochs=2, rounds=1, affinity=affinity)
    seen = []

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset):
            seen.append(name)
            description = obj.attrs.get("description")
            dims = obj.attrs.get("dims")
            assert isinstance(description, str) and description, name
            assert isinstance(dims, str) and dims, name
            assert isinstance(obj.attrs.get("unit"), str), name
            axes = dims.split(",")
            assert len(axes) == obj.ndim, f"{name}: dims {dims} for shape {obj.shape}"
            assert set(axes) <= {"round", "epoch", "node"}, name
            lengths = {"round": 1, "epoch": 2, "node": N}
            assert obj.shape == tuple(lengths[a] for a in axes), name

    with h5py.File(path, "r") as f:
        f.visititems(visit)
        assert f["round/seconds/total"].attrs["unit"] == "s"
        assert f["round/bytes_sent"].attrs["unit"] == "bytes"
        assert f["round/test_loss"].attrs["dims"] == "round,node"
        assert f["epoch/val_loss"].attrs["dims"] == "epoch,node"
        assert f["clustering/ari"].attrs["dims"] == "round"
        assert f["defense/refused"].attrs["dims"] == "round,node,node"
        assert f["nodes/name"].attrs["dims"] == "node"
    assert {"nodes/name", "nodes/task", "nodes/true_group", "round/test_loss"} <= set(seen)
    assert ("clustering/affinity" in seen) == affinity


def test_spec_attributes_cover_every_field() -> None:
    spec = RecordSpec(4, 3, record_affinity=True)
    attributes = spec.attributes()
    layout = spec.layout()
    assert set(layout) <= set(attributes)
    for name, series in layout.items():
        # one row per round or epoch, then the row shape
        assert len(attributes[name]["dims"].split(",")) == 1 + len(series.row), name
        assert attributes[name]["description"], name
