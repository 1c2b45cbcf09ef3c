"""`alignkit data check` numbers on hand-made files with a one-token-per-word tokenizer."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from alignkit.data.chat import tokenize_conversation
from alignkit.data.check import format_data_check, mark_supervised, run_data_check
from alignkit.models.tokenizer import CHAT_TEMPLATE, train_bpe_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


@pytest.fixture(scope="module")
def word_tok():
    """Every word is one token and newlines vanish, so lengths are easy to count by hand:
    a turn is <|im_start|> role words... <|im_end|> = words + 3 tokens; the generation
    prompt is <|im_start|> assistant = 2 tokens."""
    words = ["[UNK]"] + SPECIALS + ["system", "user", "assistant"] + list(string.ascii_lowercase)
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|pad|>", unk_token="[UNK]"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def words(n: int) -> str:
    return " ".join(string.ascii_lowercase[i % 26] for i in range(n))


def write(path: Path, rows: list, bad_line: str | None = None) -> str:
    lines = [json.dumps(r) for r in rows] + ([bad_line] if bad_line else [])
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_sft_numbers(tmp_path, word_tok):
    # (user words, assistant words) -> full length 6 + k + m:
    # (1,1) 8, (2,3) 11, (8,1) 15, (1,10) 17.
    rows = [{"prompt": words(k), "completion": words(m)} for k, m in [(1, 1), (2, 3), (8, 1), (1, 10)]]
    path = write(tmp_path / "sft.jsonl", rows, bad_line=json.dumps({"prompt": "a", "completion": ""}))
    report = run_data_check(path, None, word_tok, max_length=12)
    assert report["kind"] == "sft"
    assert (report["n_records"], report["n_invalid"]) == (4, 1)
    assert "sft.jsonl:5" in report["invalid_examples"][0]
    # Nearest rank over [8, 11, 15, 17]: p50 -> 2nd, p90 and p99 -> 4th.
    assert report["tokens"] == {"total": 51, "p50": 11, "p90": 17, "p99": 17, "max": 17}
    # 15 and 17 exceed 12. (8,1): prompt header is 2+8+1+2 = 13 tokens, so nothing trained is
    # left; (1,10): the header is 6 tokens, 6 trained tokens remain.
    assert report["n_truncated"] == 2
    assert report["n_no_supervised"] == 1
    assert "[[a <|im_end|>]]" in report["example"]
    text = format_data_check(report)
    assert "records:     4 valid, 1 invalid (skipped)" in text
    assert "truncated:   2 (50.0%)" in text
    assert "lose every supervised token (dropped): 1 (25.0%)" in text
    assert "p50 11  p90 17  p99 17  max 17  total 51" in text


def test_preference_numbers(tmp_path, word_tok):
    rows = [
        # sides: 6 + 2 + 1 = 9 and 6 + 2 + 4 = 12 -> length 12; truncated at 10, rejected keeps
        # 3 trained tokens (its header is 7 tokens).
        {"prompt": words(2), "chosen": words(1), "rejected": "z y x w"},
        # sides 6 + 6 + 1 = 13 > 10: the prompt loses its start, both completions (2 tokens) survive.
        {"prompt": words(6), "chosen": "z", "rejected": "y"},
        # 6 + 1 + 1 = 8 both sides: fits.
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        # rejected 6 + 1 + 10 = 17: its completion alone (10 words + <|im_end|>) exceeds 10, the pair is lost.
        {"prompt": "a", "chosen": "b", "rejected": words(10)},
    ]
    report = run_data_check(write(tmp_path / "p.jsonl", rows), None, word_tok, max_length=10)
    assert report["kind"] == "preference"
    # Record lengths [12, 13, 8, 17]: nearest-rank p50 of [8, 12, 13, 17] is 12, p90 17.
    assert report["tokens"] == {"total": 50, "p50": 12, "p90": 17, "p99": 17, "max": 17}
    assert (report["n_truncated"], report["n_no_supervised"]) == (3, 1)


def test_prompts_numbers(tmp_path, word_tok):
    # Rendered prompt with generation prompt: 5 + k tokens -> 6, 8, 9 at max_length 8.
    rows = [{"prompt": words(k)} for k in (1, 3, 4)]
    report = run_data_check(write(tmp_path / "q.jsonl", rows), None, word_tok, max_length=8)
    assert report["kind"] == "prompts"
    assert report["tokens"] == {"total": 23, "p50": 8, "p90": 9, "p99": 9, "max": 9}
    # 9 > 8 is truncated; 8 and 9 leave no room to generate.
    assert (report["n_truncated"], report["n_no_supervised"]) == (1, 2)
    assert "no room left to generate: 2" in format_data_check(report)


def test_text_token_counts_only(tmp_path, word_tok):
    rows = [{"text": words(3)}, {"text": words(9)}]  # + separator: 4 and 10 tokens
    report = run_data_check(write(tmp_path / "t.jsonl", rows), None, word_tok, max_length=5)
    assert report["kind"] == "text"
    assert report["tokens"] == {"total": 14, "p50": 4, "p90": 10, "p99": 10, "max": 10}
    assert "n_truncated" not in report and "n_no_supervised" not in report
    assert "truncated" not in format_data_check(report)


def test_ranked_numbers(tmp_path, word_tok):
    # prompt 1 word: sides 6 + 1 + m for m in (1, 4) -> 8 and 11; at max_length 9 the longer is
    # truncated from the left and keeps its 5 trained tokens.
    # A 4-word prompt: sides of 11, cut from the left, the 2-token completions survive.
    # A 9-word response (10 trained tokens with <|im_end|>) cannot fit in 9: that list is lost.
    rows = [
        {"prompt": "a", "responses": ["b", "c d e f"], "scores": [1, 0]},
        {"prompt": words(4), "responses": ["b", "c"], "ranks": [1, 2]},
        {"prompt": "a", "responses": ["b", words(9)], "scores": [1, 0]},
    ]
    report = run_data_check(write(tmp_path / "r.jsonl", rows), None, word_tok, max_length=9)
    assert report["kind"] == "ranked"
    assert report["tokens"] == {"total": 11 + 11 + 16, "p50": 11, "p90": 16, "p99": 16, "max": 16}
    assert (report["n_truncated"], report["n_no_supervised"]) == (3, 1)


def test_marked_example_exact_with_bpe():
    rng = random.Random(0)
    tok = train_bpe_tokenizer(
        [" ".join(rng.choice(["sort", "one", "two"]) for _ in range(5)) for _ in range(100)], vocab_size=280
    )
    messages = [
        {"role": "user", "content": "sort two one"},
        {"role": "assistant", "content": "one two"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "sort"},
    ]
    example = tokenize_conversation(tok, messages, 1000)
    assert mark_supervised(tok, example) == (
        "<|im_start|>user\nsort two one<|im_end|>\n<|im_start|>assistant\n[[one two<|im_end|>]]\n"
        "<|im_start|>user\ntwo<|im_end|>\n<|im_start|>assistant\n[[sort<|im_end|>]]\n"
    )


def test_example_when_every_record_loses_its_supervision(tmp_path, word_tok):
    rows = [{"prompt": words(8), "completion": "z"}]  # 13-token header
    report = run_data_check(write(tmp_path / "s.jsonl", rows), None, word_tok, max_length=5)
    assert report["n_no_supervised"] == 1
    assert report["example"] == (
        "<|im_start|> user a b c\n(no supervised token left within max_length=5)"
    )


def test_cli_data_check_counts_bad_records_instead_of_stopping(tmp_path, capsys):
    # without --model the check trains a tokenizer on the records first: a bad record must not stop that
    from alignkit.cli import main

    path = tmp_path / "mixed.jsonl"
    good = json.dumps({"prompt": "sort 3 1 2", "completion": "1 2 3"})
    path.write_text("\n".join([good, '{"prompt": 5}', good]) + "\n")
    with pytest.raises(SystemExit) as done:
        main(["data", "check", str(path)])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "mixed.jsonl:2" in out
