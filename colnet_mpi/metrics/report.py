"""``colnet-mpi report``: paper-style tables and figures from HDF5 results (placeholder)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    """Register ``colnet-mpi report``."""
    p = sub.add_parser("report", help="tables and figures from results files (not implemented yet)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run ``colnet-mpi report``."""
    raise NotImplementedError("colnet-mpi report is being written")
