"""A prompt too long for max_length loses its START in dpo, rrhf, raft and best-of-n: the final assistant
response and its end-of-turn token survive, and what is kept of the prompt is a suffix of it."""

from __future__ import annotations

import pytest
import torch

from alignkit.data.chat import IGNORE_INDEX, NO_LIMIT, render_prompt, tokenize_conversation, tokenize_prompt_completion
from alignkit.data.records import normalize_record

MAX_LENGTH = 48
CHOSEN, REJECTED = "a b c", "c b a, I think"


def hh_dialogue(turns: int) -> str:
    """An hh-rlhf style dialogue of `turns` exchanges and a last question, ending at "\\n\\nAssistant:"."""
    text = ""
    for t in range(turns):
        text += f"\n\nHuman: question {t}: please sort the numbers {t} 3 1 2\n\nAssistant: the sorted list is 1 2 3 {t}"
    return text + "\n\nHuman: and the last one, sort c a b\n\nAssistant:"


@pytest.fixture(scope="module")
def tok():
    from alignkit.data.chat import ensure_chat_template
    from alignkit.models.tokenizer import train_bpe_tokenizer

    texts = [hh_dialogue(3), CHOSEN, REJECTED, "sort c a b", "the sorted list is"] * 20
    tokenizer = train_bpe_tokenizer(texts, vocab_size=400)
    ensure_chat_template(tokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def record() -> dict:
    dialogue = hh_dialogue(12)
    out = normalize_record({"chosen": dialogue + " " + CHOSEN, "rejected": dialogue + " " + REJECTED}, "preference", "test")
    assert len(out["prompt"]) == 25 and out["prompt"][-1]["content"] == "and the last one, sort c a b"
    return out


def check_kept(tok, prompt: list[dict], completion: str, example: dict) -> None:
    """The example fits, ends with the whole completion and its end-of-turn, after a suffix of the prompt."""
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) <= MAX_LENGTH
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    first, last = trained[0], trained[-1]
    assert trained == list(range(first, last + 1)) and labels[first : last + 1] == ids[first : last + 1]
    assert tok.decode(ids[first : last + 1]) == completion + "<|im_end|>"  # the whole completion, trained
    assert ids[last] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(ids[last + 1 :]) == "\n"  # only the template's newline after the end-of-turn
    full_prompt = tok(render_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    assert len(full_prompt) > MAX_LENGTH  # the prompt alone would not fit: it was cut
    assert 0 < first < len(full_prompt) and full_prompt[-first:] == ids[:first]  # a suffix of the prompt
    assert tok.decode(ids[:first]).endswith("sort c a b<|im_end|>\n<|im_start|>assistant\n")
    full = tokenize_prompt_completion(tok, prompt, completion, NO_LIMIT)
    assert full["input_ids"][-len(ids):] == ids  # the last MAX_LENGTH tokens of the whole sequence


def test_dpo_pairs_keep_the_final_response(tok, record):
    from alignkit.stages.dpo import tokenize_pairs

    # Cutting from the right, as before, left nothing of either completion: the pair was dropped.
    assert tokenize_conversation(tok, record["prompt"] + [{"role": "assistant", "content": CHOSEN}], MAX_LENGTH,
                                 last_turn_only=True) is None
    pairs, dropped = tokenize_pairs(tok, [record], MAX_LENGTH)
    assert dropped == {"truncated": 0, "identical": 0} and len(pairs) == 1
    check_kept(tok, record["prompt"], CHOSEN, pairs[0].chosen)
    check_kept(tok, record["prompt"], REJECTED, pairs[0].rejected)


def test_rrhf_lists_keep_the_final_response(tok, record):
    from alignkit.stages.rrhf import tokenize_lists

    responses = [CHOSEN, REJECTED, "b a c"]
    lists = [{"prompt": record["prompt"], "responses": responses, "rewards": [1.0, 0.0, 0.5]}]
    rows, dropped = tokenize_lists(tok, lists, MAX_LENGTH)
    assert dropped == {"dropped_responses": 0, "dropped_lists": 0} and rows[0]["best"] == 0
    for response, example in zip(responses, rows[0]["examples"]):
        check_kept(tok, record["prompt"], response, example)


def test_raft_and_best_of_n_fine_tuning_rows_keep_the_final_response(tok, record):
    from alignkit.stages.best_of_n import sft_rows
    from alignkit.stages.raft import kept_rows

    candidates = [[{"text": CHOSEN}, {"text": REJECTED}]]
    rows, dropped = kept_rows(tok, [record["prompt"]], candidates, torch.tensor([[True, True]]), MAX_LENGTH)
    assert dropped == 0 and len(rows) == 2
    check_kept(tok, record["prompt"], CHOSEN, rows[0])
    check_kept(tok, record["prompt"], REJECTED, rows[1])
    rows, dropped = sft_rows(tok, [record], candidates, [1], MAX_LENGTH)
    assert dropped == 0
    check_kept(tok, record["prompt"], REJECTED, rows[0])


def test_a_response_longer_than_max_length_is_still_dropped(tok, record):
    from alignkit.stages.dpo import tokenize_pairs

    long_reply = " ".join(["a b c"] * 30)
    pairs, dropped = tokenize_pairs(tok, [{**record, "rejected": long_reply}], MAX_LENGTH)
    assert pairs == [] and dropped["truncated"] == 1
