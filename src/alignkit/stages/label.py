"""`alignkit label`: comparison data from a model's own samples, ranked by an annotator.

config -> prompts -> n samples per prompt from `model` (rollout.sampling.sample_texts: seeded chunks, any process count
samples alike) -> duplicates and empty responses dropped -> each response scored by the annotator -> files:
    ranked.jsonl  {prompt, responses, scores, meta: {gold}}       (kind ranked: `alignkit rm`, `alignkit rrhf`)
    pairs.jsonl   {prompt, chosen, rejected, meta: {gold_chosen, gold_rejected}}  (kind preference: `alignkit dpo`)
    (ranked_eval.jsonl, pairs_eval.jsonl for eval_data) and summary.json.

This is how InstructGPT's reward model data is made (Ouyang et al. 2022, section 3.4): labelers rank K outputs
of the SFT policy for one prompt. A reward model trained on the policy's own outputs judges the kind of
responses the policy writes; one trained only on other responses can be blind to the policy's typical slips.
On the built-in task, `annotator: task` is the task's simulated labeler (gold + length_bias * items + noise *
Gumbel: noisy, and biased towards long answers in a way gold is not); `annotator: rm` is AI feedback from a
reward model (RLAIF, Lee et al. 2023); `annotator: gold` ranks by the gold reward itself.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from alignkit.config import ConfigError, LabelConfig, check_groups
from alignkit.data.records import DataError
from alignkit.rollout.rewards import rewards_for, task_name_for
from alignkit.rollout.sampling import sample_texts
from alignkit.runtime.setup import derive_seed
from alignkit.runtime.stage import finish_run, load_policy, load_train_eval, start_run

ANNOTATORS = ("task", "gold", "rm")


def check_config(cfg: LabelConfig) -> str | None:
    """Errors before any model loads; returns the task name (None when there is no task and none is needed)."""
    check_groups(cfg)
    if cfg.annotator not in ANNOTATORS:
        raise ConfigError(f"annotator must be one of {', '.join(ANNOTATORS)}, got {cfg.annotator!r}")
    if cfg.n < 2:
        raise ConfigError(f"n must be >= 2 responses per prompt to rank, got {cfg.n}")
    if cfg.annotator == "rm" and not cfg.reward.model:
        raise ConfigError("annotator=rm needs reward.model (the judging reward model)")
    if cfg.noise < 0:
        raise ConfigError(f"noise must be >= 0, got {cfg.noise}")
    task = task_name_for(cfg.reward.task, cfg.train_data, required=False)
    if task is None and cfg.annotator in ("task", "gold"):
        raise ConfigError(f"annotator={cfg.annotator} needs a built-in task: set reward.task=sort, "
                          "or label task: prompts")
    return task


def annotate(cfg: LabelConfig, accelerator, task: str | None, prompts: list, texts: list[list[str]], split: int) -> tuple[list, list]:
    """(scores, golds) per response; golds is None without a task. The simulated annotator draws its noise
    from (seed, split, prompt index), so labels do not depend on the process count or on other prompts."""
    golds = rewards_for(accelerator, "gold", prompts, texts, task) if task else None
    if cfg.annotator == "gold":
        return golds, golds
    if cfg.annotator == "rm":
        return rewards_for(accelerator, "rm", prompts, texts, None, cfg.reward.model, cfg.reward.batch_size, cfg.max_length), golds
    from alignkit.data.tasks import annotator_utility

    scores = []
    for i, (responses, gold) in enumerate(zip(texts, golds)):
        rng = random.Random(derive_seed(cfg.seed, "label", split, i))
        scores.append([annotator_utility(g, len(r.split()), cfg.noise, cfg.length_bias, rng) for r, g in zip(responses, gold)])
    return scores, golds


def unique_responses(texts: list[str]) -> list[int]:
    """Indices of the first occurrence of each distinct non-empty response."""
    seen, keep = set(), []
    for i, text in enumerate(texts):
        if text.strip() and text.strip() not in seen:
            seen.add(text.strip())
            keep.append(i)
    return keep


def label_split(cfg: LabelConfig, accelerator, model, tokenizer, task: str | None, records: list[dict], split: int) -> tuple[list, list, dict]:
    """(ranked records, pair records, counts) for one split's prompts."""
    prompts = [r["prompt"] for r in records]
    texts = sample_texts(accelerator, model, tokenizer, prompts, cfg.n, cfg.sampling.temperature, cfg.sampling.max_new_tokens,
                         cfg.sampling.chunk, cfg.seed, split, max(1, cfg.max_length - cfg.sampling.max_new_tokens))
    scores, golds = annotate(cfg, accelerator, task, prompts, texts, split)
    ranked, pairs, counts = [], [], {"samples": 0, "dropped_responses": 0, "dropped_prompts": 0, "label_agrees_with_gold": 0, "gold_pairs": 0}
    for i, prompt in enumerate(prompts):
        keep = unique_responses(texts[i])
        counts["samples"] += len(texts[i])
        counts["dropped_responses"] += len(texts[i]) - len(keep)
        s = [scores[i][k] for k in keep]
        if len(keep) < 2 or max(s) == min(s):
            counts["dropped_prompts"] += 1
            continue
        responses = [texts[i][k] for k in keep]
        gold = [golds[i][k] for k in keep] if golds else None
        ranked.append({"prompt": prompt, "responses": responses, "scores": s, "meta": {"gold": gold} if gold else {}})
        top, bottom = max(range(len(s)), key=s.__getitem__), min(range(len(s)), key=s.__getitem__)
        meta = {"score_chosen": s[top], "score_rejected": s[bottom]}
        if gold:
            meta.update(gold_chosen=gold[top], gold_rejected=gold[bottom])
            if gold[top] != gold[bottom]:
                counts["gold_pairs"] += 1
                counts["label_agrees_with_gold"] += gold[top] > gold[bottom]
        pairs.append({"prompt": prompt, "chosen": responses[top], "rejected": responses[bottom], "meta": meta})
    if golds:
        counts["sample_gold_reward"] = sum(sum(g) for g in golds) / max(1, sum(len(g) for g in golds))
    return ranked, pairs, counts


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    tmp.replace(path)


def run(cfg: LabelConfig) -> dict[str, Any]:
    started = time.time()
    task = check_config(cfg)
    accelerator = start_run(cfg)
    train_records, eval_records, invalid = load_train_eval(cfg, kind="prompts")
    model, tokenizer = load_policy(accelerator, cfg, train_records)
    model.to(accelerator.device).eval()
    out = Path(cfg.output_dir)
    summary: dict[str, Any] = {"annotator": cfg.annotator, "n": cfg.n, "invalid_records": len(invalid)}
    for split, (records, suffix) in enumerate(((train_records, ""), (eval_records, "_eval"))):
        if not records:
            continue
        ranked, pairs, counts = label_split(cfg, accelerator, model, tokenizer, task, records, split)
        if split == 0 and not ranked:
            raise DataError(f"no prompt of {len(records)} kept two distinct, differently scored responses; "
                            "raise n or temperature")
        if accelerator.is_main_process:
            write_jsonl(out / f"ranked{suffix}.jsonl", ranked)
            write_jsonl(out / f"pairs{suffix}.jsonl", pairs)
        name = "train" if split == 0 else "eval"
        summary[f"{name}_prompts"] = len(records)
        summary[f"{name}_lists"] = len(ranked)
        summary[f"{name}_responses_per_list"] = sum(len(r["responses"]) for r in ranked) / max(1, len(ranked))
        for key, value in counts.items():
            if key not in ("label_agrees_with_gold", "gold_pairs"):
                summary[f"{name}_{key}"] = value
        if counts["gold_pairs"]:
            summary[f"{name}_pair_label_gold_agreement"] = counts["label_agrees_with_gold"] / counts["gold_pairs"]
    return finish_run(accelerator, cfg, summary, started)
