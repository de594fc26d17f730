"""Paired significance tests between settings: does one setting beat the others over seeds?

Runs of two settings with the same seed share the data split, the node initialisation and the
training order, so their difference in a task group's final test metric is one paired sample. The
Wilcoxon signed-rank test over those differences asks whether the reference setting (by default
``federation.scheme = colnet``) is better than each other setting that differs from it in that
one key only. The metric is the group's micro F1 where the task has one (higher is better), else
its test loss (lower is better); differences are signed so that a positive value favours the
reference. Groups measured by the same metric are also pooled (pairs = seed x group), which gives
the test more pairs; pooled pairs of one seed are not independent, so the per-group rows stay the
primary result.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from colnet_mpi.metrics.reader import (
    ReportError,
    Run,
    _by_setting,
    group_summary,
    scenarios,
    setting_label,
)

#: The comparison the report makes when a dataset's runs differ in the key and include the value.
DEFAULT_REFERENCE = ("federation.scheme", "colnet")
#: Metric used per group, in order of preference, and whether higher is better.
_METRICS = (("f1_micro", True), ("loss", False))
POOLED = "all groups"


@dataclass(frozen=True)
class Comparison:
    """The reference setting against one other setting, in one task group (or pooled groups)."""

    dataset: str
    group: str
    metric: str
    reference: str  # label of the reference setting
    other: str  # label of the other setting
    differences: tuple[float, ...]  # positive: the reference is better
    seeds: tuple[Any, ...]

    @property
    def n(self) -> int:
        """Number of pairs."""
        return len(self.differences)

    @property
    def mean(self) -> float:
        """Mean difference (positive: the reference is better)."""
        return float(np.mean(self.differences)) if self.differences else math.nan

    @property
    def record(self) -> tuple[int, int, int]:
        """(reference better, ties, reference worse) over the pairs."""
        d = np.asarray(self.differences)
        return int(np.sum(d > 0)), int(np.sum(d == 0)), int(np.sum(d < 0))

    def p_value(self, alternative: str = "two-sided") -> float:
        """Wilcoxon signed-rank p-value (exact for small n without ties; NaN without a nonzero pair).

        ``alternative="greater"``: the one-sided test that the reference is better.
        """
        d = np.asarray(self.differences, dtype=float)
        if d.size == 0 or not np.any(d != 0) or not np.all(np.isfinite(d)):
            return math.nan
        from scipy.stats import wilcoxon

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy's note that ties make the exact test normal
            return float(wilcoxon(d, zero_method="wilcox", alternative=alternative).pvalue)


def smallest_p(n: int) -> float:
    """The smallest two-sided p-value the exact signed-rank test can give with ``n`` pairs."""
    return min(1.0, 2.0 / 2**n) if n > 0 else math.nan


def parse_reference(text: str) -> tuple[str, str]:
    """``federation.scheme=colnet`` -> ``("federation.scheme", "colnet")``; raises ReportError."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key or not value:
        raise ReportError(
            f"--paired {text!r}: expected SECTION.KEY=VALUE, e.g. federation.scheme=colnet"
        )
    return key.strip(), value.strip()


def _group_metric(values: Sequence[dict[str, float]]) -> tuple[str, bool] | None:
    for metric, higher in _METRICS:
        if all(math.isfinite(v[metric]) for v in values):
            return metric, higher
    return None


def compare(
    runs: Sequence[Run],
    *,
    reference: tuple[str, str] = DEFAULT_REFERENCE,
    round: int = -1,
    ignore: Iterable[str] = (),
) -> list[Comparison]:
    """Every paired comparison of the reference setting with the settings one key away from it.

    Per dataset: settings whose ``key`` value (shown as in row labels) equals ``value`` are
    references; each other setting equal to a reference in every other differing key is compared
    with it over the seeds both have. Nothing is returned for a dataset whose runs do not differ
    in ``key`` or have no run with the value.
    """
    key, value = reference
    out: list[Comparison] = []
    for dataset, members in scenarios(runs).items():
        grouped = _by_setting(members, ignore)
        if not grouped or key not in grouped[0][0]:
            continue

        def shown(v: Any) -> str:
            return setting_label({key: v}).partition("=")[2]

        refs = [(s, rs) for s, rs in grouped if shown(s[key]) == value]
        for ref_setting, ref_runs in refs:
            rest = {k: v for k, v in ref_setting.items() if k != key}
            for setting, other_runs in grouped:
                if shown(setting[key]) == value:
                    continue
                if {k: v for k, v in setting.items() if k != key} != rest:
                    continue
                out += _pairs(
                    dataset,
                    ref_runs,
                    other_runs,
                    setting_label(ref_setting),
                    setting_label(setting),
                    round,
                )
    return out


def _pairs(
    dataset: str,
    ref_runs: Sequence[Run],
    other_runs: Sequence[Run],
    ref_label: str,
    other_label: str,
    round: int,
) -> list[Comparison]:
    ref_by_seed = {r.seed: r for r in ref_runs}
    other_by_seed = {r.seed: r for r in other_runs}
    seeds = [s for s in ref_by_seed if s in other_by_seed]
    if not seeds:
        return []
    ref = [group_summary(ref_by_seed[s], round) for s in seeds]
    other = [group_summary(other_by_seed[s], round) for s in seeds]
    out = []
    pooled: dict[str, list[float]] = {}
    pooled_seeds: dict[str, list[Any]] = {}
    groups = list(ref[0])
    for g in groups:
        chosen = _group_metric([x[g] for x in ref + other])
        if chosen is None:
            continue
        metric, higher = chosen
        sign = 1.0 if higher else -1.0
        diffs = tuple(sign * (a[g][metric] - b[g][metric]) for a, b in zip(ref, other, strict=True))
        out.append(Comparison(dataset, g, metric, ref_label, other_label, diffs, tuple(seeds)))
        pooled.setdefault(metric, []).extend(diffs)
        pooled_seeds.setdefault(metric, []).extend(seeds)
    for metric, together in pooled.items():
        if len(together) > len(seeds):  # more than one group measured by this metric
            out.append(
                Comparison(
                    dataset,
                    POOLED,
                    metric,
                    ref_label,
                    other_label,
                    tuple(together),
                    tuple(pooled_seeds[metric]),
                )
            )
    return out


def _p(p: float) -> str:
    if math.isnan(p):
        return "–"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def paired_markdown(comparisons: Sequence[Comparison]) -> str:
    """A section per dataset: one line per task group x other setting."""
    if not comparisons:
        return ""
    parts = ["# Paired comparisons over seeds (Wilcoxon signed-rank)", ""]
    datasets = list(dict.fromkeys(c.dataset for c in comparisons))
    for dataset in datasets:
        rows = [c for c in comparisons if c.dataset == dataset]
        reference = rows[0].reference
        parts += [f"## Dataset `{dataset}`: {reference} against the others", ""]
        parts.append(
            "| Task group | Metric | Against | Pairs | Mean Δ | Better / tie / worse "
            "| p (two-sided) | p (better) |"
        )
        parts.append("|---|---|---|---:|---:|---|---:|---:|")
        for c in rows:
            b, t, w = c.record
            metric = "F1 (micro)" if c.metric == "f1_micro" else "test loss"
            parts.append(
                f"| {c.group} | {metric} | {c.other} | {c.n} | {c.mean:+.3f} | {b} / {t} / {w} "
                f"| {_p(c.p_value())} | {_p(c.p_value('greater'))} |"
            )
        parts.append("")
    n = max(c.n for c in comparisons if c.group != POOLED)
    parts.append(
        "Δ: the reference setting minus the other in F1, or the other minus the reference in test "
        "loss, per pair of runs with the same seed (positive: the reference is better). p "
        "(better): the one-sided test that the reference is better. With n pairs the exact test "
        f"cannot give a two-sided p below 2/2^n ({_p(smallest_p(n))} for n = {n}). "
        f"'{POOLED}' pools the groups measured by the same metric (pairs of one seed are not "
        "independent: read it as a summary, the per-group rows as the test)."
    )
    return "\n".join(parts) + "\n"


def write_paired_csv(comparisons: Sequence[Comparison], path: Any) -> None:
    """``paired.csv``: one line per comparison, with the differences and seeds behind it."""
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "dataset",
                "group",
                "metric",
                "reference",
                "other",
                "pairs",
                "mean_difference",
                "better",
                "ties",
                "worse",
                "p_two_sided",
                "p_better",
                "seeds",
                "differences",
            ]
        )
        for c in comparisons:
            b, t, wr = c.record
            w.writerow(
                [
                    c.dataset,
                    c.group,
                    c.metric,
                    c.reference,
                    c.other,
                    c.n,
                    repr(c.mean),
                    b,
                    t,
                    wr,
                    repr(c.p_value()),
                    repr(c.p_value("greater")),
                    ";".join(str(s) for s in c.seeds),
                    ";".join(repr(d) for d in c.differences),
                ]
            )
