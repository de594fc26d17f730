"""Unit tests for the results reader and ``colnet-mpi report`` on synthetic files written by ResultsWriter."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from colnet_mpi.cli import main as cli_main
from colnet_mpi.config import Config, config_from_dict, to_toml
from colnet_mpi.metrics import reader
from colnet_mpi.metrics.reader import (
    IncompatibleRunsError,
    NotAResultsFileError,
    ReportError,
    UnfinishedRunWarning,
    aggregate,
    flatten_config,
    group_summary,
    load_run,
    load_runs,
    setting_label,
    settings,
    val_loss_curves,
)
from colnet_mpi.metrics.report import csv_header, write_report
from colnet_mpi.metrics.writer import TEST_METRICS, ResultsWriter

FACES_NODES = [
    {"task": "attributes", "count": 2},
    {"task": "landmarks", "count": 2},
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_config(
    *,
    scheme: str = "colnet",
    seed: int = 0,
    epochs: int = 2,
    rounds: int = 3,
    name: str = "run",
    dataset: str = "synthetic_faces",
    nodes: list[dict] | None = None,
    mode: str = "sync",
) -> Config:
    return config_from_dict(
        {
            "run": {"name": name, "seed": seed, "output": f"results/{name}.h5"},
            "data": {"dataset": dataset},
            "training": {"rounds": rounds, "local_epochs": epochs},
            "federation": {"scheme": scheme, "mode": mode},
            "nodes": nodes or FACES_NODES,
        }
    )


def write_run(
    path: Path,
    config: Config,
    rng: np.random.Generator,
    *,
    rounds: int | None = None,
    status: str = "finished",
    edit: Callable[[int, dict], None] | None = None,
) -> dict[str, np.ndarray]:
    """A results file with random metrics; returns the arrays written (NaN F1 etc. for landmarks).
    ``edit(r, rows)`` may change round ``r``'s rows before they are written."""
    from colnet_mpi.data import dataset_tasks

    tasks = dataset_tasks(config.data.dataset)
    names = [n.name for n in config.nodes]
    node_tasks = [n.task for n in config.nodes]
    groups = [tasks[t].group for t in node_tasks]
    no_scores = np.array([tasks[t].kind == "landmarks" for t in node_tasks])
    n, e = len(names), config.training.local_epochs
    writer = ResultsWriter(
        path,
        attrs={
            "config": to_toml(config),
            "seed": config.run.seed,
            "scheme": config.federation.scheme,
        },
        node_names=names,
        node_tasks=node_tasks,
        true_groups=groups,
        record_affinity=False,
    )
    written: dict[str, list[np.ndarray]] = {}
    for r in range(1, (rounds or config.training.rounds) + 1):
        rows: dict[str, np.ndarray | float | int] = {
            name: np.zeros((e, *series.row) if name.startswith("epoch/") else series.row)
            for name, series in writer.layout.items()
        }
        rows |= {
            "epoch/val_loss": rng.uniform(0.5, 2.0, size=(e, n)),
            "epoch/train_loss": rng.uniform(0.5, 2.0, size=(e, n)),
            "epoch/round": np.full(e, r),
            "round/group": np.zeros(n, dtype=int),
            "clustering/ari": 1.0,
        }
        for m in TEST_METRICS:
            values = rng.uniform(0.0, 1.0, size=n)
            if m != "loss":
                values[no_scores] = np.nan
            rows[f"round/test_{m}"] = values
        if edit is not None:
            edit(r, rows)
        writer.append(rows)
        for k, v in rows.items():
            written.setdefault(k, []).append(np.asarray(v))
    if status == "finished":
        writer.finish()
    else:
        writer.set_attrs(status=status)
    out = {k: np.stack(v) for k, v in written.items()}
    out["epoch/val_loss"] = np.concatenate(written["epoch/val_loss"])
    return out


@pytest.fixture(scope="module")
def sweep(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[tuple[str, int], dict[str, np.ndarray]]]:
    """Two schemes x three seeds, files named like a sweep's (<sweep>_<index>.h5)."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(7)
    truth = {}
    index = 0
    for scheme in ("colnet", "none"):
        for seed in (0, 1, 2):
            name = f"sw_{index}"
            cfg = make_config(scheme=scheme, seed=seed, name=name)
            truth[(scheme, seed)] = write_run(tmp_path / "sw" / f"{name}.h5", cfg, rng)
            index += 1
    return tmp_path / "sw", truth


def group_means(arr: np.ndarray, nodes: slice) -> np.ndarray:
    return arr[..., nodes].mean(axis=-1)


ATTR, LAND = slice(0, 2), slice(2, 4)


def test_load_run_reads_everything(sweep) -> None:
    folder, truth = sweep
    run = load_run(folder / "sw_0.h5")
    assert run.status == "finished" and run.finished
    assert run.seed == 0 and run.name == "sw_0" and run.dataset == "synthetic_faces"
    assert run.config.federation.scheme == "colnet"
    assert run.node_names == ("attributes-0", "attributes-1", "landmarks-0", "landmarks-1")
    assert run.groups == ("attributes", "landmarks")
    assert run.n_rounds == 3 and run.n_epochs == 6
    t = truth[("colnet", 0)]
    np.testing.assert_array_equal(run["round/test_loss"], t["round/test_loss"])
    np.testing.assert_array_equal(run["epoch/val_loss"], t["epoch/val_loss"])
    assert run["clustering/ari"].shape == (3,)
    assert "hca/weights" in run.data
    np.testing.assert_array_equal(run.read("round/test_loss"), t["round/test_loss"])
    assert run.read("epoch/val_loss").shape == (6, 4)
    final = run.final_round()
    np.testing.assert_array_equal(final["f1_micro"], t["round/test_f1_micro"][-1])
    np.testing.assert_array_equal(run.node_metrics(1)["loss"], t["round/test_loss"][0])
    with pytest.raises(IndexError, match="round 4"):
        run.node_metrics(4)


def test_group_summary_matches_numpy(sweep) -> None:
    folder, truth = sweep
    run = load_run(folder / "sw_1.h5")
    t = truth[("colnet", 1)]
    s = group_summary(run)
    for m in TEST_METRICS:
        assert s["attributes"][m] == pytest.approx(group_means(t[f"round/test_{m}"][-1], ATTR))
    assert s["landmarks"]["loss"] == pytest.approx(group_means(t["round/test_loss"][-1], LAND))
    assert math.isnan(s["landmarks"]["f1_micro"]) and math.isnan(s["landmarks"]["precision_macro"])
    s2 = group_summary(run, round=2)
    assert s2["attributes"]["loss"] == pytest.approx(group_means(t["round/test_loss"][1], ATTR))


def test_settings_ignore_seed_name_output(sweep) -> None:
    folder, _ = sweep
    runs = load_runs([folder])
    assert [r.name for r in runs] == [f"sw_{i}" for i in range(6)]
    assert settings(runs) == ("federation.scheme",)
    assert settings(runs[:3]) == ()
    assert settings(runs, ignore=["federation.scheme"]) == ()


def test_aggregate_mean_std_over_seeds(sweep) -> None:
    folder, truth = sweep
    rows = aggregate(load_runs([folder]))
    assert [(r.group, r.label) for r in rows] == [
        ("attributes", "scheme=colnet"),
        ("attributes", "scheme=none"),
        ("landmarks", "scheme=colnet"),
        ("landmarks", "scheme=none"),
    ]
    for row in rows:
        scheme = row.setting["federation.scheme"]
        nodes = ATTR if row.group == "attributes" else LAND
        assert row.n == 3 and row.seeds == (0, 1, 2)
        for m in TEST_METRICS:
            per_seed = [
                group_means(truth[(scheme, s)][f"round/test_{m}"][-1], nodes) for s in (0, 1, 2)
            ]
            stat = row.metrics[m]
            assert stat.n == 3
            if row.group == "landmarks" and m != "loss":
                assert math.isnan(stat.mean) and stat.format() == "–"
                continue
            assert stat.mean == pytest.approx(np.mean(per_seed))
            assert stat.std == pytest.approx(np.std(per_seed, ddof=1))


def test_single_run_has_no_std_and_by_node(sweep) -> None:
    folder, truth = sweep
    rows = aggregate([load_run(folder / "sw_0.h5")])
    assert [r.label for r in rows] == ["all runs", "all runs"]
    assert rows[0].n == 1 and math.isnan(rows[0].metrics["loss"].std)
    assert rows[0].metrics["loss"].format() == f"{rows[0].metrics['loss'].mean:.3f}"
    per_node = aggregate(load_runs([folder]), by="node")
    assert len(per_node) == 4 * 2
    first = per_node[0]
    assert first.group == "attributes-0" and first.label == "scheme=colnet"
    want = [truth[("colnet", s)]["round/test_f1_micro"][-1][0] for s in (0, 1, 2)]
    assert first.metrics["f1_micro"].mean == pytest.approx(np.mean(want))


def test_val_loss_curves(sweep) -> None:
    folder, truth = sweep
    curves = val_loss_curves(load_runs([folder]))
    assert [(c.group, c.label) for c in curves] == [
        ("attributes", "scheme=colnet"),
        ("attributes", "scheme=none"),
        ("landmarks", "scheme=colnet"),
        ("landmarks", "scheme=none"),
    ]
    c = curves[3]
    per_seed = np.stack(
        [group_means(truth[("none", s)]["epoch/val_loss"], LAND) for s in (0, 1, 2)]
    )
    np.testing.assert_array_equal(c.x, np.arange(1, 7))
    np.testing.assert_allclose(c.mean, per_seed.mean(axis=0))
    np.testing.assert_allclose(c.std, per_seed.std(axis=0, ddof=1))
    assert c.n == 3


def test_report_files(sweep, tmp_path: Path) -> None:
    folder, truth = sweep
    runs = load_runs([folder])
    text, written, note = write_report(runs, tmp_path / "rep")
    names = sorted(p.name for p in written)
    if note is None:
        # colnet and none differ in the scheme only: the paired tests come with the tables
        assert names == ["paired.csv", "table.csv", "table.md", "test_metrics.png", "val_loss.png"]
        for png in ("val_loss.png", "test_metrics.png"):
            data = (tmp_path / "rep" / png).read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 1000
    else:
        assert names == ["paired.csv", "table.csv", "table.md"] and "colnet-mpi[plot]" in note
    assert (tmp_path / "rep" / "table.md").read_text() == text

    tables = text.split("# Paired comparisons")[0]  # the paired tests follow (test_paired.py)
    table = [line for line in tables.splitlines() if line.startswith("|")]
    assert table[0] == "| Task group | Setting | n | Loss | Precision | Recall | F1 |"
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [(b[0], b[1], b[2]) for b in body] == [
        ("attributes", "scheme=colnet", "3"),
        ("", "scheme=none", "3"),
        ("landmarks", "scheme=colnet", "3"),
        ("", "scheme=none", "3"),
    ]
    f1 = [group_means(truth[("none", s)]["round/test_f1_micro"][-1], ATTR) for s in (0, 1, 2)]
    assert body[1][6] == f"{np.mean(f1):.3f} ± {np.std(f1, ddof=1):.3f}"
    assert body[3][3:] == [body[3][3], "–", "–", "–"] and "±" in body[3][3]

    with (tmp_path / "rep" / "table.csv").open() as fh:
        parsed = list(csv.DictReader(fh))
    assert list(parsed[0]) == csv_header(["federation.scheme"])
    assert [(p["dataset"], p["group"], p["federation.scheme"], p["n"]) for p in parsed] == [
        ("synthetic_faces", "attributes", "colnet", "3"),
        ("synthetic_faces", "attributes", "none", "3"),
        ("synthetic_faces", "landmarks", "colnet", "3"),
        ("synthetic_faces", "landmarks", "none", "3"),
    ]
    assert float(parsed[1]["f1_micro_mean"]) == pytest.approx(np.mean(f1))
    assert float(parsed[1]["f1_micro_std"]) == pytest.approx(np.std(f1, ddof=1))
    macro = [group_means(truth[("colnet", s)]["round/test_f1_macro"][-1], ATTR) for s in (0, 1, 2)]
    assert float(parsed[0]["f1_macro_mean"]) == pytest.approx(np.mean(macro))
    assert parsed[2]["f1_micro_mean"] == "" and parsed[2]["loss_mean"] != ""


def test_two_keys_label(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for i, (epochs, rounds) in enumerate([(2, 3), (3, 2)]):
        write_run(
            tmp_path / f"e_{i}.h5", make_config(epochs=epochs, rounds=rounds, name=f"e_{i}"), rng
        )
    runs = load_runs([tmp_path])
    assert settings(runs) == ("training.rounds", "training.local_epochs")
    rows = aggregate(runs)
    assert rows[0].label == "rounds=3, local_epochs=2"
    assert setting_label({"attack.kind": "boost", "model.privatization": 2}) == (
        "attack.kind=boost, privatization=2"
    )
    assert setting_label({"training.single_label.lr": 0.1, "hca.alpha": 0.4}) == (
        "single_label.lr=0.1, hca.alpha=0.4"
    )
    assert setting_label({}) == "all runs"
    curves = val_loss_curves(runs)
    assert len(curves[0].x) == 6 and len(curves[1].x) == 6


def test_different_datasets_name_both_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    a, b = tmp_path / "faces.h5", tmp_path / "digits.h5"
    write_run(a, make_config(), rng)
    digits = [{"task": "low_digits", "count": 2}, {"task": "high_digits", "count": 2}]
    write_run(b, make_config(dataset="digits", nodes=digits), rng)
    with pytest.raises(IncompatibleRunsError) as err:
        aggregate([load_run(a), load_run(b)])
    msg = str(err.value)
    assert str(a) in msg and str(b) in msg and "synthetic_faces" in msg and "digits" in msg


def test_report_splits_datasets_into_scenarios(tmp_path: Path, capsys) -> None:
    """A sweep over two configs (e.g. CIFAR-10 and CelebA) in one directory: one table per dataset."""
    rng = np.random.default_rng(6)
    digits = [{"task": "low_digits", "count": 2}, {"task": "high_digits", "count": 2}]
    for i, (dataset, nodes) in enumerate([("synthetic_faces", None), ("digits", digits)] * 2):
        scheme = "colnet" if i < 2 else "none"
        cfg = make_config(dataset=dataset, nodes=nodes, scheme=scheme, name=f"mix_{i}")
        write_run(tmp_path / "mix" / f"mix_{i}.h5", cfg, rng)
    out = tmp_path / "rep"
    assert cli_main(["report", str(tmp_path / "mix"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.index("## Dataset `synthetic_faces`") < text.index("## Dataset `digits`")
    assert text.count("| Task group | Setting |") == 2
    assert (
        "| low_digits | scheme=colnet | 1 |" in text and "| landmarks | scheme=colnet | 1 |" in text
    )
    with (out / "table.csv").open() as fh:
        parsed = list(csv.DictReader(fh))
    assert [p["dataset"] for p in parsed] == ["synthetic_faces"] * 4 + ["digits"] * 4


def test_different_node_sets_name_both_files(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(3)
    a, b = tmp_path / "four.h5", tmp_path / "six.h5"
    write_run(a, make_config(), rng)
    six = [{"task": "attributes", "count": 3}, {"task": "landmarks", "count": 3}]
    write_run(b, make_config(nodes=six), rng)
    with pytest.raises(IncompatibleRunsError) as err:
        val_loss_curves([load_run(a), load_run(b)])
    msg = str(err.value)
    assert str(a) in msg and str(b) in msg and "attributes-2" in msg
    assert cli_main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 2
    assert "six.h5" in capsys.readouterr().err


def test_unfinished_skipped_or_used(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(4)
    done = write_run(tmp_path / "a_0.h5", make_config(seed=0, name="a_0"), rng)
    part = write_run(
        tmp_path / "a_1.h5", make_config(seed=1, name="a_1"), rng, rounds=2, status="running"
    )
    with pytest.warns(UnfinishedRunWarning, match=r"a_1\.h5 \(running, 2 of 3 rounds\)"):
        runs = load_runs([tmp_path])
    assert [r.name for r in runs] == ["a_0"]
    with pytest.warns(UnfinishedRunWarning, match="last complete round"):
        runs = load_runs([tmp_path], include_unfinished=True)
    assert [r.name for r in runs] == ["a_0", "a_1"]
    row = aggregate(runs)[0]
    assert row.n == 2
    want = [
        group_means(done["round/test_loss"][-1], ATTR),
        group_means(part["round/test_loss"][1], ATTR),
    ]
    assert row.metrics["loss"].mean == pytest.approx(np.mean(want))
    curve = val_loss_curves(runs)[0]
    assert len(curve.x) == 4  # the common prefix of 6 and 4 epochs

    assert cli_main(["report", str(tmp_path), "--out", str(tmp_path / "r1"), "--no-figures"]) == 0
    captured = capsys.readouterr()
    assert "skipping 1 unfinished run(s)" in captured.err and "--include-unfinished" in captured.err
    assert "| attributes | all runs | 1 |" in captured.out
    args = ["report", str(tmp_path), "--out", str(tmp_path / "r2"), "--include-unfinished"]
    assert cli_main([*args, "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "| attributes | all runs | 2 |" in out and "(round 2, 3)" in out


def test_torn_last_round_is_dropped(tmp_path: Path) -> None:
    """A job killed in the middle of an append: only rounds every dataset holds are used."""
    import h5py

    path = tmp_path / "torn.h5"
    write_run(path, make_config(), np.random.default_rng(5), status="failed")
    with h5py.File(path, "a") as f:
        ds = f["round/test_loss"]
        ds.resize(ds.shape[0] + 1, axis=0)
    run = load_run(path)
    assert run.n_rounds == 3 and run["round/test_loss"].shape == (3, 4)


def test_bad_inputs(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="no .h5 results files found under .*empty"):
        load_runs([empty])
    with pytest.raises(ReportError, match="no such file or directory: .*nope"):
        load_runs([tmp_path / "nope"])
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(NotAResultsFileError, match="junk.h5: not a readable HDF5 file"):
        load_run(junk)
    import h5py

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(NotAResultsFileError, match="other.h5: not a colnet-mpi results file"):
        load_run(other)
    assert cli_main(["report", str(empty)]) == 2
    assert "no .h5 results files found" in capsys.readouterr().err
    assert cli_main(["report", str(junk), "--out", str(tmp_path / "r")]) == 2
    assert "junk.h5" in capsys.readouterr().err


def test_cli_default_out_and_stdout(sweep, capsys) -> None:
    folder, _ = sweep
    assert cli_main(["report", str(folder)]) == 0
    captured = capsys.readouterr()
    assert "| Task group | Setting | n | Loss | Precision | Recall | F1 |" in captured.out
    assert f"to {folder / 'report'}/" in captured.err
    assert (folder / "report" / "table.md").is_file() and (
        folder / "report" / "table.csv"
    ).is_file()
    assert cli_main(["report", str(folder / "sw_0.h5"), "--round", "9", "--no-figures"]) == 2
    assert "round 9 is not recorded" in capsys.readouterr().err


def test_missing_matplotlib_still_writes_tables(sweep, tmp_path: Path, monkeypatch, capsys) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    folder, _ = sweep
    out = tmp_path / "rep"
    assert cli_main(["report", str(folder), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "pip install 'colnet-mpi[plot]'" in err
    assert sorted(p.name for p in out.iterdir()) == ["paired.csv", "table.csv", "table.md"]


def test_public_names_and_metric_names() -> None:
    for name in reader.__all__:
        assert hasattr(reader, name)
    assert reader.TEST_METRICS == TEST_METRICS  # the reader's copy of the writer's names


def test_report_does_not_import_torch(sweep, tmp_path: Path) -> None:
    """The report runs on a login node without paying for torch."""
    import subprocess
    import sys

    code = (
        "import sys; from colnet_mpi.cli import main; "
        f"rc = main(['report', {str(sweep[0])!r}, '--out', {str(tmp_path / 'r')!r}, '--no-figures']); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_files_older_than_a_config_key_group_with_its_default(tmp_path: Path) -> None:
    """A file written before ``defense.norm_action`` existed ran with "exclude": it groups with
    new files that say so, and apart from new files that say "clip"."""
    import h5py

    rng = np.random.default_rng(3)
    old, new, clip = (tmp_path / f"{k}.h5" for k in ("old", "new", "clip"))
    write_run(old, make_config(seed=0, name="old"), rng)
    write_run(new, make_config(seed=1, name="new"), rng)
    raw = make_config(seed=2, name="clip")
    write_run(clip, config_from_dict({**_raw(raw), "defense": {"norm_action": "clip"}}), rng)
    with h5py.File(old, "r+") as f:
        text = f.attrs["config"]
        assert "norm_action" in text
        f.attrs["config"] = "\n".join(x for x in text.splitlines() if "norm_action" not in x)
    runs = load_runs([old, new])
    assert "defense.norm_action" not in flatten_config(runs[0].raw_config)
    assert runs[0].flat_config["defense.norm_action"] == "exclude"
    assert settings(runs) == ()
    assert settings(load_runs([old, new, clip])) == ("defense.norm_action",)


def _raw(config: Config) -> dict:
    import tomllib

    return tomllib.loads(to_toml(config))


def test_curve_panels_get_a_log_axis_when_values_span_more_than_10x(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from colnet_mpi.metrics.reader import Curve
    from colnet_mpi.metrics.report import plot_curves

    def curve(group: str, mean: list[float]) -> Curve:
        x = np.arange(1, len(mean) + 1)
        return Curve("faces", {}, "all runs", group, x, np.array(mean), np.zeros(len(mean)), 2)

    curves = [curve("landmarks", [70.0, 5.2, 1.1, 1.2]), curve("attributes", [0.6, 0.5, 0.45, 0.4])]
    fig = plot_curves(
        curves, tmp_path / "c.png", xlabel="round", ylabel=lambda c: "loss", title="t"
    )
    landmarks, attributes = fig.axes[0], fig.axes[1]
    assert landmarks.get_yscale() == "log" and "log" in landmarks.get_ylabel()
    assert attributes.get_yscale() == "linear"
    legend = landmarks.get_legend()
    assert legend is not None and legend.get_bbox_to_anchor().x0 >= landmarks.bbox.x1 - 1  # beside
    fig.draw_without_rendering()
    box = legend.get_window_extent()
    assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)  # over no panel


# --- --out that cannot be written: exit 2, one line, nothing read or written -----------------


def _no_reading(monkeypatch) -> None:
    """Fail the test if the report starts reading results (it must check --out first)."""
    from colnet_mpi.metrics import report

    def refuse(*args, **kwargs):
        raise AssertionError("results were read before --out was checked")

    monkeypatch.setattr(report, "load_runs", refuse)


def _bad_out(sweep, out: Path, capsys) -> str:
    folder, _ = sweep
    try:
        rc = cli_main(["report", str(folder), "--out", str(out)])
    except SystemExit as stop:  # a traceback-free exit would do too, as long as it is 2
        rc = stop.code
    assert rc == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert str(out) in lines[0]
    return lines[0]


def test_out_that_is_or_lies_under_a_regular_file(sweep, tmp_path: Path, monkeypatch, capsys):
    _no_reading(monkeypatch)
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    line = _bad_out(sweep, plain, capsys)
    assert "not a folder" in line
    for out in (plain / "report", plain / "deeper" / "report"):
        line = _bad_out(sweep, out, capsys)
        assert f"{plain} is a file, not a folder" in line
    assert plain.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_out_in_a_read_only_folder(sweep, tmp_path: Path, monkeypatch, capsys):
    import os

    _no_reading(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root: chmod does not stop it; make os.access answer as
        real_access = os.access  # it would for anyone else (the next test does the same)

        def access(path, mode, **kw):
            if Path(path) == locked and mode & os.W_OK:
                return False
            return real_access(path, mode, **kw)

        monkeypatch.setattr(os, "access", access)
    try:
        for out in (locked / "report", locked / "a" / "b"):
            line = _bad_out(sweep, out, capsys)
            assert f"{locked} is not writable" in line
        line = _bad_out(sweep, locked, capsys)  # the folder itself
        assert "not writable" in line
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_out_not_writable_says_so_even_as_root(sweep, tmp_path: Path, monkeypatch, capsys):
    """The same check with os.access answering "no", which chmod cannot make it do for root."""
    import os

    _no_reading(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path).absolute() == locked and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    line = _bad_out(sweep, locked / "report", capsys)
    assert f"{locked} is not writable (permission denied)" in line
    assert list(locked.iterdir()) == []


def test_out_that_can_be_made_still_works(sweep, tmp_path: Path, capsys):
    from colnet_mpi.metrics.report import out_dir_problem

    assert out_dir_problem(tmp_path) is None
    assert out_dir_problem(tmp_path / "a" / "b") is None
    folder, _ = sweep
    out = tmp_path / "a" / "b"
    assert cli_main(["report", str(folder), "--out", str(out), "--no-figures"]) == 0
    assert (out / "table.md").is_file()


# --- grouping: [attack] keys of clean runs do not split settings ------------------------------


def _with(config: Config, **sections: dict) -> Config:
    raw = _raw(config)
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return config_from_dict(raw)


def test_setting_config_marks_attack_keys_of_clean_runs() -> None:
    from colnet_mpi.metrics.reader import NOT_APPLICABLE, setting_config

    clean = {"attack.kind": "none", "attack.nodes": (1,), "attack.boost_scale": 3.0, "x.y": 1}
    assert setting_config(clean) == {
        "attack.kind": "none",
        "attack.nodes": NOT_APPLICABLE,
        "attack.boost_scale": NOT_APPLICABLE,
        "x.y": 1,
    }
    no_section = {"attack.nodes": (1,)}  # attack.kind defaults to none
    assert setting_config(no_section) == {"attack.nodes": NOT_APPLICABLE}
    attacked = {"attack.kind": "boost", "attack.nodes": (1,), "x.y": 1}
    assert setting_config(attacked) == attacked
    assert clean["attack.nodes"] == (1,)  # the input is left alone


def test_clean_runs_differing_only_in_attack_keys_share_a_setting(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    base = make_config(nodes=FACES_NODES)
    clean = [
        _with(base, run={"seed": 0, "name": "c0"}, attack={"nodes": [0]}),
        _with(base, run={"seed": 1, "name": "c1"}, attack={"nodes": [1], "boost_scale": 3.0}),
        _with(base, run={"seed": 2, "name": "c2"}, attack={"start_round": 2, "epsilon": 0.1}),
    ]
    for i, cfg in enumerate(clean):
        write_run(tmp_path / f"clean_{i}.h5", cfg, rng)
    runs = load_runs([tmp_path])
    assert settings(runs) == ()
    rows = aggregate(runs)
    assert [(r.group, r.label, r.n) for r in rows] == [
        ("attributes", "all runs", 3),
        ("landmarks", "all runs", 3),
    ]

    # attacked runs keep their [attack] keys; the clean ones are one setting among them
    attacked = [
        _with(base, run={"seed": 0, "name": "a0"}, attack={"kind": "boost", "nodes": [0]}),
        _with(base, run={"seed": 0, "name": "a1"}, attack={"kind": "boost", "nodes": [1]}),
    ]
    for i, cfg in enumerate(attacked):
        write_run(tmp_path / f"attacked_{i}.h5", cfg, rng)
    runs = load_runs([tmp_path])
    assert settings(runs) == ("attack.kind", "attack.nodes")
    labels = list(dict.fromkeys(r.label for r in aggregate(runs)))
    assert labels == [
        "attack.kind=boost, attack.nodes=[0]",
        "attack.kind=boost, attack.nodes=[1]",
        "attack.kind=none",
    ]
    clean_rows = [r for r in aggregate(runs) if r.label == "attack.kind=none"]
    assert all(r.n == 3 for r in clean_rows)

    out = tmp_path / "rep"
    write_report(runs, out, figures=False)
    with (out / "table.csv").open() as fh:
        parsed = list(csv.DictReader(fh))
    none = [p for p in parsed if p["attack.kind"] == "none"]
    assert len(none) == 2 and all(p["attack.nodes"] == "" and p["n"] == "3" for p in none)


def test_attack_keys_of_attacked_runs_still_split(tmp_path: Path) -> None:
    """Only clean runs lose their [attack] keys: two boost strengths stay two settings."""
    rng = np.random.default_rng(6)
    base = make_config(nodes=FACES_NODES)
    for scale in (2.0, 5.0):
        attack = {"kind": "boost", "boost_scale": scale}
        write_run(tmp_path / f"b{scale:g}.h5", _with(base, attack=attack), rng)
    assert settings(load_runs([tmp_path])) == ("attack.boost_scale",)


# ---------------------------------------------------------------------------------------------
# Asynchronous runs: nodes that finished before others


def test_latest_evaluation_fills_only_the_rounds_a_node_did_not_run() -> None:
    nan = math.nan
    values = np.array([[1.0, 5.0], [nan, 6.0], [3.0, nan], [nan, nan], [nan, nan]])
    ran = np.array([[True, True], [True, True], [True, False], [False, False], [False, False]])
    out = reader.latest_evaluation(values, ran)
    # node 0: round 2 ran without evaluation (stays NaN), rounds 4-5 not run: its round-3 value
    np.testing.assert_array_equal(out[:, 0], [1.0, nan, 3.0, 3.0, 3.0])
    np.testing.assert_array_equal(out[:, 1], [5.0, 6.0, 6.0, 6.0, 6.0])
    never = reader.latest_evaluation(np.full((2, 1), nan), np.array([[False], [False]]))
    assert np.isnan(never).all()


def early_finish(stopped: int, clocks: np.ndarray) -> Callable[[int, dict], None]:
    """``edit`` for :func:`write_run`: node 0 finished after round ``stopped`` (NaN metrics, clock
    and group after it, as an asynchronous run records it); ``clocks[r - 1]``: each node's
    ``round/clock``."""

    def edit(r: int, rows: dict) -> None:
        rows["round/clock"] = clocks[r - 1].astype(float).copy()
        if r > stopped:
            rows["round/clock"][0] = np.nan
            rows["round/group"][0] = -1
            for m in TEST_METRICS:
                rows[f"round/test_{m}"][0] = np.nan
            rows["epoch/val_loss"][:, 0] = np.nan

    return edit


CLOCKS = np.array(
    [[4.0, 2.0, 2.0, 2.1], [8.0, 4.0, 4.0, 4.2], [12.0, 6.0, 6.0, 6.3], [12.0, 8.0, 8.0, 8.4]]
)


def test_async_run_counts_a_node_that_finished_early_with_its_last_evaluation(tmp_path) -> None:
    """Node 0 (attributes) stops after round 2 of 4: in the table and the per-round curves its
    round-2 metrics stand for it in rounds 3-4; the same arrays in a synchronous run's file are
    taken as they are (NaN: no group mean)."""
    files = {}
    for mode in ("async", "sync"):
        cfg = make_config(rounds=4, mode=mode, name=mode)
        path = tmp_path / f"{mode}.h5"
        files[mode] = write_run(path, cfg, np.random.default_rng(3), edit=early_finish(2, CLOCKS))
    truth = files["async"]
    run = load_run(tmp_path / "async.h5")
    assert run.asynchronous and not load_run(tmp_path / "sync.h5").asynchronous
    f1 = truth["round/test_f1_micro"]
    expect = np.mean([f1[1, 0], f1[3, 1]])  # node 0's round 2, node 1's round 4
    assert group_summary(run)["attributes"]["f1_micro"] == pytest.approx(expect)
    assert group_summary(run, 2)["attributes"]["f1_micro"] == pytest.approx(f1[1, :2].mean())
    assert math.isnan(group_summary(load_run(tmp_path / "sync.h5"))["attributes"]["f1_micro"])
    curves = {c.group: c for c in reader.round_curves([run])}
    np.testing.assert_allclose(
        curves["attributes"].mean,
        [f1[0, :2].mean(), f1[1, :2].mean(), np.mean([f1[1, 0], f1[2, 1]]), expect],
    )
    # validation loss per epoch: the nodes that trained it
    val = val_loss_curves([run])[0]
    np.testing.assert_allclose(val.mean[-2:], truth["epoch/val_loss"][-2:, 1])


def test_time_curves_take_each_nodes_newest_evaluation_by_then(tmp_path) -> None:
    cfg = make_config(rounds=4, mode="async", name="t")
    truth = write_run(
        tmp_path / "t.h5", cfg, np.random.default_rng(5), edit=early_finish(2, CLOCKS)
    )
    run = load_run(tmp_path / "t.h5")
    f1, loss = truth["round/test_f1_micro"], truth["round/test_loss"]
    times = np.array([1.0, 2.0, 3.9, 4.0, 7.0, 11.9, 12.0])
    got = reader.group_over_time(run, "f1_micro", run.nodes_of("attributes"), times)
    expect = [
        math.nan,  # node 0 not evaluated yet
        math.nan,
        math.nan,
        np.mean([f1[0, 0], f1[1, 1]]),  # node 0's round 1 (4 s), node 1's round 2 (4 s)
        np.mean([f1[0, 0], f1[2, 1]]),
        np.mean([f1[1, 0], f1[3, 1]]),  # node 0 finished after round 2 (8 s)
        np.mean([f1[1, 0], f1[3, 1]]),
    ]
    np.testing.assert_allclose(got, expect)
    curves = {c.group: c for c in reader.time_curves([run], "loss", points=5)}
    c = curves["landmarks"]
    # up to the last node-round's end (8.4 s; node 0 did not run round 3)
    np.testing.assert_allclose(c.x, np.linspace(0.0, 8.4, 5))
    # landmarks nodes 2, 3 at 2.1 s: node 3's round 1 ends at 2.1 s; at 5.5 s both in round 2
    assert c.mean[1] == pytest.approx(loss[0, 2:].mean())
    at = reader.group_over_time(run, "loss", run.nodes_of("landmarks"), np.array([5.5]))
    assert at[0] == pytest.approx(loss[1, 2:].mean())
    assert c.n == 1 and np.isnan(c.std).all()
    # F1 of landmarks: no evaluation at any time
    assert np.isnan(reader.time_curves([run], "f1_micro", points=5)[1].mean).all()


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_report_of_async_runs_adds_the_wall_time_figure(tmp_path, mode) -> None:
    pytest.importorskip("matplotlib")
    for seed in (0, 1):
        cfg = make_config(rounds=4, mode=mode, seed=seed, name=f"m{seed}")
        write_run(
            tmp_path / "runs" / f"m{seed}.h5",
            cfg,
            np.random.default_rng(seed),
            edit=early_finish(2, CLOCKS),
        )
    _, written, _ = write_report(load_runs([tmp_path / "runs"]), tmp_path / "out")
    names = sorted(p.name for p in written)
    timed = tmp_path / "out" / "test_metrics_time.png"
    assert (timed in written) == (mode == "async"), names
    if mode == "async":
        assert timed.read_bytes()[:8] == PNG_MAGIC
        text = (tmp_path / "out" / "table.md").read_text()
        assert "counts with its last evaluation" in text
        assert (
            "| attributes | all runs | 2 | " in text
            and "| – | – | – | – |" not in text.split("landmarks")[0]
        )


def test_keys_of_async_rounds_do_not_split_synchronous_runs(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    base = make_config(nodes=FACES_NODES)
    # federation.max_staleness has no effect in synchronous rounds: one setting
    for i, s in enumerate((1, 3)):
        cfg = _with(base, run={"seed": i, "name": f"s{i}"}, federation={"max_staleness": s})
        write_run(tmp_path / f"sync_{i}.h5", cfg, rng)
    runs = load_runs([tmp_path])
    assert settings(runs) == ()
    for i, s in enumerate((1, -1)):
        fed = {"mode": "async", "max_staleness": s}
        write_run(
            tmp_path / f"async_{i}.h5", _with(base, run={"name": f"a{i}"}, federation=fed), rng
        )
    runs = load_runs([tmp_path])
    assert settings(runs) == ("federation.mode", "federation.max_staleness")
    labels = list(dict.fromkeys(r.label for r in aggregate(runs)))
    assert labels == ["mode=async, max_staleness=1", "mode=async, max_staleness=-1", "mode=sync"]
    assert [r.n for r in aggregate(runs) if r.label == "mode=sync"] == [2, 2]
