"""Tier 2: the comm layer and a full round under mpiexec at 2, 4 and 6 ranks."""

from __future__ import annotations

import re
import sys

import pytest

from tests.conftest import ROOT, run_mpi

SCRIPTS = ROOT / "tests" / "mpi" / "scripts"


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 4, 6])
def test_comm_layer(ranks: int) -> None:
    proc = run_mpi(ranks, [sys.executable, str(SCRIPTS / "comm_checks.py")], timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(f"ok on {ranks} ranks") == 5, proc.stdout


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 4, 6])
def test_host_turns(ranks: int) -> None:
    """run.host_slots: at most k ranks of a host in a turn, chains in host order, refused
    hand-overs, patience down a chain, a rank stopped in its turn named."""
    proc = run_mpi(ranks, [sys.executable, str(SCRIPTS / "turn_checks.py")], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(f"ok on {ranks} ranks") == 5, proc.stdout


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 4])
def test_async_mailbox_and_agreements(ranks: int) -> None:
    proc = run_mpi(ranks, [sys.executable, str(SCRIPTS / "mailbox_checks.py")], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(f"ok on {ranks} ranks") == 2, proc.stdout


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4, 6])
def test_full_round(ranks: int) -> None:
    proc = run_mpi(ranks, [sys.executable, str(SCRIPTS / "round_checks.py")], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(f"ok on {ranks} ranks") == 4, proc.stdout


@pytest.mark.mpi
@pytest.mark.slow
def test_attacks_and_defenses_in_rounds() -> None:
    proc = run_mpi(6, [sys.executable, str(SCRIPTS / "defense_checks.py")], timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok on 6 ranks") == 6, proc.stdout


@pytest.mark.mpi
@pytest.mark.slow
def test_adding_a_cross_rule_example() -> None:
    """The README's worked example: a new cross rule + scheme, registered and run on 4 ranks."""
    script = str(SCRIPTS / "strategy_example.py")
    proc = run_mpi(4, [sys.executable, script], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok on 4 ranks") == 1, proc.stdout


@pytest.mark.mpi
def test_watchdog_names_a_stopped_rank() -> None:
    """Bounded waits: completed ones return, a mismatched wait times out with every rank
    answering, and a rank stopped with SIGSTOP is named by the others, which end the job."""
    script = str(SCRIPTS / "watchdog_checks.py")
    proc = run_mpi(3, [sys.executable, script], timeout=60)
    # the job ends with the waiting ranks' MPI_Abort(3); the launcher may report the stopped
    # rank's SIGKILL (exit 9) instead, depending on which it handles first
    aborted = proc.returncode == 3 or (proc.returncode == 9 and "MPI_Abort" in proc.stderr)
    assert aborted, proc.stdout + proc.stderr
    assert proc.stdout.count("ok on 3 ranks") == 2, proc.stdout + proc.stderr
    # each waiting rank's report, wherever the launcher's merging of the ranks' output put it
    gave_up = re.findall(r"rank (\d) gave up after", proc.stdout)
    assert sorted(gave_up) == ["0", "1"], proc.stdout
    reports = re.split(r"(?=rank \d gave up)", proc.stdout)
    for report in (r for r in reports if " gave up " in r):
        assert "in round 4, cross for the leaders' sum" in report, report
        assert "silent: rank 2 (no answer within 1s" in report, report
    assert "not reached" not in proc.stdout
