"""Padding-free per-sequence log-probs equal the one-at-a-time computation."""

from __future__ import annotations

import torch

from alignkit.runtime.sequences import pack_for_forward, sequence_logps
from tests.helpers import tiny_llama


def tiny_model():
    return tiny_llama(pad_token_id=None, num_labels=2)  # LlamaConfig's own defaults for these two


def example(prompt_len: int, response_len: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (prompt_len + response_len,), generator=g).tolist()
    return {"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:]}


def reference_logps(model, ex: dict) -> tuple[float, int]:
    ids = torch.tensor([ex["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    total, count = 0.0, 0
    for t in range(1, len(ex["input_ids"])):
        if ex["labels"][t] != -100:
            total += logp[t - 1, ex["labels"][t]].item()
            count += 1
    return total, count


def test_packed_sequence_logps_equal_one_by_one():
    model = tiny_model()
    examples = [example(5, 3, 0), example(2, 9, 1), example(7, 1, 2), example(3, 4, 3), example(6, 6, 4)]
    with torch.no_grad():
        sums, counts = sequence_logps(model, examples, pad_id=0, row_tokens=16)
    for i, ex in enumerate(examples):
        ref_sum, ref_count = reference_logps(model, ex)
        assert counts[i].item() == ref_count
        assert abs(sums[i].item() - ref_sum) < 1e-4


def test_packing_fills_rows_and_marks_segments():
    examples = [example(3, 3, 0), example(2, 2, 1), example(1, 1, 2)]  # 6 + 4 + 2 tokens
    batch = pack_for_forward(examples, row_tokens=8, pad_id=0, device="cpu")
    # first-fit decreasing: [6-token, 2-token] then [4-token] padded to width 8
    assert batch["input_ids"].shape == (2, 8)
    assert batch["segment"][0].tolist() == [0] * 6 + [2] * 2
    assert batch["segment"][1].tolist() == [1] * 4 + [-1] * 4
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    # each example's first token never carries a label (no prediction across a boundary)
    assert batch["labels"][0, 6].item() == -100


def test_gradients_flow_through_sequence_logps():
    model = tiny_model().train()
    sums, _ = sequence_logps(model, [example(3, 4, 0), example(2, 5, 1)], pad_id=0, row_tokens=32)
    sums.sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
