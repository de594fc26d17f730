"""Pure ColNet algorithms on flat tensors and arrays (no MPI): FedAvg, HCA, clustering, signals."""

from colnet_mpi.algorithms.clustering import (
    adjusted_rand,
    canonical_labels,
    coassociation,
    consensus_partition,
    cosine_matrix,
    eigengap_k,
    fuse_affinity,
    leader_position,
    spectral_labels,
)
from colnet_mpi.algorithms.fedavg import weighted_average
from colnet_mpi.algorithms.hca import (
    HCA_EPS,
    HCAResult,
    hca_objective,
    hca_update,
    solve_hca_weights,
)
from colnet_mpi.algorithms.signals import ESTIMATORS, loss_and_jacobian

__all__ = [
    "ESTIMATORS",
    "HCA_EPS",
    "HCAResult",
    "adjusted_rand",
    "canonical_labels",
    "coassociation",
    "consensus_partition",
    "cosine_matrix",
    "eigengap_k",
    "fuse_affinity",
    "hca_objective",
    "hca_update",
    "leader_position",
    "loss_and_jacobian",
    "solve_hca_weights",
    "spectral_labels",
    "weighted_average",
]
