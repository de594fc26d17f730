"""Unit tests for the robustness part of ``colnet-mpi report`` on synthetic files with planted values."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from colnet_mpi.cli import main as cli_main
from colnet_mpi.config import Config, config_from_dict, to_toml
from colnet_mpi.metrics import robustness
from colnet_mpi.metrics.reader import load_runs
from colnet_mpi.metrics.robustness import (
    ROBUSTNESS_METRICS,
    NodeBars,
    attack_scenarios,
    defense_costs,
    node_bars,
    plot_attacks,
    robustness_csv_header,
    robustness_rows,
)
from colnet_mpi.metrics.writer import TEST_METRICS, ResultsWriter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROUNDS = 3
SEEDS = (0, 1)
KINDS = ("none", "label_flip", "boost")
DEFENSES = (False, True)

#: dataset -> (nodes, attacker index, node indices per true group, nodes with an F1)
SCENARIOS = {
    "digits": (
        [{"task": "low_digits", "count": 3}, {"task": "high_digits", "count": 3}],
        1,
        {"low_digits": [0, 1, 2], "high_digits": [3, 4, 5]},
        [0, 1, 2, 3, 4, 5],
    ),
    "synthetic_faces": (
        [{"task": "attributes", "count": 2}, {"task": "landmarks", "count": 2}],
        0,
        {"attributes": [0, 1], "landmarks": [2, 3]},
        [0, 1],
    ),
}


def make_config(
    dataset: str, kind: str, defended: bool, seed: int, name: str, scheme: str = "colnet"
) -> Config:
    nodes, attacker, _, _ = SCENARIOS[dataset]
    return config_from_dict(
        {
            "run": {"name": name, "seed": seed, "output": f"results/{name}.h5"},
            "data": {"dataset": dataset},
            "training": {"rounds": ROUNDS, "local_epochs": 1},
            "federation": {"scheme": scheme},
            "attack": {"kind": kind, "nodes": [attacker], "start_round": 1},
            "defense": {"screening": defended, "verify_leader": defended},
            "nodes": nodes,
        }
    )


def write_run(path: Path, config: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A finished results file with random planted values; returns them, one row per round."""
    from colnet_mpi.data import dataset_tasks

    tasks = dataset_tasks(config.data.dataset)
    node_tasks = [n.task for n in config.nodes]
    no_f1 = np.array([tasks[t].kind == "landmarks" for t in node_tasks])
    n = len(node_tasks)
    writer = ResultsWriter(
        path,
        attrs={"config": to_toml(config), "seed": config.run.seed},
        node_names=[nd.name for nd in config.nodes],
        node_tasks=node_tasks,
        true_groups=[tasks[t].group for t in node_tasks],
        record_affinity=False,
    )
    attacker = config.attack.nodes[0]
    written: dict[str, list[np.ndarray]] = {}
    for r in range(1, ROUNDS + 1):
        rows: dict[str, np.ndarray | float | int] = {
            k: np.zeros((1, *s.row) if k.startswith("epoch/") else s.row)
            for k, s in writer.layout.items()
        }
        active = np.zeros(n, dtype=int)  # planted from round 2 on, the config says round 1
        if config.attack.kind != "none" and r >= 2:
            active[attacker] = 1
        group = rng.integers(0, 2, size=n)
        group[rng.random(n) < 0.25] = -1
        ari = float(rng.uniform(-0.2, 1.0))
        if config.federation.scheme == "none":  # as the writer does: every node alone, no ARI
            group, ari = np.arange(n), math.nan
        rows |= {
            "epoch/round": np.full(1, r),
            "round/group": group,
            "clustering/ari": ari,
            "attack/active": active,
            "defense/excluded": (rng.random(n) < 0.3).astype(int),
            "defense/leader_rejected": (rng.random(n) < 0.4).astype(int),
        }
        for m in TEST_METRICS:
            values = rng.uniform(0.0, 1.0, size=n) * (3.0 if m == "loss" else 1.0)
            if m != "loss":
                values[no_f1] = np.nan
            rows[f"round/test_{m}"] = values
        writer.append(rows)
        for k, v in rows.items():
            written.setdefault(k, []).append(np.asarray(v))
    writer.finish()
    return {k: np.stack(v) for k, v in written.items()}


Key = tuple[str, str, bool, int]  # dataset, attack.kind, defenses on, seed


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[Key, dict]]:
    """Two datasets x (clean, label flip, boost) x defenses off/on x 2 seeds.

    The clean runs are written seed 1 first, so pairing by position instead of seed would fail.
    """
    folder = tmp_path_factory.mktemp("rob") / "rob"
    rng = np.random.default_rng(11)
    truth: dict[Key, dict] = {}
    index = 0
    for dataset in SCENARIOS:
        for kind in KINDS:
            for defended in DEFENSES:
                for seed in (1, 0) if kind == "none" else SEEDS:
                    name = f"rob_{index}"
                    cfg = make_config(dataset, kind, defended, seed, name)
                    truth[(dataset, kind, defended, seed)] = write_run(
                        folder / f"{name}.h5", cfg, rng
                    )
                    index += 1
    return folder, truth


# --- the expected numbers, computed here from the planted arrays -------------------------------


def stat(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(np.mean(arr)), float(np.std(arr, ddof=1))


def mean_at(arr: np.ndarray, idx: list[int]) -> float:
    return float(np.mean(arr[idx])) if idx else math.nan


def expected_row(truth: dict[Key, dict], dataset: str, kind: str, defended: bool) -> dict:
    _, attacker, groups, scored = SCENARIOS[dataset]
    n = sum(len(v) for v in groups.values())
    unscored = [i for i in range(n) if i not in scored]
    per_seed: dict[str, list[float]] = {m: [] for m in ROBUSTNESS_METRICS}
    for seed in SEEDS:
        a = truth[(dataset, kind, defended, seed)]
        c = truth[(dataset, "none", defended, seed)]
        caught = (a["defense/excluded"] == 1) | (a["round/group"] == -1)
        ari = a["clustering/ari"]
        if kind == "none":
            values = {m: math.nan for m in ROBUSTNESS_METRICS}
            values["benign_f1_clean"] = mean_at(c["round/test_f1_micro"][-1], scored)
            values["false_positives"] = float(caught.mean())
        else:
            df1 = a["round/test_f1_micro"][-1] - c["round/test_f1_micro"][-1]
            dloss = a["round/test_loss"][-1] - c["round/test_loss"][-1]
            benign = [i for i in range(n) if i != attacker]
            own = next(g for g, members in groups.items() if attacker in members)
            same = [i for i in groups[own] if i != attacker]
            other = [i for i in benign if i not in same]
            f1s = [i for i in benign if i in scored]
            values = {
                "benign_f1": mean_at(df1, f1s),
                "same_group_f1": mean_at(df1, [i for i in same if i in scored]),
                "other_group_f1": mean_at(df1, [i for i in other if i in scored]),
                "benign_loss": mean_at(dloss, [i for i in benign if i in unscored]),
                "same_group_loss": mean_at(dloss, [i for i in same if i in unscored]),
                "other_group_loss": mean_at(dloss, [i for i in other if i in unscored]),
                "attacker_f1": mean_at(df1, [attacker] if attacker in scored else []),
                "attacker_loss": float(dloss[attacker]),
                "benign_f1_clean": mean_at(c["round/test_f1_micro"][-1], f1s),
                "benign_f1_attacked": mean_at(a["round/test_f1_micro"][-1], f1s),
                # attack/active is 1 for the attacker from round 2 on: rounds 2 and 3
                "attacker_caught": float(caught[1:, attacker].mean()),
                "false_positives": float(caught[:, benign].mean()),
            }
        values["ari_final"] = float(ari[-1])
        values["ari_mean"] = float(ari.mean())
        # clean rows: every node counts as benign
        benign_nodes = [i for i in range(n) if i != attacker or kind == "none"]
        true = [next(g for g, m in groups.items() if i in m) for i in benign_nodes]
        values["ari_benign"] = adjusted_rand_score(true, a["round/group"][-1][benign_nodes])
        values["leader_rejected"] = float(a["defense/leader_rejected"].sum())
        for m in ROBUSTNESS_METRICS:
            per_seed[m].append(values[m])
    return {m: stat(v) for m, v in per_seed.items()}


def assert_close(got: float, want: float) -> None:
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(want, abs=1e-12)


LABELS = {False: "screening=false, verify_leader=false", True: "screening=true, verify_leader=true"}
ORDER = [(kind, defended) for kind in KINDS for defended in DEFENSES]


def test_rows_match_numpy(attacked) -> None:
    folder, truth = attacked
    runs = load_runs([folder])
    assert list(attack_scenarios(runs)) == ["digits", "synthetic_faces"]
    rows = robustness_rows(runs)
    assert [(r.dataset, r.attack, r.label) for r in rows] == [
        (d, k, LABELS[on]) for d in SCENARIOS for k, on in ORDER
    ]
    for row in rows:
        on = row.setting["defense.screening"]
        assert row.setting == {"defense.screening": on, "defense.verify_leader": on}
        assert row.n == 2 and sorted(row.seeds) == [0, 1]
        if row.clean:
            assert row.attackers == () and row.clean_paths == ()
        else:
            attacker = SCENARIOS[row.dataset][1]
            assert row.attackers == (runs_node_name(runs, row.dataset, attacker),)
            # each attacked run is paired with the clean run of its own seed and setting
            for path, clean in zip(row.paths, row.clean_paths, strict=True):
                a = next(r for r in runs if r.path == path)
                c = next(r for r in runs if r.path == clean)
                assert a.seed == c.seed and c.flat_config["attack.kind"] == "none"
                assert c.flat_config["defense.screening"] == on
        want = expected_row(truth, row.dataset, row.attack, on)
        for m in ROBUSTNESS_METRICS:
            assert_close(row.metrics[m].mean, want[m][0])
            assert_close(row.metrics[m].std, want[m][1])


def runs_node_name(runs, dataset: str, index: int) -> str:
    return next(r for r in runs if r.dataset == dataset).node_names[index]


def test_same_group_and_defense_numbers_are_not_trivial(attacked) -> None:
    """The planted data makes the splits differ, so a wrong split cannot pass by accident."""
    folder, _ = attacked
    rows = robustness_rows(load_runs([folder]))
    boost = next(r for r in rows if r.dataset == "digits" and r.attack == "boost")
    m = boost.metrics
    assert m["same_group_f1"].mean != pytest.approx(m["other_group_f1"].mean)
    assert m["benign_f1"].mean != pytest.approx(m["same_group_f1"].mean)
    assert m["attacker_caught"].mean != pytest.approx(m["false_positives"].mean)
    faces = next(r for r in rows if r.dataset == "synthetic_faces" and r.attack == "boost")
    assert math.isnan(faces.metrics["other_group_f1"].mean)  # landmarks have no F1
    assert not math.isnan(faces.metrics["benign_loss"].mean)


def test_defense_cost(attacked) -> None:
    folder, truth = attacked
    costs = defense_costs(load_runs([folder]))
    assert [(c.dataset, c.label, c.baseline_label) for c in costs] == [
        (d, LABELS[True], LABELS[False]) for d in SCENARIOS
    ]
    for cost in costs:
        _, _, _, scored = SCENARIOS[cost.dataset]
        unscored = [i for i in range(4) if i not in scored] if cost.dataset != "digits" else []
        f1, loss = [], []
        for seed in SEEDS:
            on = truth[(cost.dataset, "none", True, seed)]
            off = truth[(cost.dataset, "none", False, seed)]
            f1.append(
                mean_at(on["round/test_f1_micro"][-1] - off["round/test_f1_micro"][-1], scored)
            )
            loss.append(mean_at(on["round/test_loss"][-1] - off["round/test_loss"][-1], unscored))
        assert cost.f1.mean == pytest.approx(np.mean(f1))
        assert cost.f1.std == pytest.approx(np.std(f1, ddof=1))
        if unscored:
            assert cost.loss.mean == pytest.approx(np.mean(loss))
        else:
            assert math.isnan(cost.loss.mean)


def test_node_bars(attacked) -> None:
    folder, truth = attacked
    bars = node_bars(load_runs([folder]), "loss")
    assert len(bars) == 2 * len(ORDER)
    b = next(
        b
        for b in bars
        if b.dataset == "digits" and b.attack == "label_flip" and b.setting["defense.screening"]
    )
    stack = np.stack(
        [truth[("digits", "label_flip", True, s)]["round/test_loss"][-1] for s in SEEDS]
    )
    np.testing.assert_allclose(b.mean, stack.mean(axis=0))
    np.testing.assert_allclose(b.std, stack.std(axis=0, ddof=1))
    assert b.attackers == (1,) and b.n == 2 and b.nodes[1] == "low_digits-1"
    f1 = node_bars(load_runs([folder]), "f1_micro")
    faces = next(b for b in f1 if b.dataset == "synthetic_faces" and b.attack == "none")
    assert faces.attackers == () and np.isnan(faces.mean[2:]).all()


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_cli_writes_robustness_section(attacked, tmp_path: Path, capsys) -> None:
    folder, truth = attacked
    out = tmp_path / "rep"
    assert cli_main(["report", str(folder), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert (out / "table.md").read_text() == text
    assert text.index("# Average client test metrics") < text.index("# Robustness to attacks")
    section = text[text.index("# Robustness to attacks") :]
    assert section.index("## Dataset `digits`") < section.index("## Dataset `synthetic_faces`")
    assert "Attacker(s): low_digits-1 (task group low_digits)." in section
    assert "Attacker(s): attributes-0 (task group attributes)." in section
    digits = section[: section.index("## Dataset `synthetic_faces`")]
    table = [line for line in digits.splitlines() if line.startswith("|")]
    assert cells(table[0])[:4] == ["Attack", "Setting", "n", "ΔF1 benign"]
    body = [cells(line) for line in table[2:]]
    assert [(b[0], b[1], b[2]) for b in body] == [
        ("none (clean)", LABELS[False], "2"),
        ("", LABELS[True], "2"),
        ("label_flip", LABELS[False], "2"),
        ("", LABELS[True], "2"),
        ("boost", LABELS[False], "2"),
        ("", LABELS[True], "2"),
    ]
    want = expected_row(truth, "digits", "boost", True)
    boost = body[5]

    def delta(m: str) -> str:
        return f"{want[m][0]:+.3f} ± {want[m][1]:.3f}"

    def plain(m: str, digits: int) -> str:
        return f"{want[m][0]:.{digits}f} ± {want[m][1]:.{digits}f}"

    assert boost[3:] == [
        delta("benign_f1"),
        delta("same_group_f1"),
        delta("other_group_f1"),
        "–",  # every digits node has an F1
        delta("attacker_f1"),
        plain("ari_final", 2),
        plain("ari_mean", 2),
        plain("ari_benign", 2),
        plain("attacker_caught", 2),
        plain("false_positives", 2),
        plain("leader_rejected", 1),
    ]
    assert body[0][3:8] == ["–"] * 5 and body[0][11] == "–"  # clean: no change, no attacker
    on = [
        mean_at(
            truth[("digits", "none", True, s)]["round/test_f1_micro"][-1]
            - truth[("digits", "none", False, s)]["round/test_f1_micro"][-1],
            list(range(6)),
        )
        for s in SEEDS
    ]
    assert (
        f"Defense cost (clean runs, {LABELS[True]} minus {LABELS[False]}): "
        f"ΔF1 = {np.mean(on):+.3f} ± {np.std(on, ddof=1):.3f} (n = 2)." in digits
    )
    faces_table = [
        cells(line)
        for line in section[section.index("## Dataset `synthetic_faces`") :].splitlines()
        if line.startswith("| label_flip")
    ]
    lf = expected_row(truth, "synthetic_faces", "label_flip", False)
    assert faces_table[0][6] == f"{lf['benign_loss'][0]:+.3f} ± {lf['benign_loss'][1]:.3f}"
    assert faces_table[0][5] == "–"  # other group = landmarks: no F1

    with (out / "robustness.csv").open() as fh:
        parsed = list(csv.DictReader(fh))
    keys = ["defense.screening", "defense.verify_leader"]
    assert list(parsed[0]) == robustness_csv_header(keys)
    assert len(parsed) == 2 * len(ORDER)
    for p in parsed:
        on = p["defense.screening"] == "true"
        want = expected_row(truth, p["dataset"], p["attack"], on)
        for m in ROBUSTNESS_METRICS:
            for j, suffix in enumerate(("mean", "std")):
                if math.isnan(want[m][j]):
                    assert p[f"{m}_{suffix}"] == ""
                else:
                    assert float(p[f"{m}_{suffix}"]) == pytest.approx(want[m][j], abs=1e-12)

    for name in ("attacks_digits.png", "attacks_synthetic_faces.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_no_section_without_attack_differences(attacked, tmp_path: Path, capsys) -> None:
    folder, _ = attacked
    runs = load_runs([folder])
    only_boost = [r for r in runs if r.flat_config["attack.kind"] == "boost"]
    assert robustness_rows(only_boost) == [] and attack_scenarios(only_boost) == {}
    no_clean = [r for r in runs if r.flat_config["attack.kind"] != "none"]
    assert robustness_rows(no_clean) == []  # attacks differ, but nothing to compare with
    clean = tmp_path / "clean"
    clean.mkdir()
    for r in runs:
        if r.flat_config["attack.kind"] == "none" and r.dataset == "digits":
            (clean / r.path.name).write_bytes(r.path.read_bytes())
    out = tmp_path / "rep"
    assert cli_main(["report", str(clean), "--out", str(out), "--no-figures"]) == 0
    text = capsys.readouterr().out
    assert "Robustness" not in text and "| Task group |" in text
    assert not (out / "robustness.csv").exists()


def test_unpaired_attacked_run_is_left_out(attacked, tmp_path: Path) -> None:
    folder, truth = attacked
    runs = [
        r
        for r in load_runs([folder])
        if r.dataset == "digits"
        and not r.flat_config["defense.screening"]
        and not (r.flat_config["attack.kind"] == "none" and r.seed == 1)
    ]
    with pytest.warns(UserWarning, match=r"left out of the robustness table: .*seed 1") as caught:
        rows = robustness_rows(runs)
    assert len(caught) == 1
    assert [(r.attack, r.n, r.seeds) for r in rows] == [
        ("none", 1, (0,)),
        ("label_flip", 1, (0,)),
        ("boost", 1, (0,)),
    ]
    a = truth[("digits", "boost", False, 0)]["round/test_f1_micro"][-1]
    c = truth[("digits", "none", False, 0)]["round/test_f1_micro"][-1]
    assert rows[2].metrics["benign_f1"].mean == pytest.approx(np.mean((a - c)[[0, 2, 3, 4, 5]]))
    assert math.isnan(rows[2].metrics["benign_f1"].std)


def test_public_names_and_no_torch() -> None:
    for name in robustness.__all__:
        assert hasattr(robustness, name)
    import subprocess
    import sys

    code = (
        "import sys, colnet_mpi.metrics.robustness, colnet_mpi.metrics.report; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_attack_figure_uses_a_log_axis_only_for_a_blown_up_loss(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")

    def bars(attack: str, metric: str, mean: list[float]) -> NodeBars:
        return NodeBars(
            dataset="digits",
            setting={},
            label="all runs",
            attack=attack,
            attack_label=attack,
            metric=metric,
            nodes=("a", "b", "c"),
            mean=np.array(mean),
            std=np.zeros(3),
            n=2,
            attackers=(0,),
        )

    f1 = [bars("none", "f1_micro", [0.7, 0.8, 0.6]), bars("boost", "f1_micro", [0.5, 0.7, 0.6])]
    for blown, scale in ((2.5, "linear"), (15.0, "log"), (1e9, "log")):
        loss = [bars("none", "loss", [1.0, 1.2, 0.9]), bars("boost", "loss", [blown, 1.1, 1.0])]
        fig = plot_attacks(f1, loss, tmp_path / "a.png")
        f1_ax, loss_ax = fig.axes[0], fig.axes[1]
        assert f1_ax.get_yscale() == "linear" and loss_ax.get_yscale() == scale
        assert (tmp_path / "a.png").read_bytes().startswith(PNG_MAGIC)

    # the legend sits outside every panel: it covers no data
    fig.draw_without_rendering()
    assert len(fig.legends) == 1
    legend = fig.legends[0].get_window_extent()
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent())


def test_no_clustering_has_no_ari_anywhere(tmp_path: Path, capsys) -> None:
    """federation.scheme = none groups nobody: all three ARI cells of its rows read "–" (empty
    in the CSV), never 0.00 from the singleton group ids, while a clustering scheme has numbers."""
    rng = np.random.default_rng(5)
    folder = tmp_path / "runs"
    index = 0
    for scheme in ("none", "colnet"):
        for kind in ("none", "boost"):
            for seed in SEEDS:
                cfg = make_config("digits", kind, False, seed, f"s_{index}", scheme=scheme)
                write_run(folder / f"s_{index}.h5", cfg, rng)
                index += 1
    rows = robustness_rows(load_runs([folder]))
    ari = ("ari_final", "ari_mean", "ari_benign")
    for row in rows:
        values = [row.metrics[m].mean for m in ari]
        if row.setting["federation.scheme"] == "none":
            assert all(math.isnan(v) for v in values), (row.attack, values)
        else:
            assert not any(math.isnan(v) for v in values), (row.attack, values)

    out = tmp_path / "rep"
    assert cli_main(["report", str(folder), "--out", str(out), "--no-figures"]) == 0
    section = capsys.readouterr().out.split("# Robustness to attacks")[1]
    section = section.split("# Paired comparisons")[0]
    body = [cells(line) for line in section.splitlines() if line.startswith("|")][2:]
    assert len(body) == 4
    for b in body:
        if b[1] == "scheme=none":
            assert b[8:11] == ["–", "–", "–"], b
        else:
            assert "–" not in b[8:11], b
    with (out / "robustness.csv").open() as fh:
        parsed = list(csv.DictReader(fh))
    for p in parsed:
        cols = [p[f"{m}_{s}"] for m in ari for s in ("mean", "std")]
        if p["federation.scheme"] == "none":
            assert cols == [""] * 6, p
        else:
            assert all(c != "" for c in cols), p
