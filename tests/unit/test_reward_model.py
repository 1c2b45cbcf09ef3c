"""Reward model: packed rewards equal transformers' own, loading, input format, and the RM loss pieces."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

from alignkit.config import RMConfig
from alignkit.models.reward import (
    end_of_turn_id,
    ensure_reward_pad,
    load_reward_model,
    packed_rewards,
    reward_example,
    score_texts,
)
from alignkit.stages.rm import calibration, centering_sum, ordered_pairs, pair_margin, pair_summary, rows_loss_sum
from tests.helpers import tiny_llama

PROMPT = [{"role": "user", "content": "sort: c a b"}]


def tiny_rm(seed: int = 0):
    return tiny_llama(seed, classifier=True)


def random_example(n: int, seed: int) -> dict:
    ids = torch.randint(1, 50, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return {"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2 :]}


@pytest.fixture(scope="module")
def tokenizer():
    from alignkit.data.chat import ensure_chat_template
    from alignkit.models.tokenizer import train_bpe_tokenizer

    texts = ["sort: c a b", "a b c", "c b a", "sort: 3 1 2", "1 2 3", "hello there"] * 20
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    ensure_chat_template(tok)
    return tok


@pytest.fixture(scope="module")
def causal_lm_dir(tmp_path_factory, tokenizer) -> Path:
    from alignkit.models.loading import build_scratch_model

    out = tmp_path_factory.mktemp("causal")
    model = build_scratch_model("tiny", tokenizer, seed=0, overrides={"num_hidden_layers": 2, "hidden_size": 64,
                                                                      "intermediate_size": 128})
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------- packed rewards


def test_packed_rewards_equal_sequence_classification_one_by_one():
    model = tiny_rm()
    examples = [random_example(n, s) for s, n in enumerate([7, 3, 12, 5, 9, 1])]
    with torch.no_grad():
        packed = packed_rewards(model, examples, pad_id=0, row_tokens=16)
        alone = [model(torch.tensor([e["input_ids"]])).logits[0, 0].item() for e in examples]
    assert packed.shape == (6,)
    assert packed.tolist() == pytest.approx(alone, abs=1e-5)


def test_packed_rewards_gradients_equal_one_by_one():
    examples = [random_example(n, s) for s, n in enumerate([6, 4, 10])]
    packed_model, alone_model = tiny_rm(), tiny_rm()
    packed_rewards(packed_model, examples, pad_id=0, row_tokens=12).sum().backward()
    for e in examples:
        alone_model(torch.tensor([e["input_ids"]])).logits[0, 0].backward()
    for (name, a), b in zip(packed_model.named_parameters(), alone_model.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


# ------------------------------------------------------------------------------------- loading


def test_load_from_causal_lm_keeps_transformer_and_seeds_head(causal_lm_dir: Path):
    from transformers import AutoModelForCausalLM

    causal = AutoModelForCausalLM.from_pretrained(causal_lm_dir)
    rm_a, tok = load_reward_model(str(causal_lm_dir), new_head=True, seed=3)
    rm_b, _ = load_reward_model(str(causal_lm_dir), new_head=True, seed=3)
    rm_c, _ = load_reward_model(str(causal_lm_dir), new_head=True, seed=4)
    assert isinstance(rm_a, LlamaForSequenceClassification) and rm_a.config.num_labels == 1
    assert rm_a.score.weight.shape == (1, causal.config.hidden_size)
    assert torch.equal(rm_a.score.weight, rm_b.score.weight)
    assert not torch.equal(rm_a.score.weight, rm_c.score.weight)
    for name, weight in causal.model.state_dict().items():
        assert torch.equal(rm_a.model.state_dict()[name], weight), name
    assert rm_a.config.pad_token_id == tok.pad_token_id != end_of_turn_id(tok)


def test_saved_reward_model_reloads_with_transformers_and_same_rewards(causal_lm_dir: Path, tmp_path: Path):
    from alignkit.models.loading import save_model

    rm, tok = load_reward_model(str(causal_lm_dir), new_head=True, seed=1)
    save_model(rm, tok, tmp_path / "rm")
    responses = ["a b c", "c b a", "a b c d"]
    ours = score_texts(rm, tok, [PROMPT] * 3, responses, batch_size=2, max_length=64)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    again, _ = load_reward_model(str(tmp_path / "rm"), seed=99)  # a saved head is not re-initialised
    assert score_texts(again, tok, [PROMPT] * 3, responses, batch_size=8, max_length=64) == pytest.approx(ours, abs=1e-6)
    # transformers reads the reward at the last non-pad token of a right-padded batch: the end-of-turn.
    examples = [reward_example(tok, PROMPT, r, 64) for r in responses]
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [tok.pad_token_id] * (width - len(e["input_ids"])) for e in examples])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(e["input_ids"]) for e in examples])[:, None]).long()
    with torch.no_grad():
        theirs = reloaded(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()
    assert theirs == pytest.approx(ours, abs=1e-5)


def test_pad_equal_to_end_of_turn_is_replaced(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = "<|im_end|>"  # as SmolLM2 ships it
    pad_id = ensure_reward_pad(tok)
    assert pad_id == tok.pad_token_id == tok.convert_tokens_to_ids("<|pad|>")
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")


# ----------------------------------------------------------------------------------- input text


def test_reward_example_ends_at_end_of_turn(tokenizer):
    ex = reward_example(tokenizer, PROMPT, "a b c", 64)
    text = tokenizer.decode(ex["input_ids"])
    assert text.endswith("a b c<|im_end|>") and text.startswith("<|im_start|>user\nsort: c a b")
    assert not ex["truncated"]
    # The same text as a plain user string prompt.
    assert reward_example(tokenizer, "sort: c a b", "a b c", 64)["input_ids"] == ex["input_ids"]


def test_long_inputs_lose_the_prompt_start_never_the_response(tokenizer):
    full = reward_example(tokenizer, PROMPT, "a b c", 1000)
    response_tokens = sum(label != -100 for label in full["labels"])
    cut = reward_example(tokenizer, PROMPT, "a b c", response_tokens + 2)
    assert cut["truncated"] and cut["input_ids"] == full["input_ids"][-(response_tokens + 2):]
    assert reward_example(tokenizer, PROMPT, "a b c", response_tokens - 1) is None
    kept = reward_example(tokenizer, PROMPT, "a b c", response_tokens - 1, keep_cut_response=True)
    assert kept["input_ids"] == full["input_ids"][-(response_tokens - 1):]


# ------------------------------------------------------------------------------------- RM loss


def bt(diff: float) -> float:
    return math.log1p(math.exp(-diff))  # -log sigmoid(diff)


def test_ordered_pairs_skip_ties():
    assert ordered_pairs([2.0, 1.0, 3.0]) == [(0, 1), (2, 0), (2, 1)]
    assert ordered_pairs([1.0, 1.0, 0.0]) == [(0, 2), (1, 2)]


def test_ranked_loss_is_the_sum_over_its_pairs():
    cfg = RMConfig()
    rows = [{"scores": [2.0, 1.0, 3.0], "pairs": ordered_pairs([2.0, 1.0, 3.0])},
            {"scores": [1.0, 1.0, 0.0], "pairs": ordered_pairs([1.0, 1.0, 0.0])},
            {"scores": [1.0, 0.0], "pairs": [(0, 1)]}]
    rewards = [torch.tensor([0.5, -0.2, 0.1]), torch.tensor([0.3, 0.9, 0.4]), torch.tensor([0.2, 0.7])]
    expected = (bt(0.5 + 0.2) + bt(0.1 - 0.5) + bt(0.1 + 0.2)) + (bt(0.3 - 0.4) + bt(0.9 - 0.4)) + bt(0.2 - 0.7)
    assert rows_loss_sum(rewards, rows, cfg).item() == pytest.approx(expected, rel=1e-6)


def test_margin_modes_change_the_loss_as_hand_computed():
    pair = [{"scores": [1.0, 0.0], "pairs": [(0, 1)], "margin": 0.25}]
    rewards = [torch.tensor([1.0, 0.5])]
    assert rows_loss_sum(rewards, pair, RMConfig(margin="none")).item() == pytest.approx(bt(0.5), rel=1e-6)
    # field: -log sigmoid(1.0 - 0.5 - 0.25) = log(1 + e^-0.25) = 0.575939...
    assert rows_loss_sum(rewards, pair, RMConfig(margin="field")).item() == pytest.approx(0.5759394, rel=1e-6)
    ranked = [{"scores": [2.0, 1.0, 1.5], "pairs": ordered_pairs([2.0, 1.0, 1.5])}]
    r = [torch.tensor([0.3, 0.1, 0.0])]
    cfg = RMConfig(margin="scores", margin_scale=0.5)
    # pairs (0,1): 0.2 - 0.5*1.0; (0,2): 0.3 - 0.5*0.5; (2,1): -0.1 - 0.5*0.5
    expected = bt(0.2 - 0.5) + bt(0.3 - 0.25) + bt(-0.1 - 0.25)
    assert rows_loss_sum(r, ranked, cfg).item() == pytest.approx(expected, rel=1e-6)
    assert [pair_margin(ranked[0], i, j, cfg) for i, j in ranked[0]["pairs"]] == [0.5, 0.25, 0.25]


def test_pair_summary_accuracy_gold_and_calibration():
    # (chosen reward, rejected reward, loss, gold sign); diffs: 0.1, -0.2, 1.0, 2.0
    pairs = [(0.3, 0.2, 0.6, 1.0), (0.0, 0.2, 0.8, -1.0), (1.0, 0.0, 0.3, 0.0), (1.5, -0.5, 0.1, -1.0)]
    metrics, table = pair_summary(pairs, buckets=2)
    assert metrics["accuracy"] == 0.75
    assert metrics["margin"] == pytest.approx((0.1 - 0.2 + 1.0 + 2.0) / 4)
    assert metrics["loss"] == pytest.approx(0.45)
    assert metrics["chosen_reward_std"] == pytest.approx(torch.tensor([0.3, 0.0, 1.0, 1.5]).std(unbiased=False).item())
    # Gold: the tie is skipped; pair 1 right (gold +, RM +), pair 2 right (gold -, RM -), pair 4 wrong.
    assert metrics["gold_accuracy"] == pytest.approx(2 / 3)
    assert metrics["label_gold_agreement"] == pytest.approx(1 / 3)
    # |diff| buckets: {0.1, 0.2} -> 1/2 right, {1.0, 2.0} -> 2/2 right.
    assert [c["accuracy"] for c in table] == [0.5, 1.0]
    assert (metrics["accuracy_q1"], metrics["accuracy_q2"]) == (0.5, 1.0)
    assert table[0]["abs_diff_max"] == pytest.approx(0.2) and table[1]["abs_diff_min"] == pytest.approx(1.0)
    assert len(calibration([0.1] * 10, 4)) == 4 and sum(c["n"] for c in calibration([0.1] * 10, 4)) == 10


def test_reward_centering_weighs_each_row_by_its_pairs():
    rows = [{"pairs": [(0, 1)]}, {"pairs": [(0, 1), (0, 2), (1, 2)]}]
    rewards = [torch.tensor([1.0, -3.0]), torch.tensor([0.0, 1.0, 2.0])]
    # 1 pair * mean(1, 9) + 3 pairs * mean(0, 1, 4) = 5 + 5
    assert centering_sum(rewards, rows).item() == pytest.approx(10.0)
