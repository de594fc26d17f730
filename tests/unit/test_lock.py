"""Unit tests for colnet_mpi.metrics.lock: one run per results file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colnet_mpi.metrics.lock import LockHeld, abandon_for_job, acquire, lock_path, read_holder


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(output: Path, **fields: object) -> Path:
    path = lock_path(output)
    holder = {"job_id": "", "restart": "", "host": socket.gethostname(), "pid": os.getpid()}
    holder.update(started="2024-01-01T00:00:00+00:00", **fields)
    path.write_text(json.dumps(holder))
    return path


def test_lock_file_names_its_holder_and_release_removes_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    out = tmp_path / "sub" / "run.h5"
    lock = acquire(out)
    assert lock.path == tmp_path / "sub" / "run.h5.lock" and lock.path.is_file()
    holder = read_holder(lock.path)
    assert holder is not None
    assert (holder.job_id, holder.host, holder.pid) == ("4242", socket.gethostname(), os.getpid())
    assert holder.started and json.loads(lock.path.read_text())["output"] == str(out)
    assert not out.exists()  # only the lock is created
    lock.release()
    assert not lock.path.exists()
    lock.release()  # idempotent
    with acquire(out) as again:  # free again
        assert again.path.exists()
    assert not again.path.exists()


def test_live_lock_is_refused_naming_its_holder(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    out = tmp_path / "run.h5"
    first = acquire(out)
    before = first.path.read_text()
    with pytest.raises(LockHeld) as err:
        acquire(out)
    text = str(err.value)
    assert "job 77" in text and f"host {socket.gethostname()}" in text
    assert f"pid {os.getpid()}" in text and str(first.path) in text
    assert first.path.read_text() == before  # untouched
    first.release()
    acquire(out).release()


def test_lock_from_another_host_is_live(tmp_path) -> None:
    out = tmp_path / "run.h5"
    path = write_lock(out, host="elsewhere-node17", pid=dead_pid(), job_id="9")
    with pytest.raises(LockHeld, match="another host") as err:
        acquire(out)
    assert "job 9, host elsewhere-node17" in str(err.value)
    assert f"remove {str(path)!r}" in str(err.value)
    assert path.exists()


def fake_squeue(tmp_path: Path, stdout: str, stderr: str = "", code: int = 0) -> str:
    script = tmp_path / "squeue"
    script.write_text(
        f"#!/bin/sh\nprintf '%s' '{stdout}'\nprintf '%s' '{stderr}' >&2\nexit {code}\n"
    )
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize(
    ("stdout", "stderr", "code", "stale"),
    [
        ("RUNNING\n", "", 0, False),  # still in the queue: live
        ("", "", 0, True),  # no longer listed: stale
        ("", "slurm_load_jobs error: Invalid job id specified", 1, True),
        ("", "slurm_load_jobs error: Unable to contact slurm controller", 1, False),
    ],
)
def test_lock_of_a_slurm_job_on_another_host_is_checked_with_squeue(
    tmp_path, monkeypatch, stdout: str, stderr: str, code: int, stale: bool
) -> None:
    out = tmp_path / "run.h5"
    path = write_lock(out, host="elsewhere-node17", pid=12345, job_id="9")
    monkeypatch.setenv("COLNET_SQUEUE", fake_squeue(tmp_path, stdout, stderr, code))
    said: list[str] = []
    if stale:
        lock = acquire(out, log=said.append)
        assert "SLURM job 9 has ended" in said[0]
        assert read_holder(path).pid == os.getpid()
        lock.release()
    else:
        with pytest.raises(LockHeld, match="another host"):
            acquire(out)
        assert read_holder(path).pid == 12345


def test_stale_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path) -> None:
    out = tmp_path / "run.h5"
    pid = dead_pid()
    write_lock(out, pid=pid, job_id="5")
    lines: list[str] = []
    lock = acquire(out, log=lines.append)
    holder = read_holder(lock.path)
    assert holder is not None and holder.pid == os.getpid()
    assert len(lines) == 1 and "stale lock" in lines[0] and f"pid {pid}" in lines[0]
    lock.release()
    assert not lock.path.exists()
    assert not list(tmp_path.glob("*.stale.*"))


def test_earlier_start_of_a_requeued_job_is_stale(tmp_path, monkeypatch) -> None:
    out = tmp_path / "run.h5"
    write_lock(out, host="elsewhere-node17", pid=1, job_id="31", restart="")
    monkeypatch.setenv("SLURM_JOB_ID", "31")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lines: list[str] = []
    acquire(out, log=lines.append).release()
    assert "earlier start of this job" in lines[0]


def test_unreadable_lock_is_stale_once_old(tmp_path) -> None:
    out = tmp_path / "run.h5"
    path = lock_path(out)
    path.write_text("")
    with pytest.raises(LockHeld):  # fresh: its holder may be writing it
        acquire(out, attempts=1)
    old = time.time() - 60
    os.utime(path, (old, old))
    acquire(out).release()


def test_release_keeps_a_lock_that_is_no_longer_ours(tmp_path) -> None:
    out = tmp_path / "run.h5"
    lock = acquire(out)
    write_lock(out, host="elsewhere-node17")  # someone took it over
    lock.release()
    assert lock.path.exists()


def test_racing_processes_get_one_lock(tmp_path) -> None:
    out, done = tmp_path / "run.h5", tmp_path / "done"
    code = (
        "import pathlib, sys, time\n"
        "from colnet_mpi.metrics.lock import LockHeld, acquire\n"
        "try:\n"
        "    lock = acquire(sys.argv[1])\n"
        "except LockHeld:\n"
        "    print('refused', flush=True)\n"
        "else:\n"
        "    print('got', flush=True)\n"
        "    while not pathlib.Path(sys.argv[2]).exists():\n"  # hold it until all have tried
        "        time.sleep(0.05)\n"
        "    lock.release()\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(out), str(done)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    try:
        answers = sorted(p.stdout.readline().strip() for p in procs if p.stdout)
    finally:
        done.touch()
        for p in procs:
            p.communicate(timeout=60)
    assert answers == ["got"] + ["refused"] * 5
    assert not lock_path(out).exists()


def test_another_rank_of_the_same_slurm_job_abandons_the_lock(tmp_path, monkeypatch) -> None:
    out = tmp_path / "run.h5"
    write_lock(out, host="elsewhere-node17", pid=1, job_id="31", restart="2")
    monkeypatch.setenv("SLURM_JOB_ID", "31")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert abandon_for_job(out) is False  # another start of the job: not ours
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert abandon_for_job(out) is True and not lock_path(out).exists()
    write_lock(out, job_id="")
    monkeypatch.delenv("SLURM_JOB_ID")
    assert abandon_for_job(out) is False and lock_path(out).exists()  # outside SLURM: no
