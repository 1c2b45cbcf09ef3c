"""Stage command lines in every spelling HF/TRL users type: key=value, --key value, --key=value,
dashes for underscores, dotted nested keys, bare bool flags; and the errors for what is none of these."""

from __future__ import annotations

import pytest

from alignkit.cli import main, parse_stage_args
from alignkit.config import ConfigError, SFTConfig, load_config


def overrides(argv: list[str], cls: type | None = SFTConfig) -> list[str]:
    return parse_stage_args(argv, cls)[1]


def test_key_value_and_both_flag_spellings_give_the_same_overrides():
    assert overrides(["lr=1e-4"]) == overrides(["--lr", "1e-4"]) == overrides(["--lr=1e-4"]) == ["lr=1e-4"]


def test_dashes_become_underscores_and_dots_reach_nested_keys():
    got = overrides(["--max-steps", "10", "--lora.r", "8", "--lora.target-modules=q_proj", "--micro-batch-size=2"])
    assert got == ["max_steps=10", "lora.r=8", "lora.target_modules=q_proj", "micro_batch_size=2"]
    cfg = load_config(SFTConfig, None, got)
    assert (cfg.max_steps, cfg.lora.r, cfg.lora.target_modules, cfg.micro_batch_size) == (10, 8, "q_proj", 2)


def test_values_with_equals_signs_and_negative_numbers_are_values():
    got = overrides(["--train-data", "task:sort/sft?n=60&seed=1", "--seed", "-1"])
    assert got == ["train_data=task:sort/sft?n=60&seed=1", "seed=-1"]
    assert load_config(SFTConfig, None, got).seed == -1


def test_bare_bool_flag_means_true_before_another_flag_a_key_value_or_the_end():
    assert overrides(["--packing", "--lr", "1e-4"]) == ["packing=true", "lr=1e-4"]
    assert overrides(["--gradient-checkpointing"]) == ["gradient_checkpointing=true"]
    # A bool field takes only a bool word as its value, so a following key=value stays an override.
    assert overrides(["--packing", "lr=1e-4"]) == ["packing=true", "lr=1e-4"]
    assert overrides(["--packing", "false", "--resume", "yes"]) == ["packing=false", "resume=yes"]
    cfg = load_config(SFTConfig, None, overrides(["--packing", "false", "--gradient-checkpointing"]))
    assert cfg.packing is False and cfg.gradient_checkpointing is True


def test_without_the_config_class_a_bare_flag_is_true_and_load_config_judges_it():
    assert overrides(["--resume", "--max-steps", "3"], cls=None) == ["resume=true", "max_steps=3"]
    assert overrides(["--lr"], cls=None) == ["lr=true"]
    with pytest.raises(ConfigError, match="lr"):
        load_config(SFTConfig, None, ["lr=true"])


def test_config_file_spellings_are_kept():
    assert parse_stage_args(["--config", "a.yaml", "--lr", "1"], SFTConfig) == ("a.yaml", ["lr=1"])
    assert parse_stage_args(["-c", "a.yaml"], SFTConfig) == ("a.yaml", [])
    assert parse_stage_args(["--config=a.yaml", "x=1"], SFTConfig) == ("a.yaml", ["x=1"])


@pytest.mark.parametrize("argv, message", [
    (["--lr"], "--lr needs a value"),  # not a bool field: a bare flag is a forgotten value
    (["--max-steps", "--lr", "1"], "--max-steps needs a value"),
    (["--config"], "--config needs a file path"),
    (["--config", "--lr", "1"], "--config needs a file path"),
    (["lr"], "unexpected argument 'lr'"),
    (["-x"], "unexpected argument '-x'"),
    (["--", "1"], "not an option name"),
    (["--=1"], "not an option name"),
    (["--.r", "1"], "not an option name"),
])
def test_malformed_arguments_are_config_errors_naming_the_argument(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_stage_args(argv, SFTConfig)


def test_cli_refuses_an_unknown_flag_with_the_did_you_mean_of_its_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "--learning-rate", "1e-4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "did you mean 'lr'?" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "--max-steps"])
    assert exit_info.value.code == 2 and "--max-steps needs a value" in capsys.readouterr().err
