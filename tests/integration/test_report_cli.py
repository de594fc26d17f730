"""Tier 3: a small real sweep (two schemes x two seeds) under mpiexec, then ``colnet-mpi report`` on it."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, colnet, colnet_batch, run_mpi

# digits_label_het.toml with 2 + 2 nodes (its 3 + 3 cannot be changed with --set), scaled down
TINY = """
[run]
name = "tiny"
[data]
dataset = "digits"
samples_per_node = 40
test_samples = 40
image_size = 16
[model]
width = 4
[training]
rounds = 2
local_epochs = 1
batch_size = 16
[clustering]
k = 2
max_batches = 1
[[nodes]]
task = "low_digits"
count = 2
[[nodes]]
task = "high_digits"
count = 2
"""


@pytest.mark.mpi
@pytest.mark.slow
def test_report_on_a_real_sweep(tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    results = tmp_path / "results" / "tiny_sweep"
    runs = []
    for scheme in ("colnet", "none"):
        for seed in (0, 1):
            name = f"tiny_sweep_{len(runs)}"
            runs.append(
                ["run", str(config), "--quiet", "--set", f"federation.scheme={scheme}",
                 "--set", f"run.seed={seed}", "--set", f"run.name={name}",
                 "--out", str(results / f"{name}.h5")]
            )  # fmt: skip
    proc = run_mpi(4, colnet_batch(*runs), timeout=300)  # the four runs in one launch
    assert proc.returncode == 0, proc.stdout + proc.stderr

    proc = subprocess.run(
        colnet("report", str(results)), capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = results / "report"
    tables = proc.stdout.split("# Paired comparisons")[0]
    table = [line for line in tables.splitlines() if line.startswith("|")]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [(b[0], b[1], b[2]) for b in body] == [
        ("low_digits", "scheme=colnet", "2"),
        ("", "scheme=none", "2"),
        ("high_digits", "scheme=colnet", "2"),
        ("", "scheme=none", "2"),
    ]
    assert all("±" in cell for b in body for cell in b[3:])  # 2 seeds: every metric has a std
    assert (out / "table.md").read_text() == proc.stdout
    with (out / "table.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["group"], r["federation.scheme"], r["seeds"]) for r in rows] == [
        ("low_digits", "colnet", "0;1"),
        ("low_digits", "none", "0;1"),
        ("high_digits", "colnet", "0;1"),
        ("high_digits", "none", "0;1"),
    ]
    assert all(0.0 <= float(r["f1_micro_mean"]) <= 1.0 for r in rows)
    for png in ("val_loss.png", "test_metrics.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # colnet against none, paired by seed: two pairs per group, pooled over the two groups
    with (out / "paired.csv").open() as fh:
        paired = list(csv.DictReader(fh))
    assert [(r["group"], r["pairs"], r["seeds"]) for r in paired] == [
        ("low_digits", "2", "0;1"),
        ("high_digits", "2", "0;1"),
        ("all groups", "4", "0;1;0;1"),
    ]
    by = {(r["group"], r["federation.scheme"]): float(r["f1_micro_mean"]) for r in rows}
    for r in paired[:2]:
        gap = by[(r["group"], "colnet")] - by[(r["group"], "none")]
        assert float(r["mean_difference"]) == pytest.approx(gap, abs=1e-9)
