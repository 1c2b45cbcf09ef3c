"""Pure RL math for RLHF: GAE, KL estimators, KL-shaped rewards, KL coefficient controllers.

Imports torch only. Shapes: B=batch, T=response tokens. `mask` is 1.0 on tokens that count.
Paper and equation for each function: docs/papers.md.
"""

from __future__ import annotations

from dataclasses import dataclass
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


# ----------------------------------------------------------------------------- PPO rollouts (typed)


@dataclass
class Rollout:
    """One PPO rollout of N sequences (rollout prompts x samples_per_prompt), in response-aligned layout.

    T is the longest response. Row i holds sequence i's generated tokens at positions 0..len_i-1 (position t
    is the t-th generated token, the action taken in state prompt + response[:t]); positions >= len_i are
    padding, where `mask` is 0 and every float field is 0.

    prompt_ids: N lists of prompt token ids (ragged, unpadded).
    response_ids [N,T] long: generated ids, `pad_id` on padding (end-of-turn token included when produced).
    mask [N,T] float: 1.0 on generated tokens.
    finished [N] bool: the response ended with the end-of-turn token (not cut by max_new_tokens).
    logprobs [N,T]: log-prob of each token under the sampling (old) policy, logits / temperature.
    ref_logprobs [N,T]: the same under the frozen reference policy.
    values [N,T]: the critic's value of the state each token is chosen in (0 without a critic).
    scores [N]: sequence score entering the reward (the proxy after eos penalty, normalisation, clipping).
    kl [N,T]: per-token KL estimate (kl_estimator) of policy vs reference.
    rewards [N,T]: -kl_coef * kl (when the KL is in the reward), plus scores[i] at sequence i's last token.
    advantages [N,T]: per-token advantages of the chosen estimator (build_rollout).
    returns [N,T]: GAE returns (un-whitened advantages + values): the critic's targets (0 without a critic).
    has_old_logprobs: False when `logprobs` were not computed (one update per rollout: the update's own
        detached log-probs are the old ones); has_ref_logprobs: False when no reference forward ran (KL unread).
    """

    prompt_ids: list[list[int]]
    response_ids: torch.Tensor
    mask: torch.Tensor
    finished: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    has_old_logprobs: bool = True
    has_ref_logprobs: bool = True

    def __len__(self) -> int:
        return len(self.prompt_ids)



@dataclass
class RunningMoments:
    """Running mean and variance of every score seen so far (Chan et al.'s parallel update), checkpointable."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, x: torch.Tensor) -> None:
        n, mean = float(x.numel()), float(x.double().mean())
        m2 = float(((x.double() - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / max(self.count - 1, 1.0)) ** 0.5


def shape_scores(raw: torch.Tensor, finished: torch.Tensor, missing_eos_penalty: float = 0.0, norm: str = "none",
                 clip: float = 0.0, running: RunningMoments | None = None) -> torch.Tensor:
    """Proxy scores [N] -> the scores PPO optimises [N].

    In order: minus `missing_eos_penalty` where not finished; normalisation `norm` ("batch": standardised
    over these N; "running": by the mean/std of every score so far, `running` updated first with these);
    then clipped to [-clip, clip] when clip > 0.
    """
    scores = raw.float() - missing_eos_penalty * (~finished.bool()).float()
    if norm == "batch":
        scores = (scores - scores.mean()) / (scores.std() + 1e-8) if len(scores) > 1 else scores - scores.mean()
    elif norm == "running":
        if running is None:
            raise ValueError("norm='running' needs a RunningMoments")
        running.update(scores)
        scores = (scores - running.mean) / (running.std + 1e-8)
    elif norm != "none":
        raise ValueError(f"reward normalisation must be none, batch or running, got {norm!r}")
    return scores.clamp(-clip, clip) if clip > 0 else scores


def build_rollout(
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    finished: list[bool],
    logprobs: list[torch.Tensor],
    ref_logprobs: list[torch.Tensor],
    values: list[torch.Tensor] | None,
    scores: torch.Tensor,
    pad_id: int,
    kl_coef: float,
    kl_estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_advantages: bool = True,
    advantage: str = "gae",
    group_size: int = 1,
    kl_in: str = "reward",
    has_old_logprobs: bool = True,
    has_ref_logprobs: bool = True,
) -> Rollout:
    """Assemble a Rollout from per-sequence 1-D tensors (len_i each) and scores [N]; sequences are prompt-major
    (group g = rows g*group_size .. (g+1)*group_size - 1 answer the same prompt).

    kl = rl.kl_penalty(logprobs, ref_logprobs, kl_estimator) on counted tokens. With kl_in="reward" the KL is a
    per-token penalty in the reward (rl.kl_shaped_rewards, coefficient kl_coef); with kl_in="loss" the reward
    is the score alone (the policy loss adds the KL term). Then, by `advantage`:
      gae: advantages, returns = rl.gae(rewards, values, mask, gamma, lam), whitened over every token when asked;
      grpo / dr_grpo / rloo: each sequence's total reward (score - kl_coef * its KL sum when kl_in="reward")
        -> rl.group_advantages over its group, the same value on each of its tokens; returns = 0 (no critic);
      reinforce_pp: rl.reinforce_pp_advantages(rewards, mask, gamma) (already whitened); returns = 0.
    `values` may be None without a critic (then 0). has_old_logprobs / has_ref_logprobs: see Rollout.
    """
    from alignkit.ops import pad_right, whiten

    if advantage not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage must be one of {list(ADVANTAGE_ESTIMATORS)}, got {advantage!r}")
    if kl_in not in ("reward", "loss"):
        raise ValueError(f"kl_in must be reward or loss, got {kl_in!r}")
    if values is None:
        values = [torch.zeros(len(r)) for r in response_ids]
    for name, rows in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("values", values)):
        lengths = [len(r) for r in rows]
        if lengths != [len(r) for r in response_ids]:
            raise ValueError(f"{name} lengths {lengths[:8]} differ from the response lengths")
    ids = pad_right(response_ids, pad_id, torch.long)
    mask = pad_right([[1.0] * len(r) for r in response_ids], 0.0, torch.float32)
    lp, ref, vals = (pad_right(rows, 0.0, torch.float32) for rows in (logprobs, ref_logprobs, values))
    reward_kl_coef = kl_coef if kl_in == "reward" else 0.0
    rewards, kl = kl_shaped_rewards(scores.float(), lp, ref, mask, reward_kl_coef, kl_estimator)
    if advantage == "gae":
        advantages, returns = gae(rewards, vals, mask, gamma, lam)
        if whiten_advantages:
            advantages = whiten(advantages, mask)
    elif advantage in GROUP_ESTIMATORS:
        if len(response_ids) % group_size:
            raise ValueError(f"{len(response_ids)} sequences do not split into groups of {group_size}")
        totals = (rewards * mask).sum(1).view(-1, group_size)
        advantages = broadcast_to_tokens(group_advantages(totals, advantage).flatten(), mask)
        returns = torch.zeros_like(advantages)
    else:
        advantages, returns = reinforce_pp_advantages(rewards, mask, gamma), torch.zeros_like(rewards)
    return Rollout(prompt_ids=[list(p) for p in prompt_ids], response_ids=ids, mask=mask,
                   finished=torch.tensor(finished, dtype=torch.bool), logprobs=lp, ref_logprobs=ref, values=vals,
                   scores=scores.float(), kl=kl, rewards=rewards, advantages=advantages, returns=returns,
                   has_old_logprobs=has_old_logprobs, has_ref_logprobs=has_ref_logprobs)
