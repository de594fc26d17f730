"""Tier 3: asynchronous mode under mpiexec. Nodes slowed down at random (seeded) finish without
a hang, every node-round is recorded exactly once, every rank used the same partition in the
same round, no version older than max_staleness was used, a NaN backbone is refused, S = 0
groups and leads like synchronous mode (and fedper at S = 0 learns what synchronous fedper
learns), a time budget lets fast nodes do more rounds, training.epoch_seconds sets each node's
pace, federation.first_round = "local" runs round 1 without groups instead of waiting for the
first partition, a node behind by federation.catch_up rounds trains one epoch per round (or, with
catch_up_train = "head", its head alone, paced at that cost), federation.lockstep_deadline ends
a straggler's training in the rounds where everyone waits for it, federation.leader_stand_in
gives every member a cross-group update of its own round, and a run stopped by a signal or
killed mid-way continues with --resume to a file with every record present."""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from colnet_mpi.algorithms.clustering import partition_stamp
from colnet_mpi.metrics.reader import group_summary, load_run
from colnet_mpi.models import build_backbone, build_head
from colnet_mpi.models.cost import catch_up_costs
from tests.conftest import ROOT, colnet, colnet_batch, run_mpi

QUICK = (ROOT / "configs" / "quickstart.toml").read_text()
SMALL = [
    "data.samples_per_node=48", "data.test_samples=32", "model.width=4",
    "clustering.max_batches=1", "training.local_epochs=1", "federation.mode=async",
]  # fmt: skip


def config(tmp: Path, slowdowns: list[float]) -> Path:
    """The quickstart with one [[nodes]] entry per node (half attributes, half landmarks)."""
    head = QUICK[: QUICK.index("[[nodes]]")]
    half = len(slowdowns) // 2
    nodes = "".join(
        f'[[nodes]]\ntask = "{"attributes" if i < half else "landmarks"}"\nslowdown = {s}\n\n'
        for i, s in enumerate(slowdowns)
    )
    path = tmp / "async.toml"
    path.write_text(head + nodes)
    return path


def launch(cfg: Path, out: Path, *sets: str, env: dict[str, str] | None = None, extra: tuple = ()):
    args = [a for s in [*SMALL, *sets] for a in ("--set", s)] + list(extra)
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        n = cfg.read_text().count("[[nodes]]")
        return run_mpi(n, colnet("run", str(cfg), "--out", str(out), *args), timeout=300)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def lock_released(out: Path, seconds: float = 30.0) -> None:
    """Wait until the killed run's writer process is gone (mpiexec may return before the
    launcher has finished killing every rank), so that the next launch finds a stale lock."""
    lock = Path(f"{out}.lock")
    end = time.monotonic() + seconds
    while lock.is_file() and time.monotonic() < end:
        try:
            os.kill(int(json.loads(lock.read_text())["pid"]), 0)
        except (ProcessLookupError, ValueError, KeyError, OSError):
            return
        time.sleep(0.2)


def read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        out = {k: np.asarray(f[k][()]) for k in (
            "round/group", "round/leader", "round/clock", "round/partition_stamp",
            "round/test_loss", "async/staleness", "async/leader_staleness", "defense/refused",
            "epoch/val_loss", "round/seconds/local_train", "round/bytes_sent", "async/head_epochs",
            "async/trained", "async/delta_staleness", "async/stood_in", "hca/weights",
            "attack/active",
        )}  # fmt: skip
        out["status"] = np.asarray(f.attrs["status"])
        out["checkpoint_round"] = np.asarray(f.attrs.get("checkpoint_round", 0))
    return out


def check_records(
    d: dict[str, np.ndarray], rounds: np.ndarray, staleness: int, *, resumed: bool = False
) -> None:
    """Node i recorded exactly rounds 1..rounds[i]; partitions agree; staleness bounded."""
    n = d["round/group"].shape[1]
    for i in range(n):
        did = ~np.isnan(d["round/clock"][:, i])
        assert did.tolist() == [r < rounds[i] for r in range(did.size)], (i, did)
        if not resumed:  # (the clock restarts with each process)
            assert np.all(np.diff(d["round/clock"][did, i]) > 0)  # one record a round, in order
        assert np.all(np.isfinite(d["round/test_loss"][did, i]))
    for r in range(d["round/group"].shape[0]):
        ran = ~np.isnan(d["round/clock"][r])
        stamps = set(d["round/partition_stamp"][r, ran].tolist())
        assert len(stamps) == 1, (r, stamps)  # every node of round r used the same partition
        if ran.all():  # ... the one the nodes recorded
            assert stamps == {partition_stamp(d["round/group"][r])}, (r, stamps)
    if staleness >= 0:
        assert np.nanmax(d["async/staleness"]) <= staleness
        assert np.nanmax(d["async/leader_staleness"], initial=0) <= staleness
        assert np.nanmax(d["async/delta_staleness"], initial=0) <= staleness
    # only leaders (and members standing in for one) aggregate other groups' deltas, and only
    # deltas of other groups
    ds = ~np.isnan(d["async/delta_staleness"])
    assert not ds[(d["round/leader"] == 0) & (d["async/stood_in"] == 0)].any()
    assert not (d["async/stood_in"] & d["round/leader"]).any()
    for r, i, j in zip(*np.nonzero(ds), strict=True):
        assert d["round/group"][r, i] != d["round/group"][r, j], (r, i, j)


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize(("n", "staleness"), [(2, 0), (4, 1), (6, 2)])
def test_random_slowdowns_no_hang_every_record_once(tmp_path: Path, n: int, staleness: int):
    rng = random.Random(n)
    slow = [round(rng.uniform(1.0, 3.0), 2) for _ in range(n)]
    out = tmp_path / "a.h5"
    corrupt = {"COLNET_TEST_CORRUPT": "2:1"} if n == 4 else {}
    ring = ["federation.topology=ring"] if n == 6 else []  # mixing and views from neighbours only
    fedper = ["federation.scheme=fedper"] if n == 4 else []  # the mean cross stage, stale
    # views from sketches, whole backbones to the group-mates only
    sketch = ["clustering.backbone_sketch=256"] if n == 6 else []
    # round 1 without groups, its proposal made once the views are in (from a ring's views)
    local = ["federation.first_round=local"] if n == 6 else []
    proc = launch(
        config(tmp_path, slow),
        out,
        "training.rounds=4",
        f"federation.max_staleness={staleness}",
        *ring,
        *fedper,
        *sketch,
        *local,
        env=corrupt,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = read(out)
    assert str(d["status"]) == "finished" and int(d["checkpoint_round"]) == 4
    check_records(d, np.full(n, 4), staleness)
    assert (d["round/group"][1:] >= 0).all()
    assert (d["round/group"][0] == -1).all() if local else (d["round/group"][0] >= 0).all()
    if len(np.unique(d["round/group"][-1])) > 1:  # leaders aggregated other groups' deltas
        assert (~np.isnan(d["async/delta_staleness"])).any()
    # honest buffers (headers included) are never refused
    honest = [j for j in range(n) if not (corrupt and j == 1)]
    assert np.nansum(d["defense/refused"][:, :, honest]) == 0
    if corrupt:  # rank 1's round-2 backbone had a NaN: its neighbours refused it, none used it
        refused = d["defense/refused"][:, :, 1]  # (round, receiver) refused sender 1
        assert refused[:, [0, 2, 3]].sum() >= 1 and refused[:, 1].sum() == 0, refused
        used_round = np.arange(1, 5)[:, None] - d["async/staleness"][:, :, 1]
        assert not np.any(used_round == 2), used_round


@pytest.mark.mpi
@pytest.mark.slow
def test_staleness_zero_groups_and_leads_like_sync(tmp_path: Path):
    """S = 0 forms the groups and picks the leaders of synchronous mode (colnet, and with
    clustering.backbone_sketch: views from sketches, whole backbones to the mates). With the
    fedper scheme (leaders post group backbones; every node adds the mean of the groups minus
    its own group's) it also learns what synchronous FedPer learns: the same models up to float
    rounding, so the same test losses; with federation.leader_stand_in too (at S = 0 no leader
    is behind its members, and every version mixed is of the round)."""
    cfg = config(tmp_path, [1.0] * 4)
    runs, outs = [], {}
    variants = {
        "colnet": ["federation.scheme=colnet"],
        "fedper": ["federation.scheme=fedper"],
        "sketch": ["clustering.backbone_sketch=256"],  # views from sketches, MIX to mates
        # at S = 0 every leader has trained the round before its members mix: none stands in
        "fedper_stand_in": ["federation.scheme=fedper", "federation.leader_stand_in=true"],
        # the attacks of local training act as in synchronous rounds
        "fedper_label_flip": [
            "federation.scheme=fedper",
            "attack.kind=label_flip",
            "attack.nodes=[0]",
        ],
        "fedper_boost": ["federation.scheme=fedper", "attack.kind=boost", "attack.nodes=[2]"],
        # a robust intra rule runs (in groups of two the median is the mean: the unit tests
        # show the rule itself)
        "fedper_median": ["federation.scheme=fedper", "defense.aggregation=median"],
        # a corrupted backbone from round 2 (one value short): refused by every neighbour
        "bad_buffer": [
            "attack.kind=bad_buffer",
            "attack.nodes=[1]",
            "attack.buffer_fault=short",
            "attack.start_round=2",
        ],
    }
    alone = ("fedper_stand_in", "bad_buffer")  # no synchronous run of their own
    for scheme, extra in variants.items():
        sets = [*SMALL, "training.rounds=2", *extra]
        common = [a for x in sets for a in ("--set", x)]
        a, s = tmp_path / f"async_{scheme}.h5", tmp_path / f"sync_{scheme}.h5"
        outs[scheme] = (a, s if scheme not in alone else outs["fedper"][1])
        runs.append(
            ["run", str(cfg), "--out", str(a), *common, "--set", "federation.max_staleness=0"]
        )
        if scheme not in alone:
            runs.append(
                ["run", str(cfg), "--out", str(s), *common, "--set", "federation.mode=sync"]
            )
    proc = run_mpi(4, colnet_batch(*runs), timeout=300)  # all in one launch
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for scheme, (a, s) in outs.items():
        if scheme == "bad_buffer":
            continue
        da, ds = read(a), read(s)
        assert np.array_equal(da["round/group"], ds["round/group"]), scheme
        assert np.array_equal(da["round/leader"], ds["round/leader"]), scheme
        assert np.nanmax(np.abs(da["async/staleness"])) == 0
        assert np.isnan(ds["async/staleness"]).all()
    # sketched: each node sends its 3 neighbours a view and its 1 mate its backbone, instead
    # of its backbone to all 3
    sent = {v: read(outs[v][0])["round/bytes_sent"][1:].mean() for v in ("colnet", "sketch")}
    assert sent["sketch"] < 0.8 * sent["colnet"], sent  # measured: 0.61
    for variant in (
        "fedper",
        "fedper_stand_in",
        "fedper_label_flip",
        "fedper_boost",
        "fedper_median",
    ):
        da, ds = (read(x) for x in outs[variant])
        assert len(np.unique(da["round/group"][-1])) == 2  # two groups: the cross stage ran
        assert np.allclose(da["round/test_loss"], ds["round/test_loss"], rtol=1e-4, atol=0)
        assert not da["async/stood_in"].any()
    clean = read(outs["fedper"][0])["round/test_loss"]
    for variant, attacker in (("fedper_label_flip", 0), ("fedper_boost", 2)):
        da = read(outs[variant][0])
        assert (da["attack/active"][:, attacker] == 1).all() and da["attack/active"].sum() == 2
        assert not np.allclose(da["round/test_loss"], clean, rtol=1e-3, atol=0), variant
    d = read(outs["bad_buffer"][0])
    refused = d["defense/refused"][:, :, 1]  # (round, receiver) refused rank 1's backbone
    assert refused[0].sum() == 0 and (refused[1, [0, 2, 3]] == 1).all(), refused
    assert np.nansum(d["defense/refused"][:, :, [0, 2, 3]]) == 0
    assert np.isnan(d["async/staleness"][1, :, 1]).all()  # nobody used it in round 2


@pytest.mark.mpi
@pytest.mark.slow
def test_time_budget_lets_fast_nodes_do_more_rounds(tmp_path: Path):
    """One node 8x slower, unbounded staleness, clustering in round 1 only, a 6 s budget. The
    round limit is far beyond what any node can reach in 6 s, so only the budget stops them."""
    out = tmp_path / "b.h5"
    proc = launch(
        config(tmp_path, [8.0, 1.0, 1.0, 1.0]),
        out,
        "training.rounds=1000",
        "federation.max_staleness=-1",
        "clustering.until=1",
        "federation.time_budget=6",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = read(out)
    done = (~np.isnan(d["round/clock"])).sum(axis=0)
    assert done[0] < done[1:].min() and done.max() < 1000, done
    check_records(d, done, -1)
    assert "time budget reached" in proc.stdout
    # after the slow node finished, the job log and the report count it with its last
    # evaluation (not NaN for its whole group)
    lines = [x for x in proc.stdout.splitlines() if re.match(r"round +\d+/", x)]
    assert len(lines) == done.max() and not any("nan" in x for x in lines), lines
    last = np.array([d["round/test_loss"][k - 1, i] for i, k in enumerate(done)])
    summary = group_summary(load_run(out))
    assert summary["attributes"]["loss"] == pytest.approx(last[:2].mean())
    assert summary["landmarks"]["loss"] == pytest.approx(last[2:].mean())


@pytest.mark.mpi
def test_refused_group_deltas_and_leader_updates_do_not_stall_the_round(tmp_path: Path):
    """S = 0, the true task groups of 2 + 2 nodes: every leader's round-2 group delta and
    round-3 update carry a NaN. The other groups' nodes refuse the deltas, and their leaders
    run the cross stage without them; members refuse the updates and keep their group mix; no one waits for
    a buffer that will not come, and every refusal is in a record (whichever round took it)."""
    out = tmp_path / "r.h5"
    env = {"COLNET_TEST_CORRUPT": "2:*:delta,3:*:result"}
    sets = ("training.rounds=3", "federation.max_staleness=0", "federation.grouping=tasks")
    proc = launch(config(tmp_path, [1.0] * 4), out, *sets, "federation.timeout=60", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = read(out)
    assert str(d["status"]) == "finished"
    check_records(d, np.full(4, 3), 0)
    lead, group = d["round/leader"].astype(bool), d["round/group"]
    same = group[:, :, None] == group[:, None, :]  # (round, receiver, sender)
    # deltas go to every node of the other groups (any of them may lead next); updates from
    # a leader to the members of its group
    deltas = lead[1][None, :] & ~same[1]  # round 2
    updates = ~lead[2][:, None] & lead[2][None, :] & same[2]  # round 3
    assert deltas.sum() == 4 and updates.sum() == 2
    assert (d["defense/refused"].sum(axis=0) == deltas + updates).all(), d["defense/refused"]


@pytest.mark.mpi
def test_a_malformed_record_stops_the_run_naming_it(tmp_path: Path):
    """Rank 1 sends its round-2 record one number too long: the writer rank takes no wrong row,
    and every rank stops with a message naming the sender, the kind and the sizes."""
    out = tmp_path / "m.h5"
    env = {"COLNET_TEST_CORRUPT": "2:1:record"}
    proc = launch(config(tmp_path, [1.0, 1.0]), out, "training.rounds=3", env=env)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "malformed message (kind 44) from rank 1" in proc.stderr, proc.stderr
    assert re.search(r"(\d+) numbers where (\d+) belong", proc.stderr), proc.stderr
    got, want = map(int, re.search(r"(\d+) numbers where (\d+) belong", proc.stderr).groups())
    assert got == want + 1
    d = read(out)
    assert str(d["status"]) == "failed" and d["round/clock"].shape[0] <= 1


def paced_straggler(tmp_path: Path, *sets: str, slowdown: float = 3.0) -> dict[str, np.ndarray]:
    """4 ranks, node 0 ``slowdown`` times slower (paced: 0.3 s epochs, its own 0.3 x slowdown),
    6 rounds of two local epochs, unbounded staleness, federation.catch_up = 2 (unless ``sets``
    say otherwise): the records, every one there."""
    out = tmp_path / "c.h5"
    proc = launch(
        config(tmp_path, [slowdown, 1.0, 1.0, 1.0]),
        out,
        "training.rounds=6",
        "training.local_epochs=2",
        "training.epoch_seconds=0.3",
        "federation.max_staleness=-1",
        "clustering.until=1",
        "federation.catch_up=2",
        *sets,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = read(out)
    check_records(d, np.full(4, 6), -1)
    return d


@pytest.mark.mpi
def test_first_round_local_runs_round_1_without_waiting_for_the_first_partition(tmp_path: Path):
    """federation.first_round = "local", node 0 three times slower (paced: 0.3 s epochs, its own
    0.9 s): round 1 has no groups, so the fast nodes finish it without waiting for the
    straggler's proposal; epoch 1 applies from round 2 on, identical on every rank. Resumed
    after that round alone (no partition to keep), round 2 agrees on its own in lock-step."""
    cfg = config(tmp_path, [3.0, 1.0, 1.0, 1.0])
    sets = [
        *SMALL, "training.local_epochs=2", "training.epoch_seconds=0.3",
        "federation.max_staleness=-1", "clustering.until=1", "federation.first_round=local",
    ]  # fmt: skip
    out, short = tmp_path / "f.h5", tmp_path / "g.h5"

    def call(path: Path, rounds: int, *extra: str) -> list[str]:
        args = [a for x in [*sets, f"training.rounds={rounds}"] for a in ("--set", x)]
        return ["run", str(cfg), "--out", str(path), *args, *extra]

    # the run; the same stopped after round 1, then resumed (no partition to keep): one launch
    runs = [call(out, 4), call(short, 1), call(short, 3, "--resume")]
    proc = run_mpi(4, colnet_batch(*runs), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no groups yet" in proc.stdout and "resuming after round 1" in proc.stdout
    d = read(out)
    check_records(d, np.full(4, 4), -1)
    groups, clock = d["round/group"], d["round/clock"]
    assert (groups[0] == -1).all() and (groups[1:] >= 0).all(), groups
    assert (groups[1:] == groups[1]).all()  # clustering.until = 1: epoch 1's partition kept
    assert not d["round/leader"][0].any() and d["round/leader"][1:].any()  # no leaders in round 1
    assert np.isnan(d["async/leader_staleness"][0]).all()  # ... and no leader update applied
    # the fast nodes finished round 1 about 1.2 s (the straggler's extra pace) before it did;
    # waiting in round 1 for its first view (round 1 grouped) they would finish with it
    assert clock[0, 1:].max() < clock[0, 0] - 0.6, clock[0]
    assert clock[1, 1:].min() >= clock[0, 0], clock[:2]  # round 2 needs epoch 1
    d = read(short)
    check_records(d, np.full(4, 3), -1, resumed=True)
    assert (d["round/group"][0] == -1).all() and (d["round/group"][1:] >= 0).all()


@pytest.mark.mpi
def test_catch_up_gives_a_straggler_one_epoch_rounds_once_behind(tmp_path: Path):
    """federation.catch_up = 2, node 0 three times slower (paced: 0.3 s epochs, its own 0.9 s),
    unbounded staleness: its first two rounds train both local epochs (nothing is ahead yet:
    round 1's partition is agreed in lock-step), and once its neighbours have told it they are
    two rounds ahead its rounds train one epoch (the second recorded as NaN). The fast nodes
    are never two rounds behind anyone, so they always train both; every record is there."""
    d = paced_straggler(tmp_path)
    # rows (round 1 epoch 1, round 1 epoch 2, round 2 epoch 1, ...) -> (round, epoch, node)
    skipped = np.isnan(d["epoch/val_loss"]).reshape(6, 2, 4)
    assert not skipped[:, 0].any()  # the first epoch always runs
    slow = skipped[:, 1, 0]
    assert not slow[:2].any() and slow[2:].sum() >= 2, slow
    assert not skipped[:, :, 1:].any(), skipped[:, 1, 1:]
    # a one-epoch round takes one paced epoch (0.9 s), not two
    train = d["round/seconds/local_train"][:, 0]
    assert (train[slow] < 1.5).all() and (train[~slow] >= 1.8).all(), (train, slow)


@pytest.mark.mpi
@pytest.mark.parametrize("how", ["head", "features"])
def test_catch_up_with_the_head_trains_a_stragglers_head_alone_at_its_cost(
    tmp_path: Path, how: str
):
    """federation.catch_up = 1 with catch_up_train = "head", node 0 five times slower (1.5 s
    epochs): round 1 (agreed in lock-step) trains everything; in round 2 the other nodes finish
    the round during its first epoch, and it learns so while it trains (the mailbox is served
    between training steps), so its second epoch trains its head alone (asked before each
    epoch); later rounds train the head alone throughout. Head-only epochs are counted in
    async/head_epochs (none skipped) and paced at the cost of a head-only step (about half of
    a full one at BL-1); the fast nodes hardly ever train one (only when load leaves one a
    round behind another).

    "features": head-only epochs in the same way (the straggler's rounds are cheaper, so when it
    is behind depends more on the machine's load), the first head-only epoch of a round (on a new backbone)
    paced as a head-only epoch (it computes the features, one backbone forward pass over the
    epoch's samples), the second at the cost of the head's step alone (about a fifth)."""
    d = paced_straggler(
        tmp_path, "federation.catch_up=1", f"federation.catch_up_train={how}", slowdown=5.0
    )
    assert not np.isnan(d["epoch/val_loss"]).any()  # no epoch skipped
    head = d["async/head_epochs"]
    if how == "head":
        assert head[:, 0].tolist() == [0, 1, 2, 2, 2, 2], head[:, 0]
    else:
        # cheaper rounds: when the straggler is behind depends on the machine's load; round 1
        # is lock-step, and at least two rounds train the head alone throughout (the second
        # epoch on the features the first computed)
        assert head[0, 0] == 0 and (head[:, 0] == 2).sum() >= 2, head[:, 0]
    # the fast nodes catch up only if load leaves one a round behind a faster peer (seen in a
    # full suite run on 2 cores: one epoch): at most two of their 36 epochs
    assert head[:, 1:].sum() <= 2, head[:, 1:]
    # each epoch lasts 1.5 s, or 1.5 s x the cost of its head-only steps
    torch.manual_seed(0)
    costs = catch_up_costs(
        build_backbone(width=4, stem="cifar", in_channels=3, privatization=1),
        build_head(width=4, privatization=1, num_outputs=8),
        torch.zeros(1, 3, 32, 32),
    )
    assert 0.4 < costs.head < 0.6 and 0.15 < costs.head_on_features < 0.3, costs
    h = head[:, 0]
    expected = 1.5 * (2 - h) + 1.5 * costs.head * h
    if how == "features":
        expected = 1.5 * (2 - h) + 1.5 * (
            costs.head * (h > 0) + costs.head_on_features * np.maximum(h - 1, 0)
        )
    train = d["round/seconds/local_train"][:, 0]
    assert ((train > expected - 0.05) & (train < expected + 0.4)).all(), (train, expected)


@pytest.mark.mpi
@pytest.mark.parametrize(("staleness", "until"), [(-1, 1), (0, 2)])
def test_lockstep_deadline_ends_a_stragglers_training_when_everyone_waits(
    tmp_path: Path, staleness: int, until: int
):
    """federation.lockstep_deadline, node 0 five times slower (paced: 0.6 s epochs, its own
    3 s), 3 rounds of two epochs. In the rounds whose partition waits for every node's
    proposal of that round (unbounded staleness: round 1; S = 0: every clustering round, here
    1 and 2) the straggler stops training once the three others have posted that round's
    backbone (after about 1.2-2 s of its 6 s round: inside its first epoch, its second
    recorded as NaN) and its round's training lasts the share of the pace its steps took; in the other
    rounds, and on the fast nodes, every step is trained. Partitions agree on every rank."""
    out = tmp_path / "d.h5"
    proc = launch(
        config(tmp_path, [5.0, 1.0, 1.0, 1.0]),
        out,
        "training.rounds=3",
        "training.local_epochs=2",
        "training.epoch_seconds=0.6",
        "training.batch_size=8",  # five steps an epoch: where it stops is seen finely
        f"federation.max_staleness={staleness}",
        f"clustering.until={until}",
        "federation.lockstep_deadline=true",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = read(out)
    check_records(d, np.full(4, 3), staleness)
    trained, train = d["async/trained"], d["round/seconds/local_train"]
    cut = np.arange(1, 4) <= until  # the lock-step rounds
    assert (trained[cut, 0] < 0.6).all() and (trained[cut, 0] > 0.0).all(), trained[:, 0]
    assert (trained[~cut, 0] == 1.0).all() and (trained[:, 1:] == 1.0).all(), trained
    # its share of the 6 s round's pace, not the whole round (a little over: a step's pace)
    assert (train[cut, 0] < 6.0 * trained[cut, 0] + 0.8).all(), (train[:, 0], trained[:, 0])
    assert (train[~cut, 0] >= 5.9).all(), train[:, 0]
    skipped = np.isnan(d["epoch/val_loss"]).reshape(3, 2, 4)
    assert skipped[cut, 1, 0].all() and not skipped[cut, 0, 0].any()
    assert not skipped[~cut].any() and not skipped[:, :, 1:].any()
    assert proc.stdout.count("local training stopped at") == until, proc.stdout


@pytest.mark.mpi
def test_leader_stand_in_gives_every_member_an_update_of_its_round(tmp_path: Path):
    """federation.leader_stand_in, node 0 three times slower (paced), unbounded staleness: in
    the rounds its group's leader is the straggler (not yet at that round), its group-mate
    (node 1) computes the cross-group update itself (HCA over the other group's newest delta,
    recorded), and the straggler's own update of that round, when it comes, is not applied on
    top; in every other round a member waits for its leader's update of that round. So every
    fast node-round with groups ends with a cross-group update of its own round (led, stood in
    for, or applied at staleness 0), which without the option is not so (members go on
    without the update of a leader still at work)."""
    d = paced_straggler(tmp_path, "federation.leader_stand_in=true")
    stood, lead, ls = d["async/stood_in"], d["round/leader"], d["async/leader_staleness"]
    groups = d["round/group"]
    # node 0 leads its group in some rounds after the first; node 1 stands in for it there
    led_by_straggler = (lead[:, 0] == 1) & (np.arange(6) > 0)
    assert led_by_straggler.any()
    assert stood[led_by_straggler, 1].all(), (stood[:, 1], lead[:, 0])
    assert not stood[:, 0].any()  # the straggler's leader is never behind it
    assert (groups[:, 0] == groups[:, 1]).all() and (groups[:, 0] != groups[:, 2]).all()
    # a stand-in aggregated as a leader does: HCA's figures and the other group's delta used
    assert np.isfinite(d["hca/weights"][stood == 1]).all()
    for r, i in zip(*np.nonzero(stood), strict=True):
        other = groups[r] != groups[r, i]
        assert (~np.isnan(d["async/delta_staleness"][r, i, other])).any(), (r, i)
    # every fast node-round: an update of its own round (led, stood in for, or applied fresh)
    fresh = (lead == 1) | (stood == 1) | (ls == 0)
    assert fresh[:, 1:].all(), (lead[:, 1:], stood[:, 1:], ls[:, 1:])
    assert (np.nan_to_num(ls[:, 0], nan=0.0) <= 0).all(), ls[:, 0]  # its leaders are ahead


@pytest.mark.mpi
def test_without_leader_stand_in_members_go_on_without_a_late_leaders_update(tmp_path: Path):
    """The same run without the option: node 1 never stands in, and in the rounds the
    straggler leads it applies no update of its own round (the straggler's comes too late to
    be newer than the one it holds)."""
    d = paced_straggler(tmp_path)
    lead, ls = d["round/leader"], d["async/leader_staleness"]
    assert not d["async/stood_in"].any()
    led_by_straggler = (lead[:, 0] == 1) & (np.arange(6) > 0)
    assert led_by_straggler.any() and not (ls[led_by_straggler, 1] == 0).any(), ls[:, 1]


@pytest.mark.mpi
def test_epoch_seconds_sets_each_nodes_pace(tmp_path: Path):
    """training.epoch_seconds = 1: node 0's two local epochs take 1 s each, the straggler's
    (slowdown 2) 2 s each, whatever the tiny model's work; the log says nothing of overruns."""
    out = tmp_path / "p.h5"
    proc = launch(
        config(tmp_path, [1.0, 2.0]),
        out,
        "training.rounds=2",
        "training.local_epochs=2",
        "training.epoch_seconds=1",
        "federation.max_staleness=0",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    train = read(out)["round/seconds/local_train"]
    assert train.shape == (2, 2)
    assert ((train[:, 0] >= 2.0) & (train[:, 0] < 2.6)).all(), train
    assert ((train[:, 1] >= 4.0) & (train[:, 1] < 4.6)).all(), train
    assert "emulated pace is not held" not in proc.stdout + proc.stderr


@pytest.mark.mpi
@pytest.mark.slow
def test_stop_signal_and_kill_then_resume_keep_every_record(tmp_path: Path):
    """SLURM's warning signal reaches rank 1 in round 2: it tells the others point-to-point,
    every node stops at its next round boundary with its checkpoint saved, exit code 75. The
    resumed run is killed on rank 2 in round 4 (a crash); resumed again, it ends with every
    node-round recorded exactly once and only the last checkpoint kept."""
    cfg = config(tmp_path, [1.0, 1.5, 1.0, 2.0])
    out = tmp_path / "k.h5"
    sets = ["training.rounds=5", "federation.max_staleness=1"]
    proc = launch(cfg, out, *sets, env={"COLNET_TEST_SIGNAL": "stage.evaluate:2:1:SIGUSR1"})
    assert proc.returncode == 75, proc.stdout + proc.stderr
    d = read(out)
    stopped = int(d["checkpoint_round"])
    assert str(d["status"]) == "preempted" and 1 <= stopped <= 3, (d["status"], stopped)
    proc = launch(cfg, out, *sets, env={"COLNET_TEST_KILL": "stage.cross:4:2"}, extra=("--resume",))
    assert proc.returncode not in (0, 75), proc.stdout + proc.stderr
    assert f"resuming after round {stopped}" in proc.stdout
    lock_released(out)
    with h5py.File(out) as f:
        saved = int(f.attrs["checkpoint_round"])
    assert stopped <= saved <= 3, saved
    proc = launch(cfg, out, *sets, extra=("--resume",))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resuming after round {saved}" in proc.stdout
    d = read(out)
    assert str(d["status"]) == "finished" and d["epoch/val_loss"].shape[0] == 5
    check_records(d, np.full(4, 5), 1, resumed=True)
    ckpt = sorted(p.name for p in Path(f"{out}.ckpt").iterdir())
    assert ckpt == [f"rank{r:05d}.round000005.ckpt" for r in range(4)], ckpt
