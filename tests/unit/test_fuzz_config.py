"""Fuzzed config files and `key=value` overrides (hypothesis) through `load_config`.

Property: every case either loads a config whose every field has its annotated type, or raises one
ConfigError whose single-line message names the config key (and, for a problem in the file, the
file and line). Nothing else may escape. An error caused by an override never points at the file.

Profiles "fuzz" (fast, default) and "fuzz-slow" (`-m slow`) are registered in tests/conftest.py. The
deterministic tests at the end pin each bug the fuzzing found.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Union

import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st

from alignkit.config import ConfigError, LoraConfig, SFTConfig, load_config, parse_overrides

HINTS = typing.get_type_hints(SFTConfig)
LORA_HINTS = typing.get_type_hints(LoraConfig)
TOP_KEYS = sorted(k for k in HINTS if k != "lora")
CHOICES = {"lr_schedule": ["cosine", "linear", "constant"], "mixed_precision": ["no", "bf16", "fp16"],
           "data_kind": ["sft", "text", None]}

SPECIAL = ["", " ", "\t", "\r", "\r\n", "\n", "\x00", "\x01", "\x7f", "\ufeff", "\u200f", "\u202e", "\ud800", "\udcff",
           "é", "𝄞", ":", ": ", "- ", "#", "&a", "*a", "!!python/object:os.system", "'", '"', "{", "[", "%", "---"]
texts = st.one_of(st.text(max_size=10),
                  st.lists(st.one_of(st.sampled_from(SPECIAL), st.text(max_size=3)), max_size=5).map("".join))
words = st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=8)
yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), texts),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.one_of(texts, words), inner, max_size=3)),
    max_leaves=6,
)


def typed_value(key: str, tp):
    """Values of the field's own type (so some configs load), sometimes out of range."""
    if key in CHOICES:
        return st.sampled_from(CHOICES[key])
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return st.one_of(*(typed_value(key, a) for a in typing.get_args(tp)))
    if origin is list:
        return st.lists(words, min_size=1, max_size=3)
    if tp is type(None):
        return st.none()
    if dataclasses.is_dataclass(tp):  # the lora section
        return st.fixed_dictionaries({}, optional={k: typed_value(k, t) for k, t in LORA_HINTS.items()})
    return {bool: st.booleans(), int: st.integers(1, 64), float: st.floats(0.01, 0.5), str: words}[tp]


def field_value(key: str, tp):
    return st.one_of(typed_value(key, tp), typed_value(key, tp), yaml_values)


@st.composite
def config_mapping(draw):
    mapping: dict = {}
    for key in draw(st.lists(st.sampled_from(TOP_KEYS), max_size=5, unique=True)):
        mapping[key] = draw(field_value(key, HINTS[key]))
    if draw(st.booleans()):
        lora_keys = draw(st.lists(st.sampled_from(sorted(LORA_HINTS)), max_size=3, unique=True))
        mapping["lora"] = draw(st.one_of(
            st.fixed_dictionaries({k: field_value(k, LORA_HINTS[k]) for k in lora_keys}), yaml_values))
    if draw(st.integers(0, 3)) == 0:  # keys that do not exist: habits, typos, junk, non-strings
        extra = st.one_of(st.sampled_from(["learning_rate", "max_step", "lora.r", "provenance"]), texts,
                          st.integers(), st.booleans(), st.none())
        mapping[draw(extra)] = draw(yaml_values)
    return mapping


@st.composite
def config_file(draw):
    """Bytes of a YAML config file: a dumped mapping, maybe with CRLF, a BOM, junk lines, bad bytes, a cut."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([b"", b"\n", b"---\n", b"[]", b"0", b"- a\n", b"a", b"~"]))
    text = yaml.safe_dump(draw(config_mapping()), allow_unicode=draw(st.booleans()), sort_keys=False,
                          default_flow_style=draw(st.sampled_from([False, None])))
    lines = text.splitlines()
    for _ in range(draw(st.integers(0, 2)) if draw(st.integers(0, 3)) == 0 else 0):
        junk = st.one_of(st.sampled_from(["key: [1", "  - x", "\t: y", "lr: 1: 2", "? a", "*x", "%YAML 9"]), texts)
        lines.insert(draw(st.integers(0, len(lines))), draw(junk))
    body = draw(st.sampled_from(["\n", "\r\n"])).join(lines).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 5)) == 0:
        body = b"\xef\xbb\xbf" + body
    if draw(st.integers(0, 7)) == 0 and body:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\xed\xa0\x80"])) + body[at + 1:]
    if draw(st.integers(0, 7)) == 0:
        body = body[: draw(st.integers(0, len(body)))]
    return body


KEYS_FOR_OVERRIDES = TOP_KEYS + [f"lora.{k}" for k in sorted(LORA_HINTS)] + ["lora", "lr.x", "learning_rate",
                                                                              "lora.r.x", "", " lr ", "a..b"]
VALUE_TEXTS = ["2020-13-45", "1e-4", "1E5", "[1, 2", "[a, b]", "{r: 1}", "null", "~", "true", "yes", ".nan", "-.inf", "2020-01-01",
               "!!python/object:os.system", "*x", "&a 1", "'", '"', "\x01", "\udcff", "a: b", "- 1", "0x10", "1_000",
               "9" * 5000, "[" * 2000 + "]" * 2000]


@st.composite
def override(draw):
    if draw(st.integers(0, 9)) == 0:
        return draw(texts)  # maybe no '=' at all
    key = draw(st.one_of(st.sampled_from(KEYS_FOR_OVERRIDES), st.sampled_from(KEYS_FOR_OVERRIDES), texts))
    if draw(st.booleans()):
        value = yaml.safe_dump(draw(field_value(key, HINTS.get(key, str))), default_flow_style=True)
        value = value.removesuffix("\n...\n").strip()
    else:
        value = draw(st.one_of(st.sampled_from(VALUE_TEXTS), texts))
    return f"{key}={value}"


# ------------------------------------------------------------------------------------- checks


def _matches(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return type(value) is float
    if tp is int:
        return type(value) is int
    if tp is str:
        return type(value) is str and not re.search("[\x00\ud800-\udfff]", value)
    return type(value) is tp


def assert_typed(cfg) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "lora":
            assert isinstance(value, LoraConfig)
            for lf in dataclasses.fields(value):
                assert _matches(getattr(value, lf.name), LORA_HINTS[lf.name]), (lf.name, getattr(value, lf.name))
        else:
            assert _matches(value, HINTS[f.name]), (f.name, value)


def _one_line(err: ConfigError) -> str:
    message = str(err)
    assert message and "\n" not in message and "\r" not in message, message
    return message


def _file_problem(message: str) -> bool:
    return any(p in message for p in ("not valid YAML", "not UTF-8 text", "must be a mapping", "cannot be read"))


def _names(message: str, keys: list[str]) -> bool:
    return any((k and k in message) or repr(k) in message or (k and repr(k)[1:-1] in message) for k in map(str, keys))


def _dotted(mapping: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in mapping.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys.extend(_dotted(value, f"{prefix}{key}."))
    return keys


def _override_keys(items: list[str]) -> list[str]:
    keys = []
    for item in items:
        key = item.split("=", 1)[0]
        parts = key.strip().split(".")
        keys += [item, key] + [".".join(parts[: i + 1]) for i in range(len(parts))]
    return keys + ["''"]


def _both(strategy_args: dict, body):
    fast = settings(settings.get_profile("fuzz"))(given(**strategy_args)(body))
    slow = pytest.mark.slow(settings(settings.get_profile("fuzz-slow"))(given(**strategy_args)(body)))
    return fast, slow


# ----------------------------------------------------------------------------------- properties


def _config_files(tmp_path_factory, body):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(body)
    try:
        cfg = load_config(SFTConfig, path)
    except ConfigError as err:
        message = _one_line(err)
        assert re.search(re.escape(str(path)) + r":\d+: ", message), message
        if not _file_problem(message):  # a key or value: the message names the key
            loaded = yaml.safe_load(body.decode("utf-8-sig"))
            assert _names(message, _dotted(loaded)), message
        event("ConfigError: " + ("file" if _file_problem(message) else "key"))
        return
    event("loaded")
    assert_typed(cfg)


test_config_files_load_or_raise_config_error, test_config_files_load_or_raise_config_error_slow = _both(
    {"body": config_file()}, _config_files)

GOOD_FILE = "model: m\nlr: 0.001\nseed: 3\nlora:\n  alpha: 8\n"


def _overrides(tmp_path_factory, items, with_file):
    path = None
    if with_file:
        path = tmp_path_factory.mktemp("cfg") / "good.yaml"
        path.write_text(GOOD_FILE)
    try:
        cfg = load_config(SFTConfig, path, items)
    except ConfigError as err:
        message = _one_line(err)
        assert _names(message, _override_keys(items)), message
        assert path is None or str(path) not in message, message  # the file is fine: never blamed
        event("ConfigError")
        return
    event("loaded")
    assert_typed(cfg)


test_overrides_load_or_raise_config_error, test_overrides_load_or_raise_config_error_slow = _both(
    {"items": st.lists(override(), max_size=4), "with_file": st.booleans()}, _overrides)


# ------------------------------------------------------------------ regressions (bugs fuzzing found)


def _config_error(tmp_path: Path, body: bytes | None, overrides: list[str] = ()) -> str:
    path = None
    if body is not None:
        path = tmp_path / "c.yaml"
        path.write_bytes(body)
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, path, list(overrides))
    return _one_line(err.value)


@pytest.mark.parametrize("body, expected", [
    (b"model: x\nlr: abc\n", "c.yaml:2: lr: 'abc' is not a float"),  # was: no file:line
    (b"model: x\r\nlora:\r\n  r: 2\r\n  alpha: abc\r\n", "c.yaml:4: lora.alpha: 'abc' is not an int"),
    (b"model: x\nlora: 5\n", "c.yaml:2: lora: expected a mapping"),
    (b"model: x\n\nlearning_rate: 1\n", "c.yaml:3: unknown config key 'learning_rate'; did you mean 'lr'?"),
    (b"model: x\n1: 2\n", "c.yaml:2: unknown config key '1'"),
    (b"model: x\n'a\\nb\xe2\x80\xae': 2\n", "c.yaml:2: unknown config key 'a\\\\nb\\u202e'"),
    (b"model: x\nmicro_batch_size: 0\n", "c.yaml:2: batch_size and micro_batch_size must be positive"),
    (b"seed: 1\nlr_schedule: exp\n", "c.yaml:2: lr_schedule: 'exp' is not one of"),
    (b"model: x\nlr: \xff\n", "c.yaml:2: not UTF-8 text (byte 0xff)"),  # was: no line
    (b"model: x\nlr: 1\x07\n", "c.yaml:2: not valid YAML (unacceptable character #x0007"),  # was: no line
    (b"seed: 1\nlr: " + b"[" * 3000 + b"]" * 3000 + b"\n", "c.yaml:1: not valid YAML (nested too deeply)"),  # RecursionError
    (b"[]", "c.yaml:1: the config file must be a mapping of keys to values, got list"),  # was: loaded as defaults
    (b'output_dir: "runs/a\\0b"\n', "c.yaml:1: output_dir: the string holds the character '\\x00'"),  # was: loaded
    (b'model: "\\ud800"\n', "c.yaml:1: model: the string holds the character '\\ud800'"),  # was: loaded
    # was: ValueError out of yaml's constructor (a traceback)
    (b"model: x\nseed: 2020-13-45\n", "c.yaml:2: seed: the value cannot be read (month must be in 1..12)"),
    (b"model: x\nlora:\n  r: " + b"9" * 5000 + b"\n", "c.yaml:3: lora.r: the value cannot be read (Exceeds the limit"),
])
def test_config_file_errors_name_file_line_and_key(tmp_path, body, expected):
    assert expected in _config_error(tmp_path, body)


def test_a_directory_as_config_file(tmp_path):
    with pytest.raises(ConfigError) as err:  # was: IsADirectoryError
        load_config(SFTConfig, tmp_path)
    assert str(err.value) == f"{tmp_path}: not a file"


@pytest.mark.parametrize("overrides, expected", [
    (["lr=1", "lr.x=2"], "override 'lr.x=2': 'lr' is set to a value, not a section of keys"),  # was: TypeError
    (["lora=5", "lora.r.x=1"], "override 'lora.r.x=1': 'lora' is set to a value"),
    (["lr=\x01"], "override 'lr=\\x01': the value is not valid YAML (unacceptable character"),  # was: AttributeError
    (["model=\udcff"], "override 'model=\\udcff': the value is not valid YAML"),  # an argv byte that is not UTF-8
    (["lr=" + "[" * 3000 + "]" * 3000], "the value is nested too deeply"),  # was: RecursionError
    (["a\nb=1"], "unknown config key 'a\\nb'"),  # was: a two-line message
    (["seed=2020-13-45"], "override 'seed=2020-13-45': the value cannot be read (month must be in 1..12)"),  # ValueError
    (["seed=" + "9" * 5000], "the value cannot be read (Exceeds the limit (4300 digits)"),
    (["no equals\nsign"], "override 'no equals\\nsign' is not key=value"),
])
def test_override_errors_are_one_line_naming_the_key(tmp_path, overrides, expected):
    assert expected in _config_error(tmp_path, None, overrides)


def test_an_override_error_does_not_blame_the_file(tmp_path):
    body = b"model: x\nlr: 0.1\nlora:\n  r: 2\n  alpha: nope\n"
    # the override replaces the file's lr: its error is the override's, not c.yaml:2's
    assert _config_error(tmp_path, body, ["lr.x=1", "lora.alpha=3"]).startswith("lr: {'x': 1} is not a float")
    # the file's own bad value keeps its line while an override sets a sibling key
    assert _config_error(tmp_path, body, ["lora.r=4"]).endswith("c.yaml:5: lora.alpha: 'nope' is not an int")
    assert parse_overrides(["lora.r=4", "lora.alpha=2"]) == {"lora": {"r": 4, "alpha": 2}}


def test_odd_but_valid_files_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbfmodel: \"m\xe2\x80\xae\"\r\nlr: 1e-4\r\n\r\nlora:\r\n  r: 2\r\n")
    cfg = load_config(SFTConfig, path)
    assert cfg.model == "m\u202e" and cfg.lr == 1e-4 and cfg.lora.r == 2
    path.write_bytes(b"")
    assert load_config(SFTConfig, path) == load_config(SFTConfig)
    path.write_text("model: " + "m" * 1_000_000 + "\n")  # a 1 MB single line
    assert len(load_config(SFTConfig, path).model) == 1_000_000


# ----------------------------------------------------------------------------- the real CLI, once


@pytest.mark.parametrize("argv, expected", [
    (["sft", "--config", "{cfg}"], "c.yaml:2: lr: 'abc' is not a float"),
    (["sft", "lr=1", "lr.x=2", "output_dir={out}"], "override 'lr.x=2': 'lr' is set to a value"),
])
def test_a_stage_with_a_bad_config_fails_in_one_line(tmp_path, capsys, argv, expected):
    from alignkit.cli import main

    cfg, out = tmp_path / "c.yaml", tmp_path / "run"
    cfg.write_text(f"output_dir: {out}\nlr: abc\n")
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(cfg=cfg, out=out) for a in argv])
    assert exit_info.value.code == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err_lines) == 1 and expected in err_lines[0] and "config error" in err_lines[0], err_lines
    assert not any((out / name).exists() for name in ("final", "summary.json", "checkpoints"))
