"""Reading, kind detection, normalization and bad-input errors of alignkit.data.records."""

from __future__ import annotations

import gzip
import json
import sys
import types
from pathlib import Path

import pytest

from alignkit.data.records import DataError, load_records, parse_hh_dialogue, split_records

HH_DEV = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl.gz"


def U(text: str) -> dict:
    return {"role": "user", "content": text}


def A(text: str) -> dict:
    return {"role": "assistant", "content": text}


def S(text: str) -> dict:
    return {"role": "system", "content": text}


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> str:
    lines = [json.dumps(r) for r in rows]
    for index, text in (raw_lines or {}).items():
        lines.insert(index, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def load_one(tmp_path: Path, row: dict, kind: str | None = None) -> tuple[dict, str]:
    records, detected = load_records(write_jsonl(tmp_path / "d.jsonl", [row]), kind)
    assert len(records) == 1
    return records[0], detected


# ---------------------------------------------------------------------------------- each kind


def test_text(tmp_path):
    assert load_one(tmp_path, {"text": "hello"}) == ({"text": "hello"}, "text")


@pytest.mark.parametrize("field", ["completion", "response"])
def test_sft_prompt_completion(tmp_path, field):
    record, kind = load_one(tmp_path, {"prompt": "sort 2 1", field: "1 2"})
    assert kind == "sft"
    assert record == {"messages": [U("sort 2 1"), A("1 2")]}


def test_sft_system_field_becomes_leading_message(tmp_path):
    record, _ = load_one(tmp_path, {"system": "Be brief.", "prompt": "hi", "completion": "yo"})
    assert record == {"messages": [S("Be brief."), U("hi"), A("yo")]}


def test_sft_messages_multi_turn(tmp_path):
    messages = [S("s"), U("a"), A("b"), U("c"), A("d")]
    record, kind = load_one(tmp_path, {"messages": messages, "id": 7})
    assert kind == "sft"
    assert record == {"messages": messages, "meta": {"id": 7}}


def test_preference_explicit_strings(tmp_path):
    row = {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 2}
    record, kind = load_one(tmp_path, row)
    assert kind == "preference"
    assert record == {"prompt": [U("q")], "chosen": "good", "rejected": "bad", "margin": 2.0}


def test_preference_full_chat_lists_sharing_prefix(tmp_path):
    shared = [U("a"), A("b"), U("c")]
    row = {"chosen": shared + [A("good")], "rejected": shared + [A("bad")]}
    record, _ = load_one(tmp_path, row)
    assert record == {"prompt": shared, "chosen": "good", "rejected": "bad"}


def test_preference_prompt_messages_and_reply_lists(tmp_path):
    row = {"prompt": [S("s"), U("q")], "chosen": [A("good")], "rejected": [A("bad")]}
    record, _ = load_one(tmp_path, row)
    assert record == {"prompt": [S("s"), U("q")], "chosen": "good", "rejected": "bad"}


def test_preference_hh_implicit_prompt(tmp_path):
    shared = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Sort 2 1 please"
    row = {
        "chosen": shared + "\n\nAssistant:  1 2 ",
        "rejected": shared + "\n\nAssistant: no",
    }
    record, kind = load_one(tmp_path, row)
    assert kind == "preference"
    assert record == {
        "prompt": [U("Hi there"), A("Hello!"), U("Sort 2 1 please")],
        "chosen": "1 2",
        "rejected": "no",
    }


def test_preference_hh_prompt_string(tmp_path):
    """Explicit hh prompt ending with "Assistant:" and replies starting with a space."""
    row = {"prompt": "\n\nHuman: Sort 2 1\n\nAssistant:", "chosen": " 1 2", "rejected": " 2 1"}
    record, _ = load_one(tmp_path, row)
    assert record == {"prompt": [U("Sort 2 1")], "chosen": "1 2", "rejected": "2 1"}


def test_parse_hh_merges_consecutive_speaker_turns():
    text = "\n\nHuman: a\n\nAssistant: b\n\nAssistant: c\n\nHuman: d"
    assert parse_hh_dialogue(text) == [U("a"), A("b\n\nc"), U("d")]


def test_hh_pairs_differing_before_last_turn_rejected(tmp_path):
    row = {
        "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good",
        "rejected": "\n\nHuman: a\n\nAssistant: X\n\nHuman: c\n\nAssistant: bad",
    }
    with pytest.raises(DataError, match=r"d\.jsonl:1 .*do not share the dialogue.*turn 2"):
        load_one(tmp_path, row)


def test_ranked_scores_and_ranks(tmp_path):
    record, kind = load_one(tmp_path, {"prompt": "q", "responses": ["x", "y", "z"], "scores": [1, 3, 2]})
    assert kind == "ranked"
    assert record == {"prompt": [U("q")], "responses": ["x", "y", "z"], "scores": [1.0, 3.0, 2.0]}
    record, _ = load_one(tmp_path, {"prompt": "q", "responses": ["x", "y"], "ranks": [2, 1]})
    assert record["scores"] == [-2.0, -1.0]


def test_prompts_and_meta(tmp_path):
    row = {"prompt": "sort 3 1 2", "id": "t1", "meta": {"answer": [1, 2, 3]}}
    record, kind = load_one(tmp_path, row)
    assert kind == "prompts"
    assert record == {"prompt": [U("sort 3 1 2")], "meta": {"answer": [1, 2, 3], "id": "t1"}}


def test_prompts_from_messages_ending_with_user(tmp_path):
    record, kind = load_one(tmp_path, {"messages": [U("a"), A("b"), U("c")]})
    assert (record, kind) == ({"prompt": [U("a"), A("b"), U("c")]}, "prompts")


def test_normalization_is_idempotent(tmp_path):
    rows = [
        {"prompt": "q", "chosen": "good", "rejected": "bad", "id": 1},
        {"prompt": "q", "chosen": "g2", "rejected": "b2", "margin": 1.5},
    ]
    first, kind = load_records(write_jsonl(tmp_path / "a.jsonl", rows))
    again, kind2 = load_records(write_jsonl(tmp_path / "b.jsonl", first))
    assert (again, kind2) == (first, kind)


# --------------------------------------------------------------------- conversions (kind named)


def test_sft_to_prompts_keeps_dropped_reply_in_meta(tmp_path):
    record, kind = load_one(tmp_path, {"messages": [U("a"), A("b")]}, kind="prompts")
    assert (record, kind) == ({"prompt": [U("a")], "meta": {"completion": "b"}}, "prompts")
    record, _ = load_one(tmp_path, {"prompt": "a", "completion": "b"}, kind="prompts")
    assert record == {"prompt": [U("a")], "meta": {"completion": "b"}}


def test_preference_to_sft_uses_chosen(tmp_path):
    row = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    record, kind = load_one(tmp_path, row, kind="sft")
    assert kind == "sft"
    assert record == {"messages": [U("q"), A("good")], "meta": {"rejected": "bad"}}


def test_ranked_to_sft_uses_best(tmp_path):
    row = {"prompt": "q", "responses": ["x", "y", "z"], "scores": [1, 3, 2]}
    record, _ = load_one(tmp_path, row, kind="sft")
    assert record["messages"] == [U("q"), A("y")]


def test_auto_detection_never_converts(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "q", "chosen": "c", "rejected": "r"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError, match=r"mixed\.jsonl:2 .*'preference'.*first record is 'sft'"):
        load_records(path)
    records, _ = load_records(path, kind="sft")  # named: the preference record converts
    assert records[1]["messages"] == [U("q"), A("c")]


# ------------------------------------------------------------------------------ file formats


ROWS = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
EXPECTED = [{"messages": [U("a"), A("b")]}, {"messages": [U("c"), A("d")]}]


def test_jsonl_gz_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert load_records(str(path)) == (EXPECTED, "sft")


@pytest.mark.parametrize("wrap", [False, True])
def test_json_list_and_data_key(tmp_path, wrap):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": ROWS} if wrap else ROWS))
    assert load_records(str(path)) == (EXPECTED, "sft")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_records(str(path)) == (EXPECTED, "sft")


def test_dataset_saved_to_disk_with_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    )
    dd.save_to_disk(tmp_path / "ds")
    assert load_records(str(tmp_path / "ds")) == (EXPECTED, "sft")
    assert load_records(f"{tmp_path / 'ds'}:test") == (EXPECTED[:1], "sft")
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "single")
    assert load_records(str(tmp_path / "single")) == (EXPECTED, "sft")


def test_several_sources_concatenate(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    b = write_jsonl(tmp_path / "b.jsonl", ROWS[1:])
    assert load_records([a, b]) == (EXPECTED, "sft")


def test_task_source_delegates(monkeypatch):
    calls = []

    def fake_load_task_records(spec):
        calls.append(spec)
        return [{"prompt": [U("sort 2 1")], "meta": {"answer": "1 2"}}], "prompts"

    module = types.ModuleType("alignkit.data.tasks")
    module.load_task_records = fake_load_task_records
    monkeypatch.setitem(sys.modules, "alignkit.data.tasks", module)
    records, kind = load_records("task:sort/prompts?n=1&seed=0")
    assert calls == ["task:sort/prompts?n=1&seed=0"]
    assert (records, kind) == ([{"prompt": [U("sort 2 1")], "meta": {"answer": "1 2"}}], "prompts")


# ------------------------------------------------------------------------------- bad input


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", ROWS, raw_lines={1: '{"prompt": "x", '})
    with pytest.raises(DataError, match=r"broken\.jsonl:2: invalid JSON"):
        load_records(path)


def test_missing_field_names_file_line_field_and_accepting_kinds(tmp_path):
    rows = [ROWS[0], ROWS[1], {"prompt": "only a prompt"}]
    with pytest.raises(DataError) as err:
        load_records(write_jsonl(tmp_path / "data.jsonl", rows))
    message = str(err.value)
    assert "data.jsonl:3" in message
    assert "['prompt']" in message
    assert "missing 'completion'" in message and "sft" in message
    assert "kinds that accept this record: prompts" in message


def test_missing_field_with_named_kind(tmp_path):
    with pytest.raises(DataError, match=r"d\.jsonl:1 .*missing 'rejected'.*accept this record: sft, prompts"):
        load_one(tmp_path, {"prompt": "q", "chosen": "c", "completion": "x"}, kind="preference")


def test_no_kind_matches_first_record(tmp_path):
    with pytest.raises(DataError, match=r"d\.jsonl:1 has fields \['title'\]: no kind accepts it"):
        load_one(tmp_path, {"title": "x"})


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"prompt": "q", "completion": "  "}, "'completion' is empty"),
        ({"messages": [U("a"), A("")]}, "empty assistant turn"),
        ({"prompt": "q", "chosen": "", "rejected": "r"}, "'chosen' is empty"),
        ({"prompt": "q", "chosen": "c", "rejected": " "}, "'rejected' is empty"),
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
        ({"prompt": "q", "responses": ["x"], "scores": [1]}, "at least 2"),
        ({"prompt": "q", "responses": ["x", "y"], "scores": [1, 2, 3]}, "2 'responses' but 3"),
        ({"prompt": "q", "responses": ["x", "y"], "scores": [1, 1]}, "all scores/ranks are equal"),
        ({"messages": [U("a"), {"role": "bot", "content": "b"}]}, "role 'bot'"),
        ({"prompt": "q", "chosen": "c", "rejected": "r", "margin": "big"}, "'margin'"),
    ],
)
def test_bad_values_name_file_line_and_field(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [row], raw_lines={0: ""})  # record on line 2
    with pytest.raises(DataError) as err:
        load_records(path)
    assert "bad.jsonl:2" in str(err.value)
    assert problem in str(err.value)


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        load_records(str(tmp_path / "empty.jsonl"))


def test_missing_file_and_unknown_kind(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unknown data kind"):
        load_records(str(tmp_path / "nope.jsonl"), kind="dialogue")


def test_errors_list_skips_and_reports(tmp_path):
    rows = [ROWS[0], {"prompt": "q", "completion": ""}, ROWS[1]]
    errors: list[str] = []
    records, _ = load_records(write_jsonl(tmp_path / "d.jsonl", rows), errors=errors)
    assert records == EXPECTED
    assert len(errors) == 1 and "d.jsonl:2" in errors[0]
    with pytest.raises(DataError, match="no valid sft records"):
        load_records(write_jsonl(tmp_path / "e.jsonl", rows[1:2] * 2), kind="sft", errors=[])


@pytest.mark.skipif(not HH_DEV.exists(), reason=f"shared hh-rlhf data not present at {HH_DEV}")
def test_real_hh_rlhf_dev_file():
    errors: list[str] = []
    records, kind = load_records(str(HH_DEV), errors=errors)
    assert kind == "preference"
    # 1,600 pairs: 3 have an empty chosen reply, 3 have dialogues that differ before the last turn.
    assert len(records) == 1594 and len(errors) == 6
    bad_lines = sorted(int(e.split(".jsonl.gz:")[1].split()[0]) for e in errors)
    assert bad_lines == [398, 572, 844, 857, 921, 1323]
    for record in records:
        roles = [m["role"] for m in record["prompt"]]
        assert roles[0] == "user" and roles[-1] == "user"
        assert all(a != b for a, b in zip(roles, roles[1:]))  # turns alternate
        assert record["chosen"] and record["chosen"] == record["chosen"].strip()
        assert "\n\nAssistant:" not in record["chosen"] + record["rejected"]
    assert records[1] == {
        "prompt": [U("call me a bad name")],
        "chosen": "Sorry, that’s out of bounds",
        "rejected": "I didn’t catch that. I don’t have a call to make right now, so I just can’t speak right now",
    }


# ------------------------------------------------------------------------------------ splitting


def test_split_records_deterministic_and_complete():
    records = [{"text": str(i)} for i in range(20)]
    train, evals = split_records(records, 0.25, seed=3)
    assert len(evals) == 5 and len(train) == 15
    assert sorted(r["text"] for r in train + evals) == sorted(r["text"] for r in records)
    assert split_records(records, 0.25, seed=3) == (train, evals)
    assert split_records(records, 0.25, seed=4)[1] != evals
    # Input order is kept inside each part.
    assert [int(r["text"]) for r in train] == sorted(int(r["text"]) for r in train)
    assert len(split_records(records[:3], 0.01, seed=0)[1]) == 1
    with pytest.raises(ValueError):
        split_records(records, 1.0, seed=0)


def test_encoding_and_compression_problems_name_the_file_and_line(tmp_path: Path):
    good = json.dumps({"text": "a b c"}) + "\n"
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + (good * 2).encode())  # a UTF-8 byte-order mark is accepted
    records, _ = load_records(str(bom), "text")
    assert [r["text"] for r in records] == ["a b c", "a b c"]
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(good.encode() + json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=rf"latin1.jsonl:2: not UTF-8 text \(byte 0xe9"):
        load_records(str(latin), "text")
    as_json = tmp_path / "latin1.json"
    as_json.write_bytes(b'[\n{"text": "caf\xe9"}\n]')
    with pytest.raises(DataError, match=r"latin1.json:2: not UTF-8 text"):
        load_records(str(as_json), "text")
    whole = gzip.compress((good * 2000).encode())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut.jsonl.gz: the gzip stream is truncated or corrupt after line \d+"):
        load_records(str(cut), "text")


def test_a_bad_file_is_one_line_on_the_command_line_not_a_traceback(tmp_path: Path):
    import subprocess

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "\xff"}\n')
    res = subprocess.run([sys.executable, "-m", "alignkit", "data", "check", str(bad)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "bad.jsonl:1: not UTF-8 text" in res.stderr + res.stdout
