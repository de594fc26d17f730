"""benchmarks/async_straggler.py: where its scenarios put the straggler, and how it reads the time
at which every task group reaches its target."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from colnet_mpi.config import load_config
from tests.conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location(
        "async_straggler", ROOT / "benchmarks" / "async_straggler.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("scenario", "slow_task", "slow_index"),
    [("slow", "attributes", 0), ("slow_landmarks", "landmarks", 3), ("even", None, None)],
)
def test_each_scenario_slows_the_node_of_its_group(tmp_path, scenario, slow_task, slow_index):
    bench = _bench()
    config = load_config(bench.config(tmp_path, scenario))
    tasks = [n.task for n in config.nodes]
    assert tasks == ["attributes"] * 3 + ["landmarks"] * 3  # the quickstart's nodes, in order
    slow = [i for i, n in enumerate(config.nodes) if n.slowdown != 1.0]
    assert slow == ([] if slow_index is None else [slow_index])
    if slow_task is not None:
        assert tasks[slow_index] == slow_task and config.nodes[slow_index].slowdown == 3.0
    # the rest of the quickstart is kept
    assert config.training.rounds == 5 and config.model.width == 8


def _runs(clock: list[list[float]], f1: list[list[float]], loss: list[list[float]]) -> dict:
    """A results file's datasets as the benchmark loads them: 2 attributes + 2 landmarks nodes."""
    return {
        "round/clock": np.array(clock),
        "round/test_f1_micro": np.array(f1),
        "round/test_loss": np.array(loss),
        "task": ["attributes", "attributes", "landmarks", "landmarks"],
    }


def test_time_to_target_waits_for_the_slow_members_evaluation():
    bench = _bench()
    nan = float("nan")
    # node 3 (landmarks) is slow: one round while the others do two; its rows end with NaN
    d = _runs(
        clock=[[1.0, 1.0, 1.0, 3.0], [2.0, 2.0, 2.0, nan]],
        f1=[[0.5, 0.6, nan, nan], [0.7, 0.8, nan, nan]],
        loss=[[nan, nan, 2.0, 4.0], [nan, nan, 0.5, nan]],
    )
    curve = bench.group_curve(d)
    target = {"attributes": 0.7, "landmarks": 2.5}
    # attributes reach 0.75 >= 0.7 at t = 2; landmarks only when node 3 reports (mean 2.25 at
    # t = 3): before, its group has no mean at all, and the node-round with NaN is no event
    assert bench.time_to(curve, target, ("attributes",)) == 2.0
    assert bench.time_to(curve, target, ("landmarks",)) == 3.0
    assert bench.time_to(curve, target) == 3.0
    # a landmarks target below what the group reaches: never
    assert np.isnan(bench.time_to(curve, {"attributes": 0.7, "landmarks": 2.0}))
    assert bench.at(curve, 2.5) == {"attributes": pytest.approx(0.75)}


def _row(seed: int, run: str, per_node: list[dict[str, int]]) -> dict:
    return {
        "seed": seed,
        "scenario": "slow",
        "run": run,
        "wall_s": 1.0,
        "to_target_ratio": 0.5,
        "group_ratio": {"attributes": 0.5, "landmarks": 0.5},
        "at_0.6": {},
        "final": {"attributes": 0.7, "landmarks": 1.0},
        "rounds_per_node": [2, 2],
        "staleness_hist": {},
        "bytes_per_node_round": 1e6,
        "staleness_per_node": per_node,
        "node_labels": ["0 attributes (3x)", "1 attributes"],
    }


def test_tables_pool_each_nodes_staleness_over_seeds_and_put_sync_first():
    bench = _bench()
    rows = [
        _row(0, "async S=inf", [{"-2": 1, "0": 1}, {"0": 2, "3": 1}]),
        _row(0, "sync", [{}, {}]),
        _row(1, "async S=inf", [{"-1": 2}, {"1": 1, "3": 2}]),
        _row(1, "sync", [{}, {}]),
    ]
    text = bench.tables(rows)
    main = [line for line in text.splitlines() if line.startswith("| slow |")]
    assert [line.split(" | ")[1] for line in main[:2]] == ["sync", "async S=inf"]
    node_rows = [line for line in text.splitlines() if "attributes" in line and "S=inf" in line]
    # node 0: -2 once, -1 twice, 0 once (median of -2 -1 -1 0 = -1); node 1: 0 0 1 3 3 3
    assert node_rows[-2].endswith("| 0 attributes (3x) | -2: 1, -1: 2, 0: 1 | -1 | 0 |")
    assert node_rows[-1].endswith("| 1 attributes | 0: 2, 1: 1, 3: 3 | 2 | 3 |")
    # summaries written by an older version of the script (no per-node staleness) still print
    old = [
        {k: v for k, v in r.items() if k not in ("staleness_per_node", "node_labels")} for r in rows
    ]
    assert "| slow | async S=inf |" in bench.tables(old)


def _ratio_row(seed: int, run: str, ratio: float) -> dict:
    return {**_row(seed, run, [{}, {}]), "to_target_ratio": ratio}


def test_per_seed_table_counts_never_as_the_whole_budget_and_the_target_met():
    bench = _bench()
    nan = float("nan")
    rows = [_ratio_row(s, "sync", 1.0) for s in (0, 1, 2)]
    rows += [_ratio_row(0, "a", 0.5), _ratio_row(1, "a", 0.7), _ratio_row(2, "a", nan)]
    lines = bench.per_seed_table(rows).splitlines()
    assert lines[0].startswith("| scenario | run | seed 0 | seed 1 | seed 2 |")
    assert len(lines) == 3  # the header, its rule and run "a": no row for sync
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:5] == ["slow", "a", "0.500", "0.700", "never"]
    # mean of 0.5, 0.7 and 1.0 (never); 95 % t interval: t(0.975, 2) * s / sqrt(3)
    half = 4.302653 * np.std([0.5, 0.7, 1.0], ddof=1) / np.sqrt(3)
    mean, width = cells[5].split(" ± ")
    assert float(mean) == pytest.approx(0.7333, abs=1e-3)
    assert float(width) == pytest.approx(half, abs=1e-3)
    assert cells[6] == "1 of 3"


def test_paired_table_differences_on_the_shared_seeds_only():
    bench = _bench()
    rows = [_ratio_row(s, "a", r) for s, r in ((0, 0.8), (1, 0.9), (2, 0.7))]
    rows += [_ratio_row(s, "b", r) for s, r in ((0, 0.5), (1, 0.95), (3, 0.1))]
    lines = bench.paired_table(rows).splitlines()
    assert len(lines) == 3
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    # seeds 0 and 1 only: b − a = −0.3 and +0.05
    assert cells[:4] == ["slow", "b", "a", "2"]
    assert float(cells[4].split(" ± ")[0]) == pytest.approx(-0.125, abs=1e-3)
    assert cells[5] == "1 of 2"
    # a single shared seed: nothing to compare
    assert bench.paired_table(rows[:1] + rows[3:4]) == ""


def test_table_pools_folders_and_takes_a_repeated_run_from_the_first(tmp_path):
    bench = _bench()
    first, second = tmp_path / "a", tmp_path / "b"
    for folder, rows in (
        (first, [_ratio_row(0, "x", 0.4)]),
        (second, [_ratio_row(0, "x", 0.9), _ratio_row(1, "x", 0.5)]),
    ):
        folder.mkdir()
        (folder / "summary.json").write_text(json.dumps(rows))
    pooled = bench.pooled_summaries([first, second])
    assert [(r["seed"], r["to_target_ratio"]) for r in pooled] == [(0, 0.4), (1, 0.5)]
