"""Unit tests for colnet_mpi.config: loading, validation messages, --set overrides, round trip."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from colnet_mpi.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    NodeConfig,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_from_toml,
    load_config,
    parse_override,
    to_toml,
)
from colnet_mpi.data import dataset_tasks, known_datasets

REPO = Path(__file__).resolve().parents[2]

NODES = """
[[nodes]]
task = "attributes"
count = 2

[[nodes]]
task = "landmarks"
count = 2
"""


def write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def two_nodes() -> tuple[NodeConfig, ...]:
    return (NodeConfig(name="a", task="attributes"), NodeConfig(name="b", task="landmarks"))


def raises_naming(fragments: list[str], func, *args, **kwargs) -> str:
    """Call ``func``; it must raise ConfigError whose message contains every fragment."""
    with pytest.raises(ConfigError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in message {message!r}"
    return message


# ---------------------------------------------------------------------------------------------
# Defaults and loading


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_defaults_are_valid():
    cfg = Config(nodes=two_nodes())
    assert cfg.world_size == 2
    assert cfg.data.dataset in known_datasets()
    assert cfg.model.privatization in (0, 1, 2)
    assert cfg.clustering.alpha + cfg.clustering.beta + cfg.clustering.gamma == pytest.approx(1.0)
    for node in cfg.nodes:
        assert node.task in dataset_tasks(cfg.data.dataset)


def test_config_without_nodes_is_refused():
    raises_naming(["nodes"], Config)
    raises_naming(["nodes"], config_from_dict, {"run": {"name": "x"}})


def test_config_is_frozen():
    cfg = Config(nodes=two_nodes())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run = RunConfig(name="other")  # type: ignore[misc]


def test_load_config_reads_every_section(tmp_path):
    path = write(
        tmp_path,
        """
[run]
name = "exp1"
seed = 7

[data]
dataset = "synthetic_faces"
samples_per_node = 50
image_size = 16

[model]
width = 4
privatization = 2
stem = "imagenet"

[training]
rounds = 3
local_epochs = 1
batch_size = 8

[training.landmarks]
name = "adam"
lr = 0.002
lr_decay = 0.5

[federation]
scheme = "fedper"
topology = "ring"

[clustering]
k = 2
alpha = 0.2
beta = 0.3
gamma = 0.5

[hca]
alpha = 0.1
psi = 0.5
"""
        + NODES,
    )
    cfg = load_config(path)
    assert cfg.run.name == "exp1" and cfg.run.seed == 7
    assert cfg.data.samples_per_node == 50 and cfg.data.image_size == 16
    assert (cfg.model.width, cfg.model.privatization, cfg.model.stem) == (4, 2, "imagenet")
    assert (cfg.training.rounds, cfg.training.local_epochs, cfg.training.batch_size) == (3, 1, 8)
    assert cfg.training.landmarks.lr == 0.002 and cfg.training.landmarks.lr_decay == 0.5
    assert cfg.training.optimizer_for("landmarks") is cfg.training.landmarks
    assert (cfg.federation.scheme, cfg.federation.topology) == ("fedper", "ring")
    assert (cfg.clustering.alpha, cfg.clustering.beta, cfg.clustering.gamma) == (0.2, 0.3, 0.5)
    assert (cfg.hca.alpha, cfg.hca.psi) == (0.1, 0.5)
    assert cfg.world_size == 4


def test_integer_given_for_float_becomes_float(tmp_path):
    cfg = load_config(write(tmp_path, "[hca]\npsi = 1\n" + NODES))
    assert cfg.hca.psi == 1.0 and isinstance(cfg.hca.psi, float)


@pytest.mark.parametrize(
    "name",
    [
        "quickstart.toml",
        "digits_label_het.toml",
        "faces_task_het.toml",
        "cifar10_label_het.toml",
        "celeba_task_het.toml",
    ],
)
def test_shipped_configs_load_and_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.world_size == 6
    tasks = dataset_tasks(cfg.data.dataset)
    assert all(node.task in tasks for node in cfg.nodes)
    assert isinstance(cfg.clustering.k, int) and cfg.clustering.k <= cfg.world_size
    # and the resolved text stored in results files reads back to the same config
    assert config_from_toml(to_toml(cfg)) == cfg


# ---------------------------------------------------------------------------------------------
# Node list


def test_count_expands_to_numbered_names(tmp_path):
    cfg = load_config(write(tmp_path, '[[nodes]]\ntask = "attributes"\ncount = 3\n'))
    assert [n.name for n in cfg.nodes] == ["attributes-0", "attributes-1", "attributes-2"]
    assert all(n.task == "attributes" for n in cfg.nodes)


def test_numbering_is_per_task_and_explicit_names_kept(tmp_path):
    text = NODES + '\n[[nodes]]\ntask = "attributes"\nname = "alice"\n'
    cfg = load_config(write(tmp_path, text))
    assert [n.name for n in cfg.nodes] == [
        "attributes-0",
        "attributes-1",
        "landmarks-0",
        "landmarks-1",
        "alice",
    ]
    assert [n.task for n in cfg.nodes] == ["attributes"] * 2 + ["landmarks"] * 2 + ["attributes"]


def test_duplicate_node_names_are_refused(tmp_path):
    text = (
        '[[nodes]]\ntask = "attributes"\nname = "x"\n\n[[nodes]]\ntask = "landmarks"\nname = "x"\n'
    )
    raises_naming(["nodes[1].name", "'x'", "unique"], load_config, write(tmp_path, text))


def test_unknown_key_in_nodes(tmp_path):
    text = '[[nodes]]\ntask = "attributes"\ncolour = "red"\n'
    raises_naming(["nodes[0].colour", "count", "name", "task"], load_config, write(tmp_path, text))


@pytest.mark.parametrize("count", ["0", "-1", "1.5", "true", '"two"'])
def test_bad_node_count(tmp_path, count):
    text = f'[[nodes]]\ntask = "attributes"\ncount = {count}\n'
    raises_naming(["nodes[0].count", ">= 1"], load_config, write(tmp_path, text))


def test_node_without_task(tmp_path):
    raises_naming(["nodes[0].task"], load_config, write(tmp_path, '[[nodes]]\nname = "a"\n'))


def test_name_with_count_above_one_is_refused(tmp_path):
    text = '[[nodes]]\ntask = "attributes"\nname = "a"\ncount = 2\n'
    raises_naming(["nodes[0].name", "count = 1"], load_config, write(tmp_path, text))


def test_nodes_must_be_array_of_tables(tmp_path):
    raises_naming(["nodes"], load_config, write(tmp_path, 'nodes = "attributes"\n'))


def test_unknown_task_for_dataset_lists_the_tasks(tmp_path):
    text = '[data]\ndataset = "digits"\n' + NODES  # attributes/landmarks are face tasks
    message = raises_naming(
        ["nodes[0].task", "'attributes'", "'digits'"], load_config, write(tmp_path, text)
    )
    for task in dataset_tasks("digits"):
        assert task in message


# ---------------------------------------------------------------------------------------------
# Sections, keys and types


def test_unknown_section_lists_the_sections(tmp_path):
    message = raises_naming(
        ["'optimizer'"], load_config, write(tmp_path, "[optimizer]\nlr = 1\n" + NODES)
    )
    for section in ("run", "data", "model", "training", "federation", "clustering", "hca", "nodes"):
        assert section in message


def test_unknown_key_in_section_lists_the_keys(tmp_path):
    message = raises_naming(
        ["training.epochs", "rounds", "local_epochs", "batch_size"],
        load_config,
        write(tmp_path, "[training]\nepochs = 3\n" + NODES),
    )
    assert "[training]" in message


def test_unknown_key_in_nested_table(tmp_path):
    text = "[training.single_label]\nlearning_rate = 0.1\n" + NODES
    raises_naming(
        ["training.single_label.learning_rate", "lr", "momentum"],
        load_config,
        write(tmp_path, text),
    )


def test_section_that_is_not_a_table(tmp_path):
    raises_naming(["model"], load_config, write(tmp_path, "model = 3\n" + NODES))


@pytest.mark.parametrize(
    ("section", "line", "key", "expected"),
    [
        ("training", 'rounds = "x"', "training.rounds", "int"),
        ("training", "rounds = true", "training.rounds", "int"),
        ("training", "rounds = 2.5", "training.rounds", "int"),
        ("model", "width = false", "model.width", "int"),
        ("run", "name = 5", "run.name", "str"),
        ("run", "deterministic = 1", "run.deterministic", "bool"),
        ("run", 'keep_heap = "yes"', "run.keep_heap", "bool"),
        ("hca", 'psi = "big"', "hca.psi", "float"),
        ("hca", "psi = true", "hca.psi", "float"),
        ("clustering", "k = 2.0", "clustering.k", "int"),
        ("training", "single_label = 3", "training.single_label", "table"),
    ],
)
def test_wrong_type(tmp_path, section, line, key, expected):
    text = f"[{section}]\n{line}\n" + NODES
    message = raises_naming([key], load_config, write(tmp_path, text))
    assert expected in message


@pytest.mark.parametrize(
    ("section", "line", "key", "allowed"),
    [
        (
            "federation",
            'scheme = "fedprox"',
            "federation.scheme",
            ["colnet", "none", "intra", "fedper"],
        ),
        ("federation", 'topology = "star"', "federation.topology", ["full", "ring"]),
        ("federation", 'intra_weights = "x"', "federation.intra_weights", ["equal", "samples"]),
        ("federation", 'cuda_aware = "maybe"', "federation.cuda_aware", ["auto", "yes", "no"]),
        ("federation", 'shared_memory = "yes"', "federation.shared_memory", ["auto", "no"]),
        ("model", "privatization = 3", "model.privatization", ["0", "1", "2"]),
        ("model", 'stem = "vit"', "model.stem", ["auto", "cifar", "imagenet"]),
        ("clustering", 'jacobian = "fd"', "clustering.jacobian", ["exact", "hutchinson"]),
        ("clustering", 'cosine = "x"', "clustering.cosine", ["centered", "raw"]),
        (
            "clustering",
            'record_affinity = "x"',
            "clustering.record_affinity",
            ["auto", "yes", "no"],
        ),
        (
            "training.multi_label",
            'name = "lbfgs"',
            "training.multi_label.name",
            ["sgd", "adam", "adamw"],
        ),
    ],
)
def test_bad_choice_names_key_and_allowed_values(tmp_path, section, line, key, allowed):
    message = raises_naming(
        [key, *allowed], load_config, write(tmp_path, f"[{section}]\n{line}\n" + NODES)
    )
    bad = line.split("=", 1)[1].strip().strip('"')
    assert bad in message


@pytest.mark.parametrize(
    ("section", "line", "key"),
    [
        ("training", "rounds = 0", "training.rounds"),
        ("training", "batch_size = -4", "training.batch_size"),
        ("training", "grad_clip = -1.0", "training.grad_clip"),
        ("training", "epoch_seconds = -0.5", "training.epoch_seconds"),
        ("training", "epoch_seconds = inf", "training.epoch_seconds"),
        ("training", "epoch_seconds = 1e9", "training.epoch_seconds"),
        ("training", "steps_per_epoch = -1", "training.steps_per_epoch"),
        ("training", "steps_per_epoch = 10_000_000", "training.steps_per_epoch"),
        ("training.single_label", "lr = 0.0", "training.single_label.lr"),
        ("training.single_label", "lr = nan", "training.single_label.lr"),
        ("training.single_label", "lr = inf", "training.single_label.lr"),
        ("training.landmarks", "lr_decay = 1.5", "training.landmarks.lr_decay"),
        ("model", "width = 0", "model.width"),
        ("data", "image_size = 4", "data.image_size"),
        ("data", "samples_per_node = -1", "data.samples_per_node"),
        ("run", "seed = -1", "run.seed"),
        ("run", 'name = "a b"', "run.name"),
        ("run", 'name = ""', "run.name"),
        ("run", "host_slots = -1", "run.host_slots"),
        ("run", "host_slots = 5000", "run.host_slots"),
        ("hca", "alpha = 1.0", "hca.alpha"),
        ("hca", "psi = -0.5", "hca.psi"),
        ("clustering", "k = 0", "clustering.k"),
        ("clustering", 'k = "many"', "clustering.k"),
        ("clustering", "tau_loss = 0.0", "clustering.tau_loss"),
    ],
)
def test_out_of_range_values(tmp_path, section, line, key):
    raises_naming(
        [key, "not allowed"], load_config, write(tmp_path, f"[{section}]\n{line}\n" + NODES)
    )


def test_fusion_weights_must_sum_to_one(tmp_path):
    text = "[clustering]\nalpha = 0.5\nbeta = 0.5\ngamma = 0.5\n" + NODES
    message = raises_naming(
        ["alpha", "beta", "gamma", "sum to 1"], load_config, write(tmp_path, text)
    )
    assert "1.5" in message


def test_fusion_weights_summing_to_one_are_accepted(tmp_path):
    cfg = load_config(
        write(tmp_path, "[clustering]\nalpha = 1.0\nbeta = 0.0\ngamma = 0.0\n" + NODES)
    )
    assert (cfg.clustering.alpha, cfg.clustering.beta, cfg.clustering.gamma) == (1.0, 0.0, 0.0)


def test_k_larger_than_node_count_is_refused(tmp_path):
    # NODES has 4 nodes
    raises_naming(
        ["clustering.k", "5", "4 nodes"],
        load_config,
        write(tmp_path, "[clustering]\nk = 5\n" + NODES),
    )
    cfg = load_config(write(tmp_path, "[clustering]\nk = 4\n" + NODES))
    assert cfg.clustering.k == 4


def test_k_auto_is_accepted(tmp_path):
    cfg = load_config(write(tmp_path, '[clustering]\nk = "auto"\nk_max = 3\n' + NODES))
    assert cfg.clustering.k == "auto" and cfg.clustering.k_max == 3


def test_unknown_dataset_lists_the_datasets(tmp_path):
    message = raises_naming(
        ["data.dataset", "'imagenet21k'"],
        load_config,
        write(tmp_path, '[data]\ndataset = "imagenet21k"\n' + NODES),
    )
    for name in known_datasets():
        assert name in message


def test_missing_file(tmp_path):
    raises_naming(["nope.toml", "does not exist"], load_config, tmp_path / "nope.toml")


def test_invalid_toml(tmp_path):
    raises_naming(
        ["bad.toml", "not valid TOML"], load_config, write(tmp_path, "[run\nname = ", "bad.toml")
    )


# ---------------------------------------------------------------------------------------------
# --set overrides


def test_parse_override_values():
    assert parse_override("training.rounds=10") == (["training", "rounds"], 10)
    assert parse_override(" training.single_label.lr = 0.1 ") == (
        ["training", "single_label", "lr"],
        0.1,
    )
    assert parse_override("federation.scheme=fedper") == (["federation", "scheme"], "fedper")
    assert parse_override('federation.scheme="ring"') == (["federation", "scheme"], "ring")
    assert parse_override("run.deterministic=false") == (["run", "deterministic"], False)
    assert parse_override("run.output=a=b.h5") == (["run", "output"], "a=b.h5")


@pytest.mark.parametrize("text", ["training.rounds", "rounds=3", ".rounds=3", "training.=3"])
def test_bad_override_is_refused(text):
    raises_naming([text], parse_override, text)


def test_override_without_equals_names_the_form():
    raises_naming(
        ["training.rounds", "section.key=value"], apply_overrides, {}, ["training.rounds"]
    )


def test_overrides_do_not_touch_the_input():
    raw = {"training": {"rounds": 3}}
    out = apply_overrides(raw, ["training.rounds=9", "model.width=2"])
    assert out == {"training": {"rounds": 9}, "model": {"width": 2}}
    assert raw == {"training": {"rounds": 3}}


def test_override_cannot_change_nodes():
    raises_naming(["nodes"], apply_overrides, {}, ["nodes.count=3"])


def test_override_into_a_value_that_is_not_a_table():
    raises_naming(
        ["'rounds'", "not a table"],
        apply_overrides,
        {"training": {"rounds": 3}},
        ["training.rounds.x=1"],
    )


def test_load_config_applies_overrides(tmp_path):
    path = write(tmp_path, "[training]\nrounds = 3\n" + NODES)
    cfg = load_config(
        path,
        [
            "training.rounds=10",
            "model.privatization=2",
            "federation.scheme=fedper",  # bare word: a string
            "training.single_label.lr=0.1",  # nested table that the file does not have
            "clustering.k=auto",
        ],
    )
    assert cfg.training.rounds == 10
    assert cfg.model.privatization == 2
    assert cfg.federation.scheme == "fedper"
    assert cfg.training.single_label.lr == 0.1
    assert cfg.clustering.k == "auto"
    assert load_config(path).training.rounds == 3  # the file itself is unchanged


def test_overrides_are_validated(tmp_path):
    path = write(tmp_path, NODES)
    raises_naming(
        ["federation.scheme", "'star'", "colnet"], load_config, path, ["federation.scheme=star"]
    )
    raises_naming(["training.rounds", "int"], load_config, path, ["training.rounds=x"])
    raises_naming(["training.round"], load_config, path, ["training.round=3"])
    raises_naming(["'federatoin'"], load_config, path, ["federatoin.scheme=fedper"])


def test_partial_optimizer_table_keeps_the_kind_defaults(tmp_path):
    from colnet_mpi.config import TrainingConfig

    defaults = TrainingConfig()
    path = write(tmp_path, NODES)
    cfg = load_config(path, ["training.multi_label.lr=0.1", "training.single_label.lr=0.2"])
    assert cfg.training.multi_label == dataclasses.replace(defaults.multi_label, lr=0.1)
    assert cfg.training.single_label == dataclasses.replace(defaults.single_label, lr=0.2)


# ---------------------------------------------------------------------------------------------
# Round trip, output path, stem


def test_to_toml_round_trip(tmp_path):
    path = write(
        tmp_path,
        """
[run]
name = "rt"
seed = 3
output = 'out\\dir "q"/x.h5'

[data]
root = "/data/faces"

[model]
width = 4
stem = "cifar"

[training.multi_label]
lr = 1e-5

[federation]
scheme = "intra"
local_bn = true

[clustering]
k = "auto"
alpha = 0.6
beta = 0.3
gamma = 0.1
"""
        + NODES
        + '\n[[nodes]]\ntask = "landmarks"\nname = "Zoë"\n',
    )
    cfg = load_config(path, ["hca.psi=0.25"])
    text = to_toml(cfg)
    again = config_from_toml(text)
    assert again == cfg
    assert again.run.output == 'out\\dir "q"/x.h5'
    assert again.clustering.k == "auto"
    assert again.nodes[-1] == NodeConfig(name="Zoë", task="landmarks")
    # every section is written out, nodes expanded (no count left)
    for section in (
        "run",
        "data",
        "model",
        "training",
        "training.single_label",
        "federation",
        "clustering",
        "hca",
    ):
        assert re.search(rf"^\[{re.escape(section)}\]$", text, re.M), section
    assert text.count("[[nodes]]") == cfg.world_size
    assert "count" not in text


def test_round_trip_of_defaults():
    cfg = Config(nodes=two_nodes())
    assert config_from_toml(to_toml(cfg)) == cfg


def test_output_path():
    assert RunConfig(name="abc").output_path() == Path("results") / "abc.h5"
    assert RunConfig(name="abc", output="x/y.h5").output_path() == Path("x/y.h5")


def test_output_path_from_file(tmp_path):
    cfg = load_config(write(tmp_path, '[run]\nname = "myrun"\n' + NODES))
    assert cfg.run.output_path() == Path("results/myrun.h5")


@pytest.mark.parametrize(
    ("stem", "size", "expected"),
    [
        ("auto", 8, "cifar"),
        ("auto", 32, "cifar"),
        ("auto", 64, "cifar"),
        ("auto", 65, "imagenet"),
        ("auto", 224, "imagenet"),
        ("cifar", 224, "cifar"),
        ("imagenet", 32, "imagenet"),
    ],
)
def test_resolved_stem(stem, size, expected):
    assert ModelConfig(stem=stem).resolved_stem(size) == expected


def test_round_trip_of_strings_with_control_characters():
    cfg = Config(data=DataConfig(root="/data/a\nb\tc\x01"), nodes=two_nodes())
    assert config_from_toml(to_toml(cfg)) == cfg


# -- [attack] and [defense] ---------------------------------------------------------------------
QUICK = REPO / "configs" / "quickstart.toml"


def test_attack_and_defense_default_off():
    config = load_config(QUICK)
    assert config.attack.kind == "none" and not config.attack.active(0, 1)
    assert not config.defense.enabled


def test_attack_nodes_list_round_trips_through_toml():
    config = load_config(
        QUICK,
        [
            "attack.kind=boost",
            "attack.nodes=[0, 4]",
            "attack.start_round=3",
            "defense.aggregation=trimmed_mean",
            "defense.screening=true",
        ],
    )
    assert config.attack.nodes == (0, 4)
    assert config.attack.active(4, 3) and not config.attack.active(4, 2)
    assert not config.attack.active(1, 3)
    assert config.defense.enabled
    assert "nodes = [0, 4]" in to_toml(config)
    assert config_from_toml(to_toml(config)) == config


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("attack.kind=poison", ["attack.kind", "'label_flip'", "'manipulate'"]),
        ("attack.nodes=2", ["attack.nodes", "expected a list"]),
        ('attack.nodes=["a"]', ["attack.nodes[0]", "expected int"]),
        ("attack.nodes=[1, 1]", ["attack.nodes", "twice"]),
        ("attack.nodes=[-1]", ["attack.nodes", ">= 0"]),
        ("attack.flip_probability=1.5", ["attack.flip_probability", "0..1"]),
        ("attack.buffer_fault=zero", ["attack.buffer_fault", "'short'"]),
        ("attack.manipulation=flip", ["attack.manipulation", "'noise'"]),
        ("defense.aggregation=krum", ["defense.aggregation", "'median'", "'norm_clipped_mean'"]),
        ("defense.trim=0.5", ["defense.trim", "trim < 0.5"]),
        ("defense.norm_ratio=1", ["defense.norm_ratio", "> 1"]),
        ("defense.min_cosine=2", ["defense.min_cosine", "-1..1"]),
        ("defense.norm_action=drop", ["defense.norm_action", "'exclude'", "'clip'"]),
    ],
)
def test_attack_and_defense_errors_name_the_key(override, fragments):
    raises_naming(fragments, load_config, QUICK, [override])


def test_attacker_must_exist():
    raises_naming(
        ["attack.nodes", "node 6 does not", "0..5"],
        load_config,
        QUICK,
        ["attack.kind=label_flip", "attack.nodes=[6]"],
    )


@pytest.mark.parametrize(
    ("name", "dataset", "tasks"),
    [
        ("cifar10_label_het.toml", "cifar10", ["animals"] * 3 + ["objects"] * 3),
        ("celeba_task_het.toml", "celeba", ["attributes"] * 3 + ["landmarks"] * 3),
    ],
)
def test_real_dataset_configs_have_the_papers_settings(name, dataset, tasks):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.data.dataset == dataset and cfg.data.root
    assert [n.task for n in cfg.nodes] == tasks
    assert (cfg.model.width, cfg.model.privatization) == (64, 1)
    assert (cfg.training.rounds, cfg.training.local_epochs, cfg.training.batch_size) == (15, 2, 64)
    assert cfg.training.grad_clip == 1.0 and cfg.federation.scheme == "colnet"
    assert (cfg.hca.alpha, cfg.clustering.k) == (0.4, 2)
    t = cfg.training
    if dataset == "cifar10":
        assert cfg.model.stem == "cifar" and cfg.data.image_size in (0, 32)
        opt = t.single_label
        assert (opt.name, opt.lr, opt.momentum, opt.weight_decay) == ("sgd", 0.01, 0.9, 1e-3)
    else:
        assert cfg.model.stem == "imagenet" and cfg.data.image_size == 0  # native 218x178
        a, m = t.multi_label, t.landmarks
        assert (a.name, a.lr, a.weight_decay, a.lr_decay) == ("adamw", 5e-5, 5e-3, 0.95)
        assert (m.name, m.lr, m.lr_decay) == ("adam", 5e-4, 0.9)


UPPER_BOUNDS = {
    "run.seed": 2**63 - 1,
    "model.width": 1024,
    "data.samples_per_node": 10**8,
    "data.test_samples": 10**8,
    "data.workers": 64,
    "training.rounds": 100_000,
    "training.local_epochs": 10_000,
    "training.batch_size": 65_536,
    "training.eval_batch_size": 65_536,
}


@pytest.mark.parametrize("key", sorted(UPPER_BOUNDS))
def test_sizes_have_upper_bounds_with_a_reason(key: str) -> None:
    quick = Path(__file__).resolve().parents[2] / "configs" / "quickstart.toml"
    limit = UPPER_BOUNDS[key]
    section, name = key.split(".")
    at_limit = load_config(quick, [f"{key}={limit}"])
    assert getattr(getattr(at_limit, section), name) == limit
    message = raises_naming(
        [key, str(limit + 1), f"at most {limit:,}", "("], load_config, quick, [f"{key}={limit + 1}"]
    )
    assert message.endswith(")"), message  # the reason for the bound


# ---------------------------------------------------------------------------------------------
# The torch-free catalog that validation reads must say what the builders say.


def test_catalog_matches_the_builders() -> None:
    from colnet_mpi.data import base, catalog, celeba, cifar10, faces

    for name in known_datasets():
        assert catalog.task_names(name) == tuple(dataset_tasks(name)), name
    assert (catalog.MIN_IMAGE_SIZE, catalog.MAX_IMAGE_SIZE) == (
        base.MIN_IMAGE_SIZE,
        base.MAX_IMAGE_SIZE,
    )
    assert catalog.MIN_FACE_IMAGE_SIZE == faces.MIN_FACE_IMAGE_SIZE
    assert catalog.CIFAR10_IMAGE_SIZE == cifar10.CIFAR10_IMAGE_SIZE
    layout = catalog.DISK_LAYOUTS["cifar10"]
    assert (layout.folder, layout.files, layout.dirs) == (
        cifar10.FOLDER,
        cifar10.EXPECTED_FILES,
        (),
    )
    layout = catalog.DISK_LAYOUTS["celeba"]
    expected = (celeba.ATTR_FILE, celeba.LANDMARK_FILE, celeba.PARTITION_FILE)
    assert (layout.folder, layout.files, layout.dirs) == (
        celeba.FOLDER,
        expected,
        (celeba.IMAGE_DIR,),
    )


@pytest.mark.parametrize("dataset", ["cifar10", "celeba"])
@pytest.mark.parametrize(
    "layout",
    ["missing", "root-is-file", "empty", "complete", "folder-itself", "holds-entry", "incomplete"],
)
def test_data_root_check_agrees_with_the_builders(tmp_path: Path, dataset: str, layout: str):
    """sweep --check (catalog.data_root_problem) and the run (find_folder) accept the same roots."""
    from colnet_mpi.data import catalog, celeba, cifar10

    spec = catalog.DISK_LAYOUTS[dataset]
    root = tmp_path / "root"

    def fill(folder: Path, skip: int = 0) -> None:
        for d in spec.dirs:
            (folder / d).mkdir(parents=True)
        folder.mkdir(parents=True, exist_ok=True)
        for f in spec.files[skip:]:
            (folder / f).write_bytes(b"")

    if layout == "root-is-file":
        root.write_text("x")
    elif layout == "empty":
        root.mkdir()
    elif layout == "complete":
        fill(root / spec.folder)
    elif layout == "folder-itself":
        root = tmp_path / spec.folder
        fill(root)
    elif layout == "holds-entry":
        root.mkdir()
        (root / spec.files[-1]).write_bytes(b"")
    elif layout == "incomplete":
        fill(root / spec.folder, skip=1)
    problem = catalog.data_root_problem(dataset, str(root))
    finder = cifar10.find_folder if dataset == "cifar10" else celeba.find_folder
    try:
        finder(str(root))
    except FileNotFoundError:
        assert problem is not None and "data.root" in problem and str(root) in problem
    else:
        assert problem is None
    assert (problem is None) == (layout in ("complete", "folder-itself"))


@pytest.mark.parametrize(
    ("dataset", "size", "fine"),
    [
        ("digits", 8, True),
        ("digits", 7, False),
        ("digits", 512, True),
        ("digits", 513, False),
        ("synthetic_faces", 16, True),
        ("synthetic_faces", 15, False),
        ("synthetic_faces", 0, False),
        ("cifar10", 0, True),
        ("cifar10", 64, False),
        ("celeba", 0, True),
        ("celeba", 512, True),
        ("celeba", 513, False),
        ("celeba", 4, False),
    ],
)
def test_image_size_rule_matches_what_the_datasets_build(dataset: str, size: int, fine: bool):
    from colnet_mpi.data import DataSizes
    from colnet_mpi.data.catalog import image_size_problem

    assert (image_size_problem(dataset, size) is None) == fine
    if fine:
        DataSizes(image_size=size)  # the builders' own bounds take it too
