"""Reading results files back: runs, their differing settings, and per-group summaries over seeds."""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from colnet_mpi.metrics.names import METRIC_NAMES
from colnet_mpi.metrics.record import FIELDS, axis_of

if TYPE_CHECKING:
    import pandas as pd

    from colnet_mpi.config import Config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

__all__ = [
    "NOT_APPLICABLE",
    "NOT_SETTINGS",
    "TEST_METRICS",
    "Curve",
    "IncompatibleRunsError",
    "NotAResultsFileError",
    "ReportError",
    "Row",
    "Run",
    "Stat",
    "UnfinishedRunWarning",
    "aggregate",
    "check_compatible",
    "find_results",
    "carry_forward",
    "flatten_config",
    "group_summary",
    "latest_evaluation",
    "load_run",
    "load_runs",
    "node_summary",
    "round_curves",
    "scenarios",
    "setting_config",
    "setting_label",
    "setting_of",
    "settings",
    "tidy",
    "tidy_epochs",
    "time_curves",
    "val_loss_curves",
]

#: Test metrics stored as ``round/test_<metric>`` (the writer's names; see the README's "Results file").
TEST_METRICS: tuple[str, ...] = METRIC_NAMES

#: Config keys that never make two runs different settings (seeds are replicates of one setting).
NOT_SETTINGS: frozenset[str] = frozenset(
    {"run.seed", "run.name", "run.output", "run.checkpoint_every", "run.checkpoint_dir"}
)

#: Datasets read only on request (``Run.read``): one N x N matrix per node and round.
_ON_REQUEST = frozenset({"clustering/affinity", "clustering/cosine"})


class ReportError(Exception):
    """A problem with the files given to the reader or the report; the message names the files."""


class NotAResultsFileError(ReportError):
    """A path that is not a readable colnet-mpi results file."""


class IncompatibleRunsError(ReportError):
    """Runs that cannot share one table: different datasets or node sets."""


class UnfinishedRunWarning(UserWarning):
    """A run whose status is not ``finished`` was skipped, or used up to its last complete round."""


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value.item())
    return str(value)


def _attr(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


#: Config keys whose default changed after results files were already being written, with the
#: value that files without the key ran with. Every other key a file lacks ran with today's
#: default (:func:`config_defaults`), so old and new files group together in a report.
CHANGED_DEFAULTS: dict[str, Any] = {
    # files from before the resemblance signals clustered with the paper's signals
    "clustering.signals": "paper",
}


@functools.lru_cache(maxsize=1)
def config_defaults() -> dict[str, Any]:
    """Every config key (``section.key``, nodes left out) with its default value."""
    from colnet_mpi.config import Config

    out: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        if f.name == "nodes" or f.default_factory is dataclasses.MISSING:
            continue
        out.update(flatten_config({f.name: dataclasses.asdict(f.default_factory())}))
    return out


class _Marker(enum.Enum):
    NOT_APPLICABLE = "n/a"

    def __repr__(self) -> str:
        return "NOT_APPLICABLE"


#: The value :func:`setting_config` gives a key that has no effect in a run (an ``[attack]``
#: option of a run without an attack): shown as "–", an empty CSV cell, ``None`` in tidy tables.
NOT_APPLICABLE = _Marker.NOT_APPLICABLE

#: Keys of asynchronous rounds only (``federation.mode = "async"``).
_ASYNC_KEYS = (
    "max_staleness",
    "staleness_decay",
    "time_budget",
    "catch_up",
    "catch_up_train",
    "first_round",
    "lockstep_deadline",
    "leader_stand_in",
)

#: Keys that do nothing while a switch key has a given value:
#: key prefix -> (switch key, the value that turns them off, the switch's default).
#: The switch itself stays a setting (a clean run is a setting of its own).
_INERT_UNLESS = {
    "attack.": ("attack.kind", "none", "none"),
    **{f"federation.{k}": ("federation.mode", "sync", "sync") for k in _ASYNC_KEYS},
}


def setting_config(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A flat config as the report compares it: keys that have no effect become
    :data:`NOT_APPLICABLE`.

    The rules for grouping runs into settings: while ``attack.kind = "none"`` no node attacks,
    so the other ``attack.*`` keys (``attack.nodes``, ``attack.boost_scale``, ...) do not make
    two clean runs different settings; and the keys of asynchronous rounds
    (``federation.max_staleness``, ``federation.time_budget``, ...) have no effect in a
    synchronous run.
    """
    out = dict(flat)
    for prefix, (switch, off, default) in _INERT_UNLESS.items():
        if out.get(switch, default) != off:
            continue
        for k in out:
            if k.startswith(prefix) and k != switch:
                out[k] = NOT_APPLICABLE
    return out


def flatten_config(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config tables as ``{"section.key": value}``; the ``nodes`` list is left out."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not prefix and key == "nodes":
            continue
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, f"{dotted}."))
        elif isinstance(value, list):
            out[dotted] = tuple(value)
        else:
            out[dotted] = value
    return out


@dataclass(frozen=True, eq=False)
class Run:
    """One results file read into memory (everything but the per-node affinity matrices).

    ``data`` maps dataset names of the results file (``"round/test_f1_micro"``, ``"epoch/val_loss"``,
    ``"clustering/ari"``, ``"hca/weights"``, ...) to arrays, cut to the complete rounds.
    """

    path: Path
    attrs: dict[str, Any]
    config_text: str
    raw_config: dict[str, Any]
    node_names: tuple[str, ...]
    node_tasks: tuple[str, ...]
    true_groups: tuple[str, ...]
    data: dict[str, np.ndarray] = field(repr=False)

    # --- identity ---------------------------------------------------------------------------
    @cached_property
    def config(self) -> Config:
        """The validated config (:func:`~colnet_mpi.config.config_from_toml`; imports torch).

        Raises ``ConfigError`` if this version of colnet-mpi cannot validate the stored config;
        :attr:`raw_config` and :attr:`flat_config` always work.
        """
        from colnet_mpi.config import config_from_toml

        return config_from_toml(self.config_text)

    @property
    def status(self) -> str:
        """``running``, ``finished`` or ``failed`` (the root attribute)."""
        return str(self.attrs.get("status", ""))

    @property
    def finished(self) -> bool:
        """Whether the run completed all its rounds."""
        return self.status == "finished"

    @property
    def seed(self) -> int | None:
        """The run's seed (``run.seed``)."""
        seed = self.attrs.get("seed", self.flat_config.get("run.seed"))
        return None if seed is None else int(seed)

    @property
    def name(self) -> str:
        """``run.name`` (a sweep names its runs ``<sweep>_<index>``)."""
        return str(self.flat_config.get("run.name", self.path.stem))

    @property
    def dataset(self) -> str:
        """``data.dataset``."""
        return str(self.flat_config.get("data.dataset", ""))

    @cached_property
    def flat_config(self) -> dict[str, Any]:
        """The resolved config as ``{"section.key": value}`` (keys that the file predates filled
        in: :data:`CHANGED_DEFAULTS`, else today's default)."""
        return {**config_defaults(), **CHANGED_DEFAULTS, **flatten_config(self.raw_config)}

    @cached_property
    def setting_config(self) -> dict[str, Any]:
        """:attr:`flat_config` with the keys that have no effect in this run marked
        :data:`NOT_APPLICABLE` (:func:`setting_config`): what settings are compared on."""
        return setting_config(self.flat_config)

    @property
    def groups(self) -> tuple[str, ...]:
        """True task groups in order of first appearance among the nodes."""
        return tuple(dict.fromkeys(self.true_groups))

    def nodes_of(self, group: str) -> np.ndarray:
        """Indices of the nodes whose true task group is ``group``."""
        return np.flatnonzero(np.asarray(self.true_groups) == group)

    # --- sizes ------------------------------------------------------------------------------
    @property
    def n_rounds(self) -> int:
        """Complete rounds recorded."""
        return int(self.data["round/test_loss"].shape[0])

    @property
    def planned_rounds(self) -> int | None:
        """``training.rounds`` of the config."""
        value = self.flat_config.get("training.rounds")
        return None if value is None else int(value)

    @property
    def n_epochs(self) -> int:
        """Local epochs recorded (all nodes run the same number)."""
        return int(self.data["epoch/val_loss"].shape[0])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.data[name]

    def read(self, name: str) -> np.ndarray:
        """Read any dataset from the file (e.g. ``clustering/affinity``), cut to the complete rounds."""
        with _open(self.path) as f:
            if name not in f:
                raise KeyError(f"{self.path}: no dataset {name!r}")
            arr = np.asarray(f[name][()])
        if arr.ndim >= 1 and name.startswith("epoch/"):
            arr = arr[: self.n_epochs]
        elif arr.ndim >= 1 and _per_round(name):
            arr = arr[: self.n_rounds]
        return arr

    # --- metrics ----------------------------------------------------------------------------
    def round_index(self, round: int = -1) -> int:
        """Array index of ``round``: a round number (1-based) or, if negative, counted from the end."""
        r = self.n_rounds
        if round > 0 and round <= r:
            return round - 1
        if round < 0 and -round <= r:
            return r + round
        raise IndexError(f"{self.path}: round {round} is not recorded (rounds 1..{r} are)")

    @property
    def asynchronous(self) -> bool:
        """Whether the run used asynchronous rounds (``federation.mode = "async"``)."""
        return self.flat_config.get("federation.mode") == "async"

    def test_values(self, metric: str) -> np.ndarray:
        """``round/test_<metric>`` (R, N) as the report reads it. In an asynchronous run a node
        that had finished before a round (``round/clock`` NaN there) counts in it with its
        newest evaluation (:func:`latest_evaluation`), so that a group's mean after a fast node
        outlived a slow one is not NaN; synchronous runs: the recorded values."""
        values = np.asarray(self.data[f"round/test_{metric}"], dtype=float)
        if not self.asynchronous or "round/clock" not in self.data:
            return values
        ran = ~np.isnan(np.asarray(self.data["round/clock"], dtype=float)[: values.shape[0]])
        return latest_evaluation(values, ran)

    def node_metrics(self, round: int = -1) -> dict[str, np.ndarray]:
        """Test metrics of every node at ``round``: ``{"loss": (N,), "f1_micro": (N,), ...}``
        (asynchronous runs: see :meth:`test_values`)."""
        i = self.round_index(round)
        return {m: self.test_values(m)[i] for m in TEST_METRICS}

    def final_round(self) -> dict[str, np.ndarray]:
        """Test metrics of every node at the last complete round."""
        return self.node_metrics(-1)


# ---------------------------------------------------------------------------------------------
# Finding and loading files


def _natural_key(path: Path) -> list[Any]:
    """Sort ``sweep_10.h5`` after ``sweep_9.h5``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """The results files named by ``paths``: files as given, directories searched for ``*.h5``
    (outside checkpoint folders, ``*.ckpt``)."""
    found: list[Path] = []
    missing: list[str] = []
    given = [Path(p) for p in paths]
    for p in given:
        if p.is_dir():
            files = (f for f in p.rglob("*.h5") if not any(d.suffix == ".ckpt" for d in f.parents))
            found.extend(sorted(files, key=_natural_key))
        elif p.is_file():
            found.append(p)
        else:
            missing.append(str(p))
    if missing:
        raise ReportError(f"no such file or directory: {', '.join(missing)}")
    unique = list(dict.fromkeys(f.resolve() for f in found))
    if not unique:
        raise ReportError(
            f"no .h5 results files found under {', '.join(str(p) for p in given) or '(no paths)'}"
        )
    by_resolved = {f.resolve(): f for f in found}
    return [by_resolved[u] for u in unique]


def _open(path: Path, attempts: int = 5) -> h5py.File:
    """Open read-only, retrying briefly while the writer rank holds the file. Without HDF5
    file locking, so that holding the returned file open never blocks the writer."""
    for i in range(attempts):
        try:
            return h5py.File(path, "r", locking=False)
        except BlockingIOError:
            if i == attempts - 1:
                raise
            time.sleep(0.3)
    raise AssertionError("unreachable")  # pragma: no cover


def load_run(path: str | Path) -> Run:
    """Read one results file; raise :class:`NotAResultsFileError` naming it if it is not one."""
    p = Path(path)
    try:
        f = _open(p)
    except BlockingIOError as err:
        raise ReportError(
            f"{p}: locked by another process (a run writing its round right now?); try again"
        ) from err
    except OSError as err:
        raise NotAResultsFileError(f"{p}: not a readable HDF5 file ({err})") from err
    with f:
        if "config" not in f.attrs or "nodes/name" not in f or "round/test_loss" not in f:
            raise NotAResultsFileError(
                f"{p}: not a colnet-mpi results file (no 'config' attribute or no nodes/round data)"
            )
        attrs = {k: _attr(v) for k, v in f.attrs.items()}
        config_text = _text(f.attrs["config"])
        try:
            raw = tomllib.loads(config_text)
        except tomllib.TOMLDecodeError as err:
            raise NotAResultsFileError(
                f"{p}: its 'config' attribute is not valid TOML ({err})"
            ) from err
        names = tuple(_text(v) for v in f["nodes/name"][()])
        tasks = tuple(_text(v) for v in f["nodes/task"][()])
        groups = (
            tuple(_text(v) for v in f["nodes/true_group"][()]) if "nodes/true_group" in f else tasks
        )
        data: dict[str, np.ndarray] = {}

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and not name.startswith("nodes/"):
                if name not in _ON_REQUEST:
                    data[name] = np.asarray(obj[()])

        f.visititems(visit)
    return Run(
        path=p,
        attrs=attrs,
        config_text=config_text,
        raw_config=raw,
        node_names=names,
        node_tasks=tasks,
        true_groups=groups,
        data=_complete_rounds(data),
    )


def _per_round(name: str) -> bool:
    """Whether a dataset has one row per round (the record spec says; ``nodes/`` has none)."""
    return not name.startswith("nodes/") and axis_of(name) == "round"


def _complete_rounds(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cut to the rounds every test-metric dataset holds (a torn last append), epochs to match.

    Other round-axis datasets are cut to at most that many rounds, never used to shorten the run.
    """
    metrics = [k for k in data if k.startswith("round/test_")]
    r = min((data[k].shape[0] for k in metrics), default=0)
    out = dict(data)
    for k in data:
        if _per_round(k) and data[k].ndim >= 1:
            out[k] = data[k][:r]
    per_epoch = [k for k in data if axis_of(k) == "epoch"]
    e = min((data[k].shape[0] for k in per_epoch), default=0)
    keep = np.arange(e)
    if "epoch/round" in data:
        keep = keep[data["epoch/round"][:e] <= r]
    for k in per_epoch:
        out[k] = data[k][keep]
    return out


def load_runs(paths: Iterable[str | Path], *, include_unfinished: bool = False) -> list[Run]:
    """Load every results file under ``paths`` (files or directories searched for ``*.h5``).

    Runs whose status is not ``finished`` are skipped with an :class:`UnfinishedRunWarning`, or
    with ``include_unfinished`` used up to their last complete round (still with a warning).
    Runs without a single complete round are always skipped.
    """
    runs: list[Run] = []
    skipped: list[str] = []
    partial: list[str] = []
    for p in find_results(paths):
        run = load_run(p)
        if run.finished:
            runs.append(run)
            continue
        planned = run.planned_rounds
        state = f"{p} ({run.status or 'no status'}, {run.n_rounds} of {planned or '?'} rounds)"
        if include_unfinished and run.n_rounds > 0:
            partial.append(state)
            runs.append(run)
        else:
            skipped.append(state)
    if skipped:
        hint = (
            ""
            if include_unfinished
            else "; pass --include-unfinished to use their last complete round"
        )
        warnings.warn(
            f"skipping {len(skipped)} unfinished run(s): {', '.join(skipped)}{hint}",
            UnfinishedRunWarning,
            stacklevel=2,
        )
    if partial:
        warnings.warn(
            f"using the last complete round of {len(partial)} unfinished run(s): {', '.join(partial)}",
            UnfinishedRunWarning,
            stacklevel=2,
        )
    if not runs:
        raise ReportError("no finished runs to report on (see the warnings above)")
    return runs


# ---------------------------------------------------------------------------------------------
# Compatibility and settings


def _list_files(runs: Sequence[Run], limit: int = 4) -> str:
    names = [str(r.path) for r in runs]
    if len(names) > limit:
        return ", ".join(names[:limit]) + f" and {len(names) - limit} more"
    return ", ".join(names)


def check_compatible(runs: Sequence[Run]) -> None:
    """Raise :class:`IncompatibleRunsError` unless all runs share the dataset and the node set."""
    if not runs:
        return
    by_dataset: dict[str, list[Run]] = {}
    for r in runs:
        by_dataset.setdefault(r.dataset, []).append(r)
    if len(by_dataset) > 1:
        parts = "; ".join(
            f"data.dataset = {d!r} in {_list_files(rs)}" for d, rs in by_dataset.items()
        )
        raise IncompatibleRunsError(
            f"runs on different datasets cannot share one table: {parts}. "
            "Split them with scenarios() first (colnet-mpi report does: one table per dataset)."
        )
    ref = runs[0]
    ref_nodes = list(zip(ref.node_names, ref.node_tasks, strict=False))
    for r in runs[1:]:
        nodes = list(zip(r.node_names, r.node_tasks, strict=False))
        if set(nodes) == set(ref_nodes) and len(nodes) == len(ref_nodes):
            continue
        only_ref = [f"{n}:{t}" for n, t in ref_nodes if (n, t) not in nodes]
        only_r = [f"{n}:{t}" for n, t in nodes if (n, t) not in ref_nodes]
        raise IncompatibleRunsError(
            f"runs with different node sets cannot share one table: {ref.path} has "
            f"{len(ref_nodes)} nodes, {r.path} has {len(nodes)}; only in {ref.path.name}: "
            f"{', '.join(only_ref) or '-'}; only in {r.path.name}: {', '.join(only_r) or '-'}"
        )


def scenarios(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs split by dataset (the paper's "scenario"), datasets in order of first appearance.

    Each part can go into one table; :func:`check_compatible` still checks its node sets.
    """
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(r.dataset, []).append(r)
    return out


def settings(runs: Sequence[Run], *, ignore: Iterable[str] = ()) -> tuple[str, ...]:
    """Dotted config keys whose values differ between runs, in config order.

    ``run.seed``, ``run.name`` and ``run.output`` (and any key in ``ignore``) are never settings.
    Values are compared as :func:`setting_config` gives them: a key counts only when it differs
    between the runs in which it has an effect (``attack.nodes`` of clean runs never does).
    """
    skip = NOT_SETTINGS | set(ignore)
    flats = [r.setting_config for r in runs]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    missing = object()
    out = []
    for k in keys:
        if k in skip:
            continue
        values = [flat.get(k, missing) for flat in flats]
        used = [v for v in values if v is not NOT_APPLICABLE]
        if any(v != used[0] for v in used[1:]):
            out.append(k)
    return tuple(out)


#: Sections whose name a row label leaves out (``training.local_epochs`` -> ``local_epochs``).
_PLAIN_SECTIONS = ("data", "model", "training", "federation")


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Drop the section of the core sections' keys where that stays unambiguous.

    ``attack.kind`` or ``hca.alpha`` keep theirs: a bare ``kind`` or ``alpha`` says too little.
    """
    short = {}
    for k in keys:
        section, _, rest = k.partition(".")
        short[k] = rest if section in _PLAIN_SECTIONS and rest else k
    counts = list(short.values())
    return {k: (s if counts.count(s) == 1 else k) for k, s in short.items()}


def _format_value(value: Any) -> str:
    if value is NOT_APPLICABLE:
        return "–"
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return str(value)


def setting_of(run: Run, keys: Sequence[str]) -> dict[str, Any]:
    """The values of ``keys`` in this run's config (``None`` where the key is absent,
    :data:`NOT_APPLICABLE` where it has no effect: :func:`setting_config`)."""
    flat = run.setting_config
    return {k: flat.get(k) for k in keys}


def setting_label(setting: Mapping[str, Any]) -> str:
    """A row label such as ``local_epochs=2, rounds=15``; ``all runs`` when nothing differs.

    Keys that have no effect in the setting (:data:`NOT_APPLICABLE`, e.g. ``attack.nodes`` of
    the clean runs) are left out: ``attack.kind=none`` says enough.
    """
    if not setting:
        return "all runs"
    shown = {k: v for k, v in setting.items() if v is not NOT_APPLICABLE} or dict(setting)
    short = _short_keys(list(shown))
    return ", ".join(f"{short[k]}={_format_value(v)}" for k, v in shown.items())


def _by_setting(
    runs: Sequence[Run], ignore: Iterable[str] = ()
) -> list[tuple[dict[str, Any], list[Run]]]:
    """Runs grouped by their setting, settings in order of first appearance."""
    keys = settings(runs, ignore=ignore)
    grouped: dict[tuple[str, ...], tuple[dict[str, Any], list[Run]]] = {}
    for r in runs:
        setting = setting_of(r, keys)
        key = tuple(repr(v) for v in setting.values())
        grouped.setdefault(key, (setting, []))[1].append(r)
    for setting, members in grouped.values():
        seen: dict[Any, Run] = {}
        for r in members:
            if r.seed in seen:
                warnings.warn(
                    f"{seen[r.seed].path} and {r.path} have the same settings and seed "
                    f"({r.seed}); both are counted as replicates of {setting_label(setting)}",
                    UserWarning,
                    stacklevel=3,
                )
            seen[r.seed] = r
    return list(grouped.values())


# ---------------------------------------------------------------------------------------------
# Summaries


@dataclass(frozen=True)
class Stat:
    """Mean ± standard deviation over ``n`` runs (std with ddof=1; NaN for a single run)."""

    mean: float
    std: float
    n: int

    @staticmethod
    def of(values: Sequence[float]) -> Stat:
        """The statistic of one value per run (NaN values propagate: a diverged run shows)."""
        arr = np.asarray(values, dtype=float)
        n = int(arr.size)
        if n == 0:
            return Stat(math.nan, math.nan, 0)
        mean = float(np.mean(arr))
        std = float(np.std(arr, ddof=1)) if n >= 2 else math.nan
        return Stat(mean, std, n)

    def format(self, digits: int = 3) -> str:
        """``0.673 ± 0.012``; ``–`` for a metric that does not apply (NaN)."""
        if math.isnan(self.mean):
            return "–"
        if math.isnan(self.std):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def carry_forward(
    last: np.ndarray, now: np.ndarray, ran: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One round of :func:`latest_evaluation` (N,): the values to count (``now`` where the node
    ran the round, else ``last``, its newest evaluation) and the newest evaluations after it."""
    now = np.asarray(now, dtype=float)
    return np.where(ran, now, last), np.where(ran & ~np.isnan(now), now, last)


def latest_evaluation(values: np.ndarray, ran: np.ndarray) -> np.ndarray:
    """``values`` (R, N) with every entry of a round a node did not run (``ran`` False) replaced
    by that node's newest finite value of an earlier round it ran (NaN before its first). The
    rounds a node ran keep their values, NaN included (a round without evaluation,
    ``run.evaluate_every``)."""
    out = np.array(values, dtype=float, copy=True)
    last = np.full(out.shape[1], np.nan)
    for r in range(out.shape[0]):
        out[r], last = carry_forward(last, out[r], ran[r])
    return out


def _mean_over(values: np.ndarray, idx: np.ndarray) -> float:
    sel = values[idx]
    if sel.size == 0 or np.all(np.isnan(sel)):
        return math.nan  # the metric does not apply to this group (e.g. F1 for landmarks)
    return float(np.mean(sel))


def group_summary(run: Run, round: int = -1) -> dict[str, dict[str, float]]:
    """Per true task group, the mean over its nodes of each test metric at ``round`` (default last).

    Returns ``{group: {"loss": ..., "precision_micro": ..., ..., "f1_macro": ...}}``.
    """
    metrics = run.node_metrics(round)
    return {
        g: {m: _mean_over(metrics[m], run.nodes_of(g)) for m in TEST_METRICS} for g in run.groups
    }


def node_summary(run: Run, round: int = -1) -> dict[str, dict[str, float]]:
    """Per node (by name), its test metrics at ``round``: the same shape as :func:`group_summary`."""
    metrics = run.node_metrics(round)
    return {
        name: {m: float(metrics[m][i]) for m in TEST_METRICS}
        for i, name in enumerate(run.node_names)
    }


@dataclass(frozen=True)
class Row:
    """One table row: a setting and a task group (or node), with each metric over the seeds."""

    dataset: str
    setting: dict[str, Any]
    label: str
    group: str
    metrics: dict[str, Stat]
    seeds: tuple[int | None, ...]
    paths: tuple[Path, ...]

    @property
    def n(self) -> int:
        """Number of runs (seeds) averaged."""
        return len(self.paths)


_SUMMARIES: dict[str, Callable[[Run, int], dict[str, dict[str, float]]]] = {
    "group": group_summary,
    "node": node_summary,
}


def aggregate(
    runs: Sequence[Run],
    *,
    round: int = -1,
    by: str = "group",
    ignore: Iterable[str] = (),
) -> list[Row]:
    """Mean ± std over seeds of :func:`group_summary` (``by="node"``: :func:`node_summary`).

    One row per setting x task group, ordered by group (first appearance among the nodes), then by
    setting (first appearance among the runs, files in natural order). Raises
    :class:`IncompatibleRunsError` for runs on different datasets or node sets.
    """
    if by not in _SUMMARIES:
        raise ValueError(f"by = {by!r} is not allowed; choose one of: {', '.join(_SUMMARIES)}")
    check_compatible(runs)
    if not runs:
        return []
    summary = _SUMMARIES[by]
    keys = runs[0].groups if by == "group" else runs[0].node_names
    per_setting = []
    for setting, members in _by_setting(runs, ignore):
        per_run = [summary(r, round) for r in members]
        per_setting.append((setting, members, per_run))
    rows = []
    for key in keys:
        for setting, members, per_run in per_setting:
            rows.append(
                Row(
                    dataset=runs[0].dataset,
                    setting=setting,
                    label=setting_label(setting),
                    group=key,
                    metrics={m: Stat.of([s[key][m] for s in per_run]) for m in TEST_METRICS},
                    seeds=tuple(r.seed for r in members),
                    paths=tuple(r.path for r in members),
                )
            )
    return rows


@dataclass(frozen=True)
class Curve:
    """A per-epoch or per-round series of one setting and task group: mean and std over seeds."""

    dataset: str
    setting: dict[str, Any]
    label: str
    group: str
    x: np.ndarray  # epoch or round numbers, 1-based; seconds for :func:`time_curves`
    mean: np.ndarray
    std: np.ndarray  # NaN for a single run
    n: int


def _curves(
    runs: Sequence[Run],
    series: Callable[[Run, np.ndarray, np.ndarray | None], np.ndarray],
    ignore: Iterable[str],
    grid: Callable[[Sequence[Run]], np.ndarray] | None = None,
) -> list[Curve]:
    """Per task group x setting: ``series(run, the group's nodes, x)`` of each run, mean and std
    over the runs. ``grid(the setting's runs)``: the x values (seconds); None: epochs or rounds
    1, 2, ... (``x`` None), as many as the shortest series has."""
    check_compatible(runs)
    if not runs:
        return []
    out = []
    by_setting = _by_setting(runs, ignore)
    for group in runs[0].groups:
        for setting, members in by_setting:
            x = None if grid is None else grid(members)
            per_run = [series(r, r.nodes_of(group), x) for r in members]
            length = min(len(s) for s in per_run)  # unfinished runs: the common prefix
            stack = np.stack([s[:length] for s in per_run]) if per_run else np.zeros((0, 0))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = stack.mean(axis=0)
                std = stack.std(axis=0, ddof=1) if len(per_run) >= 2 else np.full(length, np.nan)
            out.append(
                Curve(
                    dataset=runs[0].dataset,
                    setting=setting,
                    label=setting_label(setting),
                    group=group,
                    x=np.arange(1, length + 1) if x is None else x,
                    mean=mean,
                    std=std,
                    n=len(per_run),
                )
            )
    return out


def val_loss_curves(runs: Sequence[Run], *, ignore: Iterable[str] = ()) -> list[Curve]:
    """Average client validation loss per local epoch (paper Figs 2–4) per setting x task group.

    Mean over the group's nodes (asynchronous runs: over those that trained the epoch), then
    mean (and std) over the seeds of the setting.
    """

    def series(r: Run, idx: np.ndarray, _x: np.ndarray | None) -> np.ndarray:
        values = r["epoch/val_loss"][:, idx]
        if not r.asynchronous:
            return values.mean(axis=1)
        # asynchronous: the nodes that trained the epoch (one that finished early, or whose
        # epoch was skipped or cut, has NaN there)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(values, axis=1)

    return _curves(runs, series, ignore)


def _check_metric(metric: str) -> None:
    if metric not in TEST_METRICS:
        raise ValueError(
            f"metric = {metric!r} is not allowed; choose one of: {', '.join(TEST_METRICS)}"
        )


def round_curves(
    runs: Sequence[Run], metric: str = "f1_micro", *, ignore: Iterable[str] = ()
) -> list[Curve]:
    """Average client test ``metric`` per round per setting x task group (mean over nodes, then seeds)."""
    _check_metric(metric)

    def series(r: Run, idx: np.ndarray, _x: np.ndarray | None) -> np.ndarray:
        values = r.test_values(metric)[:, idx]
        return np.array([_mean_over(row, np.arange(row.size)) for row in values])

    return _curves(runs, series, ignore)


def group_over_time(run: Run, metric: str, nodes: np.ndarray, times: np.ndarray) -> np.ndarray:
    """The mean over ``nodes`` of each one's newest test ``metric`` at each of ``times``
    (seconds of ``round/clock``: when each node-round ended); NaN until every one of them has
    an evaluation."""
    values = np.asarray(run[f"round/test_{metric}"], dtype=float)[:, nodes]
    clock = np.asarray(run["round/clock"], dtype=float)[: values.shape[0], nodes]
    out = np.empty((times.size, len(nodes)))
    for k in range(len(nodes)):
        kept = ~np.isnan(clock[:, k]) & ~np.isnan(values[:, k])
        t, v = clock[kept, k], values[kept, k]
        if v.size == 0:  # never evaluated, or a metric its task has not (F1 of landmarks)
            out[:, k] = np.nan
            continue
        order = np.argsort(t, kind="stable")
        t, v = t[order], v[order]
        at = np.searchsorted(t, times, side="right") - 1  # the newest evaluation by then
        out[:, k] = np.where(at >= 0, v[np.maximum(at, 0)], np.nan)
    return out.mean(axis=1)


def time_curves(
    runs: Sequence[Run], metric: str = "f1_micro", *, points: int = 100, ignore: Iterable[str] = ()
) -> list[Curve]:
    """Average client test ``metric`` against wall time (``round/clock``, seconds since the
    rounds began) per setting x task group: at each time the mean over the group's nodes of
    their newest evaluation (:func:`group_over_time`), then mean and std over the seeds, on
    ``points`` times up to the end of the setting's shortest run. The curve to compare modes
    by, where asynchronous nodes run different numbers of rounds."""
    _check_metric(metric)

    def grid(members: Sequence[Run]) -> np.ndarray:
        end = min(float(np.nanmax(r["round/clock"])) for r in members)
        return np.linspace(0.0, end, points)

    def series(r: Run, idx: np.ndarray, x: np.ndarray | None) -> np.ndarray:
        assert x is not None
        return group_over_time(r, metric, idx, x)

    return _curves(runs, series, ignore, grid)


def csv_cell(value: Any) -> str:
    """A setting value as a CSV cell: empty for None and :data:`NOT_APPLICABLE`, TOML spelling
    for booleans."""
    if value is None or value is NOT_APPLICABLE:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def csv_number(value: float) -> str:
    """A number as a CSV cell at full precision; empty for NaN."""
    return "" if math.isnan(value) else repr(float(value))


# ---------------------------------------------------------------------------------------------
# Tidy tables (pandas) for notebooks

#: Per-round, per-node datasets (one number per node and round), from the record spec.
NODE_ROUND_DATASETS: tuple[str, ...] = tuple(
    f.name
    for f in FIELDS
    if f.source == "node" and f.reduce is None and f.axis == "round" and f.shape == ""
)
#: Per-round scalars (one number per round: reduced over the nodes or computed by the writer).
ROUND_DATASETS: tuple[str, ...] = tuple(
    f.name for f in FIELDS if f.axis == "round" and (f.source == "writer" or f.reduce is not None)
)
#: Per-epoch, per-node datasets (``epoch/round`` becomes the ``round`` column).
NODE_EPOCH_DATASETS: tuple[str, ...] = tuple(
    f.name for f in FIELDS if f.source == "node" and f.axis == "epoch"
)


def _column(name: str) -> str:
    """A dataset's column in a tidy table: ``round/test_f1_micro`` -> ``test_f1_micro``,
    ``round/seconds/total`` -> ``seconds_total``, ``defense/excluded`` -> ``defense_excluded``,
    ``epoch/val_loss`` -> ``val_loss``."""
    for prefix in ("round/", "epoch/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    return name.replace("/", "_")


def _pandas() -> Any:
    try:
        import pandas
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            'tidy tables need pandas: pip install -e ".[analysis]" (or pip install pandas)'
        ) from err
    return pandas


def _run_columns(run: Run, keys: Sequence[str], rows: int) -> dict[str, Any]:
    """The identifying columns of one run, repeated over ``rows`` rows."""
    ident: dict[str, Any] = {"file": str(run.path), "run": run.name, "seed": run.seed}
    ident.update({k: None if v is NOT_APPLICABLE else v for k, v in setting_of(run, keys).items()})
    return {k: [v] * rows for k, v in ident.items()}


def _node_columns(run: Run, node: np.ndarray) -> dict[str, Any]:
    return {
        "node": node,
        "node_name": [run.node_names[i] for i in node],
        "task": [run.node_tasks[i] for i in node],
        "true_group": [run.true_groups[i] for i in node],
    }


def _frame(parts: list[dict[str, Any]]) -> pd.DataFrame:
    pandas = _pandas()
    frames = [pandas.DataFrame(p) for p in parts]
    return pandas.concat(frames, ignore_index=True) if frames else pandas.DataFrame()


def tidy(paths: Iterable[str | Path], *, include_unfinished: bool = False) -> pd.DataFrame:
    """One row per run x round x node of every results file under ``paths`` (needs pandas).

    Columns: ``file``, ``run`` (``run.name``), ``seed``, the dotted config keys in which the runs
    differ (:func:`settings`), ``round`` (1-based), ``node`` (world index), ``node_name``,
    ``task``, ``true_group``, then every per-node round dataset of the record spec, named without
    its ``round/`` prefix and with ``/`` as ``_`` (``test_loss``, ``test_f1_micro``, ``group``,
    ``leader``, ``backbone_checksum``, ``bytes_sent``, ``seconds_total``, ``hca_weights``,
    ``attack_active``, ``defense_excluded``, ...), and the per-round scalars repeated on each
    node's row (``clustering_ari``, ``clustering_k``, ``hca_solver_ok``, ...). Unfinished runs
    are skipped, or with ``include_unfinished`` cut to their last complete round
    (:func:`load_runs`). Text is ``str``, never bytes.

    Example::

        from colnet_mpi.metrics.reader import tidy
        df = tidy(["results/schemes/"])          # pip install -e ".[analysis]"
        final = df[df["round"] == df.groupby("run")["round"].transform("max")]
        final.groupby(["training.local_epochs", "true_group"])["test_f1_micro"].agg(["mean", "std"])
        df.groupby(["run", "round"])["seconds_total"].max()          # slowest node per round
        df.pivot_table(index="round", columns="node_name", values="test_loss", aggfunc="mean")
    """
    runs = load_runs(paths, include_unfinished=include_unfinished)
    keys = settings(runs)
    parts = []
    for run in runs:
        r, n = run.n_rounds, len(run.node_names)
        node = np.tile(np.arange(n), r)
        part = _run_columns(run, keys, r * n)
        part["round"] = np.repeat(np.arange(1, r + 1), n)
        part.update(_node_columns(run, node))
        for name in NODE_ROUND_DATASETS:
            if name in run.data:
                part[_column(name)] = np.asarray(run.data[name][:r]).reshape(r * n)
        for name in ROUND_DATASETS:
            if name in run.data:
                part[_column(name)] = np.repeat(np.asarray(run.data[name][:r]), n)
        parts.append(part)
    return _frame(parts)


def tidy_epochs(paths: Iterable[str | Path], *, include_unfinished: bool = False) -> pd.DataFrame:
    """One row per run x local epoch x node (needs pandas): the columns of :func:`tidy` up to
    ``true_group`` with ``epoch`` (1-based, counted over the whole run) beside ``round`` (from
    ``epoch/round``), then ``train_loss`` and ``val_loss``."""
    runs = load_runs(paths, include_unfinished=include_unfinished)
    keys = settings(runs)
    parts = []
    for run in runs:
        e, n = run.n_epochs, len(run.node_names)
        part = _run_columns(run, keys, e * n)
        part["epoch"] = np.repeat(np.arange(1, e + 1), n)
        part["round"] = np.repeat(np.asarray(run.data["epoch/round"][:e]), n)
        part.update(_node_columns(run, np.tile(np.arange(n), e)))
        for name in NODE_EPOCH_DATASETS:
            if name in run.data:
                part[_column(name)] = np.asarray(run.data[name][:e]).reshape(e * n)
        parts.append(part)
    return _frame(parts)
