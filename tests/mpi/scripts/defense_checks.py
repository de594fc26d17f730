"""Attacks and defenses in real rounds under mpiexec -n 6 (groups fixed to the tasks: 0-2, 3-5)."""

from __future__ import annotations

import numpy as np
import torch
from _check import run_checks
from mpi4py import MPI
from round_checks import Recorder, allgather_vec, make_config

from colnet_mpi.comm.buffers import checksum
from colnet_mpi.comm.topology import Topology
from colnet_mpi.config import config_from_dict, to_toml
from colnet_mpi.federation.loop import Federation
from colnet_mpi.federation.recording import round_values
from colnet_mpi.node import Node


def federation(
    comm: MPI.Comm, scheme: str = "colnet", **sections: dict
) -> tuple[Federation, Recorder, Topology]:
    """A 6-node federation with the true task groups and extra config sections."""
    import tomllib

    raw = tomllib.loads(to_toml(make_config(comm.Get_size(), scheme)))
    raw["federation"]["grouping"] = "tasks"
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    config = config_from_dict(raw)
    topo = Topology(comm, kind="full")
    node = Node(config, topo.rank, torch.device("cpu"))
    fed = Federation(config, topo, node, None, lambda _m: None)
    return fed, Recorder(fed), topo


def gather_ints(comm: MPI.Comm, value: int) -> np.ndarray:
    out = np.empty(comm.Get_size(), dtype=np.int64)
    comm.Allgather([np.array([value], dtype=np.int64), MPI.INT64_T], [out, MPI.INT64_T])
    return out


def check_nan_node_poisons_nobody(comm: MPI.Comm) -> None:
    """Node 1 sends NaN to its neighbours and into its group's sum: everybody else stays finite,
    refuses its buffer, and its group aggregates without it."""
    for fault in ("nan", "short"):
        fed, rec, topo = federation(
            comm, attack={"kind": "bad_buffer", "nodes": [1], "buffer_fault": fault}
        )
        for r in (1, 2):
            res = fed.round(r)
            assert bool(torch.isfinite(fed.node.flat.pack()).all()), f"{fault}: NaN reached us"
            assert np.isfinite(res.test["loss"]), res.test
            refused = res.defended.refused
            if topo.rank != 1:
                assert refused[1] == 1 and refused.sum() == 1, (fault, refused)
            excluded = gather_ints(comm, res.defended.excluded)
            assert excluded.tolist() == [0, 1, 0, 0, 0, 0], (fault, excluded)
        # the honest members of group 0 hold the mean of their own two trained backbones
        trained = allgather_vec(comm, rec.trained).astype(np.float64)
        final = allgather_vec(comm, fed.node.flat.pack())
        assert (final[0] == final[2]).all() and np.isfinite(final).all()
        topo.free()
        del trained


def check_screening_excludes_boosted_node(comm: MPI.Comm) -> None:
    """A node boosting its update x50 is excluded by screening (quarantined before the groups
    are formed); its group averages the others."""
    fed, rec, topo = federation(
        comm,
        scheme="intra",
        attack={"kind": "boost", "nodes": [1], "boost_scale": 50.0, "bn_batches": 0},
        defense={"screening": True, "norm_ratio": 3.0},
    )
    uploaded = {}
    original = fed.attack.upload

    def spy(r, vec):
        uploaded["own"] = vec.clone()
        return original(r, vec)

    fed.attack.upload = spy
    res = fed.round(1)
    excluded = gather_ints(comm, res.defended.excluded)
    assert excluded.tolist() == [0, 1, 0, 0, 0, 0], excluded
    reasons = gather_ints(comm, res.defended.reason)
    assert reasons[1] == 2, reasons  # "norm"
    norms = allgather_vec(comm, torch.tensor([res.defended.norm_score], dtype=torch.float32))
    assert norms[1, 0] > 10 and (norms[[0, 2], 0] < 3).all(), norms[:, 0]
    own = allgather_vec(comm, uploaded["own"]).astype(np.float64)
    start = allgather_vec(comm, rec.start).astype(np.float64)
    final = fed.node.flat.pack().numpy()
    if topo.rank in (0, 2):
        expected = start[0] + ((own[0] - start[0]) + (own[2] - start[0])) / 2
        np.testing.assert_allclose(final, expected, rtol=1e-4, atol=1e-5)
    elif topo.rank == 1:  # quarantined before clustering: kept its own (boosted) backbone
        np.testing.assert_array_equal(final, own[1].astype(np.float32))
        assert res.groups[1] == -1
    topo.free()


def check_boosted_node_is_quarantined_before_clustering(comm: MPI.Comm) -> None:
    """With screening, a x5 boosted node is quarantined before clustering (group -1) in both
    rounds: it cannot capture a cluster; the honest nodes are clustered and aggregated alone.
    With norm_action = "clip" it is clustered (its update rescaled in every view) and kept."""
    import tomllib

    for action in ("exclude", "clip"):
        raw = tomllib.loads(to_toml(make_config(comm.Get_size(), "colnet")))
        raw["attack"] = {"kind": "boost", "nodes": [1], "boost_scale": 5.0, "bn_batches": 0}
        raw["defense"] = {"screening": True, "norm_action": action}
        config = config_from_dict(raw)
        topo = Topology(comm, kind="full")
        fed = Federation(config, topo, Node(config, topo.rank, torch.device("cpu")), None, print)
        for r in (1, 2):
            res = fed.round(r)
            excluded = gather_ints(comm, res.defended.excluded)
            reasons = gather_ints(comm, res.defended.reason)
            if action == "exclude":
                assert res.groups[1] == -1 and (np.delete(res.groups, 1) >= 0).all(), res.groups
                assert res.proposal[1] == -1  # nobody's view contains the quarantined node
                assert excluded[1] == 1, excluded
                if topo.rank == 1:
                    assert (
                        topo.isolated
                        and not topo.is_leader
                        and round_values(fed, res).get("hca/solver_ok", -1) == -1
                    )
            else:
                assert (res.groups >= 0).all() and res.proposal[1] >= 0, res.groups
                assert excluded.sum() == 0, excluded
                norms = allgather_vec(comm, torch.tensor([res.defended.norm_score]))[:, 0]
                assert reasons[1] == 5, (r, reasons, res.groups, norms)  # "clipped"
            assert bool(torch.isfinite(fed.node.flat.pack()).all())
        topo.free()


def check_clip_rescales_boosted_update(comm: MPI.Comm) -> None:
    """norm_action = "clip": a x50 boosted member stays in its group's aggregate with its update
    rescaled to the norm of its closest member (trainable part), not excluded."""
    fed, rec, topo = federation(
        comm,
        scheme="intra",
        attack={"kind": "boost", "nodes": [1], "boost_scale": 50.0, "bn_batches": 0},
        defense={"screening": True, "norm_action": "clip"},
    )
    sent = {}
    original = fed.attack.contribution

    def spy(r, vec):
        sent["contribution"] = original(r, vec).clone()
        return sent["contribution"]

    fed.attack.contribution = spy
    res = fed.round(1)
    assert gather_ints(comm, res.defended.excluded).tolist() == [0] * 6
    reasons = gather_ints(comm, res.defended.reason)
    assert reasons.tolist() == [0, 5, 0, 0, 0, 0], reasons
    own = allgather_vec(comm, sent["contribution"])
    start = allgather_vec(comm, rec.start).astype(np.float64)
    weights = allgather_vec(comm, torch.tensor([fed.weight()]))[:, 0].astype(np.float64)
    if topo.rank in (0, 1, 2):
        p = fed.node.flat.n_trainable
        u = own[[0, 1, 2]].astype(np.float64) - start[0]
        norms = np.linalg.norm(u[:, :p], axis=1)
        # its reference: the norm of the honest update closest to it in direction
        cos = [u[1, :p] @ u[j, :p] / (norms[1] * norms[j]) for j in (0, 2)]
        reference = norms[[0, 2][int(np.argmax(cos))]]
        scale = np.array([1.0, reference / norms[1], 1.0])
        assert scale[1] < 0.1, scale
        w = weights[[0, 1, 2]]
        expected = start[0] + (w[:, None] * u * scale[:, None]).sum(axis=0) / w.sum()
        np.testing.assert_allclose(fed.node.flat.pack().numpy(), expected, rtol=1e-4, atol=1e-5)
    topo.free()


def check_median_rule(comm: MPI.Comm) -> None:
    """defense.aggregation = median: the group result is the start plus the coordinate median."""
    fed, rec, topo = federation(comm, scheme="intra", defense={"aggregation": "median"})
    res = fed.round(1)
    trained = allgather_vec(comm, rec.trained).astype(np.float64)
    start = rec.start.numpy().astype(np.float64)
    members = np.flatnonzero(res.groups == res.groups[topo.rank])
    expected = start + np.median(trained[members] - start, axis=0)
    np.testing.assert_allclose(fed.node.flat.pack().numpy(), expected, rtol=1e-4, atol=1e-5)
    assert res.defended.excluded == 0
    topo.free()


def check_leader_verification(comm: MPI.Comm) -> None:
    """Node 0 leads group 0 in round 1 and doubles what it broadcasts. Without verification its
    members take the doubled backbone; with it they reject it, keep the recomputed HCA result
    (bit-identical to the leader's honest one) and record the leader as suspect."""
    for verify in (False, True):
        fed, rec, topo = federation(
            comm,
            attack={"kind": "manipulate", "nodes": [0], "manipulation_factor": 2.0},
            defense={"verify_leader": verify},
        )
        res = fed.round(1)
        assert int(res.leaders[topo.rank]) == int(topo.rank in (0, 3))
        final = allgather_vec(comm, fed.node.flat.pack())
        rejected = gather_ints(comm, res.defended.leader_rejected)
        if verify:
            assert rejected.tolist() == [0, 1, 1, 0, 0, 0], rejected
            assert (final[1] == final[0]).all() and (final[2] == final[0]).all()
            assert (final[4] == final[3]).all() and (final[5] == final[3]).all()
            errors = allgather_vec(comm, torch.tensor([res.defended.verify_error]))[:, 0]
            assert errors[1] > 0.5 and errors[4] < 1e-3, errors
        else:
            assert rejected.sum() == 0
            np.testing.assert_allclose(final[1], 2 * final[0], rtol=1e-6)
            assert (final[4] == final[3]).all()
        sums = gather_ints(comm, checksum(fed.node.flat.pack()))
        assert (sums[[1, 2]] == sums[0]).all() == verify
        topo.free()


if __name__ == "__main__":
    torch.set_num_threads(1)
    assert MPI.COMM_WORLD.Get_size() == 6, "run under mpiexec -n 6"
    run_checks(
        [
            check_nan_node_poisons_nobody,
            check_screening_excludes_boosted_node,
            check_boosted_node_is_quarantined_before_clustering,
            check_clip_rescales_boosted_update,
            check_median_rule,
            check_leader_verification,
        ]
    )
