"""Unit tests for asynchronous mode's pure parts and its config keys: the agreement schedule,
staleness weights, partition stamps, and the refusals of what it does not support."""

from __future__ import annotations

import numpy as np
import pytest

from colnet_mpi.algorithms.clustering import partition_stamp
from colnet_mpi.algorithms.fedavg import staleness_weights, uncarried_share
from colnet_mpi.comm import mailbox as mb
from colnet_mpi.config import ConfigError, apply_overrides, config_from_dict, to_toml
from colnet_mpi.federation.asynchronous import (
    catch_up_epochs,
    control_problem,
    epoch_for,
    header_problem,
)
from colnet_mpi.federation.schemes import SCHEMES, Scheme

NODES = [{"task": "attributes", "count": 2}, {"task": "landmarks", "count": 2, "slowdown": 3}]


def make(**sections: dict) -> object:
    return config_from_dict({"data": {"dataset": "synthetic_faces"}, **sections, "nodes": NODES})


def test_schedule_fresh_start_lag_one():
    # round 1 waits for epoch 1 (lock-step first partition); later rounds use the epoch before
    assert [epoch_for(r, 1, 1, 0) for r in range(1, 6)] == [1, 1, 2, 3, 4]


def test_schedule_lag_zero_is_synchronous():
    assert [epoch_for(r, 0, 1, 0) for r in range(1, 5)] == [1, 2, 3, 4]


def test_schedule_until_freezes_the_last_epoch():
    assert [epoch_for(r, 1, 1, 2) for r in range(1, 7)] == [1, 1, 2, 2, 2, 2]
    assert [epoch_for(r, 0, 1, 1) for r in range(1, 4)] == [1, 1, 1]


def test_schedule_after_resume_keeps_the_restored_partition_until_a_new_epoch():
    # resumed at round 4 (start): round 4 would use epoch 3, which this process never ran
    assert [epoch_for(r, 1, 4, 0) for r in range(4, 8)] == [None, 4, 5, 6]
    # resumed after clustering stopped: never a new epoch
    assert [epoch_for(r, 1, 4, 2) for r in range(4, 7)] == [None, None, None]
    assert [epoch_for(r, 0, 4, 0) for r in range(4, 6)] == [4, 5]


def test_schedule_first_round_local_has_no_partition_in_round_1():
    # federation.first_round = "local": round 1 in no group (0), epoch 1 from round 2 on
    assert [epoch_for(r, 1, 1, 0, first_local=True) for r in range(1, 6)] == [0, 1, 2, 3, 4]
    assert [epoch_for(r, 1, 1, 1, first_local=True) for r in range(1, 5)] == [0, 1, 1, 1]
    # a resume that restored a partition keeps it as before, local first round or not
    assert [epoch_for(r, 1, 4, 0, True, True) for r in range(4, 7)] == [None, 4, 5]


def test_schedule_resume_without_a_partition_agrees_on_its_first_round():
    # resumed at round 2 after a round 1 without groups: round 2 agrees on epoch 2 in
    # lock-step (epoch 1 was never finished by this process), also past clustering.until
    assert [epoch_for(r, 1, 2, 0, held=False) for r in range(2, 6)] == [2, 2, 3, 4]
    assert [epoch_for(r, 1, 2, 1, held=False) for r in range(2, 6)] == [2, 2, 2, 2]
    assert [epoch_for(r, 1, 2, 3, held=False) for r in range(2, 7)] == [2, 2, 3, 3, 3]


def test_catch_up_trains_one_epoch_only_while_far_enough_behind():
    # round 5: this node has finished 4; a neighbour has finished 6 -> 2 behind
    assert catch_up_epochs(5, 3, 2, 6) == 1
    assert catch_up_epochs(5, 3, 3, 6) == 3  # not 3 behind
    assert catch_up_epochs(5, 3, 0, 60) == 3  # off
    assert catch_up_epochs(5, 3, 1, 4) == 3  # level with the newest
    assert catch_up_epochs(1, 2, 1, 0) == 2  # nothing heard yet
    assert catch_up_epochs(5, 3, 1, 5) == 1


def test_control_messages_well_formed_pass_and_malformed_are_named():
    rounds, width = 5, 3
    good = [
        (mb.RECORD, np.array([2.0, 0.5, np.nan, 1.0])),  # NaN: a metric not measured
        (mb.DONE, np.array([0, 0])),  # done before any round
        (mb.DONE, np.array([5, 4])),
        (mb.CHECKPOINT, np.array([3, 1024])),
        (mb.MARKED, np.array([5])),
        (mb.STOP, np.zeros(1, np.int64)),
        (mb.PROGRESS, np.array([99])),  # out of range: ignored by the receiver, not fatal
    ]
    for kind, data in good:
        assert control_problem(kind, data, rounds, width) == "", (kind, data)
    bad = [
        (mb.RECORD, np.array([2.0, 0.5, 1.0]), "3 numbers where 4 belong"),
        (mb.RECORD, np.array([0.0, 0.5, 1.0, 1.0]), "round 0.0 outside 1..5"),
        (mb.RECORD, np.array([np.nan, 0.5, 1.0, 1.0]), "round nan outside 1..5"),
        (mb.RECORD, np.array([2.5, 0.5, 1.0, 1.0]), "round 2.5 outside"),
        (mb.DONE, np.array([6, 0]), "round 6.0 outside 0..5"),
        (mb.DONE, np.array([1]), "1 numbers where 2 belong"),
        (mb.CHECKPOINT, np.array([2, -8]), "-8 bytes"),
        (mb.MARKED, np.array([-1]), "outside 0..5"),
        (mb.PROGRESS, np.array([1, 2]), "2 numbers where 1 belong"),
        (mb.BACKBONE, np.zeros(4), "unknown message kind"),
    ]
    for kind, data, fragment in bad:
        assert fragment in control_problem(kind, data, rounds, width), (kind, data)


def test_model_headers_out_of_range_are_refused():
    rounds, n = 5, 4
    good = [
        (mb.BACKBONE, [1, 0, -1, 1.0]),  # round 1, no leader update applied yet
        (mb.MIX, [5, 4, 3, 250.0]),  # a sample-count weight
        (mb.DELTA, [3, 123456.0, 1, 0]),
        (mb.RESULT, [3, 7.0, 0, 0]),  # no update this round
    ]
    for kind, head in good:
        assert header_problem(kind, head, rounds, n) == "", (kind, head)
    bad = [
        (mb.BACKBONE, [6, 0, -1, 1.0], "version 6 outside 1..5"),
        (mb.BACKBONE, [0, 0, -1, 1.0], "version 0 outside"),
        (mb.DELTA, [float("inf"), 0, 1, 0], "version inf outside"),
        (mb.MIX, [2.5, 0, -1, 1.0], "version 2.5 outside"),
        (mb.BACKBONE, [2, 6, 1, 1.0], "(round 6, rank 1) out of range"),
        (mb.BACKBONE, [2, 1, 4, 1.0], "(round 1, rank 4) out of range"),
        (mb.BACKBONE, [2, 1, 0, -0.5], "a FedAvg weight of -0.5"),
        (mb.DELTA, [2, 9.0, 0, 0], "a flag of 0 or 1"),
        (mb.RESULT, [2, 9.0, 2, 0], "a flag of 0 or 1"),
        (mb.RESULT, [2, 9.0, 1, 3], "a flag of 0 or 1"),
    ]
    for kind, head, fragment in bad:
        assert fragment in header_problem(kind, head, rounds, n), (kind, head)


def test_staleness_weights_discount_old_versions_only():
    assert staleness_weights([1.0, 1.0, 2.0], [0, 2, -1], 0.5) == [1.0, 0.25, 2.0]
    assert staleness_weights([3.0], [5], 1.0) == [3.0]
    with pytest.raises(ValueError, match="decay"):
        staleness_weights([1.0], [0], 0.0)
    with pytest.raises(ValueError, match="weights"):
        staleness_weights([1.0, 1.0], [0], 0.5)


def test_an_update_already_in_part_of_the_mix_is_added_for_the_rest_only():
    update = (4, 1)  # leader rank 1's update of round 4
    # nobody had applied it (synchronous case: every version is of this round): all of it
    assert uncarried_share([1.0, 1.0, 1.0], [(3, 1), (0, -1), (3, 2)], update) == 1.0
    # two group-mates ahead had applied it (or a newer one), the own model had not
    assert uncarried_share([1.0, 1.0, 1.0], [(3, 2), (4, 1), (6, 0)], update) == pytest.approx(
        1 / 3
    )
    # an update of the same round from another sender orders by sender; weights count
    assert uncarried_share([3.0, 1.0], [(4, 0), (4, 2)], update) == 0.75
    assert uncarried_share([2.0, 2.0], [(5, 0), (4, 1)], update) == 0.0
    with pytest.raises(ValueError, match="tags"):
        uncarried_share([1.0], [], update)
    with pytest.raises(ValueError, match="positive sum"):
        uncarried_share([0.0], [(0, -1)], update)


def test_partition_stamp_ignores_labels_and_fits_float32():
    a = partition_stamp(np.array([0, 0, 1, 1, 2]))
    assert a == partition_stamp(np.array([5, 5, 3, 3, 0]))
    assert a != partition_stamp(np.array([0, 1, 0, 1, 2]))
    assert a != partition_stamp(np.array([0, 0, 1, 1, -1]))
    assert 0 <= a < 2**24 and float(np.float32(a)) == a


def test_async_keys_default_and_round_trip():
    c = make(federation={"mode": "async", "max_staleness": -1, "time_budget": 30})
    assert c.federation.mode == "async" and c.nodes[2].slowdown == 3.0
    back = config_from_dict(__import__("tomllib").loads(to_toml(c)))
    assert back == c
    # a node without a slowdown writes none (results files of older runs compare equal)
    assert to_toml(c).count("slowdown") == 2


@pytest.mark.parametrize(
    ("federation", "fragment"),
    [
        ({"mode": "lockstep"}, "federation.mode = 'lockstep'"),
        ({"mode": "async", "max_staleness": -2}, "federation.max_staleness = -2"),
        ({"mode": "async", "staleness_decay": 0.0}, "federation.staleness_decay = 0.0"),
        ({"mode": "async", "staleness_decay": 1.5}, "federation.staleness_decay = 1.5"),
        ({"mode": "async", "time_budget": -1.0}, "federation.time_budget"),
        ({"time_budget": 10.0}, 'needs federation.mode = "async"'),
        ({"mode": "async", "catch_up": -1}, "federation.catch_up = -1"),
        ({"mode": "async", "catch_up": 1.5}, "federation.catch_up = 1.5"),
        ({"mode": "async", "catch_up": True}, "federation.catch_up = True"),
        ({"catch_up": 2}, 'federation.catch_up = 2 needs federation.mode = "async"'),
        ({"first_round": "local"}, "federation.first_round = 'local' needs federation.mode"),
        ({"mode": "async", "first_round": "early"}, "federation.first_round = 'early'"),
        (
            {"mode": "async", "max_staleness": 0, "first_round": "local"},
            "federation.max_staleness = 0",
        ),
        (
            {"mode": "async", "grouping": "tasks", "first_round": "local"},
            "federation.grouping = 'tasks'",
        ),
        (
            {"mode": "async", "scheme": "none", "first_round": "local"},
            "federation.scheme = 'none'",
        ),
        ({"lockstep_deadline": True}, "federation.lockstep_deadline = True needs federation.mode"),
        ({"mode": "async", "lockstep_deadline": 1}, "federation.lockstep_deadline = 1"),
        (
            {"mode": "async", "grouping": "tasks", "lockstep_deadline": True},
            "lockstep_deadline = true is not allowed with federation.scheme = 'colnet' and "
            "federation.grouping = 'tasks'",
        ),
        (
            {
                "mode": "async",
                "max_staleness": -1,
                "first_round": "local",
                "lockstep_deadline": True,
            },
            'lockstep_deadline = true is not allowed with federation.first_round = "local"',
        ),
        ({"leader_stand_in": True}, "federation.leader_stand_in = True needs federation.mode"),
        ({"mode": "async", "leader_stand_in": "yes"}, "federation.leader_stand_in = 'yes'"),
        (
            {"mode": "async", "scheme": "intra", "leader_stand_in": True},
            "leader_stand_in = true is not allowed with federation.scheme = 'intra'",
        ),
    ],
)
def test_bad_async_federation_keys_are_named(federation, fragment):
    with pytest.raises(ConfigError) as info:
        make(federation=federation)
    assert fragment in str(info.value)


def test_fedper_runs_async_and_strategies_without_an_async_form_are_refused():
    assert make(federation={"mode": "async", "scheme": "fedper"}).federation.scheme == "fedper"
    sketched = make(federation={"mode": "async"}, clustering={"backbone_sketch": 64})
    assert sketched.clustering.backbone_sketch == 64
    SCHEMES.register("odd_cross", Scheme("cluster", "mean", "odd"))
    SCHEMES.register("odd_intra", Scheme("cluster", "odd", "hca"))
    try:
        for scheme, what in (("odd_cross", "cross-group aggregator 'odd'"),
                             ("odd_intra", "intra-group aggregator 'odd'")):  # fmt: skip
            with pytest.raises(ConfigError) as info:
                make(federation={"mode": "async", "scheme": scheme})
            text = str(info.value)
            assert f"federation.scheme = '{scheme}'" in text and what in text, text
            assert make(federation={"scheme": scheme}).federation.scheme == scheme  # sync: fine
    finally:
        SCHEMES.unregister("odd_cross")
        SCHEMES.unregister("odd_intra")


@pytest.mark.parametrize(
    ("section", "values", "fragment"),
    [
        ("defense", {"screening": True}, "defense.screening = true"),
        ("defense", {"verify_leader": True}, "defense.verify_leader = true"),
        ("clustering", {"loss_weight": 0.3}, "clustering.loss_weight = 0.3"),
        ("run", {"host_slots": 2}, "run.host_slots = 2"),
        ("attack", {"kind": "manipulate", "nodes": [0]}, "attack.kind = 'manipulate'"),
    ],
)
def test_what_async_does_not_support_is_refused(section, values, fragment):
    with pytest.raises(ConfigError) as info:
        make(federation={"mode": "async"}, **{section: values})
    assert fragment in str(info.value) and 'federation.mode = "async"' in str(info.value)


def test_robust_intra_rules_mix_async_groups():
    from colnet_mpi.algorithms.robust import ROBUST_RULES
    from colnet_mpi.config import ASYNC_INTRA

    assert ASYNC_INTRA == ROBUST_RULES  # the config's torch-free copy of the rules' names
    for rule in ROBUST_RULES:
        cfg = make(federation={"mode": "async"}, defense={"aggregation": rule})
        assert cfg.defense.aggregation == rule


@pytest.mark.parametrize("kind", ["label_flip", "boost", "at2fl", "bad_buffer"])
def test_attacks_other_than_a_leaders_run_in_async_mode(kind):
    assert (
        make(federation={"mode": "async"}, attack={"kind": kind, "nodes": [0]}).attack.kind == kind
    )


def test_turns_refuse_emulated_stragglers():
    with pytest.raises(ConfigError) as info:
        make(run={"host_slots": 2})  # node 2 has slowdown 3
    assert "run.host_slots = 2" in str(info.value) and "nodes[2].slowdown = 3.0" in str(info.value)
    nodes = [{"task": "attributes"}, {"task": "landmarks"}]
    with pytest.raises(ConfigError) as info:
        config_from_dict(
            {
                "data": {"dataset": "synthetic_faces"},
                "nodes": nodes,
                "run": {"host_slots": 1},
                "training": {"epoch_seconds": 2.0},
            }
        )
    assert "training.epoch_seconds = 2.0" in str(info.value)
    plain = {"data": {"dataset": "synthetic_faces"}, "nodes": nodes, "run": {"host_slots": 1}}
    assert config_from_dict(plain).run.host_slots == 1


@pytest.mark.parametrize("bad", [0.5, 0, "fast", True, 5000])
def test_bad_slowdown_is_named(bad):
    nodes = [{"task": "attributes", "slowdown": bad}, {"task": "landmarks"}]
    with pytest.raises(ConfigError) as info:
        config_from_dict({"data": {"dataset": "synthetic_faces"}, "nodes": nodes})
    assert f"nodes[0].slowdown = {bad!r}" in str(info.value)


def test_until_is_checked_and_overridable():
    raw = {"data": {"dataset": "synthetic_faces"}, "nodes": NODES}
    raw = apply_overrides(raw, ["clustering.until=3", "federation.mode=async"])
    assert config_from_dict(raw).clustering.until == 3
    with pytest.raises(ConfigError, match="clustering.until"):
        make(clustering={"until": -1})


def _mixer(rule: str, held: dict, decay: float = 0.5, trim: float = 0.1, clip: float = 0.0):
    """An AsyncRounds reduced to what its mix reads (no MPI): the intra rule, the held versions
    (round, backbone, payload, weight), the staleness decay and the defense keys."""
    from types import SimpleNamespace

    from colnet_mpi.federation.asynchronous import AsyncRounds
    from colnet_mpi.federation.schemes import INTRA

    rounds = object.__new__(AsyncRounds)
    config = SimpleNamespace(
        federation=SimpleNamespace(staleness_decay=decay),
        defense=SimpleNamespace(trim=trim, clip=clip),
    )
    rounds.fed = SimpleNamespace(config=config, weight=lambda: 1.0)
    rounds.fed.intra = INTRA.get(rule)(rounds.fed)  # the synchronous rule's class
    rounds.held = held
    return rounds


def test_async_mix_with_a_robust_rule_combines_the_versions_updates():
    import torch

    own = torch.tensor([0.0, 0.0, 0.0])
    start = torch.tensor([-1.0, -1.0, -1.0])
    held = {
        1: (3, torch.tensor([1.0, 10.0, -2.0]), None, 1.0),
        2: (3, torch.tensor([2.0, -50.0, 4.0]), None, 1.0),
    }
    median, w = _mixer("median", held)._weighted_mix(own, [1, 2], 3, start)
    assert torch.equal(median, torch.tensor([1.0, 0.0, 0.0]))  # coordinate-wise, outlier out
    assert w == pytest.approx([1.0, 1.0, 1.0])  # FedAvg weight x decay ** age (unnormalised)
    mean, _ = _mixer("mean", held)._weighted_mix(own, [1, 2], 3, start)
    assert torch.allclose(mean, torch.tensor([1.0, -40.0 / 3, 2.0 / 3]))
    # a stale version weighs less in the mean and in the weights a weighted rule gets
    stale = {**held, 2: (1, held[2][1], None, 1.0)}
    _, w = _mixer("median", stale)._weighted_mix(own, [1, 2], 3, start)
    assert w[2] == pytest.approx(0.25)
    # norm clipping from the node's start of the round: the far version is pulled in to the
    # median norm of the three updates
    clipped, _ = _mixer("norm_clipped_mean", held)._weighted_mix(own, [1, 2], 3, start)
    updates = torch.stack([own - start, held[1][1] - start, held[2][1] - start]).double()
    norms = updates.norm(dim=1)
    scale = torch.clamp(norms.median() / norms, max=1.0)
    expect = start.double() + (updates * scale[:, None]).mean(dim=0)
    assert torch.allclose(clipped.double(), expect, atol=1e-6)
