"""The sampling.* and reward.* config groups: one declaration, per-stage defaults, the `reward: gold` shorthand,
old flat keys refused with their new name, one validation, and `--help` headed by group."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import alignkit.config as C
from alignkit.cli import STAGES, stage_help

SAMPLING_STAGES = ("label", "best-of-n", "raft", "ppo", "grpo", "rrhf", "eval")


def test_every_sampling_stage_declares_the_same_group_once():
    for stage in SAMPLING_STAGES:
        cls = STAGES[stage][1]
        keys = [k for k, *_ in C.field_help(cls)]
        assert {"sampling.temperature", "sampling.max_new_tokens", "sampling.chunk"} <= set(keys), stage
        flat = {"temperature", "max_new_tokens", "sample_chunk", "reward_model", "reward_batch_size", "task", "top_p"}
        assert not flat & set(keys), (stage, flat & set(keys))
    # one class per group, not copies: the dataclass field types
    assert {type(STAGES[s][1]().sampling).__mro__[-2] for s in SAMPLING_STAGES} == {C.SamplingConfig}


def test_per_stage_group_defaults_survive_loading_and_help():
    label = C.load_config(C.LabelConfig)
    assert label.sampling.chunk == 64 and label.reward.batch_size == 64  # label's own defaults
    assert C.load_config(C.PPOConfig, overrides=["reward=gold"]).sampling.chunk == 32
    assert C.load_config(C.RRHFConfig).reward.source == "given"
    helped = {k: d for k, _, d, _ in C.field_help(C.LabelConfig)}
    assert helped["sampling.chunk"] == 64
    # an override of one group key keeps the stage's other defaults of that group
    assert C.load_config(C.LabelConfig, overrides=["sampling.temperature=0.5"]).sampling.chunk == 64


def test_reward_scalar_is_short_for_reward_source(tmp_path: Path):
    cfg = C.load_config(C.PPOConfig, overrides=["reward=gold", "reward.task=sort"])
    assert (cfg.reward.source, cfg.reward.task) == ("gold", "sort")
    path = tmp_path / "ppo.yaml"
    path.write_text("reward: gold\nsampling:\n  temperature: 0.7\n")
    cfg = C.load_config(C.PPOConfig, path, ["reward.task=reverse"])
    assert (cfg.reward.source, cfg.reward.task, cfg.sampling.temperature) == ("gold", "reverse", 0.7)
    # the resolved config saves nested and loads back equal
    C.save_config(cfg, tmp_path / "saved.yaml")
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["reward"]["source"] == "gold"
    assert C.load_config(C.PPOConfig, tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("old, new", [
    ("temperature=0.5", "sampling.temperature"),
    ("max_new_tokens=8", "sampling.max_new_tokens"),
    ("sample_chunk=4", "sampling.chunk"),
    ("reward_model=rm/final", "reward.model"),
    ("reward_batch_size=8", "reward.batch_size"),
    ("task=sort", "reward.task"),
])
def test_old_flat_keys_name_their_group_key(old: str, new: str):
    with pytest.raises(C.ConfigError, match=rf"unknown config key '{old.split('=')[0]}'; did you mean '{new}'\?"):
        C.load_config(C.PPOConfig, overrides=["reward=gold", old])


def test_eval_old_keys_and_a_typo_inside_a_group():
    with pytest.raises(C.ConfigError, match="did you mean 'reward.models'"):
        C.load_config(C.EvalConfig, overrides=["models=[a]", "reward_models=[x]"])
    with pytest.raises(C.ConfigError, match="did you mean 'sampling.top_p'"):
        C.load_config(C.EvalConfig, overrides=["models=[a]", "top_p=0.9"])
    with pytest.raises(C.ConfigError, match="did you mean 'sampling.temperature'"):
        C.load_config(C.PPOConfig, overrides=["reward=gold", "sampling.temprature=1"])


def test_group_errors_name_the_file_line(tmp_path: Path):
    path = tmp_path / "raft.yaml"
    path.write_text("model: m\nsampling:\n  chunk: 0\nreward: gold\n")
    with pytest.raises(C.ConfigError, match=r"raft\.yaml:3: sampling\.chunk must be >= 1, got 0"):
        C.load_config(C.RAFTConfig, path)
    path.write_text("model: m\nreward: judge\n")
    with pytest.raises(C.ConfigError, match=r"raft\.yaml:2: reward\.source must be one of rm, gold, got 'judge'"):
        C.load_config(C.RAFTConfig, path)


@pytest.mark.parametrize("overrides, message", [
    (["reward=rm"], "reward=rm needs reward.model"),
    (["reward=gold", "sampling.temperature=-1"], "sampling.temperature must be >= 0"),
    (["reward=gold", "sampling.max_new_tokens=0"], "sampling.max_new_tokens must be >= 1"),
    (["reward=gold", "reward.batch_size=0"], "reward.batch_size must be >= 1"),
    (["reward=gold", "sampling=3"], "expected a mapping of sampling.* keys"),
])
def test_groups_are_validated_once_for_every_stage(overrides: list[str], message: str):
    for cls in (C.PPOConfig, C.BestOfNConfig, C.RAFTConfig):
        with pytest.raises(C.ConfigError, match=message):
            C.load_config(cls, overrides=overrides)


def test_rrhf_ranks_by_its_own_sources():
    assert C.load_config(C.RRHFConfig, overrides=["reward=gold"]).reward.source == "gold"
    with pytest.raises(C.ConfigError, match="reward.source must be one of given, gold, rm"):
        C.load_config(C.RRHFConfig, overrides=["reward=best"])


def test_stages_that_train_nothing_have_no_training_keys():
    for cls in (C.LabelConfig, C.EvalConfig, C.SelectConfig):
        keys = {k for k, *_ in C.field_help(cls)}
        assert not keys & {"lr", "max_steps", "batch_size", "micro_batch_size", "warmup_steps", "lora.r"}, cls
    with pytest.raises(C.ConfigError, match="unknown config key 'lr'"):
        C.load_config(C.LabelConfig, overrides=["lr=1e-4"])


def test_help_heads_each_group():
    text = stage_help("ppo")
    lines = text.splitlines()
    heads = [line for line in lines if line.endswith("):") and ".* (" in line]
    assert [h.split(".*")[0] for h in heads] == ["lora", "sampling", "reward"]
    reward = lines.index(next(h for h in heads if h.startswith("reward")))
    assert lines[reward + 1].strip().startswith("reward.source: str = 'rm'")  # the scalar key first
    top = lines[: lines.index(heads[0])]
    assert not any(line.startswith("  sampling.") for line in top)
