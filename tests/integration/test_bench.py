"""``colnet-mpi bench`` under MPI: every figure is there and agrees with the results file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from colnet_mpi.bench import BENCH_STAGES, text
from tests.conftest import ROOT, colnet
from tests.integration.test_results_safety import run_mpi_env

SMALL = [
    "training.rounds=2",
    "model.width=4",
    "data.samples_per_node=64",
    "data.test_samples=64",
    "clustering.max_batches=1",
    "run.evaluate_every=2",  # round 1 untested, round 2 (the final one) tested
    "federation.topology=kregular",  # a sparse graph: 3 neighbours per node, partial views
    "federation.degree=3",
    "clustering.backbone_sketch=256",  # the exchange carries a sketch, not the backbone
    "training.steps_per_epoch=3",  # 3 batches of 16 per epoch on every node (51 samples each)
]


@pytest.mark.mpi
def test_bench_prints_every_figure_consistent_with_the_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.h5"
    args = [a for s in SMALL for a in ("--set", s)]
    proc = run_mpi_env(
        6,
        colnet(
            "bench", "configs/quickstart.toml", *args, "--out", str(out), "--json", "--repeats", "2"
        ),
        dict(os.environ),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fig = json.loads(proc.stdout)  # stdout is the JSON object alone
    assert fig["world_size"] == 6 and fig["rounds"] == 2 and fig["rounds_measured"] == 1
    with h5py.File(out, "r") as f:
        secs = {s: f[f"round/seconds/{s}"][1] for s in (*BENCH_STAGES, "total")}
        sent = f["round/bytes_sent"][1]
        test_loss = f["round/test_loss"][()]
    assert np.isnan(test_loss[0]).all() and np.isfinite(test_loss[1]).all()
    st = fig["stages_seconds_per_round"]
    for s, v in secs.items():
        assert st[s]["mean_rank"] == pytest.approx(v.mean())
        assert st[s]["slowest_rank"] == pytest.approx(v.max())
    other = secs["total"] - sum(secs[s] for s in BENCH_STAGES)
    assert st["other"]["mean_rank"] == pytest.approx(other.mean())
    total, train = secs["total"].mean(), secs["local_train"].mean()
    assert fig["overhead_ratio"] == pytest.approx((total - train) / total)
    assert 0 < fig["overhead_ratio"] < 1
    assert fig["bytes_per_node_round"]["sent"] == pytest.approx(sent.mean())
    # 64 samples per node, 51 of them for training; 3 steps of 16 images in each of 2 epochs
    images = fig["train_images_per_second"]
    assert images["total"] == pytest.approx(np.sum(48 * 2 / secs["local_train"]), rel=0.02)
    ex = fig["exchange"]
    assert ex["neighbours"] == 3 and ex["transfer_path"] == "host"
    assert ex["shared_memory_neighbours"] == 3  # one host: every neighbour reads shared memory
    assert set(ex["seconds"]) == {
        "colnet",
        "raw_p2p",
    }  # no Allgather: not every rank is a neighbour
    assert all(v > 0 for v in ex["seconds"].values())
    assert ex["bytes_received_per_rank"] == ex["values_per_neighbour"] * 4 * 3
    # data profile + 256-entry sketch, far fewer values than the backbone they stand for
    assert 256 < ex["values_per_neighbour"] < ex["backbone_values"] / 4
    thr = ex["throughput_MB_per_s_per_rank"]["colnet"]
    assert thr == pytest.approx(ex["bytes_received_per_rank"] / ex["seconds"]["colnet"] / 1e6)
    rss = fig["peak_rss_bytes"]
    assert 50e6 < rss["mean_rank"] <= rss["max_rank"] and rss["total"] == pytest.approx(
        6 * rss["mean_rank"]
    )
    pss = fig["pss_bytes_at_end"]
    assert 10e6 < pss["mean_rank"] <= pss["max_rank"] <= rss["max_rank"]
    uss = fig["uss_bytes_at_end"]
    assert 10e6 < uss["mean_rank"] <= pss["mean_rank"]  # private pages are part of the PSS
    early = fig["uss_bytes_after_imports"]
    assert 10e6 < early["mean_rank"] <= early["max_rank"] < uss["max_rank"]
    # the faces run needs neither scikit-learn (own spectral clustering and ARI) nor Pillow
    assert fig["optional_libraries_loaded"] == []
    assert 0 < fig["startup_seconds"]["mean_rank"] <= fig["startup_seconds"]["slowest_rank"] < 300
    report = text(fig, "configs/quickstart.toml")
    for needle in (
        "overhead (round - local training) / round",
        "raw Isend/Irecv",
        "peak RSS",
        "PSS",
        "USS after imports",
        "optional libraries loaded: none",
    ):
        assert needle in report
    assert all(s in report for s in BENCH_STAGES)


def test_bench_refuses_bad_options() -> None:
    for bad in (["--repeats", "0"], ["--warmup", "-1"]):
        proc = subprocess.run(
            [sys.executable, "-m", "colnet_mpi", "bench", "configs/quickstart.toml", *bad],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert bad[0] in proc.stderr and "is not allowed" in proc.stderr
