"""Chat rendering and loss masks: exact ids and labels on hand-built conversations."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from alignkit.data.chat import (
    IGNORE_INDEX,
    document_separator_id,
    ensure_chat_template,
    render_prompt,
    tokenize_conversation,
    tokenize_prompt_completion,
    tokenize_text,
)
from alignkit.models.tokenizer import CHAT_TEMPLATE, train_bpe_tokenizer

M = IGNORE_INDEX


def _corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["sort", "the", "numbers", "please", "hello", "world", "reply", "with", "a", "list"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(_corpus(), vocab_size=300)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _supervised_texts(tok, example: dict) -> list[str]:
    """Decoded text of each contiguous run of supervised tokens."""
    runs, current = [], []
    for tid, label in zip(example["input_ids"], example["labels"]):
        if label != M:
            assert label == tid
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(run) for run in runs]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_render_prompt_exact(tok):
    messages = [{"role": "system", "content": "S"}, user("sort 3 1 2")]
    assert render_prompt(tok, messages) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nsort 3 1 2<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_single_turn_exact_ids_and_labels(tok):
    head = "<|im_start|>user\nplease sort<|im_end|>\n<|im_start|>assistant\n"
    body = "hello world<|im_end|>"
    tail = "\n"
    # Special tokens split pre-tokenization, so pieces encode independently of each other.
    assert _ids(tok, head + body + tail) == _ids(tok, head) + _ids(tok, body) + _ids(tok, tail)
    example = tokenize_conversation(tok, [user("please sort"), assistant("hello world")], 100)
    assert example["input_ids"] == _ids(tok, head) + _ids(tok, body) + _ids(tok, tail)
    expected_labels = [M] * len(_ids(tok, head)) + _ids(tok, body) + [M] * len(_ids(tok, tail))
    assert example["labels"] == expected_labels
    # The end-of-turn token is trained; the newline after it is not.
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert example["labels"][-2] == eos and example["labels"][-1] == M


def test_multi_turn_every_assistant_turn_supervised(tok):
    messages = [
        user("sort 3 1"),
        assistant("1 3"),
        user("and world hello"),
        assistant("hello world"),
        user("thanks"),
        assistant("reply with a list"),
    ]
    example = tokenize_conversation(tok, messages, 1000)
    assert _supervised_texts(tok, example) == [
        "1 3<|im_end|>",
        "hello world<|im_end|>",
        "reply with a list<|im_end|>",
    ]
    assert tok.decode(example["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)
    n_masked = sum(label == M for label in example["labels"])
    n_trained = sum(len(_ids(tok, t + "<|im_end|>")) for t in ["1 3", "hello world", "reply with a list"])
    assert n_masked == len(example["input_ids"]) - n_trained


def test_system_message_masked(tok):
    messages = [{"role": "system", "content": "reply with a list"}, user("hello"), assistant("world")]
    example = tokenize_conversation(tok, messages, 100)
    assert _supervised_texts(tok, example) == ["world<|im_end|>"]
    system_len = len(_ids(tok, "<|im_start|>system\nreply with a list<|im_end|>\n"))
    assert example["labels"][:system_len] == [M] * system_len


def test_truncation_keeps_partial_assistant(tok):
    messages = [user("hi"), assistant("please sort the numbers with a list")]
    full = tokenize_conversation(tok, messages, 1000)
    n_head = len(_ids(tok, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"))
    cut = tokenize_conversation(tok, messages, n_head + 2)
    assert cut["input_ids"] == full["input_ids"][: n_head + 2]
    assert cut["labels"] == full["labels"][: n_head + 2]
    assert cut["labels"][n_head:] == full["input_ids"][n_head : n_head + 2]


def test_truncation_removing_all_assistant_tokens_gives_none(tok):
    messages = [user("please sort the numbers " * 5), assistant("hello")]
    n_head = len(_ids(tok, render_prompt(tok, messages[:1])))
    assert tokenize_conversation(tok, messages, n_head) is None
    assert tokenize_conversation(tok, messages, n_head + 1) is not None


def test_no_assistant_turn_gives_none(tok):
    assert tokenize_conversation(tok, [user("hello")], 100) is None


def test_prompt_completion_equals_conversation(tok):
    prompt = [user("sort 2 1")]
    example = tokenize_prompt_completion(tok, prompt, "1 2", 100)
    assert example == tokenize_conversation(tok, prompt + [assistant("1 2")], 100)
    assert tok.decode(example["input_ids"]) == render_prompt(tok, prompt) + "1 2<|im_end|>\n"
    assert _supervised_texts(tok, example) == ["1 2<|im_end|>"]


def test_prompt_completion_trains_only_the_completion(tok):
    """A multi-turn prompt's earlier assistant turns are context, not trained."""
    prompt = [user("sort 2 1"), assistant("1 2"), user("and 3 1")]
    example = tokenize_prompt_completion(tok, prompt, "1 3", 100)
    assert _supervised_texts(tok, example) == ["1 3<|im_end|>"]
    everything = tokenize_conversation(tok, prompt + [assistant("1 3")], 100)
    assert everything["input_ids"] == example["input_ids"]
    assert _supervised_texts(tok, everything) == ["1 2<|im_end|>", "1 3<|im_end|>"]


def test_prompt_completion_too_long_loses_the_start_of_its_prompt(tok):
    prompt = [user("sort 2 1"), assistant("1 2"), user("and 3 1")]
    full = tokenize_prompt_completion(tok, prompt, "1 3", 100)
    first_label = next(i for i, label in enumerate(full["labels"]) if label != M)
    n_completion = len(full["input_ids"]) - first_label  # "1 3", <|im_end|> and the template's newline
    for max_length in (len(full["input_ids"]) - 1, n_completion + 3, n_completion):
        cut = tokenize_prompt_completion(tok, prompt, "1 3", max_length)
        assert cut == {"input_ids": full["input_ids"][-max_length:], "labels": full["labels"][-max_length:]}
        assert _supervised_texts(tok, cut) == ["1 3<|im_end|>"]
    # The completion itself does not fit: nothing to train on, unless the caller keeps the cut completion.
    assert tokenize_prompt_completion(tok, prompt, "1 3", n_completion - 1) is None
    kept = tokenize_prompt_completion(tok, prompt, "1 3", n_completion - 1, keep_cut_completion=True)
    assert kept["input_ids"] == full["input_ids"][-(n_completion - 1):]


def test_other_template_style(tok):
    """Generic method: an [INST]-style template with no generation prompt and no newlines."""
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}"
    )
    tok2 = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")
    tok2.chat_template = template
    messages = [user("a"), assistant("hello"), user("b"), assistant("world")]
    example = tokenize_conversation(tok2, messages, 100)
    assert _supervised_texts(tok2, example) == [" hello</s>", " world</s>"]


def test_template_that_rewrites_history_is_rejected(tok):
    tok2 = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")
    tok2.chat_template = "{{ messages|length }}:{% for m in messages %}{{ m['content'] }};{% endfor %}"
    with pytest.raises(ValueError, match="prefix"):
        tokenize_conversation(tok2, [user("a"), assistant("b")], 100)


def test_ensure_chat_template_sets_template_and_dedicated_pad(tok):
    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")
    assert bare.chat_template is None and bare.pad_token is None
    ensure_chat_template(bare)
    assert bare.chat_template == CHAT_TEMPLATE
    assert bare.pad_token == "<|pad|>"


def test_ensure_chat_template_keeps_existing(tok):
    tok2 = PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok2.chat_template = "{{ 'x' }}"
    ensure_chat_template(tok2)
    assert tok2.chat_template == "{{ 'x' }}" and tok2.pad_token == "<|endoftext|>"


def _word_level_tokenizer(words: list[str], eos: str) -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos, unk_token="[UNK]")


def test_pad_falls_back_to_eos_and_separator_to_eos():
    tok2 = _word_level_tokenizer(["[UNK]", "</s>", "hello", "world"], eos="</s>")
    ensure_chat_template(tok2)
    assert tok2.pad_token == "</s>"
    # <|endoftext|> maps to [UNK] here, so it does not count as present.
    assert document_separator_id(tok2) == 1
    assert tokenize_text(tok2, "hello world") == [2, 3, 1]


def test_tokenize_text_appends_endoftext(tok):
    ids = tokenize_text(tok, "hello world")
    assert ids == _ids(tok, "hello world") + [tok.convert_tokens_to_ids("<|endoftext|>")]
    assert ids[-1] == 0 and tok.bos_token_id not in ids
