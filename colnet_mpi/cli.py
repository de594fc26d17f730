"""Command line: ``colnet-mpi run CONFIG`` under mpiexec/srun; any uncaught error aborts the whole job."""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from colnet_mpi.config import Config
    from colnet_mpi.federation.resume import ResumePoint

EXIT_BAD_INPUT = 2


#: Commands whose parsers need no heavy imports (``report`` brings in scikit-learn).
_LIGHT_COMMANDS = ("run", "check-config", "sweep")


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (its first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; given a light ``command``, without the parsers of the others
    that would import heavy libraries (so that ``run`` and ``check-config`` start fast)."""
    p = argparse.ArgumentParser(
        prog="colnet-mpi",
        description="ColNet decentralized federated multi-task learning: one MPI rank per node.",
    )
    from colnet_mpi import __version__

    p.add_argument("--version", action="version", version=f"colnet-mpi {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run an experiment (launch with mpiexec -n <nodes> or srun, one rank per node)",
        description="Run one experiment. Launch with as many MPI ranks as the config has nodes.",
    )
    run.add_argument("config", help="TOML experiment config")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable), e.g. --set training.rounds=10",
    )
    run.add_argument("--out", help="results file (default: run.output, else results/<run.name>.h5)")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="start over on an existing results file, which is kept renamed to "
        "<name>.replaced-<time>.h5 (with --resume: only if it cannot be resumed)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the results file from its last checkpoint; the config may "
        "differ only in paths, training.rounds and run.checkpoint_every",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config, world size, data and models on every rank, then stop before training",
    )
    run.add_argument(
        "--quiet", action="store_true", help="print only the final line (and errors), no progress"
    )
    check = sub.add_parser(
        "check-config", help="validate a config (no MPI needed) and print it resolved"
    )
    check.add_argument("config")
    check.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"
    )
    # Subcommands that live in their own modules register their parser and set ``func``.
    from colnet_mpi import bench, sweep

    sweep.add_parser(sub)
    bench.add_parser(sub)
    if command not in _LIGHT_COMMANDS:
        from colnet_mpi.metrics import report

        report.add_parser(sub)
    return p


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _say(msg: str) -> None:
    print(msg, flush=True)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a config without MPI and print the resolved TOML."""
    from colnet_mpi.config import ConfigError, load_config, to_toml

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"colnet-mpi: invalid config: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(to_toml(config))
    print(f"# needs {config.world_size} MPI ranks", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace, state: dict[str, object] | None = None) -> int:
    """The ``run`` command on one rank.

    ``state`` (``colnet-mpi bench``) may hold ``"after_run"``: a callable given the finished
    :class:`~colnet_mpi.federation.loop.Federation` on every rank while its communicators are
    still alive, and ``"memory_now"``: a callable returning (PSS, USS) in bytes, whose USS after
    the imports and before the data is kept as ``"uss_after_imports"``; ``"setup_seconds"`` is
    set to the time from here to round 1, ``"round_1_at"`` to the wall-clock time at which
    round 1 starts.
    """
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    state = {} if state is None else state
    state["output"] = None
    try:
        return _run(args, state)
    except BaseException as err:  # noqa: BLE001 - every rank must take the whole job down
        if isinstance(err, SystemExit):  # a collective, already agreed stop (bad input)
            raise
        import socket

        output = state.get("output")
        message = (
            f"colnet-mpi: rank {rank} of {world.Get_size()} on {socket.gethostname()} failed: "
            f"{_describe_failure(err, output)}"
        )
        # A full disk is the machine's state, and a silent peer is named by the watchdog, not a
        # bug here: one message, no traceback.
        from colnet_mpi.comm.watchdog import WatchdogTimeout

        plain = _disk_full(err) or isinstance(err, WatchdogTimeout)
        text = message if plain else message + "\n" + traceback.format_exc()
        sys.stderr.write(text.rstrip("\n") + "\n")
        sys.stderr.flush()
        if output is not None:
            from colnet_mpi.metrics.writer import mark_failed

            mark_failed(str(output), text)
            if rank != 0:  # rank 0 dies with the job, perhaps before it can drop its lock
                from colnet_mpi.metrics.lock import abandon_for_job

                abandon_for_job(str(output))
        _release_lock(state)
        world.Abort(1)
        return 1  # pragma: no cover - Abort does not return
    finally:
        _release_lock(state)  # every way out of a run on the writer rank


def _release_lock(state: dict[str, object]) -> None:
    """Drop the writer rank's lock of the results file, if it holds one."""
    lock = state.pop("lock", None)
    if lock is not None:
        from colnet_mpi.metrics.lock import OutputLock

        assert isinstance(lock, OutputLock)
        lock.release()


def _disk_full(err: BaseException) -> bool:
    """Whether ``err`` is a write that failed for want of space (errno or HDF5's message)."""
    if not isinstance(err, OSError):
        return False
    text = str(err)
    return err.errno == errno.ENOSPC or "No space left on device" in text or "errno = 28" in text


def _describe_failure(err: BaseException, output: object) -> str:
    """The failure in one line; a full disk names the file it could not write."""
    if _disk_full(err):
        assert isinstance(err, OSError)
        where = err.filename or output or "the results file"
        return (
            f"disk full: cannot write {str(where)!r}: no space left on device "
            "(free some space, then continue the run with --resume)"
        )
    return f"{type(err).__name__}: {err}"


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the run creates the folders below it)."""
    while not (path.exists() or path.is_symlink()) and path != path.parent:
        path = path.parent
    return path


def _folder_problem(folder: Path, shown: str) -> str | None:
    """Why files cannot be created in ``folder`` (or in the folders the run would make there);
    ``shown`` names what is written, for the message. Tries a temporary file, removed at once."""
    base = _nearest_existing(folder)
    if not base.is_dir():
        kind = "a file" if base.is_file() else "not a folder"
        return f"{shown} is under {str(base)!r}, which is {kind}; choose a path in a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".colnet-write-test-", dir=base)
    except OSError as err:
        return (
            f"{shown} cannot be written: the folder {str(base)!r} is not writable "
            f"({err.strerror or err}); choose another path"
        )
    os.close(fd)
    os.unlink(probe)
    return None


def _nothing_to_resume(output: Path) -> str:
    return f"nothing to resume: {str(output)!r} does not exist (drop --resume)"


def output_problem(
    output: Path, config: Config, *, resume: bool, overwrite: bool, source: str
) -> str | None:
    """Why the run could not write its results file ``output`` or its checkpoints (None if it
    can); ``source`` says where the path came from. Torch-free and leaves nothing behind;
    whether an existing file may be replaced or resumed is :func:`_resume_decision`'s part."""
    shown = f"output {str(output)!r} ({source})"
    if resume and not overwrite and not output.parent.is_dir():
        # no run can hold a lock in a missing folder; taking one would create the folder
        return _nothing_to_resume(output)
    if output.is_dir():
        return f"{shown} is a directory; give the path of a results file, e.g. {output}/run.h5"
    if output.exists() and not output.is_file():
        return f"{shown} exists and is not a regular file; choose another path"
    problem = _folder_problem(output.parent, shown)
    if problem is None and resume and output.is_file() and not os.access(output, os.W_OK):
        problem = f"{shown} is read-only; --resume appends to it"
    if problem is None and config.run.checkpoint_dir and config.run.checkpoint_every:
        folder = Path(config.run.checkpoint_dir)
        shown = f"run.checkpoint_dir = {config.run.checkpoint_dir!r}"
        if folder.exists() and not folder.is_dir():
            return f"{shown} exists and is not a folder; choose another path"
        problem = _folder_problem(folder, shown)
    return problem


def _lock_problem(output: Path) -> str | None:
    """For a dry run, which takes no lock: whether a live run holds ``output`` (read only)."""
    from colnet_mpi.metrics.lock import Holder, lock_path, read_holder, stale_reason

    holder = read_holder(lock_path(output))
    if holder is None or stale_reason(holder, Holder.me()):
        return None
    return (
        f"{str(output)!r} is in use by another run ({holder.describe()}); the run would be "
        f"refused; wait for it to end, or, if it is gone, remove {str(lock_path(output))!r}"
    )


def use_deterministic_algorithms() -> None:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` without importing torch's
    compiler: the public function also sets the flag of ``torch._inductor``'s config, and that
    import loads ``torch._dynamo`` and sympy (about 80 MB per rank and a second of start-up) for
    a package that never compiles. The flag eager kernels read is the same; should torch drop
    the internal setter, the public function is used.
    """
    import torch

    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None or "torch._inductor" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        setter(True, warn_only=True)


def _run(args: argparse.Namespace, state: dict[str, object]) -> int:
    # Only what the start-up checks need is imported here: a refused run never waits for torch.
    from colnet_mpi.comm.topology import Topology, agree
    from colnet_mpi.config import ConfigError, load_config

    t0 = time.perf_counter()
    config = None
    error: str | None = None
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        error = f"invalid config: {err}"
    timeout = config.federation.timeout if config else "auto"
    topology = Topology(
        kind=config.federation.topology if config else "full",
        degree=config.federation.degree if config else 4,
        seed=config.run.seed if config else 0,
        timeout=None if timeout == "auto" else float(timeout),
    )
    world, rank, size = topology.world, topology.rank, topology.size

    def stop_if_any(err: str | None) -> None:
        failures = agree(world, err, topology.watchdog)
        if failures:
            who, msg = failures[0]
            if rank == 0:
                print(
                    f"colnet-mpi: {msg}" + (f" (reported by rank {who})" if size > 1 else ""),
                    file=sys.stderr,
                    flush=True,
                )
            topology.free()
            raise SystemExit(EXIT_BAD_INPUT)

    stop_if_any(error)
    assert config is not None
    log = _say if (rank == 0 and not args.quiet) else (lambda _msg: None)
    if size != config.world_size:
        error = (
            f"world size {size} does not match the config's {config.world_size} nodes; launch with "
            f"mpiexec -n {config.world_size} (or srun --ntasks={config.world_size})"
        )
    output = Path(args.out) if args.out else config.run.output_path()
    point = None
    if error is None and rank == 0:
        # The same checks with and without --dry-run, so that a dry run that passes means a run
        # that starts. Nothing is written here except the lock of a real run.
        source = "--out" if args.out else "run.output" if config.run.output else "from run.name"
        error = output_problem(
            output, config, resume=args.resume, overwrite=args.overwrite, source=source
        )
        if error is None and args.dry_run:
            error = _lock_problem(output)
        elif error is None:
            # One run per output: the lock comes first, so that a second run neither reads
            # (--resume) nor replaces (--overwrite) the file of a running one.
            from colnet_mpi.metrics.lock import LockHeld, acquire

            try:
                state["lock"] = acquire(output, log=_say)
            except LockHeld as err:
                error = str(err)
        if error is None:
            point, error = _resume_decision(args, config, output, size, log)
    stop_if_any(error)
    plan = _share_resume(world, point, size, topology.watchdog)
    if plan is None:
        log(f"{output}: finished with all {config.training.rounds} rounds; nothing to resume")
        topology.free()
        return 0

    import torch

    import colnet_mpi
    from colnet_mpi.comm.topology import mpi_library
    from colnet_mpi.config import to_toml
    from colnet_mpi.federation.checkpoint import (
        Checkpointer,
        CheckpointError,
        restore_checkpoint,
    )
    from colnet_mpi.federation.loop import Federation
    from colnet_mpi.federation.stop import EXIT_PREEMPTED, Preempted, StopRequest
    from colnet_mpi.metrics.writer import ResultsWriter, now_iso
    from colnet_mpi.node import Node, keep_heap_between_steps

    memory_now = state.get("memory_now")
    if callable(memory_now):  # the bench: what a rank holds before its data and model exist
        state["uss_after_imports"] = memory_now()[1]
    # Per-rank resources: threads from the CPUs this rank was given, GPU from the node-local rank.
    torch.set_num_threads(topology.cpus_for_rank(config.run.host_slots))
    if config.run.keep_heap:
        keep_heap_between_steps()
    if torch.cuda.is_available():
        device = torch.device("cuda", topology.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if config.run.deterministic:
        use_deterministic_algorithms()

    log(
        f"colnet-mpi: {size} ranks up after {time.perf_counter() - t0:.1f}s; building every "
        f"rank's data shard and model ({config.data.dataset}, width {config.model.width})"
    )
    node = None
    try:
        node = Node(config, rank, device)
    except (ValueError, OSError, FileNotFoundError) as err:
        error = f"rank {rank} could not build its node: {err}"
    stop_if_any(error)
    assert node is not None
    hosts = topology.hostnames()
    slots = config.run.host_slots
    log(
        f"colnet-mpi {colnet_mpi.__version__}: {size} nodes, scheme={config.federation.scheme}, "
        f"dataset={config.data.dataset}, width={config.model.width}, BL-{config.model.privatization}, "
        f"{config.training.rounds} rounds x {config.training.local_epochs} epochs, device={device.type}, "
        f"threads/rank={torch.get_num_threads()}, {len(set(hosts))} host(s), "
        + (f"{slots} rank(s) of a host computing at once, " if slots else "")
        + f"backbone {node.flat.numel:,} values ({node.flat.nbytes / 2**20:.1f} MiB)"
    )
    if args.dry_run:
        log(
            f"dry run: config, world size, data and models are fine (setup {time.perf_counter() - t0:.1f}s)"
        )
        topology.free()
        return 0

    writer = None
    federation = Federation(config, topology, node, None, log)
    start, directory, checksums = plan
    every = config.run.checkpoint_every
    if every or start:
        federation.checkpoints = Checkpointer(
            directory or config.run.checkpoint_path(output).resolve(), rank, size
        )
    if start:
        try:
            restore_checkpoint(federation, start, checksums)
        except (CheckpointError, ValueError) as err:
            error = f"cannot resume {str(output)!r}: {err}"
        stop_if_any(error)
        log(f"resuming after round {start} from the checkpoint in {directory}")
    if rank == 0:
        writer = ResultsWriter(
            output,
            attrs={
                "config": to_toml(config),
                "version": colnet_mpi.__version__,
                "git_commit": _git_commit(),
                "mpi_library": mpi_library(),
                "world_size": size,
                "hostnames": ",".join(hosts),
                "torch_version": str(torch.__version__),
                "device": device.type,
                "transfer_path": federation.transport.path,
                "seed": config.run.seed,
                "scheme": config.federation.scheme,
                "command": " ".join(sys.argv),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            },
            node_names=[n.name for n in config.nodes],
            node_tasks=[n.task for n in config.nodes],
            true_groups=federation.true_groups,
            record_affinity=federation.record_affinity,
            overwrite=args.overwrite,
            resume_round=start or None,
        )
        federation.writer = writer
        state["output"] = output
        if writer.kept is not None:
            log(f"the earlier results file is kept as {writer.kept}")
    topology.watchdog.fence(world, "the results file to be created")
    if rank != 0:
        state["output"] = output
    federation.stop = StopRequest().install()
    state["setup_seconds"] = time.perf_counter() - t0
    state["round_1_at"] = time.time()
    try:
        federation.run(start + 1)
    except Preempted as why:
        if writer is not None:
            writer.add_checkpoint_seconds(federation.checkpoint_seconds)
            writer.set_attrs(status="preempted", finished=now_iso())
        saved = federation.saved_round
        saved_text = f"round {saved}" if saved else "none"
        log(f"stopped: {why}; last checkpoint: {saved_text}; continue with --resume")
        topology.free()
        return EXIT_PREEMPTED
    finally:
        federation.stop.uninstall()
    topology.watchdog.fence(world, "every rank to finish")
    if writer is not None:
        writer.add_checkpoint_seconds(federation.checkpoint_seconds)
        writer.finish()
        # the last line, printed with --quiet too
        _say(f"finished in {time.perf_counter() - t0:.1f}s; results: {output}")
    after = state.get("after_run")
    if callable(after):
        after(federation)
    topology.free()
    return 0


def _resume_decision(
    args: argparse.Namespace, config: Config, output: Path, size: int, log: Callable[[str], None]
) -> tuple[ResumePoint | str | None, str | None]:
    """On the writer rank: where to start. Returns ``(point, error)``; point is a
    :class:`ResumePoint`, ``"done"`` (nothing left to run) or None (a fresh run)."""
    from colnet_mpi.federation.resume import ResumeError, resume_point

    if not output.exists():
        if args.resume and not args.overwrite:
            return None, _nothing_to_resume(output)
        return None, None
    if not args.resume:
        if args.overwrite:
            return None, None
        return None, (
            f"output file {str(output)!r} already exists; pass --resume to continue it, "
            "--overwrite to replace it, or choose --out"
        )
    try:
        point = resume_point(output, config, size)
    except ResumeError as err:
        if args.overwrite:
            log(f"{err}; starting over (--overwrite)")
            return None, None
        return None, str(err)
    if point.status == "finished" and point.recorded_rounds >= config.training.rounds:
        return "done", None
    if point.round >= config.training.rounds:
        return None, (
            f"{str(output)!r} is checkpointed at round {point.round}; to continue it set "
            f"training.rounds above that (now {config.training.rounds})"
        )
    return point, None


def _share_resume(
    world: Any, point: Any, size: int, watchdog: Any = None
) -> tuple[int, str, np.ndarray | None] | None:
    """Broadcast the writer rank's decision: ``(start round, checkpoint folder, checksums)``,
    ``(0, "", None)`` for a fresh run, None when there is nothing to do (numeric buffers only)."""
    from colnet_mpi.comm.topology import bcast_ints, bcast_text

    mine = world.Get_rank() == 0 and point not in (None, "done")
    start = -1 if point == "done" else (point.round if mine else 0)
    start = int(bcast_ints(world, [start], watchdog=watchdog)[0])
    if start < 0:
        return None
    if start == 0:
        return 0, "", None
    sums = bcast_ints(world, point.checksums if mine else np.zeros(size), watchdog=watchdog)
    return start, bcast_text(world, point.directory if mine else "", watchdog=watchdog), sums


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``colnet-mpi`` console script."""
    words = sys.argv[1:] if argv is None else list(argv)
    args = _parser(_command(words)).parse_args(words)
    if args.command == "run":
        return cmd_run(args)
    try:
        if args.command == "check-config":
            return cmd_check_config(args)
        if hasattr(args, "func"):
            return int(args.func(args))
    except BrokenPipeError:  # e.g. `colnet-mpi sweep SPEC --list | head`: the reader left
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        return 0
    raise AssertionError(args.command)  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
