"""Tier 3: the results file under trouble — a full disk; two runs on one output."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from colnet_mpi.metrics.lock import lock_path, read_holder
from colnet_mpi.metrics.reader import load_run
from tests.conftest import ROOT, colnet, mpiexec, run_mpi, write_crash_script
from tests.integration.test_cli import QUICK, SMALL


def run_mpi_env(
    n: int, argv: list[str], env: dict[str, str], timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """``run_mpi`` with extra environment variables (the test hooks)."""
    env = dict(env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [mpiexec(), "-n", str(n), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        check=False,
    )


def two_node_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "two.toml"
    cfg.write_text(Path(QUICK).read_text().replace("count = 3", "count = 1"))
    return cfg


@pytest.mark.mpi
def test_full_disk_marks_the_run_failed_with_one_message(tmp_path: Path, monkeypatch) -> None:
    """Appending round 2 fails with ENOSPC: the job exits non-zero without a segfault, says once
    which file could not be written, and leaves round 1 readable in a file marked failed."""
    cfg = two_node_config(tmp_path)
    out = tmp_path / "full.h5"
    monkeypatch.setenv("COLNET_TEST_ENOSPC", "2")
    proc = run_mpi(2, colnet("run", str(cfg), "--out", str(out), *SMALL), timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log
    assert "Segmentation fault" not in log and "SIGSEGV" not in log, log
    assert proc.stderr.count("failed: disk full") == 1, proc.stderr
    message = next(line for line in proc.stderr.splitlines() if "failed: disk full" in line)
    assert "rank 0 of 2" in message and repr(str(out)) in message, message
    assert "no space left on device" in message, message
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "round   1/3" in proc.stdout and "round   2/3" not in proc.stdout, proc.stdout
    run = load_run(out)
    assert run.status == "failed"
    assert "disk full" in run.attrs["error"] and str(out) in run.attrs["error"]
    assert run.n_rounds == 1
    loss = run.data["round/test_loss"]
    assert loss.shape == (1, 2) and np.isfinite(loss).all()
    assert set(run.data["epoch/round"].tolist()) == {1}
    assert not lock_path(out).exists()  # a failed run leaves no lock


@pytest.mark.mpi
@pytest.mark.slow
def test_second_run_on_a_running_output_is_refused(tmp_path: Path) -> None:
    """While one run writes its file, another on the same output is refused with exit 2 naming
    the holder, even with --overwrite or --resume; the first finishes with a clean file."""
    cfg = two_node_config(tmp_path)
    out = tmp_path / "shared.h5"
    rounds = 40
    args = [*SMALL, "--set", f"training.rounds={rounds}", "--set", "run.checkpoint_every=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SLURM_JOB_ID="1001")
    first = subprocess.Popen(
        [mpiexec(), "-n", "2", *colnet("run", str(cfg), "--out", str(out), *args, "--quiet")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not lock_path(out).exists() and first.poll() is None:
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        for flag in ("--overwrite", "--resume"):
            second = run_mpi(2, colnet("run", str(cfg), "--out", str(out), *args, flag))
            assert second.returncode == 2, second.stdout + second.stderr
            assert "is in use by another run" in second.stderr, second.stderr
            assert "job 1001" in second.stderr and socket.gethostname() in second.stderr
            assert second.stderr.count("in use by another run") == 1, second.stderr
            assert first.poll() is None, "the first run ended before the second was refused"
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, err
    run = load_run(out)
    assert run.status == "finished" and run.n_rounds == rounds
    assert not lock_path(out).exists()


@pytest.mark.mpi
def test_lock_is_dropped_on_preemption_and_taken_over_after_a_kill(tmp_path: Path) -> None:
    cfg = two_node_config(tmp_path)
    out = tmp_path / "stop.h5"
    base = colnet("run", str(cfg), "--out", str(out), *SMALL)
    env = dict(os.environ, COLNET_TEST_SIGNAL="stage.local_train:2:0:SIGTERM")
    stopped = run_mpi_env(2, base, env)
    assert stopped.returncode == 75, stopped.stderr
    assert not lock_path(out).exists()  # a preempted run leaves no lock
    env = dict(os.environ, COLNET_TEST_KILL="stage.local_train:3:0")
    killed = run_mpi_env(2, [*base, "--resume"], env)
    assert killed.returncode != 0
    holder = read_holder(lock_path(out))  # SIGKILL: the lock stays, naming a dead pid
    assert holder is not None and holder.host == socket.gethostname()
    resumed = run_mpi(2, [*base, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "taking over a stale lock" in resumed.stdout and f"pid {holder.pid}" in resumed.stdout
    assert load_run(out).status == "finished" and load_run(out).n_rounds == 3
    assert not lock_path(out).exists()


@pytest.mark.mpi
def test_failure_on_another_rank_drops_the_lock_of_a_slurm_job(tmp_path: Path) -> None:
    """Rank 1 fails and aborts the job, so rank 0 may die before it drops its lock: rank 1
    removes the lock of its own SLURM job, and the output can be resumed from any host."""
    cfg = two_node_config(tmp_path)
    out = tmp_path / "crash.h5"
    script = tmp_path / "crash.py"
    write_crash_script(script)
    env = dict(os.environ, SLURM_JOB_ID="2002")
    argv = [sys.executable, str(script), "run", str(cfg), "--out", str(out), *SMALL]
    proc = run_mpi_env(2, argv, env)
    assert proc.returncode != 0 and "injected failure" in proc.stderr, proc.stderr
    assert load_run(out).status == "failed"
    assert not lock_path(out).exists()


@pytest.mark.mpi
def test_stopped_rank_is_named_and_the_run_marked_failed(tmp_path: Path) -> None:
    """Rank 1 is stopped (SIGSTOP, as a hung GPU would be) before its exchange in round 2: rank 0
    gives up after federation.timeout, names rank 1 and the stage in one line, the job ends,
    and the results file says failed and why, with round 1 kept."""
    cfg = two_node_config(tmp_path)
    out = tmp_path / "stopped.h5"
    env = dict(os.environ, COLNET_TEST_SIGNAL="stage.exchange:2:1:SIGSTOP")
    t0 = time.perf_counter()
    proc = run_mpi_env(
        2,
        colnet("run", str(cfg), "--out", str(out), *SMALL, "--set", "federation.timeout=3"),
        env,
        timeout=180,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log
    lines = [line for line in proc.stderr.splitlines() if "watchdog:" in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("colnet-mpi: rank 0 of 2"), lines[0]
    assert "in round 2, exchange for its backbone with rank 1" in lines[0], lines[0]
    assert "silent: rank 1" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert time.perf_counter() - t0 < 150
    run = load_run(out)
    assert run.status == "failed"
    assert "silent: rank 1" in run.attrs["error"]
    assert run.n_rounds == 1
