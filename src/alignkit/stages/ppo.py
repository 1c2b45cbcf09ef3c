"""`alignkit ppo`: RLHF with PPO (InstructGPT; Ziegler et al. 2019; PPO: Schulman et al. 2017; GAE: 2016).

config -> prompts -> actor (the SFT policy), frozen reference, critic, proxy reward (reward model on text,
or the task's gold reward) -> per PPO step:
  1. rollout: `rollout_batch_size` prompts chosen from (seed, step), `samples_per_prompt` responses each,
     sampled with the KV cache in fixed seeded chunks (any process count samples the same tokens);
  2. scores: the proxy on the decoded text (the RM may use its own tokenizer), minus `missing_eos_penalty`,
     normalised / clipped (rollout.shape_scores); the gold reward is logged whenever a task is known;
  3. no-grad forwards (one padded forward per model per chunk): old and reference log-probs, values;
  4. KL-shaped per-token rewards (score at the last token), GAE, advantages whitened over the whole
     rollout (rollout.build_rollout);
  5. `ppo_epochs` passes of mini-batches of `mini_batch_size` sequences: clipped policy loss (+ entropy
     bonus) on the actor, clipped value loss on the critic, each normalised by the GLOBAL token count of
     the mini-batch, gradients all-reduced by DDP, clipped, AdamW steps; schedules advance per PPO step;
  6. KL controller update; metrics; reward-hacking alarms; eval every `eval_steps`; atomic checkpoint.
Every random draw derives from (seed, step), so `resume=true` reproduces an uninterrupted run.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from alignkit.config import ConfigError, PPOConfig
from alignkit.data.chat import render_prompt
from alignkit.data.records import DataError
from alignkit.losses import ppo_clip_fraction, ppo_policy_loss, ppo_value_loss
from alignkit.ops import masked_mean
from alignkit.ppo_parts import (AlarmWatch, Sample, batch_on, evaluate_policy, grouped, response_logprobs,
                                response_values, rollout_forwards, sample_responses)
from alignkit.rl import KL_KINDS, AdaptiveKLController, FixedKLController, kl_penalty
from alignkit.rollout import (Rollout, RunningMoments, build_rollout, gold_rewards, load_scorer, score_with,
                              shape_scores, task_name_for)
from alignkit.runtime.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from alignkit.runtime.logging import RunLogger
from alignkit.runtime.setup import BatchPlan, build_optimizer, build_scheduler
from alignkit.runtime.stage import finish_run, load_policy, load_train_eval, start_run
from alignkit.runtime.train_loop import KILL_ENV, save_final

TRAIN_SPLIT = 2  # sampling seeds: split 1 is the held-out evaluation, 2 + step the rollout of `step`


def check_config(cfg: PPOConfig) -> None:
    """Config errors that would otherwise surface after minutes of loading and sampling."""
    if cfg.reward not in ("rm", "gold"):
        raise ConfigError(f"reward must be one of rm, gold, got {cfg.reward!r}")
    if cfg.reward == "rm" and not cfg.reward_model:
        raise ConfigError("reward=rm needs reward_model (an alignkit rm run's final/); or use reward=gold with a task")
    if cfg.reward == "gold":
        task_name_for(cfg.task, cfg.train_data)
    if cfg.kl_estimator not in KL_KINDS:
        raise ConfigError(f"kl_estimator must be one of {', '.join(KL_KINDS)}, got {cfg.kl_estimator!r}")
    if cfg.reward_norm not in ("none", "batch", "running"):
        raise ConfigError(f"reward_norm must be none, batch or running, got {cfg.reward_norm!r}")
    if cfg.temperature <= 0:
        raise ConfigError("temperature must be > 0: PPO learns from sampled responses")
    positive = ("rollout_batch_size", "samples_per_prompt", "ppo_epochs", "max_new_tokens", "sample_chunk",
                "forward_batch_size", "reward_batch_size", "eval_samples_per_prompt")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    n = cfg.rollout_batch_size * cfg.samples_per_prompt
    mini = cfg.mini_batch_size or n
    if mini < 1 or n % mini:
        raise ConfigError(f"mini_batch_size {cfg.mini_batch_size} must divide the rollout's {n} sequences "
                          f"(rollout_batch_size {cfg.rollout_batch_size} x samples_per_prompt {cfg.samples_per_prompt})")


def gold_task(cfg: PPOConfig) -> str | None:
    """The task whose gold reward is optimised (reward=gold) or logged; None when the prompts have none."""
    try:
        return task_name_for(cfg.task, cfg.train_data)
    except ConfigError:
        return None


def usable_prompts(tokenizer, records: list[dict], cfg: PPOConfig) -> tuple[list, int]:
    """(prompts leaving max_new_tokens of room below max_length, number dropped)."""
    room = cfg.max_length - cfg.max_new_tokens
    kept = [r["prompt"] for r in records
            if len(tokenizer(render_prompt(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"]) <= room]
    return kept, len(records) - len(kept)


# ----------------------------------------------------------------------------- models


def load_reference(cfg: PPOConfig, actor) -> torch.nn.Module:
    """The frozen reference: cfg.ref_model, else a copy of the starting policy."""
    from alignkit.models.loading import load_causal_lm

    ref = copy.deepcopy(actor) if cfg.ref_model is None else load_causal_lm(cfg.ref_model)[0]
    ref.requires_grad_(False)
    return ref.eval()


def load_critic(cfg: PPOConfig, tokenizer, log) -> tuple[torch.nn.Module, Any, str]:
    """(critic, its tokenizer, where it came from): critic_model, else the RM (InstructGPT) when it reads
    the policy's token ids, else the policy with a fresh seeded head."""
    from alignkit.models.loading import is_scratch
    from alignkit.models.value import load_value_model, same_vocabulary

    source = cfg.critic_model or (cfg.reward_model if cfg.reward == "rm" else cfg.model)
    if is_scratch(source):
        from alignkit.models.reward import load_reward_model
        from alignkit.models.value import ValueModel

        model, tok = load_reward_model(source, tokenizer=copy.deepcopy(tokenizer), seed=cfg.seed)
        return ValueModel(model), tok, source
    critic, tok = load_value_model(source, seed=cfg.seed)
    if same_vocabulary(tok, tokenizer):
        return critic, tok, source
    if cfg.critic_model:
        raise ConfigError(f"critic_model {source!r} has another vocabulary than the policy; the critic reads the "
                          "policy's token ids: use a critic built on the policy's tokenizer")
    log(f"the reward model {source!r} has another vocabulary than the policy: the critic starts from the policy")
    critic, tok = load_value_model(cfg.model, seed=cfg.seed)
    return critic, tok, cfg.model


def reward_functions(accelerator: Accelerator, cfg: PPOConfig):
    """(proxy, gold or None): functions (prompts, texts per prompt) -> rewards per prompt."""
    task = gold_task(cfg)
    gold = (lambda prompts, texts: gold_rewards(task, prompts, texts)) if task else None
    if cfg.reward == "gold":
        return gold, gold
    rm, rm_tokenizer = load_scorer(accelerator, cfg.reward_model)
    rm.requires_grad_(False)

    def proxy(prompts: list, texts: list[list[str]]) -> list[list[float]]:
        return score_with(accelerator, rm, rm_tokenizer, prompts, texts, cfg.reward_batch_size, cfg.max_length)

    return proxy, gold


# ----------------------------------------------------------------------------- one PPO step


def collect(accelerator, cfg, actor, ref, critic, tokenizer, prompts, step, kl_coef, proxy, gold,
            running) -> tuple[Rollout, dict[str, Any]]:
    """Rollout of `step` and its statistics (the metrics users expect, plus the per-sample series)."""
    n = cfg.samples_per_prompt
    t0 = time.perf_counter()
    samples = sample_responses(accelerator, actor, tokenizer, prompts, n, cfg.temperature, cfg.max_new_tokens,
                               cfg.sample_chunk, cfg.seed, split=TRAIN_SPLIT + step)
    t1 = time.perf_counter()
    texts = grouped([s.text for s in samples], n)
    raw = torch.tensor([r for rs in proxy(prompts, texts) for r in rs], dtype=torch.float32)
    golds = [g for gs in gold(prompts, texts) for g in gs] if gold is not None else None
    t2 = time.perf_counter()
    forwards = rollout_forwards(accelerator, actor, ref, critic, samples, tokenizer.pad_token_id, cfg.temperature,
                                cfg.forward_batch_size)
    finished = torch.tensor([s.finished for s in samples])
    scores = shape_scores(raw, finished, cfg.missing_eos_penalty, cfg.reward_norm, cfg.reward_clip, running)
    rollout = build_rollout(
        [s.prompt_ids for s in samples], [s.response_ids for s in samples], finished.tolist(),
        [f[0] for f in forwards], [f[1] for f in forwards], [f[2] for f in forwards], scores,
        tokenizer.pad_token_id, kl_coef, cfg.kl_estimator, cfg.gamma, cfg.lam, cfg.whiten_advantages,
    )
    t3 = time.perf_counter()
    mask, lengths = rollout.mask, rollout.mask.sum(1)
    kl_per_seq = rollout.kl.sum(1)
    raw_advantages = (rollout.returns - rollout.values) * mask
    stats = {
        "reward": raw.mean().item(), "reward_std": raw.std().item() if len(raw) > 1 else 0.0,
        "score": scores.mean().item(), "kl": kl_per_seq.mean().item(), "kl_coef": kl_coef,
        "non_score_reward": (-kl_coef * kl_per_seq).mean().item(),
        "entropy": sum(f[3] for f in forwards) / lengths.sum().item(),
        "response_length": lengths.mean().item(), "eos_fraction": finished.float().mean().item(),
        "returns_mean": masked_mean(rollout.returns, mask).item(), "values_mean": masked_mean(rollout.values, mask).item(),
        "advantages_std": masked_mean((raw_advantages - masked_mean(raw_advantages, mask)) ** 2, mask).sqrt().item(),
        "time_generate": t1 - t0, "time_score": t2 - t1, "time_forward": t3 - t2,
    }
    if golds is not None:
        from alignkit.eval.metrics import grouped_mean_and_stderr

        stats["gold_reward"], stats["gold_reward_stderr"] = grouped_mean_and_stderr(grouped(golds, n))
    samples_for_alarms = {"step": step + 1, "length": lengths.tolist(), "reward": raw.tolist(),
                          **({"gold_reward": golds} if golds is not None else {})}
    return rollout, {"stats": stats, "samples": samples_for_alarms, "tokens": int(lengths.sum().item())}


def micro_step(accelerator, cfg, actor, critic, rollout: Rollout, rows: list[int], global_tokens: float,
               train_actor: bool, pad_id: int) -> dict[str, torch.Tensor]:
    """Backward of one micro-batch's share of the mini-batch losses (token sums / GLOBAL mini-batch tokens)."""
    samples = [Sample(rollout.prompt_ids[i], rollout.response_ids[i, : int(rollout.mask[i].sum())].tolist(), "", True)
               for i in rows]
    batch = batch_on(samples, pad_id, accelerator.device)
    width, mask = batch["mask"].shape[1], batch["mask"]
    take = lambda t: t[rows, :width].to(accelerator.device)  # noqa: E731 - the rollout rows of this micro-batch
    old_logps, advantages, old_values, returns = (take(t) for t in (rollout.logprobs, rollout.advantages,
                                                                    rollout.values, rollout.returns))
    share = mask.sum() / global_tokens  # masked means below become sums over the global token count
    world = accelerator.num_processes
    out = {}
    if train_actor:
        logps, entropy = response_logprobs(actor, batch, cfg.temperature, with_entropy=cfg.entropy_coef > 0)
        policy_loss = ppo_policy_loss(logps, old_logps, advantages, mask, cfg.clip_eps) * share
        loss = policy_loss - (cfg.entropy_coef * masked_mean(entropy, mask) * share if entropy is not None else 0.0)
        accelerator.backward(loss * world)  # DDP averages over processes: scale back to the global sum
        out["policy_loss"] = policy_loss.detach()
        out["clipfrac"] = ppo_clip_fraction(logps.detach(), old_logps, advantages, mask, cfg.clip_eps) * share
        out["approx_kl"] = masked_mean(kl_penalty(old_logps, logps.detach(), "k3"), mask) * share
        out["ratio"] = masked_mean(torch.exp(logps.detach() - old_logps), mask) * share
    values = response_values(critic, batch)
    value_loss = ppo_value_loss(values, old_values, returns, mask, cfg.value_clip_eps) * share
    accelerator.backward(value_loss * world)
    out["value_loss"] = value_loss.detach()
    clipped = ((values.detach() - old_values).abs() > cfg.value_clip_eps).float()
    out["value_clipfrac"] = masked_mean(clipped, mask) * share
    return out


def update(accelerator, cfg, actor, critic, optimizers, rollout: Rollout, step: int, train_actor: bool,
           pad_id: int) -> dict[str, float]:
    """`ppo_epochs` passes of mini-batches over the rollout; returns metrics averaged over the updates."""
    n, world, rank = len(rollout), accelerator.num_processes, accelerator.process_index
    mini = cfg.mini_batch_size or n
    totals: dict[str, torch.Tensor] = {}
    norms = {"grad_norm": 0.0, "critic_grad_norm": 0.0}
    models = [actor, critic] if train_actor else [critic]
    actor.train(train_actor)
    critic.train()
    updates = 0
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_009 + epoch))
        for start in range(0, n, mini):
            rows = order[start : start + mini].tolist()
            global_tokens = rollout.mask[rows].sum().item()
            mine = rows[rank::world]
            micro = [mine[i : i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]
            for k, part in enumerate(micro):
                with ExitStack() as stack:
                    if k < len(micro) - 1:  # all-reduce gradients only on the last micro-batch
                        for model in models:
                            stack.enter_context(accelerator.no_sync(model))
                    for key, value in micro_step(accelerator, cfg, actor, critic, rollout, part, global_tokens,
                                                 train_actor, pad_id).items():
                        totals[key] = totals.get(key, 0.0) + value.float()
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            for name, model, optimizer in zip(("grad_norm", "critic_grad_norm"), (actor, critic), optimizers):
                if model in models:
                    norms[name] += float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            updates += 1
    names = sorted(totals)
    reduced = accelerator.reduce(torch.stack([totals[k] for k in names]).to(accelerator.device), "sum").tolist()
    out = {k: v / updates for k, v in zip(names, reduced)}
    out.update({k: v / updates for k, v in norms.items() if k != "grad_norm" or train_actor})
    return out


# ----------------------------------------------------------------------------- stage


def save_critic(accelerator: Accelerator, critic, tokenizer, output_dir: str) -> None:
    """`output_dir/final_critic/` (AutoModelForSequenceClassification format), written atomically."""
    from alignkit.models.loading import save_model

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final, tmp = Path(output_dir) / "final_critic", Path(output_dir) / ".tmp-final_critic"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(accelerator.unwrap_model(critic).model, tokenizer, tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()


def run(cfg: PPOConfig) -> dict[str, Any]:
    started = time.time()
    check_config(cfg)
    accelerator = start_run(cfg)
    world = accelerator.num_processes
    mini = cfg.mini_batch_size or cfg.rollout_batch_size * cfg.samples_per_prompt
    if mini % world:
        raise ConfigError(f"mini_batch_size {mini} must be divisible by the {world} processes")
    say = (lambda text: print(f"[ppo] {text}", file=sys.stderr, flush=True)) if accelerator.is_main_process else (lambda text: None)

    train_records, eval_records, invalid = load_train_eval(cfg, kind="prompts")
    actor, tokenizer = load_policy(accelerator, cfg, train_records)
    prompts, dropped = usable_prompts(tokenizer, train_records, cfg)
    if len(prompts) < cfg.rollout_batch_size:
        raise DataError(f"{len(prompts)} usable training prompts (of {len(train_records)}; {dropped} leave fewer than "
                        f"max_new_tokens={cfg.max_new_tokens} tokens below max_length={cfg.max_length}) for "
                        f"rollout_batch_size={cfg.rollout_batch_size}")
    eval_prompts, eval_dropped = usable_prompts(tokenizer, eval_records, cfg)
    eval_prompts = eval_prompts[: cfg.max_eval_rows] if cfg.max_eval_rows > 0 else eval_prompts
    proxy, gold = reward_functions(accelerator, cfg)
    ref = load_reference(cfg, actor).to(accelerator.device)
    critic, critic_tokenizer, critic_source = load_critic(cfg, tokenizer, say)

    plan = BatchPlan(len(prompts), cfg.rollout_batch_size, cfg.rollout_batch_size, 1, 0, cfg.seed)
    steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * plan.steps_per_epoch))
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    optimizers = [build_optimizer(actor, cfg.lr, cfg.weight_decay, betas),
                  build_optimizer(critic, cfg.critic_lr, cfg.weight_decay, betas)]
    schedulers = [build_scheduler(o, cfg.lr_schedule, cfg.warmup_steps, steps, cfg.min_lr_ratio) for o in optimizers]
    actor, critic, *optimizers = accelerator.prepare(actor, critic, *optimizers)
    accelerator.register_for_checkpointing(*schedulers)

    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    running, alarms = RunningMoments(), AlarmWatch(cfg.kl_budget)
    state: dict[str, Any] = {"train_s": 0.0, "samples": 0, "tokens": 0, "first": {}, "last": {}}
    start_step = 0
    checkpoint = latest_checkpoint(cfg.output_dir) if cfg.resume else None
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)
        start_step = state.pop("step")
        kl_ctl.load_state_dict(state.pop("kl_controller"))
        running = RunningMoments(**state.pop("running_moments"))
        alarms.load_state_dict(state.pop("alarms"))
    logger = RunLogger(cfg.output_dir, "ppo", steps, accelerator.is_main_process, start_step)

    def evaluate(step: int) -> dict[str, float]:
        metrics = evaluate_policy(accelerator, actor, ref, tokenizer, eval_prompts, cfg, proxy, gold)
        logger.log(step, {f"eval_{k}": v for k, v in metrics.items()}, show=False)
        report(alarms.check("eval", {"step": step, **metrics}), step)
        return metrics

    def report(new_alarms: list[dict], step: int) -> None:
        for alarm in new_alarms:
            logger.log(step, {"alarm": alarm}, show=False)
            logger.message(f"ALARM {alarm['name']} ({alarm['source']}) at step {alarm['step']}: {alarm['message']}")

    if checkpoint is not None:
        logger.message(f"resumed from {checkpoint} at step {start_step}/{steps}")
    else:
        say(f"critic from {critic_source}; {len(prompts)} prompts ({dropped} dropped), {len(eval_prompts)} held out")
        state["eval_before"] = evaluate(0) if eval_prompts else {}

    kill_at = int(os.environ.get(KILL_ENV, "0"))
    for step in range(start_step, steps):
        t0 = time.perf_counter()
        step_prompts = [prompts[i] for i in plan.global_rows(step)]
        kl_coef = kl_ctl.value
        rollout, info = collect(accelerator, cfg, actor, ref, critic, tokenizer, step_prompts, step, kl_coef, proxy,
                                gold, running)
        t1 = time.perf_counter()
        metrics = update(accelerator, cfg, actor, critic, optimizers, rollout, step, step >= cfg.critic_warmup_steps,
                         tokenizer.pad_token_id)
        lrs = [s.get_last_lr()[0] for s in schedulers]
        for scheduler in schedulers:
            scheduler.step()
        kl_ctl.update(info["stats"]["kl"], len(rollout))
        elapsed = time.perf_counter() - t0
        state["train_s"] += elapsed
        state["samples"] += len(rollout)
        state["tokens"] += info["tokens"]
        done = step + 1
        record = {**info["stats"], **metrics, "lr": lrs[0], "critic_lr": lrs[1], "time_update": time.perf_counter() - t1,
                  "samples_per_s": len(rollout) / elapsed, "tokens_per_s": info["tokens"] / elapsed}
        state["first"] = state["first"] or record
        state["last"] = record
        if done % cfg.log_steps == 0 or done == steps:
            logger.log(done, record)
        else:
            logger.advance(done)
        report(alarms.check("rollout", {"step": done, **info["stats"]}, info["samples"]), done)
        if cfg.eval_steps > 0 and done % cfg.eval_steps == 0 and done != steps and eval_prompts:
            evaluate(done)
        if (cfg.save_steps > 0 and done % cfg.save_steps == 0) or done == steps:
            save_checkpoint(accelerator, cfg.output_dir, done, {
                **state, "kl_controller": kl_ctl.state_dict(), "running_moments": asdict(running),
                "alarms": alarms.state_dict()}, keep=cfg.save_total_limit)
        if kill_at and done == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    after = evaluate(steps) if eval_prompts else {}
    logger.close()
    save_final(accelerator, actor, tokenizer, cfg.output_dir)
    save_critic(accelerator, critic, critic_tokenizer, cfg.output_dir)
    first, last = state["first"], state["last"]
    summary: dict[str, Any] = {"steps": steps}
    summary.update({f"eval_{k}_before": v for k, v in state.get("eval_before", {}).items()})
    summary.update({f"eval_{k}": v for k, v in after.items()})
    for key in ("reward", "gold_reward", "kl", "response_length", "entropy"):
        if key in last:
            summary[f"{key}_first"], summary[f"{key}_last"] = first[key], last[key]
    summary.update(
        kl=last.get("kl"), kl_coef=kl_ctl.value, reward=cfg.reward, critic_init=critic_source,
        alarms=alarms.alarms, num_processes=world, n_train_prompts=len(prompts), n_eval_prompts=len(eval_prompts),
        dropped_prompts=dropped, dropped_eval_prompts=eval_dropped, invalid_records=len(invalid),
        train_s=state["train_s"], samples=state["samples"], samples_per_s=state["samples"] / max(state["train_s"], 1e-9),
        tokens_per_s=state["tokens"] / max(state["train_s"], 1e-9),
    )
    return finish_run(accelerator, cfg, summary, started)
