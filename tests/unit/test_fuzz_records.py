"""Fuzzed data files (hypothesis): every record kind the loader accepts, mutated, in every file shape.

Property: `load_records` either returns well-formed records (the fields a stage reads have the types
it expects, and `alignkit data check` can tokenize them) or raises one DataError whose single-line
message names the file and line and, for a record, the field. Nothing else may escape.

The fast suite runs the "fuzz" hypothesis profile (tests/conftest.py: 60 derandomized examples per
property); `-m slow` runs the same properties under "fuzz-slow" (2000 random examples each). The
deterministic tests at the end pin each bug the fuzzing found.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from alignkit.data.records import KINDS, ROLES, DataError, load_records, normalize_record

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------ strategies

SPECIAL = [
    "", " ", "\t", "\n", "\r", "\r\n", "\x00", "\ufeff", "\u200f", "\u202e", "\u2028", "\ud800", "\udfff", "\udcff",
    "é", "𝄞", "\n\nHuman:", "\n\nAssistant:", "Human:", "Assistant:", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    '"', "\\", "{", "]",
]
FIELDS = ["text", "prompt", "completion", "response", "messages", "chosen", "rejected", "margin", "responses",
          "scores", "ranks", "system", "meta", "role", "content"]

texts = st.one_of(
    st.text(max_size=12),
    st.lists(st.one_of(st.sampled_from(SPECIAL), st.text(max_size=4)), max_size=6).map("".join),
)
words = st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=6)
numbers = st.one_of(st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True), st.integers())
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, texts),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.one_of(texts, st.sampled_from(FIELDS)),
                                                                            inner, max_size=4)),
    max_leaves=8,
)
content = st.one_of(words, texts)


@st.composite
def messages(draw, last: str | None = None, min_size: int = 1):
    roles = draw(st.lists(st.sampled_from(ROLES), min_size=min_size, max_size=4))
    if last is not None:
        roles = roles + [last]
    out = [{"role": r, "content": draw(content)} for r in roles]
    if draw(st.integers(0, 9)) == 0 and out:  # a broken message
        i = draw(st.integers(0, len(out) - 1))
        out[i] = draw(st.one_of(json_values, st.fixed_dictionaries({"role": texts}),
                                st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": json_values})))
    return out


@st.composite
def hh_dialogue(draw):
    turns = draw(st.lists(st.tuples(st.sampled_from(["Human", "Assistant"]), content), min_size=1, max_size=4))
    text = "".join(f"\n\n{speaker}: {said}" for speaker, said in [("Human", draw(content)), *turns])
    return text.lstrip("\n") if draw(st.booleans()) else text


prompt_value = st.one_of(words, texts, messages(last="user"), hh_dialogue().map(lambda t: t + "\n\nAssistant:"))


@st.composite
def chat_pair(draw):
    prefix = draw(messages(last="user"))
    chosen, rejected = draw(content), draw(content)
    return {"chosen": prefix + [{"role": "assistant", "content": chosen}],
            "rejected": prefix + [{"role": "assistant", "content": rejected}]}


@st.composite
def hh_pair(draw):
    shared = draw(hh_dialogue())
    return {side: f"{shared}\n\nAssistant: {draw(content)}" for side in ("chosen", "rejected")}


def _optional(**fields):
    return st.fixed_dictionaries({}, optional=fields)


def _with(base, **optional):
    return st.tuples(base, _optional(**optional)).map(lambda pair: {**pair[0], **pair[1]})


FAMILIES = {
    "text": st.fixed_dictionaries({"text": content}),
    "prompt/completion": _with(
        st.fixed_dictionaries({"prompt": prompt_value, "completion": content}), system=content, response=content),
    "response": st.fixed_dictionaries({"prompt": prompt_value, "response": content}),
    "messages": _with(st.fixed_dictionaries({"messages": messages(last="assistant")}), system=content),
    "preference explicit": _with(
        st.fixed_dictionaries({"prompt": prompt_value, "chosen": content, "rejected": content}),
        margin=st.one_of(numbers, json_values), system=content),
    "preference chat": _with(chat_pair(), system=content, margin=numbers),
    "preference hh": hh_pair(),
    "ranked": _with(
        st.fixed_dictionaries({"prompt": prompt_value, "responses": st.lists(content, min_size=1, max_size=4)}),
        scores=st.lists(numbers, max_size=4), ranks=st.lists(st.integers(1, 4), max_size=4)),
    "prompts": st.one_of(st.fixed_dictionaries({"prompt": prompt_value}),
                         st.fixed_dictionaries({"messages": messages(last="user")})),
}
valid_ish = st.one_of(*FAMILIES.values())


@st.composite
def mutated(draw, base=valid_ish):
    """A family's record with fields dropped, added, emptied or given a value of another type."""
    record = dict(draw(base))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "set", "empty", "extra"]))
        if op == "drop" and record:
            record.pop(draw(st.sampled_from(sorted(record))))
        elif op == "set":
            record[draw(st.sampled_from(FIELDS))] = draw(json_values)
        elif op == "empty" and record:
            record[draw(st.sampled_from(sorted(record)))] = draw(st.sampled_from(["", " ", [], {}, None, 0, False]))
        else:
            record[draw(texts)] = draw(json_values)
    return record


records = st.one_of(valid_ish, mutated(), json_values)
GARBAGE = [b"", b"   ", b"{", b'{"text": "a"', b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"NaN", b"[]", b"null", b"\x00",
           b"\xef\xbb\xbf{}", b'{"text": "a"}{"text": "b"}', b"[" * 3000 + b"]" * 3000, b"1" * 5000]


@st.composite
def file_rows(draw):
    """Mostly records of one family (a loadable file), sometimes mutated ones, any records or none."""
    family = FAMILIES[draw(st.sampled_from(sorted(FAMILIES)))]
    return draw(st.one_of(
        st.lists(family, min_size=1, max_size=5),
        st.lists(st.one_of(family, family, mutated(family)), min_size=1, max_size=5),
        st.lists(records, max_size=4),
    ))


@st.composite
def data_file(draw, rows=file_rows()):
    """(suffix, bytes) of a .jsonl / .jsonl.gz / .json file holding `rows`, maybe damaged."""
    rows = draw(rows)
    ascii_only = draw(st.integers(0, 3)) > 0
    dumped = [json.dumps(r, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass") for r in rows]
    shape = draw(st.sampled_from(["jsonl", "jsonl", "jsonl.gz", "json", "json-data"]))
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    if shape.startswith("json") and not shape.startswith("jsonl"):
        sep = b"," + newline if draw(st.booleans()) else b","
        body = b"[" + newline + sep.join(dumped) + newline + b"]"
        if shape == "json-data":
            body = b'{"data": ' + body + b', "version": 1}'
        shape = "json"
    else:
        lines = list(dumped)
        for _ in range(draw(st.integers(0, 2)) if draw(st.integers(0, 2)) == 0 else 0):
            lines.insert(draw(st.integers(0, len(lines))), draw(st.one_of(st.sampled_from(GARBAGE), st.binary(max_size=12))))
        body = newline.join(lines) + (newline if draw(st.booleans()) else b"")
    if draw(st.integers(0, 4)) == 0:
        body = b"\xef\xbb\xbf" + body
    if shape == "jsonl.gz":
        body = gzip.compress(body)
        if draw(st.integers(0, 3)) == 0:
            body = body[: draw(st.integers(0, len(body)))]
    return shape, body


# ------------------------------------------------------------------------------------- checks

_SURROGATE = re.compile("[\ud800-\udfff]")


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _check_messages(value, last: str | None):
    assert isinstance(value, list) and value
    for message in value:
        assert isinstance(message, dict) and set(message) == {"role", "content"}
        assert message["role"] in ROLES and isinstance(message["content"], str)
        if message["role"] == "assistant":
            assert message["content"].strip()
    if last is not None:
        assert value[-1]["role"] == last


def _check_reply(value):
    assert isinstance(value, str) and value.strip()


def _finite(value):
    return isinstance(value, float) and math.isfinite(value)


def assert_well_formed(record, kind: str):
    """The normalized shape of `kind` (module docstring of alignkit.data.records), usable by a stage."""
    assert isinstance(record, dict)
    assert isinstance(record.get("meta", {}), dict)
    fields = set(record) - {"meta"}
    if kind == "text":
        assert fields == {"text"} and isinstance(record["text"], str) and record["text"].strip()
    elif kind == "sft":
        assert fields == {"messages"}
        _check_messages(record["messages"], "assistant")
    elif kind == "preference":
        assert fields in ({"prompt", "chosen", "rejected"}, {"prompt", "chosen", "rejected", "margin"})
        _check_messages(record["prompt"], "user")
        _check_reply(record["chosen"]), _check_reply(record["rejected"])
        assert record["chosen"] != record["rejected"]
        assert "margin" not in record or _finite(record["margin"])
    elif kind == "ranked":
        assert fields == {"prompt", "responses", "scores"}
        _check_messages(record["prompt"], "user")
        assert isinstance(record["responses"], list) and len(record["responses"]) >= 2
        for response in record["responses"]:
            _check_reply(response)
        assert len(record["scores"]) == len(record["responses"]) and all(_finite(s) for s in record["scores"])
        assert len(set(record["scores"])) > 1
    else:
        assert kind == "prompts" and fields == {"prompt"}
        _check_messages(record["prompt"], "user")
    for text in _strings(record):  # what a tokenizer or a UTF-8 file will be given
        assert not _SURROGATE.search(text), record
    again = normalize_record(record, kind, "again")  # normalization is idempotent
    assert json.dumps(again, sort_keys=True) == json.dumps(record, sort_keys=True)


def assert_data_error(err: DataError, path: Path):
    """One line, naming the file and a line (or a whole-file problem), and the field of a bad record."""
    message = str(err)
    assert "\n" not in message and "\r" not in message, message
    assert str(path) in message, message
    whole_file = ("no records (empty file", "the gzip stream is truncated or corrupt after line",
                  "not a readable parquet file")
    assert re.search(re.escape(str(path)) + r":\d+", message) or any(w in message for w in whole_file), message
    if message.startswith("record at"):
        assert re.search(r"'[^']*'|must be a JSON object|has fields", message), message


@pytest.fixture(scope="module")
def tokenizer():
    from alignkit.models.tokenizer import train_bpe_tokenizer

    corpus = ["the quick brown fox", "Human: hi Assistant: hello", "sort: c b a", "é 𝄞 \u202e"] * 20
    return train_bpe_tokenizer(corpus, vocab_size=300)


def _load_and_check(path: Path, kind: str | None, tokenizer) -> None:
    try:
        loaded, got = load_records(str(path), kind)
    except DataError as err:
        assert_data_error(err, path)
        event("DataError: " + re.sub(r".*?(invalid JSON|not UTF-8|gzip|no records|lone surrogate|missing|is empty|"
                                     r"must|identical|kind|no kind).*", r"\1", str(err)))
        return
    assert got in KINDS and (kind is None or got == kind)
    event(f"loaded {got}")
    for record in loaded:
        assert_well_formed(record, got)
    # what `alignkit data check` (and a stage) does with them next: render, tokenize, mask
    from alignkit.data.check import format_data_check, run_data_check

    report = run_data_check(str(path), kind, tokenizer, max_length=24)
    assert report["n_records"] == len(loaded)
    format_data_check(report)


def _both(strategy_args: dict, body):
    """A fast test (profile "fuzz") and a slow one (profile "fuzz-slow", marked slow) of one property."""
    fast = settings(settings.get_profile("fuzz"))(given(**strategy_args)(body))
    slow = pytest.mark.slow(settings(settings.get_profile("fuzz-slow"))(given(**strategy_args)(body)))
    return fast, slow


# ----------------------------------------------------------------------------------- properties


def _one_record_each_kind(tmp_path_factory, tokenizer, record, kind):
    path = tmp_path_factory.mktemp("one") / "d.jsonl"
    path.write_bytes(json.dumps(record).encode("utf-8", "surrogatepass") + b"\n")
    _load_and_check(path, kind, tokenizer)


test_records_load_or_raise_data_error, test_records_load_or_raise_data_error_slow = _both(
    {"record": records, "kind": st.sampled_from([None, *KINDS])}, _one_record_each_kind)


def _family_records(tmp_path_factory, tokenizer, family, kind, data):
    record = data.draw(st.one_of(FAMILIES[family], mutated(FAMILIES[family])))
    _one_record_each_kind(tmp_path_factory, tokenizer, record, kind)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(settings.get_profile("fuzz"), max_examples=20)
@given(kind=st.sampled_from([None, *KINDS]), data=st.data())
def test_each_family_loads_or_raises(tmp_path_factory, tokenizer, family, kind, data):
    _family_records(tmp_path_factory, tokenizer, family, kind, data)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(settings.get_profile("fuzz-slow"), max_examples=300)
@given(kind=st.sampled_from([None, *KINDS]), data=st.data())
def test_each_family_loads_or_raises_slow(tmp_path_factory, tokenizer, family, kind, data):
    _family_records(tmp_path_factory, tokenizer, family, kind, data)


def _whole_files(tmp_path_factory, tokenizer, file, kind):
    suffix, body = file
    path = tmp_path_factory.mktemp("file") / f"data.{suffix}"
    path.write_bytes(body)
    _load_and_check(path, kind, tokenizer)


test_files_load_or_raise_data_error, test_files_load_or_raise_data_error_slow = _both(
    {"file": data_file(), "kind": st.sampled_from([None, None, *KINDS])}, _whole_files)


# ------------------------------------------------------------------ regressions (bugs fuzzing found)


def _error_for(tmp_path: Path, name: str, body: bytes, kind: str | None = None) -> str:
    path = tmp_path / name
    path.write_bytes(body)
    with pytest.raises(DataError) as err:
        load_records(str(path), kind)
    assert_data_error(err.value, path)
    return str(err.value)


def test_json_nested_past_the_recursion_limit_is_a_data_error(tmp_path):
    # was: RecursionError out of json.loads (a traceback)
    message = _error_for(tmp_path, "deep.jsonl", b'{"text": "a"}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n")
    assert "deep.jsonl:2: invalid JSON: nested too deeply" in message
    message = _error_for(tmp_path, "deep.json", b"[" * 100_000 + b"]" * 100_000)
    assert "deep.json:1: invalid JSON: nested too deeply" in message


def test_an_integer_past_pythons_digit_limit_is_a_data_error(tmp_path):
    # was: ValueError "Exceeds the limit (4300 digits)" from json.loads (a traceback)
    message = _error_for(tmp_path, "big.jsonl", b'{"text": "a", "n": ' + b"9" * 5000 + b"}\n")
    assert "big.jsonl:1: invalid JSON: Exceeds the limit (4300 digits)" in message


@pytest.mark.parametrize("row, field", [
    ({"prompt": "q", "responses": ["a", "b"], "scores": [float("nan"), 1.0]}, "'scores' must be a list of finite"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [1, float("inf")]}, "'ranks' must be a list of finite"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [10 ** 400, 1]}, "'scores' must be a list of finite"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": float("-inf")}, "'margin' must be a finite number"),
])
def test_non_finite_scores_and_margins_are_rejected(tmp_path, row, field):
    # was: accepted (JSON NaN / Infinity, or an int float() overflows), making the RM / RRHF loss NaN
    message = _error_for(tmp_path, "nan.jsonl", json.dumps(row).encode() + b"\n")
    assert "nan.jsonl:1" in message and field in message


@pytest.mark.parametrize("row, field", [
    ({"text": "a\ud800b"}, "'text'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\udfff"}]},
     "'messages'[1]['content']"),
    ({"prompt": "q", "completion": "c", "meta": {"id\udc80": 1}}, "'meta'['id\\udc80']"),
])
def test_lone_surrogates_are_rejected_naming_the_field(tmp_path, row, field):
    # was: accepted; the tokenizer then raised UnicodeEncodeError ("surrogates not allowed") in the stage
    message = _error_for(tmp_path, "sur.jsonl", json.dumps(row).encode() + b"\n")
    assert f"sur.jsonl:1: {field} holds a lone surrogate" in message


@pytest.mark.parametrize("row, field", [
    ({"prompt": "\n\nHuman: a\n\nAssistant: \n\nHuman: b\n\nAssistant:", "response": "c"},
     "'prompt'[1] is an empty assistant turn"),
    ({"chosen": "\n\nHuman: a\n\nAssistant:\n\nHuman: b\n\nAssistant: c",
      "rejected": "\n\nHuman: a\n\nAssistant:\n\nHuman: b\n\nAssistant: d"}, "'chosen'[1] is an empty assistant turn"),
])
def test_hh_dialogues_with_an_empty_assistant_turn_inside_are_rejected(tmp_path, row, field):
    # was: accepted, and the normalized record (with {"role": "assistant", "content": ""} in its prompt) was
    # then rejected as input of its own kind: normalization was not idempotent
    message = _error_for(tmp_path, "hh.jsonl", json.dumps(row).encode() + b"\n")
    assert "hh.jsonl:1" in message and field in message


@pytest.mark.parametrize("body", [b"", b"PAR1 not really parquet PAR1"])
def test_an_unreadable_parquet_file_is_a_data_error(tmp_path, body):
    # was: pyarrow.ArrowInvalid (a traceback)
    message = _error_for(tmp_path, "bad.parquet", body)
    assert "bad.parquet: not a readable parquet file" in message


def test_json_file_errors_name_the_line_of_the_record(tmp_path):
    # was: "file:record 2", no line
    body = b'{"data": [\n  {"text": "a"},\n\n  {"title": "b"}\n], "version": 1}'
    message = _error_for(tmp_path, "d.json", body, kind="text")
    assert "d.json:4 (record 2)" in message and "missing 'text'" in message
    message = _error_for(tmp_path, "e.json", b'[{"text": "a"},\r\n{"text": ""}]')
    assert "e.json:2 (record 2)" in message and "'text' is empty" in message


def test_other_shapes_load(tmp_path):
    """CRLF, a BOM, NUL / RTL / BOM characters inside strings, and a 10 MB single line all load."""
    path = tmp_path / "odd.jsonl"
    rows = [{"text": "a\x00b"}, {"text": "\u202e\u200fرتب"}, {"text": "\ufeffx"}, {"text": "y" * 10_000_000}]
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(r, ensure_ascii=False).encode() for r in rows) + b"\r\n")
    loaded, kind = load_records(str(path))
    assert kind == "text" and [r["text"] for r in loaded] == [r["text"] for r in rows]
    long_bad = tmp_path / "long.jsonl"
    long_bad.write_bytes(b'{"text": "a"}\n{"text": "' + b"y" * 10_000_000 + b'"\n')
    assert "long.jsonl:2: invalid JSON" in _error_for(tmp_path, "long.jsonl", long_bad.read_bytes())


# ----------------------------------------------------------------------------- the real CLI, once


def _one_line_stderr(res: subprocess.CompletedProcess) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode != 0 and len(lines) == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    return lines[0]


def test_cli_data_check_fails_in_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    # (a file with some valid records is reported with the bad ones counted: test_data_check)
    bad.write_bytes(b'{"prompt": "q", "completion": "\\ud800"}\n{"prompt": "q", "completion": "\\udcff"}\n')
    res = subprocess.run([sys.executable, "-m", "alignkit", "data", "check", str(bad)], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    line = _one_line_stderr(res)
    assert "no valid" in line and f"{bad}:1: 'completion' holds a lone surrogate" in line, line


@pytest.mark.parametrize("stage, row", [
    ("sft", {"prompt": "q", "completion": "\udcff"}),
    ("pretrain", {"text": ["not", "a", "string"]}),
    ("dpo", {"prompt": "q", "chosen": "a", "rejected": "b", "margin": float("nan")}),
    ("rrhf", {"prompt": "q", "responses": ["a", "b"], "scores": [1, float("inf")]}),
    ("ppo", {"messages": [{"role": "user", "content": "\udcff"}]}),
])
def test_each_kind_through_a_stage_fails_in_one_line(tmp_path, capsys, stage, row):
    from alignkit.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(row).encode() + b"\n")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main([stage, f"train_data={bad}", f"output_dir={out}", "max_steps=1", "eval_data=null",
              *(["reward=gold", "reward.task=sort"] if stage == "ppo" else [])])
    assert exit_info.value.code != 0
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err_lines) == 1 and f"{bad}:1" in err_lines[0] and "DataError" in err_lines[0], err_lines
    assert not any((out / name).exists() for name in ("final", "summary.json", "checkpoints"))
