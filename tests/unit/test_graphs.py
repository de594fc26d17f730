"""The neighbour graphs (comm/graphs.py): undirected, the promised degrees, connected, seeded."""

from __future__ import annotations

import pytest

from colnet_mpi.comm.graphs import kregular_edges, kregular_problem, neighbours_of
from colnet_mpi.config import ConfigError, config_from_dict


def graph(n: int, kind: str, **kw) -> list[list[int]]:
    return [neighbours_of(r, n, kind, **kw) for r in range(n)]


def connected(nb: list[list[int]]) -> bool:
    seen, todo = {0}, [0]
    while todo:
        for q in nb[todo.pop()]:
            if q not in seen:
                seen.add(q)
                todo.append(q)
    return len(seen) == len(nb)


@pytest.mark.parametrize("kind", ["full", "ring", "exponential", "kregular"])
@pytest.mark.parametrize("n", [2, 3, 6, 9, 16, 64])
def test_graphs_are_undirected_connected_and_without_self_loops(kind: str, n: int) -> None:
    degree = {2: 1, 3: 2}.get(n, 4)
    nb = graph(n, kind, degree=degree, seed=3)
    for r, mine in enumerate(nb):
        assert r not in mine and mine == sorted(set(mine))
        assert all(r in nb[q] for q in mine), (r, mine)
    assert connected(nb)


def test_degrees() -> None:
    assert [len(x) for x in graph(64, "exponential")] == [11] * 64  # ±1, ±2, …, ±16, and +32
    assert graph(6, "exponential")[0] == [1, 2, 4, 5]
    for n, k in [(6, 3), (16, 4), (64, 4), (64, 7), (9, 8)]:
        assert [len(x) for x in graph(n, "kregular", degree=k, seed=1)] == [k] * n


def test_kregular_is_seeded() -> None:
    a = kregular_edges(32, 4, seed=1)
    assert a == kregular_edges(32, 4, seed=1)
    assert a != kregular_edges(32, 4, seed=2)  # shuffled, not just the circulant graph
    ring_lattice = {tuple(sorted((i, (i + o) % 32))) for i in range(32) for o in (1, 2)}
    assert a != ring_lattice


def test_impossible_degrees_are_refused_with_the_reason() -> None:
    assert "nodes x degree to be even" in kregular_problem(9, 3)
    assert "use 1 .. 5" in kregular_problem(6, 6)
    assert "cannot connect" in kregular_problem(6, 1)
    assert kregular_problem(6, 3) is None
    nodes = [{"task": "attributes", "count": 9}]
    with pytest.raises(ConfigError, match="federation.degree = 3"):
        config_from_dict({"federation": {"topology": "kregular", "degree": 3}, "nodes": nodes})
    with pytest.raises(ConfigError, match="federation.topology"):
        config_from_dict({"federation": {"topology": "star"}, "nodes": nodes})
    cfg = config_from_dict({"federation": {"topology": "kregular", "degree": 2}, "nodes": nodes})
    assert cfg.federation.degree == 2
