"""Where the memory of a run goes over time: every rank's PSS, sampled while a command runs.

    python benchmarks/memory_trace.py [--every 0.5] [--rows 30] [--json FILE] -- \\
        mpiexec -n 6 colnet-mpi run configs/cifar10_label_het.toml --set data.root=/tmp/fakecifar50

Runs the command and, every ``--every`` seconds, reads ``/proc/PID/smaps_rollup`` of each
process below it whose command line names ``colnet_mpi`` or ``colnet-mpi`` (the ranks). Prints
the moment the summed PSS peaked, with each rank's anonymous memory (its heap and tensors), the
shared-library pages (``Pss_File``, counted once) and shared memory (``Pss_Shmem``) then, and a
time line of the summed PSS and every rank's anonymous memory. Linux only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from colnet_mpi.bench import process_tree

FIELDS = ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem")


def rank_memory(pid: int) -> dict[str, int] | None:
    """MB of each of FIELDS for a rank process; None for other processes or gone ones."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"colnet_mpi" not in command and b"colnet-mpi" not in command:
            return None
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    except OSError:
        return None
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in FIELDS:
            values[key] = int(rest.split()[0]) // 1024
    return values if len(values) == len(FIELDS) else None


def main() -> None:
    """Run the command, sample, print."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    p.add_argument("--rows", type=int, default=30, help="lines of the time line (about)")
    p.add_argument("--json", type=Path, help="write every sample here")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command: put it after --")
    if not args.every > 0:
        p.error(f"--every {args.every} is not allowed; use a number of seconds > 0")
    proc = subprocess.Popen(command)
    t0 = time.perf_counter()
    samples: list[tuple[float, dict[int, dict[str, int]]]] = []
    while proc.poll() is None:
        ranks = {}
        for pid in process_tree(proc.pid):
            mem = rank_memory(pid)
            if mem is not None:
                ranks[pid] = mem
        if ranks:
            samples.append((time.perf_counter() - t0, ranks))
        time.sleep(args.every)
    if args.json:
        args.json.write_text(json.dumps(samples))
    if not samples:
        sys.exit(f"no rank process seen (exit code {proc.returncode})")

    def total(ranks: dict[int, dict[str, int]]) -> int:
        return sum(m["Pss"] for m in ranks.values())

    def anon(ranks: dict[int, dict[str, int]]) -> str:
        return " ".join(f"{ranks[pid]['Pss_Anon']:5d}" for pid in sorted(ranks))

    at, peak = max(samples, key=lambda s: total(s[1]))
    print(
        f"peak summed PSS {total(peak):,} MB at {at:.1f} s: anonymous MB per rank {anon(peak)}; "
        f"library pages {sum(m['Pss_File'] for m in peak.values())} MB, "
        f"shared memory {sum(m['Pss_Shmem'] for m in peak.values())} MB"
    )
    print("   time   PSS MB   anonymous MB per rank")
    step = max(1, len(samples) // max(1, args.rows))
    for t, ranks in samples[::step]:
        print(f"{t:7.1f} {total(ranks):8,d}   {anon(ranks)}")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
