"""Plain helpers of `alignkit ppo`: sampling and scoring a rollout (with DAPO's dynamic sampling), the no-grad
forwards of a rollout (over rollout.forwards' batches), held-out evaluation, and loading the four models. The stage file (stages/ppo.py) reads
top to bottom on top of these; the rollout's math (Rollout, build_rollout, shape_scores) is in alignkit.rl.

Process-count independence: sampling and the no-grad forwards run in fixed chunks (chunk c on process
c % world, seeded from (seed, split, c)) and are gathered, so every process ends up with the whole rollout,
computed exactly as one process would compute it.

Just past 400 lines because the held-out evaluation and the four models' loading stay beside the rollout
they serve; the scoring rules shared with other stages (score_proxy, RewardFn) live in rollout/rewards.py.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator

from alignkit.data.chat import render_prompt
from alignkit.ops import masked_mean
from alignkit.rl import Rollout, build_rollout, overlong_penalty, shape_scores, varied_groups
from alignkit.rollout.forwards import (batch_on, logprobs_and_values, reference_logprobs, resident,
                                       response_logprobs, response_values)
from alignkit.rollout.rewards import RewardFn, gold_rewards, load_scorer, score_proxy, score_with, task_name_for
from alignkit.rollout.sampling import (EVAL_SPLIT, ITERATION_SPLIT, REFILL_SPLIT, Generation, Split, map_chunks,
                                       sample_generations)
from alignkit.runtime.setup import derive_seed

# Sampling seeds of a PPO run (rollout.sampling's splits): EVAL_SPLIT the held-out evaluation,
# (ITERATION_SPLIT, step) the rollout of `step`, (REFILL_SPLIT, step, k) dynamic sampling's refill round k.


class RolloutForwards(NamedTuple):
    """The no-grad forwards of one sample (rollout_forwards): log-probs under the sampling (old) policy [len],
    under the reference [len], the critic's values [len] (zeros without a critic), and the summed entropy."""

    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy_sum: float


def sample_responses(accelerator: Accelerator, model, tokenizer, prompts: list, n: int, temperature: float,
                     max_new_tokens: int, chunk: int, seed: int, split: Split,
                     max_prompt_tokens: int | None = None) -> list[Generation]:
    """n samples per prompt (prompt-major: sample j of prompt i is at i*n + j), with the KV cache; a prompt
    longer than max_prompt_tokens keeps its last max_prompt_tokens tokens (the end of the conversation)."""
    per_prompt = sample_generations(accelerator, model, tokenizer, prompts, n, temperature, max_new_tokens, chunk, seed,
                                    split, max_prompt_tokens)
    return [Generation(g.prompt_ids, g.response_ids, g.text, g.finished, prompt=prompts[i], prompt_index=i)
            for i, gens in enumerate(per_prompt) for g in gens]


def sample_scored(accelerator, cfg, actor, tokenizer, prompts: list, split: Split, proxy: RewardFn, gold: RewardFn | None,
                  max_prompt_tokens: int) -> dict[str, Any]:
    """One sampling round: samples (prompt-major), their raw proxy [N], gold [N] or None, `penalised` [P,G]: the
    proxy after the missing-EOS and overlong penalties (what dynamic sampling compares), and `disagreement` (an
    ensemble reward model's spread on these samples, else None)."""
    n = cfg.samples_per_prompt
    samples = sample_responses(accelerator, actor, tokenizer, prompts, n, cfg.sampling.temperature, cfg.sampling.max_new_tokens,
                               cfg.sampling.chunk, cfg.seed, split=split, max_prompt_tokens=max_prompt_tokens)
    texts = grouped([s.text for s in samples], n)
    rewards, disagreement = score_proxy(proxy, prompts, texts)
    raw = torch.tensor([r for rs in rewards for r in rs], dtype=torch.float32)
    golds = torch.tensor([g for gs in gold(prompts, texts) for g in gs]) if gold is not None else None
    finished = torch.tensor([s.finished for s in samples])
    penalised = raw - cfg.missing_eos_penalty * (~finished).float()
    if cfg.overlong_buffer > 0:
        lengths = torch.tensor([len(s.response_ids) for s in samples])
        penalised = penalised + overlong_penalty(lengths, cfg.sampling.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
    return {"samples": samples, "raw": raw, "gold": golds, "penalised": penalised.view(-1, n), "disagreement": disagreement}


def draw_rollout_samples(accelerator, cfg, actor, tokenizer, prompts: list, rows: list[int], step: int, proxy: RewardFn,
                         gold: RewardFn | None, max_prompt_tokens: int) -> tuple[dict[str, Any], dict[str, float]]:
    """The step's scored samples: one round, or with dynamic_sampling (DAPO) rounds of fresh prompts until
    rollout_batch_size groups with unequal rewards are found (or max_refills rounds are spent; the rollout is
    then topped up with equal-reward groups, which carry no policy gradient). rows: the step's prompts (indices
    into prompts). Returns (round, stats)."""
    first = sample_scored(accelerator, cfg, actor, tokenizer, [prompts[i] for i in rows], (ITERATION_SPLIT, step), proxy,
                          gold, max_prompt_tokens)
    varied = varied_groups(first["penalised"])
    stats = {"varied_group_fraction": varied.float().mean().item(), "sampled": len(first["samples"]),
             "sampling_rounds": 1}
    if first["disagreement"] is not None:  # the spread on the first round's samples (the step's own prompts)
        stats["rm_disagreement"] = first["disagreement"]
    if not cfg.dynamic_sampling:
        return first, stats
    rounds, kept = [first], [(0, g) for g in varied.nonzero().flatten().tolist()]
    for k in range(1, cfg.max_refills + 1):
        if len(kept) >= cfg.rollout_batch_size:
            break
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "refill_prompts", step, k))
        refill = torch.randperm(len(prompts), generator=generator)[: cfg.rollout_batch_size].tolist()
        extra = sample_scored(accelerator, cfg, actor, tokenizer, [prompts[i] for i in refill],
                              (REFILL_SPLIT, step, k), proxy, gold, max_prompt_tokens)
        rounds.append(extra)
        kept += [(k, g) for g in varied_groups(extra["penalised"]).nonzero().flatten().tolist()]
        stats["sampled"] += len(extra["samples"])
        stats["sampling_rounds"] += 1
    flat = [(0, g) for g in (~varied).nonzero().flatten().tolist()]
    chosen = (kept + flat)[: cfg.rollout_batch_size]  # top up with equal-reward groups of round 0 if short
    n = cfg.samples_per_prompt
    pick = lambda r, g, key: rounds[r][key][g * n : (g + 1) * n]  # noqa: E731 - group g of round r
    merged = {"samples": [s for r, g in chosen for s in pick(r, g, "samples")],
              "raw": torch.cat([pick(r, g, "raw") for r, g in chosen]),
              "gold": torch.cat([pick(r, g, "gold") for r, g in chosen]) if gold is not None else None,
              "penalised": torch.stack([rounds[r]["penalised"][g] for r, g in chosen])}
    stats["trained_varied_fraction"] = min(len(kept), cfg.rollout_batch_size) / cfg.rollout_batch_size
    return merged, stats


def collect(accelerator, cfg, actor, ref, critic, tokenizer, prompts, plan, step, kl_coef, proxy, gold,
            running, value_head=None) -> tuple[Rollout, dict[str, Any]]:
    """Rollout of `step` (the stage's step 1-4: samples, scores, no-grad forwards, rl.build_rollout) and its
    statistics (the metrics users expect, plus the per-sample series). The values come from `critic`, or with
    share_backbone from `value_head` on the actor's forward."""
    n = cfg.samples_per_prompt
    t0 = time.perf_counter()
    drawn, sampling = draw_rollout_samples(accelerator, cfg, actor, tokenizer, prompts, plan.global_rows(step), step,
                                           proxy, gold, prompt_room(cfg))
    samples, raw, golds = drawn["samples"], drawn["raw"], drawn["gold"]
    t1 = time.perf_counter()
    need_old, need_ref = forwards_needed(cfg, len(samples))
    with resident(ref, accelerator.device, cfg.offload_frozen and need_ref):
        forwards = rollout_forwards(accelerator, actor, ref, critic, samples, tokenizer.pad_token_id,
                                    cfg.sampling.temperature, cfg.forward_batch_size, need_old, need_ref, value_head)
    valued = critic is not None or value_head is not None
    finished = torch.tensor([s.finished for s in samples])
    # missing-EOS and overlong penalties are in `penalised`; normalisation and clipping follow
    scores = shape_scores(drawn["penalised"].flatten(), finished, 0.0, cfg.reward_norm, cfg.reward_clip, running)
    rollout = build_rollout(
        [s.prompt_ids for s in samples], [s.response_ids for s in samples], finished.tolist(),
        [f.logprobs for f in forwards], [f.ref_logprobs for f in forwards],
        [f.values for f in forwards] if valued else None,
        scores, tokenizer.pad_token_id, kl_coef, cfg.kl_estimator, cfg.gamma, cfg.lam, cfg.whiten_advantages,
        advantage=cfg.advantage, group_size=n, kl_in=cfg.kl_in, has_old_logprobs=need_old, has_ref_logprobs=need_ref)
    t2 = time.perf_counter()
    mask, lengths = rollout.mask, rollout.mask.sum(1)
    kl_per_seq = rollout.kl.sum(1)
    stats = {
        "reward": raw.mean().item(), "reward_std": raw.std().item() if len(raw) > 1 else 0.0,
        "score": scores.mean().item(), "kl": kl_per_seq.mean().item(), "kl_coef": kl_coef,
        "non_score_reward": (-kl_coef * kl_per_seq).mean().item(),
        "entropy": sum(f.entropy_sum for f in forwards) / lengths.sum().item(),
        "response_length": lengths.mean().item(), "eos_fraction": finished.float().mean().item(),
        "advantages_abs_mean": masked_mean(rollout.advantages.abs(), mask).item(),
        "time_generate_and_score": t1 - t0, "time_forward": t2 - t1, **sampling,
    }
    if not (need_old and need_ref):  # the KL is filled in by the update (stats_from_update), or never read
        del stats["kl"], stats["non_score_reward"]
    if valued:
        raw_advantages = (rollout.returns - rollout.values) * mask
        stats.update(returns_mean=masked_mean(rollout.returns, mask).item(),
                     values_mean=masked_mean(rollout.values, mask).item(),
                     advantages_std=masked_mean((raw_advantages - masked_mean(raw_advantages, mask)) ** 2, mask).sqrt().item())
    gold_list = golds.tolist() if golds is not None else None
    if gold_list is not None:
        from alignkit.eval.metrics import grouped_mean_and_stderr

        stats["gold_reward"], stats["gold_reward_stderr"] = grouped_mean_and_stderr(grouped(gold_list, n))
    samples_for_alarms = {"step": step + 1, "length": lengths.tolist(), "reward": raw.tolist(),
                          **({"gold_reward": gold_list} if gold_list is not None else {})}
    return rollout, {"stats": stats, "samples": samples_for_alarms, "tokens": int(lengths.sum().item())}


def forwards_needed(cfg: Any, n_sequences: int) -> tuple[bool, bool]:
    """(old log-probs forward, reference forward): which no-grad forwards a rollout of n_sequences needs.

    The reference is needed only when something reads the KL: a non-zero or adaptive kl_coef, or a kl_budget
    alarm. The old log-probs are needed unless the rollout makes exactly one optimizer step (one epoch, one
    mini-batch) and the KL is not in the reward: then the policy that sampled is the one the update's forward
    runs, and its detached log-probs are the old ones (ratio exactly 1), as TRL's GRPO does at mu=1.
    """
    kl_read = cfg.kl_coef != 0 or cfg.adaptive_kl or cfg.kl_budget is not None
    one_update = cfg.ppo_epochs == 1 and (not cfg.mini_batch_size or cfg.mini_batch_size >= n_sequences)
    return not one_update or (kl_read and cfg.kl_in == "reward"), kl_read


def rollout_forwards(accelerator: Accelerator, actor, ref, critic, samples: list[Generation], pad_id: int,
                     temperature: float, chunk: int, need_old: bool = True, need_ref: bool = True,
                     value_head=None) -> list[RolloutForwards]:
    """Per sample its RolloutForwards (old log-probs, reference log-probs, values, entropy sum).

    No gradient; the models run unwrapped (no DDP collectives) in eval mode, in fixed chunks over processes.
    critic None (critic-free estimators): values are 0; value_head (share_backbone): the values are read off
    the actor's forward, which then always runs. ref None: the actor with its LoRA adapters off
    (forwards.reference_logprobs). A forward not needed (forwards_needed) is not run: without the old one,
    log-probs and entropy are 0 (the update fills them in); without the reference, its log-probs are the old
    ones (KL 0).
    """
    unwrap = lambda m: accelerator.unwrap_model(m) if m is not None else None  # noqa: E731
    actor, critic, value_head = unwrap(actor), unwrap(critic), unwrap(value_head)
    modes = [(m, m.training) for m in (actor, ref, critic, value_head) if m is not None]

    def forward(_: int, part: list[Generation]) -> list[RolloutForwards]:
        if not (need_old or need_ref or critic is not None or value_head is not None):
            return [RolloutForwards(*(torch.zeros(len(s.response_ids)),) * 3, 0.0) for s in part]
        batch = batch_on(part, pad_id, accelerator.device)
        # The same autocast as the training forward (a prepared model runs under it; the reference is not
        # prepared), so at step 0 the ratio is 1 and the KL 0 in bf16 too.
        with torch.no_grad(), accelerator.autocast():
            zeros = torch.zeros_like(batch["mask"])
            values = response_values(critic, batch) if critic is not None else zeros
            if value_head is not None:  # share_backbone: one forward, the log-probs come with the values
                logps, entropy, values = logprobs_and_values(actor, value_head, batch, temperature, with_entropy=True)
            elif need_old:
                logps, entropy = response_logprobs(actor, batch, temperature, with_entropy=True)
            else:
                logps, entropy = zeros, zeros
            ref_logps = reference_logprobs(ref, actor, batch, temperature) if need_ref else logps
        out = []
        for i, s in enumerate(part):
            n = len(s.response_ids)
            out.append(RolloutForwards(logps[i, :n].cpu(), ref_logps[i, :n].cpu(), values[i, :n].cpu(),
                                       float(entropy[i].sum())))
        return out

    for m, _ in modes:
        m.eval()
    try:
        return map_chunks(accelerator, samples, chunk, forward)
    finally:
        for m, was_training in modes:
            m.train(was_training)


def stats_from_update(stats: dict[str, Any], metrics: dict[str, float], n_sequences: int, n_tokens: int) -> None:
    """Move the rollout statistics an update computed (old log-probs reused: forwards_needed) into `stats`:
    the policy's entropy per token and, with a reference, its KL per sequence."""
    if "rollout_entropy_sum" in metrics:
        stats["entropy"] = metrics.pop("rollout_entropy_sum") / max(n_tokens, 1)
    if "rollout_kl_sum" in metrics:
        stats["kl"] = metrics.pop("rollout_kl_sum") / n_sequences
        stats["non_score_reward"] = -stats["kl_coef"] * stats["kl"]


def grouped(values: list[float], n: int) -> list[list[float]]:
    """Prompt-major flat values -> [G][n]."""
    return [values[i : i + n] for i in range(0, len(values), n)]


def evaluate_policy(accelerator: Accelerator, actor, ref, tokenizer, prompts: list, cfg: Any, proxy: RewardFn,
                    gold: RewardFn | None) -> dict[str, float]:
    """Held-out metrics of the current policy on `prompts`, sampled at cfg.sampling.temperature with a FIXED seed
    (common random numbers across evaluations): reward, gold_reward (+ _stderr over prompts), kl (mean
    per-sequence sum of log pi - log pi_ref, an unbiased KL estimate; + _stderr), length, eos_fraction, and with an
    ensemble reward model rm_disagreement (what the ensemble_disagreement alarm follows)."""
    from alignkit.eval.metrics import grouped_mean_and_stderr

    if not prompts:
        return {}
    n = cfg.eval_samples_per_prompt
    samples = sample_responses(accelerator, actor, tokenizer, prompts, n, cfg.sampling.temperature,
                               cfg.sampling.max_new_tokens, cfg.sampling.chunk, cfg.seed, split=EVAL_SPLIT,
                               max_prompt_tokens=cfg.max_length - cfg.sampling.max_new_tokens)
    texts = grouped([s.text for s in samples], n)
    with resident(ref, accelerator.device, cfg.offload_frozen):
        forwards = rollout_forwards(accelerator, actor, ref, None, samples, tokenizer.pad_token_id,
                                    cfg.sampling.temperature, cfg.forward_batch_size)
    kl = [float((f.logprobs - f.ref_logprobs).sum()) for f in forwards]
    out: dict[str, float] = {}
    rewards, disagreement = score_proxy(proxy, prompts, texts)
    if disagreement is not None:
        out["rm_disagreement"] = disagreement
    series = {"reward": rewards, "kl": grouped(kl, n),
              "length": grouped([float(len(s.response_ids)) for s in samples], n)}
    if gold is not None:
        series["gold_reward"] = gold(prompts, texts)
    for name, values in series.items():
        out[name], out[f"{name}_stderr"] = grouped_mean_and_stderr(values)
    out.pop("length_stderr")
    out["eos_fraction"] = sum(s.finished for s in samples) / len(samples)
    return out


# ----------------------------------------------------------------------------- prompts and rewards


def gold_task(cfg: Any) -> str | None:
    """The task whose gold reward is optimised (reward=gold) or logged; None when the prompts have none."""
    return task_name_for(cfg.reward.task, cfg.train_data, required=False)


def prompt_room(cfg: Any) -> int:
    """Prompt tokens that fit: a longer prompt keeps its last prompt_room tokens (the end of the conversation),
    so the response (max_new_tokens, end-of-turn included) always fits in max_length."""
    return cfg.max_length - cfg.sampling.max_new_tokens


def truncated_prompts(tokenizer, records: list[dict], cfg: Any) -> tuple[list, int]:
    """(the records' prompts, how many are longer than prompt_room and are cut from the left when sampled)."""
    room = prompt_room(cfg)
    prompts = [r["prompt"] for r in records]
    cut = sum(len(tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]) > room for p in prompts)
    return prompts, cut


def reward_functions(accelerator: Accelerator, cfg: Any) -> tuple[RewardFn, RewardFn | None]:
    """(proxy, gold or None): functions (prompts, texts per prompt) -> rewards per prompt."""
    task = gold_task(cfg)
    gold = (lambda prompts, texts: gold_rewards(task, prompts, texts)) if task else None
    if cfg.reward.source == "gold":
        return gold, gold
    rm, rm_tokenizer = load_scorer(accelerator, cfg.reward.model)
    rm.requires_grad_(False)
    if cfg.offload_frozen:  # on the accelerator only while it scores (resident)
        rm.to("cpu")

    def proxy(prompts: list, texts: list[list[str]], per_member: bool = False) -> list[list[float]]:
        with resident(rm, accelerator.device, cfg.offload_frozen):
            return score_with(accelerator, rm, rm_tokenizer, prompts, texts, cfg.reward.batch_size, cfg.max_length,
                              per_member=per_member)

    if hasattr(rm, "members"):  # an ensemble directory: score_proxy takes the mean and the spread from one pass
        proxy.per_member = lambda prompts, texts: proxy(prompts, texts, per_member=True)
    return proxy, gold


# ----------------------------------------------------------------------------- the four models


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off everywhere (modules and attention), so the rollout's no-grad forwards (eval mode) and the
    training forward (train mode) compute the same log-probs: otherwise the first ratio is not 1."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def load_reference(cfg: Any, actor, device) -> torch.nn.Module | None:
    """The frozen reference on `device` (the CPU with offload_frozen): cfg.ref_model, else a copy of the
    starting policy; None for a LoRA actor without ref_model: its base weights (adapters disabled) ARE the
    starting policy (forwards.reference_logprobs), so no copy is held."""
    import copy

    from alignkit.models.loading import load_causal_lm
    from alignkit.models.lora import is_peft_model

    if cfg.ref_model is None and is_peft_model(actor):
        return None
    ref = copy.deepcopy(actor) if cfg.ref_model is None else load_causal_lm(cfg.ref_model)[0]
    ref.requires_grad_(False)
    return disable_dropout(ref).eval().to("cpu" if cfg.offload_frozen else device)


def load_critic(cfg: Any, tokenizer, log) -> tuple[torch.nn.Module, Any, str]:
    """(critic, its tokenizer, where it came from): critic_model, else the RM (InstructGPT) when it reads
    the policy's token ids, else the policy with a fresh seeded head; with gradient checkpointing as the actor."""
    critic, tok, source = _load_critic(cfg, tokenizer, log)
    if cfg.gradient_checkpointing:  # the critic's activations are as large as the actor's: recompute both
        critic.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return critic, tok, source


def _load_critic(cfg: Any, tokenizer, log) -> tuple[torch.nn.Module, Any, str]:
    import copy

    from alignkit.config import ConfigError
    from alignkit.models.loading import is_scratch
    from alignkit.models.value import load_value_model, same_vocabulary

    source = cfg.critic_model or (cfg.reward.model if cfg.reward.source == "rm" else cfg.model)
    if is_scratch(source):
        from alignkit.models.reward import load_reward_model
        from alignkit.models.value import ValueModel

        model, tok = load_reward_model(source, tokenizer=copy.deepcopy(tokenizer), new_head=True, seed=cfg.seed)
        return disable_dropout(ValueModel(model)), tok, source
    critic, tok = load_value_model(source, seed=cfg.seed)
    if same_vocabulary(tok, tokenizer):
        return disable_dropout(critic), tok, source
    if cfg.critic_model:
        raise ConfigError(f"critic_model {source!r} has another vocabulary than the policy; the critic reads the "
                          "policy's token ids: use a critic built on the policy's tokenizer")
    log(f"the reward model {source!r} has another vocabulary than the policy: the critic starts from the policy")
    critic, tok = load_value_model(cfg.model, seed=cfg.seed)
    return disable_dropout(critic), tok, cfg.model


def save_critic(accelerator: Accelerator, critic, tokenizer, output_dir: str) -> None:
    """`output_dir/final_critic/` (AutoModelForSequenceClassification format), written atomically; under FSDP
    gathered from the shards."""
    import shutil
    from pathlib import Path

    from accelerate.utils import DistributedType

    from alignkit.models.loading import gathered_weights, save_model

    accelerator.wait_for_everyone()
    # sharded: accelerate gathers the full state dict (a collective: every process calls it), as save_final does
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    full = accelerator.get_state_dict(critic) if sharded else None
    if accelerator.is_main_process:
        final, tmp = Path(output_dir) / "final_critic", Path(output_dir) / ".tmp-final_critic"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(critic)
        with gathered_weights(unwrapped, full):
            save_model(unwrapped.model, tokenizer, tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
