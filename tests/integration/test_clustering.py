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


@pytest.mark.mpi
def test_optional_update_and_loss_channels_run_and_record_the_loss_rows(tmp_path: Path) -> None:
    """With update sketches (a sketch smaller than the backbone) and loss profiles switched on,
    a round runs and every node records the loss of every backbone it evaluated."""
    out = tmp_path / "channels.h5"
    sets = [
        "training.rounds=1",
        "model.width=4",
        "data.samples_per_node=64",
        "clustering.max_batches=1",
        "clustering.update_weight=0.3",
        "clustering.loss_weight=0.2",
        "clustering.sketch=256",
    ]
    args = [a for s in sets for a in ("--set", s)]
    proc = run_mpi_env(
        6,
        colnet("run", "configs/quickstart.toml", "--out", str(out), *args, "--quiet"),
        dict(os.environ),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    loss = load_run(out).data["clustering/loss"]  # (rounds, nodes, nodes)
    assert loss.shape == (1, 6, 6) and (loss > 0).all(), loss
