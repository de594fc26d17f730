"""Robustness to attacks: benign-node change against the clean runs, clustering ARI, defense statistics."""

from __future__ import annotations

import csv
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from colnet_mpi.federation.schemes import SCHEMES
from colnet_mpi.metrics.partition import adjusted_rand
from colnet_mpi.metrics.reader import (
    Run,
    Stat,
    check_compatible,
    csv_cell,
    csv_number,
    scenarios,
    setting_label,
    setting_of,
    settings,
)

__all__ = [
    "CLEAN",
    "ROBUSTNESS_METRICS",
    "DefenseCost",
    "NodeBars",
    "RobustnessRow",
    "attack_scenarios",
    "defense_costs",
    "node_bars",
    "plot_attacks",
    "robustness_csv_header",
    "robustness_markdown",
    "robustness_rows",
    "write_attack_figures",
    "write_robustness_csv",
]

#: ``attack.kind`` of the clean reference runs.
CLEAN = "none"

#: What :attr:`RobustnessRow.metrics` holds (each a :class:`~colnet_mpi.metrics.reader.Stat` over
#: seeds). Changes are attacked − clean at the report round, per node, averaged over the nodes
#: named, for one seed; then mean ± std over the seeds (pairs). Clean rows have NaN changes.
ROBUSTNESS_METRICS: dict[str, str] = {
    "benign_f1": "F1 (micro) change of the benign nodes that have an F1",
    "same_group_f1": "F1 change of the benign nodes in an attacker's true task group",
    "other_group_f1": "F1 change of the benign nodes in the other task groups",
    "benign_loss": "test loss change of the benign nodes without an F1 (landmarks)",
    "same_group_loss": "test loss change of the same-group benign nodes without an F1",
    "other_group_loss": "test loss change of the other-group benign nodes without an F1",
    "attacker_f1": "F1 change of the attacking nodes",
    "attacker_loss": "test loss change of the attacking nodes",
    "benign_f1_clean": "F1 of the benign nodes in the clean run (clean rows: of all nodes)",
    "benign_f1_attacked": "F1 of the benign nodes in the attacked run",
    "ari_final": "clustering ARI at the report round",
    "ari_mean": "clustering ARI averaged over rounds 1 .. report round",
    "ari_benign": "clustering ARI at the report round over the benign nodes only (a quarantined "
    "attacker is no clustering error; a benign node pulled into another task's group is)",
    "attacker_caught": "fraction of attacker-rounds (attack/active = 1) excluded, quarantined or clipped",
    "false_positives": "fraction of benign node-rounds excluded, quarantined or clipped",
    "leader_rejected": "leader broadcasts rejected (sum of defense/leader_rejected over rounds)",
}

_DELTAS = (
    "benign_f1",
    "same_group_f1",
    "other_group_f1",
    "benign_loss",
    "same_group_loss",
    "other_group_loss",
    "attacker_f1",
    "attacker_loss",
)


# ---------------------------------------------------------------------------------------------
# Data classes


@dataclass(frozen=True)
class RobustnessRow:
    """One attack (or the clean reference) under one setting of one dataset, over seeds.

    ``setting`` holds the other differing settings (e.g. the defense switches), ``attack`` the
    ``attack.kind`` (:data:`CLEAN` for the reference row) and ``attack_setting`` any further
    ``attack.*`` keys that differ between the attacked runs. ``paths`` are the attacked runs
    (clean rows: the clean runs), ``clean_paths`` their clean partners, in the same order.
    """

    dataset: str
    setting: dict[str, Any]
    label: str
    attack: str
    attack_setting: dict[str, Any]
    attack_label: str
    attackers: tuple[str, ...]
    metrics: dict[str, Stat]
    seeds: tuple[int | None, ...]
    paths: tuple[Path, ...]
    clean_paths: tuple[Path, ...]

    @property
    def n(self) -> int:
        """Number of seeds (attacked/clean pairs; clean rows: clean runs)."""
        return len(self.paths)

    @property
    def clean(self) -> bool:
        """Whether this is the clean reference row."""
        return self.attack == CLEAN


@dataclass(frozen=True)
class DefenseCost:
    """Clean runs with defenses minus clean runs without, paired by seed (the price of defending)."""

    dataset: str
    setting: dict[str, Any]  # defenses on
    label: str
    baseline: dict[str, Any]  # defenses off, otherwise the same
    baseline_label: str
    f1: Stat  # F1 change averaged over the nodes that have an F1
    loss: Stat  # test loss change averaged over the nodes without an F1
    seeds: tuple[int | None, ...]


@dataclass(frozen=True)
class NodeBars:
    """Per-node test ``metric`` at the report round for one setting x attack: mean, std over seeds."""

    dataset: str
    setting: dict[str, Any]
    label: str
    attack: str
    attack_label: str
    metric: str
    nodes: tuple[str, ...]
    mean: np.ndarray  # (N,)
    std: np.ndarray  # (N,), NaN for a single run
    n: int
    attackers: tuple[int, ...]  # node indices attacking in these runs


@dataclass
class _Cell:
    """The runs behind one row: a setting x attack, with each attacked run's clean partner."""

    dataset: str
    setting: dict[str, Any]
    label: str
    attack: str
    attack_setting: dict[str, Any]
    runs: list[Run]
    partners: list[Run]  # empty for the clean cell


# ---------------------------------------------------------------------------------------------
# Run-level helpers


def _kind(run: Run) -> str:
    return str(run.flat_config.get("attack.kind", CLEAN))


def _attackers(run: Run) -> np.ndarray:
    """Indices of the attacking nodes (none in a clean run)."""
    if _kind(run) == CLEAN:
        return np.zeros(0, dtype=int)
    n = len(run.node_names)
    nodes = run.flat_config.get("attack.nodes", (0,))
    return np.array(sorted(int(i) for i in nodes if 0 <= int(i) < n), dtype=int)


def _defended(run: Run) -> bool:
    """Whether a defense beyond the always-on buffer checks is on (``DefenseConfig.enabled``)."""
    flat = run.flat_config
    return bool(
        flat.get("defense.aggregation", "mean") != "mean"
        or flat.get("defense.screening", False)
        or flat.get("defense.verify_leader", False)
    )


def _clustered(run: Run) -> bool:
    """Whether the run's scheme groups nodes at all (``federation.scheme = none`` does not: every
    node stays alone, so no ARI applies, however its ``round/group`` ids happen to read)."""
    scheme = str(run.flat_config.get("federation.scheme", "colnet"))
    try:
        return SCHEMES.get(scheme).grouper is not None
    except KeyError:  # a scheme this version does not know: the writer's ARI tells
        ari = np.asarray(run.data.get("clustering/ari", []), dtype=float)
        return bool(np.isfinite(ari).any())


def _mean(values: np.ndarray, mask: np.ndarray) -> float:
    """Mean over the masked nodes; NaN where no node is selected (NaN values propagate)."""
    return float(np.mean(values[mask])) if mask.any() else math.nan


def _active(run: Run, upto: int) -> np.ndarray:
    """(rounds, N) bool: where a node attacked (``attack/active``; from the config in old files)."""
    if "attack/active" in run.data:
        return np.asarray(run["attack/active"][:upto]) == 1
    n = len(run.node_names)
    out = np.zeros((upto, n), dtype=bool)
    start = int(run.flat_config.get("attack.start_round", 1))
    out[start - 1 :, _attackers(run)] = True
    return out


def _caught(run: Run, upto: int) -> np.ndarray | None:
    """(rounds, N) bool: excluded from the group's aggregate, quarantined (group -1), or kept
    with its update clipped (``defense/reason`` = "clipped")."""
    if "defense/excluded" not in run.data:
        return None
    caught = np.asarray(run["defense/excluded"][:upto]) == 1
    caught |= np.asarray(run["round/group"][:upto]) == -1
    names = str(run.attrs.get("defense_reasons", "")).split(",")
    if "clipped" in names and "defense/reason" in run.data:
        caught |= np.asarray(run["defense/reason"][:upto]) == names.index("clipped")
    return caught


def _run_stats(run: Run, round: int, benign: np.ndarray) -> dict[str, float]:
    """ARI and defense statistics of one run up to ``round``."""
    i = run.round_index(round)
    upto = i + 1
    keys = ("ari_final", "ari_mean", "ari_benign", "attacker_caught", "false_positives")
    out = {k: math.nan for k in keys}
    out["leader_rejected"] = math.nan
    clustered = _clustered(run)  # without clustering every ARI column is "–" (NaN), not 0
    if clustered and "clustering/ari" in run.data:
        ari = np.asarray(run["clustering/ari"][:upto], dtype=float)
        out["ari_final"] = float(ari[i])
        out["ari_mean"] = float(np.mean(ari))
    if clustered and "round/group" in run.data and benign.any():
        truth = np.asarray(run.true_groups)[benign]
        agreed = np.asarray(run["round/group"][i])[benign]
        out["ari_benign"] = adjusted_rand(truth, agreed)
    caught = _caught(run, upto)
    if caught is not None:
        active = _active(run, upto)
        if active.any():
            out["attacker_caught"] = float(np.mean(caught[active]))
        if benign.any():
            out["false_positives"] = float(np.mean(caught[:, benign]))
    if "defense/leader_rejected" in run.data:
        out["leader_rejected"] = float(np.sum(run["defense/leader_rejected"][:upto]))
    return out


def _pair_values(attacked: Run, clean: Run, scored: np.ndarray, round: int) -> dict[str, float]:
    """Every metric of one attacked run against its clean partner."""
    a, c = attacked.node_metrics(round), clean.node_metrics(round)
    df1, dloss = a["f1_micro"] - c["f1_micro"], a["loss"] - c["loss"]
    n = len(attacked.node_names)
    attacker = np.zeros(n, dtype=bool)
    attacker[_attackers(attacked)] = True
    benign = ~attacker
    groups = np.asarray(attacked.true_groups)
    same = benign & np.isin(groups, groups[attacker])
    other = benign & ~same
    out = {
        "benign_f1": _mean(df1, benign & scored),
        "same_group_f1": _mean(df1, same & scored),
        "other_group_f1": _mean(df1, other & scored),
        "benign_loss": _mean(dloss, benign & ~scored),
        "same_group_loss": _mean(dloss, same & ~scored),
        "other_group_loss": _mean(dloss, other & ~scored),
        "attacker_f1": _mean(df1, attacker & scored),
        "attacker_loss": _mean(dloss, attacker),
        "benign_f1_clean": _mean(c["f1_micro"], benign & scored),
        "benign_f1_attacked": _mean(a["f1_micro"], benign & scored),
    }
    out.update(_run_stats(attacked, round, benign))
    return out


def _clean_values(clean: Run, scored: np.ndarray, round: int) -> dict[str, float]:
    """The clean reference row's metrics of one run: no changes, every node benign."""
    out = {k: math.nan for k in _DELTAS}
    out["benign_f1_clean"] = _mean(clean.node_metrics(round)["f1_micro"], scored)
    out["benign_f1_attacked"] = math.nan
    out.update(_run_stats(clean, round, np.ones(len(clean.node_names), dtype=bool)))
    return out


def _scored(runs: Sequence[Run]) -> np.ndarray:
    """(N,) bool: nodes with an F1 (a finite F1 in some round of some run); landmarks have none."""
    out = np.zeros(len(runs[0].node_names), dtype=bool)
    for r in runs:
        out |= np.isfinite(np.asarray(r["round/test_f1_micro"], dtype=float)).any(axis=0)
    return out


# ---------------------------------------------------------------------------------------------
# Grouping runs into cells


def attack_scenarios(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """The datasets whose runs differ in ``attack.kind`` and include clean runs (``none``)."""
    out = {}
    for dataset, members in scenarios(runs).items():
        kinds = {_kind(r) for r in members}
        if CLEAN in kinds and len(kinds) > 1:
            out[dataset] = members
    return out


def _short_label(setting: dict[str, Any]) -> str:
    """``setting_label`` with ``defense.`` / ``attack.`` dropped where the name stays unique."""
    bare = {k: k.partition(".")[2] if k.startswith(("defense.", "attack.")) else k for k in setting}
    tails = [k.partition(".")[2] or k for k in setting]
    renamed = {
        (b if b != k and tails.count(b) == 1 else k): v
        for (k, v), b in zip(setting.items(), bare.values(), strict=True)
    }
    return setting_label(renamed)


def _attack_label(kind: str, extra: dict[str, Any]) -> str:
    if kind == CLEAN:
        return "none (clean)"
    return kind + (f", {_short_label(extra)}" if extra else "")


def _cells(members: Sequence[Run], ignore: Iterable[str]) -> list[_Cell]:
    """One dataset's runs as cells: attack (clean first) x setting, in order of first appearance."""
    check_compatible(members)
    keys = settings(members, ignore=ignore)
    other = [k for k in keys if not k.startswith("attack.")]
    attacked = [r for r in members if _kind(r) != CLEAN]
    extra = [
        k
        for k in settings(attacked, ignore=ignore)
        if k.startswith("attack.") and k != "attack.kind"
    ]

    def skey(r: Run) -> tuple[str, ...]:
        return tuple(repr(v) for v in setting_of(r, other).values())

    clean: dict[tuple[str, ...], dict[int | None, Run]] = {}
    for r in members:
        if _kind(r) != CLEAN:
            continue
        by_seed = clean.setdefault(skey(r), {})
        if r.seed in by_seed:
            warnings.warn(
                f"{by_seed[r.seed].path} and {r.path} are clean runs of the same setting and seed "
                f"({r.seed}); the robustness table compares with the first",
                UserWarning,
                stacklevel=3,
            )
            continue
        by_seed[r.seed] = r
    cells: dict[tuple[Any, ...], _Cell] = {}
    unpaired: list[str] = []
    for r in members:
        kind = _kind(r)
        setting = setting_of(r, other)
        attack_setting = setting_of(r, extra) if kind != CLEAN else {}
        key = (kind, tuple(repr(v) for v in attack_setting.values()), skey(r))
        if kind == CLEAN:
            if clean[skey(r)].get(r.seed) is not r:
                continue
            partner = None
        else:
            partner = clean.get(skey(r), {}).get(r.seed)
            if partner is None:
                unpaired.append(f"{r.path} (seed {r.seed}, {setting_label(setting)})")
                continue
        cell = cells.setdefault(
            key,
            _Cell(
                dataset=r.dataset,
                setting=setting,
                label=_short_label(setting),
                attack=kind,
                attack_setting=attack_setting,
                runs=[],
                partners=[],
            ),
        )
        cell.runs.append(r)
        if partner is not None:
            cell.partners.append(partner)
    if unpaired:
        warnings.warn(
            f"no clean run (attack.kind = none) with the same seed and setting for "
            f"{len(unpaired)} attacked run(s), left out of the robustness table: "
            + ", ".join(unpaired),
            UserWarning,
            stacklevel=3,
        )
    attacks = list(dict.fromkeys(k[:2] for k in sorted(cells, key=lambda k: k[0] != CLEAN)))
    setting_order = list(dict.fromkeys(skey(r) for r in members))
    return [cells[(*a, s)] for a in attacks for s in setting_order if (*a, s) in cells]


def _all_cells(runs: Sequence[Run], ignore: Iterable[str]) -> list[tuple[list[Run], list[_Cell]]]:
    ignore = list(ignore)
    return [(members, _cells(members, ignore)) for members in attack_scenarios(runs).values()]


# ---------------------------------------------------------------------------------------------
# Public computations


def robustness_rows(
    runs: Sequence[Run], *, round: int = -1, ignore: Iterable[str] = ()
) -> list[RobustnessRow]:
    """The robustness table: per dataset, attack (clean reference first) and setting, over seeds.

    Only datasets whose runs differ in ``attack.kind`` and include clean runs take part (none:
    an empty list). Each attacked run is paired with the clean run of the same seed and the same
    other settings (e.g. the defense switches); unpaired ones are left out with a warning. The
    per-seed values are :data:`ROBUSTNESS_METRICS`; each row holds their mean ± std over seeds.
    """
    out = []
    for members, cells in _all_cells(runs, ignore):
        scored = _scored(members)
        for cell in cells:
            if cell.attack == CLEAN:
                values = [_clean_values(r, scored, round) for r in cell.runs]
                attackers: tuple[str, ...] = ()
            else:
                values = [
                    _pair_values(a, c, scored, round)
                    for a, c in zip(cell.runs, cell.partners, strict=True)
                ]
                first = cell.runs[0]
                names = {first.node_names[i] for r in cell.runs for i in _attackers(r)}
                attackers = tuple(n for n in first.node_names if n in names)
            out.append(
                RobustnessRow(
                    dataset=cell.dataset,
                    setting=cell.setting,
                    label=cell.label,
                    attack=cell.attack,
                    attack_setting=cell.attack_setting,
                    attack_label=_attack_label(cell.attack, cell.attack_setting),
                    attackers=attackers,
                    metrics={m: Stat.of([v[m] for v in values]) for m in ROBUSTNESS_METRICS},
                    seeds=tuple(r.seed for r in cell.runs),
                    paths=tuple(r.path for r in cell.runs),
                    clean_paths=tuple(r.path for r in cell.partners),
                )
            )
    return out


def defense_costs(
    runs: Sequence[Run], *, round: int = -1, ignore: Iterable[str] = ()
) -> list[DefenseCost]:
    """Per dataset and defended setting: clean runs with defenses minus the clean runs without.

    The baseline is the undefended clean setting that agrees on every non-``defense.`` key; runs
    are paired by seed. F1 is averaged over the nodes that have one, loss over the others.
    """
    out = []
    for members, cells in _all_cells(runs, ignore):
        scored = _scored(members)
        cleans = [c for c in cells if c.attack == CLEAN]
        for on in cleans:
            if not _defended(on.runs[0]):
                continue

            def rest(c: _Cell) -> dict[str, Any]:
                return {k: v for k, v in c.setting.items() if not k.startswith("defense.")}

            base = next(
                (c for c in cleans if not _defended(c.runs[0]) and rest(c) == rest(on)),
                None,
            )
            if base is None:
                continue
            by_seed = {r.seed: r for r in base.runs}
            pairs = [(r, by_seed[r.seed]) for r in on.runs if r.seed in by_seed]
            if not pairs:
                continue
            f1, loss = [], []
            for r, b in pairs:
                a, c = r.node_metrics(round), b.node_metrics(round)
                f1.append(_mean(a["f1_micro"] - c["f1_micro"], scored))
                loss.append(_mean(a["loss"] - c["loss"], ~scored))
            out.append(
                DefenseCost(
                    dataset=on.dataset,
                    setting=on.setting,
                    label=on.label,
                    baseline=base.setting,
                    baseline_label=base.label,
                    f1=Stat.of(f1),
                    loss=Stat.of(loss),
                    seeds=tuple(r.seed for r, _ in pairs),
                )
            )
    return out


def node_bars(
    runs: Sequence[Run],
    metric: str = "f1_micro",
    *,
    round: int = -1,
    ignore: Iterable[str] = (),
) -> list[NodeBars]:
    """Per-node test ``metric`` (paper Figs 5–8) for every row of :func:`robustness_rows`.

    The same runs as the table: the paired attacked runs of each attack, the clean runs.
    """
    out = []
    for _, cells in _all_cells(runs, ignore):
        for cell in cells:
            stack = np.stack(
                [np.asarray(r.node_metrics(round)[metric], dtype=float) for r in cell.runs]
            )
            n = stack.shape[0]
            attackers = sorted({int(i) for r in cell.runs for i in _attackers(r)})
            out.append(
                NodeBars(
                    dataset=cell.dataset,
                    setting=cell.setting,
                    label=cell.label,
                    attack=cell.attack,
                    attack_label=_attack_label(cell.attack, cell.attack_setting),
                    metric=metric,
                    nodes=cell.runs[0].node_names,
                    mean=stack.mean(axis=0),
                    std=stack.std(axis=0, ddof=1) if n >= 2 else np.full(stack.shape[1], np.nan),
                    n=n,
                    attackers=tuple(attackers),
                )
            )
    return out


# ---------------------------------------------------------------------------------------------
# Markdown and CSV


def _delta(stat: Stat, digits: int = 3) -> str:
    """A signed change: ``-0.045 ± 0.010``; ``–`` where it does not apply."""
    if math.isnan(stat.mean):
        return "–"
    if math.isnan(stat.std):
        return f"{stat.mean:+.{digits}f}"
    return f"{stat.mean:+.{digits}f} ± {stat.std:.{digits}f}"


def _attacker_cell(row: RobustnessRow) -> str:
    f1, loss = row.metrics["attacker_f1"], row.metrics["attacker_loss"]
    if not math.isnan(f1.mean):
        return _delta(f1)
    if not math.isnan(loss.mean):
        return "loss " + _delta(loss)
    return "–"


_COLUMNS = (
    "Attack",
    "Setting",
    "n",
    "ΔF1 benign",
    "ΔF1 same group",
    "ΔF1 other group",
    "Δloss benign (no F1)",
    "Δ attacker",
    "ARI final",
    "ARI mean",
    "ARI benign",
    "Attacker caught",
    "False positives",
    "Leader rejected",
)


def _table(rows: Sequence[RobustnessRow]) -> list[str]:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|---|---|" + "---:|" * (len(_COLUMNS) - 2)]
    previous = None
    for row in rows:
        m = row.metrics
        attack = row.attack_label if row.attack_label != previous else ""
        previous = row.attack_label
        cells = [
            attack,
            row.label,
            str(row.n),
            _delta(m["benign_f1"]),
            _delta(m["same_group_f1"]),
            _delta(m["other_group_f1"]),
            _delta(m["benign_loss"]),
            _attacker_cell(row),
            m["ari_final"].format(2),
            m["ari_mean"].format(2),
            m["ari_benign"].format(2),
            m["attacker_caught"].format(2),
            m["false_positives"].format(2),
            m["leader_rejected"].format(1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def robustness_markdown(
    rows: Sequence[RobustnessRow],
    costs: Sequence[DefenseCost] = (),
    *,
    runs: Sequence[Run] = (),
    round: int = -1,
) -> str:
    """The robustness section of ``table.md``: per dataset a table and the defense cost lines.

    ``runs`` (optional) names the groups of the attacking nodes and the round used.
    """
    if not rows:
        return ""
    parts = ["# Robustness to attacks", ""]
    for dataset in dict.fromkeys(r.dataset for r in rows):
        mine = [r for r in rows if r.dataset == dataset]
        parts += [f"## Dataset `{dataset}`", ""]
        intro = [
            "Attacked runs are paired by seed with the clean run (`attack.kind = none`) of the same "
            "setting; Δ = attacked − clean, per node, averaged over the nodes named, then "
            "mean ± std over seeds (n)."
        ]
        ref = next((r for r in runs if r.dataset == dataset), None)
        by_attack = {r.attack_label: r.attackers for r in mine if not r.clean}
        names = sorted({n for a in by_attack.values() for n in a})
        if names:
            if ref is not None:
                where = {n: ref.true_groups[ref.node_names.index(n)] for n in names}
                who = ", ".join(f"{n} (task group {where[n]})" for n in names)
            else:
                who = ", ".join(names)
            if len(set(by_attack.values())) > 1:
                who += "; per attack: " + "; ".join(
                    f"{k}: {', '.join(v)}" for k, v in by_attack.items()
                )
            intro.append(f"Attacker(s): {who}.")
        if ref is not None:
            used = sorted({r.round_index(round) + 1 for r in runs if r.dataset == dataset})
            which = "final round" if round == -1 else f"round {round}"
            intro.append(f"Test metrics of the {which} (round {', '.join(map(str, used))}).")
        parts += [" ".join(intro), ""]
        parts += _table(mine)
        parts.append("")
        for cost in (c for c in costs if c.dataset == dataset):
            loss = (
                f", Δloss (nodes without F1) = {_delta(cost.loss)}"
                if not math.isnan(cost.loss.mean)
                else ""
            )
            parts.append(
                f"Defense cost (clean runs, {cost.label} minus {cost.baseline_label}): "
                f"ΔF1 = {_delta(cost.f1)}{loss} (n = {cost.f1.n})."
            )
            parts.append("")
    parts.append(
        "Benign: nodes not in `attack.nodes`; same group: benign nodes in an attacker's true task "
        "group. F1 is micro-averaged over the nodes that have one; Δloss (no F1) covers the "
        "benign nodes without an F1 (landmarks); Δ attacker is the attackers' F1 change (or "
        "loss change when they have no F1). ARI mean: over rounds 1 .. the round used; ARI benign: "
        "at the round used, over the benign nodes only (a quarantined attacker, group −1, is no "
        "clustering error there); every ARI is – for a scheme without clustering "
        "(`federation.scheme = none`). Attacker "
        "caught: fraction of attacker-rounds (`attack/active`) in which the attacker was left out "
        "of its group's aggregate (`defense/excluded`), quarantined (`round/group` = −1) or had its "
        "update clipped (`defense/reason` = clipped); false "
        "positives: the same for benign node-rounds; leader rejected: broadcasts refused by "
        "members (`defense/leader_rejected`, summed over rounds and nodes, per run). "
        "All values per seed, then mean ± std over seeds; every column is in robustness.csv."
    )
    return "\n".join(parts) + "\n"


def robustness_csv_header(keys: Sequence[str]) -> list[str]:
    """Columns of ``robustness.csv`` (``keys``: the settings besides the attack)."""
    cols = ["dataset", "setting", *keys, "attack", "attack_label", "attackers", "n", "seeds"]
    for m in ROBUSTNESS_METRICS:
        cols += [f"{m}_mean", f"{m}_std"]
    return cols


def write_robustness_csv(rows: Sequence[RobustnessRow], path: Path) -> None:
    """One line per dataset x attack x setting with every metric as mean and std."""
    keys = list(dict.fromkeys(k for r in rows for k in r.setting))
    with Path(path).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(robustness_csv_header(keys))
        for row in rows:
            line = [row.dataset, row.label, *(csv_cell(row.setting.get(k)) for k in keys)]
            line += [row.attack, row.attack_label, ";".join(row.attackers), str(row.n)]
            line.append(";".join(str(s) for s in row.seeds))
            for m in ROBUSTNESS_METRICS:
                line += [csv_number(row.metrics[m].mean), csv_number(row.metrics[m].std)]
            w.writerow(line)


# ---------------------------------------------------------------------------------------------
# Figures


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "dataset"


#: A loss row (or curve panel) whose positive values span more than this factor gets a log axis.
LOG_SPAN = 10.0


def plot_attacks(f1: Sequence[NodeBars], loss: Sequence[NodeBars], path: Path) -> Any:
    """One dataset's per-node bars (paper Figs 5–8): one column per setting, F1 row and loss row.

    The F1 row (nodes that have an F1) is left out when no node has one; the loss row shows every
    node. Bars are grouped per node, one per attack (clean first); an attacker's own bar is
    hatched and its tick says so; error bars are the std over seeds. A row whose bars span more
    than a factor 10 gets a log axis. Returns the matplotlib figure (already saved to ``path``).
    """
    from matplotlib.figure import Figure  # the 'plot' extra; the object API needs no backend
    from matplotlib.patches import Patch

    labels = list(dict.fromkeys(b.label for b in loss))
    attacks = list(dict.fromkeys(b.attack_label for b in loss))
    nodes = loss[0].nodes
    scored = np.zeros(len(nodes), dtype=bool)
    for b in f1:
        scored |= np.isfinite(b.mean)
    rows: list[tuple[str, Sequence[NodeBars], np.ndarray]] = []
    if scored.any():
        rows.append(("test F1 (micro)", f1, np.flatnonzero(scored)))
    rows.append(("test loss", loss, np.arange(len(nodes))))
    panel_w = max(4.0, 1.0 + len(nodes) * (0.16 * len(attacks) + 0.35))
    fig = Figure(figsize=(panel_w * len(labels), 3.2 * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(len(rows), len(labels), squeeze=False, sharey="row")
    bar_w = 0.8 / max(1, len(attacks))
    n_max = 0
    for (ylabel, bars, idx), ax_row in zip(rows, axes, strict=True):
        means = np.concatenate([b.mean[idx] for b in bars])
        positive = means[np.isfinite(means) & (means > 0)]
        # a broadcast manipulated x2 each round can blow a loss up to 1e10: on a linear axis
        # every other bar would vanish, so a row spanning more than 10x is drawn on a log axis
        log = positive.size > 0 and positive.max() / positive.min() > LOG_SPAN
        for label, ax in zip(labels, ax_row, strict=True):
            x = np.arange(idx.size)
            marked: set[int] = set()
            for b in (b for b in bars if b.label == label):
                j = attacks.index(b.attack_label)
                n_max = max(n_max, b.n)
                drawn = ax.bar(
                    x - 0.4 + bar_w * (j + 0.5),
                    np.nan_to_num(b.mean[idx], nan=0.0),
                    bar_w,
                    yerr=np.nan_to_num(b.std[idx], nan=0.0) if b.n >= 2 else None,
                    color=f"C{j % 10}",
                    edgecolor="black",
                    linewidth=0.4,
                    capsize=2,
                )
                for i, patch in zip(idx, drawn.patches, strict=True):
                    if int(i) in b.attackers:
                        patch.set_hatch("//")
                        marked.add(int(i))
            ticks = [nodes[i] + (" (attacker)" if int(i) in marked else "") for i in idx]
            ax.set_xticks(x, ticks, rotation=25, ha="right", fontsize="small")
            ax.set_title(label if label != "all runs" else loss[0].dataset, fontsize="medium")
            ax.set_ylabel(f"final {ylabel}" + (" (log scale)" if log else ""))
            if log:
                ax.set_yscale("log", nonpositive="clip")
            ax.grid(axis="y", alpha=0.3)
    counts = {a: sorted({b.n for b in loss if b.attack_label == a}) for a in attacks}
    handles = [
        Patch(facecolor=f"C{j % 10}", edgecolor="black", linewidth=0.4) for j in range(len(attacks))
    ]
    texts = [f"{a} (n={'/'.join(str(n) for n in counts[a])})" for a in attacks]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//"))
    texts.append("the attacker's own bar")
    try:
        fig.legend(handles, texts, loc="outside lower center", ncols=min(6, len(texts)))
    except ValueError:  # matplotlib < 3.7 has no "outside" locations
        axes[0][-1].legend(handles, texts, fontsize="x-small")
    spread = " (error bars: std over seeds)" if n_max >= 2 else ""
    fig.suptitle(f"{loss[0].dataset}: per-node test metrics, clean vs attacked{spread}")
    fig.savefig(path, dpi=100)
    return fig


def write_attack_figures(
    runs: Sequence[Run], out: Path, *, round: int = -1, ignore: Iterable[str] = ()
) -> list[Path]:
    """``attacks_<dataset>.png`` for every dataset with a robustness table (needs matplotlib)."""
    ignore = list(ignore)
    f1 = node_bars(runs, "f1_micro", round=round, ignore=ignore)
    loss = node_bars(runs, "loss", round=round, ignore=ignore)
    written = []
    for dataset in dict.fromkeys(b.dataset for b in loss):
        path = Path(out) / f"attacks_{_slug(dataset)}.png"
        plot_attacks(
            [b for b in f1 if b.dataset == dataset],
            [b for b in loss if b.dataset == dataset],
            path,
        )
        written.append(path)
    return written
