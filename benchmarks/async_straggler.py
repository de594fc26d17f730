"""Synchronous against asynchronous rounds on the quickstart, with and without a straggler.

For each seed it runs (6 ranks, ``mpiexec``) the quickstart with ``clustering.until = 2`` in
both modes:

* ``slow``: node 0 (an attributes node) 3x slower (``[[nodes]] slowdown = 3``): synchronous for
  ``training.rounds`` rounds, then asynchronous with S = 1, 2 and unbounded, each with up to
  ``--async-rounds`` rounds per node and a time budget equal to the synchronous run's wall time;
* ``slow_landmarks``: the same with node 3 (a landmarks node) 3x slower instead;
* ``even``: no slow node, synchronous against asynchronous S = 1 (``--even-staleness``), the
  same rounds.

and prints, per run: wall time (the last node's last round), the time at which the mean test
metric of every task group first reaches the synchronous run's final value (attributes: F1
micro at least as high; landmarks: loss at most as high), each group's metric at 0.6x the
synchronous wall time, the staleness used (distribution, pooled and per node) and the bytes
sent per node-round.

    python benchmarks/async_straggler.py --seeds 0 1 2 --out results/async_runs

With ``--epoch-seconds X`` every node's local epoch lasts X seconds (the straggler's 3X), long
enough for the six ranks' work to fit on the machine's cores, so that the ranks behave like
nodes with one device each instead of competing for the same cores. ``--catch-up L`` sets
``federation.catch_up`` in the asynchronous runs, and ``--catch-up-train head`` makes a node
behind train its private head alone (an epoch of it paced at its cost); ``features`` does the
same on the frozen backbone's stored features. ``--first-round local`` sets
``federation.first_round = "local"`` in the asynchronous runs with a straggler (round 1
without groups instead of waiting for the first partition). ``--lockstep-deadline`` sets
``federation.lockstep_deadline = true`` in the asynchronous runs (in round 1, whose partition
waits for every node, a node stops training once every neighbour has posted its round-1
backbone). ``--staleness-decay D`` sets ``federation.staleness_decay`` in them, and
``--leader-stand-in`` sets ``federation.leader_stand_in = true`` (a member whose leader has
not trained the round aggregates across groups itself; otherwise it waits for the leader's
update of that round).

``--table`` prints the tables of ``summary.json`` without running anything; ``--table DIR ...``
pools the summaries of several folders (runs measured in separate invocations). Besides the
means over seeds it prints each asynchronous run's time to target per seed, with the 95 %
interval of the mean and how many seeds met 0.6, and the paired per-seed differences between
every two asynchronous runs of a scenario.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np
from scipy import stats

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
QUICK = (ROOT / "configs" / "quickstart.toml").read_text()
GROUPS = {"attributes": ("round/test_f1_micro", 1), "landmarks": ("round/test_loss", -1)}


# scenario -> the node that is three times slower (None: no slow node)
SLOW_NODE = {"slow": 0, "slow_landmarks": 3, "even": None}


def config(folder: Path, scenario: str) -> Path:
    """The quickstart with the scenario's straggler: node 0 (attributes) for ``slow``, node 3
    (landmarks) for ``slow_landmarks``, none for ``even``."""
    head = QUICK[: QUICK.index("[[nodes]]")]
    tasks = ["attributes"] * 3 + ["landmarks"] * 3
    nodes = [(t, 3.0 if i == SLOW_NODE[scenario] else 1.0) for i, t in enumerate(tasks)]
    text = "".join(f'[[nodes]]\ntask = "{t}"\nslowdown = {s}\n\n' for t, s in nodes)
    path = folder / f"quickstart_{scenario}.toml"
    path.write_text(head + text)
    return path


def run(cfg: Path, out: Path, sets: list[str]) -> float:
    """One run (skipped when its file is already complete); returns the launch's seconds."""
    if out.is_file():
        with h5py.File(out) as f:
            if f.attrs.get("status") == "finished":
                return float("nan")
    args = [a for s in sets for a in ("--set", s)]
    cmd = ["mpiexec", "-n", "6", sys.executable, "-m", "colnet_mpi", "run", str(cfg)]
    cmd += ["--out", str(out), "--overwrite", "--quiet", *args]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return time.perf_counter() - t0


def load(path: Path) -> dict:
    """The datasets this benchmark reads from a results file."""
    names = (
        "round/clock",
        "round/bytes_sent",
        "async/staleness",
        "round/seconds/local_train",
        "clustering/ari",
        *(m for m, _ in GROUPS.values()),
    )
    with h5py.File(path) as f:
        d = {k: np.asarray(f[k][()]) for k in names}
        d["task"] = [t.decode() if isinstance(t, bytes) else str(t) for t in f["nodes/task"][()]]
        text = f.attrs["config"]
        config = tomllib.loads(text.decode() if isinstance(text, bytes) else str(text))
    d["local_epochs"] = config["training"]["local_epochs"]
    d["epoch_seconds"] = config["training"].get("epoch_seconds", 0.0)
    d["slowdown"] = np.array([node.get("slowdown", 1.0) for node in config["nodes"]])
    return d


def group_curve(d: dict) -> list[tuple[float, dict[str, float]]]:
    """(time, {group: mean metric of its nodes' latest evaluation}) after every node-round."""
    events = []
    rounds, n = d["round/clock"].shape
    for r in range(rounds):
        for i in range(n):
            if not np.isnan(d["round/clock"][r, i]):
                events.append((float(d["round/clock"][r, i]), r, i))
    latest: dict[int, dict[str, float]] = {}
    out = []
    for t, r, i in sorted(events):
        latest[i] = {m: float(d[m][r, i]) for m, _ in GROUPS.values()}
        values = {}
        for g, (m, _) in GROUPS.items():
            members = [j for j in range(n) if d["task"][j] == g]
            if all(j in latest for j in members):
                values[g] = float(np.mean([latest[j][m] for j in members]))
        out.append((t, values))
    return out


def wall(d: dict) -> float:
    """Seconds until the last node finished its last round."""
    return float(np.nanmax(d["round/clock"]))


def time_to(
    curve: list, target: dict[str, float], groups: tuple[str, ...] = tuple(GROUPS)
) -> float:
    """First time the metric of every group in ``groups`` is at least as good as ``target``
    (NaN: never)."""
    for t, values in curve:
        if all(g in values for g in groups) and all(
            values[g] * GROUPS[g][1] >= target[g] * GROUPS[g][1] - 1e-12 for g in groups
        ):
            return t
    return float("nan")


def at(curve: list, t: float) -> dict[str, float]:
    """Every group's metric at time ``t``."""
    last: dict[str, float] = {}
    for s, values in curve:
        if s > t:
            break
        last = values
    return last


def _ms(values: list[float], digits: int = 2) -> str:
    """``mean ± std`` of the finite values, with how many of them there are when some are not."""
    finite = [v for v in values if v == v]
    if not finite:
        return "never"
    text = f"{np.mean(finite):.{digits}f} ± {np.std(finite):.{digits}f}"
    return text if len(finite) == len(values) else f"{text} ({len(finite)} of {len(values)})"


def run_order(rows: list[dict]) -> list[tuple[str, str]]:
    """The (scenario, run) pairs of ``rows`` in the order they first appear, each scenario's
    synchronous run first."""
    keys = list(dict.fromkeys((r["scenario"], r["run"]) for r in rows))
    scenarios = list(dict.fromkeys(s for s, _ in keys))
    return sorted(keys, key=lambda k: (scenarios.index(k[0]), k[1] != "sync"))


def _pool(histograms: Iterable[dict[str, int]]) -> dict[int, int]:
    """{staleness: count} summed over ``histograms`` (as ``histogram`` writes them)."""
    pooled: dict[int, int] = {}
    for h in histograms:
        for k, v in h.items():
            pooled[int(k)] = pooled.get(int(k), 0) + v
    return pooled


def _counts_text(pooled: dict[int, int]) -> str:
    """``k: count, …`` in increasing k ("" when empty)."""
    return ", ".join(f"{k}: {pooled[k]}" for k in sorted(pooled))


def tables(rows: list[dict]) -> str:
    """Markdown tables over seeds: times, metrics, rounds, staleness (pooled and per node) and
    bytes per run."""
    out = []
    head = (
        "| scenario | run | wall s | to target / sync wall | attributes | landmarks "
        "| F1 attributes @0.6 | loss landmarks @0.6 | F1 attributes final | loss landmarks final "
        "| rounds per node |"
    )
    out += [head, "|" + "---|" * 11]
    keys = run_order(rows)
    for scenario, name in keys:
        rs = [r for r in rows if r["scenario"] == scenario and r["run"] == name]
        rounds = np.mean([r["rounds_per_node"] for r in rs], axis=0)
        out.append(
            f"| {scenario} | {name} | {_ms([r['wall_s'] for r in rs], 1)} "
            f"| {_ms([r['to_target_ratio'] for r in rs])} "
            f"| {_ms([r['group_ratio']['attributes'] for r in rs])} "
            f"| {_ms([r['group_ratio']['landmarks'] for r in rs])} "
            f"| {_ms([r['at_0.6'].get('attributes', float('nan')) for r in rs], 3)} "
            f"| {_ms([r['at_0.6'].get('landmarks', float('nan')) for r in rs], 2)} "
            f"| {_ms([r['final']['attributes'] for r in rs], 3)} "
            f"| {_ms([r['final']['landmarks'] for r in rs], 2)} "
            f"| {' '.join(f'{x:.1f}' for x in rounds)} |"
        )
    out += [
        "",
        "| scenario | run | staleness used: count (pooled over seeds) | bytes sent per node-round "
        "| node-rounds over the emulated pace |",
    ]
    out += ["|---|---|---|---|---|"]
    for scenario, name in keys:
        rs = [r for r in rows if r["scenario"] == scenario and r["run"] == name]
        hist = _counts_text(_pool(r["staleness_hist"] for r in rs)) or "—"
        sent = np.mean([r["bytes_per_node_round"] for r in rs])
        late = [r.get("pace_overruns", "") for r in rs]
        over = "—"
        if all(late):
            k, n = (sum(int(x.split(" of ")[i]) for x in late) for i in (0, 1))
            over = f"{k} of {n}"
        out.append(f"| {scenario} | {name} | {hist} | {sent / 1e6:.2f} MB | {over} |")
    out += ["", per_node_table(rows), "", per_seed_table(rows)]
    paired = paired_table(rows)
    if paired:
        out += ["", paired]
    return "\n".join(out)


#: The straggler target: async reaches the synchronous final metrics within this fraction of the
#: synchronous wall time.
TARGET_RATIO = 0.6


def _mean_ci(values: list[float]) -> str:
    """``mean ± half-width`` of the 95 % Student-t interval of the mean (n >= 2), else ``—``."""
    if len(values) < 2:
        return "—"
    half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))
    return f"{np.mean(values):.3f} ± {half:.3f}"


def _ratios(rows: list[dict], scenario: str, name: str) -> dict[int, float]:
    """seed -> time to target over the synchronous wall time (NaN: never), for one run."""
    return {
        int(r["seed"]): float(r["to_target_ratio"])
        for r in rows
        if r["scenario"] == scenario and r["run"] == name
    }


def _at_least_budget(ratio: float) -> float:
    """A time to target for means and differences: one never reached counts as 1.0 (at least
    the whole budget)."""
    return 1.0 if ratio != ratio else ratio


def per_seed_table(rows: list[dict]) -> str:
    """Markdown table of every asynchronous run's time to target per seed, with the mean, the
    95 % interval of the mean, and how many seeds met :data:`TARGET_RATIO` (a run that never
    reached the target counts as 1.0 in the mean: at least the whole budget)."""
    seeds = sorted({int(r["seed"]) for r in rows})
    out = [
        "| scenario | run | "
        + " | ".join(f"seed {s}" for s in seeds)
        + f" | mean, 95 % interval | <= {TARGET_RATIO} |",
        "|---|---|" + "---|" * (len(seeds) + 2),
    ]
    for scenario, name in run_order(rows):
        if name == "sync":
            continue
        got = _ratios(rows, scenario, name)
        cells = [
            "" if s not in got else ("never" if got[s] != got[s] else f"{got[s]:.3f}")
            for s in seeds
        ]
        values = [_at_least_budget(v) for v in got.values()]
        met = sum(v <= TARGET_RATIO for v in values)
        out.append(
            f"| {scenario} | {name} | {' | '.join(cells)} | {_mean_ci(values)} "
            f"| {met} of {len(values)} |"
        )
    return "\n".join(out)


def paired_table(rows: list[dict]) -> str:
    """Markdown table comparing every two asynchronous runs of a scenario on the seeds both
    have (at least two): the mean per-seed difference of their times to target with its 95 %
    interval, and in how many seeds the second was faster. "" when no two runs share seeds."""
    out = []
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        names = [n for s, n in run_order(rows) if s == scenario and n != "sync"]
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                ra, rb = _ratios(rows, scenario, a), _ratios(rows, scenario, b)
                both = sorted(set(ra) & set(rb))
                if len(both) < 2:
                    continue
                diff = [_at_least_budget(rb[s]) - _at_least_budget(ra[s]) for s in both]
                faster = sum(d < 0 for d in diff)
                out.append(
                    f"| {scenario} | {b} | {a} | {len(both)} | {_mean_ci(diff)} "
                    f"| {faster} of {len(both)} |"
                )
    if not out:
        return ""
    head = [
        "| scenario | run | against | seeds | difference in time to target / sync wall "
        "(run − against), 95 % interval | seeds where run was faster |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(head + out)


def per_node_table(rows: list[dict]) -> str:
    """Markdown table of the staleness each node used (pooled over seeds): its distribution,
    median and largest value, one row per node of every asynchronous run."""
    out = [
        "| scenario | run | node | staleness used: count (pooled over seeds) | median | max |",
        "|---|---|---|---|---|---|",
    ]
    for scenario, name in run_order(rows):
        rs = [r for r in rows if r["scenario"] == scenario and r["run"] == name]
        if name == "sync" or not all("staleness_per_node" in r for r in rs):
            continue  # no staleness, or rows of an older version of this script
        for i, label in enumerate(rs[0]["node_labels"]):
            pooled = _pool(r["staleness_per_node"][i] for r in rs)
            if not pooled:
                continue
            values = np.repeat(list(pooled), list(pooled.values()))
            out.append(
                f"| {scenario} | {name} | {label} | {_counts_text(pooled)} "
                f"| {np.median(values):g} | {values.max()} |"
            )
    return "\n".join(out)


def overruns(d: dict) -> str:
    """With an emulated pace: how many node-rounds' local training took more than 5 % longer
    than the pace allows (``k of n``; the pace held when k is 0); "" without one."""
    if not d["epoch_seconds"]:
        return ""
    allowed = 1.05 * d["local_epochs"] * d["epoch_seconds"] * d["slowdown"]
    took = np.where(np.isnan(d["round/clock"]), np.nan, d["round/seconds/local_train"])
    done = ~np.isnan(took)
    return f"{int((took[done] > np.broadcast_to(allowed, took.shape)[done]).sum())} of {int(done.sum())}"


def histogram(values: np.ndarray) -> dict[str, int]:
    """{staleness: count}."""
    keys, counts = np.unique(values, return_counts=True)
    return {str(int(k)): int(c) for k, c in zip(keys, counts, strict=True)}


def pooled_summaries(folders: list[Path]) -> list[dict]:
    """The rows of every folder's ``summary.json``; a (seed, scenario, run) already taken from
    an earlier folder is left out."""
    rows: list[dict] = []
    seen: set[tuple] = set()
    for folder in folders:
        for r in json.loads((folder / "summary.json").read_text()):
            key = (r["seed"], r["scenario"], r["run"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the seeds' runs (finished ones are kept) and print one JSON line per run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="results/async_runs")
    p.add_argument("--async-rounds", type=int, default=15)
    p.add_argument(
        "--epoch-seconds",
        type=float,
        default=0.0,
        help="training.epoch_seconds: emulate one device per node, each local epoch lasting "
        "slowdown x this many seconds (0: as fast as the shared cores allow)",
    )
    p.add_argument(
        "--clustering-until",
        type=int,
        default=2,
        help="clustering.until in every run (the partition agreed in that round is kept)",
    )
    p.add_argument(
        "--staleness",
        nargs="+",
        default=["1", "2", "-1"],
        help="the max_staleness values of the asynchronous runs with a straggler (-1: unbounded)",
    )
    p.add_argument(
        "--even-staleness",
        default="1",
        help="the max_staleness of the asynchronous run without a straggler (-1: unbounded)",
    )
    p.add_argument(
        "--catch-up",
        type=int,
        default=0,
        help="federation.catch_up of the asynchronous runs (0: off): a node that many rounds "
        "behind its most advanced neighbour catches up (see --catch-up-train)",
    )
    p.add_argument(
        "--catch-up-train",
        choices=("epochs", "head", "features"),
        default="epochs",
        help="federation.catch_up_train with --catch-up: a node behind trains one local epoch "
        "per round (epochs), its private head alone (head), or its head alone on the frozen "
        "backbone's stored features (features)",
    )
    p.add_argument(
        "--first-round",
        choices=("grouped", "local"),
        default="grouped",
        help="federation.first_round of the asynchronous runs with a straggler: round 1 waits "
        "for the first partition (grouped) or runs without groups (local)",
    )
    p.add_argument(
        "--staleness-decay",
        type=float,
        default=None,
        help="federation.staleness_decay of the asynchronous runs (default: the config's, 0.5)",
    )
    p.add_argument(
        "--leader-stand-in",
        action="store_true",
        help="federation.leader_stand_in = true in the asynchronous runs: a member whose leader "
        "has not trained the round computes the cross-group update itself, else waits for the "
        "leader's update of that round; group deltas from the round's versions only",
    )
    p.add_argument(
        "--lockstep-deadline",
        action="store_true",
        help="federation.lockstep_deadline = true in the asynchronous runs: in round 1 (whose "
        "partition waits for every node) a node stops training once every neighbour has posted",
    )
    p.add_argument(
        "--scenarios",
        nargs="+",
        choices=tuple(SLOW_NODE),
        default=["slow", "even"],
        help="which scenarios to run: slow (an attributes node 3x slower), slow_landmarks "
        "(a landmarks node 3x slower), even (none); default slow and even",
    )
    p.add_argument(
        "--table",
        nargs="*",
        metavar="DIR",
        default=None,
        help="print the tables only: of --out's summary.json, or of those of the folders given "
        "(pooled; a seed, scenario and run found twice is taken from the first folder)",
    )
    args = p.parse_args(argv)
    folder = Path(args.out)
    if args.table is not None:
        print(tables(pooled_summaries([Path(d) for d in args.table] or [folder])))
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    common = [
        f"clustering.until={args.clustering_until}",
        f"training.epoch_seconds={args.epoch_seconds}",
    ]
    how = args.catch_up_train if args.catch_up else "epochs"
    rows = []
    for seed in args.seeds:
        for scenario in args.scenarios:
            cfg = config(folder, scenario)
            slow = SLOW_NODE[scenario] is not None
            base = [*common, f"run.seed={seed}"]
            sync = folder / f"{scenario}_sync_s{seed}.h5"
            run(cfg, sync, base)
            ref = load(sync)
            curve = group_curve(ref)
            target = curve[-1][1]
            budget = wall(ref)
            variants = [("sync", sync, ref)]
            stalenesses = args.staleness if slow else [args.even_staleness]
            for s in stalenesses:
                tail = f"_c{args.catch_up}" if args.catch_up else ""
                tail += {"epochs": "", "head": "h", "features": "f"}[how]
                local = slow and args.first_round == "local"
                tail += "_l" if local else ""
                tail += "_d" if args.lockstep_deadline else ""
                tail += "_si" if args.leader_stand_in else ""
                decay = args.staleness_decay
                tail += f"_decay{decay:g}" if decay is not None else ""
                out = folder / f"{scenario}_async{s}{tail}_s{seed}.h5"
                sets = [*base, "federation.mode=async", f"federation.max_staleness={s}"]
                sets += [f"federation.catch_up={args.catch_up}"] if args.catch_up else []
                sets += [f"federation.catch_up_train={how}"] if how != "epochs" else []
                sets += ["federation.first_round=local"] if local else []
                sets += ["federation.lockstep_deadline=true"] if args.lockstep_deadline else []
                sets += ["federation.leader_stand_in=true"] if args.leader_stand_in else []
                sets += [f"federation.staleness_decay={decay}"] if decay is not None else []
                if slow:
                    sets += [f"training.rounds={args.async_rounds}"]
                    sets += [f"federation.time_budget={budget:.1f}"]
                run(cfg, out, sets)
                name = f"async S={'inf' if s == '-1' else s}"
                name += f", catch-up {args.catch_up}" if args.catch_up else ""
                name += f" ({how})" if how != "epochs" else ""
                name += ", first round local" if local else ""
                name += ", lock-step deadline" if args.lockstep_deadline else ""
                name += ", leader stand-in" if args.leader_stand_in else ""
                name += f", decay {decay:g}" if decay is not None else ""
                variants.append((name, out, load(out)))
            for name, _, d in variants:
                c = group_curve(d)
                st = d["async/staleness"]
                finite = st[~np.isnan(st)]
                rounds_done = (~np.isnan(d["round/clock"])).sum(axis=0).tolist()
                sent = np.where(np.isnan(d["round/clock"]), np.nan, d["round/bytes_sent"])
                rows.append(
                    {
                        "seed": seed,
                        "scenario": scenario,
                        "run": name,
                        "wall_s": wall(d),
                        "to_target_s": time_to(c, target),
                        "to_target_ratio": time_to(c, target) / budget,
                        "group_ratio": {g: time_to(c, target, (g,)) / budget for g in GROUPS},
                        "target": target,
                        "at_0.6": at(c, 0.6 * budget),
                        "final": c[-1][1],
                        "rounds_per_node": rounds_done,
                        "staleness_hist": histogram(finite),
                        "staleness_per_node": [
                            histogram(st[:, i][~np.isnan(st[:, i])]) for i in range(st.shape[1])
                        ],
                        "node_labels": [
                            f"{i} {t}" + (f" ({s:g}x)" if s != 1 else "")
                            for i, (t, s) in enumerate(zip(d["task"], d["slowdown"], strict=True))
                        ],
                        "bytes_per_node_round": float(np.nanmean(sent)),
                        "pace_overruns": overruns(d),
                        "ari_first": float(d["clustering/ari"][0]),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    # rows of earlier invocations into the same folder (other variants) are kept
    summary = folder / "summary.json"

    def key(row: dict) -> tuple:
        return row["seed"], row["scenario"], row["run"]

    fresh = {key(r) for r in rows}
    kept = (
        [r for r in json.loads(summary.read_text()) if key(r) not in fresh]
        if summary.is_file()
        else []
    )
    summary.write_text(json.dumps(kept + rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
