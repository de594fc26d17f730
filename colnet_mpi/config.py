"""Typed, frozen experiment configuration: TOML loading, ``--set`` overrides and validation."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from colnet_mpi.comm.graphs import TOPOLOGIES, kregular_problem
from colnet_mpi.federation.schemes import GROUPERS, INTRA, SCHEMES, resolve

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key and what is allowed."""


def _choice(key: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{key} = {value!r} is not allowed; choose one of: {shown}")


def _at_most(key: str, value: float, limit: float, why: str) -> None:
    """Refuse a value above a sane upper bound, saying why the bound is there."""
    if value > limit:
        raise ConfigError(f"{key} = {value!r} is not allowed; it must be at most {limit:,} ({why})")


#: Typo guards shared by several keys.
MAX_ROUNDS = 100_000
MAX_NODES = 100_000  # one MPI rank each
MAX_BATCHES = 1_000_000


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key} = {value!r} is not allowed; it must be a finite number {bound}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """[run]: naming, seeding and where the results file goes."""

    name: str = "colnet"
    seed: int = 0
    output: str = ""  # empty: results/<name>.h5 relative to the working directory
    deterministic: bool = True
    checkpoint_every: int = 1  # save every rank's state every this many rounds; 0 = never
    checkpoint_dir: str = ""  # empty: <results file>.ckpt/ next to the results file
    # test metrics every this many rounds, and always in the final round (NaN in the others)
    evaluate_every: int = 1
    # ranks of one host that train and evaluate at the same time; the others wait their turn
    # (each computing rank gets the host's cores / host_slots threads). 0 = all at once
    host_slots: int = 0
    # keep the C heap's freed pages from one training step to the next (glibc; results unchanged)
    keep_heap: bool = True

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ConfigError(
                f"run.name = {self.name!r} is not allowed; use a non-empty name without '/', '\\' or spaces"
            )
        _positive("run.seed", self.seed, allow_zero=True)
        _at_most("run.seed", self.seed, 2**63 - 1, "the results file stores it as a 64-bit integer")
        _positive("run.checkpoint_every", self.checkpoint_every, allow_zero=True)
        _at_most("run.checkpoint_every", self.checkpoint_every, MAX_ROUNDS, "a typo guard")
        _positive("run.evaluate_every", self.evaluate_every)
        _at_most("run.evaluate_every", self.evaluate_every, MAX_ROUNDS, "a typo guard")
        _positive("run.host_slots", self.host_slots, allow_zero=True)
        _at_most("run.host_slots", self.host_slots, 4096, "a typo guard")

    def output_path(self) -> Path:
        """Where the HDF5 results file of this run goes."""
        return Path(self.output) if self.output else Path("results") / f"{self.name}.h5"

    def checkpoint_path(self, output: Path) -> Path:
        """Where the per-rank checkpoints of a run writing ``output`` go."""
        return (
            Path(self.checkpoint_dir)
            if self.checkpoint_dir
            else output.with_name(output.name + ".ckpt")
        )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """[data]: which dataset and how much of it each node holds."""

    dataset: str = "synthetic_faces"
    # on-disk datasets (cifar10, celeba): the directory holding cifar-10-batches-py/ or celeba/
    # (torchvision's root), or that folder itself; unused by the embedded datasets
    root: str = ""
    samples_per_node: int = 0  # train+val per node before the 80/20 split; 0 = dataset default
    test_samples: int = 0  # size of each group's common test split; 0 = dataset default
    # square side in pixels; 0 = native size (on-disk only): cifar10 32 (or 0), celeba 0 =
    # 218x178 or a side >= 8 to resize to (landmarks scaled); embedded datasets >= 8
    image_size: int = 32
    workers: int = 0  # DataLoader worker processes per loader of each rank; 0 = load in the rank

    def __post_init__(self) -> None:
        # the catalog, not the builders: validating a config never imports torch
        from colnet_mpi.data.catalog import ON_DISK_DATASETS, image_size_problem, known_datasets

        _choice("data.dataset", self.dataset, known_datasets())
        _positive("data.samples_per_node", self.samples_per_node, allow_zero=True)
        _at_most(
            "data.samples_per_node", self.samples_per_node, 10**8, "more than any dataset here"
        )
        _positive("data.test_samples", self.test_samples, allow_zero=True)
        _at_most("data.test_samples", self.test_samples, 10**8, "more than any dataset here")
        _positive("data.workers", self.workers, allow_zero=True)
        _at_most(
            "data.workers", self.workers, 64, "processes per loader and rank; 2-8 keep a GPU fed"
        )
        problem = image_size_problem(self.dataset, self.image_size)
        if problem is not None:
            raise ConfigError(
                f"data.image_size = {self.image_size} is not allowed for dataset "
                f"{self.dataset!r}; {problem}"
            )
        if self.dataset in ON_DISK_DATASETS and not self.root.strip():
            raise ConfigError(
                f"data.root = {self.root!r} is not allowed for dataset {self.dataset!r}, which is "
                "read from disk; set data.root to the directory that holds "
                + ("cifar-10-batches-py/" if self.dataset == "cifar10" else "celeba/")
            )


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """[model]: ResNet-18 width, stem and privatization level BL-k."""

    width: int = 64
    privatization: int = 1
    stem: str = "auto"  # auto: "cifar" for images up to 64 px, else "imagenet"

    def __post_init__(self) -> None:
        _positive("model.width", self.width)
        _at_most(
            "model.width", self.width, 1024, "16x the standard ResNet-18, about 2.9 G parameters"
        )
        _choice("model.privatization", self.privatization, (0, 1, 2))
        _choice("model.stem", self.stem, ("auto", "cifar", "imagenet"))

    def resolved_stem(self, image_size: int) -> str:
        """The stem actually used for images of the given side length."""
        if self.stem != "auto":
            return self.stem
        return "cifar" if image_size <= 64 else "imagenet"


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Optimizer of one task kind (persisting across rounds)."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_decay: float = 1.0  # exponential decay factor applied once per local epoch

    def validate(self, key: str) -> None:
        """Check the values; ``key`` is this table's dotted name for messages."""
        _choice(f"{key}.name", self.name, ("sgd", "adam", "adamw"))
        _positive(f"{key}.lr", self.lr)
        _positive(f"{key}.momentum", self.momentum, allow_zero=True)
        _positive(f"{key}.weight_decay", self.weight_decay, allow_zero=True)
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(
                f"{key}.lr_decay = {self.lr_decay!r} is not allowed; use 0 < lr_decay <= 1"
            )


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """[training]: rounds, local epochs, batch size and the optimizer per task kind."""

    rounds: int = 15
    local_epochs: int = 2
    batch_size: int = 64
    eval_batch_size: int = 256
    grad_clip: float = 1.0  # 0 disables gradient-norm clipping
    # a simulation aid: every local epoch of a node lasts at least `slowdown` x epoch_seconds of
    # wall time (the node sleeps for the rest), so that ranks sharing a machine behave like nodes
    # with one device each of a set speed; 0 = off (an epoch takes what it takes)
    epoch_seconds: float = 0.0
    # optimizer steps in every local epoch of every node, drawn from passes over the node's data
    # that are each a fresh permutation; 0 = one pass over the node's data (its size decides)
    steps_per_epoch: int = 0
    single_label: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(
            name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-3
        )
    )
    multi_label: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(
            name="adamw", lr=5e-5, weight_decay=5e-3, lr_decay=0.95
        )
    )
    landmarks: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(name="adam", lr=5e-4, lr_decay=0.9)
    )

    def __post_init__(self) -> None:
        for key in ("rounds", "local_epochs", "batch_size", "eval_batch_size"):
            _positive(f"training.{key}", getattr(self, key))
        _at_most("training.rounds", self.rounds, MAX_ROUNDS, "a typo guard; the paper runs 15")
        _at_most(
            "training.local_epochs", self.local_epochs, 10_000, "a typo guard; the paper runs 2"
        )
        for key in ("batch_size", "eval_batch_size"):
            _at_most(f"training.{key}", getattr(self, key), 65_536, "a typo guard")
        _positive("training.grad_clip", self.grad_clip, allow_zero=True)
        _positive("training.epoch_seconds", self.epoch_seconds, allow_zero=True)
        _at_most("training.epoch_seconds", self.epoch_seconds, 86_400.0, "a typo guard: one day")
        _positive("training.steps_per_epoch", self.steps_per_epoch, allow_zero=True)
        _at_most("training.steps_per_epoch", self.steps_per_epoch, 1_000_000, "a typo guard")
        for kind in ("single_label", "multi_label", "landmarks"):
            getattr(self, kind).validate(f"training.{kind}")

    def optimizer_for(self, kind: str) -> OptimizerConfig:
        """The optimizer settings of a task kind."""
        return typing.cast(OptimizerConfig, getattr(self, kind))


#: How an asynchronous node that is behind trains its rounds (``federation.catch_up_train``).
CATCH_UP_TRAINING = ("epochs", "head", "features")
#: What asynchronous round 1 does before the first partition (``federation.first_round``).
FIRST_ROUND = ("grouped", "local")


@dataclass(frozen=True, kw_only=True)
class FederationConfig:
    """[federation]: aggregation scheme and communication topology."""

    scheme: str = "colnet"
    grouping: str = "cluster"  # cluster: task-aware clustering; tasks: the true task groups
    # full: every node is every node's neighbour; ring: i-1 and i+1; exponential: i +- 2^j;
    # kregular: a seeded random connected graph with `degree` neighbours per node
    topology: str = "full"
    degree: int = 4  # neighbours per node of the kregular topology
    intra_weights: str = "equal"  # equal (the paper) or samples (training-set sizes)
    local_bn: bool = False  # FedBN-style: BatchNorm layers stay local
    cuda_aware: str = "auto"  # auto | yes | no: pass GPU buffers straight to MPI
    # auto | no: neighbours on one host read each other's backbones from a shared-memory window
    shared_memory: str = "auto"
    # seconds any MPI wait may last before the job is aborted naming the silent rank; "auto":
    # derived from the round times seen so far (see comm/watchdog.py)
    timeout: float | str = "auto"
    # sync: lock-step rounds (collectives over the world each round); async: every node runs
    # its own rounds against the newest versions it holds of its peers (see federation/asynchronous.py)
    mode: str = "sync"
    # async: a node's round r uses peers' versions from round r - max_staleness or newer,
    # waiting for them otherwise; -1 = unbounded (any version: waits only for a first one)
    max_staleness: int = 1
    # async: a group-mate's backbone that is s rounds stale weighs staleness_decay ** s
    staleness_decay: float = 0.5
    # async: seconds of wall time after which a node starts no new round (0 = none);
    # training.rounds still caps every node's rounds
    time_budget: float = 0.0
    # async: a node at least this many rounds behind the most advanced of its neighbours
    # catches up (0 = off), in the way catch_up_train says
    catch_up: int = 0
    # async, with catch_up: how a node behind trains its rounds. epochs: one local epoch
    # instead of training.local_epochs; head: training.local_epochs of its private head alone,
    # the backbone frozen (cheaper steps: no backward pass through the backbone); features: as
    # head, with the frozen backbone's features of the training split computed once per
    # backbone and reused by every head-only epoch (datasets without augmentation only)
    catch_up_train: str = "epochs"
    # async, with task-aware clustering: what round 1 does before any partition is agreed.
    # grouped: it waits for the first partition (every node's round-1 proposal; round 1 is then
    # lock-step); local: it trains, posts and proposes only, and the first partition applies
    # from round 2 like every later one (one round after its agreement starts)
    first_round: str = "grouped"
    # async, with task-aware clustering: in a round whose partition waits for every node's
    # proposal of that round (round 1 with first_round = "grouped"; every clustering round with
    # max_staleness = 0), a node stops its local training after the step under way once every
    # neighbour has posted that round's backbone (they are all waiting for it), and posts what
    # it has trained: a straggler does not hold the others up by its whole round
    lockstep_deadline: bool = False
    # async: a member whose group leader (a neighbour) has not posted its backbone of the
    # round, or is done, computes the round's cross-group update itself (posting its group's
    # delta and aggregating the other groups' newest ones, as the leader would) instead of
    # going on without one; otherwise it waits for the leader's update of that round. Group
    # deltas are then computed from the versions of the round alone
    leader_stand_in: bool = False

    def __post_init__(self) -> None:
        _choice("federation.mode", self.mode, ("sync", "async"))
        if isinstance(self.max_staleness, bool) or self.max_staleness < -1:
            raise ConfigError(
                f"federation.max_staleness = {self.max_staleness!r} is not allowed; use an "
                "integer >= 0 (rounds), or -1 for unbounded"
            )
        if not 0.0 < self.staleness_decay <= 1.0:
            raise ConfigError(
                f"federation.staleness_decay = {self.staleness_decay!r} is not allowed; "
                "use a number in (0, 1]"
            )
        _positive("federation.time_budget", self.time_budget, allow_zero=True)
        if isinstance(self.catch_up, bool) or not isinstance(self.catch_up, int):
            raise ConfigError(
                f"federation.catch_up = {self.catch_up!r} is not allowed; use an integer >= 0 "
                "(rounds behind; 0 = off)"
            )
        _positive("federation.catch_up", self.catch_up, allow_zero=True)
        _choice("federation.catch_up_train", self.catch_up_train, CATCH_UP_TRAINING)
        if self.catch_up_train != "epochs" and not self.catch_up:
            raise ConfigError(
                f"federation.catch_up_train = {self.catch_up_train!r} needs "
                "federation.catch_up >= 1 (the rounds behind at which a node catches up)"
            )
        _choice("federation.first_round", self.first_round, FIRST_ROUND)
        for key in ("lockstep_deadline", "leader_stand_in"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(
                    f"federation.{key} = {getattr(self, key)!r} is not allowed; use true or false"
                )
        async_only = (
            ("time_budget", self.time_budget, "synchronous rounds stop after training.rounds"),
            ("catch_up", self.catch_up, "synchronous nodes are never behind"),
            (
                "first_round",
                self.first_round if self.first_round != "grouped" else "",
                "synchronous rounds agree on every partition in lock-step",
            ),
            (
                "lockstep_deadline",
                self.lockstep_deadline,
                "synchronous rounds train every node's full local epochs",
            ),
            (
                "leader_stand_in",
                self.leader_stand_in,
                "synchronous leaders are never behind",
            ),
        )
        for key, value, why in async_only:
            if self.mode == "sync" and value:
                raise ConfigError(
                    f'federation.{key} = {value!r} needs federation.mode = "async" ({why})'
                )
        if self.first_round == "local" and self.max_staleness == 0:
            raise ConfigError(
                'federation.first_round = "local" is not allowed with federation.max_staleness '
                "= 0 (zero staleness agrees on each round's partition in that round, as "
                'synchronous mode does); use max_staleness >= 1 or -1, or first_round = "grouped"'
            )
        if isinstance(self.timeout, str):
            _choice("federation.timeout", self.timeout, ("auto",))
        else:
            if isinstance(self.timeout, bool):
                raise ConfigError(
                    f'federation.timeout = {self.timeout!r} is not allowed; use "auto" or seconds'
                )
            _positive("federation.timeout", self.timeout)
            _at_most("federation.timeout", self.timeout, 7 * 86400, "a week; a typo guard")
        _choice("federation.scheme", self.scheme, SCHEMES.names())
        _choice("federation.grouping", self.grouping, GROUPERS.names())
        _choice("federation.topology", self.topology, TOPOLOGIES)
        _positive("federation.degree", self.degree)
        _choice("federation.intra_weights", self.intra_weights, ("equal", "samples"))
        _choice("federation.cuda_aware", self.cuda_aware, ("auto", "yes", "no"))
        _choice("federation.shared_memory", self.shared_memory, ("auto", "no"))


@dataclass(frozen=True, kw_only=True)
class ClusteringConfig:
    """[clustering]: the task-aware clustering signals, their fusion and K."""

    k: int | str = 2  # number of groups, or "auto" (eigengap)
    k_max: int = 8  # upper bound for k = "auto"
    alpha: float = 0.5  # weight of the cosine channel
    beta: float = 0.25  # weight of the loss channel
    gamma: float = 0.25  # weight of the Jacobian channel
    tau_loss: float = 1.0
    tau_jacobian: float = 1.0
    max_batches: int = 2  # batches of local training data per evaluated model
    jacobian: str = "exact"  # exact | hutchinson
    probes: int = 4  # Hutchinson probe vectors per batch
    cosine: str = (
        "centered"  # centered (deviation from the view's mean) | raw (the paper's literal)
    )
    record_affinity: str = "auto"  # auto (up to 64 nodes) | yes | no
    # resemblance (default): centred cosines of data profiles, backbones and round updates, and
    # loss-profile correlations, mixed with the *_weight keys and kept over rounds; paper: the
    # literal signals (alpha/beta/gamma, column-only loss and Jacobian views, this round only)
    signals: str = "resemblance"
    data_weight: float = 0.5  # each node's data under the shared initial backbone
    backbone_weight: float = 0.5  # the backbones after local training
    update_weight: float = 0.0  # the round updates (sketched to `sketch` entries)
    loss_weight: float = 0.0  # agreement of the loss rows (every backbone on each node's data)
    memory: float = 0.5  # weight of earlier rounds' evidence (0 = this round only)
    sketch: int = 1024  # entries of the update sketch sent with a backbone (0 = exact)
    # 0: the exchange sends each neighbour the whole backbone; m > 0: an m-entry sketch of it
    # instead (resemblance signals without loss profiles or screening), so the exchange moves
    # O(m) values per neighbour whatever the model size; the backbone cosine is then estimated
    backbone_sketch: int = 0
    # the last round that clusters (0: every round); later rounds keep its partition
    until: int = 0

    def __post_init__(self) -> None:
        _positive("clustering.until", self.until, allow_zero=True)
        if isinstance(self.k, bool) or not (
            (isinstance(self.k, int) and self.k >= 1) or self.k == "auto"
        ):
            raise ConfigError(
                f'clustering.k = {self.k!r} is not allowed; use an integer >= 1 or "auto"'
            )
        _positive("clustering.k_max", self.k_max)
        _at_most("clustering.k_max", self.k_max, MAX_NODES, "there are at most that many nodes")
        for key in ("alpha", "beta", "gamma"):
            _positive(f"clustering.{key}", getattr(self, key), allow_zero=True)
        total = self.alpha + self.beta + self.gamma
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(
                f"clustering.alpha + beta + gamma = {total:g} is not allowed; the weights must sum to 1"
            )
        _positive("clustering.tau_loss", self.tau_loss)
        _positive("clustering.tau_jacobian", self.tau_jacobian)
        _positive("clustering.max_batches", self.max_batches)
        _at_most(
            "clustering.max_batches", self.max_batches, 10_000, "per evaluated model; a typo guard"
        )
        _choice("clustering.jacobian", self.jacobian, ("exact", "hutchinson"))
        _positive("clustering.probes", self.probes)
        _at_most("clustering.probes", self.probes, 1_000, "per batch; a typo guard, default 4")
        _choice("clustering.signals", self.signals, ("resemblance", "paper"))
        weights = ("data_weight", "backbone_weight", "update_weight", "loss_weight")
        for key in weights:
            _positive(f"clustering.{key}", getattr(self, key), allow_zero=True)
        if sum(getattr(self, key) for key in weights) <= 0:
            raise ConfigError(
                "clustering.data_weight + backbone_weight + update_weight + loss_weight = 0 is "
                "not allowed; give at least one resemblance channel a weight > 0"
            )
        if not (isinstance(self.memory, (int, float)) and 0.0 <= self.memory < 1.0):
            raise ConfigError(
                f"clustering.memory = {self.memory!r} is not allowed; it must be in [0, 1)"
            )
        _positive("clustering.sketch", self.sketch, allow_zero=True)
        _at_most("clustering.sketch", self.sketch, 2**24, "floats sent per neighbour; a typo guard")
        _positive("clustering.backbone_sketch", self.backbone_sketch, allow_zero=True)
        _at_most(
            "clustering.backbone_sketch",
            self.backbone_sketch,
            2**24,
            "floats sent per neighbour; a typo guard",
        )
        if self.backbone_sketch and self.signals != "resemblance":
            raise ConfigError(
                f"clustering.backbone_sketch = {self.backbone_sketch} is not allowed with "
                f'clustering.signals = "{self.signals}": the paper\'s signals evaluate every '
                'neighbour\'s whole model; use signals = "resemblance" or backbone_sketch = 0'
            )
        if self.backbone_sketch and self.loss_weight > 0:
            raise ConfigError(
                f"clustering.backbone_sketch = {self.backbone_sketch} is not allowed with "
                f"clustering.loss_weight = {self.loss_weight:g}: loss profiles evaluate every "
                "neighbour's whole model; set one of them to 0"
            )
        _choice("clustering.cosine", self.cosine, ("centered", "raw"))
        _choice("clustering.record_affinity", self.record_affinity, ("auto", "yes", "no"))


@dataclass(frozen=True, kw_only=True)
class HCAConfig:
    """[hca]: hyper-conflict-averse aggregation constants."""

    alpha: float = 0.4  # c = alpha * ||mean delta||
    psi: float = 1.0  # hyper aggregation weight applied to the HCA update

    def __post_init__(self) -> None:
        if not 0 <= self.alpha < 1:
            raise ConfigError(f"hca.alpha = {self.alpha!r} is not allowed; use 0 <= alpha < 1")
        _positive("hca.psi", self.psi, allow_zero=True)


ATTACKS = ("none", "label_flip", "boost", "at2fl", "manipulate", "bad_buffer")


@dataclass(frozen=True, kw_only=True)
class AttackConfig:
    """[attack]: one poisoning attack (or none), which nodes run it and from which round.

    Defaults are the settings of the paper's robustness experiments.
    """

    kind: str = "none"  # none | label_flip | boost | at2fl | manipulate | bad_buffer
    nodes: tuple[int, ...] = (0,)  # attacking nodes by index in [[nodes]] order (= world rank)
    start_round: int = 1  # first round in which the attackers act
    flip_probability: float = 1.0  # label_flip: chance that a training label is flipped
    boost_scale: float = 5.0  # boost: upload B_prev + s * (B - B_prev)
    boost_clamp: float = 1000.0  # boost: clamp the boosted values to +-clamp; 0 = no clamping
    bn_batches: int = 50  # boost: re-estimate BatchNorm statistics on this many batches; 0 = no
    epsilon: float = 0.03  # at2fl: FGSM step size (the paper: 0.03 CIFAR-10, 0.015 CelebA)
    adversarial_batches: int = 10  # at2fl: adversarial mini-batches per local epoch
    weight_clip: float = 10.0  # at2fl: clip weights to +-clip after local training; 0 = no
    manipulation: str = "scale"  # manipulate: scale | noise (applied by a malicious leader)
    manipulation_factor: float = 2.0  # scale: multiply; noise: noise norm / result norm
    buffer_fault: str = "nan"  # bad_buffer: nan | inf | short | long

    def __post_init__(self) -> None:
        _choice("attack.kind", self.kind, ATTACKS)
        if any(isinstance(i, bool) or i < 0 for i in self.nodes):
            raise ConfigError(
                f"attack.nodes = {list(self.nodes)!r} is not allowed; use node indices >= 0"
            )
        if len(set(self.nodes)) != len(self.nodes):
            raise ConfigError(f"attack.nodes = {list(self.nodes)!r} lists a node twice")
        _positive("attack.start_round", self.start_round)
        _at_most("attack.start_round", self.start_round, MAX_ROUNDS, "the bound of training.rounds")
        if not 0 <= self.flip_probability <= 1:
            raise ConfigError(
                f"attack.flip_probability = {self.flip_probability!r} is not allowed; use 0..1"
            )
        _positive("attack.boost_scale", self.boost_scale)
        _positive("attack.boost_clamp", self.boost_clamp, allow_zero=True)
        _positive("attack.bn_batches", self.bn_batches, allow_zero=True)
        _at_most("attack.bn_batches", self.bn_batches, MAX_BATCHES, "a typo guard")
        _positive("attack.epsilon", self.epsilon, allow_zero=True)
        _positive("attack.adversarial_batches", self.adversarial_batches, allow_zero=True)
        _at_most(
            "attack.adversarial_batches", self.adversarial_batches, MAX_BATCHES, "a typo guard"
        )
        _positive("attack.weight_clip", self.weight_clip, allow_zero=True)
        _choice("attack.manipulation", self.manipulation, ("scale", "noise"))
        _positive("attack.manipulation_factor", self.manipulation_factor, allow_zero=True)
        _choice("attack.buffer_fault", self.buffer_fault, ("nan", "inf", "short", "long"))

    def active(self, rank: int, r: int) -> bool:
        """Whether node ``rank`` runs the attack in round ``r``."""
        return self.kind != "none" and rank in self.nodes and r >= self.start_round


NORM_ACTIONS = ("exclude", "clip")


@dataclass(frozen=True, kw_only=True)
class DefenseConfig:
    """[defense]: robust intra-group aggregation, update screening, leader verification.

    All off by default (the paper's ColNet). Non-finite or wrongly sized buffers are always
    refused, whatever this section says.
    """

    aggregation: str = "mean"  # mean (FedAvg) | median | trimmed_mean | norm_clipped_mean
    trim: float = 0.2  # trimmed_mean: fraction dropped at each end per coordinate
    clip: float = 0.0  # norm_clipped_mean: max update norm; 0 = the median norm of the group
    screening: bool = False  # exclude members whose update is an outlier in their group
    norm_ratio: float = 3.0  # screening: flag norm / median norm above this (or below 1/this)
    # screening, an update failing only the norm test: exclude it, or clip it (a too-large one is
    # rescaled to its reference norm and kept, with its direction and its data; a too-small one
    # is kept as it is). Non-finite and cosine failures are always excluded.
    norm_action: str = "exclude"
    min_cosine: float = 0.0  # screening: flag cosine to the others' median below this
    verify_leader: bool = False  # members recompute HCA and reject a manipulated broadcast
    tolerance: float = 1e-3  # verify_leader: relative difference still accepted

    def __post_init__(self) -> None:
        _choice("defense.aggregation", self.aggregation, INTRA.names())
        _choice("defense.norm_action", self.norm_action, NORM_ACTIONS)
        if not 0 <= self.trim < 0.5:
            raise ConfigError(f"defense.trim = {self.trim!r} is not allowed; use 0 <= trim < 0.5")
        _positive("defense.clip", self.clip, allow_zero=True)
        if not self.norm_ratio > 1:
            raise ConfigError(
                f"defense.norm_ratio = {self.norm_ratio!r} is not allowed; it must be > 1"
            )
        if not -1 <= self.min_cosine <= 1:
            raise ConfigError(f"defense.min_cosine = {self.min_cosine!r} is not allowed; use -1..1")
        _positive("defense.tolerance", self.tolerance)

    @property
    def enabled(self) -> bool:
        """Whether any defense beyond the always-on buffer checks is switched on."""
        return self.aggregation != "mean" or self.screening or self.verify_leader


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """One federation node (one MPI rank): its name and its task (ground truth, never shown to the algorithm)."""

    name: str
    task: str
    # a simulation aid for studying stragglers on one machine: this node's local training
    # takes `slowdown` times as long (it sleeps after each epoch); 1 = as fast as it runs
    slowdown: float = 1.0


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole experiment."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    hca: HCAConfig = field(default_factory=HCAConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    nodes: tuple[NodeConfig, ...] = ()

    def __post_init__(self) -> None:
        from colnet_mpi.data.catalog import AUGMENTED_DATASETS as AUGMENTED
        from colnet_mpi.data.catalog import known_datasets, task_names

        if not self.nodes:
            raise ConfigError("nodes: at least one [[nodes]] entry is required")
        tasks = task_names(self.data.dataset)
        names = set()
        for i, node in enumerate(self.nodes):
            if node.task not in tasks:
                raise ConfigError(
                    f"nodes[{i}].task = {node.task!r} is not a task of dataset "
                    f"{self.data.dataset!r}; allowed: {', '.join(tasks)}"
                )
            if node.name in names:
                raise ConfigError(
                    f"nodes[{i}].name = {node.name!r} is used twice; names must be unique"
                )
            names.add(node.name)
        if self.federation.topology == "kregular" and len(self.nodes) > 1:
            problem = kregular_problem(len(self.nodes), self.federation.degree)
            if problem:
                raise ConfigError(problem)
        if self.clustering.backbone_sketch and self.defense.screening:
            raise ConfigError(
                f"clustering.backbone_sketch = {self.clustering.backbone_sketch} is not allowed "
                "with defense.screening = true: screening compares the group-mates' whole "
                "updates; set backbone_sketch = 0 or screening = false"
            )
        if self.federation.mode == "async":
            _async_problems(self)
        f = self.federation
        chosen = resolve(f.scheme, f.grouping, self.defense.aggregation)
        grouper = chosen.grouper
        if f.first_round == "local" and grouper != "cluster":
            raise ConfigError(
                f'federation.first_round = "local" is not allowed with federation.scheme = '
                f"{f.scheme!r} and federation.grouping = {f.grouping!r}: only task-aware "
                '"cluster" grouping agrees on partitions, so round 1 waits for none; use '
                'first_round = "grouped"'
            )
        if f.lockstep_deadline and grouper != "cluster":
            raise ConfigError(
                f"federation.lockstep_deadline = true is not allowed with federation.scheme = "
                f"{f.scheme!r} and federation.grouping = {f.grouping!r}: only task-aware "
                '"cluster" grouping has rounds that wait for every node\'s proposal; set '
                "lockstep_deadline = false"
            )
        if f.leader_stand_in and chosen.cross == "none":
            raise ConfigError(
                f"federation.leader_stand_in = true is not allowed with federation.scheme = "
                f"{f.scheme!r}: it has no cross-group stage, so no leader to stand in for; set "
                "leader_stand_in = false"
            )
        if f.lockstep_deadline and f.first_round == "local":
            raise ConfigError(
                "federation.lockstep_deadline = true is not allowed with federation.first_round = "
                '"local": no round then waits for the proposals of its own round; use '
                'first_round = "grouped" or lockstep_deadline = false'
            )
        if self.federation.catch_up_train == "features" and self.data.dataset in AUGMENTED:
            plain = ", ".join(d for d in known_datasets() if d not in AUGMENTED)
            raise ConfigError(
                'federation.catch_up_train = "features" is not allowed with data.dataset = '
                f"{self.data.dataset!r}: its training images are randomly augmented, so the "
                'features of a frozen backbone change with every pass; use "head", or a '
                f"dataset without augmentation ({plain})"
            )
        slow = [i for i, n in enumerate(self.nodes) if n.slowdown > 1.0]
        if self.run.host_slots and (self.training.epoch_seconds or slow):
            what = (
                f"training.epoch_seconds = {self.training.epoch_seconds}"
                if self.training.epoch_seconds
                else f"nodes[{slow[0]}].slowdown = {self.nodes[slow[0]].slowdown}"
            )
            raise ConfigError(
                f"run.host_slots = {self.run.host_slots} is not allowed with {what}: the "
                "emulated device's waits would hold the turn and stall the host's other ranks; "
                "set run.host_slots = 0 to emulate stragglers"
            )
        if isinstance(self.clustering.k, int) and self.clustering.k > len(self.nodes):
            raise ConfigError(
                f"clustering.k = {self.clustering.k} is not allowed with {len(self.nodes)} nodes; "
                f"use at most {len(self.nodes)}"
            )
        if self.attack.kind != "none":
            bad = [i for i in self.attack.nodes if i >= len(self.nodes)]
            if bad:
                raise ConfigError(
                    f"attack.nodes = {list(self.attack.nodes)!r} is not allowed: node {bad[0]} does "
                    f"not exist; use indices 0..{len(self.nodes) - 1}"
                )

    @property
    def world_size(self) -> int:
        """Number of MPI ranks this config needs (one per node)."""
        return len(self.nodes)


# ---------------------------------------------------------------------------------------------
# Loading: dict -> dataclasses with type checks, unknown keys rejected.

_SECTIONS = {
    "run": RunConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "federation": FederationConfig,
    "clustering": ClusteringConfig,
    "hca": HCAConfig,
    "attack": AttackConfig,
    "defense": DefenseConfig,
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, bool, str or a union of them)."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a table, got {value!r}")
        return _build(tp, value, key)
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected a list")
        return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, _UnionType) else (tp,)
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            _check_text(key, value)
            return value
    wanted = " or ".join(_type_name(o) for o in options)
    raise ConfigError(f"{key} = {value!r} has the wrong type; expected {wanted}")


_UnionType = type(int | str)


def _check_text(key: str, value: str) -> None:
    """Refuse text that cannot reach a file name or the results file intact."""
    if "\0" in value:
        raise ConfigError(f"{key} = {value!r} is not allowed; it contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ConfigError(
            f"{key} = {value!r} is not allowed; it is not valid UTF-8 text "
            f"(undecodable byte at character {err.start})"
        ) from err


def _build(cls: type, table: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in table:
        if key not in known:
            raise ConfigError(
                f"unknown key '{prefix}.{key}'; allowed keys in [{prefix}]: {', '.join(sorted(known))}"
            )
    defaults = {
        f.name: f.default_factory()
        for f in fields(cls)
        if f.default_factory is not dataclasses.MISSING
    }
    kwargs = {}
    for k, v in table.items():
        default = defaults.get(k)
        if dataclasses.is_dataclass(default) and isinstance(v, Mapping):
            # a partial sub-table keeps this field's own defaults (e.g. the optimizer of a task kind)
            v = {**{f.name: getattr(default, f.name) for f in fields(default)}, **v}
        kwargs[k] = _coerce(f"{prefix}.{k}", v, hints[k])
    return cls(**kwargs)


#: The cross-group aggregators asynchronous rounds can run (``federation/asynchronous.py``).
ASYNC_CROSS = ("hca", "mean", "none")
#: The intra-group rules they mix with (``algorithms/robust.py``'s rules, named here without
#: importing torch).
ASYNC_INTRA = ("mean", "median", "trimmed_mean", "norm_clipped_mean")


def _async_problems(config: Config) -> None:
    """Refuse the options that asynchronous mode does not support, naming each."""
    f, c, d = config.federation, config.clustering, config.defense
    chosen = resolve(f.scheme, f.grouping, d.aggregation)
    checks = [
        (
            chosen.cross not in ASYNC_CROSS,
            f"federation.scheme = {f.scheme!r}",
            f"its cross-group aggregator {chosen.cross!r} has no asynchronous form; the "
            f"asynchronous rounds run {', '.join(ASYNC_CROSS)}",
        ),
        (
            chosen.intra not in (None, *ASYNC_INTRA),
            f"federation.scheme = {f.scheme!r}",
            f"its intra-group aggregator {chosen.intra!r} has no asynchronous form; "
            f"asynchronous groups mix with {', '.join(ASYNC_INTRA)}",
        ),
        (d.screening, "defense.screening = true", "screening needs lock-step groups"),
        (d.verify_leader, "defense.verify_leader = true", "verification needs lock-step groups"),
        (
            config.attack.kind == "manipulate",
            f"attack.kind = {config.attack.kind!r}",
            "an asynchronous leader posts its group's update, not the group's model, and "
            "stand-ins do a leader's part; the other attacks run in asynchronous rounds",
        ),
        (
            c.loss_weight > 0,
            f"clustering.loss_weight = {c.loss_weight}",
            "loss profiles need an all-gather in every round",
        ),
        (
            config.run.host_slots > 0,
            f"run.host_slots = {config.run.host_slots}",
            "turns would hold every node of a host to the pace of the slowest",
        ),
    ]
    for bad, what, why in checks:
        if bad:
            raise ConfigError(
                f'{what} is not allowed with federation.mode = "async" ({why}); use '
                'federation.mode = "sync" or leave the key at its default'
            )


def _expand_nodes(entries: Any) -> tuple[NodeConfig, ...]:
    if not isinstance(entries, list):
        raise ConfigError(
            "nodes must be an array of tables: [[nodes]] with task = ... (and count = ...)"
        )
    nodes: list[NodeConfig] = []
    per_task: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"nodes[{i}] must be a table with keys task, name, count")
        unknown = set(entry) - {"task", "name", "count", "slowdown"}
        if unknown:
            raise ConfigError(
                f"unknown key 'nodes[{i}].{sorted(unknown)[0]}'; allowed keys: count, name, "
                "slowdown, task"
            )
        slowdown = entry.get("slowdown", 1.0)
        if (
            isinstance(slowdown, bool)
            or not isinstance(slowdown, (int, float))
            or not 1.0 <= slowdown <= 1000.0
        ):
            raise ConfigError(
                f"nodes[{i}].slowdown = {slowdown!r} is not allowed; use a number in [1, 1000] "
                "(1: no slowdown)"
            )
        task = entry.get("task")
        if not isinstance(task, str):
            raise ConfigError(f"nodes[{i}].task is required and must be a string")
        count = entry.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"nodes[{i}].count = {count!r} is not allowed; use an integer >= 1")
        if len(nodes) + count > MAX_NODES:
            raise ConfigError(
                f"nodes[{i}].count = {count!r} is not allowed; a federation has at most "
                f"{MAX_NODES:,} nodes in all (one MPI rank each; a typo guard)"
            )
        name = entry.get("name")
        if name is not None and (not isinstance(name, str) or count != 1):
            raise ConfigError(f"nodes[{i}].name must be a string and needs count = 1")
        if name is not None:
            _check_text(f"nodes[{i}].name", name)
        for _ in range(count):
            idx = per_task.get(task, 0)
            per_task[task] = idx + 1
            nodes.append(
                NodeConfig(name=name or f"{task}-{idx}", task=task, slowdown=float(slowdown))
            )
    return tuple(nodes)


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a parsed TOML document."""
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "nodes":
            kwargs["nodes"] = _expand_nodes(value)
        elif key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"[{key}] must be a table")
            kwargs[key] = _build(_SECTIONS[key], value, key)
        else:
            allowed = ", ".join([*_SECTIONS, "nodes"])
            raise ConfigError(f"unknown section '{key}'; allowed sections: {allowed}")
    return Config(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value in TOML syntax; bare words are strings)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} is not allowed; use section.key=value")
    dotted, raw_value = text.split("=", 1)
    path = [p.strip() for p in dotted.strip().split(".")]
    if len(path) < 2 or not all(path):
        raise ConfigError(
            f"--set {text!r}: the key must look like section.key (e.g. training.rounds)"
        )
    try:
        value = tomllib.loads(f"v = {raw_value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value.strip()
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``section.key=value`` override applied."""
    import copy

    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        if path[0] == "nodes":
            raise ConfigError("--set cannot change [[nodes]]; edit the config file instead")
        table = out
        for part in path[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a table")
        table[path[-1]] = value
    return out


def read_text_file(path: Path, what: str, error: type[Exception] = ValueError) -> str:
    """The UTF-8 text of ``path``; ``error`` with one line naming ``what`` and the path when it
    is missing, a directory, unreadable or not UTF-8 (the offset of the first bad byte)."""
    shown = repr(str(path))
    if path.is_dir():
        raise error(f"{what} {shown} is a directory; give the path of a TOML file")
    if not path.is_file():
        raise error(f"{what} {shown} does not exist")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise error(f"{what} {shown} cannot be read: {err.strerror or err}") from err
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise error(
            f"{what} {shown} is not valid UTF-8: byte 0x{data[err.start]:02x} at offset "
            f"{err.start} (line {line}, column {column}); save it as UTF-8 text"
        ) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML config file, apply overrides and validate everything."""
    p = Path(path)
    text = read_text_file(p, "config file", ConfigError)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {err}") from err
    return config_from_dict(apply_overrides(raw, overrides))


# ---------------------------------------------------------------------------------------------
# Writing: the resolved config as TOML text (stored in the results file).


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(config: Config) -> str:
    """Serialise the resolved config (every field, nodes expanded) as TOML text."""
    lines: list[str] = []

    def table(name: str, obj: Any) -> None:
        lines.append(f"[{name}]")
        nested = []
        for f in fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                nested.append((f"{name}.{f.name}", value))
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
        for sub_name, sub in nested:
            table(sub_name, sub)

    for section in _SECTIONS:
        table(section, getattr(config, section))
    for node in config.nodes:
        lines.append("[[nodes]]")
        lines.append(f"name = {_toml_value(node.name)}")
        lines.append(f"task = {_toml_value(node.task)}")
        if node.slowdown != 1.0:  # only when set: older files compare equal on --resume
            lines.append(f"slowdown = {_toml_value(node.slowdown)}")
        lines.append("")
    return "\n".join(lines)


def config_from_toml(text: str) -> Config:
    """Rebuild a config from :func:`to_toml` text (e.g. the ``config`` attribute of a results file)."""
    return config_from_dict(tomllib.loads(text))
