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
reward model (RLAIF, Lee et al. 2023); `annotator: gold` ranks by the gold reward itself; `annotator: judge` is
an LLM judge (models/judge.py: both orders, position-swap debiased, cached in output_dir/judge_cache.jsonl).

Active labelling (`label_budget > 0`), the labelling step of `alignkit iterate`: labels are the expensive part,
so only `label_budget` comparisons are labelled. The candidates are every two distinct responses of a prompt;
`select` picks which: random, uncertainty (the pairs whose margin under `select_model` is closest to 0) or
ensemble (the pairs an ensemble's members disagree on most: selection.select_disagreement_pairs). Each labelled
comparison costs one label whatever its outcome (a tie, an inconsistent judge, is dropped but paid for), and
pairs.jsonl holds the labelled ones. The eval prompts' pairs are chosen at random (eval_label_budget): they
measure the reward model on the policy's samples, and a selected set would bias that measurement.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from alignkit.config import ConfigError, LabelConfig, check_groups
from alignkit.data.records import DataError
from alignkit.rollout.rewards import rewards_for, task_name_for
from alignkit.rollout.sampling import sample_texts
from alignkit.runtime.setup import derive_seed
from alignkit.runtime.stage import finish_run, load_policy, load_train_eval, start_run

ANNOTATORS = ("task", "gold", "rm", "judge")
SELECTIONS = ("random", "uncertainty", "ensemble")


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
    if cfg.select not in SELECTIONS:
        raise ConfigError(f"select must be one of {', '.join(SELECTIONS)}, got {cfg.select!r}")
    if cfg.label_budget < 0 or cfg.eval_label_budget < 0:
        raise ConfigError("label_budget and eval_label_budget must be >= 0")
    if cfg.annotator == "judge" and (not cfg.judge.model or cfg.label_budget == 0):
        raise ConfigError("annotator=judge compares pairs: it needs judge.model and label_budget > 0")
    if cfg.select != "random" and (not cfg.select_model or cfg.label_budget == 0):
        raise ConfigError(f"select={cfg.select} reads a reward model's margins: it needs select_model and "
                          "label_budget > 0")
    task = task_name_for(cfg.reward.task, cfg.train_data, required=False)
    if task is None and cfg.annotator in ("task", "gold"):
        raise ConfigError(f"annotator={cfg.annotator} needs a built-in task: set reward.task=sort, "
                          "or label task: prompts")
    return task


def annotate(cfg: LabelConfig, accelerator, task: str | None, prompts: list, texts: list[list[str]], split: int,
             golds: list | None = None) -> tuple[list, list]:
    """(scores, golds) per response; golds is None without a task. The simulated annotator draws its noise
    from (seed, split, prompt index), so labels do not depend on the process count or on other prompts."""
    if golds is None and task:
        golds = rewards_for(accelerator, "gold", prompts, texts, task)
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


# ------------------------------------------------------------------------- active labelling of pairs


def pair_margins(cfg: LabelConfig, accelerator, prompts: list, responses: list[list[str]],
                 candidates: list[tuple[int, int, int]]) -> torch.Tensor:
    """select_model's margins r(first) - r(second) of the candidates: [N], or [M,N] per member for select=ensemble."""
    from alignkit.rollout.rewards import load_scorer, score_with

    rm, rm_tokenizer = load_scorer(accelerator, cfg.select_model)
    if cfg.select == "ensemble":
        if not hasattr(rm, "members"):
            raise ConfigError(f"select=ensemble needs an ensemble (alignkit rm ensemble=k); {cfg.select_model} is one model")
        scores = score_with(accelerator, rm, rm_tokenizer, prompts, responses, cfg.reward.batch_size, cfg.max_length,
                            per_member=True)
        return torch.tensor([[m1 - m2 for m1, m2 in zip(scores[i][a], scores[i][b])] for i, a, b in candidates]).T
    scores = score_with(accelerator, rm, rm_tokenizer, prompts, responses, cfg.reward.batch_size, cfg.max_length)
    return torch.tensor([scores[i][a] - scores[i][b] for i, a, b in candidates], dtype=torch.float64)


def choose_pairs(cfg: LabelConfig, accelerator, select: str, prompts: list, responses: list[list[str]],
                 candidates: list[tuple[int, int, int]], budget: int, split: int) -> list[int]:
    """Indices of the candidates to label (selection.select_*_pairs)."""
    from alignkit.selection import select_disagreement_pairs, select_random_pairs, select_uncertain_pairs

    if select == "random" or not candidates:
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "select", split))
        return select_random_pairs(len(candidates), budget, generator)
    margins = pair_margins(cfg, accelerator, prompts, responses, candidates)
    return select_uncertain_pairs(margins, budget) if select == "uncertainty" else select_disagreement_pairs(margins, budget)


def load_judge(cfg: LabelConfig, accelerator):
    """The LLM judge of annotator=judge, on every process (each judges all pairs alike); the main one caches."""
    from alignkit.models.judge import PairJudge
    from alignkit.models.loading import load_causal_lm

    with accelerator.main_process_first():
        model, tokenizer = load_causal_lm(cfg.judge.model)
    cache = Path(cfg.output_dir) / "judge_cache.jsonl" if accelerator.is_main_process else None
    return PairJudge(model.to(accelerator.device), tokenizer, cfg.judge.template, cfg.judge.options,
                     cfg.judge.batch_size, cfg.judge.max_length, cache, name=cfg.judge.model)


def pair_winners(cfg: LabelConfig, accelerator, task: str | None, prompts: list, responses: list[list[str]],
                 pairs: list[tuple[int, int, int]], golds: list | None, split: int, judge=None) -> list[int | None]:
    """The annotator's verdict on each (prompt, first, second) pair: 0 (first better), 1 (second) or None (tie)."""
    if not pairs:
        return []
    if cfg.annotator == "judge":
        prob_first, tie = judge([prompts[i] for i, _, _ in pairs], [responses[i][a] for i, a, _ in pairs],
                                [responses[i][b] for i, _, b in pairs])
        return [None if t else (0 if p > 0.5 else 1) for p, t in zip(prob_first.tolist(), tie.tolist())]
    scores, _ = annotate(cfg, accelerator, task, prompts, responses, split, golds)
    verdicts = []
    for i, a, b in pairs:
        sa, sb = scores[i][a], scores[i][b]
        verdicts.append(None if sa == sb else (0 if sa > sb else 1))
    return verdicts


def label_pairs_split(cfg: LabelConfig, accelerator, model, tokenizer, task: str | None, records: list[dict],
                      split: int, judge=None) -> tuple[list, dict]:
    """(labelled pair records, counts) of one split under its label budget."""
    from alignkit.selection import candidate_pairs

    prompts = [r["prompt"] for r in records]
    texts = sample_texts(accelerator, model, tokenizer, prompts, cfg.n, cfg.sampling.temperature, cfg.sampling.max_new_tokens,
                         cfg.sampling.chunk, cfg.seed, split, max(1, cfg.max_length - cfg.sampling.max_new_tokens))
    responses = [[t[k] for k in unique_responses(t)] for t in texts]
    candidates = [(i, a, b) for i, r in enumerate(responses) for a, b in candidate_pairs(len(r))]
    budget = cfg.label_budget if split == 0 else (cfg.eval_label_budget or cfg.label_budget)
    chosen = [candidates[c] for c in choose_pairs(cfg, accelerator, cfg.select if split == 0 else "random", prompts,
                                                 responses, candidates, budget, split)]
    golds = rewards_for(accelerator, "gold", prompts, responses, task) if task else None
    winners = pair_winners(cfg, accelerator, task, prompts, responses, chosen, golds, split, judge)
    rows, agree, gold_pairs = [], 0, 0
    for (i, a, b), winner in zip(chosen, winners):
        if winner is None:
            continue
        best, worst = (a, b) if winner == 0 else (b, a)
        meta: dict[str, Any] = {}
        if golds:
            meta.update(gold_chosen=golds[i][best], gold_rejected=golds[i][worst])
            if golds[i][best] != golds[i][worst]:
                gold_pairs += 1
                agree += golds[i][best] > golds[i][worst]
        rows.append({"prompt": prompts[i], "chosen": responses[i][best], "rejected": responses[i][worst], "meta": meta})
    counts: dict[str, Any] = {"samples": sum(len(t) for t in texts), "candidate_pairs": len(candidates),
                              "labels_used": len(chosen), "ties": winners.count(None), "pairs": len(rows)}
    if gold_pairs:
        counts["pair_label_gold_agreement"] = agree / gold_pairs
    if golds:
        counts["sample_gold_reward"] = sum(sum(g) for g in golds) / max(1, sum(len(g) for g in golds))
    if judge is not None:
        counts["judge_forwards"] = judge.asked
    return rows, counts


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
    if cfg.label_budget > 0:
        return finish_run(accelerator, cfg, {**summary, **label_budgeted(cfg, accelerator, model, tokenizer, task,
                                                                          train_records, eval_records)}, started)
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


def label_budgeted(cfg: LabelConfig, accelerator, model, tokenizer, task: str | None, train_records: list[dict],
                   eval_records: list[dict]) -> dict[str, Any]:
    """Active labelling: pairs.jsonl (and pairs_eval.jsonl) under the label budgets; the summary's counts."""
    judge = load_judge(cfg, accelerator) if cfg.annotator == "judge" else None
    summary: dict[str, Any] = {"select": cfg.select, "label_budget": cfg.label_budget}
    for split, (records, suffix) in enumerate(((train_records, ""), (eval_records, "_eval"))):
        if not records:
            continue
        rows, counts = label_pairs_split(cfg, accelerator, model, tokenizer, task, records, split, judge)
        if split == 0 and not rows:
            raise DataError(f"no labelled pair of {len(records)} prompts: every chosen pair was a tie or a prompt "
                            "had fewer than two distinct responses; raise n, temperature or label_budget")
        if accelerator.is_main_process:
            write_jsonl(Path(cfg.output_dir) / f"pairs{suffix}.jsonl", rows)
        name = "train" if split == 0 else "eval"
        summary[f"{name}_prompts"] = len(records)
        summary.update({f"{name}_{key}": value for key, value in counts.items()})
    return summary
