"""Neighbour graphs of the federation (pure maths, no MPI: every rank builds the same graph alone).

* ``full``: every node is every other node's neighbour (N - 1 each).
* ``ring``: i - 1 and i + 1.
* ``exponential``: i ± 2^j for every power of two below N (about 2·log2 N neighbours), the
  graph of exponential-graph decentralized SGD: any node reaches any other in O(log N) hops.
* ``kregular``: a random connected graph in which every node has exactly ``degree`` neighbours,
  drawn from ``seed``: a circulant graph (offsets 1 .. degree/2, plus N/2 for odd degree) whose
  edges are then shuffled by degree-preserving double-edge swaps, redrawn if it comes out
  disconnected.

All graphs are undirected (q is p's neighbour exactly when p is q's), so every message a node
sends has a receiver that expects it.
"""

from __future__ import annotations

import numpy as np

TOPOLOGIES = ("full", "ring", "exponential", "kregular")


def _check(size: int, kind: str, degree: int) -> None:
    if kind not in TOPOLOGIES:
        raise ValueError(
            f"topology {kind!r} is not allowed; choose one of: {', '.join(TOPOLOGIES)}"
        )
    if size < 1:
        raise ValueError(f"a graph needs at least one node, got {size}")
    if kind == "kregular" and size > 1:
        problem = kregular_problem(size, degree)
        if problem:
            raise ValueError(problem)


def kregular_problem(size: int, degree: int) -> str | None:
    """Why no connected ``degree``-regular graph on ``size`` nodes exists (None: one does)."""
    if not 1 <= degree <= size - 1:
        return f"federation.degree = {degree} is not allowed for {size} nodes; use 1 .. {size - 1}"
    if size * degree % 2:
        return (
            f"federation.degree = {degree} is not allowed for {size} nodes: a regular graph needs "
            "nodes x degree to be even; use an even degree"
        )
    if degree == 1 and size > 2:
        return f"federation.degree = 1 cannot connect {size} nodes; use 2 or more"
    return None


def _circulant(size: int, degree: int) -> set[tuple[int, int]]:
    offsets = list(range(1, degree // 2 + 1))
    edges = {tuple(sorted((i, (i + o) % size))) for i in range(size) for o in offsets}
    if degree % 2:  # size is even: join each node to the one opposite
        edges |= {(i, i + size // 2) for i in range(size // 2)}
    return edges  # type: ignore[return-value]


def _connected(size: int, edges: set[tuple[int, int]]) -> bool:
    adj: list[list[int]] = [[] for _ in range(size)]
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    seen, todo = {0}, [0]
    while todo:
        for q in adj[todo.pop()]:
            if q not in seen:
                seen.add(q)
                todo.append(q)
    return len(seen) == size


def kregular_edges(size: int, degree: int, seed: int) -> set[tuple[int, int]]:
    """The edges (p < q) of the seeded random connected ``degree``-regular graph."""
    _check(size, "kregular", degree)
    base = _circulant(size, degree)
    if degree >= size - 1 or size < 4:
        return base  # complete (or tiny): nothing to shuffle
    for attempt in range(100):
        rng = np.random.default_rng([seed, attempt])
        edges = set(base)
        ordered = sorted(edges)
        for _ in range(10 * len(ordered)):
            i, j = rng.integers(len(ordered), size=2)
            (a, b), (c, d) = ordered[i], ordered[j]
            if rng.random() < 0.5:
                c, d = d, c
            # a-b, c-d  ->  a-c, b-d (degrees unchanged), if that makes no loop or double edge
            e1, e2 = tuple(sorted((a, c))), tuple(sorted((b, d)))
            if len({a, b, c, d}) < 4 or e1 in edges or e2 in edges:
                continue
            edges -= {ordered[i], ordered[j]}
            edges |= {e1, e2}  # type: ignore[arg-type]
            ordered[i], ordered[j] = e1, e2  # type: ignore[assignment]
        if _connected(size, edges):
            return edges
    return base  # pragma: no cover - 100 disconnected draws in a row do not happen in practice


def neighbours_of(rank: int, size: int, kind: str, *, degree: int = 4, seed: int = 0) -> list[int]:
    """Neighbours of ``rank`` in the overlay graph (sorted world ranks, never ``rank`` itself)."""
    _check(size, kind, degree)
    if kind == "full":
        return [r for r in range(size) if r != rank]
    if kind == "ring":
        return sorted({(rank - 1) % size, (rank + 1) % size} - {rank})
    if kind == "exponential":
        out: set[int] = set()
        step = 1
        while step < size:
            out |= {(rank + step) % size, (rank - step) % size}
            step *= 2
        return sorted(out - {rank})
    if size == 1:
        return []
    edges = kregular_edges(size, degree, seed)
    return sorted({b if a == rank else a for a, b in edges if rank in (a, b)})
