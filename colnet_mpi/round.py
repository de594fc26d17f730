"""The five-stage round: the one place that combines local training, the algorithms and the comm layer.

A *scheme* (``none``, ``intra``, ``fedper``, ``colnet``) is only a choice of which stages run and how
the cross-group stage combines groups; every scheme runs this same loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from colnet_mpi.algorithms.clustering import (
    adjusted_rand,
    consensus_partition,
    cosine_matrix,
    eigengap_k,
    fuse_affinity,
    leader_position,
    spectral_labels,
)
from colnet_mpi.algorithms.hca import hca_update
from colnet_mpi.algorithms.signals import loss_and_jacobian
from colnet_mpi.comm.buffers import FlatState, checksum
from colnet_mpi.comm.topology import Topology, ints_allgather
from colnet_mpi.comm.transport import Transport
from colnet_mpi.config import Config
from colnet_mpi.data import DataSizes, NodeData, TaskSpec, build_node_data, dataset_tasks
from colnet_mpi.metrics.writer import STAGES, TEST_METRICS, ResultsWriter
from colnet_mpi.models import build_backbone, build_head
from colnet_mpi.tasks import (
    evaluate,
    loss_function,
    make_optimizer,
    make_scheduler,
    train_epoch,
)


@dataclass(frozen=True)
class Scheme:
    """Which stages an aggregation scheme runs; ``cross`` is None, ``"mean"`` or ``"hca"``."""

    name: str
    exchange: bool
    cluster: bool
    intra: bool
    cross: str | None


SCHEMES: dict[str, Scheme] = {
    "none": Scheme("none", exchange=False, cluster=False, intra=False, cross=None),
    "intra": Scheme("intra", exchange=True, cluster=True, intra=True, cross=None),
    "fedper": Scheme("fedper", exchange=True, cluster=True, intra=True, cross="mean"),
    "colnet": Scheme("colnet", exchange=True, cluster=True, intra=True, cross="hca"),
}


def _seed(*parts: int) -> int:
    """A 63-bit seed derived from several integers (stable across runs and platforms)."""
    return int(
        np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1
    )


class Node:
    """This rank's federation node: its data shard, backbone, private head and optimizer."""

    def __init__(self, config: Config, rank: int, device: torch.device) -> None:
        self.config = config
        self.rank = rank
        self.device = device
        node_cfg = config.nodes[rank]
        self.name = node_cfg.name
        self.task: TaskSpec = dataset_tasks(config.data.dataset)[node_cfg.task]
        peers = [i for i, n in enumerate(config.nodes) if n.task == node_cfg.task]
        seed = config.run.seed
        self.data: NodeData = build_node_data(
            config.data.dataset,
            node_cfg.task,
            peers.index(rank),
            len(peers),
            seed=seed,
            sizes=DataSizes(
                samples_per_node=config.data.samples_per_node,
                test_samples=config.data.test_samples,
                image_size=config.data.image_size,
            ),
            root=config.data.root or None,
        )
        m = config.model
        stem = m.resolved_stem(self.data.image_size)

        def backbone() -> torch.nn.Module:
            return build_backbone(
                width=m.width,
                stem=stem,
                in_channels=self.data.channels,
                privatization=m.privatization,
            ).to(device)

        torch.manual_seed(_seed(seed, 1))  # one shared backbone initialisation for every node
        self.backbone = backbone()
        torch.manual_seed(_seed(seed, 2, rank))  # heads are initialised per node
        self.head = build_head(
            width=m.width, privatization=m.privatization, num_outputs=self.task.num_outputs
        ).to(device)
        self.scratch = backbone()  # holds peers' backbones during clustering
        self.flat = FlatState(self.backbone)
        self.scratch_flat = FlatState(self.scratch)
        opt = config.training.optimizer_for(self.task.kind)
        params = list(self.backbone.parameters()) + list(self.head.parameters())
        self.optimizer = make_optimizer(
            opt.name, params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay
        )
        self.scheduler = make_scheduler(self.optimizer, opt.lr_decay)
        self.loss_fn = loss_function(self.task.kind)
        t = config.training
        gen = torch.Generator().manual_seed(_seed(seed, 3, rank))
        self.train_loader = DataLoader(
            self.data.train, batch_size=t.batch_size, shuffle=True, generator=gen
        )
        self.val_loader = DataLoader(self.data.val, batch_size=t.eval_batch_size)
        self.test_loader = DataLoader(self.data.test, batch_size=t.eval_batch_size)
        n_probe = min(len(self.data.train), config.clustering.max_batches * t.batch_size)
        x, y = self.data.train.tensors
        self.probe_batches = [
            (x[i : i + t.batch_size].to(device), y[i : i + t.batch_size].to(device))
            for i in range(0, n_probe, t.batch_size)
        ]
        torch.manual_seed(_seed(seed, 4, rank))

    @property
    def n_train(self) -> int:
        """Training samples of this node."""
        return len(self.data.train)

    def train_local(self, epochs: int) -> tuple[list[float], list[float]]:
        """Stage 1: E local epochs; returns per-epoch training and validation losses."""
        train, val = [], []
        clip = self.config.training.grad_clip or None
        for _ in range(epochs):
            train.append(
                train_epoch(
                    self.backbone,
                    self.head,
                    self.train_loader,
                    self.task.kind,
                    self.optimizer,
                    self.device,
                    grad_clip=clip,
                )
            )
            self.scheduler.step()
            val.append(self.evaluate(self.val_loader)["loss"])
        return train, val

    def evaluate(self, loader: DataLoader[tuple[torch.Tensor, ...]]) -> dict[str, float]:
        """Task metrics of the current (backbone, head) on a loader."""
        return evaluate(
            self.backbone, self.head, loader, self.task.kind, self.task.num_outputs, self.device
        )

    def signals(self, vector: torch.Tensor, generator: torch.Generator) -> tuple[float, float]:
        """Loss and mean Jacobian norm of the model (backbone ``vector``, own head) on local data."""
        self.scratch_flat.unpack(vector)
        c = self.config.clustering
        return loss_and_jacobian(
            self.scratch,
            self.head,
            self.probe_batches,
            self.loss_fn,
            estimator=c.jacobian,
            probes=c.probes,
            generator=generator,
        )


@dataclass
class RoundResult:
    """What one rank knows after a round (packed into one float64 record for the writer)."""

    train_loss: list[float]
    val_loss: list[float]
    test: dict[str, float]
    group: int
    leader: int
    checksum: int
    bytes_sent: int
    bytes_received: int
    seconds: dict[str, float]
    proposal: np.ndarray
    affinity: (
        np.ndarray
    )  # (2, n, n): fused affinity S and cosine C over world indices (NaN = unseen)
    signals: (
        np.ndarray
    )  # (2, n): loss and Jacobian norm of each seen backbone with this node's head
    hca_weight: float = float("nan")
    hca_mean_delta_norm: float = float("nan")
    hca_update_norm: float = float("nan")
    hca_solver_ok: int = -1  # 1 ok, 0 failed (uniform weights used), -1 not run
    k: int = 0
    groups: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def pack(self) -> np.ndarray:
        """One flat float64 record (same length on every rank)."""
        head = [
            *self.train_loss,
            *self.val_loss,
            *(self.test[m] for m in TEST_METRICS),
            self.group,
            self.leader,
            self.checksum,
            self.bytes_sent,
            self.bytes_received,
            *(self.seconds.get(s, 0.0) for s in STAGES),
            self.hca_weight,
            self.hca_mean_delta_norm,
            self.hca_update_norm,
            self.hca_solver_ok,
            self.k,
        ]
        return np.concatenate(
            [
                np.asarray(head, dtype=np.float64),
                self.proposal.astype(np.float64),
                self.signals.reshape(-1).astype(np.float64),
                self.affinity.reshape(-1).astype(np.float64),
            ]
        )


def _any_value(column: np.ndarray) -> float:
    """The value the leaders reported (identical on all of them), NaN when no leader ran HCA."""
    finite = column[~np.isnan(column)]
    return float(finite.max()) if finite.size else float("nan")


def unpack_records(records: np.ndarray, epochs: int, n: int) -> dict[str, np.ndarray]:
    """Split the gathered (n, len) records into named columns (the inverse of RoundResult.pack)."""
    cols: dict[str, np.ndarray] = {}
    i = 0

    def take(name: str, width: int) -> None:
        nonlocal i
        cols[name] = records[:, i : i + width]
        i += width

    take("train_loss", epochs)
    take("val_loss", epochs)
    for m in TEST_METRICS:
        take(f"test_{m}", 1)
    for name in ("group", "leader", "checksum", "bytes_sent", "bytes_received"):
        take(name, 1)
    for s in STAGES:
        take(f"seconds/{s}", 1)
    for name in ("hca_weight", "hca_mean_delta_norm", "hca_update_norm", "hca_solver_ok", "k"):
        take(name, 1)
    take("proposal", n)
    take("loss", n)
    take("jacobian", n)
    take("affinity", n * n)
    take("cosine", n * n)
    return cols


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
        self.config = config
        self.topology = topology
        self.node = node
        self.writer = writer
        self.log = log
        self.scheme = SCHEMES[config.federation.scheme]
        self.transport = Transport(topology, node.device, config.federation.cuda_aware)
        n = topology.size
        self.true_groups = [
            dataset_tasks(config.data.dataset)[nd.task].group for nd in config.nodes
        ]
        names = sorted(set(self.true_groups))
        self.true_labels = np.array([names.index(g) for g in self.true_groups])
        self.record_affinity = config.clustering.record_affinity == "yes" or (
            config.clustering.record_affinity == "auto" and n <= 64
        )
        self.epochs_done = 0

    # -- stages ------------------------------------------------------------------------------------
    def _cluster(self, r: int, own: torch.Tensor, received: dict[int, torch.Tensor]) -> tuple:
        """Stage 3a/3b: this node's proposal from its own view, then the agreed partition."""
        cfg = self.config.clustering
        topo = self.topology
        n = topo.size
        view = [topo.rank, *sorted(received)]
        vectors = torch.stack([own, *(received[j] for j in view[1:])])
        p = self.node.flat.n_trainable
        cos = cosine_matrix(vectors[:, :p], centered=cfg.cosine == "centered")
        gen = torch.Generator(device=self.node.device).manual_seed(
            _seed(self.config.run.seed, 5, topo.rank, r)
        )
        losses, jacobians = zip(*(self.node.signals(v, gen) for v in vectors), strict=False)
        m = len(view)
        loss_m = np.tile(np.asarray(losses, dtype=np.float64), (m, 1))
        jac_m = np.tile(np.asarray(jacobians, dtype=np.float64), (m, 1))
        affinity = fuse_affinity(
            cos,
            loss_m,
            jac_m,
            alpha=cfg.alpha,
            beta=cfg.beta,
            gamma=cfg.gamma,
            tau_loss=cfg.tau_loss,
            tau_jacobian=cfg.tau_jacobian,
        )
        k = cfg.k if isinstance(cfg.k, int) else eigengap_k(affinity, min(cfg.k_max, m))
        labels = spectral_labels(affinity, k, seed=_seed(self.config.run.seed, 6, r) % (2**31))
        proposal = np.full(n, -1, dtype=np.int64)
        proposal[view] = labels
        proposals = ints_allgather(topo.world, proposal)
        groups = consensus_partition(proposals, cfg.k if isinstance(cfg.k, int) else None)
        world_aff = np.full((2, n, n), np.nan, dtype=np.float64)
        world_aff[0][np.ix_(view, view)] = affinity
        world_aff[1][np.ix_(view, view)] = cos
        signals = np.full((2, n), np.nan)
        signals[0, view] = losses
        signals[1, view] = jacobians
        return proposal, world_aff, signals, np.asarray(groups, dtype=np.int64), int(k)

    def _leaders(self, groups: np.ndarray, r: int) -> np.ndarray:
        flags = np.zeros(groups.size, dtype=bool)
        for g in np.unique(groups):
            members = np.flatnonzero(groups == g)
            flags[members[leader_position(r, members.size)]] = True
        return flags

    # -- the round ---------------------------------------------------------------------------------
    def round(self, r: int) -> RoundResult:
        """Run round ``r`` (1-based) on this rank and return its record."""
        cfg = self.config
        node, topo, tr, scheme = self.node, self.topology, self.transport, self.scheme
        n = topo.size
        seconds = dict.fromkeys(STAGES, 0.0)
        tr.reset_counters()
        t_round = time.perf_counter()

        def timed(stage: str, t0: float) -> float:
            now = time.perf_counter()
            seconds[stage] += now - t0
            return now

        # Stage 1: local training
        t = time.perf_counter()
        start = node.flat.pack().clone()
        train_loss, val_loss = node.train_local(cfg.training.local_epochs)
        t = timed("local_train", t)

        proposal = np.full(n, -1, dtype=np.int64)
        affinity = np.full((2, n, n), np.nan)
        signals = np.full((2, n), np.nan)
        groups = np.arange(n, dtype=np.int64)
        leaders = np.ones(n, dtype=bool)
        result_kw: dict[str, float | int] = {}
        k = 0
        own = node.flat.pack()
        if scheme.exchange:
            # Stage 2: backbone exchange with the neighbours (one buffer, one message each)
            received = tr.exchange(own)
            t = timed("exchange", t)
        if scheme.cluster:
            # Stage 3a/3b: task-aware clustering and the agreed partition
            proposal, affinity, signals, groups, k = self._cluster(r, own, received)
            leaders = self._leaders(groups, r)
            topo.set_groups(groups, leaders)
            t = timed("clustering", t)
        new = own
        if scheme.intra:
            # Stage 3c: FedAvg inside the group (one Allreduce carrying the weight as its last entry)
            w = 1.0 if cfg.federation.intra_weights == "equal" else float(node.n_train)
            summed = tr.group_sum(torch.cat([own * w, own.new_tensor([w])]))
            new = summed[:-1] / summed[-1]
            t = timed("intra", t)
        n_groups = int(np.unique(groups).size)
        cross_ran = scheme.cross is not None and n_groups > 1
        if cross_ran:
            # Stage 4: leaders combine the groups
            p = node.flat.n_trainable
            if scheme.cross == "hca":
                w = 1.0 if cfg.federation.intra_weights == "equal" else float(node.n_train)
                part = torch.cat([(own[:p] - start[:p]) * w, own.new_tensor([w])])
                delta_sum = tr.reduce_to_leader(part)
                if topo.is_leader:
                    assert delta_sum is not None
                    group_delta = delta_sum[:-1] / delta_sum[-1]
                    deltas = tr.leaders_allgather(group_delta)
                    res = hca_update(deltas.double(), alpha=cfg.hca.alpha)
                    new = new.clone()
                    new[:p] += cfg.hca.psi * res.update.to(new.dtype)
                    result_kw = dict(
                        hca_weight=float(res.weights[topo.leaders.Get_rank()]),
                        hca_mean_delta_norm=res.mean_delta_norm,
                        hca_update_norm=res.update_norm,
                        hca_solver_ok=int(res.solver_ok),
                    )
                    if not res.solver_ok:
                        self.log(
                            f"round {r}: HCA solver failed ({res.message}); used uniform weights"
                        )
            elif topo.is_leader:  # "mean": FedPer-style equal-weight mean of the group backbones
                new = tr.leaders_sum(new) / topo.leaders.Get_size()
            t = timed("cross", t)
            # Stage 5: the leader sends the combined backbone back to its group
            new = tr.group_broadcast(new)
            t = timed("redistribute", t)
        if scheme.intra:
            node.flat.unpack(new, keep_batchnorm=cfg.federation.local_bn)

        test = node.evaluate(node.test_loader)
        shared = node.flat.shared_part(node.flat.pack(), local_batchnorm=cfg.federation.local_bn)
        digest = checksum(shared)
        t = timed("evaluate", t)
        seconds["total"] = time.perf_counter() - t_round
        return RoundResult(
            train_loss=train_loss,
            val_loss=val_loss,
            test=test,
            group=int(groups[topo.rank]),
            leader=int(leaders[topo.rank]),
            checksum=digest,
            bytes_sent=tr.bytes_sent,
            bytes_received=tr.bytes_received,
            seconds=seconds,
            proposal=proposal,
            affinity=affinity,
            signals=signals,
            k=k,
            groups=groups,
            **result_kw,  # type: ignore[arg-type]
        )

    def record(self, r: int, result: RoundResult) -> dict[str, np.ndarray] | None:
        """Gather every rank's record onto rank 0 and append it to the results file."""
        gathered = self.transport.gather_records(result.pack(), root=0)
        if gathered is None:
            return None
        n = self.topology.size
        e = self.config.training.local_epochs
        cols = unpack_records(gathered, e, n)
        groups = cols["group"][:, 0].astype(np.int64)
        ari = adjusted_rand(self.true_labels, groups) if self.scheme.cluster else float("nan")
        leader_rows = np.flatnonzero(cols["leader"][:, 0] == 1)
        solver = cols["hca_solver_ok"][leader_rows, 0]
        rows: dict[str, np.ndarray | float | int] = {
            "epoch/train_loss": cols["train_loss"].T,
            "epoch/val_loss": cols["val_loss"].T,
            "epoch/round": np.full(e, r),
            "round/group": groups,
            "round/leader": cols["leader"][:, 0],
            "round/backbone_checksum": cols["checksum"][:, 0],
            "round/bytes_sent": cols["bytes_sent"][:, 0],
            "round/bytes_received": cols["bytes_received"][:, 0],
            "clustering/proposal": cols["proposal"],
            "clustering/loss": cols["loss"],
            "clustering/jacobian": cols["jacobian"],
            "clustering/ari": ari,
            "clustering/k": int(np.nanmax(cols["k"][:, 0])) if n else 0,
            "hca/weights": cols["hca_weight"][:, 0],
            "hca/mean_delta_norm": _any_value(cols["hca_mean_delta_norm"][:, 0]),
            "hca/update_norm": _any_value(cols["hca_update_norm"][:, 0]),
            "hca/solver_ok": int(solver.min()) if solver.size else -1,
        }
        for m in TEST_METRICS:
            rows[f"round/test_{m}"] = cols[f"test_{m}"][:, 0]
        for s in STAGES:
            rows[f"round/seconds/{s}"] = cols[f"seconds/{s}"][:, 0]
        if self.record_affinity:
            rows["clustering/affinity"] = cols["affinity"].reshape(n, n, n)
            rows["clustering/cosine"] = cols["cosine"].reshape(n, n, n)
        if self.writer is not None:
            self.writer.append(rows)
        self.log(self._summary(r, rows, ari))
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
        if self.scheme.cluster:
            parts.append(f"ARI={ari:.2f}")
            parts.append("groups=" + "".join(str(int(g)) for g in rows["round/group"]))
        return "  ".join(parts)

    def run(self) -> None:
        """All rounds; the writer (rank 0) appends and closes the file after every round."""
        for r in range(1, self.config.training.rounds + 1):
            result = self.round(r)
            self.record(r, result)
            # nobody starts the next round before round r is on disk: a crash later loses nothing
            self.topology.world.Barrier()
