"""The runs whose results files must stay bit-identical across behaviour-preserving changes.

``python -m tests.reference_cases OUT.json`` runs every case under ``mpiexec -n 6`` and writes
their fingerprints (see ``tests/reference.py``); ``tests/data/reference_runs.json`` (an Intel
AVX2 machine), ``tests/data/reference_runs_avx512.json`` (torch's AVX512 kernels on an Intel
machine), ``tests/data/reference_runs_avx2_amd.json`` (an AMD EPYC AVX2 machine) and
``tests/data/reference_runs_avx512_amd.json`` (an AMD EPYC AVX512 machine) were recorded this way
from the code before the federation redesign (commit 5351219): on a checkout of that commit
with this file and ``tests/reference.py`` copied in, ``python -m tests.reference_cases OUT.json``
(that commit predates ``clustering.signals``: drop the ``clustering.signals=paper`` override
there, its only behaviour then).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from tests.reference import fingerprint, save

ROOT = Path(__file__).resolve().parents[1]
QUICK = "configs/quickstart.toml"
DIGITS = "configs/digits_label_het.toml"
SMALL = [
    "data.samples_per_node=64",
    "data.test_samples=48",
    "model.width=4",
    "clustering.max_batches=1",
]

#: name -> (config, overrides); every case runs 2 rounds on 6 ranks.
CASES: dict[str, tuple[str, list[str]]] = {
    "quickstart": (QUICK, []),
    "digits": (DIGITS, []),
    # boost attacker, screening (exclude) and leader verification: the defense paths
    "quickstart_defended": (
        QUICK,
        [*SMALL, "attack.kind=boost", "defense.screening=true", "defense.verify_leader=true"],
    ),
    # clipping screen, a NaN-sending node, sample-count weights
    "quickstart_clip_nan": (
        QUICK,
        [
            *SMALL,
            "attack.kind=bad_buffer",
            "attack.nodes=[4]",
            "defense.screening=true",
            "defense.norm_action=clip",
            "federation.intra_weights=samples",
        ],
    ),
    # FedPer with a robust rule on fixed task groups, a label-flipping node
    "digits_fedper_median": (
        DIGITS,
        [
            "data.samples_per_node=60",
            "model.width=4",
            "federation.scheme=fedper",
            "federation.grouping=tasks",
            "defense.aggregation=median",
            "attack.kind=label_flip",
            "attack.nodes=[1]",
        ],
    ),
    # a malicious leader without verification; ring topology
    "quickstart_manipulate_ring": (
        QUICK,
        [*SMALL, "attack.kind=manipulate", "federation.topology=ring"],
    ),
    "digits_none": (
        DIGITS,
        ["data.samples_per_node=60", "model.width=4", "federation.scheme=none"],
    ),
    "digits_intra_trimmed": (
        DIGITS,
        [
            "data.samples_per_node=60",
            "model.width=4",
            "federation.scheme=intra",
            "defense.aggregation=trimmed_mean",
        ],
    ),
}


def run_args(name: str, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """The ``colnet-mpi`` arguments of a case (``extra``: more ``--set`` overrides, for a variant
    that must give the same results)."""
    config, overrides = CASES[name]
    args = ["run", str(ROOT / config), "--out", str(out)]
    # the recorded runs predate the resemblance signals: they keep the paper's literal ones
    for item in [*overrides, "training.rounds=2", "clustering.signals=paper", *extra]:
        args += ["--set", item]
    return [*args, "--quiet"]


def command(name: str, out: Path) -> list[str]:
    """The command line of a case (after ``mpiexec -n 6``)."""
    return [sys.executable, "-m", "colnet_mpi", *run_args(name, out)]


def main(argv: list[str]) -> int:
    """Run every case (or those named after the output path) and save their fingerprints."""
    target = Path(argv[0])
    names = argv[1:] or list(CASES)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = Path(tmp) / f"{name}.h5"
            subprocess.run(["mpiexec", "-n", "6", *command(name, out)], check=True, cwd=ROOT)
            result[name] = fingerprint(out)
            print(f"recorded {name}", flush=True)
    save(target, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
