"""Sweeps: a small TOML spec of named axes expands to a deterministic list of ``--set`` override sets."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import re
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colnet_mpi.config import Config, ConfigError, load_config, parse_override, read_text_file
from colnet_mpi.data.catalog import data_root_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

CONFIG_AXIS = "config"  # the special axis whose values are base config files
_NOT_SWEEPABLE = {
    "run.name": "the sweep sets it to <sweep name>_<index>",
    "run.output": "the sweep chooses the results file (use --out-dir to move the folder)",
}
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class SweepError(ValueError):
    """An invalid sweep spec, index or option; the message names the key and what is allowed."""


# ---------------------------------------------------------------------------------------------
# Values: rendered so that ``--set`` (config.parse_override) reads them back to the same value.


def _reads_back(text: str, value: Any) -> bool:
    _, got = parse_override(f"x.y={text}")
    if type(got) is not type(value):
        return False
    if isinstance(value, float) and math.isnan(value):
        return math.isnan(got)
    return bool(got == value)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # 1e-05, inf and nan are TOML too
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r} for --set")


def render(value: Any) -> str:
    """The ``--set`` text of one value: TOML syntax, bare words for plain strings."""
    plain = isinstance(value, str) and value and value == value.strip() and "\n" not in value
    text = value if plain and _reads_back(value, value) else _toml(value)
    if not _reads_back(text, value):  # pragma: no cover - a guard, every branch above reads back
        raise SweepError(f"value {value!r} does not survive --set; quote it differently")
    return text


# ---------------------------------------------------------------------------------------------
# The spec.


@dataclass(frozen=True)
class Dimension:
    """One independent direction of a sweep: a single axis, or zipped axes that move together."""

    keys: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]  # values[position][k] belongs to keys[k]

    @property
    def size(self) -> int:
        """How many positions this dimension has."""
        return len(self.values)


@dataclass(frozen=True)
class Sweep:
    """An expanded sweep: set ``index`` is the mixed-radix number over the dimensions, last fastest."""

    name: str
    spec: Path
    config: str | None  # the base config; None when the sweep has a ``config`` axis
    dimensions: tuple[Dimension, ...]

    @property
    def count(self) -> int:
        """Number of override sets (array tasks)."""
        return math.prod(d.size for d in self.dimensions)

    @property
    def keys(self) -> tuple[str, ...]:
        """Every axis name, in the order the dimensions vary (slowest first)."""
        return tuple(k for d in self.dimensions for k in d.keys)

    @functools.cached_property
    def _sets(self) -> tuple[tuple[tuple[Any, ...], ...], ...]:
        """Every set as one value row per dimension, in index order (the last dimension fastest)."""
        return tuple(itertools.product(*(d.values for d in self.dimensions)))

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.count:
            raise SweepError(
                f"index {index!r} is out of range: sweep {self.name!r} has {self.count} sets, "
                f"indices 0 to {self.count - 1} (sbatch --array=0-{self.count - 1})"
            )

    def values(self, index: int) -> dict[str, Any]:
        """The axis values of set ``index`` (``config`` included when it is an axis)."""
        self._check_index(index)
        out: dict[str, Any] = {}
        for dim, row in zip(self.dimensions, self._sets[index], strict=True):
            out.update(zip(dim.keys, row, strict=True))
        return out

    def config_for(self, index: int) -> str:
        """The base config file of set ``index`` (relative paths: against the current directory)."""
        chosen = self.values(index).get(CONFIG_AXIS, self.config)
        assert isinstance(chosen, str)
        return chosen

    def run_name(self, index: int) -> str:
        """``run.name`` of set ``index``: ``<sweep name>_<index>``."""
        self._check_index(index)
        return f"{self.name}_{index}"

    def overrides(self, index: int) -> list[str]:
        """``section.key=value`` strings of set ``index``, as ``--set`` takes them; ``run.name`` last."""
        pairs = [f"{k}={render(v)}" for k, v in self.values(index).items() if k != CONFIG_AXIS]
        return [*pairs, f"run.name={self.run_name(index)}"]

    def output(self, index: int, out_dir: str | Path | None = None) -> Path:
        """Results file of set ``index``: ``<out_dir>/<name>_<index>.h5``, default out_dir results/<name>."""
        folder = Path(out_dir) if out_dir else Path("results") / self.name
        return folder / f"{self.run_name(index)}.h5"

    def run_args(self, index: int, out_dir: str | Path | None = None) -> list[str]:
        """Arguments of ``colnet-mpi run`` for set ``index``: config, ``--set`` pairs, ``--out``."""
        args = [self.config_for(index)]
        for text in self.overrides(index):
            args += ["--set", text]
        return [*args, "--out", str(self.output(index, out_dir))]

    def check(self, index: int) -> Config:
        """Load and validate the config of set ``index`` (raises ConfigError)."""
        return load_config(self.config_for(index), self.overrides(index))

    def with_config(self, config: str) -> Sweep:
        """The same sweep on another base config (not allowed when ``config`` is an axis)."""
        if CONFIG_AXIS in self.keys:
            raise SweepError(
                f"{self.spec}: the sweep has a 'config' axis; --config cannot replace it"
            )
        return dataclasses.replace(self, config=config)


def _fail(spec: Path | str, message: str) -> typing.NoReturn:
    raise SweepError(f"{spec}: {message}")


def _allowed_keys(cls: Any) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(cls) if cls is not Config or f.name != "nodes")


def _check_axis_key(spec: Path | str, key: str) -> None:
    """Static check that ``key`` names a value of the config (types are checked by --check)."""
    if key == CONFIG_AXIS:
        return
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        _fail(
            spec,
            f"axis {key!r} is not allowed; name a config value as section.key "
            "(e.g. training.rounds) or use the axis 'config'",
        )
    if parts[0] == "nodes":
        _fail(
            spec,
            f"axis {key!r} is not allowed: [[nodes]] cannot be changed by --set; "
            "write one config per federation and sweep them with the axis 'config'",
        )
    if key in _NOT_SWEEPABLE:
        _fail(spec, f"axis {key!r} is not allowed: {_NOT_SWEEPABLE[key]}")
    cls: Any = Config
    for i, part in enumerate(parts):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            _fail(spec, f"axis {key!r}: {'.'.join(parts[:i])} is a value, not a table")
        allowed = _allowed_keys(cls)
        if part not in allowed:
            if i == 0:
                _fail(
                    spec,
                    f"axis {key!r}: unknown section {part!r}; allowed sections: "
                    f"{', '.join(f.name for f in dataclasses.fields(Config) if f.name != 'nodes')}",
                )
            table = ".".join(parts[:i])
            _fail(
                spec,
                f"axis {key!r}: unknown key '{table}.{part}'; allowed keys in [{table}]: "
                f"{', '.join(allowed)}",
            )
        cls = typing.get_type_hints(cls)[part]
    if isinstance(cls, type) and dataclasses.is_dataclass(cls):
        _fail(
            spec,
            f"axis {key!r} is a table; sweep one of its keys: "
            f"{', '.join(f'{key}.{k}' for k in _allowed_keys(cls))}",
        )


def _scalar_or_list(value: Any) -> bool:
    if isinstance(value, list):
        return all(_scalar_or_list(v) for v in value)
    return isinstance(value, (bool, int, float, str))


def _axis_values(spec: Path | str, key: str, raw: Any) -> tuple[Any, ...]:
    if isinstance(raw, Mapping):
        first = next(iter(raw), "key")
        _fail(
            spec,
            f'[axes] {key!r} is a table: quote dotted axis names, e.g. "{key}.{first}" = [...]',
        )
    if not isinstance(raw, list):
        _fail(spec, f"axis {key!r} = {raw!r} is not allowed; give a list of values, e.g. [0, 1, 2]")
    if not raw:
        _fail(spec, f"axis {key!r} is empty; give at least one value")
    for value in raw:
        if key == CONFIG_AXIS and not (isinstance(value, str) and value):
            _fail(
                spec, f"axis 'config' = {value!r} is not allowed; give config file paths (strings)"
            )
        if not _scalar_or_list(value):
            _fail(
                spec,
                f"axis {key!r}: value {value!r} is not allowed; use strings, integers, "
                "floats, booleans or lists of them",
            )
    return tuple(raw)


def _normalise(key: str) -> str:
    return ".".join(part.strip() for part in key.strip().split("."))


def sweep_from_dict(raw: Mapping[str, Any], spec: Path | str = "<sweep>") -> Sweep:
    """Validate a parsed sweep spec and build its :class:`Sweep`."""
    for section in raw:
        if section not in ("sweep", "axes"):
            _fail(spec, f"unknown section [{section}]; allowed sections: [sweep], [axes]")
    head = raw.get("sweep")
    if not isinstance(head, Mapping):
        _fail(spec, '[sweep] is required, with name = "..." and config = "configs/....toml"')
    for key in head:
        if key not in ("name", "config", "zip"):
            _fail(spec, f"unknown key 'sweep.{key}'; allowed keys in [sweep]: config, name, zip")
    name = head.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        _fail(
            spec,
            f"sweep.name = {name!r} is not allowed; use a non-empty name of letters, "
            "digits, '_', '-' and '.' (it names the results folder and files)",
        )
    config = head.get("config")
    if config is not None and not (isinstance(config, str) and config):
        _fail(spec, f"sweep.config = {config!r} is not allowed; give a config file path")

    table = raw.get("axes")
    if not isinstance(table, Mapping) or not table:
        _fail(spec, '[axes] needs at least one axis, e.g. "run.seed" = [0, 1, 2]')
    axes: dict[str, tuple[Any, ...]] = {}
    for raw_key, raw_values in table.items():
        key = _normalise(raw_key)
        values = _axis_values(spec, key, raw_values)
        _check_axis_key(spec, key)
        if key in axes:
            _fail(spec, f"axis {key!r} is given twice; each axis may appear once")
        axes[key] = values
    if CONFIG_AXIS in axes and config is not None:
        _fail(
            spec,
            "the base config is given twice: as sweep.config and as the axis 'config'; keep one",
        )
    if CONFIG_AXIS not in axes and config is None:
        _fail(
            spec, 'no base config: set sweep.config = "configs/....toml" or an axis config = [...]'
        )

    groups = head.get("zip", [])
    if not isinstance(groups, list) or not all(
        isinstance(g, list) and all(isinstance(k, str) for k in g) for g in groups
    ):
        _fail(
            spec,
            "sweep.zip must be a list of lists of axis names, e.g. "
            'zip = [["training.local_epochs", "training.rounds"]]',
        )
    zipped: dict[str, int] = {}
    for g, group in enumerate(groups):
        keys = [_normalise(k) for k in group]
        if len(keys) < 2:
            _fail(spec, f"sweep.zip[{g}] = {group!r} needs at least two axis names")
        for key in keys:
            if key not in axes:
                _fail(
                    spec,
                    f"sweep.zip[{g}] names {key!r}, which is not an axis; axes: {', '.join(axes)}",
                )
            if key in zipped:
                _fail(
                    spec, f"axis {key!r} appears in more than one sweep.zip group (or twice in one)"
                )
            zipped[key] = g
        lengths = {len(axes[k]) for k in keys}
        if len(lengths) > 1:
            listed = ", ".join(f"{k} has {len(axes[k])}" for k in keys)
            _fail(spec, f"zipped axes must have equal lengths: {listed} values")

    dimensions: list[Dimension] = []
    placed: set[int] = set()
    for key in axes:
        if key in zipped:
            g = zipped[key]
            if g in placed:
                continue
            placed.add(g)
            members = tuple(_normalise(k) for k in groups[g])
        else:
            members = (key,)
        dim = Dimension(members, tuple(zip(*(axes[k] for k in members), strict=True)))
        seen: dict[tuple[str, ...], int] = {}
        for pos, row in enumerate(dim.values):
            shown = tuple(f"{type(v).__name__}:{render(v)}" for v in row)
            if shown in seen:
                what = ", ".join(f"{k}={render(v)}" for k, v in zip(members, row, strict=True))
                _fail(
                    spec,
                    f"{what} appears twice (positions {seen[shown]} and {pos}); "
                    "every set must differ",
                )
            seen[shown] = pos
        dimensions.append(dim)
    return Sweep(name=name, spec=Path(spec), config=config, dimensions=tuple(dimensions))


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep spec file."""
    p = Path(path)
    text = read_text_file(p, "sweep spec", SweepError)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        hint = "; is a key given twice?" if "overwrite" in str(err) else ""
        raise SweepError(f"{p}: not valid TOML ({err}){hint}") from err
    return sweep_from_dict(raw, p)


# ---------------------------------------------------------------------------------------------
# Results files of a sweep.


def output_status(path: str | Path) -> str:
    """``missing``, or the results file's ``status`` attribute (``running``/``failed``/``finished``/
    ``preempted``), or ``unreadable`` (not HDF5, no status, locked)."""
    p = Path(path)
    if not p.exists():
        return "missing"
    try:
        import h5py

        with h5py.File(p, "r", locking=False) as f:  # never block a writer
            status = f.attrs.get("status", "")
    except (OSError, ValueError):
        return "unreadable"
    if isinstance(status, bytes):
        status = status.decode(errors="replace")
    return status if status in ("running", "failed", "finished", "preempted") else "unreadable"


def index_ranges(indices: Sequence[int]) -> str:
    """Compact ``--array`` syntax for sorted indices: ``0-2,5,7-8``."""
    parts: list[str] = []
    i = 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        parts.append(str(indices[i]) if i == j else f"{indices[i]}-{indices[j]}")
        i = j + 1
    return ",".join(parts)


# ---------------------------------------------------------------------------------------------
# Command line.


def add_parser(sub: Any) -> None:
    """Register ``colnet-mpi sweep``."""
    p = sub.add_parser(
        "sweep",
        help="expand a sweep spec: count, list, check, or one set's `colnet-mpi run` arguments",
        description=(
            "Expand a TOML sweep spec into numbered override sets (for SLURM arrays: "
            "sbatch --array=0-$((COUNT-1)) slurm/sweep.sbatch SPEC). Without an option: --list."
        ),
    )
    p.add_argument("spec", help="TOML sweep spec, e.g. configs/sweeps/local_epochs.toml")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--count", action="store_true", help="print the number of sets")
    mode.add_argument(
        "--list", action="store_true", help="table of every set and its output status"
    )
    mode.add_argument(
        "--check", action="store_true", help="load and validate the config of every set"
    )
    mode.add_argument(
        "--unfinished",
        action="store_true",
        help="print the indices whose results are not finished, as --array syntax (e.g. 2,5-7); "
        "exit code 1 when every set is finished",
    )
    mode.add_argument("--index", type=int, metavar="I", help="one set (0-based)")
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--args",
        action="store_true",
        help="with --index: the `colnet-mpi run` arguments, one per line",
    )
    what.add_argument(
        "--status",
        action="store_true",
        help="with --index: missing, running, failed, preempted, finished or unreadable "
        "(its results file)",
    )
    p.add_argument(
        "--print0", action="store_true", help="with --args: NUL-terminated instead of one per line"
    )
    p.add_argument("--out-dir", metavar="DIR", help="results folder (default results/<sweep name>)")
    p.add_argument(
        "--config", metavar="FILE", help="replace the spec's base config (not with a config axis)"
    )
    p.set_defaults(func=main)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _shown(value: Any, key: str) -> str:
    return str(value) if key == CONFIG_AXIS else render(value)


def _print_list(sweep: Sweep, out_dir: str | None) -> None:
    rows = [["index", *sweep.keys, "status"]]
    for i in range(sweep.count):
        values = sweep.values(i)
        status = output_status(sweep.output(i, out_dir))
        rows.append([str(i), *(_shown(values[k], k) for k in sweep.keys), status])
    sizes = " x ".join(str(d.size) for d in sweep.dimensions)
    print(
        f"# sweep {sweep.name!r} ({sweep.spec}): {sweep.count} sets = {sizes}; "
        f"results in {sweep.output(0, out_dir).parent}/"
    )
    if sweep.config is not None:
        print(f"# base config: {sweep.config}")
    print(_table(rows))


def _print_index(sweep: Sweep, index: int, out_dir: str | None) -> None:
    values = sweep.values(index)
    output = sweep.output(index, out_dir)
    rows = [[CONFIG_AXIS, sweep.config_for(index)]]
    rows += [[k, render(v)] for k, v in values.items() if k != CONFIG_AXIS]
    rows += [["run.name", sweep.run_name(index)], ["output", f"{output} ({output_status(output)})"]]
    print(f"# sweep {sweep.name!r} ({sweep.spec}), index {index} of 0-{sweep.count - 1}")
    print(_table(rows))


def _print_args(sweep: Sweep, index: int, out_dir: str | None, print0: bool) -> None:
    config = sweep.config_for(index)
    if not Path(config).is_file():
        raise SweepError(
            f"config file {config!r} of index {index} does not exist; relative paths are "
            f"resolved against the current directory ({Path.cwd()})"
        )
    args = sweep.run_args(index, out_dir)
    if print0:
        sys.stdout.write("".join(a + "\0" for a in args))
        return
    if any("\n" in a for a in args):
        raise SweepError("an argument contains a newline; use --print0")
    print("\n".join(args))


def _check_all(sweep: Sweep) -> int:
    bad = 0
    ranks: dict[int, list[int]] = {}
    roots: dict[tuple[str, str], str | None] = {}  # each data folder is looked at once
    for i in range(sweep.count):
        try:
            config = sweep.check(i)
        except ConfigError as err:
            problem: str | None = f"invalid config: {err}"
        else:
            # the run would stop at the same folder, after its ranks have started
            key = (config.data.dataset, config.data.root)
            if key not in roots:
                roots[key] = data_root_problem(*key)
            problem = roots[key]
        if problem is not None:
            bad += 1
            shown = " ".join(f"--set {o}" for o in sweep.overrides(i))
            print(f"index {i}: {sweep.config_for(i)} {shown}: {problem}", file=sys.stderr)
            continue
        ranks.setdefault(config.world_size, []).append(i)
    if bad:
        print(
            f"colnet-mpi sweep: {bad} of {sweep.count} sets of {sweep.name!r} are invalid",
            file=sys.stderr,
        )
        return 2
    if len(ranks) > 1:
        split = "; ".join(
            f"{n} ranks: --array={index_ranges(ix)}" for n, ix in sorted(ranks.items())
        )
        print(
            f"warning: the sets need different numbers of MPI ranks ({split}); one SLURM array "
            "gives every task the same --ntasks, so submit one array per size",
            file=sys.stderr,
        )
    sizes = ", ".join(str(n) for n in sorted(ranks))
    print(
        f"ok: all {sweep.count} sets of {sweep.name!r} are valid configs; "
        f"MPI ranks per run: {sizes} (sbatch --ntasks={sizes})"
    )
    return 0


def main(args: argparse.Namespace) -> int:
    """Run ``colnet-mpi sweep``."""
    try:
        if (args.args or args.status) and args.index is None:
            raise SweepError(f"--{'args' if args.args else 'status'} needs --index I")
        if args.print0 and not args.args:
            raise SweepError("--print0 goes with --args")
        sweep = load_sweep(args.spec)
        if args.config:
            sweep = sweep.with_config(args.config)
        if args.count:
            print(sweep.count)
        elif args.check:
            return _check_all(sweep)
        elif args.unfinished:
            todo = [
                i
                for i in range(sweep.count)
                if output_status(sweep.output(i, args.out_dir)) != "finished"
            ]
            if not todo:  # exit 1, so that sbatch --array=$(...) is not given an empty array
                print(f"all {sweep.count} sets of {sweep.name!r} are finished", file=sys.stderr)
                return 1
            print(index_ranges(todo))
        elif args.index is not None:
            if args.status:
                print(output_status(sweep.output(args.index, args.out_dir)))
            elif args.args:
                _print_args(sweep, args.index, args.out_dir, args.print0)
            else:
                _print_index(sweep, args.index, args.out_dir)
        else:
            _print_list(sweep, args.out_dir)
    except SweepError as err:
        print(f"colnet-mpi sweep: {err}", file=sys.stderr)
        return 2
    return 0
