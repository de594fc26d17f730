"""Clustering accuracy per round: default (resemblance) vs the paper's literal signals, K given
vs K = "auto", on the three embedded scenarios, over seeds. Runs what is missing, then prints a
markdown report (ARI per round, mean and minimum over seeds, and the K found).

    python benchmarks/clustering_study.py results/clustering_runs [--seeds 5] [--only-report]

Each run is ``mpiexec -n N colnet-mpi run CONFIG --set run.seed=S --set clustering.signals=...``;
finished results files are reused, so the study can be stopped and started again.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from colnet_mpi.metrics.reader import load_run

ROOT = Path(__file__).resolve().parents[1]

#: scenario -> (config, ranks, true number of groups)
SCENARIOS = {
    "quickstart (faces, task het.)": ("configs/quickstart.toml", 6, 2),
    "digits (label het., 2 groups)": ("configs/digits_label_het.toml", 6, 2),
    "digits, 3 groups": ("configs/digits_three_groups.toml", 9, 3),
}
SIGNALS = ("resemblance", "paper")
KS = ("given", "auto")


def out_path(folder: Path, scenario: str, signals: str, k: str, seed: int) -> Path:
    """The results file of one run."""
    config = Path(SCENARIOS[scenario][0]).stem
    return folder / f"{config}_{signals}_k{k}_s{seed}.h5"


def run_one(folder: Path, scenario: str, signals: str, k: str, seed: int) -> Path:
    """Run one setting under mpiexec unless its finished file is there."""
    config, ranks, _ = SCENARIOS[scenario]
    out = out_path(folder, scenario, signals, k, seed)
    if out.exists() and load_run(out).status == "finished":
        return out
    cmd = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "colnet_mpi", "run", config]
    cmd += ["--out", str(out), "--overwrite", "--quiet", "--set", f"run.seed={seed}"]
    cmd += ["--set", f"clustering.signals={signals}"]
    if k == "auto":
        cmd += ["--set", "clustering.k=auto"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print(" ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return out


def report(folder: Path, seeds: int) -> str:
    """The markdown table of every setting with finished runs."""
    lines = [
        "| scenario | signals | K | ARI per round: mean over seeds (min) | rounds with ARI = 1 "
        "from round 2, all seeds | K used (rounds, all seeds) | clustering share of a round |",
        "|---|---|---|---|---|---|---|",
    ]
    for scenario, (_, _, true_k) in SCENARIOS.items():
        for signals in SIGNALS:
            for k in KS:
                paths = [out_path(folder, scenario, signals, k, s) for s in range(seeds)]
                runs = [load_run(p) for p in paths if p.exists()]
                runs = [r for r in runs if r.status == "finished"]
                if not runs:
                    continue
                ari = np.stack([r.data["clustering/ari"] for r in runs])  # (seeds, rounds)
                ks = np.concatenate([r.data["clustering/k"].ravel() for r in runs])
                per_round = " ".join(
                    f"{m:.2f} ({lo:.2f})" for m, lo in zip(ari.mean(0), ari.min(0), strict=True)
                )
                perfect = bool(np.all(ari[:, 1:] == 1.0))
                values, counts = np.unique(ks, return_counts=True)
                found = ", ".join(f"{v}: {c}" for v, c in zip(values, counts, strict=True))
                share = np.mean(
                    [
                        r.data["round/seconds/clustering"].sum()
                        / r.data["round/seconds/total"].sum()
                        for r in runs
                    ]
                )
                lines.append(
                    f"| {scenario} | {signals} | {k if k == 'auto' else true_k} | {per_round} | "
                    f"{'yes' if perfect else 'no'} ({len(runs)} seeds) | {found} | {share:.1%} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run what is missing, then print the report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--only-report", action="store_true")
    args = p.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    if not args.only_report:
        for seed in range(args.seeds):
            for scenario in SCENARIOS:
                for signals in SIGNALS:
                    for k in KS:
                        run_one(args.folder, scenario, signals, k, seed)
    print(report(args.folder, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
