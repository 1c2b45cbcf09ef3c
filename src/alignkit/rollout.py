"""Sampling the policy and scoring its responses, shared by every stage that learns from its own samples.

RRHF (policy samples), DPO (on-policy pairs), best-of-n, RAFT and PPO all do the same two things: draw
responses to prompts from a model, and give each (prompt, response) a reward from the built-in task's gold
reward or from a reward model. Both are done here in fixed chunks of prompts: chunk c is seeded from
(seed, c) and runs on process c % world, and the results are gathered, so 1 and N processes sample and
score exactly the same responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from accelerate import Accelerator

from alignkit.config import ConfigError
from alignkit.data.records import DataError

REWARD_SOURCES = ("gold", "rm")


def map_chunks(accelerator: Accelerator, items: list, chunk: int, fn: Callable[[int, list], list]) -> list:
    """Concatenated fn(c, items[c*chunk:(c+1)*chunk]) over all chunks; chunk c runs on process c % world.

    Chunk boundaries and indices do not depend on the number of processes, so neither does the result.
    """
    from accelerate.utils import gather_object

    world, rank = accelerator.num_processes, accelerator.process_index
    starts = range(0, len(items), chunk)
    mine = [(c, fn(c, items[s : s + chunk])) for c, s in enumerate(starts) if c % world == rank]
    gathered = gather_object(mine) if world > 1 else mine
    return [x for _, out in sorted(gathered, key=lambda pair: pair[0]) for x in out]


def chunk_seed(seed: int, split: int, chunk: int) -> int:
    """Seed of one sampling chunk: distinct per (seed, split, chunk), independent of the process count."""
    return seed * 1_000_003 + split * 100_003 + chunk


def sample_generations(
    accelerator: Accelerator,
    model,
    tokenizer,
    prompts: list,
    n: int,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    chunk: int = 32,
    seed: int = 0,
    split: int = 0,
    max_prompt_tokens: int | None = None,
) -> list[list]:
    """n sampled responses per prompt as generation.Generation (token ids, text, finished); temperature 0 is
    greedy. result[i][j]: response j to prompt i.

    `split` separates the seeds of different sample sets drawn with the same `seed` (train / eval / iteration).
    `max_prompt_tokens` keeps the last that many tokens of a longer prompt (None: whole prompts).
    """
    from alignkit.generation import generate

    model = accelerator.unwrap_model(model)

    def sample(c: int, part: list) -> list[list]:
        return generate(
            model, tokenizer, part, n=n, do_sample=temperature > 0, temperature=max(temperature, 1e-6),
            max_new_tokens=max_new_tokens, batch_size=len(part) * n, seed=chunk_seed(seed, split, c),
            max_prompt_tokens=max_prompt_tokens,
        )

    if n <= 0 or not prompts:
        return [[] for _ in prompts]
    return map_chunks(accelerator, prompts, chunk, sample)


def sample_texts(
    accelerator: Accelerator,
    model,
    tokenizer,
    prompts: list,
    n: int,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    chunk: int = 32,
    seed: int = 0,
    split: int = 0,
    max_prompt_tokens: int | None = None,
) -> list[list[str]]:
    """The decoded texts of sample_generations (same arguments, same samples)."""
    per_prompt = sample_generations(accelerator, model, tokenizer, prompts, n, temperature, max_new_tokens, chunk, seed,
                                    split, max_prompt_tokens)
    return [[g.text for g in gens] for gens in per_prompt]


def task_name_for(task: str | None, train_data: Any) -> str:
    """`task`, else the task of the first `task:` spec in train_data; a ConfigError when there is none."""
    from alignkit.data.tasks import parse_task_spec

    if task:
        return task
    specs = train_data if isinstance(train_data, list) else [train_data]
    for spec in specs:
        if str(spec).startswith("task:"):
            return parse_task_spec(str(spec))[0]
    raise ConfigError("a gold reward needs a built-in task: set reward.task=sort (or reverse), or train on a task: spec")


def gold_rewards(task_name: str, prompts: list, responses: list[list[str]]) -> list[list[float]]:
    """The built-in task's gold reward of every response; responses[i] answer prompts[i]."""
    from alignkit.data.tasks import get_task

    task = get_task(task_name)
    out = []
    for i, (prompt, texts) in enumerate(zip(prompts, responses)):
        try:
            out.append([task.gold_reward(prompt, r) for r in texts])
        except ValueError as err:
            raise DataError(f"gold reward (task {task_name}): prompt {i}: {err}") from None
    return out


def reward_model_rewards(
    accelerator: Accelerator,
    reward_model: str,
    prompts: list,
    responses: list[list[str]],
    batch_size: int = 32,
    max_length: int = 256,
) -> list[list[float]]:
    """Scores of the reward model at path `reward_model` for every response (loaded, used, freed)."""
    rm, rm_tokenizer = load_scorer(accelerator, reward_model)
    out = score_with(accelerator, rm, rm_tokenizer, prompts, responses, batch_size, max_length)
    del rm
    return out


def load_scorer(accelerator: Accelerator, reward_model: str):
    """(reward model on the accelerator's device in eval mode, its tokenizer)."""
    try:
        from alignkit.models.reward import load_reward_model
    except ImportError as err:
        raise ConfigError(f"a reward model needs alignkit.models.reward, which failed to import: {err}") from None
    with accelerator.main_process_first():
        rm, rm_tokenizer = load_reward_model(reward_model)
    return rm.to(accelerator.device).eval(), rm_tokenizer


def score_with(
    accelerator: Accelerator, rm, rm_tokenizer, prompts: list, responses: list[list[str]], batch_size: int, max_length: int
) -> list[list[float]]:
    """Scores of an already loaded reward model for every response, spread over processes and gathered."""
    from alignkit.models.reward import score_texts

    pairs = [(p, r) for p, texts in zip(prompts, responses) for r in texts]

    def score(_: int, part: list[tuple]) -> list[float]:
        with torch.no_grad():
            return [float(x) for x in score_texts(rm, rm_tokenizer, [p for p, _ in part], [r for _, r in part],
                                                  batch_size, max_length)]

    flat = map_chunks(accelerator, pairs, batch_size * 4, score)
    out, start = [], 0
    for texts in responses:
        out.append(flat[start : start + len(texts)])
        start += len(texts)
    return out


def rewards_for(
    accelerator: Accelerator,
    source: str,
    prompts: list,
    responses: list[list[str]],
    task: str | None = None,
    reward_model: str | None = None,
    batch_size: int = 32,
    max_length: int = 256,
) -> list[list[float]]:
    """Rewards from `source`: 'gold' (task's gold reward; `task` names it) or 'rm' (reward model at `reward_model`)."""
    if source == "gold":
        if not task:
            raise ConfigError("reward=gold needs a task name")
        return gold_rewards(task, prompts, responses)
    if source == "rm":
        if not reward_model:
            raise ConfigError("reward=rm needs reward.model (a reward model directory)")
        return reward_model_rewards(accelerator, reward_model, prompts, responses, batch_size, max_length)
    raise ConfigError(f"reward must be one of {', '.join(REWARD_SOURCES)}, got {source!r}")


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
    from alignkit.ops import whiten
    from alignkit.rl import (ADVANTAGE_ESTIMATORS, GROUP_ESTIMATORS, broadcast_to_tokens, gae, group_advantages,
                             kl_shaped_rewards, reinforce_pp_advantages)

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
