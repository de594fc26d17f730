"""The federation of one rank: strategies chosen from the config, the round loop, the record."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from colnet_mpi.attacks.plan import AttackPlan
from colnet_mpi.comm.topology import Topology
from colnet_mpi.comm.transport import Transport
from colnet_mpi.comm.turns import HostTurns
from colnet_mpi.config import Config
from colnet_mpi.data import dataset_tasks
from colnet_mpi.federation import schemes, stages
from colnet_mpi.federation.checkpoint import Checkpointer, save_checkpoint
from colnet_mpi.federation.context import RoundContext
from colnet_mpi.federation.cross import CrossAggregator
from colnet_mpi.federation.defense import Defense
from colnet_mpi.federation.grouping import Grouper
from colnet_mpi.federation.intra import IntraAggregator
from colnet_mpi.federation.recording import record_round
from colnet_mpi.federation.state import FederationState
from colnet_mpi.federation.stop import Preempted, StopRequest, test_hook
from colnet_mpi.metrics.record import RecordSpec
from colnet_mpi.metrics.writer import ResultsWriter
from colnet_mpi.node import Node, derive_seed, return_free_memory


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
        self.transport = Transport(
            topology,
            node.device,
            config.federation.cuda_aware,
            shared_memory=config.federation.shared_memory,
        )
        timeout = config.federation.timeout
        topology.watchdog.timeout = None if timeout == "auto" else float(timeout)
        # run.host_slots (synchronous mode only, the config makes sure): the host's ranks take
        # turns at the stages that compute (collective)
        self.turns: HostTurns | None = None
        if config.run.host_slots > 0:
            self.turns = HostTurns(topology.world, topology.watchdog, config.run.host_slots)
            topology.adopt(self.turns)
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
        self.saved_round = 0  # the last round whose checkpoint is complete (0: none)
        self.checkpoint_seconds = 0.0  # time this rank spent in checkpoint steps
        self.clock0 = time.perf_counter()  # reset when the rounds begin (round/clock)
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
        watchdog = self.topology.watchdog
        for name, stage in stages.ROUND:
            watchdog.at(r, name)
            test_hook(f"stage.{name}", r, self.topology.rank)
            t = time.perf_counter()
            with self._turn(name):
                ran = stage(self, ctx)
            if ran:
                ctx.seconds[name] += time.perf_counter() - t
            if name == "local_train" and self.stop is not None:
                sig = self.stop.agreed(self.topology.world, watchdog)
                if sig:
                    raise Preempted(f"{sig} in round {r}")
        ctx.seconds["total"] = time.perf_counter() - t_round
        ctx.clock = time.perf_counter() - self.clock0
        watchdog.round_finished(ctx.seconds["total"])
        self.state.finish_round(r, ctx.groups)
        return ctx

    @contextmanager
    def _turn(self, stage: str) -> Iterator[None]:
        """This rank's turn on its host for a stage that computes (``run.host_slots``); the
        stages that talk MPI run outside turns."""
        turns = self.turns
        if turns is None or stage not in stages.TURN_STAGES:
            yield
            if turns is not None and turns.active:
                # every rank of the host is awake in these stages: what each one freed goes
                # back at once rather than at the end of the round (peak memory, not speed)
                return_free_memory()
            return
        if turns.active:
            return_free_memory()  # what the stages before freed is not held while waiting
        with turns.turn(stages.TURN_STAGES[stage]):
            yield
            if turns.active and self.node.device.type == "cuda":
                torch.cuda.empty_cache()  # the next rank on a shared GPU gets the memory

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

    # -- the run -----------------------------------------------------------------------------------
    def run(self, start_round: int = 1) -> None:
        """Rounds ``start_round`` … ``training.rounds``; after each, the record is on disk and,
        every ``run.checkpoint_every`` rounds (and after the last), every rank's state too.

        With a :class:`StopRequest` in ``self.stop``, a stop signal on any rank ends the run at
        the next point all ranks reach (round start, end of local training) with
        :class:`Preempted`, after the last finished round is checkpointed.
        """
        self.clock0 = time.perf_counter()
        if self.config.federation.mode == "async":
            from colnet_mpi.federation.asynchronous import AsyncRounds

            AsyncRounds(self).run(start_round)
            return
        world, watchdog = self.topology.world, self.topology.watchdog
        rounds, every = self.config.training.rounds, self.config.run.checkpoint_every
        self.saved_round = start_round - 1
        for r in range(start_round, rounds + 1):
            watchdog.at(r, "round start")
            if self.stop is not None and (sig := self.stop.agreed(world, watchdog)):
                if self.checkpoints is not None and every and self.saved_round < r - 1:
                    save_checkpoint(self, r - 1)
                    self.saved_round = r - 1
                raise Preempted(f"{sig} before round {r}")
            ctx = self.round(r)
            watchdog.at(r, "record")
            record_round(self, ctx)
            # nobody starts the next round before round r is on disk: a crash later loses nothing
            watchdog.fence(world, f"round {r} to be on disk")
            if self.checkpoints is not None and every and (r % every == 0 or r == rounds):
                watchdog.at(r, "checkpoint")
                save_checkpoint(self, r)
                self.saved_round = r
            # the round's vectors (start, contribution, aggregates) are not needed any more, and
            # the aggregation stages and the checkpoint freed their copies into the C heap: hand
            # them back before the next round (a rank waiting for its turn would hold them)
            del ctx
            return_free_memory()
