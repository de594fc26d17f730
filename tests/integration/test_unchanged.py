"""Tier 3: the federation redesign changed no result — every dataset of 2-round runs is
bit-identical to fingerprints recorded from the code before it (``tests/reference_cases.py``).

Floating-point results depend on the CPU's vector instructions and vendor (torch and its math
libraries pick their kernels by them), so the fingerprints were recorded once per kind of CPU,
each by running the code before the redesign (commit 5351219) on such a machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, colnet_batch, run_mpi
from tests.reference import differences, fingerprint
from tests.reference_cases import CASES, command, run_args


def cpu_vendor() -> str:
    """The CPU's vendor as Linux reports it (``AuthenticAMD``, ``GenuineIntel``; "" elsewhere):
    the math libraries pick other kernels on other vendors' CPUs with the same instructions."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("vendor_id")), "")


#: "capability" or "capability/vendor" (torch's CPU capability, :func:`cpu_vendor`) -> the
#: fingerprints recorded on such a machine; the longer key wins; others: the AVX2 (Intel)
#: recording
RECORDINGS = {
    "AVX512": "reference_runs_avx512.json",
    "AVX2/AuthenticAMD": "reference_runs_avx2_amd.json",
    "AVX512/AuthenticAMD": "reference_runs_avx512_amd.json",
}
CAPABILITY = torch.backends.cpu.get_cpu_capability()
RECORDING = RECORDINGS.get(
    f"{CAPABILITY}/{cpu_vendor()}", RECORDINGS.get(CAPABILITY, "reference_runs.json")
)
REFERENCE = json.loads((ROOT / "tests" / "data" / RECORDING).read_text())
#: Datasets added to the results file after the recording (nothing older changed with them).
ADDED = (
    "round/partition_stamp", "async/staleness", "async/leader_staleness", "async/head_epochs",
    "async/trained", "async/delta_staleness", "async/stood_in",
)  # fmt: skip


def test_reference_covers_every_case() -> None:
    for recording in ("reference_runs.json", *RECORDINGS.values()):
        data = json.loads((ROOT / "tests" / "data" / recording).read_text())
        assert sorted(data) == sorted(CASES), recording
    assert sorted(REFERENCE) == sorted(CASES)
    for name, ref in REFERENCE.items():
        # every dataset of a results file is fingerprinted (timings excepted)
        assert "round/test_f1_micro" in ref["datasets"] and "epoch/val_loss" in ref["datasets"]
        assert not any(k.startswith("round/seconds/") for k in ref["datasets"]), name


#: Variants that must give a case's recorded results: (case, results file, extra overrides).
#: Messages instead of shared memory: the reference runs used messages; every run on one host
#: now exchanges through shared memory, and the message path (neighbours on other hosts) must
#: still give the same bits, refused NaN buffers included. Turns on the host
#: (``run.host_slots = 2``): the six ranks train and evaluate two at a time; with the threads
#: per rank held at one (as in the recording) what is computed is the same, bit for bit.
VARIANTS = {
    "messages_quickstart": ("quickstart", ("federation.shared_memory=no",)),
    "messages_quickstart_clip_nan": ("quickstart_clip_nan", ("federation.shared_memory=no",)),
    "turns_quickstart": ("quickstart", ("run.host_slots=2",)),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case and every variant, run one after the other in one 6-rank launch (start-up
    paid once), one thread per rank (``SLURM_CPUS_PER_TASK=1``, as the recordings ran)."""
    folder = tmp_path_factory.mktemp("cases")
    batch = [run_args(case, folder / f"{case}.h5") for case in sorted(CASES)]
    batch += [
        run_args(case, folder / f"{name}.h5", extra) for name, (case, extra) in VARIANTS.items()
    ]
    env = {"SLURM_CPUS_PER_TASK": "1"}
    proc = run_mpi(6, colnet_batch(*batch), timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return folder


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_results_bit_identical_to_reference(runs: Path, case: str) -> None:
    diff = differences(REFERENCE[case], fingerprint(runs / f"{case}.h5"), ADDED)
    assert not diff, f"{case}: results differ from the reference:\n" + "\n".join(diff)


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_give_the_same_results(runs: Path, variant: str) -> None:
    """Messages instead of shared memory, and turns on the host (see ``VARIANTS``)."""
    case = VARIANTS[variant][0]
    diff = differences(REFERENCE[case], fingerprint(runs / f"{variant}.h5"), ADDED)
    assert not diff, f"{variant}: results differ from the reference:\n" + "\n".join(diff)


@pytest.mark.mpi
@pytest.mark.slow
def test_a_case_alone_is_bit_identical_too(tmp_path: Path) -> None:
    """The quickstart in its own launch, as a user runs it (no earlier run in the process)."""
    out = tmp_path / "quickstart.h5"
    proc = run_mpi(6, command("quickstart", out), timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # --quiet: no progress lines, but the final line still says where the results went
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("finished in") and str(out) in lines[0], lines
    diff = differences(REFERENCE["quickstart"], fingerprint(out), ADDED)
    assert not diff, "\n".join(diff)
