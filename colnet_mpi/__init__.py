"""colnet_mpi: ColNet decentralized federated multi-task learning, one MPI rank per node."""

__version__ = "0.1.0"
