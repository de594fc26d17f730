"""Tier 3: the real CLI under mpiexec, read back from the HDF5 file; failure behaviour."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from colnet_mpi.metrics.writer import STAGES, TEST_METRICS
from tests.conftest import ROOT, colnet, colnet_batch, run_mpi, write_crash_script

QUICK = str(ROOT / "configs" / "quickstart.toml")
# the quickstart, shrunk so that a CI run takes seconds
SMALL = [
    "--set",
    "training.rounds=3",
    "--set",
    "data.samples_per_node=64",
    "--set",
    "data.test_samples=48",
    "--set",
    "model.width=4",
    "--set",
    "clustering.max_batches=1",
]

DESIGN_NAMES = [
    "nodes/name",
    "nodes/task",
    "nodes/true_group",
    "epoch/train_loss",
    "epoch/val_loss",
    *(f"round/test_{m}" for m in TEST_METRICS),
    "round/group",
    "round/leader",
    "round/backbone_checksum",
    "round/bytes_sent",
    "round/bytes_received",
    *(f"round/seconds/{s}" for s in STAGES),
    "clustering/affinity",
    "clustering/proposal",
    "clustering/ari",
    "hca/weights",
    "hca/mean_delta_norm",
    "hca/update_norm",
    "hca/solver_ok",
]
ROOT_ATTRS = [
    "config",
    "version",
    "git_commit",
    "mpi_library",
    "world_size",
    "hostnames",
    "torch_version",
    "device",
    "seed",
    "started",
    "finished",
    "status",
]


#: the three baseline schemes (2 rounds each) -> the stages they do not run (recorded as 0 s)
SKIPPED = {
    "none": ("exchange", "clustering", "intra", "cross", "redistribute"),
    "intra": ("cross", "redistribute"),
    "fedper": (),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """In one 6-rank launch (start-up paid once): the quickstart, shrunk (``quick.h5``; the
    only run that prints its rounds), the three baseline schemes (``<scheme>.h5``) and a run in
    which node 1 sends NaN backbones every round (``nan.h5``)."""
    folder = tmp_path_factory.mktemp("runs")
    quiet = [*SMALL, "--quiet"]
    batch = [
        ["run", QUICK, "--out", str(folder / "quick.h5"), *SMALL],
        *(
            ["run", QUICK, "--out", str(folder / f"{scheme}.h5"), *quiet,
             "--set", "training.rounds=2", "--set", f"federation.scheme={scheme}"]
            for scheme in sorted(SKIPPED)
        ),
        ["run", QUICK, "--out", str(folder / "nan.h5"), *quiet,
         "--set", "attack.kind=bad_buffer", "--set", "attack.nodes=[1]"],
    ]  # fmt: skip
    proc = run_mpi(6, colnet_batch(*batch), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return folder, proc


@pytest.mark.mpi
@pytest.mark.slow
def test_six_rank_run_reads_back(runs) -> None:
    folder, proc = runs
    out = folder / "quick.h5"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("round")]
    assert len(lines) == 3 and "ARI=" in lines[0], proc.stdout
    assert str(out) in proc.stdout
    with h5py.File(out) as f:
        for name in DESIGN_NAMES:
            assert name in f, f"missing {name}"
        for key in ROOT_ATTRS:
            assert key in f.attrs, f"missing attribute {key}"
        assert f.attrs["status"] == "finished" and f.attrs["world_size"] == 6
        assert f["epoch/train_loss"].shape == (6, 6)  # 3 rounds x 2 epochs, 6 nodes
        assert f["round/test_loss"].shape == (3, 6)
        assert f["clustering/affinity"].shape == (3, 6, 6, 6)
        assert f["round/group"].maxshape[0] is None
        tasks = [t.decode() if isinstance(t, bytes) else t for t in f["nodes/task"][:]]
        assert tasks == ["attributes"] * 3 + ["landmarks"] * 3
        groups = f["round/group"][:]
        leaders = f["round/leader"][:]
        sums = f["round/backbone_checksum"][:]
        for r in range(3):
            for g in np.unique(groups[r]):
                members = np.flatnonzero(groups[r] == g)
                assert len(set(sums[r, members])) == 1, f"round {r + 1}: group {g} checksums differ"
                assert leaders[r, members].sum() == 1, f"round {r + 1}: group {g} needs one leader"
        # the leader rotates round-robin among a stable group's members
        for g in np.unique(groups[0]):
            members = np.flatnonzero(groups[0] == g)
            if members.size > 1 and (groups[:, members] == groups[0, members]).all():
                who = [int(members[np.flatnonzero(leaders[r, members])[0]]) for r in range(3)]
                assert who == [int(members[r % members.size]) for r in range(3)]
        # NaN where a metric does not apply (F1 of landmark nodes)
        assert np.isnan(f["round/test_f1_micro"][:, 3:]).all()
        assert np.isfinite(f["round/test_f1_micro"][:, :3]).all()
        assert (f["round/bytes_sent"][:] > 0).all()
        assert np.isfinite(f["round/seconds/total"][:]).all()
        ari = f["clustering/ari"][:]
        assert ari.shape == (3,) and np.all(ari <= 1.0)
        w = f["hca/weights"][:]
        for r in range(3):
            lead = leaders[r] == 1
            if np.unique(groups[r]).size > 1:
                assert np.isnan(w[r, ~lead]).all() and abs(np.nansum(w[r, lead]) - 1) < 1e-6


def _layout(f: h5py.File) -> dict[str, tuple]:
    """Every dataset's name with its shape after the round/epoch axis."""
    names: dict[str, tuple] = {}
    f.visititems(
        lambda name, obj: (
            names.__setitem__(name, obj.shape[1:]) if isinstance(obj, h5py.Dataset) else None
        )
    )
    return names


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("scheme", sorted(SKIPPED))
def test_baseline_scheme_same_layout(runs, scheme: str) -> None:
    """none/intra/fedper write the colnet file's layout; stages they skip are 0 s and 0 bytes."""
    colnet_out = runs[0] / "quick.h5"
    out = runs[0] / f"{scheme}.h5"
    with h5py.File(colnet_out) as ref, h5py.File(out) as f:
        assert _layout(f) == _layout(ref)
        assert f.attrs["scheme"] == scheme and f.attrs["status"] == "finished"
        for stage in SKIPPED[scheme]:
            assert (f[f"round/seconds/{stage}"][:] == 0).all(), stage
        for stage in ("local_train", "evaluate", "total"):
            assert (f[f"round/seconds/{stage}"][:] > 0).all(), stage
        groups, sums = f["round/group"][:], f["round/backbone_checksum"][:]
        sent = f["round/bytes_sent"][:]
        if scheme == "none":
            assert (sent == 0).all() and (f["round/bytes_received"][:] == 0).all()
            assert np.isnan(f["clustering/ari"][:]).all()
            # nothing is shared: six different backbones
            assert all(len(set(row)) == 6 for row in sums)
        else:
            assert (sent > 0).all() and (f["round/seconds/exchange"][:] > 0).all()
            for r in range(groups.shape[0]):
                for g in np.unique(groups[r]):
                    members = np.flatnonzero(groups[r] == g)
                    assert len(set(sums[r, members])) == 1
        if scheme == "fedper":
            # cross-group mean: every node ends with the same backbone whenever groups > 1
            for r in range(groups.shape[0]):
                if np.unique(groups[r]).size > 1:
                    assert len(set(sums[r])) == 1
                    assert (f["round/seconds/cross"][r] > 0).any()
        assert (f["hca/solver_ok"][:] == -1).all()  # HCA never runs outside colnet
        assert np.isnan(f["hca/weights"][:]).all()


@pytest.mark.mpi
@pytest.mark.slow
def test_same_seed_same_metrics(tmp_path: Path) -> None:
    """Two launches with one seed give bit-identical metrics and backbones."""
    args = [
        "--set",
        "training.rounds=2",
        "--set",
        "data.samples_per_node=48",
        "--set",
        "model.width=4",
        "--set",
        "data.test_samples=32",
    ]
    cfg = str(ROOT / "configs" / "digits_label_het.toml")
    two = tmp_path / "two.toml"
    two.write_text(
        Path(cfg)
        .read_text()
        .replace("count = 3", "count = 1")
        .replace('name = "digits_label_het"', 'name = "two"')
    )
    metrics = []
    for i in range(2):
        out = tmp_path / f"two{i}.h5"
        proc = run_mpi(2, colnet("run", str(two), "--out", str(out), "--quiet", *args), timeout=240)
        assert proc.returncode == 0, proc.stderr
        with h5py.File(out) as f:
            metrics.append(
                {
                    k: f[k][:]
                    for k in (
                        "round/test_loss",
                        "round/test_f1_micro",
                        "epoch/train_loss",
                        "round/backbone_checksum",
                    )
                }
            )
    for key in metrics[0]:
        np.testing.assert_array_equal(metrics[0][key], metrics[1][key], err_msg=key)


def _fails(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in:\n{proc.stderr}"
    assert "round   1" not in proc.stdout, "training started"


@pytest.mark.mpi
def test_world_size_mismatch(tmp_path: Path) -> None:
    proc = run_mpi(2, colnet("run", QUICK, "--out", str(tmp_path / "x.h5")), timeout=120)
    _fails(proc, "world size 2", "6 nodes", "mpiexec -n 6")
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.mpi
def test_output_exists(tmp_path: Path) -> None:
    cfg = tmp_path / "one.toml"
    cfg.write_text(Path(QUICK).read_text().replace("count = 3", "count = 1"))
    out = tmp_path / "taken.h5"
    out.write_bytes(b"precious")
    proc = run_mpi(2, colnet("run", str(cfg), "--out", str(out)), timeout=120)
    _fails(proc, "already exists", "--overwrite", "--resume")
    assert out.read_bytes() == b"precious"


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("federation.scheme=magic", ("federation.scheme", "'magic'", "colnet")),  # invalid value
        (
            "data.dataset=imagenet21k",
            ("imagenet21k", "digits", "synthetic_faces"),
        ),  # unknown dataset
    ],
    ids=["invalid_config", "unknown_dataset"],
)
def test_bad_config_stops_before_training(tmp_path: Path, override: str, needles: tuple) -> None:
    out = tmp_path / "x.h5"
    proc = run_mpi(2, colnet("run", QUICK, "--set", override, "--out", str(out)), timeout=120)
    _fails(proc, *needles)
    assert not out.exists()


@pytest.mark.mpi
def test_exception_on_one_rank_aborts_job(tmp_path: Path) -> None:
    """A crash on rank 1 in round 2 takes every rank down (no hang) and marks the file failed."""
    cfg = tmp_path / "two.toml"
    cfg.write_text(Path(QUICK).read_text().replace("count = 3", "count = 1"))
    out = tmp_path / "crash.h5"
    script = tmp_path / "crash.py"
    write_crash_script(script)
    proc = run_mpi(
        2, [sys.executable, str(script), "run", str(cfg), "--out", str(out), *SMALL], timeout=240
    )
    assert proc.returncode != 0
    assert "rank 1 of 2" in proc.stderr and "injected failure" in proc.stderr, proc.stderr
    with h5py.File(out) as f:
        assert f.attrs["status"] == "failed"
        assert "injected failure" in f.attrs["error"]
        assert f["round/test_loss"].shape[0] == 1  # round 1 was kept


@pytest.mark.mpi
def test_dry_run_checks_everything_and_trains_nothing(tmp_path: Path) -> None:
    out = tmp_path / "dry.h5"
    proc = run_mpi(6, colnet("run", QUICK, "--dry-run", "--out", str(out), *SMALL), timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "dry run: config, world size, data and models are fine" in proc.stdout
    assert "round   1" not in proc.stdout and not out.exists()


def test_python_dash_m_and_check_config() -> None:
    def check(*overrides: str) -> subprocess.CompletedProcess[str]:
        cmd = colnet("check-config", QUICK, *(x for o in overrides for x in ("--set", o)))
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
        )

    proc = check("training.rounds=7")
    assert proc.returncode == 0, proc.stderr
    assert "rounds = 7" in proc.stdout and "needs 6 MPI ranks" in proc.stderr
    bad = check("model.privatization=5")
    assert bad.returncode == 2 and "model.privatization" in bad.stderr


@pytest.mark.mpi
@pytest.mark.slow
def test_node_sending_nan_does_not_stop_or_poison_the_run(runs) -> None:
    """Node 1 sends NaN backbones every round: the job finishes, its peers stay finite, and the
    file says who refused whom and that node 1 was left out of its group's aggregate."""
    with h5py.File(runs[0] / "nan.h5") as f:
        assert f.attrs["status"] == "finished"
        peers = [0, 2, 3, 4, 5]
        assert np.isfinite(f["round/test_loss"][:, peers]).all()
        assert np.isfinite(f["round/test_f1_micro"][:, [0, 2]]).all()
        assert (f["attack/active"][:] == np.array([0, 1, 0, 0, 0, 0])).all()
        refused = f["defense/refused"][:]  # (R, N, N): [i, j] = i refused j
        assert (refused[:, peers, 1] == 1).all() and refused[:, :, peers].sum() == 0
        groups, excluded = f["round/group"][:], f["defense/excluded"][:]
        for r in range(groups.shape[0]):
            if (groups[r] == groups[r, 1]).sum() > 1:  # node 1 had group-mates to poison
                assert excluded[r, 1] == 1
        assert excluded[:, peers].sum() == 0
