"""``python -m colnet_mpi`` is the same as the ``colnet-mpi`` console script."""

import sys

from colnet_mpi.cli import main

sys.exit(main())
