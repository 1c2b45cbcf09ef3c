"""Rewards of sampled responses, shared by every stage that scores its own samples.

RRHF (policy samples), label, best-of-n, RAFT and PPO give each (prompt, response) a reward from the built-in
task's gold reward or from a reward model. Reward-model scores are computed in fixed chunks spread over
processes (rollout.sampling.map_chunks) and gathered, so 1 and N processes score exactly alike.
`task_name_for` is the one rule that resolves which built-in task's gold reward applies.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from accelerate import Accelerator

from alignkit.config import ConfigError
from alignkit.data.records import DataError
from alignkit.rollout.sampling import map_chunks

REWARD_SOURCES = ("gold", "rm")


# (prompts, responses[i] = texts answering prompts[i]) -> rewards[i][j]. The proxy of an ensemble reward model
# also carries `per_member`, the same call returning every member's score [i][j][member] (score_proxy reads it).
RewardFn = Callable[[list, list[list[str]]], list[list[float]]]


def score_proxy(proxy: RewardFn, prompts: list, texts: list[list[str]]) -> tuple[list[list[float]], float | None]:
    """(rewards[i][j], the ensemble's disagreement on these texts or None): with an ensemble reward model the
    reward is the members' mean and the disagreement eval.metrics.ensemble_disagreement of their scores, from
    ONE scoring pass; any other proxy gives its rewards and None."""
    per_member = getattr(proxy, "per_member", None)
    if per_member is None:
        return proxy(prompts, texts), None
    from alignkit.eval.metrics import ensemble_disagreement

    scores = per_member(prompts, texts)
    flat = torch.tensor([member for per in scores for member in per], dtype=torch.float64)  # [N, M]
    means = flat.mean(dim=1).tolist()
    rewards, start = [], 0
    for per in scores:
        rewards.append(means[start : start + len(per)])
        start += len(per)
    return rewards, ensemble_disagreement(flat.T.numpy())


def task_name_for(task: str | None, train_data: Any, required: bool = True) -> str | None:
    """`task`, else the task of the first `task:` spec in train_data (a spec or a list of them).

    None when there is none and required=False; a ConfigError naming the fix when required."""
    from alignkit.data.tasks import parse_task_spec

    if task:
        return task
    specs = train_data if isinstance(train_data, list) else [train_data]
    for spec in specs:
        if str(spec).startswith("task:"):
            return parse_task_spec(str(spec))[0]
    if not required:
        return None
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
    accelerator: Accelerator, rm, rm_tokenizer, prompts: list, responses: list[list[str]], batch_size: int, max_length: int,
    per_member: bool = False,
) -> list[list[float]] | list[list[list[float]]]:
    """Scores of an already loaded reward model for every response, spread over processes and gathered.

    per_member (an ensemble): each member's score instead of their mean, [prompt][response][member]."""
    from alignkit.models.reward import score_texts

    pairs = [(p, r) for p, texts in zip(prompts, responses) for r in texts]

    def score(_: int, part: list[tuple]) -> list:
        with torch.no_grad():
            scores = score_texts(rm, rm_tokenizer, [p for p, _ in part], [r for _, r in part], batch_size, max_length,
                                 per_member=per_member)
        return [list(column) for column in zip(*scores)] if per_member else [float(x) for x in scores]

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


class Scorer:
    """Proxy (rm | gold) and gold rewards of candidates (rollout.sampling.sample_candidates); a reward model is
    loaded once and reused. Best-of-n's and RAFT's scorer."""

    def __init__(self, accelerator: Accelerator, cfg: Any):
        self.accelerator, self.cfg = accelerator, cfg
        self.task = task_name_for(cfg.reward.task, cfg.train_data, required=False)
        self.rm = load_scorer(accelerator, cfg.reward.model) if cfg.reward.source == "rm" else None

    def __call__(self, prompts: list, candidates: list[list[dict]]) -> None:
        """Set "reward" (the proxy that selects) and "gold" (when a task exists) on every candidate."""
        texts = [[c["text"] for c in per] for per in candidates]
        gold = rewards_for(self.accelerator, "gold", prompts, texts, self.task) if self.task else None
        if self.rm is not None:
            proxy = score_with(self.accelerator, *self.rm, prompts, texts, self.cfg.reward.batch_size, self.cfg.max_length)
        else:
            proxy = gold
        for i, per in enumerate(candidates):
            for j, cand in enumerate(per):
                cand["reward"] = float(proxy[i][j])
                if gold is not None:
                    cand["gold"] = float(gold[i][j])


def reward_matrix(candidates: list[list[dict]], key: str) -> torch.Tensor:
    """[B,K] float64 tensor of candidates' `key` (all prompts have K candidates)."""
    return torch.tensor([[c[key] for c in per] for per in candidates], dtype=torch.float64)
