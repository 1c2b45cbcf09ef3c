"""Per-sequence log-probabilities of many (prompt, response) examples in few, padding-free forwards.

Preference methods (DPO, RRHF, reward models) score several responses per prompt. Instead of padding
every response to the longest one (most of a padded batch is then pad), examples are packed
first-fit-decreasing into rows of at most `row_tokens` tokens, each isolated by position-id resets
(transformers builds the block-diagonal mask), and per-token log-probs are summed back per example.
"""

from __future__ import annotations

import torch

from alignkit.data.packing import first_fit_decreasing
from alignkit.ops import logprobs_from_logits


def pack_for_forward(examples: list[dict], row_tokens: int, pad_id: int, device) -> dict[str, torch.Tensor]:
    """Pack `examples` ({input_ids, labels} lists) into rows; also return which example each token is.

    Returns input_ids[R,T], position_ids[R,T], labels[R,T] (-100 = no loss, incl. each example's first
    token) and segment[R,T] (example index, -1 on padding).
    """
    lengths = [len(e["input_ids"]) for e in examples]
    capacity = max(row_tokens, max(lengths))
    bins = first_fit_decreasing(lengths, capacity)
    width = max(sum(lengths[i] for i in b) for b in bins)
    input_ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), -100, dtype=torch.long)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    segment = torch.full((len(bins), width), -1, dtype=torch.long)
    for r, members in enumerate(bins):
        start = 0
        for i in members:
            n = lengths[i]
            input_ids[r, start : start + n] = torch.tensor(examples[i]["input_ids"])
            labels[r, start + 1 : start + n] = torch.tensor(examples[i]["labels"][1:])
            position_ids[r, start : start + n] = torch.arange(n)
            segment[r, start : start + n] = i
            start += n
        # Padding continues counting positions so it forms a segment of its own.
        position_ids[r, start:] = torch.arange(width - start)
    return {k: v.to(device) for k, v in
            {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segment": segment}.items()}


def sequence_logps(model, examples: list[dict], pad_id: int, row_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of label log-probs [N], number of label tokens [N]) for each example; differentiable.

    Label tokens are those with labels != -100 (the response and its end-of-turn token).
    """
    device = next(model.parameters()).device
    batch = pack_for_forward(examples, row_tokens, pad_id, device)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    # Token t is predicted from position t-1.
    token_logps = logprobs_from_logits(logits[:, :-1].float(), batch["labels"][:, 1:])
    counted = (batch["labels"][:, 1:] != -100)
    seg = batch["segment"][:, 1:].clamp(min=0)
    n = len(examples)
    sums = torch.zeros(n, device=device, dtype=token_logps.dtype).index_add(
        0, seg[counted], token_logps[counted]
    )
    counts = torch.zeros(n, device=device).index_add(0, seg[counted], torch.ones_like(token_logps[counted]))
    return sums, counts
