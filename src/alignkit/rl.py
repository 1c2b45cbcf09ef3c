"""Pure RL math for RLHF: GAE, KL estimators, KL-shaped rewards, KL coefficient controllers.

Imports torch only. Shapes: B=batch, T=response tokens. `mask` is 1.0 on tokens that count.
Paper and equation for each function: docs/papers.md.
"""

from __future__ import annotations

from typing import Any

import torch

KL_KINDS = ("k1", "k2", "k3", "abs")


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation. rewards, values, mask [B,T] -> (advantages, returns) [B,T].

    Runs backwards over time carrying the value and advantage of the NEXT COUNTED token, so
    positions with mask 0 are skipped: the value after the last counted token is 0 (right padding
    never bootstraps), masked prompt positions on the left are ignored, and a hole in the middle is
    jumped over (one discount step per counted token). Rewards and values at masked positions are
    never read. advantages are 0 where mask is 0; returns = advantages + values. No gradient flows
    (these are regression/advantage targets).
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(
            "rewards, values and mask must all be [B,T]; got "
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)}, mask {tuple(mask.shape)}"
        )
    counted = mask != 0
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(counted[:, t], advantage, torch.zeros_like(advantage))
        next_value = torch.where(counted[:, t], values[:, t], next_value)
        next_advantage = torch.where(counted[:, t], advantage, next_advantage)
    return advantages, advantages + values


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from sampled-token log-probs. [B,T] -> [B,T].

    With log_ratio = logprobs - ref_logprobs (tokens sampled from the policy):
    k1 = log_ratio (unbiased, can be negative); k2 = 0.5*log_ratio^2 (biased, >= 0, low variance);
    k3 = exp(-log_ratio) - 1 + log_ratio (unbiased, >= 0); abs = |log_ratio|.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kind!r}; valid: {list(KL_KINDS)}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"ref_logprobs must have the shape of logprobs {tuple(logprobs.shape)}, "
            f"got {tuple(ref_logprobs.shape)}"
        )
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    return log_ratio.abs()


def last_counted_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with mask != 0 in each row. mask [B,T] -> long [B]; -1 for an
    empty row."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask != 0, positions, torch.full_like(positions, -1)).max(dim=-1).values


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token RLHF rewards. scores [B]; logprobs, ref_logprobs, mask [B,T] -> (rewards, kl) [B,T].

    kl = kl_penalty(...) * mask; rewards = -kl_coef * kl, plus the sequence score at the last
    counted token of each row (InstructGPT / Ziegler et al.). A row with no counted token gets no
    score (nothing of it reaches a loss anyway). Computed without gradient.
    """
    if scores.dim() != 1 or scores.shape[0] != logprobs.shape[0]:
        raise ValueError(f"scores must be [B] with B={logprobs.shape[0]}, got {tuple(scores.shape)}")
    if mask.shape != logprobs.shape:
        raise ValueError(
            f"mask must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(mask.shape)}"
        )
    with torch.no_grad():
        kl = kl_penalty(logprobs, ref_logprobs, kind)
        kl = torch.where(mask != 0, kl * mask, torch.zeros_like(kl))
        rewards = -kl_coef * kl
        last = last_counted_index(mask)
        has_token = last >= 0
        rows = torch.arange(rewards.shape[0], device=rewards.device)[has_token]
        rewards[rows, last[has_token]] += scores[has_token].to(rewards.dtype)
    return rewards, kl


class AdaptiveKLController:
    """KL coefficient that steers the measured KL towards `target` (Ziegler et al. 2019, §2.2).

    update: error = clip(current_kl / target - 1, -0.2, 0.2); value *= 1 + error * n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


class FixedKLController:
    """Constant KL coefficient with the same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


# ----------------------------------------------------------------------------- critic-free estimators

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
ADVANTAGE_ESTIMATORS = ("gae", *GROUP_ESTIMATORS, "reinforce_pp")


def group_advantages(rewards: torch.Tensor, estimator: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """One scalar advantage per response from the rewards of its group. rewards [P,G] -> [P,G].

    G responses were sampled for each of P prompts; the group is its own baseline, so no critic is needed.
    grpo (Shao et al. 2024, DeepSeekMath eq. 3): (r - mean_g) / (std_g + eps), std with Bessel's correction;
    dr_grpo (Liu et al. 2025, "Understanding R1-Zero-like training"): r - mean_g, no std division (which
    up-weights prompts the policy almost always solves or always fails);
    rloo (Ahmadian et al. 2024; Kool et al. 2019): r_i - mean of the OTHER G-1 rewards
    = G / (G-1) * (r_i - mean_g), an unbiased baseline; needs G >= 2.
    A group whose rewards are all equal gets advantage 0 under every estimator.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P,G], got shape {tuple(rewards.shape)}")
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"unknown group estimator {estimator!r}; valid: {list(GROUP_ESTIMATORS)}")
    group = rewards.shape[1]
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if estimator == "dr_grpo":
        return centred
    if group < 2:
        raise ValueError(f"{estimator} needs at least 2 responses per prompt, got G={group}")
    if estimator == "grpo":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    return centred * (group / (group - 1))


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): discounted return-to-go of the per-token (KL-shaped) rewards, whitened over
    the WHOLE batch (global normalisation, no critic, no group). rewards, mask [B,T] -> advantages [B,T].

    returns_t = sum_{k >= t, counted} gamma^(k-t) r_k; advantages = (returns - mean) / std over every counted
    token of the batch; 0 on padding.
    """
    from alignkit.ops import whiten

    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)
    return whiten(returns, mask)


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence-level advantage on every counted token of its response. advantages [B], mask [B,T] -> [B,T]."""
    if advantages.dim() != 1 or advantages.shape[0] != mask.shape[0]:
        raise ValueError(f"advantages must be [B] with B={mask.shape[0]}, got {tuple(advantages.shape)}")
    return advantages.float().unsqueeze(1) * mask


def varied_groups(rewards: torch.Tensor, tol: float = 1e-8) -> torch.Tensor:
    """DAPO's dynamic-sampling filter: True for groups whose rewards are not all equal. rewards [P,G] -> bool [P].

    A group whose G rewards are equal has zero group advantage: it carries no policy gradient, only noise in
    the batch size, so DAPO (Yu et al. 2025, eq. 11) drops it and samples more prompts.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P,G], got shape {tuple(rewards.shape)}")
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) > tol


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the score. lengths [B] -> [B] (<= 0).

    0 for |y| <= max_length - buffer; a linear ramp ((max_length - buffer) - |y|) / buffer * factor inside the
    last `buffer` tokens; -factor at or beyond max_length (a response cut by the cap).
    """
    if buffer <= 0 or buffer > max_length:
        raise ValueError(f"buffer must be in [1, max_length={max_length}], got {buffer}")
    lengths = lengths.float()
    ramp = ((max_length - buffer) - lengths) / buffer
    return factor * ramp.clamp(min=-1.0, max=0.0)
