"""`alignkit raft`: Reward rAnked FineTuning (Dong et al. 2023).

config -> prompts -> for each of `iterations` rounds: a fresh slice of prompts -> K samples each from the
CURRENT policy -> a reward for each (rm | gold) -> keep the best (per prompt, or a global top fraction:
selection.raft_filter) -> `steps_per_iteration` optimizer steps of the SFT loss on the kept responses ->
`final/` + `summary.json`. One AdamW and one LR schedule run across all iterations (the optimizer state
carries over, as in continued fine-tuning).

Per iteration, metrics.jsonl gets {"step", "iteration", sample_* and kept_* proxy/gold reward, lengths,
train_loss} and every NEW reward-hacking alarm (eval/alarms.py: length_correlation on the iteration's
samples, against gold's own correlation with length when gold is known; only with reward=rm, where the
proxy is not the gold reward) as {"step", "alarm": {...}}; all alarms are collected in summary["alarms"].
proxy_up_gold_down is not run here: each iteration samples FRESH prompts, so its means are not comparable
across iterations, and the held-out prompts are evaluated only before and after training (two points show
no persistent drop); `alignkit eval` over the run's checkpoints (one fixed prompt set) runs it.

Resume: after iteration k trains, its data are in `output_dir/iter-<k>/` (samples.jsonl, kept.jsonl: an
SFT-ready file) and the policy, optimizer, scheduler and iteration counter are checkpointed atomically
(checkpoints/step-N, runtime/checkpoint.py). resume=true continues with the first iteration not yet
checkpointed (re-running a partial one). Every random draw is a function of (seed, iteration): prompt
slice, sampling seeds (chunked as in rollout/sampling.py, so any process count samples alike) and batch order,
so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from alignkit.config import ConfigError, RAFTConfig
from alignkit.data.chat import tokenize_prompt_completion
from alignkit.data.packing import collate
from alignkit.data.records import DataError
from alignkit.eval import alarms as A
from alignkit.eval import metrics as M
from alignkit.runtime.checkpoint import checkpoint_to_resume, load_checkpoint, save_checkpoint
from alignkit.runtime.lm import forward_loss_sum, supervised_tokens
from alignkit.runtime.guards import NonFiniteGuard, StopRequests, injected_nan_factor, send_test_signal
from alignkit.runtime.logging import RunLogger
from alignkit.runtime.setup import BatchPlan, build_optimizer, build_scheduler, derive_seed
from alignkit.runtime.stage import finish_run, load_policy, load_train_eval, start_run
from alignkit.runtime.train_loop import KILL_ENV, save_final, whole_weights
from alignkit.selection import raft_filter
from alignkit.rollout.rewards import Scorer, reward_matrix
from alignkit.rollout.sampling import EVAL_SPLIT, ITERATION_SPLIT, check_sampling_config, sample_candidates

KEEP_MODES = ("per_prompt", "global")


def check_config(cfg: RAFTConfig) -> None:
    """Config errors that would otherwise surface after minutes of sampling."""
    check_sampling_config(cfg, cfg.samples_per_prompt, "samples_per_prompt")
    if cfg.iterations < 1 or cfg.prompts_per_iteration < 1 or cfg.eval_samples < 1:
        raise ConfigError("iterations, prompts_per_iteration and eval_samples must be >= 1")
    if cfg.keep not in KEEP_MODES:
        raise ConfigError(f"keep must be one of {', '.join(KEEP_MODES)}, got {cfg.keep!r}")
    if cfg.keep == "per_prompt" and not 1 <= cfg.keep_top_k <= cfg.samples_per_prompt:
        raise ConfigError(f"keep_top_k must be in [1, samples_per_prompt={cfg.samples_per_prompt}], got {cfg.keep_top_k}")
    if cfg.keep == "global" and not 0.0 < cfg.keep_fraction <= 1.0:
        raise ConfigError(f"keep_fraction must be in (0, 1], got {cfg.keep_fraction}")
    if cfg.steps_per_iteration < 0:
        raise ConfigError(f"steps_per_iteration must be >= 0, got {cfg.steps_per_iteration}")
    if nominal_kept(cfg) < cfg.batch_size:
        raise ConfigError(
            f"each iteration keeps {nominal_kept(cfg)} responses, fewer than batch_size={cfg.batch_size}: raise "
            "prompts_per_iteration or the kept share, or lower batch_size"
        )


def nominal_kept(cfg: RAFTConfig) -> int:
    """Responses kept per iteration before truncation drops (raft_filter's count)."""
    if cfg.keep == "per_prompt":
        return cfg.prompts_per_iteration * cfg.keep_top_k
    total = cfg.prompts_per_iteration * cfg.samples_per_prompt
    return max(1, math.ceil(round(cfg.keep_fraction * total, 6)))


def iteration_steps(cfg: RAFTConfig) -> int:
    """Optimizer steps per iteration: steps_per_iteration, else one pass over the kept responses."""
    return cfg.steps_per_iteration or max(1, nominal_kept(cfg) // cfg.batch_size)


# ----------------------------------------------------------------------------- data of one iteration


def iteration_prompts(records: list[dict], iteration: int, per_iteration: int, seed: int) -> list[dict]:
    """Positions [k*P, (k+1)*P) of endless passes over records, pass p shuffled by (seed, p): iterations see
    fresh prompts until train_data is used up, then a new shuffle. A function of (seed, iteration) only."""
    out, perms = [], {}
    for position in range(iteration * per_iteration, (iteration + 1) * per_iteration):
        epoch, index = divmod(position, len(records))
        if epoch not in perms:
            perms[epoch] = torch.randperm(len(records), generator=torch.Generator().manual_seed(derive_seed(seed, "raft_prompts", epoch))).tolist()
        out.append(records[perms[epoch][index]])
    return out


def keep_mask(rewards: torch.Tensor, cfg: RAFTConfig) -> torch.Tensor:
    """rewards [B,K] -> bool [B,K]: the responses RAFT fine-tunes on."""
    if cfg.keep == "per_prompt":
        return raft_filter(rewards, top_k=cfg.keep_top_k)
    return raft_filter(rewards, top_fraction=cfg.keep_fraction, per_prompt=False)


def sample_stats(candidates: list[list[dict]], mask: torch.Tensor) -> dict[str, float]:
    """Proxy/gold reward and length of all samples (stderr over prompts) and of the kept ones."""
    flat_mask = mask.flatten().tolist()
    flat = [c for per in candidates for c in per]
    kept = [c for c, m in zip(flat, flat_mask) if m]
    out: dict[str, float] = {}
    for key, name in [("reward", "proxy_reward"), ("gold", "gold_reward")]:
        if key in flat[0]:
            out[f"sample_{name}"], out[f"sample_{name}_stderr"] = M.grouped_mean_and_stderr(reward_matrix(candidates, key))
            out[f"kept_{name}"] = sum(c[key] for c in kept) / len(kept)
    out.update(sample_length=M.length_stats([c["length"] for c in flat])["mean"],
               kept_length=M.length_stats([c["length"] for c in kept])["mean"],
               sample_eos_fraction=M.eos_fraction([c["finished"] for c in flat]), n_kept=len(kept))
    return out


def write_iteration(out_dir: Path, prompts: list, candidates: list[list[dict]], mask: torch.Tensor) -> None:
    """iter-<k>/samples.jsonl (every candidate, its rewards, kept flags) and kept.jsonl (SFT-ready), atomically."""
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / "samples.jsonl", "w") as samples, open(tmp / "kept.jsonl", "w") as kept:
        for prompt, per, flags in zip(prompts, candidates, mask.tolist()):
            row = {"prompt": prompt, **{key: [c[key] for c in per] for key in per[0]}, "kept": flags}
            row["responses"] = row.pop("text")
            samples.write(json.dumps(row) + "\n")
            for cand, flag in zip(per, flags):
                if flag:
                    extra = {"gold": cand["gold"]} if "gold" in cand else {}
                    kept.write(json.dumps({"prompt": prompt, "completion": cand["text"], "reward": cand["reward"], **extra}) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def read_iteration(out_dir: Path) -> tuple[list, list[list[dict]], torch.Tensor]:
    """(prompts, candidates, mask) as write_iteration wrote them: an iteration interrupted mid-training
    resumes on its own samples (sampling again from the partly trained policy would draw other ones)."""
    prompts, candidates, mask = [], [], []
    for line in (out_dir / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        prompts.append(row.pop("prompt"))
        mask.append(row.pop("kept"))
        row["text"] = row.pop("responses")
        candidates.append([{key: values[i] for key, values in row.items()} for i in range(len(row["text"]))])
    return prompts, candidates, torch.tensor(mask, dtype=torch.bool)


def kept_rows(tokenizer, prompts: list, candidates: list[list[dict]], mask: torch.Tensor, max_length: int) -> tuple[list[dict], int]:
    """Token rows {input_ids, labels} of the kept responses (loss on the response) and the truncation drops."""
    rows, dropped = [], 0
    for prompt, per, flags in zip(prompts, candidates, mask.tolist()):
        for cand, flag in zip(per, flags):
            row = tokenize_prompt_completion(tokenizer, prompt, cand["text"], max_length) if flag else None
            if row is not None:
                rows.append(row)
            dropped += flag and row is None
    return rows, dropped


# ----------------------------------------------------------------------------- training


def optimizer_step(accelerator: Accelerator, model, optimizer, scheduler, plan: BatchPlan, step: int, rows: list[dict],
                   pad_id: int, max_grad_norm: float, guard: NonFiniteGuard, done: int) -> tuple[float, float, float]:
    """One optimizer step on global batch `step` of the plan: (loss per supervised token, grad norm, lr).

    As in runtime/train_loop: each process sums the loss over its rows, divides by the GLOBAL batch's
    supervised tokens and scales by the world size (DDP averages), so N processes train like one. A
    non-finite loss or gradient norm skips the update (guard; `done` is the run's step number).
    """
    nan_factor = injected_nan_factor(done - 1)
    global_weight = max(sum(supervised_tokens(rows[i]) for i in plan.global_rows(step)), 1)
    micro_batches = plan.local_micro_batches(step)
    step_loss = torch.zeros((), device=accelerator.device)
    for i, indices in enumerate(micro_batches):
        sync = nullcontext() if i == len(micro_batches) - 1 else accelerator.no_sync(model)
        with sync:
            batch = collate([rows[j] for j in indices], pad_id, packed=False)
            loss = forward_loss_sum(model, {k: v.to(accelerator.device) for k, v in batch.items()}) * nan_factor / global_weight
            accelerator.backward(loss * accelerator.num_processes)
        step_loss += loss.detach()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf"))
    lr = scheduler.get_last_lr()[0]
    if guard.check(accelerator, done, "loss or gradient norm", step_loss, grad_norm):
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(step_loss, "sum").item(), float(grad_norm), lr


def evaluate_policy(accelerator: Accelerator, cfg: RAFTConfig, model, tokenizer, scorer: Scorer, records: list[dict]) -> dict:
    """Sampled (T=eval_temperature) proxy/gold reward on held-out prompts, eval_samples each; the same seeds every call."""
    if not records:
        return {}
    prompts = [r["prompt"] for r in records]
    with whole_weights(model):  # under FSDP: processes sample different chunks, so no all-gather per forward
        candidates = sample_candidates(accelerator, model, tokenizer, prompts, cfg.eval_samples, cfg, cfg.seed,
                                       EVAL_SPLIT, cfg.eval_temperature)
    scorer(prompts, candidates)
    out = {}
    for key, name in [("reward", "proxy_reward"), ("gold", "gold_reward")]:
        if key in candidates[0][0]:
            out[name], out[f"{name}_stderr"] = M.grouped_mean_and_stderr(reward_matrix(candidates, key))
    out["length"] = M.length_stats([c["length"] for per in candidates for c in per])["mean"]
    return out


def new_alarms(cfg: RAFTConfig, candidates: list[list[dict]], start_step: int, fired: list[dict]) -> list[dict]:
    """This iteration's alarms that have not fired before (proxy-based: only with reward=rm).

    Only length_correlation, within the iteration's own samples (with their gold rewards when known, so a
    length preference that gold shares is not flagged). proxy_up_gold_down needs a fixed held-out series:
    the per-iteration sample means are over fresh prompts (see the module docstring)."""
    if cfg.reward.source != "rm":
        return []
    samples = {"step": start_step, "length": [c["length"] for per in candidates for c in per],
               "proxy_reward": [c["reward"] for per in candidates for c in per]}
    if "gold" in candidates[0][0]:
        samples["gold_reward"] = [c["gold"] for per in candidates for c in per]
    names = {a["name"] for a in fired}
    return [a.to_dict() for a in A.length_correlation([samples]) if a.name not in names]


def run_iteration(accelerator: Accelerator, cfg: RAFTConfig, k: int, model, tokenizer, scorer: Scorer, records: list[dict],
                  train: dict, partial: dict | None) -> tuple[dict | None, list[list[dict]], dict]:
    """Sample, score, keep, write iter-<k>/, fine-tune; returns (iteration metrics, candidates, progress).

    partial: {"inner_step", "losses"} of this iteration when a checkpoint was written inside it (Ctrl-C):
    its samples are read back from iter-<k>/ and training continues at inner_step. When a stop is
    requested before the last step, metrics is None and progress says where to resume."""
    steps, start_step = train["steps"], k * train["steps"]
    if partial:
        prompts, candidates, mask = read_iteration(Path(cfg.output_dir) / f"iter-{k}")
    else:
        prompts = [r["prompt"] for r in iteration_prompts(records, k, cfg.prompts_per_iteration, cfg.seed)]
        with whole_weights(model):  # as in evaluate_policy: per-process chunks of generation
            candidates = sample_candidates(accelerator, model, tokenizer, prompts, cfg.samples_per_prompt, cfg,
                                           cfg.seed, (ITERATION_SPLIT, k))
        scorer(prompts, candidates)
        mask = keep_mask(reward_matrix(candidates, "reward"), cfg)
        if accelerator.is_main_process:
            write_iteration(Path(cfg.output_dir) / f"iter-{k}", prompts, candidates, mask)
    rows, dropped = kept_rows(tokenizer, prompts, candidates, mask, cfg.max_length)
    if len(rows) < cfg.batch_size:
        raise DataError(f"iteration {k}: only {len(rows)} kept responses survive truncation at max_length="
                        f"{cfg.max_length} ({dropped} dropped), fewer than batch_size={cfg.batch_size}")
    plan = BatchPlan(len(rows), cfg.batch_size, cfg.micro_batch_size, accelerator.num_processes,
                     accelerator.process_index, seed=derive_seed(cfg.seed, "raft_batches", k))
    progress = dict(partial or {"inner_step": 0, "losses": [], "train_s": 0.0})
    losses, t0 = progress["losses"], time.perf_counter()
    for j in range(progress["inner_step"], steps):
        done = start_step + j + 1
        send_test_signal(done - 1)
        loss, grad_norm, lr = optimizer_step(accelerator, model, train["optimizer"], train["scheduler"], plan, j, rows,
                                             tokenizer.pad_token_id, cfg.max_grad_norm, train["guard"], done)
        losses.append(loss)
        if done % cfg.log_steps == 0 or j == steps - 1:
            train["logger"].log(done, {"loss": loss, "lr": lr, "grad_norm": grad_norm, "iteration": k,
                                       "nonfinite_steps": train["guard"].total}, show=j == steps - 1)
        if j < steps - 1 and train["stops"].requested(accelerator):  # the last step waits for the iteration's end
            progress.update(inner_step=j + 1, train_s=progress["train_s"] + time.perf_counter() - t0)
            return None, candidates, progress
        if train["kill_at"] == done and j < steps - 1:  # the last step's kill waits for its checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
    metrics = {"iteration": k, **sample_stats(candidates, mask), "dropped_responses": dropped,
               "train_loss": sum(losses) / len(losses), "train_s": progress["train_s"] + time.perf_counter() - t0,
               "sampled_at": start_step}
    return metrics, candidates, progress


def iterate(accelerator: Accelerator, cfg: RAFTConfig, k: int, model, tokenizer, scorer: Scorer, records: list[dict],
            train: dict, state: dict) -> None:
    """Iteration k and its bookkeeping: metrics and new alarms logged, the checkpoint at its end (or, when
    Ctrl-C / SIGTERM came, inside it: then RunStopped says where to resume)."""
    steps, logger, guard = train["steps"], train["logger"], train["guard"]
    metrics, candidates, progress = run_iteration(accelerator, cfg, k, model, tokenizer, scorer, records, train,
                                                  state.pop("partial", None))
    if metrics is None:
        done = k * steps + progress["inner_step"]
        path = save_checkpoint(accelerator, cfg.output_dir, done, {**state, "partial": progress,
                               "nonfinite": guard.state_dict()}, keep=cfg.save_total_limit)
        logger.close()
        raise train["stops"].stop(done, path)
    state["history"].append(metrics)
    done = (k + 1) * steps
    logger.log(done, metrics)
    for alarm in new_alarms(cfg, candidates, metrics["sampled_at"], state["alarms"]):
        state["alarms"].append(alarm)
        logger.log(done, {"alarm": alarm}, show=False)
        logger.message(f"ALARM {alarm['name']}: {alarm['message']}")
    state["iteration"] = k + 1
    path = save_checkpoint(accelerator, cfg.output_dir, done, {**state, "nonfinite": guard.state_dict()},
                           keep=cfg.save_total_limit)
    if train["stops"].requested(accelerator) and k + 1 < cfg.iterations:
        logger.close()
        raise train["stops"].stop(done, path)
    if train["kill_at"] == done:
        os.kill(os.getpid(), signal.SIGKILL)


def run(cfg: RAFTConfig) -> dict[str, Any]:
    started = time.time()
    check_config(cfg)
    accelerator = start_run(cfg)
    train_records, eval_records, invalid = load_train_eval(cfg, kind="prompts")
    if not train_records:
        raise DataError(f"no prompts in train_data {cfg.train_data!r}")
    eval_records = eval_records[: cfg.max_eval_rows] if cfg.max_eval_rows > 0 else eval_records
    model, tokenizer = load_policy(accelerator, cfg, train_records)
    steps = iteration_steps(cfg)
    total = cfg.iterations * steps
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2))
    scheduler = build_scheduler(optimizer, cfg.lr_schedule, cfg.warmup_steps, total, cfg.min_lr_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by us once per optimizer step
    scorer = Scorer(accelerator, cfg)

    state: dict[str, Any] = {"iteration": 0, "history": [], "alarms": [], "eval_before": {}}
    checkpoint = checkpoint_to_resume(cfg.output_dir, cfg.resume, accelerator.is_main_process)
    start_step = 0
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)
        start_step = state.pop("step")
    logger = RunLogger(cfg.output_dir, "raft", total, accelerator.is_main_process, start_step)
    if checkpoint is not None:
        logger.message(f"resumed from {checkpoint} at step {start_step}/{total} (iteration {state['iteration']})")
    else:
        state["eval_before"] = evaluate_policy(accelerator, cfg, model, tokenizer, scorer, eval_records)
        logger.log(0, {f"eval_{k}": v for k, v in state["eval_before"].items()}, show=False)
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, "raft", cfg.lr, accelerator.is_main_process)
    guard.load_state_dict(state.pop("nonfinite", {}))
    stops = StopRequests("raft", accelerator.is_main_process)
    train = {"steps": steps, "optimizer": optimizer, "scheduler": scheduler, "logger": logger, "guard": guard,
             "stops": stops, "kill_at": int(os.environ.get(KILL_ENV, "0"))}

    model.train()
    with stops:
        for k in range(state["iteration"], cfg.iterations):
            iterate(accelerator, cfg, k, model, tokenizer, scorer, train_records, train, state)
    state["nonfinite"] = guard.state_dict()

    after = evaluate_policy(accelerator, cfg, model, tokenizer, scorer, eval_records)
    logger.log(total, {f"eval_{k}": v for k, v in after.items()}, show=False)
    logger.close()
    scorer.rm = None
    save_final(accelerator, model, tokenizer, cfg.output_dir)
    return finish_run(accelerator, cfg, summarize(cfg, state, after, total, len(train_records), len(eval_records),
                                                  len(invalid), accelerator.num_processes), started)


def summarize(cfg: RAFTConfig, state: dict, after: dict, total: int, n_train: int, n_eval: int, invalid: int,
              world: int) -> dict[str, Any]:
    """summary.json: first/last iteration's sample rewards, held-out reward before/after, alarms, counts."""
    history = state["history"]
    summary: dict[str, Any] = {"steps": total, "iterations": cfg.iterations, "steps_per_iteration": total // cfg.iterations,
                               "reward": cfg.reward.source, "keep": cfg.keep}
    for name in ("proxy_reward", "gold_reward"):
        if f"sample_{name}" in history[0]:
            summary[f"{name}_first_iteration"] = history[0][f"sample_{name}"]
            summary[f"{name}_last_iteration"] = history[-1][f"sample_{name}"]
            summary[f"kept_{name}_last_iteration"] = history[-1][f"kept_{name}"]
    summary.update({f"eval_{k}_before": v for k, v in state["eval_before"].items()})
    summary.update({f"eval_{k}": v for k, v in after.items()})
    summary.update(alarms=state["alarms"], n_train_prompts=n_train, n_eval_prompts=n_eval, invalid_records=invalid,
                   kept_per_iteration=history[-1]["n_kept"], dropped_responses=sum(h["dropped_responses"] for h in history),
                   train_s=sum(h["train_s"] for h in history), num_processes=world,
                   nonfinite_steps=state.get("nonfinite", {}).get("total", 0))
    return summary
