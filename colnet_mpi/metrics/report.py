"""``colnet-mpi report``: paper-style tables (markdown, CSV) and figures (PNG) from results files."""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from colnet_mpi.metrics.paired import (
    DEFAULT_REFERENCE,
    compare,
    paired_markdown,
    parse_reference,
    write_paired_csv,
)
from colnet_mpi.metrics.reader import (
    TEST_METRICS,
    Curve,
    ReportError,
    Row,
    Run,
    aggregate,
    csv_cell,
    csv_number,
    load_runs,
    round_curves,
    scenarios,
    settings,
    time_curves,
    val_loss_curves,
)
from colnet_mpi.metrics.robustness import (
    LOG_SPAN,
    defense_costs,
    robustness_markdown,
    robustness_rows,
    write_attack_figures,
    write_robustness_csv,
)

EXIT_BAD_INPUT = 2
PLOT_HINT = "figures need matplotlib: pip install 'colnet-mpi[plot]'"

#: Columns of the markdown table (micro-averaged, like the paper) and their metric keys.
HEADLINE = (
    ("Loss", "loss"),
    ("Precision", "precision_micro"),
    ("Recall", "recall_micro"),
    ("F1", "f1_micro"),
)
#: Config keys named in the report's header when they are the same for every run.
_CONTEXT_KEYS = (
    "federation.scheme",
    "model.privatization",
    "training.local_epochs",
    "training.rounds",
    "model.width",
)


def add_parser(sub: Any) -> None:
    """Register ``colnet-mpi report``."""
    p = sub.add_parser(
        "report",
        help="paper-style tables and figures from results files",
        description=(
            "Group runs by the config settings in which they differ (seeds are replicates) and write "
            "table.md, table.csv (average client test metrics per task group per setting, mean ± std "
            "over seeds) and val_loss.png / test_metrics.png (needs the 'plot' extra). Runs on "
            "different datasets get one table each; runs of one dataset must have the same nodes. "
            "When the runs of a dataset differ in attack.kind and include clean runs (none), also "
            "a robustness section, robustness.csv and attacks_<dataset>.png (paper Figs 5-8)."
        ),
    )
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="results files or directories (searched for *.h5)"
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="output directory (default: <first PATH>/report, or <its folder>/report for a file)",
    )
    p.add_argument(
        "--include-unfinished",
        action="store_true",
        help="use running/failed runs up to their last complete round (default: skip them)",
    )
    p.add_argument(
        "--round",
        type=int,
        default=-1,
        help="round whose test metrics go in the table: a round number, or negative from the end "
        "(default: -1, the final round)",
    )
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="SECTION.KEY",
        help="a config key that should not split runs into settings (repeatable), e.g. data.root",
    )
    p.add_argument(
        "--paired",
        default="=".join(DEFAULT_REFERENCE),
        metavar="SECTION.KEY=VALUE",
        help="reference setting of the paired Wilcoxon signed-rank tests over seeds, against every "
        "setting that differs from it in that key only (default: federation.scheme=colnet); "
        "'none' leaves the tests out",
    )
    p.add_argument("--no-figures", action="store_true", help="write the tables only")
    p.set_defaults(func=main)


# ---------------------------------------------------------------------------------------------
# Tables


def table_markdown(rows: Sequence[Row], digits: int = 3) -> str:
    """The paper-shaped table: task group, setting, n, then loss/precision/recall/F1 (micro)."""
    head = "| Task group | Setting | n | " + " | ".join(h for h, _ in HEADLINE) + " |"
    rule = "|---|---|---:|" + "---:|" * len(HEADLINE)
    lines = [head, rule]
    previous = None
    for row in rows:
        group = row.group if row.group != previous else ""
        previous = row.group
        cells = [row.metrics[m].format(digits) for _, m in HEADLINE]
        lines.append(f"| {group} | {row.label} | {row.n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Scenario:
    """The runs of one dataset (the paper's scenario) as one table: their settings and rows."""

    dataset: str
    runs: tuple[Run, ...]
    keys: tuple[str, ...]  # the settings that differ between these runs
    rows: tuple[Row, ...]


def build_scenarios(
    runs: Sequence[Run], *, round: int = -1, ignore: Iterable[str] = ()
) -> list[Scenario]:
    """One :class:`Scenario` per dataset; raises ``IncompatibleRunsError`` for mixed node sets."""
    ignore = list(ignore)
    out = []
    for dataset, members in scenarios(runs).items():
        rows = aggregate(members, round=round, ignore=ignore)
        keys = settings(members, ignore=ignore)
        out.append(Scenario(dataset, tuple(members), keys, tuple(rows)))
    return out


def csv_header(keys: Sequence[str]) -> list[str]:
    """Columns of ``table.csv`` (``keys``: the differing settings of all scenarios)."""
    cols = ["dataset", "setting", *keys, "group", "n", "seeds"]
    for m in TEST_METRICS:
        cols += [f"{m}_mean", f"{m}_std"]
    return cols


def write_csv(tables: Sequence[Scenario], path: Path) -> None:
    """One line per dataset x task group x setting: every metric (micro, macro) as mean and std."""
    keys = list(dict.fromkeys(k for t in tables for k in t.keys))
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(csv_header(keys))
        for t in tables:
            for row in t.rows:
                line = [t.dataset, row.label]
                line += [csv_cell(row.setting.get(k)) for k in keys]
                line += [row.group, str(row.n), ";".join(str(s) for s in row.seeds)]
                for m in TEST_METRICS:
                    line += [csv_number(row.metrics[m].mean), csv_number(row.metrics[m].std)]
                w.writerow(line)


def _describe(t: Scenario, round: int) -> list[str]:
    """The lines above a scenario's table: its groups, what differs, what is fixed."""
    first = t.runs[0]
    sizes = ", ".join(f"{g} ({len(first.nodes_of(g))} nodes)" for g in first.groups)
    n_settings = len(dict.fromkeys(row.label for row in t.rows))
    differ = ", ".join(f"`{k}`" for k in t.keys) if t.keys else "none"
    lines = [f"{len(t.runs)} run(s), {n_settings} setting(s); task groups: {sizes}."]
    lines.append(f"Settings that differ: {differ}.")
    fixed = [
        f"{k}={first.flat_config[k]}"
        for k in _CONTEXT_KEYS
        if k not in t.keys and k in first.flat_config
    ]
    if fixed:
        lines.append("Same in all runs: " + ", ".join(fixed) + ".")
    used = ", ".join(str(x) for x in sorted({r.round_index(round) + 1 for r in t.runs}))
    which = "final round" if round == -1 else f"round {round}"
    lines.append(f"Test metrics of the {which} (round {used}).")
    if any(r.asynchronous for r in t.runs):
        lines.append(
            "Asynchronous runs: a node that had finished before that round (a time budget, or "
            "fewer rounds than a faster node) counts with its last evaluation."
        )
    return [" ".join(lines)]


def report_markdown(tables: Sequence[Scenario], round: int = -1) -> str:
    """The whole ``table.md``: per dataset a header line, the table and the runs behind each row."""
    parts = ["# Average client test metrics", ""]
    for t in tables:
        parts += [f"## Dataset `{t.dataset}`", "", *_describe(t, round), ""]
        parts.append(table_markdown(t.rows))
        parts.append("")
        seen = set()
        for row in t.rows:
            if row.label in seen:
                continue
            seen.add(row.label)
            seeds = ", ".join(str(s) for s in row.seeds)
            files = ", ".join(p.name for p in row.paths)
            parts.append(f"- {row.label}: seed(s) {seeds} ({files})")
        parts.append("")
    parts.append(
        "Each task group's nodes are averaged, then mean ± std over the runs (seeds) of a setting "
        "(n runs, std with ddof=1). Precision, recall and F1 are micro-averaged; macro values are "
        "in table.csv. –: the metric does not apply to the task (e.g. F1 for landmarks)."
    )
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# Figures


def plot_curves(
    curves: Sequence[Curve],
    path: Path,
    *,
    xlabel: str,
    ylabel: Callable[[Curve], str],
    title: str,
) -> Any:
    """One panel per (dataset, task group), one line per setting, a ± std band where n ≥ 2.

    A panel whose values span more than a factor 10 (a landmark loss falling from 70 to 1) gets
    a log axis; the legend sits beside the panels, never over the data. Returns the figure.
    """
    from matplotlib.figure import Figure  # the 'plot' extra; the object API needs no backend
    from matplotlib.ticker import MaxNLocator

    panels = list(dict.fromkeys((c.dataset, c.group) for c in curves))
    several = len({d for d, _ in panels}) > 1
    ncols = min(4, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    legend_done: set[str] = set()
    for ax, (dataset, group) in zip(axes, panels, strict=False):
        mine = [c for c in curves if (c.dataset, c.group) == (dataset, group)]
        labels = list(dict.fromkeys(c.label for c in curves if c.dataset == dataset))
        for c in mine:
            color = f"C{labels.index(c.label) % 10}"
            x, mean, std = np.asarray(c.x), np.asarray(c.mean), np.asarray(c.std)
            kept = ~np.isnan(mean)  # rounds without test metrics (run.evaluate_every) are skipped
            if kept.any():
                x, mean, std = x[kept], mean[kept], std[kept]
            marker = "o" if len(x) <= 20 else None
            ax.plot(x, mean, color=color, marker=marker, markersize=3, label=f"{c.label} (n={c.n})")
            if c.n >= 2:
                ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        ax.set_title(f"{group} ({dataset})" if several else group)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        values = np.concatenate([c.mean for c in mine])
        values = values[~np.isnan(values)] if (~np.isnan(values)).any() else values
        positive = values[np.isfinite(values) & (values > 0)]
        log = positive.size == values.size and positive.max() / positive.min() > LOG_SPAN
        ax.set_ylabel(ylabel(mine[0]) + (" (log scale)" if log else ""))
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if dataset not in legend_done:
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
            legend_done.add(dataset)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if any(c.n >= 2 for c in curves):
        title += " (shaded: ± std over seeds)"
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    return fig


def write_figures(
    tables: Sequence[Scenario], out: Path, *, ignore: Iterable[str] = ()
) -> list[Path]:
    """``val_loss.png`` (paper Figs 2–4) and ``test_metrics.png`` (test F1, or loss, per round);
    where any run is asynchronous also ``test_metrics_time.png`` (the same against wall time,
    :func:`~colnet_mpi.metrics.reader.time_curves`: how modes compare when nodes run different
    numbers of rounds)."""
    ignore = list(ignore)
    val_curves: list[Curve] = []
    test_curves: list[Curve] = []
    timed: list[Curve] = []
    loss_panels: set[tuple[str, str]] = set()  # groups without F1 (landmarks): test loss instead
    for t in tables:
        val_curves += val_loss_curves(t.runs, ignore=ignore)
        f1 = round_curves(t.runs, "f1_micro", ignore=ignore)
        loss = round_curves(t.runs, "loss", ignore=ignore)
        loss_panels |= {(c.dataset, c.group) for c in f1 if all(math.isnan(v) for v in c.mean)}
        loss_groups = {g for d, g in loss_panels if d == t.dataset}
        test_curves += _per_group(t, f1, loss, loss_groups)
        if any(r.asynchronous for r in t.runs):
            f1_t = time_curves(t.runs, "f1_micro", ignore=ignore)
            loss_t = time_curves(t.runs, "loss", ignore=ignore)
            timed += _per_group(t, f1_t, loss_t, loss_groups)

    def metric_label(c: Curve) -> str:
        if (c.dataset, c.group) in loss_panels:
            return "average client test loss"
        return "average client test F1 (micro)"

    val, test = out / "val_loss.png", out / "test_metrics.png"
    plot_curves(
        val_curves,
        val,
        xlabel="epoch",
        ylabel=lambda c: "average client validation loss",
        title="Average client validation loss per epoch",
    )
    plot_curves(
        test_curves,
        test,
        xlabel="round",
        ylabel=metric_label,
        title="Average client test metrics per round",
    )
    if not timed:
        return [val, test]
    when = out / "test_metrics_time.png"
    plot_curves(
        timed,
        when,
        xlabel="seconds since the rounds began",
        ylabel=metric_label,
        title="Average client test metrics against wall time (each node's newest evaluation)",
    )
    return [val, test, when]


def _per_group(
    t: Scenario, f1: Sequence[Curve], loss: Sequence[Curve], loss_groups: set[str]
) -> list[Curve]:
    """Each task group's curves: of the test loss for groups without F1 (landmarks), else F1."""
    out: list[Curve] = []
    for group in t.runs[0].groups:
        source = loss if group in loss_groups else f1
        out += [c for c in source if c.group == group]
    return out


def write_report(
    runs: Sequence[Run],
    out: str | Path,
    *,
    round: int = -1,
    ignore: Iterable[str] = (),
    figures: bool = True,
    paired: tuple[str, str] | None = DEFAULT_REFERENCE,
) -> tuple[str, list[Path], str | None]:
    """Write ``table.md``, ``table.csv`` and (with matplotlib) the figures into ``out``.

    Runs are split by dataset (one table each). Datasets whose runs differ in ``attack.kind`` and
    include clean runs also get the robustness section (appended to ``table.md``),
    ``robustness.csv`` and ``attacks_<dataset>.png``. Where the runs of a dataset differ in the
    key of ``paired`` and include its value, ``table.md`` ends with paired Wilcoxon signed-rank
    tests over seeds of that setting against the others, also in ``paired.csv``
    (:mod:`colnet_mpi.metrics.paired`). Returns the markdown text, the files
    written and a note when the figures were left out because matplotlib is missing.
    """
    ignore = list(ignore)
    tables = build_scenarios(runs, round=round, ignore=ignore)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = report_markdown(tables, round)
    attacked = robustness_rows(runs, round=round, ignore=ignore)
    with warnings.catch_warnings():
        # the same pairing warnings as robustness_rows: once is enough
        warnings.filterwarnings("ignore", message=".*robustness table")
        costs = defense_costs(runs, round=round, ignore=ignore) if attacked else []
    if attacked:
        text += "\n" + robustness_markdown(attacked, costs, runs=runs, round=round)
    comparisons = compare(runs, reference=paired, round=round, ignore=ignore) if paired else []
    if comparisons:
        text += "\n" + paired_markdown(comparisons)
    md, csv_path = out_dir / "table.md", out_dir / "table.csv"
    md.write_text(text)
    write_csv(tables, csv_path)
    written = [md, csv_path]
    if comparisons:
        write_paired_csv(comparisons, out_dir / "paired.csv")
        written.append(out_dir / "paired.csv")
    if attacked:
        write_robustness_csv(attacked, out_dir / "robustness.csv")
        written.append(out_dir / "robustness.csv")
    note = None
    if figures:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            note = PLOT_HINT
        else:
            written += write_figures(tables, out_dir, ignore=ignore)
            if attacked:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*robustness table")
                    written += write_attack_figures(runs, out_dir, round=round, ignore=ignore)
    return text, written, note


# ---------------------------------------------------------------------------------------------
# Command line


def default_out(paths: Sequence[str]) -> Path:
    """``<first PATH>/report`` for a directory, ``<its folder>/report`` for a file."""
    first = Path(paths[0])
    return (first if first.is_dir() else first.parent) / "report"


def out_dir_problem(out: Path) -> str | None:
    """What stops the report from being written to folder ``out`` (a short reason), or None.

    Only looks: ``out`` must be a folder, or not exist yet under a nearest existing folder in
    which this user may create entries (``os.access``: right for root and read-only mounts too).
    """
    if out.exists():
        if not out.is_dir():
            return f"{out} exists and is not a folder"
        if not os.access(out, os.W_OK | os.X_OK):
            return f"{out} is not writable (permission denied)"
        return None
    if out.is_symlink():
        return f"{out} is a broken symbolic link"
    for parent in out.absolute().parents:
        if parent.is_symlink() and not parent.exists():
            return f"{parent} is a broken symbolic link"
        if not parent.exists():
            continue
        if not parent.is_dir():
            return f"{parent} is a file, not a folder"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"{parent} is not writable (permission denied)"
        return None
    return None  # pragma: no cover - the root folder always exists


def _err(msg: str) -> None:
    print(f"colnet-mpi report: {msg}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    """Run ``colnet-mpi report``."""
    out = Path(args.out) if args.out else default_out(args.paths)
    paired = None
    if args.paired.strip().lower() != "none":
        try:
            paired = parse_reference(args.paired)
        except ReportError as err:
            _err(str(err))
            return EXIT_BAD_INPUT
    problem = out_dir_problem(out)  # before reading anything: a bad --out fails fast
    if problem:
        _err(f"cannot write the report to {out}: {problem}")
        return EXIT_BAD_INPUT
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs = load_runs(args.paths, include_unfinished=args.include_unfinished)
            try:
                text, written, note = write_report(
                    runs,
                    out,
                    round=args.round,
                    ignore=args.ignore,
                    figures=not args.no_figures,
                    paired=paired,
                )
            except OSError as err:  # a full disk, or --out changed after the check above
                raise ReportError(f"cannot write the report to {out}: {err}") from err
    except (ReportError, IndexError) as err:
        for w in caught:
            _err(f"warning: {w.message}")
        _err(str(err))
        return EXIT_BAD_INPUT
    for w in caught:
        _err(f"warning: {w.message}")
    print(text, end="", flush=True)
    if note:
        _err(f"note: {note}")
    _err(f"wrote {', '.join(p.name for p in written)} to {out}/")
    return 0
