"""Unit tests for colnet_mpi.metrics.writer: the results-file layout, appending, status attributes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from colnet_mpi.metrics.writer import ResultsWriter, mark_failed, result_layout

N = 3
NAMES = ["attributes-0", "attributes-1", "landmarks-0"]
TASKS = ["attributes", "attributes", "landmarks"]
GROUPS = ["attributes", "attributes", "landmarks"]
STAGES = [
    "local_train",
    "exchange",
    "clustering",
    "intra",
    "cross",
    "redistribute",
    "evaluate",
    "total",
]
METRICS = [
    "loss",
    "precision_micro",
    "recall_micro",
    "f1_micro",
    "precision_macro",
    "recall_macro",
    "f1_macro",
]

# the results-file interface names -> shape of one row after the round/epoch axis (n = nodes)
PER_NODE = (
    ["epoch/train_loss", "epoch/val_loss"]
    + [f"round/test_{m}" for m in METRICS]
    + [
        "round/group",
        "round/leader",
        "round/backbone_checksum",
        "round/bytes_sent",
        "round/bytes_received",
        "hca/weights",
    ]
    + [f"round/seconds/{s}" for s in STAGES]
)
PER_ROUND = ["clustering/ari", "hca/mean_delta_norm", "hca/update_norm", "hca/solver_ok"]


def design_rows(n: int) -> dict[str, tuple[int, ...]]:
    rows: dict[str, tuple[int, ...]] = {name: (n,) for name in PER_NODE}
    rows.update({name: () for name in PER_ROUND})
    rows["clustering/proposal"] = (n, n)
    rows["clustering/affinity"] = (n, n, n)
    return rows


def make_writer(path, *, record_affinity: bool = True, overwrite: bool = False) -> ResultsWriter:
    return ResultsWriter(
        path,
        attrs={"config": "[run]\nname = 'x'\n", "world_size": N, "seed": 0},
        node_names=NAMES,
        node_tasks=TASKS,
        true_groups=GROUPS,
        record_affinity=record_affinity,
        overwrite=overwrite,
    )


def one_round(rng: np.random.Generator, n: int = N) -> dict[str, np.ndarray]:
    """Random rows for every results-file series (integers for the integer series)."""
    rows: dict[str, np.ndarray] = {}
    for name, shape in design_rows(n).items():
        rows[name] = rng.normal(size=shape)
    rows["round/group"] = rng.integers(0, 2, size=n)
    rows["round/leader"] = rng.integers(0, 2, size=n).astype(np.int8)
    rows["round/backbone_checksum"] = rng.integers(0, 2**32, size=n, dtype=np.int64)
    rows["round/bytes_sent"] = rng.integers(0, 10**12, size=n, dtype=np.int64)
    rows["round/bytes_received"] = rng.integers(0, 10**12, size=n, dtype=np.int64)
    rows["clustering/proposal"] = rng.integers(0, 3, size=(n, n))
    rows["hca/solver_ok"] = np.int8(1)
    rows["hca/weights"][1] = np.nan  # NaN for non-leaders must survive
    return rows


def test_layout_contains_every_design_name():
    rows = design_rows(N)
    layout = result_layout(N, record_affinity=True)
    for name, shape in rows.items():
        assert name in layout, name
        assert layout[name].row == shape, name
    assert "clustering/affinity" not in result_layout(N, record_affinity=False)


def test_new_file_has_every_design_dataset(tmp_path):
    path = tmp_path / "sub" / "run.h5"  # parent directory is created
    make_writer(path)
    with h5py.File(path, "r") as f:
        assert list(f["nodes/name"].asstr()[()]) == NAMES
        assert list(f["nodes/task"].asstr()[()]) == TASKS
        assert list(f["nodes/true_group"].asstr()[()]) == GROUPS
        for name, shape in design_rows(N).items():
            assert name in f, name
            ds = f[name]
            assert ds.shape == (0, *shape), name
            assert ds.maxshape == (None, *shape), name
        assert np.issubdtype(f["round/group"].dtype, np.integer)
        assert f["round/leader"].dtype == np.int8
        assert f["hca/solver_ok"].dtype == np.int8
        assert np.issubdtype(f["round/test_f1_macro"].dtype, np.floating)
        assert f.attrs["status"] == "running"
        assert f.attrs["world_size"] == N
        assert f.attrs["config"] == "[run]\nname = 'x'\n"
        assert f.attrs["started"]
        assert f.attrs["finished"] == ""


def test_record_affinity_false_omits_affinity(tmp_path):
    path = tmp_path / "run.h5"
    make_writer(path, record_affinity=False)
    with h5py.File(path, "r") as f:
        assert "clustering/affinity" not in f
        assert "clustering/proposal" in f


def test_append_two_rounds_grows_and_reads_back(tmp_path):
    path = tmp_path / "run.h5"
    writer = make_writer(path)
    rng = np.random.default_rng(0)
    rounds = [one_round(rng), one_round(rng)]
    for done, rows in enumerate(rounds, start=1):
        writer.append(rows)
        with h5py.File(path, "r") as f:  # readable (closed) after every append
            assert f["round/group"].shape[0] == done
    with h5py.File(path, "r") as f:
        for name, shape in design_rows(N).items():
            data = f[name][()]
            assert data.shape == (2, *shape), name
            expected = np.stack([np.asarray(r[name]) for r in rounds])
            if np.issubdtype(f[name].dtype, np.floating) and f[name].dtype.itemsize == 4:
                expected = expected.astype(np.float32)
            np.testing.assert_array_equal(data, expected, err_msg=name)
        assert np.isnan(f["hca/weights"][0, 1])


def test_append_several_rows_at_once(tmp_path):
    path = tmp_path / "run.h5"
    writer = make_writer(path)
    losses = np.arange(2 * N, dtype=float).reshape(2, N)
    writer.append({"epoch/train_loss": losses, "clustering/ari": [0.5, 1.0]})
    writer.append({"epoch/train_loss": losses[0] + 100})
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(
            f["epoch/train_loss"][()], np.vstack([losses, losses[:1] + 100])
        )
        np.testing.assert_array_equal(f["clustering/ari"][()], [0.5, 1.0])
        assert f["epoch/val_loss"].shape == (0, N)  # untouched series stay empty


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("round/group", np.zeros(N + 1)),
        ("round/group", np.zeros((N, N + 1))),
        ("clustering/proposal", np.zeros(N)),
        ("clustering/affinity", np.zeros((N, N))),
        ("epoch/train_loss", np.zeros((2, N - 1))),
    ],
)
def test_wrong_row_shape_raises(tmp_path, name, value):
    path = tmp_path / "run.h5"
    writer = make_writer(path)
    with pytest.raises(ValueError, match=name):
        writer.append({name: value})
    with h5py.File(path, "r") as f:
        assert f[name].shape[0] == 0


def test_status_running_then_finished(tmp_path):
    path = tmp_path / "run.h5"
    writer = make_writer(path)
    writer.set_attrs(git_commit="abc123")
    writer.finish()
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "finished"
        assert f.attrs["finished"] != ""
        assert f.attrs["git_commit"] == "abc123"
    assert mark_failed(path, "late error", attempts=1) is False  # a finished run stays finished
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "finished"


def test_existing_file_is_refused_unless_overwrite(tmp_path):
    path = tmp_path / "run.h5"
    writer = make_writer(path)
    writer.append({"clustering/ari": 0.25})
    with pytest.raises(OSError):
        make_writer(path)
    with h5py.File(path, "r") as f:  # the refused attempt did not touch the file
        assert f["clustering/ari"].shape == (1,)
    make_writer(path, overwrite=True)
    with h5py.File(path, "r") as f:
        assert f["clustering/ari"].shape == (0,)
        assert f.attrs["status"] == "running"


def test_overwrite_keeps_the_earlier_attempt_renamed(tmp_path):
    """--overwrite never truncates: the earlier file (and its checkpoint folder) is renamed and
    stays readable; a second overwrite within the same second gets a name of its own."""
    path = tmp_path / "run.h5"
    make_writer(path).append({"clustering/ari": 0.25})
    (tmp_path / "run.h5.ckpt").mkdir()
    (tmp_path / "run.h5.ckpt" / "rank00000.round000001.ckpt").write_bytes(b"state")
    second = make_writer(path, overwrite=True)
    assert second.kept is not None and second.kept.parent == tmp_path
    assert second.kept.name.startswith("run.replaced-") and second.kept.suffix == ".h5"
    with h5py.File(second.kept, "r") as f:
        assert f["clustering/ari"][()].tolist() == [0.25]
    moved = second.kept.with_name(second.kept.name + ".ckpt")
    assert (moved / "rank00000.round000001.ckpt").read_bytes() == b"state"
    assert not (tmp_path / "run.h5.ckpt").exists()
    third = make_writer(path, overwrite=True)
    assert third.kept is not None and third.kept != second.kept
    assert len(list(tmp_path.glob("run.replaced-*.h5"))) == 2
    assert make_writer(tmp_path / "new.h5", overwrite=True).kept is None


def test_mark_failed(tmp_path):
    path = tmp_path / "run.h5"
    make_writer(path)
    message = "RuntimeError: rank 2 diverged\n" + "x" * 5000
    assert mark_failed(path, message) is True
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "failed"
        assert f.attrs["finished"] != ""
        error = f.attrs["error"]
        assert message.endswith(error) and len(error) >= 1000  # the tail of the text is kept


def test_mark_failed_missing_file(tmp_path):
    assert mark_failed(tmp_path / "absent.h5", "boom", attempts=1) is False
    assert not (tmp_path / "absent.h5").exists()
