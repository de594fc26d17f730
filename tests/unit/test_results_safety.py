"""The results file stays safe to write: readers never stop the writer."""

from __future__ import annotations

import errno
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from colnet_mpi.federation.resume import ResumeError, resume_point
from colnet_mpi.metrics.reader import load_run
from colnet_mpi.metrics.record import axis_of
from colnet_mpi.metrics.writer import ResultsWriter, mark_failed
from colnet_mpi.sweep import output_status
from tests.unit.test_writer import GROUPS, NAMES, TASKS

CONFIG = "[run]\nname = 'x'\n\n[training]\nrounds = 3\n"


def new_writer(path: Path, **kwargs: object) -> ResultsWriter:
    return ResultsWriter(
        path,
        attrs={"config": CONFIG, "world_size": len(NAMES), "seed": 0},
        node_names=NAMES,
        node_tasks=TASKS,
        true_groups=GROUPS,
        record_affinity=True,
        **kwargs,  # type: ignore[arg-type]
    )


def write_round(writer: ResultsWriter, r: int) -> None:
    """Round ``r`` (one local epoch) in every dataset of the layout, as the federation does."""
    rows = {
        name: np.full(series.row, r, dtype=series.dtype)
        for name, series in writer.layout.items()
        if axis_of(name) == "round"
    }
    rows.update(
        {
            name: np.full((1, *series.row), r, dtype=series.dtype)
            for name, series in writer.layout.items()
            if axis_of(name) == "epoch"
        }
    )
    writer.append(rows)


@pytest.fixture
def held(tmp_path: Path) -> Iterator[tuple[Path, ResultsWriter]]:
    """A results file with one round, held open read-only by another process (plain h5py,
    i.e. with HDF5's default file locking, as a notebook would) for the whole test."""
    path = tmp_path / "run.h5"
    writer = new_writer(path)
    write_round(writer, 1)
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, h5py\n"
            "f = h5py.File(sys.argv[1], 'r')\n"
            "print(f['round/test_loss'].shape[0], flush=True)\n"
            "time.sleep(120)\n",
            str(path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None
        line = reader.stdout.readline()
        assert line.strip() == "1", reader.stderr.read() if reader.stderr else line
        yield path, writer
        assert reader.poll() is None, "the reader was expected to still hold the file"
    finally:
        reader.kill()
        reader.wait(timeout=30)


def test_writer_appends_and_sets_attributes_while_a_reader_holds_the_file(held) -> None:
    path, writer = held
    for r in (2, 3):
        write_round(writer, r)
        writer.mark_checkpoint(r, "ckpt", 123)
        writer.add_checkpoint_seconds(0.5)
    writer.set_attrs(git_commit="abc")
    writer.finish()
    assert output_status(path) == "finished"
    run = load_run(path)
    assert run.status == "finished" and run.n_rounds == 3
    assert run.attrs["checkpoint_round"] == 3 and run.attrs["git_commit"] == "abc"
    with h5py.File(path, "r", locking=False) as f:
        for name in ("round/test_loss", "round/group", "clustering/affinity", "hca/solver_ok"):
            assert f[name].shape[0] == 3, name
        np.testing.assert_array_equal(f["round/test_loss"][:, 0], [1, 2, 3])
        np.testing.assert_array_equal(f["epoch/round"][()], [1, 2, 3])


def test_create_resume_and_mark_failed_while_a_reader_holds_the_file(held) -> None:
    path, _writer = held
    write_round(new_writer(path, resume_round=1), 2)
    assert load_run(path).n_rounds == 2
    assert mark_failed(path, "boom", attempts=1) is True
    assert output_status(path) == "failed"
    with pytest.raises(ResumeError):  # opens the file; refuses for its own reasons, not a lock
        resume_point(path, object(), 99)  # type: ignore[arg-type]
    new_writer(path, overwrite=True)  # start over, still held
    run = load_run(path)
    assert run.status == "running" and run.n_rounds == 0


def test_enospc_hook_fails_the_named_round_before_touching_the_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "run.h5"
    writer = new_writer(path)
    monkeypatch.setenv("COLNET_TEST_ENOSPC", "2")
    write_round(writer, 1)
    before = path.read_bytes()
    with pytest.raises(OSError) as caught:
        write_round(writer, 2)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_bytes() == before
    assert load_run(path).n_rounds == 1
