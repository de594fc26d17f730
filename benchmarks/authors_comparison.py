"""Our run against the ColNet authors' single-process code, on the same machine and the same work.

The authors' public experiment code trains the six CIFAR-10 clients (3 animals, 3 objects) one
after the other in one Python process, averages the backbones inside each task group and combines
the two groups with HCA through a fixed leader (groups fixed by the config). This script runs
that code and ours on the same CIFAR-10 files, end to end (process start to exit), and prints
the wall time of each, their ratio, and the peak memory of all processes together.

The same work: 6 nodes (animals / objects), full-width ResNet-18, BL-1, batch 64, SGD, the
same 80/20 train / validation split of each group's images, validation every local epoch,
``--rounds`` rounds of ``--epochs`` local epochs, test metrics once at the end. Ours runs
``federation.grouping = "tasks"`` (the true groups, fixed, as theirs) with the ``colnet``
scheme (FedAvg in the groups, HCA across them; rotating leaders) and
``run.evaluate_every = --rounds``. Theirs skips the aggregation of its last round; ours
aggregates in every round, so ours does slightly more. Both write a checkpoint of every node
every round (theirs as part of its algorithm, ours by default).

Memory: the peak over the run of the summed PSS of the process and all its descendants
(``/proc/PID/smaps_rollup``, sampled every 0.2 s): shared library pages count once, so six
ranks are not charged six times for the same torch.

    python benchmarks/fake_cifar10.py /tmp/fakecifar --per-class 50
    git clone <the authors' code> /tmp/authors/code     # holds src/run.py
    python benchmarks/authors_comparison.py --authors /tmp/authors/code --data /tmp/fakecifar \\
        --authors-python /tmp/authors/venv/bin/python

``--authors-python`` is an interpreter with the authors' dependencies (torch, torchvision,
torchmetrics, tqdm, pyyaml, pandas, matplotlib, scipy). Their data loader verifies the official
files' checksums; with fabricated files (``fake_cifar10.py``) pass ``--fabricated`` and the
check is skipped in their process (nothing else of their code is changed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from colnet_mpi.bench import memory_now, process_tree

ROOT = Path(__file__).resolve().parents[1]

AUTHORS_CONFIG = """general:
  title: comparison
  dataset: cifar10
  intra_communication: FedPer
  cross_communication: HCA
  rounds: {rounds}
  result_folder: {results}
  result_sub_folder: cifar-10
  seed: 1
  backbone_layers: minus1
setup:
  dataset_fraction: 1
  hca_alpha: 0.4
  tasks:
    - task: Animals
      epochs: {epochs}
      clients: [AN_Cifar10_C0, AN_Cifar10_C1, AN_Cifar10_C2]
    - task: Objects
      epochs: {epochs}
      clients: [OB_Cifar10_C0, OB_Cifar10_C1, OB_Cifar10_C2]
"""

# Runs the authors' src/run.py as __main__; with --fabricated, torchvision's comparison of the
# files against the official checksums is replaced by "present".
LAUNCH = """
import runpy, sys
if {fabricated}:
    import torchvision.datasets.cifar as c
    c.check_integrity = lambda *args, **kwargs: True
    c.CIFAR10._check_integrity = lambda self: True
sys.argv = ["run.py", "--configs_folder", {folder!r}, "--configs", "comparison.yml"]
sys.path.insert(0, {src!r})
runpy.run_path({script!r}, run_name="__main__")
"""


def _pss_mb(pids: list[int]) -> float:
    """Summed PSS of ``pids`` in MB (processes that are gone count nothing)."""
    return sum(p for p in (memory_now(pid)[0] for pid in pids) if p == p) / 2**20


def timed(cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd``; wall seconds, exit code and the peak summed PSS of its process tree."""
    peak = [0.0]
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _pss_mb(process_tree(proc.pid)))
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        seconds = time.perf_counter() - t0
        stop.set()
        sampler.join()
    return {"seconds": seconds, "rc": rc, "peak_pss_mb": peak[0], "log": str(log)}


def run_authors(args: argparse.Namespace, work: Path) -> dict:
    """Their code, one process, in ``work`` (its ./data points at the CIFAR-10 tree)."""
    code = args.authors.resolve()
    script = code / "src" / "run.py"
    if not script.is_file():
        raise SystemExit(f"--authors {str(code)!r}: no src/run.py there (a checkout of their code)")
    (work / "data").symlink_to(args.data.resolve())
    config = AUTHORS_CONFIG.format(
        rounds=args.rounds, epochs=args.epochs, results=str(work / "results")
    )
    (work / "comparison.yml").write_text(config)
    launch = LAUNCH.format(
        fabricated=bool(args.fabricated),
        folder=str(work),
        src=str(code / "src"),
        script=str(script),
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return timed([args.authors_python, "-c", launch], work, work / "authors.log", env)


def run_ours(args: argparse.Namespace, work: Path) -> dict:
    """Ours: one rank per node under mpiexec."""
    sets = [
        f"data.root={args.data.resolve()}",
        f"training.rounds={args.rounds}",
        f"training.local_epochs={args.epochs}",
        "federation.grouping=tasks",
        f"run.evaluate_every={args.rounds}",
        *args.set,
    ]
    cmd = [args.mpiexec, "-n", str(args.ranks), sys.executable, "-m", "colnet_mpi", "run"]
    cmd += [str(ROOT / "configs" / "cifar10_label_het.toml"), "--out", str(work / "ours.h5")]
    for s in sets:
        cmd += ["--set", s]
    return timed(cmd, work, work / "ours.log")


def main() -> None:
    """Parse the command line, run both and print the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--authors", type=Path, help="a checkout of the authors' code (src/run.py)")
    p.add_argument("--authors-python", default=sys.executable, help="interpreter for their code")
    p.add_argument("--data", type=Path, required=True, help="folder holding cifar-10-batches-py")
    p.add_argument("--fabricated", action="store_true", help="the files are not the official ones")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--ranks", type=int, default=6)
    p.add_argument("--mpiexec", default=shutil.which("mpiexec") or "mpiexec")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more config override for our run (repeatable), e.g. run.host_slots=1",
    )
    p.add_argument("--skip", choices=("ours", "authors"), help="run only the other one")
    p.add_argument(
        "--keep",
        type=Path,
        help="keep logs and outputs here (default: a temporary folder, deleted after a "
        "successful run and kept after a failed one)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    if not (args.data / "cifar-10-batches-py").is_dir():
        p.error(f"--data {str(args.data)!r} holds no cifar-10-batches-py folder")
    if args.skip != "authors" and args.authors is None:
        p.error("--authors is needed unless --skip authors")
    for name in ("rounds", "epochs", "ranks"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)} is not allowed; use 1 or more")
    base = args.keep or Path(tempfile.mkdtemp(prefix="colnet_vs_authors_"))
    figures: dict[str, dict] = {}
    for who, runner in (("authors", run_authors), ("ours", run_ours)):
        if args.skip == who:
            continue
        work = base / who
        work.mkdir(parents=True, exist_ok=True)
        figures[who] = runner(args, work)
        if figures[who]["rc"] != 0:
            raise SystemExit(f"{who} run failed (exit {figures[who]['rc']}); see {work}")
    if args.keep is None:  # a successful run's outputs (checkpoints: 0.5 GB) are not kept
        shutil.rmtree(base, ignore_errors=True)
        for f in figures.values():
            f.pop("log")
    if "ours" in figures and "authors" in figures:
        figures["ratio"] = {
            "seconds": figures["ours"]["seconds"] / figures["authors"]["seconds"],
            "peak_pss": figures["ours"]["peak_pss_mb"] / figures["authors"]["peak_pss_mb"],
        }
    if args.json:
        print(json.dumps(figures, indent=1))
        return
    print(
        f"{args.rounds} rounds x {args.epochs} local epochs, 6 nodes, "
        f"data {args.data} ({'fabricated' if args.fabricated else 'as given'})"
    )
    for who in ("authors", "ours"):
        if who in figures:
            f = figures[who]
            print(
                f"  {who:8s} {f['seconds']:8.1f} s end to end, "
                f"peak PSS of all processes {f['peak_pss_mb']:8.0f} MB"
            )
    if "ratio" in figures:
        r = figures["ratio"]
        print(f"  ours / authors: time {r['seconds']:.2f}x, peak memory {r['peak_pss']:.2f}x")


if __name__ == "__main__":
    main()
