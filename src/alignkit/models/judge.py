"""An LLM judge (RLAIF): a causal chat LM says which of two responses to a prompt is better.

The judge reads one user message, the `template` filled with the prompt and the two responses shown as
options, and the preference is read off its next-token distribution after the assistant turn opens: the
probability of the first option's token renormalised over the two option tokens (no sampling, no parsing
of generated text). Each pair is judged in both orders and the two are combined by
selection.position_swapped_preference (a tie where the orders disagree), since small judges prefer a
position more than a response (Zheng et al. 2023; Lee et al. 2023, RLAIF, section 2.1 "position bias").

Judgements are batched (right-padded forwards; only the last position of each row is projected on the
vocabulary) and cached by the hash of (judge, template, options, prompt, first, second) in a JSON-lines file,
so a resumed or repeated labelling never asks the judge twice.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from alignkit.data.chat import render_prompt
from alignkit.selection import first_option_probability, position_swapped_preference


def prompt_text(prompt: list[dict] | str) -> str:
    """The prompt as the judge reads it: a user string as is; a conversation as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def option_token_ids(tokenizer: Any, options: list[str]) -> tuple[int, int]:
    """The first token of each option as the judge would write it; the two must differ."""
    if len(options) != 2:
        raise ValueError(f"a pairwise judge has two options, got {options}")
    ids = [tokenizer.encode(option, add_special_tokens=False) for option in options]
    if not ids[0] or not ids[1] or ids[0][0] == ids[1][0]:
        raise ValueError(f"the judge's options {options} must start with different tokens, got {ids}")
    return ids[0][0], ids[1][0]


def judge_input_ids(tokenizer: Any, template: str, prompt: list[dict] | str, first: str, second: str,
                    max_length: int) -> list[int]:
    """Token ids of the chat-rendered judge message, up to and including the assistant's generation prompt.

    A message longer than max_length loses its START (the options and the question close the template)."""
    message = template.format(prompt=prompt_text(prompt), first=first, second=second)
    text = render_prompt(tokenizer, [{"role": "user", "content": message}])
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[-max_length:]


def option_logits(model: Any, rows: list[list[int]], option_ids: tuple[int, int], pad_id: int) -> torch.Tensor:
    """Next-token logits of the two option tokens after each row. rows: N token lists -> [N,2] (no grad)."""
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        last = hidden[torch.arange(len(rows), device=device), mask.sum(1) - 1]  # [N,H]
        logits = model.get_output_embeddings()(last)  # [N,V]: only the last position of each row
    return logits[:, list(option_ids)].float().cpu()


class PairJudge:
    """`judge(prompts, a, b) -> (prob a is better [N], tie [N])` with a causal LM judge, batched and cached."""

    def __init__(self, model: Any, tokenizer: Any, template: str, options: list[str], batch_size: int = 8,
                 max_length: int = 512, cache_path: str | Path | None = None, name: str = "judge"):
        self.model, self.tokenizer, self.template = model.eval(), tokenizer, template
        self.options, self.batch_size, self.max_length, self.name = list(options), batch_size, max_length, name
        self.option_ids = option_token_ids(tokenizer, self.options)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache: dict[str, float] = {}
        self.asked = 0  # judge forwards actually run (cache misses)
        if self.cache_path and self.cache_path.exists():
            for line in self.cache_path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.cache[row["key"]] = row["p_first"]

    def key(self, prompt: list[dict] | str, first: str, second: str) -> str:
        blob = json.dumps([self.name, self.template, self.options, prompt, first, second], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def first_probabilities(self, prompts: list, firsts: list[str], seconds: list[str]) -> torch.Tensor:
        """P(first option is better) for each (prompt, first, second) in that order. -> [N] float64."""
        keys = [self.key(p, f, s) for p, f, s in zip(prompts, firsts, seconds)]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self.cache}.values())
        fresh: list[dict] = []
        for start in range(0, len(todo), self.batch_size):
            part = todo[start : start + self.batch_size]
            rows = [judge_input_ids(self.tokenizer, self.template, prompts[i], firsts[i], seconds[i], self.max_length)
                    for i in part]
            probs = first_option_probability(option_logits(self.model, rows, self.option_ids, self.pad_id))
            for i, p in zip(part, probs.tolist()):
                self.cache[keys[i]] = p
                fresh.append({"key": keys[i], "p_first": p})
            self.asked += len(part)
        if self.cache_path and fresh:
            with open(self.cache_path, "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in fresh)
        return torch.tensor([self.cache[k] for k in keys], dtype=torch.float64)

    def __call__(self, prompts: list, a: list[str], b: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(probability that a is better than b [N], tie [N] bool): both orders, position-swap debiased."""
        p_ab = self.first_probabilities(prompts, a, b)
        p_ba = self.first_probabilities(prompts, b, a)
        return position_swapped_preference(p_ab, p_ba)
