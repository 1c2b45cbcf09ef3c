"""Batched sampling of responses to chat prompts (transformers `generate`), as typed results.

Used wherever a stage needs the policy's own responses: evaluation, best-of-n, RAFT, RRHF with policy
samples, PPO rollouts. Prompts are rendered with the tokenizer's chat template and left-padded (so all
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
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, GenerationMixin

from alignkit.data.chat import render_prompt


@dataclass
class Generation:
    """One sampled response.

    prompt_ids: the rendered prompt's token ids as the model saw them (no padding; the last max_prompt_tokens
        of a longer prompt).
    response_ids: generated ids, up to and including the end-of-turn token when it was produced.
    text: the response decoded without special tokens.
    finished: True when the response ended with the end-of-turn token (not cut by max_new_tokens).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finished: bool


def _stop_ids(tokenizer) -> list[int]:
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
) -> list[list[Generation]]:
    """`n` responses for each prompt (a message list); result[i][j] is response j to prompt i.

    Greedy decoding (do_sample=False) with n > 1 returns n identical responses. `seed` makes sampling
    reproducible (the global torch RNG is forked, not disturbed). `max_prompt_tokens` keeps only the last
    that many tokens of a longer rendered prompt (the end of the conversation and the generation prompt
    survive, the oldest turns go, as in every stage's training data); None keeps every prompt whole.
    Generation.prompt_ids is the prompt as the model saw it.
    """
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {max_prompt_tokens}")
    device = next(model.parameters()).device
    stop = _stop_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    config = sampling_config(do_sample, temperature, top_p, max_new_tokens, stop, pad_id)
    prompt_ids = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    if max_prompt_tokens is not None:
        prompt_ids = [ids[-max_prompt_tokens:] for ids in prompt_ids]
    flat = [(i, ids) for i, ids in enumerate(prompt_ids) for _ in range(n)]
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
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 generation_config=config)
            for row, (i, ids) in enumerate(chunk):
                response = out[row, width:].tolist()
                cut = next((k for k, t in enumerate(response) if t in stop), None)
                finished = cut is not None
                response = response[: cut + 1] if finished else response
                text = tokenizer.decode(response, skip_special_tokens=True).strip()
                results[i].append(Generation(ids, response, text, finished))
    model.train(was_training)
    return results
