"""Registries of the federation's strategies, and the schemes built from them (torch-free).

Three kinds of strategy make a round: a *grouper* (who aggregates with whom), an *intra-group
aggregator* (how a group's backbones become one) and a *cross-group aggregator* (how the group
leaders combine their groups). A *scheme* is a named triple of them. The config takes its allowed
names from these registries, so a new strategy is one class plus one entry here (or one
``register`` call before the config is loaded, e.g. in a plugin or a test).

Entries may be ``"module:attribute"`` text, imported only when the strategy is used, so that
validating a config needs neither torch nor MPI.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CROSS", "GROUPERS", "INTRA", "SCHEMES", "Registry", "Scheme", "resolve"]


class Registry:
    """Names -> strategies (classes or ``"module:attribute"`` text, imported on first use)."""

    def __init__(self, kind: str, entries: Mapping[str, Any]) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = dict(entries)

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def register(self, name: str, entry: Any = None, *, replace: bool = False) -> Any:
        """Add ``entry`` under ``name``; without ``entry``, a decorator that adds the class."""

        def add(obj: Any) -> Any:
            if name in self._entries and not replace:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests that add a temporary strategy)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> Any:
        """The strategy registered as ``name`` (imported now if it was given as text)."""
        if name not in self._entries:
            raise KeyError(
                f"{self.kind} {name!r} is not registered; choose one of: {', '.join(self.names())}"
            )
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            self._entries[name] = entry
        return entry


_F = "colnet_mpi.federation"

#: Who aggregates with whom each round.
GROUPERS = Registry(
    "grouper",
    {
        "cluster": f"{_F}.grouping:TaskAwareClustering",  # the paper's task-aware clustering
        "tasks": f"{_F}.grouping:TrueTasks",  # the true task groups, fixed (a diagnostic)
    },
)

#: How the members of a group combine their backbones.
INTRA = Registry(
    "intra-group aggregator",
    {
        "mean": f"{_F}.intra:FedAvg",
        "median": f"{_F}.intra:Median",
        "trimmed_mean": f"{_F}.intra:TrimmedMean",
        "norm_clipped_mean": f"{_F}.intra:NormClippedMean",
    },
)

#: How the group leaders combine the groups.
CROSS = Registry(
    "cross-group aggregator",
    {
        "none": f"{_F}.cross:NoCross",
        "mean": f"{_F}.cross:MeanOfGroups",  # FedPer-style plain mean of the group backbones
        "hca": f"{_F}.cross:HCA",  # hyper-conflict-averse aggregation (ColNet)
    },
)


@dataclass(frozen=True)
class Scheme:
    """A named triple of strategies; ``None`` means the scheme has no such stage.

    A scheme without a grouper exchanges nothing and every node stays alone (local training).
    ``federation.grouping`` and ``defense.aggregation`` set to something other than their
    defaults (``cluster``, ``mean``) replace the scheme's grouper and intra rule.
    """

    grouper: str | None
    intra: str | None
    cross: str = "none"


#: The aggregation schemes (``federation.scheme``).
SCHEMES = Registry(
    "scheme",
    {
        "colnet": Scheme("cluster", "mean", "hca"),
        "none": Scheme(None, None),
        "intra": Scheme("cluster", "mean"),
        "fedper": Scheme("cluster", "mean", "mean"),
    },
)

#: Config values that leave the scheme's own choice in place.
DEFAULT_GROUPING = "cluster"
DEFAULT_INTRA = "mean"


@dataclass(frozen=True)
class Resolved:
    """The strategy names a run uses."""

    grouper: str | None
    intra: str | None
    cross: str


def resolve(
    scheme: str, grouping: str = DEFAULT_GROUPING, aggregation: str = DEFAULT_INTRA
) -> Resolved:
    """The strategies of ``scheme`` with the config's grouping and intra rule applied."""
    s: Scheme = SCHEMES.get(scheme)
    grouper = s.grouper
    if grouper is not None and grouping != DEFAULT_GROUPING:
        grouper = grouping
    intra = s.intra
    if intra is not None and aggregation != DEFAULT_INTRA:
        intra = aggregation
    return Resolved(grouper, intra, s.cross)


def build(registry: Registry, name: str, *args: Any) -> Any:
    """An instance of the strategy registered as ``name``."""
    factory: Callable[..., Any] = registry.get(name)
    return factory(*args)
