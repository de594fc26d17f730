"""Traffic, memory and time per round against the number of nodes N, with a linear model.

For each N (half the nodes on face attributes, half on landmarks; ResNet-18 at width 8,
128 samples per node, 2 rounds of 1 epoch) and each variant, runs
``mpiexec -n N colnet-mpi bench <generated config> --json`` and prints one line per run: model
bytes sent per node and round, values per neighbour in the exchange, PSS per rank (the memory a
rank really takes: shared library pages counted once), USS per rank (what a rank alone holds),
seconds per round and the final ARI.
Variants: ``full`` (every node exchanges whole backbones with every other: the default),
``full-sketch`` (the full graph, but the exchange carries ``clustering.backbone_sketch = 256``
sketch entries and the data profile instead of the backbone) and ``sparse``
(``federation.topology = "kregular"`` with ``federation.degree = 4`` and the same sketch);
``--variants async-full async-sketch async-sparse`` measures asynchronous rounds (S = 1) with
whole backbones to every neighbour, sketched views to every neighbour and whole backbones to the
group-mates only, and the latter on the 4-regular graph. Each
line also shows what the run adds to a rank's private memory (USS at the end minus USS after the
imports: data, model, optimizer, buffers, received models) and the PSS of all ranks together.
It then fits bytes, USS and the run's addition = a + b·N per variant and extrapolates to 1,024
nodes. Oversubscribed runs (N ranks on a few cores) are slow but measure the same bytes.

    python benchmarks/scaling.py --nodes 6 16 32 64 --out /tmp/scaling
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

VARIANTS = {
    "full": [],
    "full-sketch": ["clustering.backbone_sketch=256"],
    "sparse": [
        "federation.topology=kregular",
        "federation.degree=4",
        "clustering.backbone_sketch=256",
    ],
    # asynchronous rounds (not in the default grid): whole backbones to every neighbour, or
    # sketched views to every neighbour and whole backbones to the group-mates only
    "async-full": ["federation.mode=async", "federation.max_staleness=1"],
    "async-sketch": [
        "federation.mode=async",
        "federation.max_staleness=1",
        "clustering.backbone_sketch=256",
    ],
    "async-sparse": [
        "federation.mode=async",
        "federation.max_staleness=1",
        "federation.topology=kregular",
        "federation.degree=4",
        "clustering.backbone_sketch=256",
    ],
}
DEFAULT_VARIANTS = ["full", "full-sketch", "sparse"]


def config_text(n: int) -> str:
    """A small faces config with ``n`` nodes (half attributes, half landmarks)."""
    half = n // 2
    return f"""
[run]
name = "scaling_{n}"
checkpoint_every = 0

[data]
dataset = "synthetic_faces"
samples_per_node = 128
test_samples = 64
image_size = 32

[model]
width = 8

[training]
rounds = 2
local_epochs = 1
batch_size = 16

[clustering]
max_batches = 2

[[nodes]]
task = "attributes"
count = {half}

[[nodes]]
task = "landmarks"
count = {n - half}
"""


def run(n: int, variant: str, folder: Path, timeout: float) -> dict:
    """One bench run; returns its JSON figures plus the final ARI."""
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / f"scaling_{n}.toml"
    cfg.write_text(config_text(n))
    out = folder / f"scaling_{n}_{variant}.h5"
    sets = [a for s in VARIANTS[variant] for a in ("--set", s)]
    cmd = ["mpiexec", "-n", str(n), sys.executable, "-m", "colnet_mpi", "bench", str(cfg)]
    cmd += [*sets, "--out", str(out), "--json", "--repeats", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    fig = json.loads(proc.stdout)
    with h5py.File(out, "r") as f:
        fig["ari_final"] = float(f["clustering/ari"][-1])
    return fig


def main() -> None:
    """Run the grid, print the table and the fitted models."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[6, 16, 32, 64])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--out", type=Path, default=Path("scaling_runs"))
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args()
    rows = []
    head = (
        f"{'N':>4} {'variant':<11} {'MB sent/node/round':>19} {'values/neighbour':>17} "
        f"{'neighbours':>10} {'PSS/rank MB':>12} {'USS/rank MB':>12} {'run adds MB':>12} "
        f"{'PSS all GB':>11} {'s/round':>8} {'ARI':>5}"
    )
    print(head, flush=True)
    for n in args.nodes:
        for variant in args.variants:
            fig = run(n, variant, args.out, args.timeout)
            ex = fig["exchange"]
            row = {
                "n": n,
                "variant": variant,
                "sent": fig["bytes_per_node_round"]["sent"],
                "values": ex["values_per_neighbour"],
                "neighbours": ex["neighbours"],
                "pss": fig["pss_bytes_at_end"]["mean_rank"],
                "uss": fig["uss_bytes_at_end"]["mean_rank"],
                "run_adds": fig["uss_bytes_at_end"]["mean_rank"]
                - fig["uss_bytes_after_imports"]["mean_rank"],
                "pss_total": fig["pss_bytes_at_end"]["total"],
                "round": fig["stages_seconds_per_round"]["total"]["mean_rank"],
                "ari": fig["ari_final"],
            }
            rows.append(row)
            print(
                f"{n:>4} {variant:<11} {row['sent'] / 1e6:>19.3f} {row['values']:>17,} "
                f"{row['neighbours']:>10} {row['pss'] / 1e6:>12.1f} {row['uss'] / 1e6:>12.1f} "
                f"{row['run_adds'] / 1e6:>12.1f} {row['pss_total'] / 1e9:>11.2f} "
                f"{row['round']:>8.2f} {row['ari']:>5.2f}",
                flush=True,
            )
    (args.out / "scaling.json").write_text(json.dumps(rows, indent=2))
    print("\nlinear fits (least squares over the N measured), extrapolated to N = 1,024:")
    for variant in args.variants:
        mine = [r for r in rows if r["variant"] == variant]
        if len(mine) < 2:
            continue
        ns = np.array([r["n"] for r in mine], dtype=float)
        for key, unit in (
            ("sent", "MB sent per node and round"),
            ("uss", "MB USS per rank"),
            ("run_adds", "MB the run adds per rank"),
        ):
            ys = np.array([r[key] for r in mine]) / 1e6
            slope, icpt = np.polyfit(ns, ys, 1)
            print(
                f"  {variant:<11} {unit:<27} = {icpt:8.3f} + {slope:8.4f} x N"
                f"  -> {icpt + slope * 1024:10.1f} at N = 1,024"
            )


if __name__ == "__main__":
    main()
