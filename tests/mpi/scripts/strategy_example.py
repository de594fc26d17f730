"""The README's "adding a strategy" example, run under mpiexec: a new cross-group rule is one
class plus its registry entries, and the federation runs it like the built-in ones."""

from __future__ import annotations

import numpy as np
import torch
from _check import run_checks
from mpi4py import MPI
from round_checks import Recorder, allgather_vec, make_config

from colnet_mpi.algorithms.fedavg import mean_from_sum, with_weight
from colnet_mpi.comm.topology import Topology
from colnet_mpi.federation.cross import NoCross
from colnet_mpi.federation.loop import Federation
from colnet_mpi.federation.recording import record_round
from colnet_mpi.federation.schemes import CROSS, SCHEMES, Scheme
from colnet_mpi.node import Node


# --- the example (as in the README) --------------------------------------------------------------
class SizeWeightedMean(NoCross):
    """Leaders average the group backbones weighted by group size: the mean over all nodes."""

    active = True  # this scheme has a cross-group stage (and so a redistribution)

    def combine(self, ctx):
        fed = self.fed
        if fed.topology.is_leader:  # ctx.new holds the group's FedAvg result
            share = with_weight(ctx.new, float(fed.topology.group_size))
            ctx.new = mean_from_sum(fed.transport.leaders_sum(share))


CROSS.register("size_weighted", SizeWeightedMean)
SCHEMES.register("global_mean", Scheme(grouper="cluster", intra="mean", cross="size_weighted"))
# --- end of the example ----------------------------------------------------------------------------


def check_new_cross_rule_runs(comm: MPI.Comm) -> None:
    config = make_config(comm.Get_size(), "global_mean")  # the config accepts the new name
    topo = Topology(comm, kind="full")
    fed = Federation(config, topo, Node(config, topo.rank, torch.device("cpu")), None, print)
    assert isinstance(fed.cross, SizeWeightedMean)
    rec = Recorder(fed)
    for r in (1, 2):
        ctx = fed.round(r)
        trained = allgather_vec(comm, rec.trained).astype(np.float64)
        final = allgather_vec(comm, fed.node.flat.pack())
        if np.unique(ctx.groups).size > 1:  # the rule ran: everyone holds the global mean
            assert ctx.cross_ran and (final == final[0]).all(), "nodes differ after the rule"
            np.testing.assert_allclose(final[0], trained.mean(axis=0), rtol=1e-5, atol=1e-6)
        record_round(fed, ctx)  # the record of a new scheme has the usual layout
    topo.free()


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_checks([check_new_cross_rule_runs])
