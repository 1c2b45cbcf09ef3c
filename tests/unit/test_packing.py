"""Packing, stream chunking and collation; packed loss equals unpacked loss on a real model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignkit.data.packing import chunk_stream, collate, pack_examples
from tests.helpers import tiny_llama

M = -100
PAD = 99


def test_first_fit_decreasing_hand_worked():
    # Lengths 5,3,4,2,6 into bins of 8. Decreasing: 6 -> bin0 (2 left), 5 -> bin1 (3 left),
    # 4 -> bin2 (4 left), 3 -> bin1 (0 left), 2 -> bin0 (0 left).
    lengths = [5, 3, 4, 2, 6]
    examples = [
        {"input_ids": [10 * (i + 1) + t for t in range(n)], "labels": [10 * (i + 1) + t for t in range(n)]}
        for i, n in enumerate(lengths)
    ]
    rows = pack_examples(examples, 8)
    assert [row["n_samples"] for row in rows] == [2, 2, 1]
    assert rows[0]["input_ids"] == [50, 51, 52, 53, 54, 55, 40, 41]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1]
    assert rows[0]["labels"] == [M, 51, 52, 53, 54, 55, M, 41]
    assert rows[1]["input_ids"] == [10, 11, 12, 13, 14, 20, 21, 22]
    assert rows[1]["labels"] == [M, 11, 12, 13, 14, M, 21, 22]
    assert rows[2] == {
        "input_ids": [30, 31, 32, 33],
        "labels": [M, 31, 32, 33],
        "position_ids": [0, 1, 2, 3],
        "n_samples": 1,
    }


def test_pack_keeps_existing_masks_and_is_deterministic():
    examples = [
        {"input_ids": [1, 2, 3], "labels": [M, M, 3]},
        {"input_ids": [4, 5], "labels": [M, 5]},
        {"input_ids": [6, 7, 8], "labels": [6, 7, 8]},
    ]
    rows = pack_examples(examples, 100)
    assert rows == pack_examples(examples, 100)
    # Equal lengths keep input order: sample 0, then sample 2, then sample 1.
    assert rows == [
        {
            "input_ids": [1, 2, 3, 6, 7, 8, 4, 5],
            "labels": [M, M, 3, M, 7, 8, M, 5],
            "position_ids": [0, 1, 2, 0, 1, 2, 0, 1],
            "n_samples": 3,
        }
    ]


def test_pack_rejects_overlong_example():
    with pytest.raises(ValueError, match="example 0 has 5 tokens"):
        pack_examples([{"input_ids": [1] * 5, "labels": [1] * 5}], 4)


def test_first_fit_many_examples_respects_capacity():
    lengths = [(i * 37) % 50 + 1 for i in range(500)]
    examples = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]
    rows = pack_examples(examples, 64)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    assert sum(r["n_samples"] for r in rows) == 500
    assert sum(len(r["input_ids"]) for r in rows) == sum(lengths)
    # First-fit decreasing never needs more than 11/9 OPT + 1 bins; OPT >= total / capacity.
    assert len(rows) <= 11 / 9 * (sum(lengths) / 64) + 2


def test_chunk_stream_position_resets():
    ids = [5, 6, 0, 7, 8, 9, 0, 4, 3]
    rows = chunk_stream(ids, 4, separator_id=0)
    assert rows == [
        {"input_ids": [5, 6, 0, 7], "labels": [5, 6, 0, 7], "position_ids": [0, 1, 2, 0]},
        {"input_ids": [8, 9, 0, 4], "labels": [8, 9, 0, 4], "position_ids": [0, 1, 2, 0]},
    ]
    last = chunk_stream(ids, 4, separator_id=0, drop_last=False)[-1]
    assert last == {"input_ids": [3], "labels": [3], "position_ids": [0]}


def test_collate_packed_and_unpacked():
    rows = [
        {"input_ids": [1, 2, 3], "labels": [M, 2, 3], "position_ids": [0, 1, 0]},
        {"input_ids": [4], "labels": [M], "position_ids": [0]},
    ]
    packed = collate(rows, pad_id=PAD, packed=True)
    assert set(packed) == {"input_ids", "labels", "position_ids"}
    assert packed["input_ids"].tolist() == [[1, 2, 3], [4, PAD, PAD]]
    assert packed["labels"].tolist() == [[M, 2, 3], [M, M, M]]
    # Padding restarts at 0: a segment of its own.
    assert packed["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    plain = collate(rows, pad_id=PAD, packed=False)
    assert set(plain) == {"input_ids", "labels", "attention_mask"}
    assert plain["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in plain.values())


# ------------------------------------------------------------------ equivalence on a real model


def _tiny_llama(attn: str):
    return tiny_llama(attn=attn, vocab_size=100, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=None, num_labels=2)


def _summed_loss(model, batch: dict) -> tuple[float, int]:
    """Summed token cross-entropy of logits[:, :-1] vs labels[:, 1:] and the token count."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
        labels.reshape(-1),
        ignore_index=M,
        reduction="sum",
    )
    return loss.item(), int((labels != M).sum())


def _samples() -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    samples = []
    for length, n_prompt in [(7, 3), (12, 5), (4, 1), (9, 9 - 2), (15, 4)]:
        ids = torch.randint(0, 98, (length,), generator=gen).tolist()
        samples.append({"input_ids": ids, "labels": [M] * n_prompt + ids[n_prompt:]})
    return samples


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("max_length", [64, 20])
def test_packed_loss_equals_unpacked(attn, max_length):
    model = _tiny_llama(attn)
    samples = _samples()
    unpacked_loss, unpacked_n = _summed_loss(model, collate(samples, PAD, packed=False))
    rows = pack_examples(samples, max_length)
    assert len(rows) == (1 if max_length == 64 else 3)
    packed_loss, packed_n = _summed_loss(model, collate(rows, PAD, packed=True))
    assert packed_n == unpacked_n == sum(sum(l != M for l in s["labels"][1:]) for s in samples)
    assert packed_loss == pytest.approx(unpacked_loss, abs=1e-5)
    # Without position-id resets the samples would see each other: the loss must differ.
    leaky = collate(rows, PAD, packed=False)
    leaky_loss, _ = _summed_loss(model, leaky)
    assert abs(leaky_loss - unpacked_loss) > 1e-3


def test_chunked_documents_are_isolated():
    model = _tiny_llama("sdpa")
    doc_a, doc_b = [11, 12, 13, 0], [21, 22, 23, 24, 25, 0]
    row = chunk_stream(doc_a + doc_b, 10, separator_id=0)[0]
    batch = collate([row], PAD, packed=True)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([doc_b]), use_cache=False).logits
    torch.testing.assert_close(packed[0, len(doc_a) :], alone[0], atol=1e-5, rtol=0)
