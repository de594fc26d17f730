"""Cross-rank assertions for scripts run under mpiexec: one failure fails every rank together."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

import numpy as np
from mpi4py import MPI


def run_checks(checks: list[Callable[[MPI.Comm], None]], comm: MPI.Comm = MPI.COMM_WORLD) -> None:
    """Run each check on every rank; combine pass/fail across ranks after each one; exit 1 on failure."""
    failed_any = False
    for check in checks:
        error = ""
        try:
            check(comm)
        except Exception:  # noqa: BLE001 - reported, then turned into a collective failure
            error = traceback.format_exc()
        flags = np.zeros(comm.Get_size(), dtype=np.int32)
        comm.Allgather([np.array([1 if error else 0], dtype=np.int32), MPI.INT], [flags, MPI.INT])
        if error:
            sys.stderr.write(f"[rank {comm.Get_rank()}] {check.__name__} FAILED\n{error}\n")
        if flags.any():
            failed_any = True
            if comm.Get_rank() == 0:
                sys.stderr.write(
                    f"{check.__name__}: failed on ranks {np.flatnonzero(flags).tolist()}\n"
                )
        elif comm.Get_rank() == 0:
            print(f"{check.__name__}: ok on {comm.Get_size()} ranks", flush=True)
    sys.stderr.flush()
    if failed_any:
        sys.exit(1)
