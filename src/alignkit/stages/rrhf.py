"""`alignkit rrhf`: Rank Responses to align Human Feedback (Yuan et al. 2023).

config -> ranked lists (prompt, K responses, scores) -> optional samples from the STARTING policy, added to
each list (de-duplicated) -> a reward for every response (given | gold | rm), computed once -> token lists
-> the shared loop -> `final/` + `summary.json` (+ `lists.jsonl`: every list with its rewards and sources).

Per list, with p_i = (1/|y_i|) * sum_t log pi(y_i,t | x, y_i,<t) (length-normalised log-prob of response i):
    loss = rank_weight * sum_{r_i < r_j} relu(p_i - p_j) + sft_weight * (NLL per token of the best response)
Only the policy is trained: no reference model, no critic.

Rules:
- reward=given has no score for a policy sample, so policy_samples > 0 with reward=given is a config error.
- One row = one list (weight 1). All responses of all lists of a micro-batch go through ONE padding-free
  forward (runtime.sequences). Ragged K (lists of different lengths, e.g. after de-duplication) is handled by
  grouping: lists with the same K go through losses.rrhf_loss together as [B_k, K]; nothing is padded.
- A sequence longer than max_length loses the start of its prompt, never its response; a response that
  alone does not fit is dropped; a list left with < 2 responses or with all rewards tied ranks nothing and
  is dropped. Both are counted in summary.json; no list left is an error.
- Policy samples are drawn in fixed chunks of prompts, chunk c seeded from (seed, c), chunks spread over
  processes and gathered: 1 and N processes sample the same responses. Reward-model scores likewise.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from alignkit.config import ConfigError, RRHFConfig, check_groups
from alignkit.data.chat import tokenize_prompt_completion
from alignkit.data.records import DataError
from alignkit.losses import rrhf_loss
from alignkit.rollout.rewards import rewards_for, task_name_for
from alignkit.rollout.sampling import EVAL_SPLIT, TRAIN_SPLIT, sample_texts
from alignkit.runtime.sequences import shared_prefix_logps
from alignkit.runtime.stage import finish_run, load_policy, load_train_eval, start_run
from alignkit.runtime.train_loop import save_final, train

TERMS = ("rank_loss", "sft_loss", "rank_accuracy", "top_reward", "best_reward")


def check_config(cfg: RRHFConfig) -> None:
    """Config errors that would otherwise surface after minutes of sampling."""
    check_groups(cfg)
    if cfg.reward.source == "given" and cfg.policy_samples > 0:
        raise ConfigError(
            "reward=given has no score for the policy_samples responses; use reward=gold or reward=rm, "
            "or policy_samples=0"
        )
    if cfg.policy_samples < 0:
        raise ConfigError(f"policy_samples must be >= 0, got {cfg.policy_samples}")
    if cfg.rank_weight < 0 or cfg.sft_weight < 0 or cfg.rank_weight + cfg.sft_weight == 0:
        raise ConfigError("rank_weight and sft_weight must be >= 0 and not both 0")
    if cfg.reward.source == "gold":
        gold_task_name(cfg)


def gold_task_name(cfg: RRHFConfig) -> str:
    """cfg.reward.task, else the task of the first task: spec in train_data."""
    return task_name_for(cfg.reward.task, cfg.train_data)


# ----------------------------------------------------------------------------- lists and rewards


def as_lists(records: list[dict]) -> list[dict]:
    """Ranked records -> lists {prompt, responses, sources ("data"/"sample"), given (scores)}."""
    return [
        {"prompt": r["prompt"], "responses": list(r["responses"]), "sources": ["data"] * len(r["responses"]),
         "given": list(r["scores"])}
        for r in records
    ]


def add_policy_samples(accelerator: Accelerator, model, tokenizer, lists: list[dict], cfg: RRHFConfig, split: int) -> dict:
    """Append cfg.policy_samples sampled responses per list (new texts only); return counts."""
    n = cfg.policy_samples
    if n <= 0 or not lists:
        return {"samples_drawn": 0, "samples_added": 0}
    sampled = sample_texts(accelerator, model, tokenizer, [item["prompt"] for item in lists], n, cfg.sampling.temperature,
                           cfg.sampling.max_new_tokens, cfg.sampling.chunk, cfg.seed, split, max(1, cfg.max_length - cfg.sampling.max_new_tokens))
    added = 0
    for item, texts in zip(lists, sampled):
        seen = {r.strip() for r in item["responses"]}
        for text in texts:
            if text not in seen:
                seen.add(text)
                item["responses"].append(text)
                item["sources"].append("sample")
                added += 1
    return {"samples_drawn": n * len(lists), "samples_added": added}


def assign_rewards(accelerator: Accelerator, cfg: RRHFConfig, lists: list[dict]) -> None:
    """Set item["rewards"] on every list from cfg.reward."""
    if cfg.reward.source == "given":
        rewards = [item["given"] for item in lists]
    else:
        rewards = rewards_for(accelerator, cfg.reward.source, [item["prompt"] for item in lists],
                              [item["responses"] for item in lists], gold_task_name(cfg) if cfg.reward.source == "gold" else None,
                              cfg.reward.model, cfg.reward.batch_size, cfg.max_length)
    for item, r in zip(lists, rewards):
        item["rewards"] = r


def tokenize_lists(tokenizer, lists: list[dict], max_length: int) -> tuple[list[dict], dict[str, int]]:
    """Rows {examples: [{input_ids, labels}] * K, rewards: [K], best: index of the highest reward}.

    Also returns drop counts: responses that alone exceed max_length (a long prompt only loses its start),
    lists left ranking nothing.
    """
    rows, dropped = [], {"dropped_responses": 0, "dropped_lists": 0}
    for item in lists:
        examples, rewards = [], []
        for response, reward in zip(item["responses"], item["rewards"]):
            example = tokenize_prompt_completion(tokenizer, item["prompt"], response, max_length)
            # The first label is never predicted (one-token shift): it must not be the only one.
            if example is None or all(label == -100 for label in example["labels"][1:]):
                dropped["dropped_responses"] += 1
                continue
            examples.append(example)
            rewards.append(float(reward))
        if len(examples) < 2 or len(set(rewards)) < 2:
            dropped["dropped_lists"] += 1
            continue
        best = max(range(len(rewards)), key=rewards.__getitem__)
        rows.append({"examples": examples, "rewards": rewards, "best": best})
    return rows, dropped


# ----------------------------------------------------------------------------- loss


def list_term_sums(model, rows: list[dict], pad_id: int, row_tokens: int) -> dict[str, torch.Tensor]:
    """Sums over `rows` (lists) of each TERMS entry, scalar tensors; rank_loss and sft_loss differentiable.

    rank_loss: rrhf_loss of the list; sft_loss: NLL per token of its best-reward response; rank_accuracy:
    share of its reward-ordered pairs the policy's length-normalised scores order the same way (strictly);
    top_reward: reward of the response the policy scores highest; best_reward: the list's highest reward.
    """
    examples = [e for row in rows for e in row["examples"]]
    # each list's prompt forwarded once for its K responses
    sums, counts = shared_prefix_logps(model, examples, [len(row["examples"]) for row in rows], pad_id, row_tokens)
    scores = sums / counts.clamp(min=1)  # [N] length-normalised log-probs
    device = scores.device
    starts, offset = [], 0
    for row in rows:
        starts.append(offset)
        offset += len(row["examples"])

    best = torch.tensor([s + row["best"] for s, row in zip(starts, rows)], device=device)
    total = {"sft_loss": -(sums[best] / counts[best].clamp(min=1)).sum()}
    total.update({name: torch.zeros((), device=device) for name in TERMS if name != "sft_loss"})
    by_k: dict[int, list[int]] = {}
    for b, row in enumerate(rows):
        by_k.setdefault(len(row["examples"]), []).append(b)
    for k, members in by_k.items():
        index = torch.tensor([[starts[b] + i for i in range(k)] for b in members], device=device)  # [B_k,K]
        s = scores[index]
        r = torch.tensor([rows[b]["rewards"] for b in members], device=device, dtype=s.dtype)
        total["rank_loss"] = total["rank_loss"] + rrhf_loss(s, r) * len(members)  # rrhf_loss is a mean over B_k
        worse = r.unsqueeze(2) < r.unsqueeze(1)  # [B_k,K,K]: i worse than j
        agree = worse & (s.detach().unsqueeze(2) < s.detach().unsqueeze(1))
        total["rank_accuracy"] += (agree.sum((1, 2)) / worse.sum((1, 2)).clamp(min=1)).sum()
        total["top_reward"] += r.gather(1, s.detach().argmax(1, keepdim=True)).sum()
        total["best_reward"] += r.max(1).values.sum()
    return total


def evaluate_lists(accelerator: Accelerator, model, rows: list[dict], micro_batch_size: int, pad_id: int,
                   row_tokens: int) -> dict[str, float]:
    """Mean of each TERMS entry over held-out lists, split across processes (rows[rank::world])."""
    if not rows:
        return {}
    model = accelerator.unwrap_model(model)
    mine = rows[accelerator.process_index :: accelerator.num_processes]
    totals = torch.zeros(len(TERMS) + 1, device=accelerator.device)
    for i in range(0, len(mine), micro_batch_size):
        chunk = mine[i : i + micro_batch_size]
        terms = list_term_sums(model, chunk, pad_id, row_tokens)
        totals += torch.stack([terms[n].float() for n in TERMS] + [torch.tensor(float(len(chunk)), device=accelerator.device)])
    totals = accelerator.reduce(totals, "sum")
    return {name: (totals[i] / totals[-1]).item() for i, name in enumerate(TERMS)}


# ----------------------------------------------------------------------------- stage


def build_lists(accelerator: Accelerator, cfg: RRHFConfig, model, tokenizer, records: list[dict], split: int) -> tuple[list[dict], dict]:
    """Ranked records -> lists with policy samples and rewards; plus counts for the summary."""
    lists = as_lists(records)
    if accelerator.is_main_process and cfg.policy_samples > 0 and lists:
        print(f"rrhf: sampling {cfg.policy_samples} responses for each of {len(lists)} prompts", file=sys.stderr, flush=True)
    stats = add_policy_samples(accelerator, model, tokenizer, lists, cfg, split)
    assign_rewards(accelerator, cfg, lists)
    return lists, stats


def write_lists(path: Path, splits: dict[str, list[dict]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for split, lists in splits.items():
            for item in lists:
                row = {k: item[k] for k in ("prompt", "responses", "sources", "rewards")}
                handle.write(json.dumps({"split": split, **row}) + "\n")


def reward_means(lists: list[dict]) -> dict[str, float]:
    """Mean reward of data responses and of policy samples (how good the policy's own answers are)."""
    out = {}
    for source in ("data", "sample"):
        values = [r for item in lists for r, s in zip(item["rewards"], item["sources"]) if s == source]
        if values:
            out[f"{source}_reward_mean"] = sum(values) / len(values)
    return out


def run(cfg: RRHFConfig) -> dict[str, Any]:
    started = time.time()
    check_config(cfg)
    accelerator = start_run(cfg)

    train_records, eval_records, invalid = load_train_eval(cfg, kind="ranked")
    model, tokenizer = load_policy(accelerator, cfg, train_records)
    model.to(accelerator.device)
    train_lists, sample_stats = build_lists(accelerator, cfg, model, tokenizer, train_records, split=TRAIN_SPLIT)
    eval_lists, _ = build_lists(accelerator, cfg, model, tokenizer, eval_records, split=EVAL_SPLIT)
    if accelerator.is_main_process:
        write_lists(Path(cfg.output_dir) / "lists.jsonl", {"train": train_lists, "eval": eval_lists})

    train_rows, dropped = tokenize_lists(tokenizer, train_lists, cfg.max_length)
    if not train_rows:
        raise DataError(
            f"no training list left out of {len(train_lists)}: each needs >= 2 responses that survive truncation "
            f"at max_length={cfg.max_length} and rewards that are not all tied ({dropped})"
        )
    eval_rows, eval_dropped = tokenize_lists(tokenizer, eval_lists, cfg.max_length)
    eval_rows = eval_rows[: cfg.max_eval_rows] if cfg.max_eval_rows > 0 else eval_rows
    max_k = max(len(row["examples"]) for row in train_rows)
    row_tokens = cfg.row_tokens or cfg.max_length * max_k
    pad_id = tokenizer.pad_token_id

    def micro_loss(model, indices: list[int]):
        terms = list_term_sums(model, [train_rows[i] for i in indices], pad_id, row_tokens)
        loss = cfg.rank_weight * terms["rank_loss"] + cfg.sft_weight * terms["sft_loss"]
        return loss, {name: value.detach() for name, value in terms.items()}

    model, summary = train(
        cfg,
        accelerator,
        model,
        row_weights=[1.0] * len(train_rows),
        micro_loss=micro_loss,
        evaluate=lambda m: evaluate_lists(accelerator, m, eval_rows, cfg.micro_batch_size, pad_id, row_tokens),
        stage="rrhf",
        input_tokens=[sum(len(e["input_ids"]) for e in row["examples"]) for row in train_rows],
    )
    save_final(accelerator, model, tokenizer, cfg.output_dir)
    summary.pop("train_weight", None)
    summary.update(
        reward=cfg.reward.source,
        n_train_records=len(train_records),
        n_eval_records=len(eval_records),
        invalid_records=len(invalid),
        n_train_lists=len(train_rows),
        n_eval_lists=len(eval_rows),
        responses_per_list=sum(len(row["examples"]) for row in train_rows) / len(train_rows),
        **sample_stats,
        **reward_means(train_lists),
        **dropped,
        **{f"eval_{k}": v for k, v in eval_dropped.items()},
    )
    return finish_run(accelerator, cfg, summary, started)
