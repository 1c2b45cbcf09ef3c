"""`alignkit ppo` (and `alignkit grpo`): RLHF with PPO and its critic-free relatives.

PPO (InstructGPT; Ziegler et al. 2019; Schulman et al. 2017) with critic and GAE, or a critic-free estimator
(`advantage=grpo|dr_grpo|rloo|reinforce_pp`) with DAPO's and GSPO's options; `alignkit grpo` is this stage
with GRPO's defaults. config -> prompts -> actor (the SFT policy), frozen reference (the LoRA actor with its
adapters off: no copy), critic (gae only; `share_backbone`: a value head on the actor), proxy reward (reward model
on text, or the task's gold reward; `offload_frozen` keeps the frozen ones on the CPU between uses) -> per step:
  1. rollout: `rollout_batch_size` prompts chosen from (seed, step), `samples_per_prompt` responses each,
     sampled with the KV cache in fixed seeded chunks (any process count samples the same tokens); with
     `dynamic_sampling`, groups whose rewards are all equal are dropped and more prompts sampled (DAPO);
  2. scores: the proxy on the decoded text (the RM may use its own tokenizer), minus `missing_eos_penalty`,
     plus DAPO's overlong penalty, normalised / clipped (rl.shape_scores); gold is logged whenever known;
  3. no-grad forwards (one padded forward per model per chunk, under the training autocast): old and
     reference log-probs, values; each only when read (rollout.ppo.forwards_needed);
  4. advantages (rl.build_rollout): KL in the reward or in the loss (`kl_in`), then GAE (whitened) or
     group / batch-normalised advantages;
  5. `ppo_epochs` passes of mini-batches of `mini_batch_size` sequences: clipped policy loss (token or
     sequence ratio, asymmetric clip, + KL term, + entropy bonus) reduced by `loss_agg` over the GLOBAL
     mini-batch; clipped value loss on the critic (share_backbone: + vf_coef x it, one backward); gradients
     all-reduced by DDP (or reduce-scattered by FSDP2), clipped, AdamW steps;
  6. KL controller update; metrics; reward-hacking alarms; eval every `eval_steps`; atomic checkpoint.
Every random draw derives from (seed, step), so `resume=true` reproduces an uninterrupted run.
PPO and the GRPO family are one stage (one rollout, one update, options), kept in one file that reads top
to bottom; sampling, prompts, rewards, loading and evaluation are in rollout/ppo.py, the policy and critic
forwards in rollout/forwards.py, the rollout's math (rl.build_rollout, rl.shape_scores) in rl.py.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from types import SimpleNamespace
from typing import Any

import torch
from accelerate import Accelerator

from alignkit.config import ConfigError, PPOConfig, check_groups
from alignkit.data.records import DataError
from alignkit.eval.alarms import AlarmWatch
from alignkit.losses import (LOSS_AGGREGATIONS, RATIO_LEVELS, clip_fraction, clipped_policy_terms, importance_ratio,
                             loss_numerator, ppo_value_loss)
from alignkit.ops import masked_mean
from alignkit.rl import (ADVANTAGE_ESTIMATORS, GROUP_ESTIMATORS, KL_KINDS, AdaptiveKLController, FixedKLController,
                         Rollout, RunningMoments, kl_penalty)
from alignkit.models.value import save_value_head, value_head_for
from alignkit.rollout.forwards import batch_on, head_values, logprobs_and_values, response_logprobs, response_values
from alignkit.rollout.ppo import (collect, disable_dropout, evaluate_policy, load_critic, load_reference, prompt_room,
                                  reward_functions, save_critic, stats_from_update, truncated_prompts)
from alignkit.rollout.rewards import task_name_for
from alignkit.rollout.sampling import Generation
from alignkit.runtime.checkpoint import checkpoint_to_resume, load_checkpoint, save_checkpoint
from alignkit.runtime.logging import RunLogger
from alignkit.runtime.setup import BatchPlan, build_optimizer, build_scheduler, derive_seed
from alignkit.runtime.guards import NonFiniteGuard, StopRequests, injected_nan_factor, send_test_signal
from alignkit.runtime.stage import finish_run, load_policy, load_train_eval, start_run
from alignkit.runtime.train_loop import KILL_ENV, save_final, whole_weights



def check_config(cfg: PPOConfig) -> None:
    """Config errors that would otherwise surface after minutes of loading and sampling."""
    check_groups(cfg)
    choices = {"kl_estimator": KL_KINDS, "reward_norm": ("none", "batch", "running"),
               "advantage": ADVANTAGE_ESTIMATORS, "loss_agg": LOSS_AGGREGATIONS, "ratio_level": RATIO_LEVELS,
               "kl_in": ("reward", "loss")}
    for key, valid in choices.items():
        if getattr(cfg, key) not in valid:
            raise ConfigError(f"{key} must be one of {', '.join(valid)}, got {getattr(cfg, key)!r}")
    if cfg.reward.source == "gold":
        task_name_for(cfg.reward.task, cfg.train_data)
    if cfg.sampling.temperature <= 0:
        raise ConfigError("sampling.temperature must be > 0: PPO learns from sampled responses")
    positive = ("rollout_batch_size", "samples_per_prompt", "ppo_epochs", "forward_batch_size", "eval_samples_per_prompt")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.share_backbone and (cfg.advantage != "gae" or cfg.critic_model):
        raise ConfigError("share_backbone puts the critic's head on the actor: it needs advantage=gae and no critic_model")
    if cfg.advantage in ("grpo", "rloo") and cfg.samples_per_prompt < 2:
        raise ConfigError(f"advantage={cfg.advantage} compares responses to the same prompt: samples_per_prompt "
                          f"must be >= 2, got {cfg.samples_per_prompt}")
    if cfg.dynamic_sampling and cfg.advantage not in GROUP_ESTIMATORS:
        raise ConfigError("dynamic_sampling drops groups of equal rewards: it needs a group estimator "
                          f"(advantage={'|'.join(GROUP_ESTIMATORS)})")
    if cfg.overlong_buffer < 0 or cfg.overlong_buffer > cfg.sampling.max_new_tokens:
        raise ConfigError(f"overlong_buffer must be in [0, sampling.max_new_tokens={cfg.sampling.max_new_tokens}], "
                          f"got {cfg.overlong_buffer}")
    n = cfg.rollout_batch_size * cfg.samples_per_prompt
    mini = cfg.mini_batch_size or n
    if mini < 1 or n % mini:
        raise ConfigError(f"mini_batch_size {cfg.mini_batch_size} must divide the rollout's {n} sequences "
                          f"(rollout_batch_size {cfg.rollout_batch_size} x samples_per_prompt {cfg.samples_per_prompt})")


# ----------------------------------------------------------------------------- one step: updates


def micro_step(accelerator, cfg, actor, critic, rollout: Rollout, rows: list[int], totals: dict[str, float],
               train_actor: bool, kl_coef: float, pad_id: int, value_head=None) -> dict[str, torch.Tensor]:
    """Backward of one micro-batch's share of the mini-batch losses: numerators over the micro-batch divided by
    the GLOBAL mini-batch denominators `totals` ("tokens", "sequences"), so micro-batches and processes add up
    to the loss of the whole mini-batch. value_head (share_backbone): the values come from the actor's forward
    and policy loss + vf_coef * value loss is ONE backward."""
    samples = [Generation(rollout.prompt_ids[i], rollout.response_ids[i, : int(rollout.mask[i].sum())].tolist(), "", True)
               for i in rows]
    batch = batch_on(samples, pad_id, accelerator.device)
    width, mask = batch["mask"].shape[1], batch["mask"]
    take = lambda t: t[rows, :width].to(accelerator.device)  # noqa: E731 - the rollout rows of this micro-batch
    old_logps, ref_logps, advantages, old_values, returns = (
        take(t) for t in (rollout.logprobs, rollout.ref_logprobs, rollout.advantages, rollout.values, rollout.returns))
    share = mask.sum() / totals["tokens"]  # token means below become sums over the global token count
    world = accelerator.num_processes
    out, values, loss = {}, None, None
    if train_actor:
        entropy_args = (cfg.entropy_coef != 0 or not rollout.has_old_logprobs, cfg.entropy_coef != 0)  # with, grad
        if value_head is not None:  # share_backbone: one forward gives the log-probs and the values
            logps, entropy, values = logprobs_and_values(actor, value_head, batch, cfg.sampling.temperature, *entropy_args)
        else:
            logps, entropy = response_logprobs(actor, batch, cfg.sampling.temperature, *entropy_args)
        if not rollout.has_old_logprobs:  # one update per rollout: this policy sampled it (forwards_needed)
            old_logps = logps.detach()
            out["rollout_entropy_sum"] = entropy.detach().sum()
            if rollout.has_ref_logprobs:
                out["rollout_kl_sum"] = (kl_penalty(old_logps, ref_logps, cfg.kl_estimator) * mask).sum()
        if not rollout.has_ref_logprobs:
            ref_logps = logps.detach()
        ratio = importance_ratio(logps, old_logps, mask, cfg.ratio_level)
        low = cfg.clip_eps if cfg.clip_eps_low is None else cfg.clip_eps_low
        high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
        per_token = clipped_policy_terms(ratio, advantages, low, high)
        if cfg.kl_in == "loss":  # GRPO: the KL to the reference as a loss term on the sampled tokens
            kl = kl_penalty(logps, ref_logps, cfg.kl_estimator)
            per_token = per_token + kl_coef * kl
            out["kl_loss"] = masked_mean(kl.detach(), mask) * share
        if cfg.entropy_coef != 0:
            per_token = per_token - cfg.entropy_coef * entropy
        denominator = totals["tokens"] if cfg.loss_agg == "token_mean" else totals["sequences"]
        policy_loss = loss_numerator(per_token, mask, cfg.loss_agg, cfg.sampling.max_new_tokens) / denominator
        loss = policy_loss
        out["policy_loss"] = policy_loss.detach()
        out["clipfrac"] = clip_fraction(ratio.detach(), advantages, mask, low, high) * share
        out["approx_kl"] = masked_mean(kl_penalty(old_logps, logps.detach(), "k3"), mask) * share
        out["ratio"] = masked_mean(ratio.detach(), mask) * share
    elif value_head is not None:  # share_backbone's critic warm-up: the head learns, the backbone waits
        values = head_values(accelerator.unwrap_model(actor), value_head, batch)
    if critic is not None:
        if loss is not None:  # the actor's graph is freed before the critic's forward builds its own
            accelerator.backward(loss * world)  # DDP averages over processes: scale back to the global sum
            loss = None
        values = response_values(critic, batch)
    if values is not None:
        value_loss = ppo_value_loss(values, old_values, returns, mask, cfg.value_clip_eps) * share
        weighted = value_loss * (cfg.vf_coef if value_head is not None else 1.0)
        loss = weighted if loss is None else loss + weighted
        out["value_loss"] = value_loss.detach()
        clipped = ((values.detach() - old_values).abs() > cfg.value_clip_eps).float()
        out["value_clipfrac"] = masked_mean(clipped, mask) * share
    if loss is not None:
        accelerator.backward(loss * world)
    return out


def update(accelerator, cfg, actor, critic, optimizers, rollout: Rollout, step: int, train_actor: bool,
           kl_coef: float, pad_id: int, guard: NonFiniteGuard, value_head=None) -> dict[str, float]:
    """`ppo_epochs` passes of mini-batches over the rollout; returns metrics averaged over the updates.
    optimizers: [actor's, critic's] (the critic's only with a critic; with value_head, share_backbone, one
    over both). A mini-batch whose gradient norm is not finite is skipped by every model (guard)."""
    n, world, rank = len(rollout), accelerator.num_processes, accelerator.process_index
    mini = cfg.mini_batch_size or n
    totals: dict[str, torch.Tensor] = {}
    if value_head is not None:  # one optimizer, one gradient norm over the shared backbone and the head
        trained = [("grad_norm", (actor, value_head), optimizers[0])]
    else:
        trained = [(name, (m,), o) for name, m, o in zip(("grad_norm", "critic_grad_norm"), (actor, critic), optimizers)
                   if m is not None and (m is not actor or train_actor)]
    norms = {name: 0.0 for name, _, _ in trained}
    for model in (actor, critic, value_head):
        if model is not None:
            model.train()  # dropout is off (disable_dropout): train mode computes what the rollout did
    updates, lengths = 0, rollout.mask.sum(1).tolist()
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "ppo_minibatches", step, epoch)))
        for start in range(0, n, mini):
            rows = order[start : start + mini].tolist()
            denominators = {"tokens": rollout.mask[rows].sum().item(), "sequences": float(len(rows))}
            # micro-batches of similar lengths pad less; the loss sums over the global mini-batch, so this is free
            # and a prompt's samples side by side share its forward (rollout.forwards.response_logits)
            group_order = lambda i: (len(rollout.prompt_ids[i]), rollout.prompt_ids[i], lengths[i])  # noqa: E731
            mine = sorted(rows[rank::world], key=group_order)
            micro = [mine[i : i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]
            for k, part in enumerate(micro):
                with ExitStack() as stack:
                    if k < len(micro) - 1:  # all-reduce gradients only on the last micro-batch
                        for _, models, _ in trained:
                            for model in models:
                                stack.enter_context(accelerator.no_sync(model))
                    for key, value in micro_step(accelerator, cfg, actor, critic, rollout, part, denominators,
                                                 train_actor, kl_coef, pad_id, value_head).items():
                        totals[key] = totals.get(key, 0.0) + value.float()
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            step_norms = {name: accelerator.clip_grad_norm_([p for m in models for p in m.parameters()], max_norm)
                          for name, models, _ in trained}
            if guard.check(accelerator, step + 1, "loss or gradient norm", *step_norms.values()):
                for name, _, optimizer in trained:  # all models step, or none (a skipped step keeps them in step)
                    norms[name] += float(step_norms[name])
                    optimizer.step()
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            updates += 1
    names = sorted(totals)
    reduced = accelerator.reduce(torch.stack([totals[k] for k in names]).to(accelerator.device), "sum").tolist()
    out = {k: v / updates for k, v in zip(names, reduced)}
    out.update({k: v / updates for k, v in norms.items()})
    return out  # (a skipped mini-batch adds 0 to the norms: their mean reads low, the log says why)


# ----------------------------------------------------------------------------- stage


def load_run(accelerator: Accelerator, cfg: PPOConfig, say) -> SimpleNamespace:
    """Everything a run trains with: prompts, the four models (prepared), rewards, batch plan, optimizers."""
    train_records, eval_records, invalid = load_train_eval(cfg, kind="prompts")
    actor, tokenizer = load_policy(accelerator, cfg, train_records)
    disable_dropout(actor)
    if prompt_room(cfg) < 1:
        raise ConfigError(f"max_length={cfg.max_length} leaves no room for a prompt after max_new_tokens={cfg.sampling.max_new_tokens}")
    prompts, truncated = truncated_prompts(tokenizer, train_records, cfg)
    if len(prompts) < cfg.rollout_batch_size:
        raise DataError(f"{len(prompts)} training prompts for rollout_batch_size={cfg.rollout_batch_size}")
    eval_prompts, eval_truncated = truncated_prompts(tokenizer, eval_records, cfg)
    eval_prompts = eval_prompts[: cfg.max_eval_rows] if cfg.max_eval_rows > 0 else eval_prompts
    proxy, gold = reward_functions(accelerator, cfg)
    ref = load_reference(cfg, actor, accelerator.device)  # None: the LoRA actor with its adapters off
    # share_backbone: the critic is a head on the actor's last hidden state; critic-free estimators load none
    value_head = value_head_for(actor, cfg.seed).to(accelerator.device) if cfg.share_backbone else None
    no_critic = (None, None, "shared backbone" if cfg.share_backbone else None)
    critic, critic_tokenizer, critic_source = (load_critic(cfg, tokenizer, say) if cfg.advantage == "gae" and
                                               not cfg.share_backbone else no_critic)
    plan = BatchPlan(len(prompts), cfg.rollout_batch_size, cfg.rollout_batch_size, 1, 0, cfg.seed)
    steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * plan.steps_per_epoch))
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    optimizers = [build_optimizer(actor, cfg.lr, cfg.weight_decay, betas)]
    if critic is not None:
        optimizers.append(build_optimizer(critic, cfg.critic_lr, cfg.weight_decay, betas))
    if value_head is not None:  # the head joins the actor's optimizer, at the critic's learning rate
        optimizers[0].add_param_group({"params": list(value_head.parameters()), "lr": cfg.critic_lr,
                                       "weight_decay": cfg.weight_decay})
    schedulers = [build_scheduler(o, cfg.lr_schedule, cfg.warmup_steps, steps, cfg.min_lr_ratio) for o in optimizers]
    # one model per prepare() (FSDP2 shards one at a time), each with its optimizer; the head is a model of its
    # own for accelerate: DDP all-reduces its gradient, checkpoints hold its weights
    actor, optimizers[0] = accelerator.prepare(actor, optimizers[0])
    if critic is not None:
        critic, optimizers[1] = accelerator.prepare(critic, optimizers[1])
    value_head = accelerator.prepare(value_head) if value_head is not None else None
    accelerator.register_for_checkpointing(*schedulers)
    return SimpleNamespace(actor=actor, ref=ref, critic=critic, value_head=value_head, tokenizer=tokenizer,
                           critic_tokenizer=critic_tokenizer, critic_source=critic_source, prompts=prompts,
                           eval_prompts=eval_prompts, truncated=truncated, eval_truncated=eval_truncated,
                           invalid=invalid, proxy=proxy, gold=gold, plan=plan, steps=steps, optimizers=optimizers,
                           schedulers=schedulers)


def training_state(accelerator: Accelerator, cfg: PPOConfig) -> SimpleNamespace:
    """The state a checkpoint carries (KL controller, running moments, alarms, guard, counters), fresh or resumed."""
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    s = SimpleNamespace(kl_ctl=kl_ctl, running=RunningMoments(), alarms=AlarmWatch(cfg.kl_budget), start_step=0,
                        guard=NonFiniteGuard(cfg.max_nonfinite_steps, "ppo", cfg.lr, accelerator.is_main_process),
                        state={"train_s": 0.0, "samples": 0, "samples_trained": 0, "tokens": 0, "first": {}, "last": {}})
    s.checkpoint = checkpoint_to_resume(cfg.output_dir, cfg.resume, accelerator.is_main_process)
    if s.checkpoint is not None:
        s.state = load_checkpoint(accelerator, s.checkpoint)
        s.start_step = s.state.pop("step")
        s.kl_ctl.load_state_dict(s.state.pop("kl_controller"))
        s.running = RunningMoments(**s.state.pop("running_moments"))
        s.alarms.load_state_dict(s.state.pop("alarms"))
        s.guard.load_state_dict(s.state.pop("nonfinite", {}))
    return s


def train_step(accelerator, cfg: PPOConfig, r: SimpleNamespace, s: SimpleNamespace, step: int) -> tuple[dict, dict]:
    """One step: rollout, update (skipped when the rollout is not finite), schedulers, KL controller, counters.
    Returns (the step's record for metrics.jsonl, the rollout's info)."""
    t0 = time.perf_counter()
    kl_coef = s.kl_ctl.value
    moments = asdict(s.running)  # restored when the rollout is not finite, so NaN never enters the statistics
    with whole_weights(r.actor, r.critic, r.value_head):  # FSDP: the processes sample and score different chunks
        rollout, info = collect(accelerator, cfg, r.actor, r.ref, r.critic, r.tokenizer, r.prompts, r.plan, step,
                                kl_coef, r.proxy, r.gold, s.running, r.value_head)
    rollout.scores.mul_(injected_nan_factor(step))
    t1 = time.perf_counter()
    if s.guard.check(accelerator, step + 1, "rewards, advantages or value targets", rollout.scores, rollout.rewards,
                     rollout.advantages, rollout.returns):
        metrics = update(accelerator, cfg, r.actor, r.critic, r.optimizers, rollout, step,
                         step >= cfg.critic_warmup_steps, kl_coef, r.tokenizer.pad_token_id, s.guard, r.value_head)
    else:
        metrics, s.running = {}, RunningMoments(**moments)
    lrs = [scheduler.get_last_lr()[0] for scheduler in r.schedulers]  # the actor's, the critic's
    lrs += [r.schedulers[0].get_last_lr()[-1]] if r.value_head is not None else []  # (the head's group is last)
    for scheduler in r.schedulers:
        scheduler.step()
    stats_from_update(info["stats"], metrics, len(rollout), info["tokens"])
    s.kl_ctl.update(info["stats"].get("kl", 0.0), len(rollout))
    elapsed = time.perf_counter() - t0
    state = s.state
    state["train_s"] += elapsed
    state["samples"] += info["stats"]["sampled"]
    state["samples_trained"] += len(rollout)
    state["tokens"] += info["tokens"]
    record = {**info["stats"], **metrics, "lr": lrs[0], "time_update": time.perf_counter() - t1,
              "samples": state["samples"], "samples_per_s": info["stats"]["sampled"] / elapsed,
              "tokens_per_s": info["tokens"] / elapsed, **({"critic_lr": lrs[-1]} if len(lrs) > 1 else {})}
    state["first"] = state["first"] or record
    state["last"] = record
    return record, info


def run_summary(cfg: PPOConfig, r: SimpleNamespace, s: SimpleNamespace, after: dict, world: int) -> dict[str, Any]:
    first, last, state = s.state["first"], s.state["last"], s.state
    summary: dict[str, Any] = {"steps": r.steps}
    summary.update({f"eval_{k}_before": v for k, v in state.get("eval_before", {}).items()})
    summary.update({f"eval_{k}": v for k, v in after.items()})
    for key in ("reward", "gold_reward", "kl", "response_length", "entropy"):
        if key in last:
            summary[f"{key}_first"], summary[f"{key}_last"] = first[key], last[key]
    summary.update(
        kl=last.get("kl"), kl_coef=s.kl_ctl.value, reward=cfg.reward.source, advantage=cfg.advantage,
        critic_init=r.critic_source, alarms=s.alarms.alarms, num_processes=world, n_train_prompts=len(r.prompts),
        n_eval_prompts=len(r.eval_prompts), truncated_prompts=r.truncated, truncated_eval_prompts=r.eval_truncated,
        invalid_records=len(r.invalid), nonfinite_steps=s.guard.total,
        train_s=state["train_s"], samples=state["samples"], samples_trained=state["samples_trained"],
        samples_per_s=state["samples"] / max(state["train_s"], 1e-9),
        tokens_per_s=state["tokens"] / max(state["train_s"], 1e-9),
    )
    return summary


def run(cfg: PPOConfig) -> dict[str, Any]:
    started = time.time()
    check_config(cfg)
    accelerator = start_run(cfg)
    world = accelerator.num_processes
    mini = cfg.mini_batch_size or cfg.rollout_batch_size * cfg.samples_per_prompt
    if mini % world:
        raise ConfigError(f"mini_batch_size {mini} must be divisible by the {world} processes")
    say = (lambda text: print(f"[ppo] {text}", file=sys.stderr, flush=True)) if accelerator.is_main_process else (lambda text: None)
    r = load_run(accelerator, cfg, say)
    s = training_state(accelerator, cfg)
    steps, state = r.steps, s.state
    logger = RunLogger(cfg.output_dir, "ppo", steps, accelerator.is_main_process, s.start_step)

    def evaluate(step: int) -> dict[str, float]:
        with whole_weights(r.actor):  # as the rollout: per-process chunks
            metrics = evaluate_policy(accelerator, r.actor, r.ref, r.tokenizer, r.eval_prompts, cfg, r.proxy, r.gold)
        logger.log(step, {**{f"eval_{k}": v for k, v in metrics.items()}, "samples": s.state["samples"]}, show=False)
        report(s.alarms.check("eval", {"step": step, **metrics}), step)
        return metrics

    def report(new_alarms: list[dict], step: int) -> None:
        for alarm in new_alarms:
            logger.log(step, {"alarm": alarm}, show=False)
            logger.message(f"ALARM {alarm['name']} ({alarm['source']}) at step {alarm['step']}: {alarm['message']}")

    if s.checkpoint is not None:
        logger.message(f"resumed from {s.checkpoint} at step {s.start_step}/{steps}")
    else:
        say(f"advantage {cfg.advantage}; critic {r.critic_source or 'none'}; {len(r.prompts)} prompts ({r.truncated} "
            f"cut from the left), {len(r.eval_prompts)} held out")
        state["eval_before"] = evaluate(0) if r.eval_prompts else {}

    kill_at = int(os.environ.get(KILL_ENV, "0"))
    with StopRequests("ppo", accelerator.is_main_process) as stops:
        for step in range(s.start_step, steps):
            send_test_signal(step)
            record, info = train_step(accelerator, cfg, r, s, step)
            done = step + 1
            if done % cfg.log_steps == 0 or done == steps:
                logger.log(done, record)
            else:
                logger.advance(done)
            report(s.alarms.check("rollout", {"step": done, **info["stats"]}, info["samples"]), done)
            if cfg.eval_steps > 0 and done % cfg.eval_steps == 0 and done != steps and r.eval_prompts:
                evaluate(done)
            stop = stops.requested(accelerator)
            if (cfg.save_steps > 0 and done % cfg.save_steps == 0) or done == steps or stop:
                path = save_checkpoint(accelerator, cfg.output_dir, done, {
                    **s.state, "kl_controller": s.kl_ctl.state_dict(), "running_moments": asdict(s.running),
                    "alarms": s.alarms.state_dict(), "nonfinite": s.guard.state_dict()}, keep=cfg.save_total_limit)
            if stop:
                raise stops.stop(done, path)
            if kill_at and done == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    after = evaluate(steps) if r.eval_prompts else {}
    logger.close()
    save_final(accelerator, r.actor, r.tokenizer, cfg.output_dir)
    if r.critic is not None:
        save_critic(accelerator, r.critic, r.critic_tokenizer, cfg.output_dir)
    if r.value_head is not None and accelerator.is_main_process:  # final/ stays a plain causal LM
        save_value_head(accelerator.unwrap_model(r.value_head), os.path.join(cfg.output_dir, "final_value_head.safetensors"))
    return finish_run(accelerator, cfg, run_summary(cfg, r, s, after, world), started)
