"""A round's record: this rank's values, gathered onto the writer rank, appended, summarised."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from colnet_mpi.algorithms.clustering import adjusted_rand, partition_stamp
from colnet_mpi.data import dataset_tasks
from colnet_mpi.federation.context import RoundContext
from colnet_mpi.metrics.names import METRIC_NAMES

if TYPE_CHECKING:
    from colnet_mpi.federation.loop import Federation


def round_values(fed: Federation, ctx: RoundContext) -> dict[str, Any]:
    """This rank's record of a round (see ``metrics/record.py``)."""
    rank, tr = fed.topology.rank, fed.transport
    values: dict[str, Any] = {
        "epoch/train_loss": ctx.train_loss,
        "epoch/val_loss": ctx.val_loss,
        **{f"round/test_{m}": ctx.test[m] for m in METRIC_NAMES},
        "round/group": int(ctx.groups[rank]),
        "round/leader": int(ctx.leaders[rank]),
        "round/backbone_checksum": ctx.checksum,
        "round/bytes_sent": tr.bytes_sent,
        "round/bytes_received": tr.bytes_received,
        **{f"round/seconds/{s}": v for s, v in ctx.seconds.items()},
        "round/clock": ctx.clock,
        "round/partition_stamp": partition_stamp(ctx.groups),
        "async/staleness": ctx.staleness,
        "async/leader_staleness": ctx.leader_staleness,
        "async/delta_staleness": ctx.delta_staleness,
        "async/stood_in": int(ctx.stood_in),
        "async/head_epochs": ctx.head_epochs,
        "async/trained": ctx.trained,
        **ctx.hca,
        "clustering/k": ctx.k,
        "attack/active": int(fed.attack.active(ctx.r)),
        **ctx.defended.values(),
    }
    if ctx.proposal is not None:
        values["clustering/proposal"] = ctx.proposal
    if ctx.signals is not None:
        values["clustering/loss"], values["clustering/jacobian"] = ctx.signals
    if ctx.affinity is not None and fed.record_affinity:
        values["clustering/affinity"], values["clustering/cosine"] = ctx.affinity
    return values


def record_round(fed: Federation, ctx: RoundContext) -> dict[str, np.ndarray] | None:
    """Gather every rank's record onto rank 0 and append it to the results file."""
    gathered = fed.transport.gather_records(fed.spec.pack(round_values(fed, ctx)), root=0)
    if gathered is None:
        return None
    grouped = fed.grouper is not None
    ari = adjusted_rand(fed.true_labels, ctx.groups) if grouped else float("nan")
    rows = append_row(fed, ctx.r, gathered, ari)
    return {k: np.asarray(v) for k, v in rows.items()}


def append_row(
    fed: Federation,
    r: int,
    gathered: np.ndarray,
    ari: float,
    shown: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Writer rank: round ``r``'s row from every rank's packed record ``(n, width)``, appended to
    the results file and summarised in the job log (``shown``: see :func:`summary_line`)."""
    e = fed.config.training.local_epochs
    rows = fed.spec.rows(gathered, {"epoch/round": np.full(e, r), "clustering/ari": ari})
    if fed.writer is not None:
        fed.writer.append(rows)
    fed.log(summary_line(fed, r, rows, ari, shown))
    return rows


def summary_line(
    fed: Federation, r: int, rows: dict, ari: float, shown: dict[str, np.ndarray] | None = None
) -> str:
    """The one progress line per round; ``shown``: ``round/test_loss`` and
    ``round/test_f1_micro`` to give instead of the row's (asynchronous rounds: a node that has
    finished with its last evaluation)."""
    parts = [f"round {r:>3}/{fed.config.training.rounds}"]
    parts.append(f"{float(np.max(rows['round/seconds/total'])):6.1f}s")
    tasks = dataset_tasks(fed.config.data.dataset)
    if shown is not None:
        rows = {**rows, **shown}
    untested = bool(np.all(np.isnan(rows["round/test_loss"])))  # run.evaluate_every
    if untested:
        parts.append("(no test this round)")
    for name in dict.fromkeys(nd.task for nd in fed.config.nodes):
        if untested:
            break
        idx = [i for i, nd in enumerate(fed.config.nodes) if nd.task == name]
        if tasks[name].kind == "landmarks":
            parts.append(f"{name} loss={np.mean(rows['round/test_loss'][idx]):.3f}")
        else:
            parts.append(f"{name} f1={np.mean(rows['round/test_f1_micro'][idx]):.3f}")
    local_first = fed.config.federation.first_round == "local"
    if fed.grouper is not None and local_first and bool(np.all(rows["round/group"] < 0)):
        parts.append("no groups yet")  # asynchronous round 1 without the first partition
    elif fed.grouper is not None:
        parts.append(f"ARI={ari:.2f}")
        parts.append("groups=" + "".join(str(int(g)) for g in rows["round/group"]))
    return "  ".join(parts)
