"""Tier 3 for on-disk data: the real CLI under mpiexec on a fabricated CIFAR-10 tree, and a missing one."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import colnet, run_mpi
from tests.fabricate import CifarTree, write_cifar


@pytest.fixture(scope="module")
def cifar_tree(tmp_path_factory: pytest.TempPathFactory) -> CifarTree:
    return write_cifar(tmp_path_factory.mktemp("cifar"), per_class=8)


CLI_CONFIG = """
[run]
name = "disk"
seed = 1

[data]
dataset = "cifar10"
root = "{root}"
samples_per_node = {samples}
test_samples = 16

[model]
width = 4

[training]
rounds = 1
local_epochs = 1
batch_size = 16
eval_batch_size = 64

[clustering]
k = {k}
max_batches = 1

{nodes}
"""


def _cli_config(tmp_path: Path, root: Path, tasks: tuple[str, ...], samples: int = 30) -> Path:
    nodes = "\n".join(f'[[nodes]]\ntask = "{t}"\n' for t in tasks)
    path = tmp_path / "disk.toml"
    path.write_text(
        CLI_CONFIG.format(root=root, samples=samples, k=min(2, len(tasks)), nodes=nodes)
    )
    return path


@pytest.mark.mpi
def test_cli_runs_on_a_cifar10_tree(cifar_tree: CifarTree, tmp_path: Path) -> None:
    out = tmp_path / "disk.h5"
    config = _cli_config(tmp_path, cifar_tree.parent, ("animals", "objects"))
    proc = run_mpi(2, colnet("run", str(config), "--out", str(out), "--quiet"), timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "finished"
        assert 'dataset = "cifar10"' in f.attrs["config"]
        tasks = [t.decode() if isinstance(t, bytes) else t for t in f["nodes/task"][:]]
        assert tasks == ["animals", "objects"]
        f1 = f["round/test_f1_micro"][:]
        assert f1.shape == (1, 2) and np.all((f1 >= 0) & (f1 <= 1))
        loss = f["epoch/train_loss"][:]
        assert loss.shape == (1, 2) and np.all(np.isfinite(loss)) and np.all(loss > 0)


@pytest.mark.mpi
def test_cli_dry_run_on_a_missing_root_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    config = _cli_config(tmp_path, missing, ("animals",))
    proc = run_mpi(1, colnet("run", str(config), "--dry-run"), timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for needle in (
        str(missing),
        "cifar-10-batches-py",
        "data_batch_1",
        "torchvision.datasets.CIFAR10(",
    ):
        assert needle in proc.stderr, f"{needle!r} not in {proc.stderr}"
    assert "dry run: config" not in proc.stdout
