"""Configuration: presets, overrides, typed errors that name the key, batch arithmetic."""

from __future__ import annotations

import dataclasses

import pytest

from albert_scale.config import CONFIG_DIR, Config, ConfigError, check, load_config, parse_override

pytestmark = pytest.mark.unit

PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))

# The paper's sizes (ALBERT v2): layers, hidden, heads, FFN.
PAPER_SIZES = {
    "albert-base": (12, 768, 12, 3072),
    "albert-large": (24, 1024, 16, 4096),
    "albert-xlarge": (24, 2048, 16, 8192),
    "albert-xxlarge": (12, 4096, 64, 16384),
}


def test_presets_are_shipped():
    assert {"tiny", "quickstart", *PAPER_SIZES} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_checks(name):
    config = load_config(name)
    plan = check(config, world_size=1)
    assert plan.global_batch_size == config.train.global_batch_size
    assert load_config(CONFIG_DIR / f"{name}.yaml") == config


@pytest.mark.parametrize("name", sorted(PAPER_SIZES))
def test_paper_presets_carry_the_recipe(name):
    c = load_config(name)
    layers, hidden, heads, ffn = PAPER_SIZES[name]
    m = c.model
    assert (m.num_hidden_layers, m.hidden_size, m.num_attention_heads, m.intermediate_size) == (
        layers,
        hidden,
        heads,
        ffn,
    )
    assert (m.vocab_size, m.embedding_size, m.max_position_embeddings, m.type_vocab_size) == (
        30000,
        128,
        512,
        2,
    )
    assert m.hidden_act == "gelu_new" and m.hidden_dropout_prob == 0 and m.attention_probs_dropout_prob == 0
    assert m.initializer_range == 0.02 and m.layer_norm_eps == 1e-12
    assert c.train.global_batch_size == 4096 and c.data.max_seq_length == 512
    assert c.optim.name == "lamb" and c.optim.lr == 0.00176 and c.optim.weight_decay == 0.01
    assert c.optim.max_grad_norm == 1.0 and c.optim.eps == 1e-6
    assert c.schedule.warmup_steps == 3125 and c.schedule.total_steps == 125000
    assert c.schedule.decay == "linear" and c.schedule.end_lr == 0.0
    assert c.data.max_predictions_per_seq == 77 and c.data.masked_lm_prob == 0.15


def test_defaults_are_the_xxlarge_recipe():
    assert dataclasses.asdict(Config().model) == dataclasses.asdict(load_config("albert-xxlarge").model)


def test_precedence_command_line_over_file_over_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.5\n  weight_decay: 0.2\n")
    c = load_config(path, ["optim.lr=1e-3"])
    assert c.optim.lr == 0.001  # command line
    assert c.optim.weight_decay == 0.2  # file
    assert c.optim.beta2 == 0.999  # default


@pytest.mark.parametrize(
    ("override", "path", "expected"),
    [
        ("optim.lr=1e-3", ("optim", "lr"), 0.001),
        ("optim.lr=2", ("optim", "lr"), 2.0),
        ("zero.stage=3", ("zero", "stage"), 3),
        ("zero.reduce_bucket_size=5e8", ("zero", "reduce_bucket_size"), 500_000_000),
        ("zero.reduce_bucket_size=200_000_000", ("zero", "reduce_bucket_size"), 200_000_000),
        ("train.activation_checkpointing=false", ("train", "activation_checkpointing"), False),
        ("train.precision=fp16", ("train", "precision"), "fp16"),
        ("model.hidden_act=gelu", ("model", "hidden_act"), "gelu"),
    ],
)
def test_override_values_are_typed(override, path, expected):
    c = load_config("tiny", [override])
    value = getattr(getattr(c, path[0]), path[1])
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=1"], "unknown key optim.lrr (did you mean optim.lr?)"),
        (["optimizer.lr=1"], "unknown key optimizer"),
        (["model.hidden=3"], "unknown key model.hidden"),
        (["optim.lr=fast"], "optim.lr='fast': expected a number"),
        (["optim.lr=-1"], "optim.lr=-1.0: must be > 0"),
        (["train.micro_batch_size=2.5"], "train.micro_batch_size=2.5: expected an integer"),
        (["train.micro_batch_size=true"], "train.micro_batch_size=True: expected an integer"),
        (
            ["train.activation_checkpointing=maybe"],
            "train.activation_checkpointing='maybe': expected true or false",
        ),
        (["zero.stage=4"], "zero.stage=4: expected one of 0, 1, 2, 3"),
        (["train.precision=fp8"], "train.precision='fp8': expected one of fp32, bf16, fp16"),
        (["model.hidden_act=tanh"], "model.hidden_act='tanh': expected one of"),
        (["model.num_attention_heads=5"], "model.hidden_size=32: not divisible by num_attention_heads=5"),
        (["model.num_hidden_groups=9"], "model.num_hidden_groups=9: more groups than num_hidden_layers=4"),
        (["schedule.warmup_steps=50"], "schedule.warmup_steps=50: must be in [0, total_steps=20]"),
        (
            ["data.max_predictions_per_seq=100"],
            "data.max_predictions_per_seq=100: must be in [1, max_seq_length=64]",
        ),
        (["optim=3"], "optim: expected a mapping"),
        (["optim.lr.x=3"], "optim.lr is a value, not a section"),
        (["lr"], "override 'lr': expected key=value"),
        (["=3"], "expected key=value"),
    ],
)
def test_bad_values_name_the_key_and_the_value(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    assert message in str(err.value)


def test_batch_arithmetic():
    c = load_config("albert-xxlarge")
    plan = check(c, world_size=64)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps, plan.global_batch_size) == (16, 4, 4096)
    assert plan.tokens_per_step == 4096 * 512
    with pytest.raises(
        ConfigError,
        match=r"train.global_batch_size=4096: not divisible by "
        r"train.micro_batch_size=16 x data-parallel size 3 = 48",
    ):
        check(c, world_size=3)


def test_world_size_comes_from_the_launcher_then_the_cluster_section(monkeypatch):
    c = load_config("tiny", ["cluster.num_workers=2"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert check(c).world_size == 2
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert check(c).world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'"):
        check(c)


def test_sequence_longer_than_positions_is_rejected():
    with pytest.raises(
        ConfigError, match=r"data.max_seq_length=128: longer than model.max_position_embeddings=64"
    ):
        check(load_config("tiny", ["data.max_seq_length=128"]))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file and no such preset"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(scalar)


def test_parse_override_keeps_strings_and_lists():
    assert parse_override("a.b=hello") == ("a.b", "hello")
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=") == ("a.b", "")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    c = load_config("quickstart", ["optim.lr=3e-3", "zero.stage=1"])
    path = tmp_path / "resolved.yaml"
    path.write_text(c.to_yaml())
    assert load_config(path) == c
