"""Shared helpers: launching mpiexec with a timeout (tiers 2 and 3 of the test plan)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def mpiexec() -> str:
    """The mpiexec on PATH (from the `mpich` extra or the site MPI)."""
    exe = shutil.which("mpiexec") or shutil.which("mpirun")
    if exe is None:
        raise RuntimeError(
            "mpiexec not found: install the test extras with pip install -e '.[mpich,test]'"
        )
    return exe


def run_mpi(
    n: int,
    argv: list[str],
    *,
    timeout: float = 240,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` on ``n`` ranks (``env``: more environment variables); a hang fails the test
    instead of blocking the suite."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    cmd = [mpiexec(), "-n", str(n), *argv]
    try:
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd or ROOT,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(
            f"{' '.join(cmd)} did not finish in {timeout}s (hang?)\n{err.stdout}\n{err.stderr}"
        )


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (what it imports is then all its own); assert it
    exits 0, showing its stderr otherwise; return the finished process."""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def colnet(*args: str) -> list[str]:
    """Command line of the real CLI, run by this interpreter."""
    return [sys.executable, "-m", "colnet_mpi", *args]


#: Runs ``colnet-mpi`` with each argument list of ``argv[1]`` (JSON) in turn, in one process per
#: rank; stops at the first non-zero exit code.
_BATCH = (
    "import json, sys\n"
    "from colnet_mpi import cli\n"
    "for args in json.loads(sys.argv[1]):\n"
    "    code = cli.main(args)\n"
    "    if code:\n"
    "        sys.exit(code)\n"
)


def colnet_batch(*runs: list[str]) -> list[str]:
    """One command that makes several ``colnet-mpi`` calls one after the other in the same
    processes (MPI and torch start once): each run is the argument list after ``colnet-mpi``."""
    return [sys.executable, "-c", _BATCH, json.dumps([list(r) for r in runs])]


def write_crash_script(script: Path) -> Path:
    """A ``colnet-mpi`` entry script whose rank 1 raises in round 2 (a crash on one rank)."""
    script.write_text(
        "import sys\n"
        "from mpi4py import MPI\n"
        "from colnet_mpi import cli\n"
        "from colnet_mpi.federation import loop as rnd\n"
        "original = rnd.Federation.round\n"
        "def round(self, r):\n"
        "    if r == 2 and MPI.COMM_WORLD.Get_rank() == 1:\n"
        "        raise RuntimeError('injected failure')\n"
        "    return original(self, r)\n"
        "rnd.Federation.round = round\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    return script
