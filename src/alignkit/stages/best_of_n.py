"""`alignkit best-of-n`: best-of-n / rejection sampling (Llama 2, Touvron et al. 2023; Gao et al. 2022).

config -> prompts -> n samples per prompt from `model` -> a reward for each (rm | gold) -> the best per
prompt (selection.best_of_n) -> `best.jsonl` (SFT-ready {prompt, completion, reward, n}), `samples.jsonl`
(every candidate with its reward, and gold when a task exists), `summary.json`. With finetune=true the
model is then fine-tuned on the best responses with the SFT loss (rejection-sampling fine-tuning) and
`final/` is written; without it the stage is inference only (no training, no final/).

The policy "sample n, keep the best" is itself a policy. Its KL to the sampling policy is at most
log(n) - (n-1)/n nats, reached only when the reward never ties (Beirami et al. 2024), reported as
`kl_upper_bound`; beside it `kl_estimate` (and its stderr over prompts) estimates the KL itself from each
prompt's n samples, counting repeated rewards (duplicate responses) as atoms
(eval.metrics.best_of_n_kl_estimate, which states its bias).

Sampling is done in fixed chunks of prompts seeded from (seed, split, chunk) and spread over processes
(rollout.sampling.map_chunks), reward-model scores likewise, so 1 and N processes select the same responses.
The candidates (rollout.sampling.sample_candidates) are rollout.sampling.sample_texts' texts with each
response's token length and whether it ended with the end-of-turn token; rollout.rewards.Scorer scores them.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from alignkit.config import BestOfNConfig
from alignkit.data.chat import tokenize_prompt_completion
from alignkit.data.records import DataError
from alignkit.eval import metrics as M
from alignkit.rollout.rewards import Scorer, reward_matrix
from alignkit.rollout.sampling import EVAL_SPLIT, TRAIN_SPLIT, check_sampling_config, sample_candidates
from alignkit.runtime.stage import finish_run, load_policy, load_train_eval, start_run

def kl_upper_bound(n: int) -> float:
    """log n - (n-1)/n nats: an UPPER bound on KL(best-of-n || sampler) (Beirami et al. 2024), equal to it only
    for a reward without ties (the value Gao et al. 2022 give as the KL)."""
    return math.log(n) - (n - 1) / n


def selection_stats(candidates: list[list[dict]], best: list[int]) -> dict[str, float]:
    """Rewards of the selected responses vs of all samples (stderr over prompts), the selection's estimated KL,
    and length/EOS/diversity."""
    chosen = [per[b] for per, b in zip(candidates, best)]
    out: dict[str, float] = {}
    # The KL of selecting by the proxy ("reward"), the reward that chose; equal texts are one outcome.
    out["kl_estimate"], out["kl_estimate_stderr"] = M.best_of_n_kl_estimate(
        reward_matrix(candidates, "reward"), [[c["text"] for c in per] for per in candidates])
    keys = [("reward", "proxy_reward")] + ([("gold", "gold_reward")] if "gold" in candidates[0][0] else [])
    for key, name in keys:
        out[name], out[f"{name}_stderr"] = M.mean_and_stderr([c[key] for c in chosen])
        out[f"sample_{name}"], out[f"sample_{name}_stderr"] = M.grouped_mean_and_stderr(reward_matrix(candidates, key))
    if "gold" in candidates[0][0]:
        # The best any selector could do with these samples: how much of it the proxy recovers.
        out["oracle_gold_reward"] = float(reward_matrix(candidates, "gold").max(dim=1).values.mean())
    lengths = M.length_stats([c["length"] for c in chosen])
    out.update(length=lengths["mean"], length_stderr=lengths["stderr"],
               eos_fraction=M.eos_fraction([c["finished"] for c in chosen]),
               distinct_2=M.distinct_n([c["text"] for c in chosen], 2),
               sample_length=M.length_stats([c["length"] for per in candidates for c in per])["mean"])
    return out


def best_of(accelerator: Accelerator, cfg: BestOfNConfig, model, tokenizer, scorer: Scorer, records: list[dict],
            split: int) -> tuple[list[list[dict]], list[int]]:
    """(candidates per prompt with rewards, index of the best per prompt) for prompt records."""
    prompts = [r["prompt"] for r in records]
    candidates = sample_candidates(accelerator, model, tokenizer, prompts, cfg.n, cfg, cfg.seed, split)
    scorer(prompts, candidates)
    from alignkit.selection import best_of_n

    best = best_of_n(reward_matrix(candidates, "reward")).tolist()
    return candidates, best


# ----------------------------------------------------------------------------- files


def write_outputs(out_dir: Path, n: int, splits: dict[str, tuple[list[dict], list[list[dict]], list[int]]]) -> None:
    """best.jsonl (train prompts only: the SFT data) and samples.jsonl (every candidate, every split)."""
    with open(out_dir / "best.jsonl", "w", encoding="utf-8") as best_file:
        records, candidates, best = splits["train"]
        for record, per, b in zip(records, candidates, best):
            row = {"prompt": record["prompt"], "completion": per[b]["text"], "reward": per[b]["reward"], "n": n}
            if "gold" in per[b]:
                row["gold"] = per[b]["gold"]
            best_file.write(json.dumps(row) + "\n")
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as samples_file:
        for split, (records, candidates, best) in splits.items():
            for record, per, b in zip(records, candidates, best):
                row = {"split": split, "prompt": record["prompt"], "best": b,
                       **{key: [c[key] for c in per] for key in per[0]}}
                row["responses"] = row.pop("text")
                samples_file.write(json.dumps(row) + "\n")


def sft_rows(tokenizer, records: list[dict], candidates: list[list[dict]], best: list[int], max_length: int) -> tuple[list[dict], int]:
    """Token rows (prompt + best response, loss on the response) and how many truncation dropped."""
    rows = [tokenize_prompt_completion(tokenizer, r["prompt"], per[b]["text"], max_length)
            for r, per, b in zip(records, candidates, best)]
    kept = [row for row in rows if row is not None]
    return kept, len(rows) - len(kept)


def finetune(accelerator: Accelerator, cfg: BestOfNConfig, model, tokenizer, train: tuple, held_out: tuple) -> dict:
    """Rejection-sampling fine-tuning: SFT on the best responses through the shared loop; writes final/."""
    from alignkit.runtime.lm import train_lm
    from alignkit.runtime.train_loop import save_final

    train_rows, dropped = sft_rows(tokenizer, *train, cfg.max_length)
    if not train_rows:
        raise DataError(f"all {len(train[0])} best responses lost every token to truncation at max_length={cfg.max_length}")
    eval_rows, _ = sft_rows(tokenizer, *held_out, cfg.max_length) if held_out[0] else ([], 0)
    model, summary = train_lm(cfg, accelerator, model, tokenizer.pad_token_id, train_rows, eval_rows, packed=False,
                              stage="best_of_n")
    save_final(accelerator, model, tokenizer, cfg.output_dir)
    return {**summary, "dropped_records": dropped}


def run(cfg: BestOfNConfig) -> dict[str, Any]:
    started = time.time()
    check_sampling_config(cfg, cfg.n)
    accelerator = start_run(cfg)
    train_records, eval_records, invalid = load_train_eval(cfg, kind="prompts")
    if not train_records:
        raise DataError(f"no prompts in train_data {cfg.train_data!r}")
    model, tokenizer = load_policy(accelerator, cfg, train_records)
    model.to(accelerator.device)
    scorer = Scorer(accelerator, cfg)
    if accelerator.is_main_process:
        print(f"best-of-n: {cfg.n} samples for each of {len(train_records)} prompts (+{len(eval_records)} eval), "
              f"reward={cfg.reward.source}", file=sys.stderr, flush=True)
    splits = {"train": (train_records, *best_of(accelerator, cfg, model, tokenizer, scorer, train_records, TRAIN_SPLIT))}
    if eval_records:
        splits["eval"] = (eval_records, *best_of(accelerator, cfg, model, tokenizer, scorer, eval_records, EVAL_SPLIT))
    scorer.rm = None  # free the reward model before any fine-tuning
    if accelerator.is_main_process:
        write_outputs(Path(cfg.output_dir), cfg.n, splits)

    summary: dict[str, Any] = {"n": cfg.n, "kl_upper_bound": kl_upper_bound(cfg.n), "reward": cfg.reward.source,
                               "task": scorer.task}
    summary.update(selection_stats(*splits["train"][1:]))
    if "eval" in splits:
        summary.update({f"eval_{k}": v for k, v in selection_stats(*splits["eval"][1:]).items()})
    summary.update(n_prompts=len(train_records), n_eval_prompts=len(eval_records), invalid_records=len(invalid))
    if cfg.finetune:
        held_out = splits.get("eval", ([], [], []))
        summary.update(finetune(accelerator, cfg, model, tokenizer, splits["train"], held_out))
    return finish_run(accelerator, cfg, summary, started)
