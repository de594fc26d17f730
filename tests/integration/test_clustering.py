"""Tier 3: the default clustering under MPI — no lock-in after a wrong partition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from colnet_mpi.metrics.reader import load_run
from tests.conftest import colnet
from tests.integration.test_results_safety import run_mpi_env

DIGITS = "configs/digits_label_het.toml"


@pytest.mark.mpi
@pytest.mark.slow
def test_a_forced_wrong_partition_does_not_lock_in(tmp_path: Path) -> None:
    """Round 2's partition is forced to mix the two label groups (every node's backbone is then
    averaged with the wrong nodes); the true groups are back in the next round (the issue asks
    for within two)."""
    out = tmp_path / "forced.h5"
    wrong = "0,1,0,1,0,1"
    env = dict(os.environ, COLNET_TEST_FORCE_GROUPS=f"2:{wrong}")
    args = ["--set", "training.rounds=3", "--quiet"]
    proc = run_mpi_env(6, colnet("run", DIGITS, "--out", str(out), *args), env, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = load_run(out)
    groups = run.data["round/group"]  # (rounds, nodes)
    assert groups[1].tolist() == [0, 1, 0, 1, 0, 1]  # the hook took effect
    ari = run.data["clustering/ari"]
    assert ari[1] < 0
    assert ari[0] == 1.0 and ari[2] == 1.0, ari  # right before, and right again after
    assert groups[2].tolist() == groups[0].tolist()
