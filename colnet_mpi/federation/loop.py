"""The federation of one rank: strategies chosen from the config, the round loop, the record."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from mpi4py import MPI

from colnet_mpi.algorithms.clustering import adjusted_rand
from colnet_mpi.attacks.plan import AttackPlan
from colnet_mpi.comm.buffers import checksum
from colnet_mpi.comm.topology import Topology
from colnet_mpi.comm.transport import Transport
from colnet_mpi.config import Config
from colnet_mpi.data import dataset_tasks
from colnet_mpi.federation import schemes, stages
from colnet_mpi.federation.checkpoint import Checkpointer, CheckpointError
from colnet_mpi.federation.context import RoundContext
from colnet_mpi.federation.cross import CrossAggregator
from colnet_mpi.federation.defense import Defense
from colnet_mpi.federation.grouping import Grouper
from colnet_mpi.federation.intra import IntraAggregator
from colnet_mpi.federation.state import FederationState
from colnet_mpi.federation.stop import Preempted, StopRequest, test_hook
from colnet_mpi.metrics.names import METRIC_NAMES
from colnet_mpi.metrics.record import RecordSpec
from colnet_mpi.metrics.writer import ResultsWriter
from colnet_mpi.node import Node, derive_seed


class Federation:
    """Runs the rounds of one node (this rank) against its peers."""

    def __init__(
        self,
        config: Config,
        topology: Topology,
        node: Node,
        writer: ResultsWriter | None,
        log: Callable[[str], None],
    ) -> None:
        self.config, self.topology, self.node, self.writer, self.log = (
            config, topology, node, writer, log,
        )  # fmt: skip
        self.transport = Transport(topology, node.device, config.federation.cuda_aware)
        n = topology.size
        tasks = dataset_tasks(config.data.dataset)
        self.true_groups = [tasks[nd.task].group for nd in config.nodes]
        names = sorted(set(self.true_groups))
        self.true_labels = np.array([names.index(g) for g in self.true_groups])
        a = config.clustering.record_affinity
        self.record_affinity = a == "yes" or (a == "auto" and n <= 64)
        self.spec = RecordSpec(
            n, config.training.local_epochs, record_affinity=self.record_affinity
        )
        f = config.federation
        chosen = schemes.resolve(f.scheme, f.grouping, config.defense.aggregation)
        self.grouper: Grouper | None = None  # None: no exchange, every node stays alone
        if chosen.grouper is not None:
            self.grouper = schemes.build(schemes.GROUPERS, chosen.grouper, self)
        self.intra: IntraAggregator | None = None  # None: no aggregation inside groups
        if chosen.intra is not None:
            self.intra = schemes.build(schemes.INTRA, chosen.intra, self)
        self.cross: CrossAggregator = schemes.build(schemes.CROSS, chosen.cross, self)
        self.defense = Defense(self)
        self.state = FederationState(n)
        self.checkpoints: Checkpointer | None = None  # set by the caller to save state
        self.stop: StopRequest | None = None  # set by the caller to honour stop signals
        self.attack = AttackPlan(
            config.attack,
            topology.rank,
            kind=node.task.kind,
            num_outputs=node.task.num_outputs,
            seed=derive_seed(config.run.seed, 7, topology.rank),
            device=node.device,
        )

    def weight(self) -> float:
        """This node's FedAvg weight."""
        equal = self.config.federation.intra_weights == "equal"
        return 1.0 if equal else float(self.node.n_train)

    def round(self, r: int) -> RoundContext:
        """Run round ``r`` (1-based) on this rank: every stage in order, each timed."""
        ctx = RoundContext(r, self.topology.size)
        self.transport.reset_counters()
        t_round = time.perf_counter()
        for name, stage in stages.ROUND:
            test_hook(f"stage.{name}", r, self.topology.rank)
            t = time.perf_counter()
            stage(self, ctx)
            ctx.seconds[name] += time.perf_counter() - t
            if name == "local_train" and self.stop is not None:
                sig = self.stop.agreed(self.topology.world)
                if sig:
                    raise Preempted(f"{sig} in round {r}")
        ctx.seconds["total"] = time.perf_counter() - t_round
        self.state.finish_round(r, ctx.groups)
        return ctx

    def values(self, ctx: RoundContext) -> dict[str, Any]:
        """This rank's record of a round (see ``metrics/record.py``)."""
        rank, tr = self.topology.rank, self.transport
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
            **ctx.hca,
            "clustering/k": ctx.k,
            "attack/active": int(self.attack.active(ctx.r)),
            **ctx.defended.values(),
        }
        if ctx.proposal is not None:
            values["clustering/proposal"] = ctx.proposal
        if ctx.signals is not None:
            values["clustering/loss"], values["clustering/jacobian"] = ctx.signals
        if ctx.affinity is not None and self.record_affinity:
            values["clustering/affinity"], values["clustering/cosine"] = ctx.affinity
        return values

    def record(self, ctx: RoundContext) -> dict[str, np.ndarray] | None:
        """Gather every rank's record onto rank 0 and append it to the results file."""
        gathered = self.transport.gather_records(self.spec.pack(self.values(ctx)), root=0)
        if gathered is None:
            return None
        e = self.config.training.local_epochs
        grouped = self.grouper is not None
        ari = adjusted_rand(self.true_labels, ctx.groups) if grouped else float("nan")
        rows = self.spec.rows(gathered, {"epoch/round": np.full(e, ctx.r), "clustering/ari": ari})
        if self.writer is not None:
            self.writer.append(rows)
        self.log(self._summary(ctx.r, rows, ari))
        return {k: np.asarray(v) for k, v in rows.items()}

    def _summary(self, r: int, rows: dict, ari: float) -> str:
        """The one progress line per round."""
        parts = [f"round {r:>3}/{self.config.training.rounds}"]
        parts.append(f"{float(np.max(rows['round/seconds/total'])):6.1f}s")
        tasks = dataset_tasks(self.config.data.dataset)
        for name in dict.fromkeys(nd.task for nd in self.config.nodes):
            idx = [i for i, nd in enumerate(self.config.nodes) if nd.task == name]
            if tasks[name].kind == "landmarks":
                parts.append(f"{name} loss={np.mean(rows['round/test_loss'][idx]):.3f}")
            else:
                parts.append(f"{name} f1={np.mean(rows['round/test_f1_micro'][idx]):.3f}")
        if self.grouper is not None:
            parts.append(f"ARI={ari:.2f}")
            parts.append("groups=" + "".join(str(int(g)) for g in rows["round/group"]))
        return "  ".join(parts)

    # -- state and checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's whole state at a round boundary (numeric; see ``checkpoint.py``)."""
        return {
            "node": self.node.state_dict(),
            "federation": self.state.state_dict(),
            "attack": self.attack.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.node.load_state_dict(state["node"])
        self.state.load_state_dict(state["federation"])
        self.attack.load_state_dict(state["attack"])

    def backbone_checksum(self) -> int:
        """CRC-32 of the shared part of this node's backbone (as ``round/backbone_checksum``)."""
        flat = self.node.flat
        return checksum(
            flat.shared_part(flat.pack(), local_batchnorm=self.config.federation.local_bn)
        )

    def checkpoint(self, r: int) -> None:
        """Collective: every rank saves its state of round ``r``; then the results file names the
        round and older files go (the previous checkpoint stays until this one is complete)."""
        assert self.checkpoints is not None
        self.checkpoints.save(r, self.state_dict(), {"backbone_checksum": self.backbone_checksum()})
        world = self.topology.world
        seconds = np.zeros(1)
        world.Reduce(
            [np.array([self.checkpoints.last_seconds]), MPI.DOUBLE],
            [seconds, MPI.DOUBLE],
            op=MPI.MAX,
        )
        size = np.zeros(1)
        world.Reduce(
            [np.array([float(self.checkpoints.last_bytes)]), MPI.DOUBLE],
            [size, MPI.DOUBLE],
            op=MPI.SUM,
        )
        if self.writer is not None:
            self.writer.mark_checkpoint(
                r, str(self.checkpoints.directory.resolve()), seconds[0], int(size[0])
            )
        world.Barrier()
        self.checkpoints.prune(keep=r)

    def resume(self, r: int, recorded: np.ndarray | None) -> None:
        """Load this rank's checkpoint of round ``r``; its backbone must match the file's
        checksum and, when given, the results file's ``round/backbone_checksum`` of round ``r``."""
        assert self.checkpoints is not None
        state, attrs = self.checkpoints.load(r)
        self.load_state_dict(state)
        digest = self.backbone_checksum()
        rank = self.topology.rank
        expected = [int(attrs["backbone_checksum"])]
        if recorded is not None:
            expected.append(int(recorded[rank]))
        if any(digest != e for e in expected):
            raise CheckpointError(
                f"rank {rank}: the backbone restored from {self.checkpoints.path(r)} has checksum "
                f"{digest}, the run recorded {expected}; the checkpoint does not belong to this run"
            )

    # -- the run -----------------------------------------------------------------------------------
    def run(self, start_round: int = 1) -> None:
        """Rounds ``start_round`` … ``training.rounds``; after each, the record is on disk and,
        every ``run.checkpoint_every`` rounds (and after the last), every rank's state too.

        With a :class:`StopRequest` in ``self.stop``, a stop signal on any rank ends the run at
        the next point all ranks reach (round start, end of local training) with
        :class:`Preempted`, after the last finished round is checkpointed.
        """
        world = self.topology.world
        rounds, every = self.config.training.rounds, self.config.run.checkpoint_every
        saved = start_round - 1
        for r in range(start_round, rounds + 1):
            if self.stop is not None and (sig := self.stop.agreed(world)):
                if self.checkpoints is not None and every and saved < r - 1:
                    self.checkpoint(r - 1)
                raise Preempted(f"{sig} before round {r}")
            ctx = self.round(r)
            self.record(ctx)
            # nobody starts the next round before round r is on disk: a crash later loses nothing
            world.Barrier()
            if self.checkpoints is not None and every and (r % every == 0 or r == rounds):
                self.checkpoint(r)
                saved = r
