"""benchmarks/memory_trace.py: it finds the rank processes below the command and their memory."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT

# a stand-in for a rank: its command line names colnet_mpi; it touches 80 MB, then waits
RANK = (
    "import colnet_mpi, time; x = bytearray(80 * 2**20); "
    "x[::4096] = b'1' * len(x[::4096]); time.sleep(1.5)"
)


def test_trace_sees_the_ranks_memory_and_the_exit_code(tmp_path):
    script = str(ROOT / "benchmarks" / "memory_trace.py")
    out = tmp_path / "samples.json"
    cmd = [sys.executable, script, "--every", "0.1", "--json", str(out), "--"]
    proc = subprocess.run(
        [*cmd, sys.executable, "-c", RANK], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    peak = re.search(
        r"peak summed PSS ([\d,]+) MB at [\d.]+ s: anonymous MB per rank +(\d+)", proc.stdout
    )
    assert peak, proc.stdout
    assert int(peak.group(2)) >= 80, proc.stdout  # the touched bytes are the rank's own
    assert out.read_text().startswith("[[")
    # a command that fails: its exit code comes back; nothing named colnet_mpi ran
    bad = subprocess.run(
        [*cmd, sys.executable, "-c", "raise SystemExit(3)"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "no rank process seen" in bad.stderr
