"""``colnet-mpi bench``: run a config under MPI and print where a round's time, bytes and memory go.

Launched like ``run`` (``mpiexec -n <nodes> colnet-mpi bench CONFIG``). It runs the experiment
(results into a temporary file unless ``--out`` is given), then, in the same job and with the same
communicators, times the backbone exchange as the federation does it (with its checks on arrival)
against a raw mpi4py exchange of the same bytes (Isend/Irecv to the same neighbours, and an
Allgather where every rank is a neighbour), and gathers each rank's peak resident memory.
Rank 0 prints per-stage seconds per round (mean rank and slowest rank), the overhead ratio
(round minus local training, over the round), training images per second, bytes per node and
round, the exchange throughputs and their ratio, the start-up time and peak RSS; ``--json``
prints the same figures as one JSON object for scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from colnet_mpi.federation.loop import Federation

EXIT_BAD_INPUT = 2
#: Stages as recorded in the results file (``round/seconds/<stage>``), "total" last.
BENCH_STAGES = (
    "local_train",
    "exchange",
    "clustering",
    "intra",
    "cross",
    "redistribute",
    "evaluate",
)
#: What the bench prints below the stages: the rest of the round (waiting for the slowest trainer).
OTHER_NOTE = "other = round - stages: chiefly faster ranks waiting for the slowest trainer"


def add_parser(sub: Any) -> None:
    """Register ``colnet-mpi bench``."""
    p = sub.add_parser(
        "bench",
        help="run a config and print per-stage time, overhead, throughput, bytes and memory",
        description=(
            "Run one experiment under MPI (launch like `run`: one rank per node) and print where "
            "the time of a round goes, the overhead ratio (round - local training) / round, "
            "training images/s, bytes per node and round, the exchange against a raw mpi4py "
            "exchange of the same bytes in the same job, start-up time and peak RSS per rank."
        ),
    )
    p.add_argument("config", help="TOML experiment config")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable), e.g. --set training.rounds=3",
    )
    p.add_argument(
        "--out",
        help="keep the results file here (replacing one that exists); default: a temporary "
        "file, deleted afterwards",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="leading rounds left out of the per-round figures (default 1: the first round pays "
        "for lazy initialisation); at least one round is always kept",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed repetitions of each exchange variant (default 5; the median is shown)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress lines from the run")
    p.set_defaults(func=main)


# ---------------------------------------------------------------------------------------------
# Measurements on every rank, after the run


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (``ru_maxrss``: KiB on Linux, B on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def memory_now(pid: int | str = "self") -> tuple[float, float]:
    """A process's (PSS, USS) now in bytes (this one by default; Linux; NaN elsewhere or when
    the process is gone). PSS, the proportional set
    size, counts shared pages (the libraries that every rank maps, such as torch's) once across
    the processes that share them, so the sum over the ranks of a host is the memory they really
    take; USS, the unique set size, is what this rank alone holds (private pages)."""
    fields: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Pss", "Private_Clean", "Private_Dirty"):
                fields[key] = float(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return math.nan, math.nan
    uss = fields.get("Private_Clean", math.nan) + fields.get("Private_Dirty", math.nan)
    return fields.get("Pss", math.nan), uss


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux, from /proc; the benchmarks that sample the
    memory of a whole launch use it)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


#: Libraries of some size that a run loads only when its config needs them (``torch._dynamo``:
#: torch's compiler, which its optimizers import unless bypassed); the bench names those a run
#: did load (each costs tens of MB per rank and start-up time).
OPTIONAL_LIBRARIES = ("sklearn", "PIL", "matplotlib", "pandas", "torchvision", "torch._dynamo")


def loaded_optional_libraries() -> list[str]:
    """The names in :data:`OPTIONAL_LIBRARIES` this process has imported."""
    return [name for name in OPTIONAL_LIBRARIES if name in sys.modules]


def process_started_at() -> float | None:
    """Wall-clock time at which this process started (Linux ``/proc``), or None elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        ticks = int(fields[19])  # starttime, field 22 of the whole line
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def time_exchanges(fed: Federation, repeats: int) -> dict[str, Any]:
    """Seconds of the federation's exchange and of raw mpi4py exchanges of the same bytes.

    Every variant runs ``repeats`` times after a fence; a repetition's time is the slowest rank's
    (the exchange is done when every rank has its buffers). Returns medians and byte counts.
    """
    import torch
    from mpi4py import MPI

    from colnet_mpi.comm.topology import floats_allgather

    topo, transport = fed.topology, fed.transport
    world, watchdog = topo.world, topo.watchdog
    numel = transport.last_exchange_numel or fed.node.flat.numel
    neighbours = topo.neighbours
    gen = torch.Generator().manual_seed(1234 + topo.rank)
    payload = torch.randn(numel, generator=gen).to(fed.node.device)
    wire = transport._wire(payload)
    inbox = [transport._empty(numel) for _ in neighbours]
    full = len(neighbours) == topo.size - 1
    gathered = transport._empty(topo.size, numel) if full else None

    def ours() -> None:
        transport.exchange(payload)

    def raw() -> None:
        reqs = [
            world.Irecv(transport._buf(b), source=s, tag=71)
            for b, s in zip(inbox, neighbours, strict=True)
        ]
        reqs += [world.Isend(transport._buf(wire), dest=d, tag=71) for d in neighbours]
        MPI.Request.Waitall(reqs)

    def allgather() -> None:
        assert gathered is not None
        world.Allgather(transport._buf(wire), transport._buf(gathered))

    variants = {"colnet": ours, "raw_p2p": raw}
    if full:
        variants["raw_allgather"] = allgather
    seconds: dict[str, float] = {}
    for name, fn in variants.items():
        times = []
        for _ in range(max(1, repeats)):
            watchdog.fence(world, f"the {name} exchange benchmark")
            t = time.perf_counter()
            fn()
            if payload.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        slowest = floats_allgather(world, times, watchdog=watchdog, what="exchange timings").max(0)
        seconds[name] = float(np.median(slowest))
    transport.reset_counters()
    received = numel * 4 * len(neighbours)
    return {
        "backbone_values": int(fed.node.flat.numel),
        "values_per_neighbour": int(numel),
        "neighbours": len(neighbours),
        "bytes_received_per_rank": int(received),
        "seconds": seconds,
        "transfer_path": transport.path,
        "shared_memory_neighbours": transport.shared_neighbours(),
    }


def measure(fed: Federation, state: dict[str, Any], repeats: int) -> dict[str, Any]:
    """What every rank contributes after the run (collective): RSS, sizes, start-up, exchanges."""
    from colnet_mpi.comm.topology import floats_allgather

    topo = fed.topology
    started = process_started_at()
    round_1_at = state.get("round_1_at")
    startup = (
        float(round_1_at) - started
        if started is not None and round_1_at is not None
        else float(state.get("setup_seconds", math.nan))
    )
    exchange = time_exchanges(fed, repeats)
    rows = floats_allgather(
        topo.world,
        [
            peak_rss_bytes(),
            fed.node.n_train,
            startup,
            *memory_now(),
            float(state.get("uss_after_imports", math.nan)),
        ],
        watchdog=topo.watchdog,
        what="every rank's memory and sizes",
    )
    return {
        "rss": rows[:, 0],
        "n_train": rows[:, 1],
        "startup": rows[:, 2],
        "pss": rows[:, 3],
        "uss": rows[:, 4],
        "uss_after_imports": rows[:, 5],
        "exchange": exchange,
        "optional_libraries": loaded_optional_libraries(),
    }


# ---------------------------------------------------------------------------------------------
# The figures, on rank 0


def _stats(per_round_rank: np.ndarray) -> dict[str, float]:
    """Seconds per round: mean over rounds of the mean rank and of the slowest rank."""
    return {
        "mean_rank": float(np.mean(per_round_rank.mean(axis=1))),
        "slowest_rank": float(np.mean(per_round_rank.max(axis=1))),
    }


def figures(path: Path, gathered: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Every figure of the report from the results file and the gathered measurements."""
    import h5py

    from colnet_mpi.config import config_from_toml

    with h5py.File(path, "r") as f:
        config = config_from_toml(str(f.attrs["config"]))
        secs = {s: f[f"round/seconds/{s}"][()] for s in (*BENCH_STAGES, "total")}
        sent = f["round/bytes_sent"][()]
        got = f["round/bytes_received"][()]
        world = int(f.attrs["world_size"])
        device = str(f.attrs["device"])
    rounds = secs["total"].shape[0]
    skip = min(max(warmup, 0), rounds - 1)
    keep = slice(skip, rounds)
    # what no stage timer holds: mostly the agreement on stop signals right after local
    # training, where the faster ranks wait for the slowest trainer
    secs["other"] = secs["total"] - sum(secs[s] for s in BENCH_STAGES)
    stages = {s: _stats(secs[s][keep]) for s in (*BENCH_STAGES, "other", "total")}
    total, train = stages["total"]["mean_rank"], stages["local_train"]["mean_rank"]
    t = config.training
    per_epoch = t.steps_per_epoch * t.batch_size if t.steps_per_epoch else gathered["n_train"]
    per_rank_train = secs["local_train"][keep].mean(axis=0)
    images = per_epoch * t.local_epochs / np.maximum(per_rank_train, 1e-12)
    ex = gathered["exchange"]
    recv = ex["bytes_received_per_rank"]
    throughput = {k: recv / v / 1e6 if v > 0 else math.nan for k, v in ex["seconds"].items()}
    rss, pss, uss = gathered["rss"], gathered["pss"], gathered["uss"]
    return {
        "config": config.run.name,
        "world_size": world,
        "device": device,
        "rounds": rounds,
        "rounds_measured": rounds - skip,
        "model_width": config.model.width,
        "stages_seconds_per_round": stages,
        "overhead_ratio": (total - train) / total if total > 0 else math.nan,
        "overhead_ratio_slowest_rank": (
            1.0 - stages["local_train"]["slowest_rank"] / stages["total"]["slowest_rank"]
            if stages["total"]["slowest_rank"] > 0
            else math.nan
        ),
        "train_images_per_second": {
            "mean_rank": float(np.mean(images)),
            "slowest_rank": float(np.min(images)),
            "total": float(np.sum(images)),
        },
        "bytes_per_node_round": {
            "sent": float(np.mean(sent[keep])),
            "received": float(np.mean(got[keep])),
        },
        "exchange": {
            **ex,
            "throughput_MB_per_s_per_rank": throughput,
            "colnet_vs_raw_p2p": ex["seconds"]["raw_p2p"] / ex["seconds"]["colnet"]
            if ex["seconds"]["colnet"] > 0
            else math.nan,
        },
        "startup_seconds": {
            "mean_rank": float(np.mean(gathered["startup"])),
            "slowest_rank": float(np.max(gathered["startup"])),
        },
        "peak_rss_bytes": {
            "mean_rank": float(np.mean(rss)),
            "max_rank": float(np.max(rss)),
            "total": float(np.sum(rss)),
        },
        "pss_bytes_at_end": {
            "mean_rank": float(np.mean(pss)),
            "max_rank": float(np.max(pss)),
            "total": float(np.sum(pss)),
        },
        "uss_bytes_at_end": {
            "mean_rank": float(np.mean(uss)),
            "max_rank": float(np.max(uss)),
            "total": float(np.sum(uss)),
        },
        # torch, MPI and this package imported; no data, model or results file yet
        "uss_bytes_after_imports": {
            "mean_rank": float(np.mean(gathered["uss_after_imports"])),
            "max_rank": float(np.max(gathered["uss_after_imports"])),
        },
        "optional_libraries_loaded": list(gathered["optional_libraries"]),
    }


def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f} MB"


def text(fig: dict[str, Any], config_path: str) -> str:
    """The human-readable report."""
    st = fig["stages_seconds_per_round"]
    total = st["total"]["mean_rank"]
    lines = [
        f"colnet-mpi bench: {config_path} on {fig['world_size']} ranks ({fig['device']}), "
        f"width {fig['model_width']}; per-round figures over {fig['rounds_measured']} of "
        f"{fig['rounds']} rounds",
        "",
        f"{'stage':<14}{'mean rank s':>13}{'slowest rank s':>16}{'share':>8}",
    ]
    for s in (*BENCH_STAGES, "other", "total"):
        share = st[s]["mean_rank"] / total if total > 0 else math.nan
        lines.append(
            f"{s:<14}{st[s]['mean_rank']:>13.3f}{st[s]['slowest_rank']:>16.3f}{share:>8.1%}"
        )
    lines.append(f"({OTHER_NOTE})")
    img = fig["train_images_per_second"]
    b = fig["bytes_per_node_round"]
    ex = fig["exchange"]
    sec, thr = ex["seconds"], ex["throughput_MB_per_s_per_rank"]
    raw_line = (
        f"  raw Allgather        {sec['raw_allgather']:.4f} s  ({thr['raw_allgather']:,.0f} MB/s per rank)"
        if "raw_allgather" in sec
        else "  raw Allgather        - (not every rank is a neighbour)"
    )
    rss, pss, uss = fig["peak_rss_bytes"], fig["pss_bytes_at_end"], fig["uss_bytes_at_end"]
    lines += [
        "",
        f"overhead (round - local training) / round: {fig['overhead_ratio']:.1%} "
        f"(slowest rank: {fig['overhead_ratio_slowest_rank']:.1%})",
        f"training images/s: {img['mean_rank']:,.1f} per rank (slowest {img['slowest_rank']:,.1f}), "
        f"{img['total']:,.1f} in all",
        f"bytes per node and round: sent {_mb(b['sent'])}, received {_mb(b['received'])}",
        f"exchange of {_mb(ex['values_per_neighbour'] * 4)} with each of {ex['neighbours']} "
        f"neighbours ({ex['transfer_path']} path, {ex['shared_memory_neighbours']} of them "
        f"through shared memory; backbone {ex['backbone_values']:,} values), "
        "median of the slowest rank:",
        f"  colnet (checked)     {sec['colnet']:.4f} s  ({thr['colnet']:,.0f} MB/s per rank)",
        f"  raw Isend/Irecv      {sec['raw_p2p']:.4f} s  ({thr['raw_p2p']:,.0f} MB/s per rank)",
        raw_line,
        f"  colnet / raw Isend/Irecv throughput: {ex['colnet_vs_raw_p2p']:.0%}",
        f"start-up (process start to round 1): {fig['startup_seconds']['mean_rank']:.1f} s mean rank, "
        f"{fig['startup_seconds']['slowest_rank']:.1f} s slowest",
        f"peak RSS: {_mb(rss['mean_rank'])} mean rank, {_mb(rss['max_rank'])} largest, "
        f"{_mb(rss['total'])} all ranks (shared library pages counted in every rank)",
        f"PSS at the end: {_mb(pss['mean_rank'])} mean rank, {_mb(pss['max_rank'])} largest, "
        f"{_mb(pss['total'])} all ranks (shared pages counted once)",
        f"USS at the end: {_mb(uss['mean_rank'])} mean rank, {_mb(uss['max_rank'])} largest "
        "(what a rank alone holds)",
        f"USS after imports (interpreter, torch, MPI): "
        f"{_mb(fig['uss_bytes_after_imports']['mean_rank'])} mean rank; optional libraries "
        f"loaded: {', '.join(fig['optional_libraries_loaded']) or 'none'}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def main(args: argparse.Namespace) -> int:
    """Run ``colnet-mpi bench`` on one rank."""
    from mpi4py import MPI

    from colnet_mpi import cli
    from colnet_mpi.comm.topology import bcast_text

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    state: dict[str, Any] = {"memory_now": memory_now}
    if args.repeats < 1 or args.warmup < 0:
        if rank == 0:
            bad = f"--repeats {args.repeats}" if args.repeats < 1 else f"--warmup {args.warmup}"
            print(
                f"colnet-mpi bench: {bad} is not allowed: --repeats must be at least 1 and "
                "--warmup at least 0",
                file=sys.stderr,
            )
        return EXIT_BAD_INPUT
    scratch = None
    out = args.out
    if out is None:
        chosen = ""
        if rank == 0:
            scratch = tempfile.mkdtemp(prefix="colnet-bench-")
            chosen = str(Path(scratch) / "bench.h5")
        out = bcast_text(world, chosen)
    gathered: dict[str, Any] = {}

    def after_run(fed: Federation) -> None:
        gathered.update(measure(fed, state, args.repeats))

    state["after_run"] = after_run
    run_args = argparse.Namespace(
        config=args.config,
        overrides=args.overrides,
        out=out,
        overwrite=True,
        resume=False,
        dry_run=False,
        quiet=args.quiet or args.json,
    )
    try:
        # with --json, stdout carries the JSON object only: the run's lines go to stderr
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            code = cli.cmd_run(run_args, state)
        if code != 0 or rank != 0:
            return code
        fig = figures(Path(out), gathered, args.warmup)
        if args.out is None:
            fig["results_file"] = None
        else:
            fig["results_file"] = str(out)
        print(json.dumps(fig, indent=2) if args.json else text(fig, args.config), flush=True)
        return 0
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
