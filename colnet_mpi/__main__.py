"""``python -m colnet_mpi`` is the same as the ``colnet-mpi`` console script."""

from colnet_mpi.cli import entry

entry()
