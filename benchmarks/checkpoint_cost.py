"""What checkpoints cost: time per round at the quickstart size, disk per rank, and preemption.

    python benchmarks/checkpoint_cost.py [--repeats 3] [--skip-full-width]

Prints, from measurements made now on this machine:
1. the quickstart (``mpiexec -n 6``, 5 rounds) with ``run.checkpoint_every`` = 0 and 1: the
   slowest rank's round time (``round/seconds/total``), the slowest rank's time to write one
   checkpoint (recorded by the run), their ratio, and the bytes per rank per checkpoint;
2. the checkpoint of one node of full-width ResNet-18 (width 64, BL-1, 32x32 inputs) after one
   training step, for SGD with momentum and for AdamW (the optimizer moments are part of it);
3. a preemption: SIGTERM to every rank in round 4 (during local training), then ``--resume``,
   against the same run uninterrupted (extra wall time, rounds computed twice).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.toml")


def run(out: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, float]:
    """One ``colnet-mpi run`` of the quickstart on 6 ranks: (exit code, wall seconds)."""
    cmd = ["mpiexec", "-n", "6", sys.executable, "-m", "colnet_mpi", "run", QUICK]
    cmd += ["--out", str(out), "--quiet", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, check=False)  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 75):
        sys.exit(f"benchmark run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.returncode, wall


def round_figures(path: Path) -> tuple[float, float, float]:
    """(median slowest-rank round seconds, seconds per checkpoint step on the writer rank
    (saving, waiting for the slowest rank, marking the results file, removing old files), bytes
    per rank per checkpoint)."""
    with h5py.File(path) as f:
        total = np.max(f["round/seconds/total"][()], axis=1)
        count = int(f.attrs.get("checkpoint_count", 0))
        seconds = float(f.attrs.get("checkpoint_seconds", 0.0)) / max(count, 1)
        size = float(f.attrs.get("checkpoint_bytes", 0)) / int(f.attrs["world_size"])
    return float(np.median(total)), seconds, size


def quickstart(tmp: Path, repeats: int) -> None:
    """Figure 1: round time with and without checkpoints, checkpoint time and size."""
    print("1. quickstart, mpiexec -n 6, 5 rounds (median over runs of the per-run median round)")
    rows: dict[int, list[tuple[float, float, float, float]]] = {0: [], 1: []}
    for i in range(repeats):
        for every in (0, 1):  # alternate, so that machine load hits both alike
            out = tmp / f"q{every}_{i}.h5"
            _, wall = run(out, "--overwrite", "--set", f"run.checkpoint_every={every}")
            rows[every].append((*round_figures(out), wall))
    med = {e: [statistics.median(c) for c in zip(*rows[e], strict=True)] for e in rows}
    r0, _, _, w0 = med[0]
    r1, ck, size, w1 = med[1]
    print(f"   round time, checkpoints off: {r0:.3f} s; on (every round): {r1:.3f} s")
    print(f"   one checkpoint step (after the round, all ranks done): {ck * 1000:.1f} ms "
          f"= {100 * ck / r1:.2f} % of a round")  # fmt: skip
    print(f"   wall time of the whole run: off {w0:.1f} s, on {w1:.1f} s")
    print(f"   disk: {size / 1024:.0f} KiB per rank per checkpoint (one checkpoint kept)")


def full_width(tmp: Path) -> None:
    """Figure 2: checkpoint size and write time of one full-width ResNet-18 node."""
    import torch

    from colnet_mpi.config import load_config
    from colnet_mpi.federation.checkpoint import Checkpointer
    from colnet_mpi.node import Node

    print("2. full-width ResNet-18 (width 64, BL-1, 32x32), one node after one training step")
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    cases = {
        "SGD + momentum (CIFAR-10 nodes)": ("configs/digits_label_het.toml", "low_digits"),
        "AdamW (CelebA attribute nodes)": ("configs/quickstart.toml", "attributes"),
    }
    for label, (config, _task) in cases.items():
        cfg = load_config(ROOT / config, ["model.width=64", "training.batch_size=8",
                                          "data.samples_per_node=10"])  # fmt: skip
        node = Node(cfg, 0, torch.device("cpu"))
        x, y = next(iter(node.train_loader))
        node.optimizer.zero_grad()
        node.loss_fn(node.head(node.backbone(x)), y).backward()
        node.optimizer.step()
        ck = Checkpointer(tmp / "full", 0, 1)
        t0 = time.perf_counter()
        path = ck.save(1, {"node": node.state_dict()}, {})
        seconds = time.perf_counter() - t0
        params = sum(p.numel() for p in [*node.backbone.parameters(), *node.head.parameters()])
        print(f"   {label}: {path.stat().st_size / 2**20:.1f} MiB per rank per checkpoint "
              f"({params / 1e6:.2f} M parameters), written in {seconds:.2f} s")  # fmt: skip


def preemption(tmp: Path) -> None:
    """Figure 3: what a SIGTERM mid-round followed by --resume costs in wall time."""
    print("3. preemption: SIGTERM to every rank in round 4 of 5 (local training), then --resume")
    ref = tmp / "ref.h5"
    _, w_ref = run(ref, "--overwrite")
    out = tmp / "pre.h5"
    code, w_stop = run(out, "--overwrite",
                       env={"COLNET_TEST_SIGNAL": "stage.local_train:4:*:SIGTERM"})  # fmt: skip
    with h5py.File(out) as f:
        kept, status = f["round/test_loss"].shape[0], f.attrs["status"]
    _, w_resume = run(out, "--resume")
    with h5py.File(out) as f, h5py.File(ref) as g:
        same = all(
            np.array_equal(f[k][()], g[k][()], equal_nan=True)
            for k in ("round/test_loss", "round/backbone_checksum", "epoch/train_loss")
        )
    r_med = round_figures(ref)[0]
    print(f"   stopped with exit code {code}, status {status!r}, {kept} rounds kept; resumed "
          f"run identical to the uninterrupted one: {same}")  # fmt: skip
    print(f"   uninterrupted {w_ref:.1f} s; stopped {w_stop:.1f} s + resumed {w_resume:.1f} s = "
          f"{w_stop + w_resume - w_ref:+.1f} s extra (a round is {r_med:.1f} s; the rest is the "
          f"second start-up)")  # fmt: skip


def main() -> int:
    """Run the three measurements and print them."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-full-width", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        quickstart(tmp, args.repeats)
        if not args.skip_full_width:
            full_width(tmp)
        preemption(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
