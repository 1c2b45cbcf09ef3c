"""Pure tensor helpers shared by the losses, RL math and stages.

Imports torch only. Shapes: B=batch, T=tokens, V=vocabulary. `mask` is 1.0 on tokens that count
(a float or bool tensor broadcastable to `x`).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Log-probability of each label under the softmax of its logits.

    logits [B,T,V], labels [B,T] (already aligned: labels[b,t] is scored by logits[b,t]; callers
    shift, see `shift_for_causal_lm`) -> [B,T]. Positions whose label is `ignore_index` get 0.

    Memory: log p = logit[label] - logsumexp(logits). The logsumexp runs one row at a time, so the
    only temporary the size of a full row is [T,V] (never a second [B,T,V] log-softmax). Half
    precision logits are upcast to float32 one row at a time, because bf16 log-probs are too coarse
    for PPO importance ratios; the result is then float32.
    """
    _check_logits_labels(logits, labels)
    ignored = labels == ignore_index
    safe_labels = labels.masked_fill(ignored, 0)
    compute_dtype = torch.float32 if logits.dtype in _LOW_PRECISION else logits.dtype
    picked = torch.gather(logits, -1, safe_labels.unsqueeze(-1)).squeeze(-1).to(compute_dtype)
    normaliser = torch.stack([torch.logsumexp(row.to(compute_dtype), dim=-1) for row in logits])
    return (picked - normaliser).masked_fill(ignored, 0.0)


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B,T,V], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must have shape {tuple(logits.shape[:2])} (logits[B,T]), got {tuple(labels.shape)}"
        )


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x * mask over `dim` (all dims when None).

    Entries where mask == 0 are replaced by 0 before multiplying, so a NaN/inf in a padded position
    cannot leak into the sum (0 * nan would be nan).
    """
    weighted = torch.where(mask != 0, x * mask, torch.zeros_like(x))
    return weighted.sum() if dim is None else weighted.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Weighted mean of x over the entries that count: sum(x*mask) / sum(mask).

    An empty mask gives 0 (not NaN): the count is clamped to a tiny positive number, and the
    numerator is exactly 0 there.
    """
    mask = mask.to(x.dtype) if mask.dtype == torch.bool else mask
    count = mask.expand_as(x).sum() if dim is None else mask.expand_as(x).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over all masked entries (a scalar).

    unbiased=True applies Bessel's correction n/(n-1) with n = sum(mask); it needs n >= 2, and
    raises ValueError otherwise (a 1-token batch has no variance estimate).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).expand_as(x).sum()
        if n < 2:
            raise ValueError(f"unbiased masked_var needs at least 2 counted entries, got {float(n)}")
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) with mean and (unbiased) var over the masked entries.

    shift_mean=False adds the mean back (scales only), as PPO implementations do for rewards.
    Entries where mask == 0 are set to 0 so padding never carries a value downstream.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened, torch.zeros_like(whitened))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution at every position. logits [B,T,V] -> [B,T].

    H = logsumexp(z) - sum(softmax(z) * z), which avoids log(0) for tiny probabilities. Logits of
    -inf (banned tokens) have probability 0 and are zeroed in the product, since 0 * -inf is NaN.
    """
    probs = torch.softmax(logits, dim=-1)
    finite_logits = logits.masked_fill(logits == float("-inf"), 0.0)
    return torch.logsumexp(logits, dim=-1) - (probs * finite_logits).sum(-1)


def sequence_logprobs(
    token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """Sequence log-probability from per-token ones. token_logps [B,T], mask [B,T] -> [B].

    average=False: sum over counted tokens (DPO); True: mean over counted tokens (RRHF's
    length-normalised score).
    """
    if token_logps.shape != mask.shape:
        raise ValueError(
            f"mask must have the shape of token_logps {tuple(token_logps.shape)}, got {tuple(mask.shape)}"
        )
    if average:
        return masked_mean(token_logps, mask, dim=-1)
    return masked_sum(token_logps, mask, dim=-1)


def shift_for_causal_lm(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align next-token predictions with their targets.

    logits [B,T,V], labels [B,T] aligned with the INPUT ids -> (logits[B,T-1,V], labels[B,T-1]):
    the logits at position t predict the token at t+1. Both are views (no copy). Labels equal to
    `ignore_index` keep that value, so the result can go straight into `logprobs_from_logits` or
    cross-entropy with the same ignore index.
    """
    _check_logits_labels(logits, labels)
    if logits.shape[1] < 2:
        raise ValueError(f"need at least 2 positions to shift, got T={logits.shape[1]}")
    return logits[:, :-1, :], labels[:, 1:]


def pad_right(rows: list, value: float | int, dtype: torch.dtype) -> torch.Tensor:
    """Ragged 1-D rows (lists or tensors) -> [N, longest] with `value` after each row."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=dtype)
    return out


def forward_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Inputs of one padded forward over (prompt, response) sequences, responses occupying the last columns.

    Prompts are left-padded to a common width W and responses right-padded to R (the longest), so every
    response starts at column W and the logits of columns W-1 .. W+R-2 score them (`logits_to_keep=R+1`,
    last column dropped). Returns input_ids, attention_mask, position_ids [B,W+R]; labels [B,R] (response
    ids, -100 on padding); mask [B,R] float.
    """
    width = max(len(p) for p in prompt_ids)
    length = max(len(r) for r in response_ids)
    batch = len(prompt_ids)
    input_ids = torch.full((batch, width + length), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width + length), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, width - len(p) : width] = torch.as_tensor(p)
        input_ids[i, width : width + len(r)] = torch.as_tensor(r)
        attention[i, width - len(p) : width + len(r)] = 1
    position_ids = (attention.cumsum(1) - 1).clamp(min=0)
    labels = pad_right(response_ids, -100, torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids,
            "labels": labels, "mask": (labels != -100).float()}
