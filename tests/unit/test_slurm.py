"""Unit tests for slurm/run.sbatch: run under bash with a stand-in srun, check the launch line."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
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

STAND_IN = """#!/usr/bin/env bash
printf '%s\\0' "$(basename "$0")" "$@" > "$SRUN_RECORD"
printf '%s' "${OMP_NUM_THREADS-unset}" > "$SRUN_RECORD.omp"
"""


def make_stand_in(directory: Path, name: str = "srun") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(STAND_IN)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


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
    tmp_path: Path, *args: str, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], list[str] | None]:
    proc = subprocess.run(
        [BASH, str(SCRIPT), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    record = tmp_path / "argv"
    argv = record.read_bytes().decode().split("\0")[:-1] if record.exists() else None
    return proc, argv


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


def test_bash_accepts_the_script():
    proc = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_header():
    lines = SCRIPT.read_text().splitlines()
    assert lines[0].startswith("#!") and "bash" in lines[0]
    directives = [line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH ")]
    assert "--job-name=colnet" in directives
    assert any(d.startswith("--ntasks=") for d in directives)
    assert any(d.startswith("--cpus-per-task=") for d in directives)
    assert any(d.startswith("--time=") for d in directives)
    assert any("--gpus-per-task=1" in line for line in lines if line.startswith("##SBATCH"))
    # sbatch stops reading directives at the first command: all of them come before `set`
    first_command = next(i for i, line in enumerate(lines) if line.startswith("set -euo pipefail"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    # one launch line only
    assert sum('"$COLNET_SRUN"' in line for line in lines) == 1


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
