"""Unit tests for colnet_mpi.federation.schemes: registries, schemes, and the config's choices."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from colnet_mpi.config import ConfigError, load_config
from colnet_mpi.federation import schemes
from colnet_mpi.federation.schemes import CROSS, GROUPERS, INTRA, SCHEMES, Registry, Scheme, resolve

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.toml"

# the documented names (README / config comments), in registration order
EXPECTED = {
    "grouper": (GROUPERS, ("cluster", "tasks")),
    "intra": (INTRA, ("mean", "median", "trimmed_mean", "norm_clipped_mean")),
    "cross": (CROSS, ("none", "mean", "hca")),
    "scheme": (SCHEMES, ("colnet", "none", "intra", "fedper")),
}
CLASSES = {
    (GROUPERS, "cluster"): ("colnet_mpi.federation.grouping", "TaskAwareClustering"),
    (GROUPERS, "tasks"): ("colnet_mpi.federation.grouping", "TrueTasks"),
    (INTRA, "mean"): ("colnet_mpi.federation.intra", "FedAvg"),
    (INTRA, "median"): ("colnet_mpi.federation.intra", "Median"),
    (INTRA, "trimmed_mean"): ("colnet_mpi.federation.intra", "TrimmedMean"),
    (INTRA, "norm_clipped_mean"): ("colnet_mpi.federation.intra", "NormClippedMean"),
    (CROSS, "none"): ("colnet_mpi.federation.cross", "NoCross"),
    (CROSS, "mean"): ("colnet_mpi.federation.cross", "MeanOfGroups"),
    (CROSS, "hca"): ("colnet_mpi.federation.cross", "HCA"),
}


@pytest.fixture
def temporary():
    """Registrations made by a test, removed afterwards whatever happens."""
    added: list[tuple[Registry, str]] = []

    def add(registry: Registry, name: str, entry) -> None:
        registry.register(name, entry)
        added.append((registry, name))

    yield add
    for registry, name in added:
        registry.unregister(name)


# -- registries ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(EXPECTED))
def test_registered_names(kind: str) -> None:
    registry, names = EXPECTED[kind]
    assert registry.names() == names
    for name in names:
        assert name in registry
    assert "nope" not in registry


@pytest.mark.parametrize(
    ("key", "target"), list(CLASSES.items()), ids=[f"{r.kind}:{n}" for r, n in CLASSES]
)
def test_lazy_entries_resolve_to_classes(key, target) -> None:
    registry, name = key
    module, attr = target
    cls = registry.get(name)
    assert inspect.isclass(cls)
    assert (cls.__module__, cls.__qualname__) == (module, attr)
    assert registry.get(name) is cls  # the same object every time


def test_schemes_are_the_documented_triples() -> None:
    assert SCHEMES.get("colnet") == Scheme("cluster", "mean", "hca")
    assert SCHEMES.get("none") == Scheme(None, None, "none")
    assert SCHEMES.get("intra") == Scheme("cluster", "mean", "none")
    assert SCHEMES.get("fedper") == Scheme("cluster", "mean", "mean")
    for name in SCHEMES.names():  # every scheme names registered strategies
        s = SCHEMES.get(name)
        assert s.grouper is None or s.grouper in GROUPERS
        assert s.intra is None or s.intra in INTRA
        assert s.cross in CROSS


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_unknown_name_raises_key_error_listing_allowed(kind: str) -> None:
    registry, names = EXPECTED[kind]
    with pytest.raises(KeyError) as info:
        registry.get("no_such_strategy")
    message = str(info.value)
    assert "no_such_strategy" in message
    for name in names:
        assert name in message


def test_register_unregister_and_duplicates() -> None:
    reg = Registry("thing", {"a": "collections:OrderedDict"})
    assert reg.names() == ("a",)

    class B:
        pass

    assert reg.register("b", B) is B
    assert reg.names() == ("a", "b")
    assert reg.get("b") is B
    with pytest.raises(ValueError, match="'b' is already registered"):
        reg.register("b", object)
    assert reg.get("b") is B  # the refused registration changed nothing
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", B)  # also for a not-yet-imported text entry

    @reg.register("c")
    class C:
        pass

    assert reg.get("c") is C and C.__name__ == "C"  # the decorator returns the class

    class B2:
        pass

    reg.register("b", B2, replace=True)
    assert reg.get("b") is B2
    reg.unregister("b")
    assert "b" not in reg and reg.names() == ("a", "c")
    with pytest.raises(KeyError):
        reg.get("b")
    reg.unregister("b")  # removing an absent name is harmless

    import collections

    assert reg.get("a") is collections.OrderedDict


def test_text_entry_is_imported_only_when_used() -> None:
    reg = Registry("thing", {"bad": "colnet_mpi.no_such_module:Thing", "ok": "fractions:Fraction"})
    assert "bad" in reg  # registering does not import
    with pytest.raises(ImportError):
        reg.get("bad")
    from fractions import Fraction

    assert schemes.build(reg, "ok", 3, 4) == Fraction(3, 4)


def test_build_passes_arguments() -> None:
    seen = []

    class Strategy:
        def __init__(self, *args) -> None:
            seen.append(args)

    reg = Registry("thing", {"s": Strategy})
    assert isinstance(schemes.build(reg, "s", 1, "two"), Strategy)
    assert seen == [(1, "two")]


# -- resolve ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("colnet",), ("cluster", "mean", "hca")),
        (("colnet", "cluster", "mean"), ("cluster", "mean", "hca")),
        (("colnet", "tasks"), ("tasks", "mean", "hca")),
        (("colnet", "cluster", "median"), ("cluster", "median", "hca")),
        (("colnet", "tasks", "trimmed_mean"), ("tasks", "trimmed_mean", "hca")),
        (("intra",), ("cluster", "mean", "none")),
        (("intra", "tasks", "norm_clipped_mean"), ("tasks", "norm_clipped_mean", "none")),
        (("fedper",), ("cluster", "mean", "mean")),
        (("fedper", "tasks", "median"), ("tasks", "median", "mean")),
        (("none",), (None, None, "none")),
        (("none", "tasks", "median"), (None, None, "none")),  # no grouper, no intra: stays so
    ],
)
def test_resolve(args, expected) -> None:
    r = resolve(*args)
    assert (r.grouper, r.intra, r.cross) == expected


def test_resolve_defaults_keep_a_schemes_own_choice(temporary) -> None:
    temporary(SCHEMES, "test_own", Scheme("tasks", "median", "mean"))
    r = resolve("test_own")  # config defaults: cluster, mean
    assert (r.grouper, r.intra, r.cross) == ("tasks", "median", "mean")
    r = resolve("test_own", "cluster", "mean")
    assert (r.grouper, r.intra, r.cross) == ("tasks", "median", "mean")
    r = resolve("test_own", "cluster", "trimmed_mean")
    assert (r.grouper, r.intra, r.cross) == ("tasks", "trimmed_mean", "mean")


def test_resolve_unknown_scheme() -> None:
    with pytest.raises(KeyError, match="colnet"):
        resolve("no_such_scheme")


# -- the config takes its choices from the registries ---------------------------------------------
CONFIG_KEYS = [
    (SCHEMES, "federation.scheme", Scheme("cluster", "mean")),
    (GROUPERS, "federation.grouping", "colnet_mpi.federation.grouping:TrueTasks"),
    (INTRA, "defense.aggregation", "colnet_mpi.federation.intra:FedAvg"),
]


@pytest.mark.parametrize(
    ("registry", "key", "entry"), CONFIG_KEYS, ids=[k for _, k, _ in CONFIG_KEYS]
)
def test_config_accepts_registered_names(registry, key, entry) -> None:
    name = "test_plugin_choice"
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, [f"{key}={name}"])
    message = str(info.value)
    assert key in message and name in message
    for allowed in registry.names():
        assert repr(allowed) in message
    registry.register(name, entry)
    try:
        config = load_config(QUICKSTART, [f"{key}={name}"])
        section, field = key.split(".")
        assert getattr(getattr(config, section), field) == name
    finally:
        registry.unregister(name)
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, [f"{key}={name}"])
    assert repr(name) not in str(info.value).split("choose one of:")[1]


def test_config_rejects_an_unregistered_default(temporary) -> None:
    temporary(SCHEMES, "test_gone", Scheme(None, None))
    assert load_config(QUICKSTART, ["federation.scheme=test_gone"]).federation.scheme == "test_gone"
    SCHEMES.unregister("test_gone")
    with pytest.raises(ConfigError, match=r"federation\.scheme = 'test_gone' is not allowed"):
        load_config(QUICKSTART, ["federation.scheme=test_gone"])


# -- torch-free ------------------------------------------------------------------------------------
_PROBE = """
import json, sys
import colnet_mpi.config
import colnet_mpi.federation.schemes as s
r = s.resolve("colnet", "tasks", "median")
names = [s.SCHEMES.names(), s.GROUPERS.names(), s.INTRA.names(), s.CROSS.names()]
heavy = ("torch", "mpi4py", "colnet_mpi.federation.grouping", "colnet_mpi.federation.intra",
         "colnet_mpi.federation.cross", "colnet_mpi.federation.loop")
print(json.dumps({"loaded": sorted(m for m in heavy if m in sys.modules),
                  "resolved": [r.grouper, r.intra, r.cross], "n_names": sum(map(len, names))}))
"""


def test_config_and_schemes_import_without_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=True,
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["loaded"] == []  # nor the strategies' modules, until a strategy is used
    assert found["resolved"] == ["tasks", "median", "hca"]
    assert found["n_names"] == sum(len(names) for _, names in EXPECTED.values())
