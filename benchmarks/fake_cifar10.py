"""Write a CIFAR-10 tree of random images in the official python-pickle layout, for benchmarks.

The images are noise, so nothing is learned; the point is to run the real data path and the
full-width ResNet-18 at CIFAR-10's shapes without downloading anything:

    python benchmarks/fake_cifar10.py /tmp/fakecifar --per-class 20
    mpiexec -n 6 colnet-mpi bench configs/cifar10_label_het.toml --set data.root=/tmp/fakecifar \\
        --set training.rounds=3

``--per-class`` images of each class go into each of the five training batches and the test batch
(the real files hold about 1,000; 20 gives 1,000 training images in all). Keys and class names
are text, as the official files read with ``encoding="latin1"``, so that torchvision's reader takes
them as well as ours (``benchmarks/authors_comparison.py`` runs the authors' code on them).
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def write(root: Path, per_class: int, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py`` and return that folder."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        labels = rng.permutation(np.repeat(np.arange(len(CLASSES)), per_class))
        data = rng.integers(0, 256, size=(labels.size, 3 * 32 * 32), dtype=np.uint8)
        batch = {"batch_label": name, "labels": labels.tolist(), "data": data}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    meta = {"label_names": list(CLASSES), "num_vis": 3 * 32 * 32}
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    return folder


def main() -> None:
    """Parse the command line and write the tree."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="folder to create cifar-10-batches-py/ in")
    p.add_argument("--per-class", type=int, default=20, help="images per class and batch file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.per_class < 1:
        p.error(f"--per-class {args.per_class} is not allowed; use 1 or more")
    print(write(args.root, args.per_class, args.seed))


if __name__ == "__main__":
    main()
