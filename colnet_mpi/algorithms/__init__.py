"""Pure ColNet algorithms on flat tensors and arrays (no MPI): FedAvg, HCA, clustering, signals, robust rules."""

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
from colnet_mpi.algorithms.robust import (
    ROBUST_RULES,
    ScreenResult,
    VerifyResult,
    coordinate_median,
    norm_clipped_mean,
    robust_aggregate,
    screen_updates,
    trimmed_mean,
    verify_hca,
)
from colnet_mpi.algorithms.signals import ESTIMATORS, loss_and_jacobian

__all__ = [
    "ESTIMATORS",
    "HCA_EPS",
    "HCAResult",
    "ROBUST_RULES",
    "ScreenResult",
    "VerifyResult",
    "adjusted_rand",
    "canonical_labels",
    "coassociation",
    "consensus_partition",
    "coordinate_median",
    "cosine_matrix",
    "eigengap_k",
    "fuse_affinity",
    "hca_objective",
    "hca_update",
    "leader_position",
    "loss_and_jacobian",
    "norm_clipped_mean",
    "robust_aggregate",
    "screen_updates",
    "solve_hca_weights",
    "spectral_labels",
    "trimmed_mean",
    "verify_hca",
    "weighted_average",
]
