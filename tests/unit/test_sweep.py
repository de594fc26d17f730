"""Unit tests for sweeps: spec validation, expansion of every provided sweep, the CLI."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest

from colnet_mpi.config import load_config, parse_override
from colnet_mpi.sweep import (
    Sweep,
    SweepError,
    index_ranges,
    load_sweep,
    output_status,
    render,
    sweep_from_dict,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = ROOT / "configs" / "sweeps"
CIFAR = "configs/cifar10_label_het.toml"
CELEBA = "configs/celeba_task_het.toml"
EPOCHS = [(2, 15), (3, 10), (5, 6)]
SCHEMES = ["none", "intra", "fedper", "colnet"]


# name -> (count, the sets as (config, {key: value}) in index order, written out by hand)
def robustness_sets(kinds: tuple[str, ...], fixed: dict) -> list[tuple[str, dict]]:
    """The robustness sweeps' sets: seed x scenario x attack x 3 defense settings."""
    defenses = ((False, "exclude"), (True, "exclude"), (True, "clip"))
    return [
        (
            c,
            {
                "run.seed": s,
                **fixed,
                "attack.kind": kind,
                "defense.screening": on,
                "defense.verify_leader": on,
                "defense.norm_action": action,
            },
        )
        for s in (0, 1, 2)
        for c in ("configs/digits_label_het.toml", "configs/faces_task_het.toml")
        for kind in kinds
        for on, action in defenses
    ]


PROVIDED = {
    "epochs_x_privatization": (
        9,
        [
            (
                CIFAR,
                {
                    "run.seed": 0,
                    "training.local_epochs": e,
                    "training.rounds": r,
                    "model.privatization": p,
                },
            )
            for (e, r) in EPOCHS
            for p in (0, 1, 2)
        ],
    ),
    "local_epochs": (
        18,
        [
            (c, {"run.seed": s, "training.local_epochs": e, "training.rounds": r})
            for s in (0, 1, 2)
            for c in (CIFAR, CELEBA)
            for (e, r) in EPOCHS
        ],
    ),
    "privatization": (
        18,
        [
            (c, {"run.seed": s, "model.privatization": p})
            for s in (0, 1, 2)
            for c in (CIFAR, CELEBA)
            for p in (0, 1, 2)
        ],
    ),
    "schemes": (
        24,
        [
            (c, {"run.seed": s, "federation.scheme": scheme})
            for s in (0, 1, 2)
            for c in (CIFAR, CELEBA)
            for scheme in SCHEMES
        ],
    ),
    "embedded_baselines": (
        40,
        [
            (c, {"run.seed": s, "federation.scheme": scheme})
            for s in (0, 1, 2, 3, 4)
            for c in ("configs/digits_label_het.toml", "configs/faces_task_het.toml")
            for scheme in SCHEMES
        ],
    ),
    "embedded_fixed_groups": (
        18,
        [
            (c, {"run.seed": s, "federation.grouping": "tasks", "federation.scheme": scheme})
            for s in (0, 1, 2)
            for c in ("configs/digits_label_het.toml", "configs/faces_task_het.toml")
            for scheme in ("intra", "fedper", "colnet")
        ],
    ),
    "robustness_fixed_groups": (
        36,
        robustness_sets(("none", "boost"), {"federation.grouping": "tasks"}),
    ),
    "robustness": (
        90,
        robustness_sets(("none", "label_flip", "boost", "at2fl", "manipulate"), {}),
    ),
}


def known_datasets() -> tuple[str, ...]:
    from colnet_mpi.data import known_datasets as known

    return known()


def write_spec(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# The provided sweeps.


def test_every_provided_sweep_is_tested():
    assert sorted(p.stem for p in SWEEPS.glob("*.toml")) == sorted(PROVIDED)


@pytest.mark.parametrize("name", sorted(PROVIDED))
def test_provided_sweep_expands_to_the_expected_sets(name):
    count, sets = PROVIDED[name]
    sweep = load_sweep(SWEEPS / f"{name}.toml")
    assert sweep.name == name
    assert sweep.count == count == len(sets)
    for index, (config, values) in enumerate(sets):
        assert sweep.config_for(index) == config
        overrides = sweep.overrides(index)
        assert overrides[-1] == f"run.name={name}_{index}"
        parsed = {}
        for text in overrides[:-1]:
            path, value = parse_override(text)
            parsed[".".join(path)] = value
        assert parsed == values, index
        assert list(parsed) == list(values), index  # same order: the spec's axis order
        assert sweep.output(index) == Path("results") / name / f"{name}_{index}.h5"
        assert sweep.run_args(index) == [
            config,
            *itertools.chain.from_iterable(("--set", o) for o in overrides),
            "--out",
            f"results/{name}/{name}_{index}.h5",
        ]
    with pytest.raises(SweepError, match=f"has {count} sets, indices 0 to {count - 1}"):
        sweep.overrides(count)


def test_exact_override_lists_of_a_few_indices():
    e = load_sweep(SWEEPS / "epochs_x_privatization.toml")
    assert e.overrides(0) == [
        "run.seed=0",
        "training.local_epochs=2",
        "training.rounds=15",
        "model.privatization=0",
        "run.name=epochs_x_privatization_0",
    ]
    assert e.overrides(5) == [
        "run.seed=0",
        "training.local_epochs=3",
        "training.rounds=10",
        "model.privatization=2",
        "run.name=epochs_x_privatization_5",
    ]
    assert e.overrides(8)[1:4] == [
        "training.local_epochs=5",
        "training.rounds=6",
        "model.privatization=2",
    ]
    s = load_sweep(SWEEPS / "schemes.toml")
    assert s.config_for(13) == CELEBA  # seed 1 is 8-15, its celeba half 12-15, scheme 1
    assert s.overrides(13) == ["run.seed=1", "federation.scheme=intra", "run.name=schemes_13"]
    assert s.config_for(23) == CELEBA
    assert s.overrides(23) == ["run.seed=2", "federation.scheme=colnet", "run.name=schemes_23"]
    b = load_sweep(SWEEPS / "embedded_baselines.toml")
    assert b.run_args(6) == [  # seed 0 (0-7), faces (4-7), scheme 2
        "configs/faces_task_het.toml",
        "--set",
        "run.seed=0",
        "--set",
        "federation.scheme=fedper",
        "--set",
        "run.name=embedded_baselines_6",
        "--out",
        "results/embedded_baselines/embedded_baselines_6.h5",
    ]


def test_zipped_axes_move_together_and_the_last_axis_varies_fastest():
    sweep = load_sweep(SWEEPS / "local_epochs.toml")
    pairs = [
        (v["training.local_epochs"], v["training.rounds"]) for v in map(sweep.values, range(18))
    ]
    assert set(pairs) == set(EPOCHS)
    assert pairs[:3] == EPOCHS  # the zipped pair is the last dimension: fastest
    assert [sweep.values(i)["config"] for i in (0, 2, 3, 5, 6)] == [
        CIFAR,
        CIFAR,
        CELEBA,
        CELEBA,
        CIFAR,
    ]
    assert [sweep.values(i)["run.seed"] for i in (0, 5, 6, 11, 12, 17)] == [0, 0, 1, 1, 2, 2]
    p = load_sweep(SWEEPS / "privatization.toml")
    assert [p.values(i)["model.privatization"] for i in range(4)] == [0, 1, 2, 0]


@pytest.mark.parametrize("name", sorted(PROVIDED))
def test_every_set_is_distinct(name):
    sweep = load_sweep(SWEEPS / f"{name}.toml")
    seen = {(sweep.config_for(i), tuple(sweep.overrides(i)[:-1])) for i in range(sweep.count)}
    assert len(seen) == sweep.count


@pytest.mark.parametrize("name", sorted(PROVIDED))
def test_every_set_of_every_provided_sweep_loads_as_a_valid_config(name):
    sweep = load_sweep(SWEEPS / f"{name}.toml")
    datasets = {
        tomllib.loads((ROOT / sweep.config_for(i)).read_text())["data"]["dataset"]
        for i in range(sweep.count)
    }
    assert datasets <= set(known_datasets())
    for i in range(sweep.count):
        config = load_config(ROOT / sweep.config_for(i), sweep.overrides(i))
        assert config.run.name == f"{name}_{i}"
        for key, value in sweep.values(i).items():
            if key != "config":
                section, field = key.split(".")
                assert getattr(getattr(config, section), field) == value
        assert config.world_size == 6


@pytest.mark.parametrize("base", ["configs/digits_label_het.toml", "configs/quickstart.toml"])
def test_paper_axes_on_the_embedded_configs_load(tmp_path, base):
    spec = write_spec(
        tmp_path,
        f"""
[sweep]
name = "embedded"
config = "{ROOT / base}"
zip = [["training.local_epochs", "training.rounds"]]
[axes]
"run.seed" = [0, 1]
"training.local_epochs" = [2, 3, 5]
"training.rounds" = [15, 10, 6]
"model.privatization" = [0, 1, 2]
"federation.scheme" = ["none", "intra", "fedper", "colnet"]
""",
    )
    sweep = load_sweep(spec)
    assert sweep.count == 2 * 3 * 3 * 4
    for i in range(sweep.count):
        config = sweep.check(i)
        v = sweep.values(i)
        assert (config.training.local_epochs, config.training.rounds) == (
            v["training.local_epochs"],
            v["training.rounds"],
        )
        assert config.model.privatization == v["model.privatization"]
        assert config.federation.scheme == v["federation.scheme"]
        assert config.run.seed == v["run.seed"]
        assert config.run.name == f"embedded_{i}"


# ---------------------------------------------------------------------------------------------
# Values survive --set.


@pytest.mark.parametrize(
    "value, text",
    [
        ("colnet", "colnet"),
        ("2", '"2"'),
        ("true", '"true"'),
        ("", '""'),
        (" padded", '" padded"'),
        ("two\nlines", '"two\\nlines"'),
        ("a b", "a b"),
        ("é", "é"),
        (3, "3"),
        (-1, "-1"),
        (0.5, "0.5"),
        (1e-05, "1e-05"),
        (2.0, "2.0"),
        (math.inf, "inf"),
        (True, "true"),
        (False, "false"),
        ([0, 1], "[0, 1]"),
        (["a", "b c"], '["a", "b c"]'),
        ([], "[]"),
    ],
)
def test_render_reads_back_to_the_same_typed_value(value, text):
    assert render(value) == text
    path, got = parse_override(f"training.rounds={render(value)}")
    assert path == ["training", "rounds"]
    assert got == value and type(got) is type(value)


def test_render_nan():
    _, got = parse_override(f"a.b={render(math.nan)}")
    assert math.isnan(got)


def test_list_valued_axis(tmp_path):
    spec = write_spec(
        tmp_path,
        f"""
[sweep]
name = "attackers"
config = "{ROOT / "configs/quickstart.toml"}"
[axes]
"attack.kind" = ["label_flip"]
"attack.nodes" = [[0], [0, 1]]
""",
    )
    sweep = load_sweep(spec)
    assert sweep.overrides(1)[:2] == ["attack.kind=label_flip", "attack.nodes=[0, 1]"]
    config = sweep.check(1)
    assert config.attack.nodes == (0, 1)


# ---------------------------------------------------------------------------------------------
# Errors: each names the key and what is allowed.

BASE = '[sweep]\nname = "s"\nconfig = "c.toml"\n'
ZIP = BASE + "zip = "
EPOCHS_ZIP = ZIP + '[["training.local_epochs", "training.rounds"]]\n[axes]\n'


@pytest.mark.parametrize(
    "text, message",
    [
        (
            BASE + '[axes]\n"run.seed" = [0]\n[extra]\n',
            r"unknown section \[extra\]; allowed sections: \[sweep\], \[axes\]",
        ),
        ('[axes]\n"run.seed" = [0]\n', r"\[sweep\] is required"),
        (
            BASE + 'title = "x"\n[axes]\n"run.seed" = [0]\n',
            r"unknown key 'sweep.title'; allowed keys in \[sweep\]: config, name, zip",
        ),
        (
            '[sweep]\nconfig = "c.toml"\n[axes]\n"run.seed" = [0]\n',
            r"sweep.name = None is not allowed",
        ),
        (
            '[sweep]\nname = "a b"\nconfig = "c.toml"\n[axes]\n"run.seed" = [0]\n',
            r"sweep.name = 'a b' is not allowed; use a non-empty name of letters",
        ),
        (
            '[sweep]\nname = "s"\nconfig = 3\n[axes]\n"run.seed" = [0]\n',
            r"sweep.config = 3 is not allowed",
        ),
        (BASE, r"\[axes\] needs at least one axis"),
        (BASE + "[axes]\n", r"\[axes\] needs at least one axis"),
        (BASE + '[axes]\n"run.seed" = []\n', r"axis 'run.seed' is empty; give at least one value"),
        (
            BASE + '[axes]\n"run.seed" = 3\n',
            r"axis 'run.seed' = 3 is not allowed; give a list of values",
        ),
        (
            BASE + "[axes]\nmodel.privatization = [0, 1]\n",
            r"\[axes\] 'model' is a table: quote dotted axis names, e.g. \"model.privatization\"",
        ),
        (
            BASE + '[axes]\n"run.seed" = [{a = 1}]\n',
            r"axis 'run.seed': value \{'a': 1\} is not allowed; use strings, integers",
        ),
        (
            BASE + '[axes]\n"training.epochs" = [1]\n',
            r"axis 'training.epochs': unknown key 'training.epochs'; allowed keys in \[training\]: "
            r"batch_size, epoch_seconds, eval_batch_size, grad_clip, landmarks",
        ),
        (
            BASE + '[axes]\n"trainin.rounds" = [1]\n',
            r"axis 'trainin.rounds': unknown section 'trainin'; allowed sections: run, data, model, training",
        ),
        (
            BASE + '[axes]\n"rounds" = [1]\n',
            r"axis 'rounds' is not allowed; name a config value as section.key",
        ),
        (
            BASE + '[axes]\n"training.rounds.x" = [1]\n',
            r"axis 'training.rounds.x': training.rounds is a value, not a table",
        ),
        (
            BASE + '[axes]\n"training.single_label" = [1]\n',
            r"axis 'training.single_label' is a table; sweep one of its keys: "
            r"training.single_label.lr, training.single_label.lr_decay, training.single_label.momentum",
        ),
        (
            BASE + '[axes]\n"nodes.task" = ["a"]\n',
            r"axis 'nodes.task' is not allowed: \[\[nodes\]\] cannot be changed by --set",
        ),
        (
            BASE + '[axes]\n"run.name" = ["a"]\n',
            r"axis 'run.name' is not allowed: the sweep sets it to <sweep name>_<index>",
        ),
        (
            BASE + '[axes]\n"run.output" = ["a.h5"]\n',
            r"axis 'run.output' is not allowed: the sweep chooses the results file",
        ),
        (
            BASE + '[axes]\n"run.seed" = [0]\n"run . seed" = [1]\n',
            r"axis 'run.seed' is given twice",
        ),
        (
            BASE + '[axes]\n"run.seed" = [0, 1, 0]\n',
            r"run.seed=0 appears twice \(positions 0 and 2\)",
        ),
        (BASE + '[axes]\nconfig = ["a.toml"]\n', r"the base config is given twice"),
        ('[sweep]\nname = "s"\n[axes]\n"run.seed" = [0]\n', r"no base config: set sweep.config"),
        (
            '[sweep]\nname = "s"\n[axes]\nconfig = [1]\n',
            r"axis 'config' = 1 is not allowed; give config file paths",
        ),
        (
            ZIP + '"a"\n[axes]\n"run.seed" = [0]\n',
            r"sweep.zip must be a list of lists of axis names",
        ),
        (
            ZIP + '[["run.seed"]]\n[axes]\n"run.seed" = [0]\n',
            r"sweep.zip\[0\] = \['run.seed'\] needs at least two axis names",
        ),
        (
            ZIP + '[["run.seed", "training.rounds"]]\n[axes]\n"run.seed" = [0]\n',
            r"sweep.zip\[0\] names 'training.rounds', which is not an axis; axes: run.seed",
        ),
        (
            ZIP + '[["run.seed", "training.rounds"], ["training.rounds", "model.width"]]\n'
            '[axes]\n"run.seed" = [0]\n"training.rounds" = [1]\n"model.width" = [8]\n',
            r"axis 'training.rounds' appears in more than one sweep.zip group",
        ),
        (
            EPOCHS_ZIP + '"training.local_epochs" = [2, 3, 5]\n"training.rounds" = [15, 10]\n',
            r"zipped axes must have equal lengths: training.local_epochs has 3, training.rounds has 2 values",
        ),
        (
            EPOCHS_ZIP + '"training.local_epochs" = [2, 2]\n"training.rounds" = [15, 15]\n',
            r"training.local_epochs=2, training.rounds=15 appears twice",
        ),
    ],
)
def test_spec_errors(tmp_path, text, message):
    spec = write_spec(tmp_path, text)
    with pytest.raises(SweepError, match=message) as info:
        load_sweep(spec)
    assert str(info.value).startswith(f"{spec}: ")


def test_zipped_rows_may_repeat_one_member(tmp_path):
    spec = write_spec(
        tmp_path,
        BASE.replace(
            'config = "c.toml"\n',
            'config = "c.toml"\nzip = [["training.local_epochs", "training.rounds"]]\n',
        )
        + '[axes]\n"training.local_epochs" = [2, 3]\n"training.rounds" = [10, 10]\n',
    )
    assert load_sweep(spec).count == 2


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(SweepError, match="sweep spec '.*nope.toml' does not exist"):
        load_sweep(tmp_path / "nope.toml")
    spec = write_spec(tmp_path, BASE + '[axes]\n"run.seed" = [0]\n"run.seed" = [1]\n')
    with pytest.raises(SweepError, match="not valid TOML .*is a key given twice"):
        load_sweep(spec)


@pytest.mark.parametrize("index", [-1, 9, 100, True, 1.0])
def test_index_out_of_range_names_the_count(index):
    sweep = load_sweep(SWEEPS / "epochs_x_privatization.toml")
    with pytest.raises(
        SweepError,
        match=r"sweep 'epochs_x_privatization' has 9 sets, indices 0 to 8 \(sbatch --array=0-8\)",
    ):
        sweep.overrides(index)
    with pytest.raises(SweepError, match="has 9 sets"):
        sweep.output(index)


def test_output_dir_and_with_config():
    sweep = load_sweep(SWEEPS / "epochs_x_privatization.toml")
    assert sweep.output(3, "/scratch/x") == Path("/scratch/x/epochs_x_privatization_3.h5")
    other = sweep.with_config("configs/digits_label_het.toml")
    assert other.config_for(3) == "configs/digits_label_het.toml"
    assert other.overrides(3) == sweep.overrides(3)
    with pytest.raises(SweepError, match="has a 'config' axis; --config cannot replace it"):
        load_sweep(SWEEPS / "schemes.toml").with_config("x.toml")


def test_sweep_from_dict_without_a_file():
    sweep = sweep_from_dict({"sweep": {"name": "n", "config": "c.toml"}, "axes": {"run.seed": [4]}})
    assert isinstance(sweep, Sweep) and sweep.count == 1
    assert sweep.run_args(0) == [
        "c.toml",
        "--set",
        "run.seed=4",
        "--set",
        "run.name=n_0",
        "--out",
        "results/n/n_0.h5",
    ]


def test_index_ranges():
    assert index_ranges([]) == ""
    assert index_ranges([4]) == "4"
    assert index_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


# ---------------------------------------------------------------------------------------------
# Results status.


def write_results(path: Path, status: str | None) -> None:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        if status is not None:
            f.attrs["status"] = status


@pytest.mark.parametrize("status", ["running", "failed", "finished"])
def test_output_status_reads_the_attribute(tmp_path, status):
    write_results(tmp_path / "r.h5", status)
    assert output_status(tmp_path / "r.h5") == status


def test_output_status_missing_and_unreadable(tmp_path):
    assert output_status(tmp_path / "r.h5") == "missing"
    write_results(tmp_path / "none.h5", None)
    assert output_status(tmp_path / "none.h5") == "unreadable"
    write_results(tmp_path / "odd.h5", "paused")
    assert output_status(tmp_path / "odd.h5") == "unreadable"
    (tmp_path / "junk.h5").write_text("not hdf5")
    assert output_status(tmp_path / "junk.h5") == "unreadable"


# ---------------------------------------------------------------------------------------------
# Command line (in process, through colnet_mpi.cli.main).


def cli(*argv: str) -> int:
    from colnet_mpi.cli import main

    return main(["sweep", *argv])


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


EXP = "configs/sweeps/epochs_x_privatization.toml"


def test_cli_count(in_repo, capsys):
    assert cli(EXP, "--count") == 0
    assert capsys.readouterr().out == "9\n"


def test_cli_index(in_repo, capsys):
    assert cli(EXP, "--index", "4") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# sweep 'epochs_x_privatization'") and "index 4 of 0-8" in out[0]
    rows = [line.split(None, 1) for line in out[1:]]
    assert rows[:6] == [
        ["config", CIFAR],
        ["run.seed", "0"],
        ["training.local_epochs", "3"],
        ["training.rounds", "10"],
        ["model.privatization", "1"],
        ["run.name", "epochs_x_privatization_4"],
    ]
    assert rows[6] == [
        "output",
        "results/epochs_x_privatization/epochs_x_privatization_4.h5 (missing)",
    ]


def test_cli_args_one_per_line_and_print0(in_repo, capsys):
    expected = load_sweep(EXP).run_args(7)
    assert cli(EXP, "--index", "7", "--args") == 0
    assert capsys.readouterr().out == "\n".join(expected) + "\n"
    assert cli(EXP, "--index", "7", "--args", "--print0", "--out-dir", "/tmp/o") == 0
    out = capsys.readouterr().out
    assert out.split("\0")[:-1] == [*expected[:-1], "/tmp/o/epochs_x_privatization_7.h5"]
    assert out.endswith("\0")


def test_cli_args_with_config(in_repo, capsys):
    assert cli(EXP, "--index", "0", "--args", "--config", "configs/digits_label_het.toml") == 0
    assert capsys.readouterr().out.splitlines()[0] == "configs/digits_label_het.toml"


def test_cli_args_needs_the_config_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the spec's relative config path does not resolve here
    assert cli(str(SWEEPS / "epochs_x_privatization.toml"), "--index", "0", "--args") == 2
    err = capsys.readouterr().err
    assert "config file 'configs/cifar10_label_het.toml' of index 0 does not exist" in err
    assert "relative paths are resolved against the current directory" in err


def test_cli_list(in_repo, capsys, tmp_path):
    write_results(tmp_path / "epochs_x_privatization_2.h5", "finished")
    assert cli(EXP, "--list", "--out-dir", str(tmp_path)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "9 sets = 1 x 3 x 3" in lines[0]
    assert lines[1] == f"# base config: {CIFAR}"
    assert lines[2].split() == [
        "index",
        "run.seed",
        "training.local_epochs",
        "training.rounds",
        "model.privatization",
        "status",
    ]
    assert lines[3].split() == ["0", "0", "2", "15", "0", "missing"]
    assert lines[5].split() == ["2", "0", "2", "15", "2", "finished"]
    assert len(lines) == 3 + 9
    assert cli(EXP) == 0  # no option: the list
    assert "index" in capsys.readouterr().out


def test_cli_list_with_config_axis(in_repo, capsys):
    assert cli("configs/sweeps/schemes.toml", "--list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["index", "run.seed", "config", "federation.scheme", "status"]
    assert lines[2].split()[:4] == ["0", "0", CIFAR, "none"]


def test_cli_status_and_unfinished(tmp_path, in_repo, capsys):
    out_dir = str(tmp_path)
    for i, status in [(0, "finished"), (1, "finished"), (2, "running"), (5, "finished")]:
        write_results(tmp_path / f"epochs_x_privatization_{i}.h5", status)
    for i, status in [(0, "finished"), (2, "running"), (3, "missing")]:
        assert cli(EXP, "--index", str(i), "--status", "--out-dir", out_dir) == 0
        assert capsys.readouterr().out == status + "\n"
    assert cli(EXP, "--unfinished", "--out-dir", out_dir) == 0
    assert capsys.readouterr().out == "2-4,6-8\n"
    for i in range(9):
        write_results(tmp_path / f"epochs_x_privatization_{i}.h5", "finished")
    # nothing left: exit 1, so that `sbatch --array=$(...)` under `set -e` stops instead of
    # submitting an empty array
    assert cli(EXP, "--unfinished", "--out-dir", out_dir) == 1
    captured = capsys.readouterr()
    assert (
        captured.out == "" and "all 9 sets of 'epochs_x_privatization' are finished" in captured.err
    )


def test_cli_check_ok(capsys, tmp_path):
    spec = write_spec(
        tmp_path,
        f"""
[sweep]
name = "ok"
config = "{ROOT / "configs/quickstart.toml"}"
[axes]
"federation.scheme" = ["none", "colnet"]
""",
    )
    assert cli(str(spec), "--check") == 0
    out = capsys.readouterr().out
    assert (
        "ok: all 2 sets of 'ok' are valid configs; MPI ranks per run: 6 (sbatch --ntasks=6)" in out
    )


def test_cli_check_reports_every_invalid_set(capsys, tmp_path):
    spec = write_spec(
        tmp_path,
        f"""
[sweep]
name = "bad"
config = "{ROOT / "configs/quickstart.toml"}"
[axes]
"training.rounds" = [0, 5, -1]
"federation.scheme" = ["colnet", "gossip"]
""",
    )
    assert cli(str(spec), "--check") == 2
    err = capsys.readouterr().err
    assert "index 0: " in err and "training.rounds = 0 is not allowed" in err
    assert "index 1: " in err and "federation.scheme = 'gossip' is not allowed" in err
    assert "index 2: " not in err
    assert "5 of 6 sets of 'bad' are invalid" in err


def test_cli_check_warns_about_different_world_sizes(capsys, tmp_path):
    small = tmp_path / "small.toml"
    small.write_text(
        (ROOT / "configs/quickstart.toml").read_text().replace("count = 3", "count = 2")
    )
    spec = write_spec(
        tmp_path,
        f"""
[sweep]
name = "mixed"
[axes]
config = ["{ROOT / "configs/quickstart.toml"}", "{small}"]
""",
    )
    assert cli(str(spec), "--check") == 0
    captured = capsys.readouterr()
    assert "different numbers of MPI ranks (4 ranks: --array=1; 6 ranks: --array=0)" in captured.err
    assert "MPI ranks per run: 4, 6" in captured.out


@pytest.mark.parametrize(
    "argv, message",
    [
        ([EXP, "--args"], "--args needs --index I"),
        ([EXP, "--status"], "--status needs --index I"),
        ([EXP, "--index", "0", "--print0"], "--print0 goes with --args"),
        ([EXP, "--index", "9"], "has 9 sets, indices 0 to 8"),
        ([EXP, "--index", "9", "--args"], "has 9 sets, indices 0 to 8"),
        (
            ["configs/sweeps/nope.toml", "--count"],
            "sweep spec 'configs/sweeps/nope.toml' does not exist",
        ),
        (
            ["configs/sweeps/schemes.toml", "--config", "x.toml", "--count"],
            "--config cannot replace it",
        ),
    ],
)
def test_cli_errors(in_repo, capsys, argv, message):
    assert cli(*argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("colnet-mpi sweep: ") and message in captured.err


def test_cli_modes_are_exclusive(in_repo, capsys):
    with pytest.raises(SystemExit) as info:
        cli(EXP, "--count", "--index", "1")
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_real_console_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "colnet_mpi", "sweep", EXP, "--index", "2", "--args", "--print0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\0")[:-1] == load_sweep(
        SWEEPS / "epochs_x_privatization.toml"
    ).run_args(2)


def test_listing_into_a_closed_pipe_ends_quietly(tmp_path) -> None:
    """`colnet-mpi sweep SPEC --list | head -1`: no BrokenPipeError traceback, exit 0."""
    import subprocess
    import sys

    # 3,000 sets: far more output than a pipe buffers, so the writer does hit the closed pipe
    spec = write_spec(
        tmp_path,
        f"""
[sweep]
name = "big"
config = "{ROOT / "configs/quickstart.toml"}"
[axes]
"run.seed" = {list(range(1000))}
"federation.scheme" = ["none", "intra", "colnet"]
""",
    )
    cmd = f"{sys.executable} -m colnet_mpi sweep {spec} --list --out-dir {tmp_path} | head -1"
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert len(proc.stdout.splitlines()) == 1


def test_version_flag() -> None:
    import subprocess
    import sys

    from colnet_mpi import __version__

    proc = subprocess.run(
        [sys.executable, "-m", "colnet_mpi", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"colnet-mpi {__version__}"
