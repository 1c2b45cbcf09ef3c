"""Forwards `alignkit eval` scores text with: per-token log-probs of responses (the KL from samples) and the
held-out perplexity of plain text, packed into short rows.
"""

from __future__ import annotations

from typing import Any

import torch

from alignkit.eval import metrics as M

# Packed rows when scoring: short rows keep attention (quadratic in the row) cheap; an example longer
# than this gets a row of its own.
SCORE_ROW_TOKENS = 128

def _chunks(examples: list[dict], token_budget: int) -> list[list[int]]:
    """Consecutive index groups of at most `token_budget` tokens (at least one example each)."""
    groups, current, used = [], [], 0
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        if current and used + n > token_budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    return groups + [current] if current else groups


@torch.no_grad()
def token_logps(model, examples: list[dict], pad_id: int, row_tokens: int, token_budget: int,
                temperature: float = 1.0) -> list[torch.Tensor]:
    """Per-token log-probs of each example's label tokens: list of [T_n] float tensors (CPU).

    Same packing and shift as runtime.sequences.sequence_logps (their sums are equal), with logits
    divided by `temperature` (the distribution responses were sampled from). Examples are packed into
    rows of `row_tokens` (short rows: attention cost grows with the row length squared), at most
    `token_budget` tokens per forward.
    """
    from alignkit.ops import logprobs_from_logits
    from alignkit.runtime.sequences import pack_for_forward

    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for group in _chunks(examples, token_budget):
        batch = pack_for_forward([examples[i] for i in group], row_tokens, pad_id, device)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        labels = batch["labels"][:, 1:]
        lp = logprobs_from_logits(logits[:, :-1].float() / temperature, labels)
        counted = labels != -100
        seg = batch["segment"][:, 1:][counted]
        order = torch.argsort(seg, stable=True)  # row-major order keeps each example's tokens in sequence
        counts = torch.bincount(seg, minlength=len(group)).tolist()
        out.extend(t.cpu() for t in torch.split(lp[counted][order], counts))
    return out


@torch.no_grad()
def heldout_perplexity(model, tokenizer, texts: list[str], cfg: Any) -> dict[str, float]:
    """Token-level NLL and perplexity of pretraining-style texts (each truncated to max_length)."""
    from alignkit.data.chat import tokenize_text
    from alignkit.runtime.sequences import sequence_logps

    examples = [{"input_ids": ids, "labels": ids} for ids in (tokenize_text(tokenizer, t)[: cfg.max_length] for t in texts)]
    nll, tokens = 0.0, 0.0
    for group in _chunks(examples, cfg.score_tokens):
        sums, counts = sequence_logps(model, [examples[i] for i in group], tokenizer.pad_token_id, SCORE_ROW_TOKENS)
        nll, tokens = nll - sums.sum().item(), tokens + counts.sum().item()
    return {"heldout_nll": nll / max(tokens, 1.0), "heldout_ppl": M.perplexity(nll, tokens)}


def response_examples(generations: list, max_length: int) -> list[dict]:
    """{input_ids: prompt + response, labels: -100 on the prompt} per generation, cut to max_length."""
    out = []
    for g in generations:
        ids = (g.prompt_ids + g.response_ids)[:max_length]
        labels = ([-100] * len(g.prompt_ids) + g.response_ids)[:max_length]
        out.append({"input_ids": ids, "labels": labels})
    return out
