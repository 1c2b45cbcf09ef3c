"""Did-you-mean hints for unknown config keys: peers' names (TRL, HF TrainingArguments, LLaMA-Factory,
OpenRLHF) map to ours, and a name cut short is judged by the peer name it starts, not by look-alike keys."""

from __future__ import annotations

import dataclasses

import pytest

from alignkit import config as C
from alignkit.plan_cli import PlanConfig


def hint(cls: type, key: str) -> str:
    with pytest.raises(C.ConfigError) as err:
        C.load_config(cls, None, [f"{key}=1"])
    return str(err.value)


@pytest.mark.parametrize(
    "cls, key, ours",
    [
        # the three a new user tripped on: difflib alone said min_lr_ratio, data_kind and nothing
        (C.SFTConfig, "learning_rat", "lr"),
        (C.SFTConfig, "dataset_name", "train_data"),
        (C.SFTConfig, "cutoff_len", "max_length"),
        # one peer name, a different key per stage
        (C.DPOConfig, "kl_coef", "beta"),
        (C.GRPOConfig, "beta", "kl_coef"),
        (C.PPOConfig, "init_kl_coef", "kl_coef"),
        (C.GRPOConfig, "num_generations", "samples_per_prompt"),
        (C.BestOfNConfig, "num_generations", "n"),
        (C.EvalConfig, "num_generations", "n_samples"),
        (C.EvalConfig, "dataset", "prompts"),
        # HF / LLaMA-Factory / OpenRLHF spellings
        (C.SFTConfig, "per_device_train_batch_size", "micro_batch_size"),
        (C.SFTConfig, "gradient_accumulation_steps", "batch_size"),
        (C.SFTConfig, "num_train_epochs", "epochs"),
        (C.SFTConfig, "max_seq_length", "max_length"),
        (C.SFTConfig, "lora_rank", "lora.r"),
        (C.PPOConfig, "eps_clip", "clip_eps"),
        (C.PPOConfig, "generate_max_len", "sampling.max_new_tokens"),
        (C.DPOConfig, "pref_beta", "beta"),
        # cut short or misspelt peer names
        (C.SFTConfig, "learnig_rate", "lr"),
        (C.PPOConfig, "init_kl", "kl_coef"),
        (C.SFTConfig, "per_device", "micro_batch_size"),
        # our own keys still win for our own typos
        (C.SFTConfig, "max_step", "max_steps"),
        (C.SFTConfig, "lora.rank", "lora.r"),
    ],
)
def test_a_peer_name_suggests_our_key(cls, key, ours):
    message = hint(cls, key)
    assert f"unknown config key {key!r}; did you mean {ours!r}?" in message
    assert "\n" not in message


def test_a_note_says_where_the_meaning_differs():
    assert "GLOBAL" in hint(C.SFTConfig, "gradient_accumulation_steps")
    assert "not a fraction" in hint(C.SFTConfig, "warmup_ratio")
    assert "alignkit's name for learning_rate" in hint(C.SFTConfig, "learning_rat")


def test_nothing_close_lists_the_valid_keys():
    message = hint(C.SFTConfig, "zzz")
    assert "did you mean" not in message and "valid keys: " in message and "train_data" in message


def test_every_suggestion_is_a_real_key_of_some_config():
    classes = [cls for cls in vars(C).values() if dataclasses.is_dataclass(cls) and isinstance(cls, type)]
    keys = {key for cls in classes + [PlanConfig] for key, _, _, _ in C.field_help(cls)}
    missing = {alias: ours for alias, targets in C._HABITS.items() for ours in targets if ours not in keys}
    assert not missing


def test_usage_shows_the_flag_form_beside_key_value(capsys):
    from alignkit.cli import main, stage_help, parse_stage_args

    main(["--help"])
    usage = capsys.readouterr().out
    assert "--key value" in usage and "--max-steps 10" in usage and "key=value" in usage
    text = stage_help("sft")
    assert "--key value" in text.splitlines()[0] and "dashes for underscores" in text
    # the form the usage shows is the one the parser takes
    assert parse_stage_args(["--max-steps", "10", "--lora.r", "8"], C.SFTConfig)[1] == ["max_steps=10", "lora.r=8"]
