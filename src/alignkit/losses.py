"""Pure loss functions: language modelling, reward models, DPO/IPO, RRHF, PPO.

Imports torch only. Shapes: B=batch, T=tokens, V=vocabulary, K=responses per prompt. `mask` is
1.0 on tokens that count. Paper and equation for each function: docs/papers.md.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from alignkit.ops import IGNORE_INDEX, masked_mean, shift_for_causal_lm


def _check_same_shape(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    """Raise ValueError naming the first argument whose shape differs from `reference`."""
    for name, tensor in others.items():
        if tensor.shape != reference.shape:
            raise ValueError(
                f"{name} must have the shape of {reference_name} {tuple(reference.shape)}, "
                f"got {tuple(tensor.shape)}"
            )


def _check_dim(name: str, tensor: torch.Tensor, dim: int, what: str) -> None:
    if tensor.dim() != dim:
        raise ValueError(f"{name} must be {what}, got shape {tuple(tensor.shape)}")


# --------------------------------------------------------------------------- language modelling


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy. logits [B,T,V], labels [B,T] aligned with the INPUT ids -> scalar.

    The function shifts: logits[:, t] is scored against labels[:, t+1]. Labels equal to
    `ignore_index` do not count. reduction="mean": mean over counted tokens (0 when none count);
    "sum": the total, so a training loop can divide by the GLOBAL token count across processes and
    accumulation steps itself. Computed in float32 (bf16 cross-entropy is too coarse).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be one of ['mean', 'sum'], got {reduction!r}")
    shifted_logits, shifted_labels = shift_for_causal_lm(logits, labels, ignore_index)
    total = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]).float(),
        shifted_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    if reduction == "sum":
        return total
    counted = (shifted_labels != ignore_index).sum()
    return total / counted.clamp(min=1)


# --------------------------------------------------------------------------- reward models


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean(-logsigmoid(chosen - rejected - margin)). All [B] -> scalar.

    `margin` (Llama 2) asks the chosen reward to beat the rejected one by at least that much;
    None means 0 (InstructGPT / Stiennon et al.).
    """
    _check_same_shape("chosen_rewards", chosen_rewards, rejected_rewards=rejected_rewards)
    if margin is not None:
        _check_same_shape("chosen_rewards", chosen_rewards, margin=margin)
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference).mean()


def ranking_loss(
    rewards: torch.Tensor, scores: torch.Tensor, margin_scale: float = 0.0
) -> torch.Tensor:
    """Bradley-Terry over every ranked pair of K responses. rewards [B,K], scores [B,K] -> scalar.

    Every ordered pair (i, j) of one prompt with scores[b,i] > scores[b,j] contributes
    -logsigmoid(r_i - r_j - margin_scale * (score_i - score_j)); ties contribute nothing.
    Reduction: the mean over ALL contributing pairs in the batch (so a prompt with more ranked
    pairs weighs more, as in InstructGPT where each prompt's K-choose-2 pairs share one batch).
    With no contributing pair at all the loss is 0 (still attached to the graph).
    """
    _check_dim("rewards", rewards, 2, "[B,K]")
    _check_same_shape("rewards", rewards, scores=scores)
    scores = scores.to(rewards.dtype)
    better = scores.unsqueeze(2) > scores.unsqueeze(1)  # [B,K,K]: i beats j
    reward_gap = rewards.unsqueeze(2) - rewards.unsqueeze(1)
    score_gap = scores.unsqueeze(2) - scores.unsqueeze(1)
    pair_losses = -F.logsigmoid(reward_gap - margin_scale * score_gap)
    pair_losses = torch.where(better, pair_losses, torch.zeros_like(pair_losses))
    return pair_losses.sum() / better.sum().clamp(min=1)


def reward_centering_penalty(rewards: torch.Tensor) -> torch.Tensor:
    """mean(rewards ** 2): pulls reward-model outputs towards zero mean (use a small coefficient,
    e.g. 0.01), since the Bradley-Terry loss only sees reward differences. Any shape -> scalar."""
    return (rewards**2).mean()


# --------------------------------------------------------------------------- DPO family


def _dpo_sigmoid(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO; with label_smoothing > 0 the conservative DPO (cDPO) mixture."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def _dpo_ipo(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """IPO: squared distance of the log-ratio gap from 1/(2*beta) (beta plays IPO's tau)."""
    if label_smoothing != 0.0:
        raise ValueError("label_smoothing applies to loss_type 'sigmoid' only, not 'ipo'")
    return (h - 1 / (2 * beta)) ** 2


# The visible lookup of DPO variants: loss(h, beta, label_smoothing) -> losses[B].
LOSS_TYPES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": _dpo_sigmoid,
    "ipo": _dpo_ipo,
}


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO-family loss on summed sequence log-probs. All inputs [B].

    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected);
    sigmoid: -(1-ls)*logsigmoid(beta*h) - ls*logsigmoid(-beta*h); ipo: (h - 1/(2*beta))**2.
    Returns (losses[B], chosen_rewards[B], rejected_rewards[B]); the implicit rewards
    beta*(policy - ref) are detached (for metrics: reward accuracy = mean(chosen > rejected),
    margin = mean(chosen - rejected)). The caller reduces `losses` (usually .mean()).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {sorted(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    _check_same_shape(
        "policy_chosen_logps",
        policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    # The reference model is frozen: detaching makes that true even if a caller forgot no_grad.
    ref_chosen_logps, ref_rejected_logps = ref_chosen_logps.detach(), ref_rejected_logps.detach()
    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps
    losses = LOSS_TYPES[loss_type](chosen_log_ratio - rejected_log_ratio, beta, label_smoothing)
    chosen_rewards = beta * chosen_log_ratio.detach()
    rejected_rewards = beta * rejected_log_ratio.detach()
    return losses, chosen_rewards, rejected_rewards


# --------------------------------------------------------------------------- RRHF


def rrhf_loss(scores: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """RRHF ranking loss. scores [B,K] (length-normalised sequence log-probs), rewards [B,K].

    For each prompt: sum over pairs with rewards_i < rewards_j of relu(scores_i - scores_j), i.e.
    a worse response must not be more likely than a better one. Mean over B -> scalar.
    (The RRHF stage adds the SFT cross-entropy on the best response.)
    """
    _check_dim("scores", scores, 2, "[B,K]")
    _check_same_shape("scores", scores, rewards=rewards)
    worse = rewards.unsqueeze(2) < rewards.unsqueeze(1)  # [B,K,K]: i worse than j
    violation = torch.relu(scores.unsqueeze(2) - scores.unsqueeze(1))
    per_prompt = torch.where(worse, violation, torch.zeros_like(violation)).sum(dim=(1, 2))
    return per_prompt.mean()


# --------------------------------------------------------------------------- PPO


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> torch.Tensor:
    """Clipped surrogate. All [B,T] -> scalar.

    = masked_mean(max(-A*ratio, -A*clip(ratio, 1-eps, 1+eps))), ratio = exp(logprobs - old).
    old_logprobs and advantages are rollout constants and are detached. The general form (asymmetric clip,
    sequence ratio, other reductions) is importance_ratio -> clipped_policy_terms -> aggregate_loss.
    """
    _check_same_shape(
        "logprobs", logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask
    )
    ratio = torch.exp(logprobs - old_logprobs.detach())
    return masked_mean(clipped_policy_terms(ratio, advantages, clip_eps), mask)


def clip_fraction(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_low: float = 0.2,
                  clip_high: float | None = None) -> torch.Tensor:
    """Share of counted tokens where the clipped term is the active one (its gradient is 0): A > 0 with
    ratio > 1 + clip_high, or A < 0 with ratio < 1 - clip_low. All [B,T] -> scalar in [0, 1], detached."""
    high = clip_low if clip_high is None else clip_high
    with torch.no_grad():
        clipped = ((advantages > 0) & (ratio > 1 + high)) | ((advantages < 0) & (ratio < 1 - clip_low))
        return masked_mean(clipped.to(ratio.dtype), mask)


def ppo_clip_fraction(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> torch.Tensor:
    """clip_fraction of the token ratio exp(logprobs - old) with a symmetric clip. All [B,T] -> scalar."""
    return clip_fraction(torch.exp(logprobs - old_logprobs), advantages, mask, clip_eps)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> torch.Tensor:
    """Clipped value loss. All [B,T] -> scalar.

    = 0.5 * masked_mean(max((v-R)^2, (old + clip(v-old, -eps, eps) - R)^2)).
    old_values and returns are rollout constants and are detached.
    """
    _check_same_shape("values", values, old_values=old_values, returns=returns, mask=mask)
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    squared_error = torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    return 0.5 * masked_mean(squared_error, mask)


# --------------------------------------------------------------------------- policy-gradient family

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
RATIO_LEVELS = ("token", "sequence")


def importance_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                     level: str = "token") -> torch.Tensor:
    """pi / pi_old per token. All [B,T] -> [B,T] (the gradient flows to logprobs).

    token (PPO, GRPO): exp(logprobs - old) at each token.
    sequence (GSPO, Zheng et al. 2025, eq. 7): s_i = exp(mean over the response's tokens of (logprobs - old)),
    the length-normalised sequence ratio, on every token of response i (0 where mask is 0).
    """
    _check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, mask=mask)
    log_ratio = (logprobs - old_logprobs.detach()) * mask
    if level == "token":
        return torch.exp(log_ratio)
    if level != "sequence":
        raise ValueError(f"ratio level must be one of {list(RATIO_LEVELS)}, got {level!r}")
    per_sequence = log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)
    return torch.exp(per_sequence).unsqueeze(1).expand_as(logprobs) * mask + (1 - mask)


def clipped_policy_terms(ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float = 0.2,
                         clip_high: float | None = None) -> torch.Tensor:
    """Per-token clipped surrogate loss max(-A*ratio, -A*clip(ratio, 1-clip_low, 1+clip_high)). [B,T] -> [B,T].

    clip_high=None: symmetric (PPO). clip_high > clip_low is DAPO's clip-higher (Yu et al. 2025, eq. 10): a
    low-probability token with positive advantage may grow further before the clip stops it, which keeps
    entropy from collapsing. Advantages are rollout constants (detached). Reduce with `aggregate_loss`.
    """
    _check_same_shape("ratio", ratio, advantages=advantages)
    high = clip_low if clip_high is None else clip_high
    advantages = advantages.detach()
    return torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_low, 1 + high))


def loss_numerator(per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token_mean",
                   max_tokens: int | None = None) -> torch.Tensor:
    """The sum part of `aggregate_loss` (per_token [B,T], mask [B,T] -> scalar), so a loop over micro-batches
    and processes can add numerators and divide once by the GLOBAL `loss_denominator`.

    token_mean: sum of counted tokens; seq_mean_token_mean: sum over sequences of their token mean;
    seq_mean_token_sum_norm: sum of counted tokens / max_tokens (a constant: the generation budget).
    """
    _check_same_shape("per_token", per_token, mask=mask)
    total = (per_token * mask).sum(-1)
    if loss_agg == "token_mean":
        return total.sum()
    if loss_agg == "seq_mean_token_mean":
        return (total / mask.sum(-1).clamp(min=1)).sum()
    if loss_agg == "seq_mean_token_sum_norm":
        if not max_tokens or max_tokens < 1:
            raise ValueError("seq_mean_token_sum_norm needs max_tokens >= 1 (the response length cap)")
        return total.sum() / max_tokens
    raise ValueError(f"loss_agg must be one of {list(LOSS_AGGREGATIONS)}, got {loss_agg!r}")


def loss_denominator(mask: torch.Tensor, loss_agg: str = "token_mean") -> torch.Tensor:
    """What `loss_numerator` is divided by: counted tokens (token_mean) or sequences (the other two). mask [B,T]."""
    if loss_agg == "token_mean":
        return mask.sum()
    if loss_agg in LOSS_AGGREGATIONS:
        return torch.tensor(float(mask.shape[0]), device=mask.device)
    raise ValueError(f"loss_agg must be one of {list(LOSS_AGGREGATIONS)}, got {loss_agg!r}")


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token_mean",
                   max_tokens: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B,T] to a scalar.

    token_mean (PPO, DAPO eq. 12): mean over every counted token of the batch (long responses weigh more);
    seq_mean_token_mean (GRPO, DeepSeekMath eq. 3): mean over sequences of each sequence's token mean;
    seq_mean_token_sum_norm (Dr. GRPO): mean over sequences of the token SUM divided by the constant
    max_tokens (no length normalisation, so no bias towards long wrong answers).
    """
    denominator = loss_denominator(mask, loss_agg)
    return loss_numerator(per_token, mask, loss_agg, max_tokens) / denominator.clamp(min=1)
