"""A full round under mpiexec -n 2/4/6: groups agree, FedAvg and HCA are exact, heads never travel."""

from __future__ import annotations

import numpy as np
import torch
from _check import run_checks
from mpi4py import MPI

from colnet_mpi.algorithms.hca import hca_update
from colnet_mpi.comm.topology import Topology
from colnet_mpi.config import config_from_dict
from colnet_mpi.federation.loop import Federation
from colnet_mpi.federation.recording import round_values
from colnet_mpi.node import Node


def make_config(size: int, scheme: str):
    half = max(1, size // 2)
    return config_from_dict(
        {
            "run": {"name": "t", "seed": 3},
            "data": {
                "dataset": "synthetic_faces",
                "samples_per_node": 40,
                "test_samples": 32,
                "image_size": 16,
            },
            "model": {"width": 4, "privatization": 1},
            "training": {
                "rounds": 2,
                "local_epochs": 1,
                "batch_size": 16,
                "multi_label": {"name": "adamw", "lr": 2e-3},
                "landmarks": {"name": "adam", "lr": 5e-3},
            },
            "federation": {"scheme": scheme},
            "clustering": {"k": min(2, size), "max_batches": 1},
            "nodes": [
                {"task": "attributes", "count": half},
                {"task": "landmarks", "count": size - half},
            ],
        }
    )


def allgather_vec(comm: MPI.Comm, vec: torch.Tensor) -> np.ndarray:
    mine = np.ascontiguousarray(vec.detach().numpy(), dtype=np.float32)
    out = np.empty((comm.Get_size(), mine.size), dtype=np.float32)
    comm.Allgather([mine, MPI.FLOAT], [out, MPI.FLOAT])
    return out


class Recorder:
    """Wraps a node and its transport to see what crossed ranks and the state after training."""

    def __init__(self, fed: Federation) -> None:
        self.sizes: list[int] = []
        self.fed = fed
        node, tr = fed.node, fed.transport
        for name in (
            "exchange",
            "group_sum",
            "reduce_to_leader",
            "leaders_allgather",
            "leaders_sum",
            "group_broadcast",
        ):
            original = getattr(tr, name)

            def wrapped(vec, *a, _orig=original, **kw):
                self.sizes.append(vec.numel())
                return _orig(vec, *a, **kw)

            setattr(tr, name, wrapped)
        train = node.train_local

        def train_and_snapshot(epochs, *args):
            self.start = node.flat.pack().clone()
            out = train(epochs, *args)
            self.trained = node.flat.pack().clone()
            self.head_after_training = [p.detach().clone() for p in node.head.parameters()]
            return out

        node.train_local = train_and_snapshot


def federation(comm: MPI.Comm, scheme: str) -> tuple[Federation, Recorder, Topology]:
    config = make_config(comm.Get_size(), scheme)
    topo = Topology(comm, kind="full")
    node = Node(config, topo.rank, torch.device("cpu"))
    fed = Federation(config, topo, node, None, lambda _m: None)
    return fed, Recorder(fed), topo


def check_colnet_round(comm: MPI.Comm) -> None:
    fed, rec, topo = federation(comm, "colnet")
    node = fed.node
    flat = node.flat
    leaders_seen = []
    for r in (1, 2):
        res = fed.round(r)
        groups = res.groups
        # every rank holds the same partition and it matches what this rank reports
        allgroups = np.empty((comm.Get_size(), groups.size), dtype=np.int64)
        comm.Allgather([groups.astype(np.int64), MPI.INT64_T], [allgroups, MPI.INT64_T])
        assert (allgroups == allgroups[0]).all(), "ranks disagree on the partition"
        # members of a group hold bit-identical backbones
        final = allgather_vec(comm, flat.pack())
        for g in np.unique(groups):
            members = np.flatnonzero(groups == g)
            assert (final[members] == final[members[0]]).all(), f"group {g} members differ"
        # heads never travel: every payload is backbone-sized (+1 weight / trainable part); the
        # exchange adds the clustering's data profile (statistics of the probe data under the
        # initial backbone), nothing else
        profile = fed.grouper.data
        extra = 0 if profile is None else profile.numel()
        assert extra > 0  # the default resemblance signals send it
        allowed = {flat.numel, flat.numel + 1, flat.n_trainable, flat.n_trainable + 1}
        allowed.add(flat.numel + extra)
        assert set(rec.sizes) <= allowed, f"unexpected payload sizes {set(rec.sizes) - allowed}"
        for before, p in zip(rec.head_after_training, node.head.parameters(), strict=False):
            assert torch.equal(before, p.detach()), "aggregation touched the head"
        # recompute stages 3-5 from everyone's start and trained backbones
        starts = allgather_vec(comm, rec.start).astype(np.float64)
        trained = allgather_vec(comm, rec.trained).astype(np.float64)
        p = flat.n_trainable
        labels = np.unique(groups)
        means = {g: trained[groups == g].mean(axis=0) for g in labels}
        expected = means[groups[topo.rank]].copy()
        if labels.size > 1:
            deltas = torch.tensor(
                np.stack([means[g][:p] - starts[groups == g].mean(axis=0)[:p] for g in labels])
            )
            expected[:p] += (
                fed.config.hca.psi * hca_update(deltas, alpha=fed.config.hca.alpha).update.numpy()
            )
        np.testing.assert_allclose(final[topo.rank], expected, rtol=1e-4, atol=1e-5)
        leaders_seen.append(int(res.leaders[topo.rank]))
        rec.sizes.clear()
    if topo.group_size > 1:
        assert leaders_seen[0] != leaders_seen[1] or topo.group_size > 2, "leader did not rotate"
    rotated = np.empty(comm.Get_size() * 2, dtype=np.int64)
    comm.Allgather([np.array(leaders_seen, dtype=np.int64), MPI.INT64_T], [rotated, MPI.INT64_T])
    per_round = rotated.reshape(comm.Get_size(), 2)
    n_groups = np.unique(groups).size
    assert (per_round.sum(axis=0) == n_groups).all(), "exactly one leader per group per round"
    topo.free()


def check_intra_is_fedavg(comm: MPI.Comm) -> None:
    fed, rec, topo = federation(comm, "intra")
    res = fed.round(1)
    trained = allgather_vec(comm, rec.trained).astype(np.float64)
    members = res.groups == res.groups[topo.rank]
    np.testing.assert_allclose(
        fed.node.flat.pack().numpy(), trained[members].mean(axis=0), rtol=1e-5, atol=1e-6
    )
    assert round_values(fed, res).get("hca/solver_ok", -1) == -1 and res.seconds["cross"] == 0.0
    topo.free()


def check_fedper_is_mean_of_groups(comm: MPI.Comm) -> None:
    fed, rec, topo = federation(comm, "fedper")
    res = fed.round(1)
    trained = allgather_vec(comm, rec.trained).astype(np.float64)
    groups = res.groups
    group_means = np.stack([trained[groups == g].mean(axis=0) for g in np.unique(groups)])
    np.testing.assert_allclose(
        fed.node.flat.pack().numpy(), group_means.mean(axis=0), rtol=1e-5, atol=1e-6
    )
    topo.free()


def check_none_sends_nothing(comm: MPI.Comm) -> None:
    fed, rec, topo = federation(comm, "none")
    fed.round(1)
    assert rec.sizes == [] and fed.transport.bytes_sent == 0 and fed.transport.bytes_received == 0
    assert torch.equal(fed.node.flat.pack(), rec.trained), "scheme none changed the backbone"
    topo.free()


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_checks(
        [
            check_colnet_round,
            check_intra_is_fedavg,
            check_fedper_is_mean_of_groups,
            check_none_sends_nothing,
        ]
    )
