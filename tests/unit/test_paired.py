"""Paired Wilcoxon signed-rank comparisons in ``colnet-mpi report`` (colnet_mpi.metrics.paired)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import wilcoxon

from colnet_mpi.cli import main as cli_main
from colnet_mpi.metrics.paired import POOLED, Comparison, compare, parse_reference, smallest_p
from colnet_mpi.metrics.reader import ReportError, group_summary, load_runs
from tests.unit.test_report import make_config, write_run

DIGIT_NODES = [{"task": "low_digits", "count": 2}, {"task": "high_digits", "count": 2}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """Faces: three schemes x 4 seeds, plus colnet and none at 3 local epochs (seeds 0, 1)."""
    folder = tmp_path_factory.mktemp("paired")
    rng = np.random.default_rng(11)
    i = 0
    for seed in range(4):
        for scheme in ("none", "colnet", "intra"):
            write_run(
                folder / f"p_{i}.h5", make_config(scheme=scheme, seed=seed, name=f"p_{i}"), rng
            )
            i += 1
    for seed in range(2):
        for scheme in ("none", "colnet"):
            cfg = make_config(scheme=scheme, seed=seed, epochs=3, name=f"p_{i}")
            write_run(folder / f"p_{i}.h5", cfg, rng)
            i += 1
    return load_runs([folder])


def _by(runs, scheme: str, seed: int, epochs: int = 2):
    (run,) = [
        r
        for r in runs
        if r.seed == seed
        and r.flat_config["federation.scheme"] == scheme
        and r.flat_config["training.local_epochs"] == epochs
    ]
    return run


def _label(text: str) -> dict[str, str]:
    return dict(part.split("=") for part in text.split(", "))


def test_differences_pair_by_seed_and_sign_favours_the_reference(runs) -> None:
    comps = compare(runs)
    # (2 epochs: none, intra) + (3 epochs: none), each in 2 groups; no pooled row (F1 vs loss)
    assert len(comps) == 6
    assert {c.reference for c in comps} == {
        "local_epochs=2, scheme=colnet",
        "local_epochs=3, scheme=colnet",
    }
    for c in comps:
        ref, oth = _label(c.reference), _label(c.other)
        epochs, other = int(ref["local_epochs"]), oth["scheme"]
        assert oth["local_epochs"] == ref["local_epochs"] and other != "colnet"
        assert c.seeds == tuple(range(4 if epochs == 2 else 2))
        expected = []
        for seed in c.seeds:
            ref = group_summary(_by(runs, "colnet", seed, epochs))[c.group]
            oth = group_summary(_by(runs, other, seed, epochs))[c.group]
            if c.group == "attributes":
                assert c.metric == "f1_micro"
                expected.append(ref["f1_micro"] - oth["f1_micro"])
            else:  # landmarks have no F1: lower loss is better
                assert c.metric == "loss"
                expected.append(oth["loss"] - ref["loss"])
        np.testing.assert_allclose(c.differences, expected)
        assert c.p_value() == pytest.approx(wilcoxon(expected).pvalue)
        assert c.p_value("greater") == pytest.approx(
            wilcoxon(expected, alternative="greater").pvalue
        )
        better, ties, worse = c.record
        assert better == sum(d > 0 for d in expected) and ties == 0
        assert better + worse == c.n


def test_exact_p_values_and_degenerate_cases() -> None:
    all_better = Comparison("d", "g", "loss", "a", "b", (0.1, 0.2, 0.3, 0.4, 0.5), (0, 1, 2, 3, 4))
    assert all_better.p_value("greater") == pytest.approx(1 / 32)
    assert all_better.p_value() == pytest.approx(smallest_p(5)) == pytest.approx(1 / 16)
    all_worse = Comparison("d", "g", "loss", "a", "b", (-0.1, -0.2, -0.3), (0, 1, 2))
    assert all_worse.p_value("greater") == pytest.approx(1.0)
    assert all_worse.record == (0, 0, 3)
    assert math.isnan(Comparison("d", "g", "loss", "a", "b", (0.0, 0.0), (0, 1)).p_value())
    assert math.isnan(Comparison("d", "g", "loss", "a", "b", (), ()).p_value())
    assert math.isnan(Comparison("d", "g", "loss", "a", "b", (0.1, math.nan), (0, 1)).p_value())


def test_groups_with_the_same_metric_are_pooled(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for i, (seed, scheme) in enumerate((s, k) for s in range(3) for k in ("colnet", "fedper")):
        cfg = make_config(
            scheme=scheme, seed=seed, name=f"d_{i}", dataset="digits", nodes=DIGIT_NODES
        )
        write_run(tmp_path / f"d_{i}.h5", cfg, rng)
    comps = compare(load_runs([tmp_path]))
    groups = [c.group for c in comps]
    assert groups == ["low_digits", "high_digits", POOLED]
    pooled = comps[-1]
    assert pooled.differences == comps[0].differences + comps[1].differences
    assert pooled.n == 6 and pooled.metric == "f1_micro"


def test_no_comparison_without_the_key_or_the_value(runs) -> None:
    same_scheme = [r for r in runs if r.flat_config["federation.scheme"] == "none"]
    assert compare(same_scheme) == []
    assert compare(runs, reference=("federation.scheme", "fedper")) == []
    intra = compare(runs, reference=("federation.scheme", "intra"))
    assert {c.other for c in intra} == {
        "local_epochs=2, scheme=none",
        "local_epochs=2, scheme=colnet",
    }


def test_parse_reference() -> None:
    assert parse_reference("federation.scheme=colnet") == ("federation.scheme", "colnet")
    for bad in ("colnet", "scheme=colnet", "federation.scheme="):
        with pytest.raises(ReportError, match="SECTION.KEY=VALUE"):
            parse_reference(bad)


def test_report_writes_the_section_and_csv(runs, tmp_path: Path, capsys) -> None:
    folder = runs[0].path.parent
    out = tmp_path / "rep"
    assert cli_main(["report", str(folder), "--out", str(out), "--no-figures"]) == 0
    text = (out / "table.md").read_text()
    assert "# Paired comparisons over seeds (Wilcoxon signed-rank)" in text
    assert "local_epochs=2, scheme=colnet against the others" in text
    with (out / "paired.csv").open() as fh:
        lines = list(csv.DictReader(fh))
    assert len(lines) == 6
    first = compare(runs)[0]
    assert float(lines[0]["p_two_sided"]) == pytest.approx(first.p_value())
    assert lines[0]["differences"].count(";") == first.n - 1
    # turned off, and a malformed reference is refused before anything is read
    out2 = tmp_path / "rep2"
    assert (
        cli_main(["report", str(folder), "--out", str(out2), "--no-figures", "--paired", "none"])
        == 0
    )
    assert "Paired comparisons" not in (out2 / "table.md").read_text()
    assert not (out2 / "paired.csv").exists()
    capsys.readouterr()
    assert cli_main(["report", str(folder), "--out", str(tmp_path / "r3"), "--paired", "x"]) == 2
    assert "SECTION.KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "r3").exists()
