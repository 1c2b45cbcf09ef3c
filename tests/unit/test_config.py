"""Config loading: YAML + overrides, type checks, unknown keys with suggestions, help text."""

from __future__ import annotations

import pytest
import yaml

from alignkit.cli import main, parse_stage_args, stage_help
from alignkit.config import ConfigError, PretrainConfig, SFTConfig, field_help, load_config, save_config


def test_yaml_then_overrides_with_nesting(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nbatch_size: 16\nlora:\n  r: 4\n")
    cfg = load_config(SFTConfig, path, ["batch_size=64", "lora.alpha=8", "eval_data=null"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)  # YAML 1.1 would have left '1e-4' a string
    assert cfg.batch_size == 64 and cfg.lora.r == 4 and cfg.lora.alpha == 8 and cfg.eval_data is None


def test_eval_data_accepts_fraction_or_path():
    assert load_config(SFTConfig, None, ["eval_data=0.1"]).eval_data == 0.1
    assert load_config(SFTConfig, None, ["eval_data=held.jsonl"]).eval_data == "held.jsonl"
    with pytest.raises(ConfigError, match="fraction"):
        load_config(SFTConfig, None, ["eval_data=1.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("learning_rate=1e-3", "unknown config key 'learning_rate'; did you mean 'lr'?"),
        ("max_step=3", "did you mean 'max_steps'?"),
        ("lora.rank=3", "did you mean 'lora.r'?"),
        ("batch_size=abc", "batch_size: 'abc' is not an int"),
        ("resume=maybe", "resume: 'maybe' is not a bool"),
        ("lr_schedule=exp", "lr_schedule"),
        ("lr", "not key=value"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, None, [override])
    assert message in str(err.value)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(PretrainConfig, None, ["max_steps=7", "lora.r=2"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(PretrainConfig, tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["lora"]["r"] == 2


def test_every_field_is_documented():
    for cls in (PretrainConfig, SFTConfig):
        for key, _, _, help_text in field_help(cls):
            assert help_text, f"{cls.__name__}.{key} has no help"
    text = stage_help("sft")
    assert "packing: bool = True" in text and "lora.r: int = 0" in text and "GLOBAL rows" in text


def test_cli_arguments_and_errors(capsys):
    assert parse_stage_args(["--config", "a.yaml", "x=1"]) == ("a.yaml", ["x=1"])
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "learning_rate=1"])
    assert exit_info.value.code == 2
    assert "did you mean 'lr'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sfft"])
    assert "did you mean 'sft'?" in capsys.readouterr().err
    main(["--help"])
    assert "pretrain" in capsys.readouterr().out


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    from alignkit.config import ConfigError, SFTConfig, load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nlr: [1e-4\nmax_steps: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(SFTConfig, bad)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfmodel: x\ntrain_data: task:sort/sft\n")
    assert load_config(SFTConfig, bom).model == "x"
