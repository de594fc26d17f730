"""Unit tests for colnet_mpi.federation.resume: which config changes a resumed run may make."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from colnet_mpi.config import load_config, to_toml
from colnet_mpi.federation.resume import ResumeError, config_differences, resume_point
from colnet_mpi.metrics.writer import ResultsWriter

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.toml"
BASE = ["model.width=4"]


def config(*overrides: str, path: Path = QUICKSTART):
    return load_config(path, [*BASE, *overrides])


@pytest.fixture(scope="module")
def stored() -> str:
    return to_toml(config())


def test_identical_config_has_no_differences(stored: str) -> None:
    assert config_differences(stored, config()) == []
    # the same settings spelled differently (an override equal to the file's value)
    assert config_differences(stored, config("training.local_epochs=2", "run.seed=0")) == []


@pytest.mark.parametrize(
    "override",
    [
        "training.rounds=50",
        "run.output='elsewhere/run.h5'",
        "run.name=renamed",
        "run.checkpoint_every=3",
        "run.checkpoint_dir='/tmp/ckpt'",
        "federation.cuda_aware=no",
        "federation.timeout=120",
    ],
)
def test_keys_that_may_change(stored: str, override: str) -> None:
    new = config(override)
    assert to_toml(new) != stored  # the override did change the config
    assert config_differences(stored, new) == []


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.width=8", "model.width: 4 -> 8"),
        ("run.seed=1", "run.seed: 0 -> 1"),
        ("federation.scheme=intra", "federation.scheme: 'colnet' -> 'intra'"),
        ("hca.alpha=0.5", "hca.alpha: 0.4 -> 0.5"),
        ("training.local_epochs=3", "training.local_epochs: 2 -> 3"),
        ("training.multi_label.lr=0.01", "training.multi_label.lr: 0.002 -> 0.01"),
        ("defense.screening=true", "defense.screening: False -> True"),
        ("attack.nodes=[1, 2]", "attack.nodes: (0,) -> (1, 2)"),
    ],
)
def test_other_changes_are_named_with_old_and_new_values(
    stored: str, override: str, expected: str
) -> None:
    assert config_differences(stored, config(override)) == [expected]


def test_the_emulated_pace_may_change_even_where_an_older_file_lacks_it(stored: str) -> None:
    older = stored.replace("epoch_seconds = 0.0\n", "")
    assert older != stored
    assert config_differences(older, config("training.epoch_seconds=2.5")) == []


def test_a_key_added_later_matches_what_older_files_did(stored: str) -> None:
    """A file written before federation.catch_up_train existed ran as "epochs" does."""
    older = stored.replace('catch_up_train = "epochs"\n', "")
    assert older != stored
    assert config_differences(older, config()) == []
    changed = config("federation.mode=async", "federation.catch_up=1")
    assert config_differences(older, changed) == [
        "federation.catch_up: 0 -> 1",
        "federation.mode: 'sync' -> 'async'",
    ]
    head = config(
        "federation.mode=async", "federation.catch_up=1", "federation.catch_up_train=head"
    )
    assert "federation.catch_up_train: 'epochs' -> 'head'" in config_differences(older, head)


def test_several_changes_all_reported_and_allowed_ones_ignored(stored: str) -> None:
    new = config("run.seed=3", "model.width=16", "training.rounds=99", "run.output='x.h5'")
    assert config_differences(stored, new) == ["model.width: 4 -> 16", "run.seed: 0 -> 3"]


def test_a_key_missing_on_one_side_is_reported(stored: str) -> None:
    older = stored.replace('stem = "auto"\n', "")  # a file written before model.stem existed
    assert older != stored
    (diff,) = config_differences(older, config())
    assert diff.startswith("model.stem: ") and "(unset)" in diff and "'auto'" in diff
    newer = stored.replace("[model]\n", "[model]\nextra = 1\n")
    (diff,) = config_differences(newer, config())
    assert diff.startswith("model.extra: 1 -> ") and "(unset)" in diff


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('task = "landmarks"\ncount = 3', 'task = "landmarks"\ncount = 2'),  # one node fewer
        (
            '[[nodes]]\ntask = "attributes"\ncount = 3\n\n[[nodes]]\ntask = "landmarks"\ncount = 3',
            '[[nodes]]\ntask = "landmarks"\ncount = 3\n\n[[nodes]]\ntask = "attributes"\ncount = 3',
        ),  # the same nodes in another order
    ],
    ids=["count", "order"],
)
def test_a_different_nodes_list_is_reported(tmp_path, stored: str, old: str, new: str) -> None:
    text = QUICKSTART.read_text()
    assert old in text
    path = tmp_path / "other.toml"
    path.write_text(text.replace(old, new))
    diffs = config_differences(stored, config(path=path))
    assert diffs == ["nodes: the [[nodes]] list differs"]


def test_renamed_node_is_reported(stored: str) -> None:
    renamed = stored.replace('name = "landmarks-2"', 'name = "landmarks-9"', 1)
    assert renamed != stored
    assert config_differences(renamed, config()) == ["nodes: the [[nodes]] list differs"]


# -- resume_point ----------------------------------------------------------------------------------
def _results(tmp_path: Path, cfg, *, world_size: int = 6, rounds: int = 2, ckpt: int = 2) -> Path:
    path = tmp_path / "run.h5"
    n = len(cfg.nodes)
    writer = ResultsWriter(
        path,
        attrs={"config": to_toml(cfg), "world_size": world_size},
        node_names=[nd.name for nd in cfg.nodes],
        node_tasks=[nd.task for nd in cfg.nodes],
        true_groups=[nd.task for nd in cfg.nodes],
        record_affinity=False,
    )
    for r in range(1, rounds + 1):
        writer.append(
            {"round/test_loss": np.zeros(n), "round/backbone_checksum": np.arange(n) + 100 * r}
        )
    if ckpt:
        (tmp_path / "ckpt").mkdir()
        writer.mark_checkpoint(ckpt, str(tmp_path / "ckpt"), 10)
    return path


def test_resume_point(tmp_path) -> None:
    cfg = config()
    point = resume_point(_results(tmp_path, cfg, rounds=3, ckpt=2), config("training.rounds=9"), 6)
    assert point.round == 2 and point.recorded_rounds == 3
    assert point.directory == str(tmp_path / "ckpt")
    assert point.status == "running"
    np.testing.assert_array_equal(point.checksums, np.arange(6) + 200)


def test_resume_point_refusals(tmp_path) -> None:
    cfg = config()
    path = _results(tmp_path, cfg)
    with pytest.raises(ResumeError, match="it ran with 6"):
        resume_point(path, cfg, 4)
    with pytest.raises(ResumeError, match=r"model\.width: 4 -> 8"):
        resume_point(path, config("model.width=8"), 6)
    with pytest.raises(ResumeError, match="not a readable HDF5 file"):
        resume_point(tmp_path / "absent.h5", cfg, 6)
    (tmp_path / "ckpt").rmdir()
    with pytest.raises(ResumeError, match="does not exist"):
        resume_point(path, cfg, 6)


def test_resume_point_without_checkpoint(tmp_path) -> None:
    cfg = config()
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        resume_point(_results(tmp_path, cfg, ckpt=0), cfg, 6)
