"""Sweeps: a TOML spec of named axes -> a deterministic list of override sets (placeholder)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    """Register ``colnet-mpi sweep``."""
    p = sub.add_parser("sweep", help="expand a sweep spec (not implemented yet)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run ``colnet-mpi sweep``."""
    raise NotImplementedError("colnet-mpi sweep is being written")
