"""Unit tests for slurm/run.sbatch and slurm/sweep.sbatch: bash, a stand-in srun, the launch line."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "run.sbatch"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")

SLURM_ENV = {
    "SLURM_NTASKS": "6",
    "SLURM_CPUS_PER_TASK": "4",
    "SLURM_JOB_ID": "123",
    "SLURM_JOB_NAME": "colnet",
}

# A launcher that records its argv; with STAND_IN_STATUS it also plays a run that marks its
# results file (the argument after --out) with that status, and it exits STAND_IN_RC.
STAND_IN = """#!/usr/bin/env bash
printf '%s\\0' "$(basename "$0")" "$@" > "$SRUN_RECORD"
printf '%s' "${OMP_NUM_THREADS-unset}" > "$SRUN_RECORD.omp"
if [[ -n "${STAND_IN_STATUS:-}" ]]; then
    python3 -c '
import pathlib, sys, h5py
status, args = sys.argv[1], sys.argv[2:]
out = pathlib.Path(args[args.index("--out") + 1])
out.parent.mkdir(parents=True, exist_ok=True)
with h5py.File(out, "a") as f:
    f.attrs["status"] = status' "$STAND_IN_STATUS" "$@"
fi
exit "${STAND_IN_RC:-0}"
"""

# Records its arguments NUL-separated in <itself>.argv and exits SCONTROL_RC.
SCONTROL = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$0.argv"
exit "${SCONTROL_RC:-0}"
"""


def make_script(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def make_stand_in(directory: Path, name: str = "srun") -> Path:
    return make_script(directory, name, STAND_IN)


def play_run(tmp_path: Path, status: str, rc: int, scontrol_rc: int = 0) -> dict[str, str]:
    """Stand-ins for a run that ends with ``status`` and exit code ``rc``, and for scontrol
    (``COLNET_SCONTROL``, off PATH); returns their environment for :func:`clean_env`."""
    make_stand_in(tmp_path / "bin")
    # python3 on PATH is this interpreter (h5py, colnet_mpi), as in a job with the venv active
    python = f'#!/usr/bin/env bash\nexec {shlex.quote(sys.executable)} "$@"\n'
    make_script(tmp_path / "bin", "python3", python)
    scontrol = make_script(tmp_path / "elsewhere", "my-scontrol", SCONTROL)
    return {
        "STAND_IN_STATUS": status,
        "STAND_IN_RC": str(rc),
        "SCONTROL_RC": str(scontrol_rc),
        "COLNET_SCONTROL": str(scontrol),
    }


def read_argv(record: Path) -> list[str] | None:
    """The arguments a stand-in recorded (NUL-terminated), or None when it did not run."""
    return record.read_bytes().decode().split("\0")[:-1] if record.exists() else None


def scontrol_calls(tmp_path: Path) -> list[str] | None:
    return read_argv(tmp_path / "elsewhere" / "my-scontrol.argv")


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without any SLURM_/COLNET_ variables, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "COLNET_", "SBATCH_")) and k != "OMP_NUM_THREADS"
    }
    env["SRUN_RECORD"] = str(tmp_path / "argv")
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run_script(
    tmp_path: Path, *args: str, env: dict[str, str], script: Path = SCRIPT, timeout: float = 30
) -> tuple[subprocess.CompletedProcess[str], list[str] | None]:
    """Run an sbatch script under bash; return the process and the stand-in srun's argv."""
    proc = subprocess.run(
        [BASH, str(script), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, read_argv(tmp_path / "argv")


def expected(
    *tail: str, config: str = "configs/quickstart.toml", out: str = "results/colnet_123.h5"
):
    return [
        "srun",
        "--ntasks=6",
        "--cpus-per-task=4",
        "colnet-mpi",
        "run",
        config,
        "--out",
        out,
        *tail,
    ]


def sbatch_directives(lines: list[str]) -> list[str]:
    """The options of a script's ``#SBATCH`` lines (``##SBATCH`` lines are disabled)."""
    return [line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH ")]


def test_bash_accepts_the_script():
    proc = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_header():
    lines = SCRIPT.read_text().splitlines()
    assert lines[0].startswith("#!") and "bash" in lines[0]
    directives = sbatch_directives(lines)
    assert "--job-name=colnet" in directives
    assert any(d.startswith("--ntasks=") for d in directives)
    assert any(d.startswith("--cpus-per-task=") for d in directives)
    assert any(d.startswith("--time=") for d in directives)
    assert any("--gpus-per-task=1" in line for line in lines if line.startswith("##SBATCH"))
    # sbatch stops reading directives at the first command: all of them come before `set`
    first_command = next(i for i, line in enumerate(lines) if line.startswith("set -euo pipefail"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    # one launch line only
    assert sum("colnet-mpi run" in line and not line.startswith("#") for line in lines) == 1


def test_default_command_line(tmp_path):
    make_stand_in(tmp_path / "bin")
    proc, argv = run_script(tmp_path, env=clean_env(tmp_path, **SLURM_ENV))
    assert proc.returncode == 0, proc.stderr
    assert argv == expected()
    assert (tmp_path / "argv.omp").read_text() == "4"


def test_config_argument_and_extra_args_pass_through(tmp_path):
    make_stand_in(tmp_path / "bin")
    args = [
        "configs/my exp.toml",
        "--set",
        "training.rounds=10",
        "--set",
        "federation.scheme=fedper",
    ]
    proc, argv = run_script(tmp_path, *args, env=clean_env(tmp_path, **SLURM_ENV))
    assert proc.returncode == 0, proc.stderr
    assert argv == expected(*args[1:], config="configs/my exp.toml")


def test_options_only_keep_the_default_config(tmp_path):
    make_stand_in(tmp_path / "bin")
    env = clean_env(tmp_path, COLNET_CONFIG="configs/digits_label_het.toml", **SLURM_ENV)
    proc, argv = run_script(tmp_path, "--overwrite", "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    assert argv == expected("--overwrite", "--quiet", config="configs/digits_label_het.toml")


def test_positional_config_wins_over_environment(tmp_path):
    make_stand_in(tmp_path / "bin")
    env = clean_env(tmp_path, COLNET_CONFIG="configs/digits_label_het.toml", **SLURM_ENV)
    proc, argv = run_script(tmp_path, "configs/other.toml", env=env)
    assert proc.returncode == 0, proc.stderr
    assert argv == expected(config="configs/other.toml")


def test_dry_run(tmp_path):
    make_stand_in(tmp_path / "bin")
    env = clean_env(tmp_path, COLNET_DRY_RUN="1", **SLURM_ENV)
    proc, argv = run_script(tmp_path, "configs/x.toml", "--set", "model.width=4", env=env)
    assert proc.returncode == 0, proc.stderr
    assert argv == expected("--dry-run", "--set", "model.width=4", config="configs/x.toml")


def test_dry_run_off_when_zero(tmp_path):
    make_stand_in(tmp_path / "bin")
    proc, argv = run_script(tmp_path, env=clean_env(tmp_path, COLNET_DRY_RUN="0", **SLURM_ENV))
    assert proc.returncode == 0, proc.stderr
    assert "--dry-run" not in argv


def test_out_and_launcher_from_environment(tmp_path):
    launcher = make_stand_in(tmp_path / "elsewhere", "my-srun")  # not on PATH
    env = clean_env(
        tmp_path,
        COLNET_SRUN=str(launcher),
        COLNET_OUT="/scratch/run.h5",
        **{**SLURM_ENV, "SLURM_NTASKS": "4", "SLURM_CPUS_PER_TASK": "2"},
    )
    proc, argv = run_script(tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert argv == [
        "my-srun",
        "--ntasks=4",
        "--cpus-per-task=2",
        "colnet-mpi",
        "run",
        "configs/quickstart.toml",
        "--out",
        "/scratch/run.h5",
    ]
    assert (tmp_path / "argv.omp").read_text() == "2"


def test_defaults_without_job_name_id_or_cpus(tmp_path):
    make_stand_in(tmp_path / "bin")
    proc, argv = run_script(tmp_path, env=clean_env(tmp_path, SLURM_NTASKS="2"))
    assert proc.returncode == 0, proc.stderr
    assert argv is not None
    assert argv[1:3] == ["--ntasks=2", "--cpus-per-task=1"]
    assert argv[-1] == "results/colnet_local.h5"
    assert (tmp_path / "argv.omp").read_text() == "1"


def test_missing_ntasks_fails_before_launch(tmp_path):
    make_stand_in(tmp_path / "bin")
    env = clean_env(tmp_path, **{k: v for k, v in SLURM_ENV.items() if k != "SLURM_NTASKS"})
    proc, argv = run_script(tmp_path, env=env)
    assert proc.returncode != 0
    assert argv is None
    assert "ntasks" in proc.stderr


def test_launcher_failure_propagates(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    failing = bin_dir / "srun"
    failing.write_text("#!/usr/bin/env bash\nexit 7\n")
    failing.chmod(0o755)
    proc, _ = run_script(tmp_path, env=clean_env(tmp_path, **SLURM_ENV))
    assert proc.returncode == 7


def with_python(tmp_path: Path) -> None:
    """python3 on PATH is this interpreter (colnet_mpi importable), as in a job with the venv active."""
    python = f'#!/usr/bin/env bash\nexec {shlex.quote(sys.executable)} "$@"\n'
    make_script(tmp_path / "bin", "python3", python)


def write_config(tmp_path: Path, text: str, name: str = "configs/exp.toml") -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return name


def test_results_file_is_named_after_run_name(tmp_path):
    make_stand_in(tmp_path / "bin")
    with_python(tmp_path)
    config = write_config(tmp_path, '[run]\nname = "label_het"\nseed = 3\n')
    env = clean_env(tmp_path, **SLURM_ENV)
    proc, argv = run_script(tmp_path, config, "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    assert argv == expected("--quiet", config=config, out="results/label_het_123.h5")
    assert f"config {config}, results file results/label_het_123.h5" in proc.stdout


@pytest.mark.parametrize(
    "args, name",
    [
        (["--set", "run.name=other"], "other"),
        (["--set=run.name=other"], "other"),
        (["--set", "run.name=first", "--quiet", "--set", "run.name=last"], "last"),  # later wins
        (["--set", "training.rounds=2"], "label_het"),
    ],
)
def test_results_file_honours_run_name_overrides(tmp_path, args, name):
    make_stand_in(tmp_path / "bin")
    with_python(tmp_path)
    config = write_config(tmp_path, '[run]\nname = "label_het"\n')
    env = clean_env(tmp_path, COLNET_CONFIG=config, **SLURM_ENV)
    proc, argv = run_script(tmp_path, *args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert argv == expected(*args, config=config, out=f"results/{name}_123.h5")


def test_results_file_of_a_config_without_a_name_or_unreadable(tmp_path):
    make_stand_in(tmp_path / "bin")
    with_python(tmp_path)
    unnamed = write_config(tmp_path, "[training]\nrounds = 2\n", "configs/unnamed.toml")
    proc, argv = run_script(tmp_path, unnamed, env=clean_env(tmp_path, **SLURM_ENV))
    assert proc.returncode == 0, proc.stderr
    assert argv is not None and argv[-1] == "results/colnet_123.h5"  # run.name's default
    # not TOML, or a name a path cannot hold: the job name, and the run itself says what is wrong
    broken = write_config(tmp_path, "[run\nname = ", "configs/broken.toml")
    env = clean_env(tmp_path, **{**SLURM_ENV, "SLURM_JOB_NAME": "myjob"})
    proc, argv = run_script(tmp_path, broken, env=env)
    assert proc.returncode == 0, proc.stderr
    assert argv is not None and argv[-1] == "results/myjob_123.h5"
    proc, argv = run_script(tmp_path, unnamed, "--set", "run.name=a/b", env=env)
    assert argv is not None and argv[argv.index("--out") + 1] == "results/myjob_123.h5"


def test_colnet_out_wins_over_run_name(tmp_path):
    make_stand_in(tmp_path / "bin")
    with_python(tmp_path)
    config = write_config(tmp_path, '[run]\nname = "label_het"\n')
    env = clean_env(tmp_path, COLNET_OUT="mine.h5", **SLURM_ENV)
    proc, argv = run_script(tmp_path, config, env=env)
    assert proc.returncode == 0, proc.stderr
    assert argv == expected(config=config, out="mine.h5")


def test_run_sbatch_documents_account_partition_and_time():
    text = SCRIPT.read_text()
    for name in ("SBATCH_ACCOUNT", "SBATCH_PARTITION", "SBATCH_TIMELIMIT", "COLNET_LAUNCH"):
        assert name in text


def test_run_sbatch_launcher_override_needs_no_slurm(tmp_path):
    make_stand_in(tmp_path / "bin", "mpiexec")
    env = clean_env(tmp_path, COLNET_LAUNCH="mpiexec -n 6", COLNET_DRY_RUN="1")
    proc, argv = run_script(tmp_path, "configs/quickstart.toml", env=env)
    assert proc.returncode == 0, proc.stderr
    assert argv == [
        "mpiexec",
        "-n",
        "6",
        "colnet-mpi",
        "run",
        "configs/quickstart.toml",
        "--out",
        "results/colnet_local.h5",
        "--dry-run",
    ]
    assert (tmp_path / "argv.omp").read_text() == "1"


# ---------------------------------------------------------------------------------------------
# slurm/sweep.sbatch: array index -> one override set -> one results file.

ROOT = SCRIPT.parents[1]
SWEEP_SCRIPT = ROOT / "slurm" / "sweep.sbatch"
SPEC = "configs/sweeps/epochs_x_privatization.toml"
ARRAY_ENV = {**SLURM_ENV, "SLURM_ARRAY_TASK_ID": "4", "SLURM_JOB_NAME": "colnet-sweep"}
SWEEP_OUT = "results/epochs_x_privatization/epochs_x_privatization_4.h5"  # of index 4

# `colnet-mpi` for the steps before srun: this interpreter, the sweep subcommand only (the same
# add_parser and main as the console script, without importing the other subcommands).
COLNET_SHIM = """#!/usr/bin/env bash
exec {python} -c '
import argparse, sys
from colnet_mpi import sweep
p = argparse.ArgumentParser(prog="colnet-mpi")
sweep.add_parser(p.add_subparsers(dest="command", required=True))
a = p.parse_args(sys.argv[1:])
sys.exit(a.func(a))' "$@"
"""


def sweep_workdir(tmp_path: Path) -> Path:
    """A submission directory: the repository's configs, a stand-in srun and colnet-mpi."""
    (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    make_stand_in(tmp_path / "bin")
    shim = tmp_path / "bin" / "colnet-mpi"
    shim.write_text(COLNET_SHIM.format(python=shlex.quote(sys.executable)))
    shim.chmod(0o755)
    return tmp_path


def run_sweep(
    tmp_path: Path, *args: str, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], list[str] | None]:
    return run_script(tmp_path, *args, env=env, script=SWEEP_SCRIPT, timeout=120)


def sweep_expected(index: int, *tail: str, out_dir: str = "results/epochs_x_privatization"):
    epochs, rounds = [(2, 15), (3, 10), (5, 6)][index // 3]
    return [
        "srun",
        "--ntasks=6",
        "--cpus-per-task=4",
        "colnet-mpi",
        "run",
        "configs/cifar10_label_het.toml",
        "--set",
        "run.seed=0",
        "--set",
        f"training.local_epochs={epochs}",
        "--set",
        f"training.rounds={rounds}",
        "--set",
        f"model.privatization={index % 3}",
        "--set",
        f"run.name=epochs_x_privatization_{index}",
        "--out",
        f"{out_dir}/epochs_x_privatization_{index}.h5",
        *tail,
    ]


def write_results(path: Path, status: str) -> None:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["status"] = status


def test_sweep_bash_accepts_the_script():
    proc = subprocess.run(
        [BASH, "-n", str(SWEEP_SCRIPT)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr


def test_sweep_sbatch_header():
    lines = SWEEP_SCRIPT.read_text().splitlines()
    assert lines[0].startswith("#!") and "bash" in lines[0]
    directives = sbatch_directives(lines)
    assert "--ntasks=6" in directives
    assert "--gpus-per-task=1" in directives  # one GPU per rank by default
    assert "--requeue" in directives
    assert any(d.startswith("--cpus-per-task=") for d in directives)
    assert any(d.startswith("--time=") for d in directives)
    assert "--output=%x_%A_%a.log" in directives
    assert not any(d.startswith("--array") for d in directives)  # the submitter chooses
    first_command = next(i for i, line in enumerate(lines) if line.startswith("set -euo pipefail"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert sum("colnet-mpi run" in line and not line.startswith("#") for line in lines) == 1
    text = SWEEP_SCRIPT.read_text()
    for name in (
        "SBATCH_ACCOUNT",
        "SBATCH_PARTITION",
        "SBATCH_TIMELIMIT",
        "--overwrite",
        "COLNET_LAUNCH",
        "--unfinished",
        "COLNET_RERUN",
    ):
        assert name in text


@pytest.mark.parametrize("index", [0, 4, 8])
def test_sweep_command_line_and_output_name(tmp_path, index):
    sweep_workdir(tmp_path)
    env = clean_env(tmp_path, **{**ARRAY_ENV, "SLURM_ARRAY_TASK_ID": str(index)})
    proc, argv = run_sweep(tmp_path, SPEC, env=env)
    assert proc.returncode == 0, proc.stderr
    assert argv == sweep_expected(index)
    assert (tmp_path / "argv.omp").read_text() == "4"


def test_sweep_spec_from_environment_and_extra_args(tmp_path):
    sweep_workdir(tmp_path)
    env = clean_env(tmp_path, COLNET_SWEEP=SPEC, **ARRAY_ENV)
    proc, argv = run_sweep(tmp_path, "--quiet", "--set", "training.batch_size=32", env=env)
    assert proc.returncode == 0, proc.stderr
    assert argv == sweep_expected(4, "--quiet", "--set", "training.batch_size=32")


def test_sweep_out_dir(tmp_path):
    sweep_workdir(tmp_path)
    env = clean_env(tmp_path, COLNET_OUT_DIR="/scratch/me/exp", **ARRAY_ENV)
    proc, argv = run_sweep(tmp_path, SPEC, env=env)
    assert proc.returncode == 0, proc.stderr
    assert argv == sweep_expected(4, out_dir="/scratch/me/exp")


def test_sweep_without_array_id_fails_before_launch(tmp_path):
    sweep_workdir(tmp_path)
    env = clean_env(tmp_path, **SLURM_ENV)
    proc, argv = run_sweep(tmp_path, SPEC, env=env)
    assert proc.returncode == 2
    assert argv is None
    assert "SLURM_ARRAY_TASK_ID is not set" in proc.stderr
    assert f"sbatch --array=0-<count-1> slurm/sweep.sbatch {SPEC}" in proc.stderr


def test_sweep_without_spec_fails_before_launch(tmp_path):
    sweep_workdir(tmp_path)
    proc, argv = run_sweep(tmp_path, env=clean_env(tmp_path, **ARRAY_ENV))
    assert proc.returncode != 0
    assert argv is None
    assert "give the sweep spec" in proc.stderr


def test_sweep_index_out_of_range_fails_before_launch(tmp_path):
    sweep_workdir(tmp_path)
    env = clean_env(tmp_path, **{**ARRAY_ENV, "SLURM_ARRAY_TASK_ID": "9"})
    proc, argv = run_sweep(tmp_path, SPEC, env=env)
    assert proc.returncode == 2
    assert argv is None
    assert "has 9 sets, indices 0 to 8" in proc.stderr


def test_sweep_missing_config_fails_before_launch(tmp_path):
    sweep_workdir(tmp_path)
    (tmp_path / "configs").unlink()  # submitted from the wrong directory
    spec = ROOT / SPEC
    proc, argv = run_sweep(tmp_path, str(spec), env=clean_env(tmp_path, **ARRAY_ENV))
    assert proc.returncode == 2
    assert argv is None
    assert "config file 'configs/cifar10_label_het.toml' of index 4 does not exist" in proc.stderr


def test_sweep_skips_a_finished_task(tmp_path):
    sweep_workdir(tmp_path)
    write_results(
        tmp_path / "results/epochs_x_privatization/epochs_x_privatization_4.h5", "finished"
    )
    proc, argv = run_sweep(tmp_path, SPEC, env=clean_env(tmp_path, **ARRAY_ENV))
    assert proc.returncode == 0, proc.stderr
    assert argv is None
    assert (
        "index 4 of configs/sweeps/epochs_x_privatization.toml is finished; skipping" in proc.stdout
    )


def test_sweep_finished_task_in_out_dir_is_skipped(tmp_path):
    sweep_workdir(tmp_path)
    write_results(tmp_path / "elsewhere/epochs_x_privatization_4.h5", "finished")
    env = clean_env(tmp_path, COLNET_OUT_DIR="elsewhere", **ARRAY_ENV)
    proc, argv = run_sweep(tmp_path, SPEC, env=env)
    assert proc.returncode == 0, proc.stderr
    assert argv is None


def test_sweep_rerun_overwrites_a_finished_task(tmp_path):
    sweep_workdir(tmp_path)
    write_results(
        tmp_path / "results/epochs_x_privatization/epochs_x_privatization_4.h5", "finished"
    )
    env = clean_env(tmp_path, COLNET_RERUN="1", **ARRAY_ENV)
    proc, argv = run_sweep(tmp_path, SPEC, env=env)
    assert proc.returncode == 0, proc.stderr
    assert argv == sweep_expected(4, "--overwrite")  # from round 1: no --resume
    assert "index 4 is finished; running it again from round 1" in proc.stdout


@pytest.mark.parametrize("status", ["running", "failed", "preempted", "junk"])
def test_sweep_resumes_an_unfinished_task(tmp_path, status):
    sweep_workdir(tmp_path)
    out = tmp_path / SWEEP_OUT
    if status == "junk":
        out.parent.mkdir(parents=True)
        out.write_text("killed while creating the file")
    else:
        write_results(out, status)
    env = clean_env(tmp_path, SLURM_RESTART_COUNT="1", **ARRAY_ENV)
    proc, argv = run_sweep(tmp_path, SPEC, "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    assert argv == sweep_expected(4, "--resume", "--overwrite", "--quiet")
    shown = "unreadable" if status == "junk" else status
    assert f"results of index 4 are '{shown}'; resuming from the last checkpoint" in proc.stdout
    assert "restart 1" in proc.stdout


def test_sweep_dry_run(tmp_path):
    sweep_workdir(tmp_path)
    write_results(
        tmp_path / "results/epochs_x_privatization/epochs_x_privatization_4.h5", "finished"
    )
    env = clean_env(tmp_path, COLNET_DRY_RUN="1", **ARRAY_ENV)
    proc, argv = run_sweep(tmp_path, SPEC, env=env)
    assert proc.returncode == 0, proc.stderr
    assert argv is None  # a finished index is skipped, as the real run would be
    assert "is finished; skipping" in proc.stdout
    write_results(tmp_path / "results/epochs_x_privatization/epochs_x_privatization_4.h5", "failed")
    proc, argv = run_sweep(tmp_path, SPEC, env=env)
    assert proc.returncode == 0, proc.stderr
    # the dry run checks the same resume decision the real run would make
    assert argv == sweep_expected(4, "--resume", "--overwrite", "--dry-run")


def test_sweep_dry_run_on_a_login_node(tmp_path):
    sweep_workdir(tmp_path)
    make_stand_in(tmp_path / "bin", "mpiexec")
    env = clean_env(
        tmp_path, SLURM_ARRAY_TASK_ID="2", COLNET_DRY_RUN="1", COLNET_LAUNCH="mpiexec -n 6"
    )
    proc, argv = run_sweep(tmp_path, SPEC, env=env)
    assert proc.returncode == 0, proc.stderr
    assert argv == ["mpiexec", "-n", "6", *sweep_expected(2, "--dry-run")[3:]]
    assert (tmp_path / "argv.omp").read_text() == "1"


def test_sweep_missing_ntasks_fails_before_launch(tmp_path):
    sweep_workdir(tmp_path)
    env = clean_env(tmp_path, SLURM_ARRAY_TASK_ID="1")
    proc, argv = run_sweep(tmp_path, SPEC, env=env)
    assert proc.returncode != 0
    assert argv is None
    assert "ntasks" in proc.stderr


def test_sweep_launcher_failure_propagates(tmp_path):
    sweep_workdir(tmp_path)
    (tmp_path / "bin" / "srun").write_text("#!/usr/bin/env bash\nexit 7\n")
    proc, _ = run_sweep(tmp_path, SPEC, env=clean_env(tmp_path, **ARRAY_ENV))
    assert proc.returncode == 7


# ---------------------------------------------------------------------------------------------
# Preemption (both scripts): the warning signal, resuming a results file, requeueing.

BOTH = pytest.mark.parametrize("which", ["run", "sweep"])


def launch(tmp_path: Path, which: str, *args: str, **extra: str):
    """Run run.sbatch (job 123) or sweep.sbatch (SPEC, index 4 of job 123) with ``extra`` env."""
    if which == "sweep":
        sweep_workdir(tmp_path)
        return run_sweep(tmp_path, SPEC, *args, env=clean_env(tmp_path, **ARRAY_ENV, **extra))
    return run_script(tmp_path, *args, env=clean_env(tmp_path, **SLURM_ENV, **extra))


def launched(which: str, *tail: str) -> list[str]:
    return sweep_expected(4, *tail) if which == "sweep" else expected(*tail)


def results_of(tmp_path: Path, which: str) -> Path:
    return tmp_path / (SWEEP_OUT if which == "sweep" else "results/colnet_123.h5")


@pytest.mark.parametrize("script", [SCRIPT, SWEEP_SCRIPT], ids=["run", "sweep"])
def test_requeue_and_warning_signal_directives(script):
    lines = script.read_text().splitlines()
    directives = sbatch_directives(lines)
    assert "--requeue" in directives
    assert "--open-mode=append" in directives  # a requeued job appends to its log
    # USR1 to the srun tasks (with 'B:' only the batch shell would get it), 5 minutes early
    assert "--signal=USR1@300" in directives
    text = script.read_text()
    for name in ("checkpoint_every", "--resume --overwrite", "preempted", "COLNET_SCONTROL"):
        assert name in text
    assert "no checkpoints" not in text


@BOTH
def test_preempted_run_is_requeued_and_exits_75(tmp_path, which):
    proc, argv = launch(tmp_path, which, **play_run(tmp_path, "preempted", 75))
    assert proc.returncode == 75, proc.stderr
    assert argv == launched(which)  # no results file before: a fresh run
    assert scontrol_calls(tmp_path) == ["requeue", "123"]
    assert "preempted; requeueing job 123 (restart 0)" in proc.stdout


@BOTH
@pytest.mark.parametrize("status, rc", [("finished", 0), ("failed", 1), ("running", 75)])
def test_run_that_is_not_preempted_is_not_requeued(tmp_path, which, status, rc):
    proc, _ = launch(tmp_path, which, **play_run(tmp_path, status, rc))
    assert proc.returncode == rc, proc.stderr
    assert scontrol_calls(tmp_path) is None
    assert "requeue" not in proc.stdout + proc.stderr


@BOTH
def test_failed_requeue_is_logged_and_keeps_the_exit_code(tmp_path, which):
    proc, _ = launch(tmp_path, which, **play_run(tmp_path, "preempted", 75, scontrol_rc=1))
    assert proc.returncode == 75
    assert scontrol_calls(tmp_path) == ["requeue", "123"]
    assert "scontrol requeue 123 failed (exit 1)" in proc.stderr


@BOTH
def test_stale_preempted_file_is_not_requeued(tmp_path, which):
    # an earlier attempt was preempted; this one fails (exit 2) before it touches the file
    out = results_of(tmp_path, which)
    write_results(out, "preempted")
    an_hour_ago = time.time() - 3600
    os.utime(out, (an_hour_ago, an_hour_ago))
    proc, argv = launch(tmp_path, which, **play_run(tmp_path, "", 2))
    assert proc.returncode == 2
    assert argv == launched(which, "--resume", "--overwrite")
    assert scontrol_calls(tmp_path) is None
    assert "is 'preempted' from an earlier attempt; not requeueing" in proc.stderr


@BOTH
def test_dry_run_checks_the_resume_but_never_requeues(tmp_path, which):
    write_results(results_of(tmp_path, which), "running")
    proc, argv = launch(tmp_path, which, COLNET_DRY_RUN="1", **play_run(tmp_path, "preempted", 75))
    assert proc.returncode == 75
    assert argv == launched(which, "--resume", "--overwrite", "--dry-run")
    assert scontrol_calls(tmp_path) is None


@pytest.mark.parametrize("status", ["running", "preempted", "failed", "finished"])
def test_run_sbatch_resumes_an_existing_results_file(tmp_path, status):
    # a requeued job keeps its id, so its default results file; a finished one is the run's to skip
    write_results(tmp_path / "results/colnet_123.h5", status)
    env = play_run(tmp_path, "finished", 0)
    proc, argv = launch(
        tmp_path, "run", "configs/x.toml", "--quiet", SLURM_RESTART_COUNT="1", **env
    )
    assert proc.returncode == 0, proc.stderr
    assert argv == expected("--resume", "--overwrite", "--quiet", config="configs/x.toml")
    assert "results/colnet_123.h5 exists; resuming from its last checkpoint" in proc.stdout
    assert "restart 1" in proc.stdout
    assert scontrol_calls(tmp_path) is None


def test_run_sbatch_preempted_outside_slurm_is_not_requeued(tmp_path):
    env = clean_env(tmp_path, COLNET_LAUNCH="srun -n 6", **play_run(tmp_path, "preempted", 75))
    proc, argv = run_script(tmp_path, env=env)
    assert proc.returncode == 75
    assert argv is not None and argv[-1] == "results/colnet_local.h5"
    assert scontrol_calls(tmp_path) is None
    assert "preempted outside SLURM" in proc.stderr


def test_sweep_sbatch_skips_a_finished_task_without_launch_or_requeue(tmp_path):
    write_results(tmp_path / SWEEP_OUT, "finished")
    proc, argv = launch(tmp_path, "sweep", **play_run(tmp_path, "preempted", 75))
    assert proc.returncode == 0, proc.stderr
    assert argv is None
    assert scontrol_calls(tmp_path) is None
