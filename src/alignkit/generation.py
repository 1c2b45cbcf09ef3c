"""Batched sampling of responses to chat prompts (transformers `generate`), as typed results.

Used wherever a stage needs the policy's own responses: evaluation, best-of-n, RAFT, RRHF with policy
samples, PPO rollouts. Prompts are rendered with the tokenizer's chat template and left-padded (so all
prompts end at the same position); generation stops at the end-of-turn token (the tokenizer's eos).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.data.chat import render_prompt


@dataclass
class Generation:
    """One sampled response.

    prompt_ids: the rendered prompt's token ids (no padding).
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
) -> list[list[Generation]]:
    """`n` responses for each prompt (a message list); result[i][j] is response j to prompt i.

    Greedy decoding (do_sample=False) with n > 1 returns n identical responses. `seed` makes sampling
    reproducible (the global torch RNG is forked, not disturbed).
    """
    device = next(model.parameters()).device
    stop = _stop_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    prompt_ids = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    flat = [(i, ids) for i, ids in enumerate(prompt_ids) for _ in range(n)]
    results: list[list[Generation]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
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
            kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens}
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                eos_token_id=stop,
                pad_token_id=pad_id,
                **kwargs,
            )
            for row, (i, ids) in enumerate(chunk):
                response = out[row, width:].tolist()
                cut = next((k for k, t in enumerate(response) if t in stop), None)
                finished = cut is not None
                response = response[: cut + 1] if finished else response
                text = tokenizer.decode(response, skip_special_tokens=True).strip()
                results[i].append(Generation(ids, response, text, finished))
    model.train(was_training)
    return results
