"""Unit tests for colnet_mpi.federation.state: what a rank carries from round to round."""

from __future__ import annotations

import numpy as np
import pytest

from colnet_mpi.federation.state import FederationState


def test_new_state() -> None:
    s = FederationState(4)
    assert s.round == 0
    assert s.home_groups.tolist() == [0, 0, 0, 0]  # one shared initial backbone
    assert s.groups.shape == (0, 4)


def test_finish_round_keeps_home_groups_through_quarantine() -> None:
    s = FederationState(5)
    partitions = [
        [0, 0, 1, 1, 1],
        [0, -1, 1, -1, 1],  # nodes 1 and 3 quarantined: they keep their last real group
        [-1, -1, 1, 0, 1],
        [1, 0, 1, -1, -1],
    ]
    home = [0] * 5
    for r, g in enumerate(partitions, start=1):
        s.finish_round(r, np.array(g))
        home = [h if x == -1 else x for h, x in zip(home, g, strict=True)]
        assert s.round == r
        assert s.home_groups.tolist() == home
    assert home == [1, 0, 1, 0, 1]
    np.testing.assert_array_equal(s.groups, partitions)
    assert s.groups.dtype == np.int64


def test_quarantined_in_round_one_keeps_the_shared_start() -> None:
    s = FederationState(3)
    s.finish_round(1, [2, -1, 1])
    assert s.home_groups.tolist() == [2, 0, 1]


def test_state_dict_round_trip_and_copies() -> None:
    s = FederationState(3)
    s.finish_round(1, [0, 1, 1])
    s.finish_round(2, [1, -1, 0])
    state = s.state_dict()
    assert state["round"] == 2
    state["home_groups"][0] = 99  # a copy: the state is not changed through it
    state["groups"][0, 0] = 99
    assert s.home_groups[0] == 1 and s.groups[0, 0] == 0
    state = s.state_dict()
    other = FederationState(3)
    other.load_state_dict(state)
    assert other.round == 2
    np.testing.assert_array_equal(other.home_groups, [1, 1, 0])
    np.testing.assert_array_equal(other.groups, [[0, 1, 1], [1, -1, 0]])
    other.finish_round(3, [-1, 0, 0])  # and it goes on from there
    assert other.home_groups.tolist() == [1, 0, 0]
    assert other.groups.shape == (3, 3)


def test_load_accepts_lists_and_round_zero() -> None:
    s = FederationState(2)
    s.load_state_dict({"round": 0, "home_groups": [0, 0], "groups": np.zeros((0, 2))})
    assert s.round == 0 and s.groups.shape == (0, 2)
    s.load_state_dict({"round": 1, "home_groups": [1, 0], "groups": [[1, 0]]})
    assert s.round == 1 and s.groups.dtype == np.int64
    assert s.evidence.shape == (2, 2) and np.isnan(s.evidence).all()


def test_clustering_evidence_round_trips_and_is_checked() -> None:
    s = FederationState(3)
    s.evidence = np.arange(9.0).reshape(3, 3)
    t = FederationState(3)
    t.load_state_dict(s.state_dict())
    assert np.array_equal(t.evidence, s.evidence)
    bad = dict(s.state_dict(), evidence=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="evidence"):
        t.load_state_dict(bad)


@pytest.mark.parametrize(
    "state",
    [
        {"round": 1, "home_groups": np.zeros(4), "groups": np.zeros((1, 3))},  # 4 nodes
        {"round": 1, "home_groups": np.zeros(2), "groups": np.zeros((1, 3))},
        {"round": 2, "home_groups": np.zeros(3), "groups": np.zeros((1, 3))},  # 1 round of 2
        {"round": 0, "home_groups": np.zeros(3), "groups": np.zeros((1, 3))},
        {"round": 1, "home_groups": np.zeros((1, 3)), "groups": np.zeros((1, 3))},
    ],
)
def test_load_rejects_wrong_shapes(state) -> None:
    s = FederationState(3)
    s.finish_round(1, [0, 1, 0])
    with pytest.raises(ValueError, match="does not fit 3 nodes"):
        s.load_state_dict(state)
    assert s.round == 1 and s.home_groups.tolist() == [0, 1, 0]  # unchanged


@pytest.mark.parametrize(
    "groups",
    [
        np.zeros((1, 4)),
        np.zeros((2, 2)),  # 4 numbers: not 2 rounds of 3 nodes
        np.zeros((1, 6)),  # 6 numbers, but not laid out as rounds x nodes
        np.zeros(6),
        np.zeros((2, 3, 1)),
    ],
    ids=lambda g: str(g.shape),
)
def test_load_rejects_groups_of_another_layout(groups) -> None:
    s = FederationState(3)
    with pytest.raises(ValueError, match="does not fit 3 nodes at round 2"):
        s.load_state_dict({"round": 2, "home_groups": np.zeros(3), "groups": groups})
    assert s.round == 0 and s.groups.shape == (0, 3)
