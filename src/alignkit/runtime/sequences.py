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


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """Tokens the sequences of a group have in common at the start, capped so that every sequence keeps at
    least its last token out of the prefix (its own suffix is never empty)."""
    n = min(len(s) for s in sequences) - 1
    first = sequences[0]
    for t in range(max(n, 0)):
        if any(s[t] != first[t] for s in sequences[1:]):
            return t
    return max(n, 0)


def pack_shared_prefixes(
    examples: list[dict], group_sizes: list[int], row_tokens: int, pad_id: int, device, mask_dtype=None
) -> dict[str, torch.Tensor]:
    """Pack groups of examples that share a prompt (the K responses a reward model compares) so that each
    group's common prefix is in the forward ONCE and every response attends to it.

    examples: {"input_ids"} lists, the groups consecutive (group_sizes[g] examples each, sum = N). A group
    occupies  [prefix (P tokens), suffix_1, ..., suffix_K]  of one row; suffix k continues the positions of
    the prefix (P, P+1, ...) as if it followed it alone, and a 4D mask lets it see the prefix and itself
    (causally) but no other suffix, so every hidden state equals the one of the example forwarded alone.
    Groups are binned first-fit-decreasing into rows of max(row_tokens, longest group) tokens.

    Returns input_ids[R,T], position_ids[R,T], attention_mask[R,1,T,T] (bool: True = may attend; with
    mask_dtype, the additive float form eager attention takes: 0 or the dtype's min) and last[N], the flat
    index into R*T of each example's last token (where a reward model reads it); and token_at: per example,
    the flat index into R*T of each of its tokens (where a language model's log-probs are read, shared_prefix_logps).
    """
    ids = [e["input_ids"] for e in examples]
    starts = [sum(group_sizes[:g]) for g in range(len(group_sizes))]
    groups = [ids[s : s + k] for s, k in zip(starts, group_sizes)]
    prefixes = [shared_prefix_length(g) for g in groups]
    lengths = [p + sum(len(s) - p for s in g) for g, p in zip(groups, prefixes)]
    bins = first_fit_decreasing(lengths, max(row_tokens, max(lengths)))
    width = max(sum(lengths[g] for g in b) for b in bins)
    input_ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    mask = torch.zeros((len(bins), width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    last = torch.zeros(len(examples), dtype=torch.long)
    token_at: list[list[int]] = [[] for _ in examples]
    for r, members in enumerate(bins):
        at = 0
        for g in members:
            p = prefixes[g]
            input_ids[r, at : at + p] = torch.tensor(groups[g][0][:p], dtype=torch.long)
            position_ids[r, at : at + p] = torch.arange(p)
            mask[r, at : at + p, at : at + p] = causal[:p, :p]
            prefix_at, at = at, at + p
            for k, sequence in enumerate(groups[g]):
                n = len(sequence) - p
                input_ids[r, at : at + n] = torch.tensor(sequence[p:], dtype=torch.long)
                position_ids[r, at : at + n] = torch.arange(p, p + n)
                mask[r, at : at + n, prefix_at : prefix_at + p] = True
                mask[r, at : at + n, at : at + n] = causal[:n, :n]
                last[starts[g] + k] = r * width + at + n - 1
                token_at[starts[g] + k] = [*range(r * width + prefix_at, r * width + prefix_at + p),
                                           *range(r * width + at, r * width + at + n)]
                at += n
        idle = torch.arange(at, width)
        mask[r, idle, idle] = True  # padding sees only itself (a row of no keys would give NaN)
        position_ids[r, at:] = torch.arange(width - at)
    attention_mask = mask.unsqueeze(1)
    if mask_dtype is not None:
        zero = torch.zeros((), dtype=mask_dtype)
        attention_mask = torch.where(attention_mask, zero, torch.finfo(mask_dtype).min)
    return {"input_ids": input_ids.to(device), "position_ids": position_ids.to(device),
            "attention_mask": attention_mask.to(device), "last": last.to(device), "token_at": token_at}


def shared_prefix_mask(config, dtype: torch.dtype) -> tuple[bool, torch.dtype | None]:
    """(whether a model of this config takes pack_shared_prefixes' 4D mask, the mask_dtype to pack with): sdpa
    takes the bool mask (None), eager the additive float form in the model's dtype; flash-attention none."""
    attention = getattr(config, "_attn_implementation", "eager")
    return attention in ("sdpa", "eager"), (dtype if attention == "eager" else None)


def completion_logps(model, examples: list[dict], pad_id: int, row_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` with the LM head run only where a label is scored: (sums [N], label counts [N]).

    Prompt tokens are context, never scored, so projecting them onto the vocabulary is wasted work and
    memory ([rows, T, V] logits; V = 49k for SmolLM2). A forward pre-hook hands the head only the hidden
    states that predict a label, [1, K, H] for K scored tokens; everything else (packing, DDP, LoRA,
    gradient checkpointing) is the ordinary forward, so the result equals sequence_logps.
    """
    from alignkit.runtime.lm import head_projects_only, output_head

    if output_head(model) is None:
        return sequence_logps(model, examples, pad_id, row_tokens)
    device = next(model.parameters()).device
    batch = pack_for_forward(examples, row_tokens, pad_id, device)
    scored = batch["labels"][:, 1:] != -100  # token t+1 is scored from the hidden state at t
    predicts = torch.nn.functional.pad(scored, (0, 1), value=False)
    with head_projects_only(model, predicts):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    targets = batch["labels"][:, 1:][scored]
    token_logps = logprobs_from_logits(logits.float(), targets.unsqueeze(0))[0]
    segment = batch["segment"][:, 1:][scored]
    sums = torch.zeros(len(examples), device=device, dtype=token_logps.dtype).index_add(0, segment, token_logps)
    counts = torch.zeros(len(examples), device=device).index_add(0, segment, torch.ones_like(token_logps))
    return sums, counts


def shared_prefix_logps(model, examples: list[dict], group_sizes: list[int], pad_id: int,
                        row_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logps of examples that come in groups sharing a prompt (consecutive, group_sizes[g] each; a
    preference pair, RRHF's K responses): (sum of label log-probs [N], label tokens [N]); differentiable.

    Each group's common prefix is forwarded once (pack_shared_prefixes: a 4D mask lets every response read
    it), and the LM head projects only the positions that predict a label (runtime.lm.head_projects_only).
    On the tiny task the prompt is ~4/5 of a sequence, so K=4 responses forward ~2.5x fewer tokens. The
    numbers equal sequence_logps' to float rounding (tests/unit/test_shared_prefix.py). Attention that takes
    no 4D mask (flash-attention) falls back to completion_logps (one copy of the prompt per response, the
    head still only on predicting positions); a model without a plain LM head to sequence_logps."""
    from alignkit.runtime.lm import head_projects_only, output_head

    inner = getattr(model, "module", model)  # DDP / FSDP wrappers
    takes_mask, mask_dtype = shared_prefix_mask(getattr(inner, "config", None), next(model.parameters()).dtype)
    if output_head(model) is None:
        return sequence_logps(model, examples, pad_id, row_tokens)
    if not takes_mask:
        return completion_logps(model, examples, pad_id, row_tokens)
    device = next(model.parameters()).device
    batch = pack_shared_prefixes(examples, group_sizes, row_tokens, pad_id, device, mask_dtype)
    owner, predictor, target = [], [], []
    for n, (example, where) in enumerate(zip(examples, batch["token_at"])):
        for t, label in enumerate(example["labels"]):
            if t > 0 and label != -100:  # token t is predicted from the position of token t-1
                owner.append(n)
                predictor.append(where[t - 1])
                target.append(label)
    rows, width = batch["input_ids"].shape
    predicts = torch.zeros(rows * width, dtype=torch.bool)
    predictor_t = torch.tensor(predictor, dtype=torch.long)
    predicts[predictor_t] = True  # a shared prefix position may predict a label of several examples
    rank = torch.cumsum(predicts.long(), 0) - 1  # its row among the projected positions (row-major)
    with head_projects_only(model, predicts.view(rows, width).to(device)):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch["attention_mask"], use_cache=False).logits[0]  # [K, V]
    token_logps = logprobs_from_logits(logits[rank[predictor_t].to(device)].float()[None],
                                       torch.tensor(target, device=device)[None])[0]
    owner_t = torch.tensor(owner, dtype=torch.long, device=device)
    sums = torch.zeros(len(examples), device=device, dtype=token_logps.dtype).index_add(0, owner_t, token_logps)
    counts = torch.zeros(len(examples), device=device).index_add(0, owner_t, torch.ones_like(token_logps))
    return sums, counts
