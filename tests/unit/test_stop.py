"""Stop signals on one rank (no mpiexec: a singleton MPI process)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = """
import os, signal, sys
from mpi4py import MPI
from colnet_mpi.federation.stop import StopRequest
stop = StopRequest().install()
os.kill(os.getpid(), signal.SIG{first})
print("noted", stop.received, stop.agreed(MPI.COMM_WORLD), flush=True)
os.kill(os.getpid(), signal.SIG{second})
print("still here", flush=True)
"""


def _run(first: str, second: str) -> subprocess.CompletedProcess[str]:
    code = SCRIPT.format(first=first, second=second)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
        check=False,
    )  # fmt: skip


def test_first_signal_is_noted_and_agreed_second_leaves_at_once() -> None:
    proc = _run("USR1", "INT")
    assert "noted SIGUSR1 SIGUSR1" in proc.stdout, proc.stdout + proc.stderr
    assert "still here" not in proc.stdout
    assert proc.returncode == 128 + 2, proc.returncode  # SIGINT
    assert "SIGINT again" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_ctrl_c_is_a_stop_request_not_a_keyboard_interrupt() -> None:
    proc = _run("INT", "TERM")
    assert "noted SIGINT SIGINT" in proc.stdout and "KeyboardInterrupt" not in proc.stderr
    assert proc.returncode == 128 + 15


def test_evaluate_every_tests_every_kth_round_and_always_the_last() -> None:
    from colnet_mpi.config import config_from_dict
    from colnet_mpi.federation.stages import tested

    nodes = [{"task": "attributes", "count": 2}]
    cfg = config_from_dict(
        {"run": {"evaluate_every": 3}, "training": {"rounds": 7}, "nodes": nodes}
    )
    assert [r for r in range(1, 8) if tested(cfg, r)] == [3, 6, 7]
    every = config_from_dict({"training": {"rounds": 4}, "nodes": nodes})
    assert [r for r in range(1, 5) if tested(every, r)] == [1, 2, 3, 4]
