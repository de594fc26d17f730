"""One federation node (this rank): its data shard, backbone, private head, optimizer and
loaders, with its whole state as numeric arrays (``state_dict`` / ``load_state_dict``)."""

from __future__ import annotations

import ctypes
import functools
import os
import random
import time
from collections.abc import Callable, Iterator, Sized
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, default_collate

from colnet_mpi.algorithms.signals import loss_and_jacobian
from colnet_mpi.comm.buffers import FlatState
from colnet_mpi.config import Config
from colnet_mpi.data import DataSizes, NodeData, TaskSpec, build_node_data, dataset_tasks
from colnet_mpi.models import build_backbone, build_head
from colnet_mpi.models.cost import CatchUpCosts, catch_up_costs
from colnet_mpi.tasks import (
    BatchHook,
    evaluate,
    loss_function,
    make_optimizer,
    make_scheduler,
    train_epoch,
)


@functools.cache
def _libc(name: str) -> Callable[..., int] | None:
    """A function of the C library (``malloc_trim``, ``mallopt``), or None where it has none
    (macOS, musl).

    Looked up among the symbols the process has loaded already (``dlopen(NULL)``), not with
    ``ctypes.util.find_library``, which may start a subprocess: some MPI libraries warn about or
    break on a fork after ``MPI_Init``.
    """
    try:
        return getattr(ctypes.CDLL(None), name, None)
    except OSError:
        return None


# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# The largest block glibc will serve from the heap instead of a fresh mapping (32 MiB on 64-bit).
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def keep_heap_between_steps() -> bool:
    """Stop glibc from handing the heap's free top back to the system after every free.

    By default glibc trims the heap whenever more than twice its (adaptive) mapping threshold
    lies free at the top, which at the end of every training step's backward pass is the case:
    the step's activations go back to the system and the next step faults them in again, page
    by page (about 65,000 minor faults and 0.1 s of kernel time per 64-image step at ResNet-18
    full width). With a fixed threshold for fresh mappings and no automatic trim, those pages
    stay with the process from step to step; ``return_free_memory`` still hands them back
    between stages. Nothing computed changes. Returns whether the settings were applied: not
    without glibc, and not when the user set ``MALLOC_TRIM_THRESHOLD_`` or
    ``MALLOC_MMAP_THRESHOLD_`` (their choice wins).
    """
    if any(f"MALLOC_{k}_THRESHOLD_" in os.environ for k in ("TRIM", "MMAP")):
        return False
    mallopt = _libc("mallopt")
    if mallopt is None or _libc("malloc_trim") is None:  # musl has no trim and ignores these
        return False
    # the trim threshold is an unsigned long in glibc: the largest int mallopt takes, 2 GiB - 1
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    )


def return_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim(0)``; a no-op elsewhere).

    Called after local training and after test evaluation: the activations of a training step
    live on the heap (see ``keep_heap_between_steps``; glibc's adaptive threshold puts them
    there too) and would stay resident after it (at ResNet-18 full width, batch 64: about
    400 MB per rank that the exchange, clustering and evaluation would hold on top). Trimming
    takes 5-30 ms; the next training stage faults those pages back in.
    """
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from several integers (stable across runs and platforms)."""
    return int(
        np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1
    )


def _loader(
    split: Dataset[Any],
    batch_size: int,
    workers: int,
    pin_memory: bool,
    generator: torch.Generator | None = None,
    steps: int = 0,
) -> DataLoader[Any]:
    """A loader over ``split``, shuffled by ``generator`` if one is given (the training loader).

    ``steps`` > 0 (with a generator) makes every pass of the loader exactly that many batches of
    ``batch_size``: the samples come from back-to-back permutations of ``split``, each drawn
    afresh, the last one cut where the count is reached. 0 = one permutation of ``split``.

    Worker processes (``data.workers`` > 0) start from a fork server rather than by forking this
    rank: forking a process that has initialised MPI is unsafe with some interconnects.
    """
    sampler = None
    if steps and generator is not None:
        sampler = RandomSampler(
            cast(Sized, split), num_samples=steps * batch_size, generator=generator
        )
    return DataLoader(
        split,
        batch_size=batch_size,
        shuffle=generator is not None and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        multiprocessing_context="forkserver" if workers > 0 else None,
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

        torch.manual_seed(derive_seed(seed, 1))  # one shared backbone initialisation for every node
        self.backbone = backbone()
        torch.manual_seed(derive_seed(seed, 2, rank))  # heads are initialised per node
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
        self.generator = gen = torch.Generator().manual_seed(derive_seed(seed, 3, rank))
        workers, pin = config.data.workers, device.type == "cuda"
        # local training iterates the augmented view (if the dataset has one), never val/test
        self.train_loader = _loader(
            self.data.training_view(), t.batch_size, workers, pin, gen, t.steps_per_epoch
        )
        # federation.catch_up_train = "features": the order of the training samples, drawn from
        # the same generator as train_loader's (the same order as "head" with data.workers = 0),
        # and the frozen backbone's features of the training split (see head_on_features)
        self.reuses_features = config.federation.catch_up_train == "features"
        if self.reuses_features:
            self.index_loader = _loader(
                cast(Dataset[Any], range(len(self.data.training_view()))),
                t.batch_size,
                0,
                False,
                gen,
                t.steps_per_epoch,
            )
        self.features: tuple[list[torch.Tensor], torch.Tensor, torch.Tensor] | None = None
        self.epoch_costs: list[float] = []  # of the last train_local, as fractions of a full epoch
        self.steps_taken = 0  # training steps of the last train_local
        self.val_loader = _loader(self.data.val, t.eval_batch_size, workers, pin)
        self.test_loader = _loader(self.data.test, t.eval_batch_size, workers, pin)
        # clustering signals: the first items of the un-augmented training split
        n_probe = min(len(self.data.train), config.clustering.max_batches * t.batch_size)
        self.probe_batches = []
        for i in range(0, n_probe, t.batch_size):
            items = [self.data.train[j] for j in range(i, min(i + t.batch_size, n_probe))]
            x, y = default_collate(items)
            self.probe_batches.append((x.to(device), y.to(device)))
        torch.manual_seed(derive_seed(seed, 4, rank))

    @property
    def n_train(self) -> int:
        """Training samples of this node."""
        return len(self.data.train)

    def train_local(
        self,
        epochs: int,
        batch_hook: BatchHook | None = None,
        progress: Callable[[int, float, float, float], None] | None = None,
        head_only: Callable[[int], bool] | None = None,
        between_steps: Callable[[], object] | None = None,
        after_step: Callable[[float, float, float], bool] | None = None,
    ) -> tuple[list[float], list[float]]:
        """Stage 1: E local epochs; returns per-epoch training and validation losses.

        ``batch_hook`` (an attack's) may replace each training batch before its step.
        ``progress(epoch, train_loss, val_loss, seconds)`` is called after each epoch (1-based).
        ``head_only(epoch)``, asked before each epoch: True for an epoch in which the backbone
        stays frozen and only the private head learns. ``between_steps()`` is called after every
        training step. ``after_step(started, share, cost)``, called after every step with the
        epoch's start (``time.perf_counter()``), the share of its steps taken and its cost (see
        :attr:`epoch_costs`): True ends the local training there (the epoch under way is
        validated, reported with its cost scaled to that share, and is the last one: fewer than
        E losses come back). The steps taken are left in :attr:`steps_taken`.
        """
        train, val = [], []
        clip = self.config.training.grad_clip or None
        self.epoch_costs = []
        self.steps_taken = 0
        steps = len(self.train_loader)  # of a full epoch
        cut = False
        t0 = time.perf_counter()
        before = 0  # steps taken before the epoch under way

        def share() -> float:
            return (self.steps_taken - before) / steps if steps else 1.0

        def count() -> bool:
            nonlocal cut
            self.steps_taken += 1
            cut = after_step is not None and after_step(t0, share(), self.epoch_costs[-1])
            return cut

        for epoch in range(1, epochs + 1):
            alone = head_only is not None and head_only(epoch)
            t0, before = time.perf_counter(), self.steps_taken
            backbone: torch.nn.Module = self.backbone
            loader: Any = self.train_loader
            cost = self.catch_up_costs.head if alone else 1.0
            if alone and self.reuses_features and batch_hook is None:
                fresh = self.refresh_features(between_steps)
                self.backbone.eval()  # frozen, as train_epoch leaves it on the other path
                backbone, loader = torch.nn.Identity(), self.head_on_features()
                cost = self.catch_up_costs.head_on_features
                if fresh:
                    cost += self.catch_up_costs.features * self.n_train / self.epoch_samples
            self.epoch_costs.append(cost)
            train.append(
                train_epoch(
                    backbone,
                    self.head,
                    loader,
                    self.task.kind,
                    self.optimizer,
                    self.device,
                    grad_clip=clip,
                    batch_hook=batch_hook,
                    head_only=alone,
                    between_steps=between_steps,
                    stop=count,
                )
            )
            self.scheduler.step()
            if cut:  # the share of this epoch's steps taken
                self.epoch_costs[-1] *= share()
            val.append(self.evaluate(self.val_loader)["loss"])
            if progress is not None:
                progress(epoch, train[-1], val[-1], time.perf_counter() - t0)
            if cut:
                break
        # the last step's gradients are not needed again (every step starts by dropping them)
        self.optimizer.zero_grad(set_to_none=True)
        return_free_memory()
        return train, val

    @property
    def epoch_samples(self) -> int:
        """Training samples one local epoch iterates."""
        steps = self.config.training.steps_per_epoch
        return steps * self.config.training.batch_size if steps else self.n_train

    @functools.cached_property
    def catch_up_costs(self) -> CatchUpCosts:
        """What the parts of a catch-up epoch cost, as fractions of a full epoch (multiply-adds of
        a step on the first probe batch; see :func:`colnet_mpi.models.cost.catch_up_costs`)."""
        return catch_up_costs(self.backbone, self.head, self.probe_batches[0][0])

    def refresh_features(self, between_batches: Callable[[], object] | None = None) -> bool:
        """Make :attr:`features` hold the backbone's features (eval mode, no gradients) of every
        training sample and their targets, unless they already belong to the backbone as it is
        now (weights and BatchNorm statistics compared exactly); return whether they were
        computed (``between_batches()`` is called after each batch of the pass). Only for a
        training split without random augmentation."""
        state = list(self.backbone.state_dict().values())
        if self.features is not None and all(
            torch.equal(a, b) for a, b in zip(self.features[0], state, strict=True)
        ):
            return False
        if self.data.train_augmented is not None:
            raise RuntimeError("stored features need a training split without augmentation")
        split = self.data.train
        self.features = None  # the old ones are freed before the new ones are computed
        training = self.backbone.training
        self.backbone.eval()
        step = self.config.training.eval_batch_size
        zs, ys = [], []
        with torch.no_grad():
            for i in range(0, len(split), step):
                x, y = default_collate([split[j] for j in range(i, min(i + step, len(split)))])
                zs.append(self.backbone(x.to(self.device)))
                ys.append(y.to(self.device))
                if between_batches is not None:
                    between_batches()
        self.backbone.train(training)
        self.features = ([v.detach().clone() for v in state], torch.cat(zs), torch.cat(ys))
        return True

    def head_on_features(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of batches ``(features, targets)`` from :attr:`features`, in the order the
        training loader would have drawn the samples (:meth:`refresh_features` first)."""
        if self.features is None:
            raise RuntimeError("refresh_features() must run before head_on_features()")
        _, z, y = self.features
        for idx in self.index_loader:
            at = idx.to(self.device)
            yield z[at], y[at]

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

    def data_profile(self, most: int = 2**15) -> torch.Tensor:
        """Mean and standard deviation of each backbone output unit over the probe batches,
        under the backbone as it is now (evaluation mode, no gradients). Feature maps keep their
        spatial layout (where digits differ), halved by 2x2 average pooling while a sample has
        more than ``most`` values."""
        training = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            feats = torch.cat([self.backbone(x) for x, _ in self.probe_batches])
        self.backbone.train(training)
        while feats.dim() == 4 and feats[0].numel() > most and min(feats.shape[2:]) >= 2:
            feats = torch.nn.functional.avg_pool2d(feats, 2)
        f = feats.reshape(feats.shape[0], -1).double()
        return torch.cat([f.mean(dim=0), f.std(dim=0)]).float()

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything that changes while training: models, optimizer, schedule, random generators.

        Numeric arrays and small scalars only (see ``federation/checkpoint.py``); restoring it
        with :meth:`load_state_dict` into a node built from the same config continues
        bit-identically on the same hardware and software.
        """
        return {
            "backbone": self.backbone.state_dict(),
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader_generator": self.generator.get_state(),
            "rng": process_rng_state(self.device),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a missing or ill-fitting part raises ``ValueError``."""
        try:
            self.backbone.load_state_dict(state["backbone"])
            self.head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.generator.set_state(state["loader_generator"])
            restore_process_rng(state["rng"], self.device)
        except (KeyError, RuntimeError, TypeError) as err:
            raise ValueError(f"node state does not fit node {self.name!r}: {err}") from err


def process_rng_state(device: torch.device) -> dict[str, Any]:
    """The process-wide generators: torch (CPU and this rank's GPU), numpy, Python."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(legacy=False),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_process_rng(state: dict[str, Any], device: torch.device) -> None:
    """Set the generators of :func:`process_rng_state`."""
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    np.random.set_state(state["numpy"])
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.as_tensor(state["cuda"], dtype=torch.uint8), device)
