"""Bad inputs: every one exits with code 2, one clean line naming the key or path, no traceback,
and nothing written.

Most cases call ``colnet_mpi.cli.main`` in this process (a ``run`` here is an MPI singleton,
world size 1, so its configs have one node); a few launch ``mpiexec -n 2`` or a fresh Python to
check what only a separate process shows (one message for all ranks, no torch imported).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from colnet_mpi import cli
from tests.conftest import ROOT, colnet, run_mpi

QUICK = str(ROOT / "configs" / "quickstart.toml")  # synthetic faces, 6 nodes
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# A folder this process cannot write in: root ignores file modes, but not sysfs.
READ_ONLY = "/sys" if IS_ROOT else "ro"


def config_text(head: str = "", *, nodes: str = '[[nodes]]\ntask = "low_digits"\n') -> str:
    """A one-node digits config (k = 1) with ``head`` (tables other than [data]/[clustering])."""
    return f'{head}\n[data]\ndataset = "digits"\n\n[clustering]\nk = 1\n\n{nodes}'


ONE = config_text('[run]\nname = "one"\n\n[model]\nwidth = 4\n\n[training]\nrounds = 1\n')
TWO = config_text(nodes='[[nodes]]\ntask = "low_digits"\n\n[[nodes]]\ntask = "high_digits"\n')
DISK = '[data]\ndataset = "cifar10"\nroot = "{root}"\n[clustering]\nk = 1\n[[nodes]]\ntask = "animals"\n'

HDF5 = b"<an empty HDF5 file>"  # markers for files that write_tree makes specially
FIFO = b"<a named pipe>"

# What every case starts from, relative to its own temporary folder (the working directory).
TREE: dict[str, str | bytes] = {
    "one.toml": ONE,
    "two.toml": TWO,
    "adir/keep.txt": "a folder that is not a results file",
    "afile": "a file that is not a folder",
    "taken.h5": b"precious",
}


@dataclass(frozen=True)
class Case:
    """One bad input: the command line, what stderr must name, extra files to write first."""

    argv: tuple[str, ...]
    needles: tuple[str, ...]
    files: dict[str, str | bytes] = field(default_factory=dict)
    one_line: bool = True  # exactly one line on stderr (sweep --check and argparse print more)


def case(argv: str | list[str], *needles: str, files=None, one_line=True, id: str):  # noqa: A002
    args = argv.split() if isinstance(argv, str) else argv
    return pytest.param(Case(tuple(args), needles, files or {}, one_line), id=id)


def check_set(override: str, *needles: str, config: str = "one.toml", id: str):  # noqa: A002
    return case(["check-config", config, "--set", override], *needles, id=id)


def check_file(text: str | bytes, *needles: str, id: str):  # noqa: A002
    return case("check-config bad.toml", *needles, files={"bad.toml": text}, id=id)


def sweep_spec(text: str | bytes, *args: str, needles: tuple[str, ...], id: str, **kw):  # noqa: A002
    files = {"spec.toml": text, **kw.pop("files", {})}
    return case(["sweep", "spec.toml", *args], *needles, files=files, id=id, **kw)


SWEEP_OK = '[sweep]\nname = "s"\nconfig = "one.toml"\n[axes]\n"run.seed" = [0, 1]\n'

CONFIG_FILES = [
    case("check-config missing.toml", "'missing.toml'", "does not exist", id="missing-file"),
    case("check-config adir", "'adir'", "is a directory", id="directory-as-config"),
    check_file(
        b'[run]\nname = "x\xff\xfe"\n', "'bad.toml'", "offset 15 (line 2, column 10)", id="not-utf8"
    ),
    check_file(
        b"# caf\xe9 in Latin-1\n" + ONE.encode(), "not valid UTF-8", "line 1", id="not-utf8-comment"
    ),
    check_file("[run\nname = 1\n", "'bad.toml'", "not valid TOML", id="toml-syntax"),
    check_file(
        '[run]\nseed = 1\nseed = 2\n[[nodes]]\ntask = "x"\n', "not valid TOML", id="dup-key"
    ),
    check_file("", "at least one [[nodes]]", id="empty-file"),
    check_file(config_text("[magic]\nx = 1\n"), "unknown section 'magic'", id="unknown-section"),
    check_file(config_text('[run]\nnmae = "x"\n'), "unknown key 'run.nmae'", id="unknown-key"),
    check_file(config_text("run = 3\n"), "[run] must be a table", id="section-not-table"),
    check_file(config_text('[run]\nseed = "zero"\n'), "run.seed", "wrong type", id="str-for-int"),
    check_file(config_text("[training]\nrounds = true\n"), "training.rounds", id="bool-for-int"),
    check_file(config_text("[model]\nwidth = 8.5\n"), "model.width", "wrong type", id="float-int"),
    check_file(
        config_text("[training]\nsingle_label = 3\n"),
        "training.single_label must be a table",
        id="subtable-not-table",
    ),
    check_file(
        config_text('[training.single_label]\nnme = "sgd"\n'),
        "unknown key 'training.single_label.nme'",
        id="unknown-nested-key",
    ),
    check_file(config_text('[run]\nname = "a/b"\n'), "run.name", id="name-with-slash"),
    check_file(config_text('[run]\nname = "a\\u0000b"\n'), "run.name", "NUL", id="name-nul"),
    check_file(config_text('[data]\nroot = "x"\n'), "not valid TOML", id="table-twice"),
]

NODES = [
    check_file("nodes = 3\n" + config_text(nodes=""), "nodes must be an array", id="not-array"),
    check_file("nodes = [1]\n" + config_text(nodes=""), "nodes[0] must be a table", id="not-table"),
    check_file(
        config_text(nodes='[[nodes]]\ntsk = "low_digits"\n'),
        "unknown key 'nodes[0].tsk'",
        id="node-unknown-key",
    ),
    check_file(
        config_text(nodes="[[nodes]]\ncount = 2\n"), "nodes[0].task is required", id="no-task"
    ),
    check_file(
        config_text(nodes='[[nodes]]\ntask = "animals"\n'),
        "nodes[0].task = 'animals'",
        "low_digits",
        id="task-not-of-dataset",
    ),
    check_file(
        config_text(nodes='[[nodes]]\ntask = "low_digits"\ncount = 0\n'),
        "nodes[0].count = 0",
        id="count-zero",
    ),
    check_file(
        config_text(nodes='[[nodes]]\ntask = "low_digits"\ncount = "2"\n'),
        "nodes[0].count = '2'",
        id="count-string",
    ),
    check_file(  # one above the bound: without it the nodes are made (and check-config passes)
        config_text(nodes='[[nodes]]\ntask = "low_digits"\ncount = 100001\n'),
        "nodes[0].count = 100001",
        "at most 100,000 nodes",
        id="count-huge",
    ),
    check_file(
        config_text(nodes='[[nodes]]\ntask = "low_digits"\nname = "a"\ncount = 2\n'),
        "nodes[0].name",
        "count = 1",
        id="name-with-count",
    ),
    check_file(
        config_text(nodes='[[nodes]]\ntask = "low_digits"\nname = "a"\n' * 2),
        "nodes[1].name = 'a' is used twice",
        id="duplicate-names",
    ),
    check_file(
        config_text(nodes='[[nodes]]\ntask = "low_digits"\nname = "a\\u0000"\n'),
        "nodes[0].name",
        "NUL",
        id="node-name-nul",
    ),
    check_file(config_text(nodes=""), "at least one [[nodes]]", id="no-nodes"),
    check_set("clustering.k=2", "clustering.k = 2", "1 nodes", id="k-above-nodes"),
    check_set(
        "attack.kind=label_flip", "attack.nodes", config="two_attack.toml", id="attack-node-absent"
    ),
]

OVERRIDES = [
    check_set("training.rounds", "use section.key=value", id="set-no-equals"),
    check_set("rounds=3", "section.key", id="set-no-section"),
    check_set(".rounds=3", "section.key", id="set-empty-section"),
    check_set("training.=3", "section.key", id="set-empty-key"),
    check_set("magic.key=1", "unknown section 'magic'", id="set-unknown-section"),
    check_set("training.rnds=3", "unknown key 'training.rnds'", id="set-unknown-key"),
    check_set("nodes.task=x", "cannot change [[nodes]]", id="set-nodes"),
    check_set("run.name.x=1", "'name' is not a table", id="set-into-value"),
    check_set("training.single_label=3", "training.single_label must be a table", id="set-table"),
    check_set("training.rounds=abc", "training.rounds = 'abc'", "wrong type", id="set-word"),
    check_set("training.rounds=", "training.rounds = ''", id="set-empty-value"),
    check_set("training.rounds=[1,", "training.rounds", id="set-broken-toml"),
    check_set("training.rounds=0", "training.rounds = 0", id="set-zero"),
    check_set("training.rounds=-3", "training.rounds = -3", id="set-negative"),
    check_set("training.rounds=1e400", "training.rounds = inf", id="set-inf-for-int"),
    check_set("federation.scheme=magic", "federation.scheme = 'magic'", "colnet", id="scheme"),
    check_set("data.dataset=imagenet", "data.dataset = 'imagenet'", "digits", id="dataset"),
    check_set("training.single_label.lr=nan", "training.single_label.lr", id="lr-nan"),
    check_set("training.single_label.lr=inf", "training.single_label.lr", "finite", id="lr-inf"),
    check_set("training.single_label.name=lion", "training.single_label.name", id="optimizer"),
    check_set("training.multi_label.lr_decay=1.5", "training.multi_label.lr_decay", id="decay"),
    check_set("clustering.alpha=0.9", "must sum to 1", id="weights-sum"),
    check_set("clustering.k=0", "clustering.k = 0", id="k-zero"),
    check_set("clustering.jacobian=approx", "clustering.jacobian", id="jacobian"),
    check_set("hca.alpha=1", "hca.alpha = 1.0", id="hca-alpha"),
    check_set("defense.trim=0.5", "defense.trim = 0.5", id="trim"),
    check_set("defense.norm_ratio=1", "defense.norm_ratio", id="norm-ratio"),
    check_set("defense.min_cosine=2", "defense.min_cosine", id="min-cosine"),
    check_set("defense.aggregation=mode", "defense.aggregation", id="aggregation"),
    check_set("attack.kind=evil", "attack.kind = 'evil'", id="attack-kind"),
    check_set("attack.nodes=[0,0]", "lists a node twice", id="attack-nodes-twice"),
    check_set("attack.flip_probability=2", "attack.flip_probability", id="flip-probability"),
    check_set("model.privatization=5", "model.privatization = 5", id="privatization"),
    check_set("model.stem=vit", "model.stem = 'vit'", id="stem"),
    check_set("federation.timeout=0", "federation.timeout", id="timeout-zero"),
    check_set("federation.timeout=true", "federation.timeout", id="timeout-bool"),
    check_set("federation.cuda_aware=maybe", "federation.cuda_aware", id="cuda-aware"),
    check_set("data.image_size=4", "data.image_size = 4", ">= 8", id="image-size-small"),
    check_set("data.image_size=12", "data.image_size = 12", ">= 16", config=QUICK, id="faces-12"),
    check_set("data.dataset=cifar10", "data.root", "cifar-10-batches-py", config=QUICK, id="root"),
    case(
        f"check-config {QUICK} --set data.dataset=cifar10 --set data.root=d --set data.image_size=64",
        "data.image_size = 64",
        "32x32",
        id="cifar-image-size",
    ),
]

# Values above the sanity bounds: each message names the key and the bound.
ABOVE_BOUNDS = [
    check_set(f"run.seed={2**70}", "run.seed", "64-bit", id="seed-2**70"),
    check_set("run.seed=-1", "run.seed = -1", id="seed-negative"),
    check_set("model.width=100000", "model.width = 100000", "at most 1,024", id="width"),
    check_set("data.samples_per_node=1000000000", "data.samples_per_node", id="samples"),
    check_set("data.test_samples=1000000000", "data.test_samples", "at most", id="test-samples"),
    check_set("data.image_size=100000", "data.image_size = 100000", "at most 512", id="image"),
    check_set("data.workers=1000", "data.workers = 1000", "at most 64", id="workers"),
    check_set("training.batch_size=10000000", "training.batch_size", "at most", id="batch"),
    check_set("training.eval_batch_size=10000000", "training.eval_batch_size", id="eval-batch"),
    check_set("training.rounds=1000000", "training.rounds = 1000000", id="rounds"),
    check_set("training.local_epochs=1000000", "training.local_epochs", id="local-epochs"),
    check_set("run.checkpoint_every=10000000", "run.checkpoint_every", "at most", id="ckpt"),
    check_set("clustering.k_max=1000000", "clustering.k_max", "at most", id="k-max"),
    check_set("clustering.probes=100000000", "clustering.probes", "at most", id="probes"),
    check_set("clustering.max_batches=100000000", "clustering.max_batches", id="max-batches"),
    check_set("attack.bn_batches=1000000000", "attack.bn_batches", "at most", id="bn-batches"),
    check_set("attack.adversarial_batches=1000000000", "attack.adversarial_batches", id="adv"),
    check_set("attack.start_round=10000000", "attack.start_round", "at most", id="start-round"),
    check_set("federation.timeout=1000000000", "federation.timeout", "at most", id="timeout"),
]

OUTPUTS = [
    case("run one.toml --out adir", "output 'adir' (--out) is a directory", id="out-directory"),
    case("run one.toml --out adir --dry-run", "'adir'", "is a directory", id="out-dir-dry"),
    case("run one.toml --out adir --overwrite", "is a directory", id="out-dir-overwrite"),
    case("run one.toml --out afile/x.h5", "under 'afile', which is a file", id="under-file"),
    case("run one.toml --out afile/a/b.h5 --dry-run", "under 'afile'", id="under-file-deep-dry"),
    case(
        "run one.toml --set run.output=afile/x.h5",
        "'afile/x.h5' (run.output)",
        "under 'afile'",
        id="run-output-under-file",
    ),
    case(
        "run one.toml",
        "'results/one.h5' (from run.name)",
        "under 'results', which is a file",
        files={"results": "not a folder"},
        id="default-under-file",
    ),
    case(f"run one.toml --out {READ_ONLY}/x.h5", "not writable", READ_ONLY, id="read-only"),
    case(f"run one.toml --out {READ_ONLY}/x.h5 --dry-run", "not writable", id="read-only-dry"),
    case(f"run one.toml --out {READ_ONLY}/new/x.h5", "not writable", id="read-only-ancestor"),
    case("run one.toml --out taken.h5", "'taken.h5' already exists", "--overwrite", id="exists"),
    case("run one.toml --out taken.h5 --dry-run", "'taken.h5' already exists", id="exists-dry"),
    case(
        "run one.toml --out pipe --overwrite",
        "'pipe' (--out) exists and is not a regular file",
        files={"pipe": FIFO},
        id="not-regular",
    ),
    case("run one.toml --out new.h5 --resume", "nothing to resume: 'new.h5'", id="resume-none"),
    case("run one.toml --out n/e/w.h5 --resume", "nothing to resume", id="resume-none-folder"),
    case("run one.toml --out new.h5 --resume --dry-run", "nothing to resume", id="resume-dry"),
    case("run one.toml --out taken.h5 --resume", "cannot resume from 'taken.h5'", id="resume-junk"),
    case(
        "run one.toml --out x.h5 --set run.checkpoint_dir=afile",
        "run.checkpoint_dir = 'afile'",
        "not a folder",
        id="ckpt-dir-file",
    ),
    case(
        "run one.toml --out x.h5 --set run.checkpoint_dir=afile/ck --dry-run",
        "run.checkpoint_dir",
        "under 'afile'",
        id="ckpt-dir-under-file",
    ),
    case("run one.toml --out x.h5 --set model.width=0", "invalid config", "model.width", id="cfg"),
    case("run bad.toml --out x.h5", "not valid UTF-8", files={"bad.toml": b"\xff"}, id="run-utf8"),
    case("run missing.toml --dry-run", "'missing.toml' does not exist", id="run-missing-config"),
]

WORLD_SIZES = [
    case("run two.toml --out x.h5", "world size 1", "2 nodes", "mpiexec -n 2", id="world-1-of-2"),
    case("run two.toml --out x.h5 --dry-run", "world size 1", id="world-dry"),
    case(f"run {QUICK} --out adir", "world size 1", "6 nodes", id="world-before-output"),
]

SWEEPS = [
    case("sweep missing.toml --count", "sweep spec 'missing.toml' does not exist", id="missing"),
    case("sweep adir --count", "sweep spec 'adir' is a directory", id="directory"),
    sweep_spec(
        b'[sweep]\nname = "\xff"\n', "--count", needles=("not valid UTF-8", "offset"), id="utf8"
    ),
    sweep_spec("[sweep\n", "--count", needles=("not valid TOML",), id="toml"),
    sweep_spec(SWEEP_OK + "[more]\n", "--count", needles=("unknown section [more]",), id="section"),
    sweep_spec('[axes]\n"run.seed" = [1]\n', needles=("[sweep] is required",), id="no-sweep"),
    sweep_spec(
        SWEEP_OK.replace('"s"', '"a b"'), "--count", needles=("sweep.name = 'a b'",), id="name"
    ),
    sweep_spec(
        SWEEP_OK.replace("[axes]", "zap = 1\n[axes]"),
        "--count",
        needles=("unknown key 'sweep.zap'",),
        id="sweep-key",
    ),
    sweep_spec(
        SWEEP_OK.replace("[0, 1]", "3"), "--count", needles=("give a list",), id="axis-not-list"
    ),
    sweep_spec(SWEEP_OK.replace("[0, 1]", "[]"), "--count", needles=("is empty",), id="axis-empty"),
    sweep_spec(
        SWEEP_OK.replace('"run.seed"', '"training.rnds"'),
        "--count",
        needles=("unknown key 'training.rnds'",),
        id="axis-key",
    ),
    sweep_spec(
        SWEEP_OK.replace('"run.seed" = [0, 1]', '"run.name" = ["a", "b"]'),
        "--count",
        needles=("axis 'run.name' is not allowed",),
        id="axis-run-name",
    ),
    sweep_spec(
        SWEEP_OK.replace('"run.seed"', '"nodes.count"'), needles=("[[nodes]]",), id="axis-nodes"
    ),
    sweep_spec(
        SWEEP_OK.replace('"run.seed"', '"training.landmarks"'),
        needles=("is a table",),
        id="axis-table",
    ),
    sweep_spec(SWEEP_OK.replace("[0, 1]", "[1, 1]"), needles=("appears twice",), id="duplicate"),
    sweep_spec(
        SWEEP_OK.replace("[axes]", 'zip = [["run.seed", "model.width"]]\n[axes]')
        + '"model.width" = [4, 8, 16]\n',
        needles=("equal lengths",),
        id="zip-lengths",
    ),
    sweep_spec(
        SWEEP_OK.replace("[axes]", 'zip = [["run.seed", "model.width"]]\n[axes]'),
        needles=("not an axis",),
        id="zip-not-axis",
    ),
    sweep_spec(
        SWEEP_OK.replace('config = "one.toml"\n', ""), needles=("no base config",), id="no-config"
    ),
    sweep_spec(
        SWEEP_OK.replace("run.seed", "training.rounds"),
        "--check",
        needles=("index 0", "training.rounds = 0", "1 of 2 sets of 's' are invalid"),
        one_line=False,
        id="check-bad-value",
    ),
    sweep_spec(
        SWEEP_OK.replace("one.toml", "disk.toml"),
        "--check",
        needles=("data.root = 'nodata'", "nodata", "cifar-10-batches-py", "2 of 2 sets"),
        files={"disk.toml": DISK.format(root="nodata")},
        one_line=False,
        id="check-missing-data-folder",
    ),
    sweep_spec(
        SWEEP_OK.replace("one.toml", "disk.toml"),
        "--check",
        needles=("data.root = 'data'", "incomplete", "test_batch"),
        files={
            "disk.toml": DISK.format(root="data"),
            "data/cifar-10-batches-py/data_batch_1": b"",
        },
        one_line=False,
        id="check-incomplete-data-folder",
    ),
    sweep_spec(
        SWEEP_OK.replace("one.toml", "gone.toml"),
        "--check",
        needles=("'gone.toml' does not exist",),
        one_line=False,
        id="check-config-missing",
    ),
    sweep_spec(SWEEP_OK, "--index", "99", needles=("index 99 is out of range",), id="index-99"),
    sweep_spec(SWEEP_OK, "--index", "-1", needles=("index -1 is out of range",), id="index-neg"),
    sweep_spec(
        SWEEP_OK, "--index", "one", needles=("invalid int value",), one_line=False, id="index-word"
    ),
    sweep_spec(SWEEP_OK, "--args", needles=("--args needs --index",), id="args-no-index"),
    sweep_spec(
        SWEEP_OK.replace("one.toml", "gone.toml"),
        "--index",
        "0",
        "--args",
        needles=("config file 'gone.toml' of index 0 does not exist",),
        id="args-config-missing",
    ),
]

REPORTS = [
    case("report missing.h5", "missing.h5", id="missing"),
    case("report taken.h5 --no-figures", "taken.h5", "not a readable HDF5 file", id="not-hdf5"),
    case("report adir --no-figures", "no .h5 results files", "adir", id="no-results"),
    case(
        "report plain.h5 --no-figures",
        "plain.h5",
        "not a colnet-mpi results file",
        files={"plain.h5": HDF5},
        id="hdf5-not-results",
    ),
]


def _grouped(prefix: str, params: list) -> list:
    return [pytest.param(*p.values, id=f"{prefix}-{p.id}") for p in params]


ALL = [
    *_grouped("config", CONFIG_FILES),
    *_grouped("nodes", NODES),
    *_grouped("set", OVERRIDES),
    *_grouped("bound", ABOVE_BOUNDS),
    *_grouped("output", OUTPUTS),
    *_grouped("world", WORLD_SIZES),
    *_grouped("sweep", SWEEPS),
    *_grouped("report", REPORTS),
]


def write_tree(base: Path, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == HDF5:
            import h5py

            h5py.File(path, "w").close()
        elif content == FIFO:
            os.mkfifo(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def snapshot(base: Path) -> dict[str, tuple[int, int] | None]:
    """Every entry under ``base``: files with size and modification time, folders as None."""
    out: dict[str, tuple[int, int] | None] = {}
    for folder, dirs, files in os.walk(base):
        for name in dirs:
            out[os.path.relpath(os.path.join(folder, name), base)] = None
        for name in files:
            st = os.stat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), base)] = (st.st_size, st.st_mtime_ns)
    return out


class Unexpected(SystemExit):
    """An error ``run`` did not expect; raised instead of aborting this test process."""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The case's folder as the working directory; a read-only folder in it (when not root)."""
    write_tree(tmp_path, TREE)
    attack = TWO.replace("[clustering]\nk = 1", "[clustering]\nk = 1\n[attack]\nnodes = [5]")
    (tmp_path / "two_attack.toml").write_text(attack)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    monkeypatch.chdir(tmp_path)
    real_run = cli._run

    def guarded(args, state):  # a bug must fail the test, not MPI_Abort the test process
        try:
            return real_run(args, state)
        except SystemExit:
            raise
        except BaseException as err:  # noqa: BLE001
            raise Unexpected(f"unexpected {type(err).__name__}: {err}") from err

    monkeypatch.setattr(cli, "_run", guarded)
    real_share = cli._share_resume

    def past_the_checks(*args, **kwargs):  # every rank agreed that all is fine: a bug here
        real_share(*args, **kwargs)
        raise Unexpected("the run passed its start-up checks (it would import torch and train)")

    monkeypatch.setattr(cli, "_share_resume", past_the_checks)
    yield tmp_path
    ro.chmod(stat.S_IRWXU)


@pytest.mark.parametrize("bad", ALL)
def test_bad_input_exits_2_with_one_clean_line(bad: Case, workdir: Path, capsys) -> None:
    write_tree(workdir, bad.files)
    before = snapshot(workdir)
    try:
        code = cli.main(list(bad.argv))
    except Unexpected as err:
        pytest.fail(str(err))
    except SystemExit as err:
        code = err.code
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2, f"exit {code}\n{captured.out}\n{err}"
    for needle in bad.needles:
        assert needle in err, f"{needle!r} not in stderr:\n{err}"
    assert "Traceback" not in err and 'File "' not in err, err
    if bad.one_line:
        assert len(err.strip().splitlines()) == 1, err
    assert snapshot(workdir) == before, "something was written"


def test_there_are_at_least_80_distinct_cases() -> None:
    assert len(ALL) >= 80
    assert len({p.id for p in ALL}) == len(ALL)


# -- separate processes ---------------------------------------------------------------------

NO_HEAVY = "bad = [m for m in ('torch', 'sklearn') if m in sys.modules]; assert not bad, bad"


def python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_config_validation_imports_no_torch_or_sklearn() -> None:
    proc = python(
        "import sys\nfrom colnet_mpi.config import load_config\n"
        "load_config('configs/quickstart.toml', [])\n" + NO_HEAVY,
        ROOT,
    )
    assert proc.returncode == 0, proc.stderr


def test_check_config_and_sweep_check_import_no_torch_or_sklearn(tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(SWEEP_OK.replace("one.toml", QUICK))
    proc = python(
        "import sys\nfrom colnet_mpi.cli import main\n"
        "assert main(['check-config', 'configs/quickstart.toml']) == 0\n"
        f"assert main(['sweep', {str(spec)!r}, '--check']) == 0\n" + NO_HEAVY,
        ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "needs 6 MPI ranks" in proc.stderr


def test_refused_run_stops_before_importing_torch(tmp_path: Path) -> None:
    """An existing output is refused on an MPI singleton without importing torch."""
    write_tree(tmp_path, TREE)
    proc = python(
        "import sys\nfrom colnet_mpi.cli import main\n"
        "try:\n    main(['run', 'one.toml', '--out', 'taken.h5'])\n"
        "except SystemExit as e:\n    assert e.code == 2, e.code\n"
        "else:\n    raise AssertionError('not refused')\n" + NO_HEAVY,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "'taken.h5' already exists" in proc.stderr
    assert (tmp_path / "taken.h5").read_bytes() == b"precious"


MPI_CASES = [
    pytest.param(["one.toml", "--out", "x.h5"], ("world size 2", "1 nodes"), id="world-2-of-1"),
    pytest.param(
        ["two.toml", "--out", "adir", "--dry-run"], ("'adir' (--out) is a directory",), id="dir"
    ),
    pytest.param(["two.toml", "--out", "taken.h5"], ("'taken.h5' already exists",), id="exists"),
]


@pytest.mark.mpi
@pytest.mark.parametrize(("argv", "needles"), MPI_CASES)
def test_two_ranks_refuse_together_with_one_message(tmp_path: Path, argv, needles) -> None:
    write_tree(tmp_path, TREE)
    before = snapshot(tmp_path)
    proc = run_mpi(2, colnet("run", *argv), timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("colnet-mpi:")]
    assert len(lines) == 1, proc.stderr
    assert snapshot(tmp_path) == before, "something was written"
