"""Byte-level BPE training, the ChatML template and the save/load round trip."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from alignkit.models.tokenizer import CHAT_TEMPLATE, train_bpe_tokenizer


def _corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["sort", "the", "numbers", "please", "hello", "world", "reply", "with", "a", "list"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(_corpus(), vocab_size=300)


def test_special_tokens_and_settings(tok):
    assert tok.bos_token == "<|im_start|>"
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|pad|>"
    assert tok.unk_token is None
    assert tok.padding_side == "right"
    assert tok.model_max_length >= 100_000
    # Special tokens come first in the vocabulary, in a fixed order.
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"])
    assert ids == [0, 1, 2, 3]
    assert len(tok) == 300


def test_no_implicit_bos_or_eos(tok):
    ids = tok("hello world")["input_ids"]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    assert tok.decode(ids) == "hello world"


def test_merges_learned_from_corpus(tok):
    # "hello" appears hundreds of times: BPE must have merged it into far fewer than 5 byte tokens.
    assert len(tok("hello")["input_ids"]) < 5


@pytest.mark.parametrize(
    "text",
    [
        "hello world",
        "  leading and trailing spaces  ",
        "Grüße, ça va? naïve façade",
        "日本語のテキスト 中文 한국어",
        "emoji 🙂👍🏽 and zwj 👨‍👩‍👧",
        "tabs\tand\nnewlines\r\n\n",
        "math ∑∫√ and symbols ¥€£",
        "",
    ],
)
def test_decode_encode_roundtrip_unicode(tok, text):
    assert tok.decode(tok(text)["input_ids"]) == text


def test_roundtrip_random_unicode(tok):
    rng = random.Random(1)
    for _ in range(50):
        text = "".join(chr(rng.randint(1, 0x2FFFF)) for _ in range(rng.randint(1, 30)))
        # Surrogate code points cannot be encoded as UTF-8; they are not valid text.
        text = "".join(c for c in text if not 0xD800 <= ord(c) <= 0xDFFF)
        assert tok.decode(tok(text)["input_ids"]) == text


def test_deterministic(tok):
    again = train_bpe_tokenizer(_corpus(), vocab_size=300)
    assert again.get_vocab() == tok.get_vocab()
    text = "please sort the numbers 3 1 2"
    assert again(text)["input_ids"] == tok(text)["input_ids"]


def test_chat_template_exact_strings(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n"
    )
    # No default system prompt is injected, unlike SmolLM2's own template.
    assert tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_special_tokens_are_single_ids(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids


def test_save_load_roundtrip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Grüße 🙂 sort the numbers <|im_end|>"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded.chat_template == CHAT_TEMPLATE
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|pad|>",
    )
    assert loaded.padding_side == "right"
    assert loaded.get_vocab() == tok.get_vocab()
