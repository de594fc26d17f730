"""Tier 3: checkpoints and --resume under mpiexec (four ranks, two per task). A run killed
(SIGKILL of one rank) in round 3 of 5, stopped by a signal at a round boundary, or crashed while
writing a checkpoint, continues with --resume to a results file whose every dataset is
bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import h5py
import pytest

from tests.conftest import ROOT, colnet, run_mpi
from tests.reference import differences, fingerprint

QUICK = str(ROOT / "configs" / "quickstart.toml")
#: the quickstart with two nodes per task instead of three (written by ``four_nodes``)
FOUR = {"config": ""}
N = 4
#: colnet with clustering, screening + leader verification, a label-flipping node (whose
#: random draws must be restored too), 5 batches of 16 per epoch from 51 training samples (the
#: loader's permutations run across passes), shrunk so that a 5-round run takes seconds
ARGS = [
    "--set", "training.rounds=5", "--set", "data.samples_per_node=64",
    "--set", "data.test_samples=48", "--set", "model.width=4",
    "--set", "clustering.max_batches=1", "--set", "training.local_epochs=1",
    "--set", "training.steps_per_epoch=5",
    "--set", "attack.kind=label_flip",
    "--set", "defense.screening=true", "--set", "defense.verify_leader=true",
]  # fmt: skip
EXIT_PREEMPTED = 75


@pytest.fixture(scope="module", autouse=True)
def four_nodes(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("config") / "four.toml"
    path.write_text(Path(QUICK).read_text().replace("count = 3", "count = 2"))
    FOUR["config"] = str(path)


def launch(out: Path, *extra: str, env: dict[str, str] | None = None):
    """``colnet-mpi run`` of the four-node config on four ranks (extra environment: fault
    hooks)."""
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        argv = colnet("run", FOUR["config"], "--out", str(out), *ARGS, *extra)
        return run_mpi(N, argv, timeout=400)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def attrs(path: Path) -> dict:
    with h5py.File(path) as f:
        a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        a["rounds"] = f["round/test_loss"].shape[0]
        a["epochs"] = f["epoch/val_loss"].shape[0]
    return a


def crashed(out: Path, kill: str) -> dict:
    """The results-file attributes after a run whose process was killed at ``kill``."""
    proc = launch(out, env={"COLNET_TEST_KILL": kill})
    assert proc.returncode != 0
    return attrs(out)


def checkpoint_files(path: Path) -> list[str]:
    return sorted(p.name for p in Path(f"{path}.ckpt").iterdir())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    proc = launch(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert attrs(out)["checkpoint_round"] == 5
    return fingerprint(out)


def resume_and_compare(out: Path, reference: dict, resumed_from: int) -> None:
    proc = launch(out, "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resuming after round {resumed_from}" in proc.stdout, proc.stdout
    a = attrs(out)
    assert a["status"] == "finished" and a["rounds"] == 5 and a["epochs"] == 5, a
    assert a["resumed"].startswith(f"{resumed_from}@"), a["resumed"]
    diff = differences(reference, fingerprint(out))
    assert not diff, "resumed run differs from the uninterrupted one:\n" + "\n".join(diff)
    # only the last round's checkpoint is kept, one file per rank
    assert checkpoint_files(out) == [f"rank{r:05d}.round000005.ckpt" for r in range(N)]


@pytest.mark.mpi
@pytest.mark.slow
def test_kill_one_rank_in_round_3_then_resume(tmp_path: Path, uninterrupted: dict) -> None:
    out = tmp_path / "killed.h5"
    a = crashed(out, "stage.cross:3:2")
    assert a["status"] == "running" and a["checkpoint_round"] == 2 and a["rounds"] == 2, a
    resume_and_compare(out, uninterrupted, 2)


@pytest.mark.mpi
@pytest.mark.slow
def test_crash_while_writing_checkpoint_keeps_previous(tmp_path: Path, uninterrupted: dict) -> None:
    out = tmp_path / "crashed.h5"
    a = crashed(out, "checkpoint:3:3")
    # round 3 is recorded but not saved: resuming replaces it (recomputed), never mixes
    assert a["checkpoint_round"] == 2 and a["rounds"] == 3 and a["epochs"] == 3, a
    files = checkpoint_files(out)
    assert "rank00003.round000002.ckpt" in files and "rank00003.round000003.ckpt" not in files, (
        files
    )
    resume_and_compare(out, uninterrupted, 2)


@pytest.mark.mpi
@pytest.mark.slow
def test_signal_on_one_rank_stops_all_at_round_boundary(
    tmp_path: Path, uninterrupted: dict
) -> None:
    """SLURM's warning signal (USR1) reaches rank 1 in round 2; every rank finishes round 2,
    the round is checkpointed although checkpoint_every=3 asked for round 3 only, the file is
    marked preempted and every rank exits with code 75."""
    out = tmp_path / "stopped.h5"
    proc = launch(
        out,
        "--set",
        "run.checkpoint_every=3",
        env={"COLNET_TEST_SIGNAL": "stage.evaluate:2:1:SIGUSR1"},
    )
    assert proc.returncode == EXIT_PREEMPTED, proc.stdout + proc.stderr
    assert "SIGUSR1 before round 3" in proc.stdout, proc.stdout
    a = attrs(out)
    assert a["status"] == "preempted" and a["checkpoint_round"] == 2 and a["rounds"] == 2, a
    resume_and_compare(out, uninterrupted, 2)


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM"])
def test_signal_mid_round_loses_only_that_round(tmp_path: Path, sig: str) -> None:
    """SIGTERM (scancel, SLURM preemption) to every rank during local training. Ctrl-C (SIGINT)
    takes the same handler (``tests/unit/test_stop.py`` checks that it is noted, not raised)."""
    out = tmp_path / "term.h5"
    proc = launch(out, env={"COLNET_TEST_SIGNAL": f"stage.local_train:4:*:{sig}"})
    assert proc.returncode == EXIT_PREEMPTED, proc.stdout + proc.stderr
    assert f"{sig} in round 4" in proc.stdout and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.count("stopped:") == 1, proc.stdout  # one line, from rank 0
    a = attrs(out)
    assert a["status"] == "preempted" and a["checkpoint_round"] == 3 and a["rounds"] == 3, a


@pytest.mark.mpi
@pytest.mark.slow
def test_resume_refuses_other_config_and_world_size_then_extends(
    tmp_path: Path, uninterrupted: dict
) -> None:
    out = tmp_path / "short.h5"
    proc = launch(out, "--set", "training.rounds=1")
    assert proc.returncode == 0, proc.stderr
    # a finished run with all its rounds: nothing to do
    proc = launch(out, "--set", "training.rounds=1", "--resume")
    assert proc.returncode == 0 and "nothing to resume" in proc.stdout, proc.stdout + proc.stderr
    # another value of a key that changes results
    proc = launch(out, "--set", "model.width=8", "--resume")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "model.width: 4 -> 8" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # another world size (the six-node quickstart)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [*colnet("run", QUICK, "--out", str(out), *ARGS, "--resume")]
    proc = subprocess.run(
        ["mpiexec", "-n", "6", *cmd], capture_output=True, text=True, timeout=300, env=env,
        cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "it ran with 4" in proc.stderr, proc.stderr
    # a finished run continues with more rounds (training.rounds may change), as if never stopped
    proc = launch(out, "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    diff = differences(uninterrupted, fingerprint(out))
    assert not diff, "\n".join(diff)
