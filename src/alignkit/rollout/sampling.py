"""Sampling responses to chat prompts (transformers `generate`), as typed results: the one sampler of every stage.

Used wherever a stage needs a model's own responses: evaluation, best-of-n, RAFT, RRHF with policy
samples, labelling, PPO rollouts. `sample_generations` draws them in fixed chunks of prompts: chunk c is
seeded from derive_seed(seed, split, c) and runs on process c % world, and the results are gathered, so 1
and N processes sample exactly the same responses. The split constants below keep the sample sets a run
draws with one seed apart. Prompts are rendered with the tokenizer's chat template and left-padded (so all
prompts end at the same position); generation stops at the end-of-turn token (the tokenizer's eos).

What is sampled is a function of the caller's arguments alone. On-policy methods need the responses to come
from exactly the distribution their log-probs are computed under (softmax(logits / temperature)), so a
model's own generation defaults (a hub checkpoint's generation_config.json: repetition_penalty, top_k,
min_p, no_repeat_ngram_size, ...) must not reshape it. transformers 5 fills every field of a passed
GenerationConfig that is None from `model.generation_config` (GenerationMixin._prepare_generation_config),
and several processors (min_p, top_h, suppress_tokens, bad_words_ids, forced_eos_token_id, ...) have no
"off" value but None; so `generate` passes a complete `sampling_config` AND hides the model's own config
for the duration of the call.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from accelerate import Accelerator
from transformers import GenerationConfig, GenerationMixin, LogitsProcessor, LogitsProcessorList

from alignkit.data.chat import render_prompt
from alignkit.runtime.setup import derive_seed

# Sampling splits: the sample sets one run draws with one seed are seeded apart by their split.
TRAIN_SPLIT = 0  # train_data prompts (best-of-n, RRHF, label; generate_cli's batches)
EVAL_SPLIT = 1  # held-out prompts (every stage's evaluation; eval's samples)
ITERATION_SPLIT = 2  # (ITERATION_SPLIT, k): RAFT's iteration k, PPO's rollout of step k
REFILL_SPLIT = 3  # (REFILL_SPLIT, step, k): PPO dynamic sampling's refill round k of `step`
GREEDY_SPLIT = 4  # eval's greedy decoding (no random draw; a split of its own all the same)


@dataclass
class Generation:
    """One sampled response.

    prompt_ids: the rendered prompt's token ids as the model saw them (no padding; the last max_prompt_tokens
        of a longer prompt).
    response_ids: generated ids, up to and including the end-of-turn token when it was produced.
    text: the response decoded without special tokens.
    finished: True when the response ended with the end-of-turn token (not cut by max_new_tokens).
    prompt: the prompt's messages, and prompt_index its position among the prompts sampled (set by callers
        that flatten the samples, e.g. rollout.ppo.sample_responses; empty / 0 otherwise).
    logps: with_logps=True: each response token's log-prob under softmax(logits / temperature) as the sampler
        computed it (untruncated by top_p), one per response_ids entry; None otherwise.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finished: bool
    prompt: list = field(default_factory=list)
    prompt_index: int = 0
    logps: list[float] | None = None


def stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return sorted(i for i in ids if i is not None)


def sampling_config(do_sample: bool, temperature: float, top_p: float, max_new_tokens: int, stop_ids: list[int],
                    pad_id: int) -> GenerationConfig:
    """The whole GenerationConfig of one `generate` call, from its arguments alone.

    Sampling draws from softmax(logits / temperature), nucleus-truncated when top_p < 1, and nothing else:
    top_k=0 (transformers' global default would be 50), no typical/epsilon/eta truncation. Penalties that
    also bend greedy decoding are off in both modes (repetition_penalty=1, no_repeat_ngram_size=0). Greedy
    leaves the sampling knobs unset: they are never applied to it, and setting them draws a warning.
    """
    knobs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "num_beams": 1, "eos_token_id": stop_ids,
             "pad_token_id": pad_id, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    if do_sample:
        knobs.update(temperature=temperature, top_p=top_p, top_k=0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
    return GenerationConfig(**knobs)


class DrawnTokenLogps(LogitsProcessor):
    """Keeps log softmax(logits / temperature) of each token `generate` draws, at no extra forward.

    transformers runs the processors a caller passes before its own temperature and top-p warpers, so each call
    sees the model's raw logits [B, V] for the next token, and the next call's input_ids end with the token drawn
    from them. Only the last step's log-probs are held (one [B, V] at a time); `drawn(sequences)` adds the final
    token's and returns [B, tokens generated]."""

    def __init__(self, temperature: float):
        self.temperature, self.last, self.steps = temperature, None, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.last is not None:
            self.steps.append(self.last.gather(1, input_ids[:, -1:]).squeeze(1))
        self.last = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def drawn(self, sequences: torch.Tensor) -> torch.Tensor:
        if self.last is not None:
            self.steps.append(self.last.gather(1, sequences[:, -1:]).squeeze(1))
            self.last = None
        return torch.stack(self.steps, 1) if self.steps else sequences.new_zeros((len(sequences), 0), dtype=torch.float)


@contextmanager
def model_defaults_hidden(model):
    """Within the block, every generating module of `model` carries a blank GenerationConfig.

    The model's own config is what transformers merges into the passed one (see the module docstring);
    a blank one leaves only transformers' global defaults, which `sampling_config` overrides where they
    matter. A PEFT wrapper is not a GenerationMixin: it forwards to the model inside, which is.
    """
    holders = [m for m in model.modules() if isinstance(m, GenerationMixin)]
    saved = [m.generation_config for m in holders]
    for m in holders:
        m.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for m, config in zip(holders, saved):
            m.generation_config = config


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    n: int = 1,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    seed: int | None = None,
    max_prompt_tokens: int | None = None,
    with_logps: bool = False,
) -> list[list[Generation]]:
    """`n` responses for each prompt (a message list); result[i][j] is response j to prompt i.

    Greedy decoding (do_sample=False) with n > 1 returns n identical responses. `seed` makes sampling
    reproducible (the global torch RNG is forked, not disturbed). `max_prompt_tokens` keeps only the last
    that many tokens of a longer rendered prompt (the end of the conversation and the generation prompt
    survive, the oldest turns go, as in every stage's training data); None keeps every prompt whole.
    Generation.prompt_ids is the prompt as the model saw it. with_logps (sampling only): each Generation also
    carries its tokens' log-probs under softmax(logits / temperature) (DrawnTokenLogps).
    """
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {max_prompt_tokens}")
    device = next(model.parameters()).device
    stop = stop_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    config = sampling_config(do_sample, temperature, top_p, max_new_tokens, stop, pad_id)
    prompt_ids = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    if max_prompt_tokens is not None:
        prompt_ids = [ids[-max_prompt_tokens:] for ids in prompt_ids]
    flat = [(i, ids) for i, ids in enumerate(prompt_ids) for _ in range(n)]
    whole_groups = n > 1 and batch_size % n == 0  # every batch holds all n copies of its prompts
    results: list[list[Generation]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), model_defaults_hidden(model):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            width = max(len(ids) for _, ids in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (_, ids) in enumerate(chunk):
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            shared = prompt_cache(model, input_ids, attention_mask, n) if whole_groups else {}
            recorder = DrawnTokenLogps(temperature) if with_logps and do_sample else None
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                 logits_processor=LogitsProcessorList([recorder] if recorder else []), **shared)
            logps = recorder.drawn(out).cpu() if recorder else None
            for row, (i, ids) in enumerate(chunk):
                response = out[row, width:].tolist()
                cut = next((k for k, t in enumerate(response) if t in stop), None)
                finished = cut is not None
                response = response[: cut + 1] if finished else response
                text = tokenizer.decode(response, skip_special_tokens=True).strip()
                own = logps[row, : len(response)].tolist() if logps is not None else None
                results[i].append(Generation(ids, response, text, finished, logps=own))
    model.train(was_training)
    return results


def cache_argument(model) -> str:
    """The name the model's forward gives its KV cache: `cache` in current transformers 5, `past_key_values`
    in earlier 5.x releases (the name the model itself declares, so both work)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper takes **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def prefix_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, width: int,
                 first: torch.Tensor, of_row: torch.Tensor) -> dict[str, Any]:
    """{the model's cache argument: a DynamicCache} holding the keys and values of columns 0 .. width-2 of
    the rows `first` [U] (one per distinct prompt), indexed out to every row by of_row [B] (row b gets
    prompt of_row[b]'s). The rows then run from column width-1 on with it. Under autograd the gradient
    reaches the weights through the cache. Only one column is projected on the vocabulary (its logits are
    never read). Shared by sampling (prompt_cache) and the online-RL forwards (rollout.forwards.response_logits).
    """
    from transformers import DynamicCache

    cache, name = DynamicCache(config=model.config), cache_argument(model)
    model(input_ids=input_ids[first, : width - 1], attention_mask=attention_mask[first, : width - 1],
          position_ids=position_ids[first, : width - 1], use_cache=True, logits_to_keep=1, **{name: cache})
    cache.batch_select_indices(of_row)
    return {name: cache}


@torch.no_grad()
def prompt_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int) -> dict[str, Any]:
    """The KV cache of the prompts' first W-1 columns, computed once per prompt and repeated for its n samples.

    input_ids, attention_mask [B,W]: left-padded prompts, each repeated n times in a row (B = P*n). Returns
    prefix_cache's {cache-argument-name: DynamicCache over [B, W-1]} for `model.generate`, which then runs
    only the last prompt column and the new tokens; {} when there is no column to share (W == 1). The n
    copies of a prompt have the same keys and values, so one prefill of P rows replaces a prefill of P*n
    rows: the same logits, so the same samples for the same seed (tested), at 1/n of the prompt forward
    (measured on the tiny task with n=8: a third of a rollout's sampling time).
    """
    rows, width = input_ids.shape
    if width < 2:
        return {}
    device = input_ids.device
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return prefix_cache(model, input_ids, attention_mask, positions, width, torch.arange(0, rows, n, device=device),
                        torch.arange(rows, device=device) // n)


def map_chunks(accelerator: Accelerator | None, items: list, chunk: int, fn: Callable[[int, list], list]) -> list:
    """Concatenated fn(c, items[c*chunk:(c+1)*chunk]) over all chunks; chunk c runs on process c % world.

    Chunk boundaries and indices do not depend on the number of processes, so neither does the result.
    accelerator None: one process (every chunk here).
    """
    from accelerate.utils import gather_object

    world, rank = (accelerator.num_processes, accelerator.process_index) if accelerator is not None else (1, 0)
    starts = range(0, len(items), chunk)
    mine = [(c, fn(c, items[s : s + chunk])) for c, s in enumerate(starts) if c % world == rank]
    gathered = gather_object(mine) if world > 1 else mine
    return [x for _, out in sorted(gathered, key=lambda pair: pair[0]) for x in out]


Split = int | tuple[int, ...]


def chunk_seed(seed: int, split: Split, chunk: int) -> int:
    """Seed of one sampling chunk: distinct per (seed, split, chunk), independent of the process count."""
    parts = split if isinstance(split, tuple) else (split,)
    return derive_seed(seed, "sample", *parts, chunk)


def sample_generations(
    accelerator: Accelerator | None,
    model,
    tokenizer,
    prompts: list,
    n: int,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    chunk: int = 32,
    seed: int = 0,
    split: Split = TRAIN_SPLIT,
    max_prompt_tokens: int | None = None,
    top_p: float = 1.0,
    with_logps: bool = False,
) -> list[list[Generation]]:
    """n sampled responses per prompt as Generation (token ids, text, finished); temperature 0 is
    greedy. result[i][j]: response j to prompt i.

    `split` separates the seeds of different sample sets drawn with the same `seed` (the *_SPLIT constants).
    `max_prompt_tokens` keeps the last that many tokens of a longer prompt (None: whole prompts).
    with_logps: each Generation carries its tokens' log-probs as sampled (generate).
    accelerator None: one process, the model as given.
    """
    model = accelerator.unwrap_model(model) if accelerator is not None else model

    def sample(c: int, part: list) -> list[list]:
        return generate(
            model, tokenizer, part, n=n, do_sample=temperature > 0, temperature=max(temperature, 1e-6), top_p=top_p,
            max_new_tokens=max_new_tokens, batch_size=len(part) * n, seed=chunk_seed(seed, split, c),
            max_prompt_tokens=max_prompt_tokens, with_logps=with_logps,
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
    split: Split = TRAIN_SPLIT,
    max_prompt_tokens: int | None = None,
) -> list[list[str]]:
    """The decoded texts of sample_generations (same arguments, same samples)."""
    per_prompt = sample_generations(accelerator, model, tokenizer, prompts, n, temperature, max_new_tokens, chunk, seed,
                                    split, max_prompt_tokens)
    return [[g.text for g in gens] for gens in per_prompt]


def sample_candidates(
    accelerator: Accelerator, model, tokenizer, prompts: list, n: int, cfg: Any, seed: int, split: Split,
    temperature: float | None = None,
) -> list[list[dict]]:
    """n responses per prompt: result[i][j] = {"text", "length" (response tokens, end-of-turn included),
    "finished" (ended with the end-of-turn token)}, from sample_generations (the samples of sample_texts
    with the same arguments). Best-of-n's and RAFT's candidates.

    cfg gives max_new_tokens, sample_chunk, max_length (a longer prompt keeps its last max_length -
    max_new_tokens tokens) and (unless `temperature` is given) the temperature."""
    temperature = cfg.sampling.temperature if temperature is None else temperature
    per_prompt = sample_generations(accelerator, model, tokenizer, prompts, n, temperature, cfg.sampling.max_new_tokens,
                                    cfg.sampling.chunk, seed, split, max(1, cfg.max_length - cfg.sampling.max_new_tokens))
    return [[{"text": g.text, "length": len(g.response_ids), "finished": g.finished} for g in gens] for gens in per_prompt]


def check_sampling_config(cfg: Any, n: int, n_key: str = "n") -> None:
    """Errors shared by best-of-n and RAFT that would otherwise surface after minutes of sampling."""
    from alignkit.config import ConfigError, check_groups
    from alignkit.rollout.rewards import task_name_for

    if n < 1:
        raise ConfigError(f"{n_key} (samples per prompt) must be >= 1, got {n}")
    check_groups(cfg)
    if cfg.reward.source == "gold":
        task_name_for(cfg.reward.task, cfg.train_data)  # raises a ConfigError naming the fix
