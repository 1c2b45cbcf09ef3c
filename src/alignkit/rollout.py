"""Sampling the policy and scoring its responses, shared by every stage that learns from its own samples.

RRHF (policy samples), DPO (on-policy pairs), best-of-n, RAFT and PPO all do the same two things: draw
responses to prompts from a model, and give each (prompt, response) a reward from the built-in task's gold
reward or from a reward model. Both are done here in fixed chunks of prompts: chunk c is seeded from
(seed, c) and runs on process c % world, and the results are gathered, so 1 and N processes sample and
score exactly the same responses.
"""

from __future__ import annotations

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
) -> list[list[str]]:
    """n sampled responses (decoded text) per prompt; temperature 0 is greedy. result[i][j]: response j to prompt i.

    `split` separates the seeds of different sample sets drawn with the same `seed` (train / eval / iteration).
    """
    from alignkit.generation import generate

    def sample(c: int, part: list) -> list[list[str]]:
        gens = generate(
            model, tokenizer, part, n=n, do_sample=temperature > 0, temperature=max(temperature, 1e-6),
            max_new_tokens=max_new_tokens, batch_size=len(part) * n, seed=chunk_seed(seed, split, c),
        )
        return [[g.text for g in per_prompt] for per_prompt in gens]

    if n <= 0 or not prompts:
        return [[] for _ in prompts]
    return map_chunks(accelerator, prompts, chunk, sample)


def task_name_for(task: str | None, train_data: Any) -> str:
    """`task`, else the task of the first `task:` spec in train_data; a ConfigError when there is none."""
    from alignkit.data.tasks import parse_task_spec

    if task:
        return task
    specs = train_data if isinstance(train_data, list) else [train_data]
    for spec in specs:
        if str(spec).startswith("task:"):
            return parse_task_spec(str(spec))[0]
    raise ConfigError("a gold reward needs a built-in task: set task=sort (or reverse), or train on a task: spec")


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
            raise ConfigError("reward=rm needs reward_model (a reward model directory)")
        return reward_model_rewards(accelerator, reward_model, prompts, responses, batch_size, max_length)
    raise ConfigError(f"reward must be one of {', '.join(REWARD_SOURCES)}, got {source!r}")
