"""Does one policy-gradient step on the gold reward raise held-out gold? A line search along the gradient.

    python bench/rl_linesearch.py --model runs/tiny-pipeline/sft/final --advantage dr_grpo \
        --loss-agg seq_mean_token_sum_norm --rollouts 8

Draws `rollouts` rollouts of 64 prompts x 8 samples from the model (the ppo stage's own sampling, scoring and
advantages), accumulates the gradient of the clipped policy loss (ratio 1: the plain policy gradient), then
moves the weights along it by several step sizes (normalised SGD steps and Adam-like sign steps) and reports
the change of held-out gold (200 prompts x 4 samples at T=1, the same seeds for every step: common random
numbers). An estimator with a usable signal raises gold for small steps.
"""

from __future__ import annotations

import argparse
import copy

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/tiny-pipeline/sft/final")
    parser.add_argument("--advantage", default="grpo")
    parser.add_argument("--loss-agg", default="seq_mean_token_mean")
    parser.add_argument("--rollouts", type=int, default=1)
    parser.add_argument("--positive-only", action="store_true", help="keep only advantages > 0 (RAFT-like)")
    args = parser.parse_args()

    from accelerate import Accelerator

    import alignkit.stages.ppo as P
    from alignkit.config import GRPOConfig, load_config
    from alignkit.data.records import load_records
    from alignkit.losses import aggregate_loss, clipped_policy_terms, importance_ratio
    from alignkit.models.loading import load_causal_lm
    from alignkit.rl import RunningMoments
    from alignkit.rollout.forwards import batch_on, response_logprobs
    from alignkit.rollout.ppo import disable_dropout, load_reference
    from alignkit.rollout.rewards import gold_rewards
    from alignkit.rollout.sampling import Generation, sample_texts
    from alignkit.runtime.setup import BatchPlan

    cfg = load_config(GRPOConfig, None, [f"model={args.model}", "reward=gold", "max_length=128", "rollout_batch_size=64",
                                         "samples_per_prompt=8", "kl_coef=0", "sampling.chunk=64", "forward_batch_size=256",
                                         f"advantage={args.advantage}", f"loss_agg={args.loss_agg}"])
    accelerator = Accelerator(cpu=True)
    actor, tokenizer = load_causal_lm(cfg.model)
    disable_dropout(actor)
    ref = load_reference(cfg, actor)
    prompts = [r["prompt"] for r in load_records("task:sort/prompts?n=2000", "prompts")[0]]
    held_out = [r["prompt"] for r in load_records("task:sort/prompts_eval?n=200", "prompts")[0]]
    proxy, gold = P.reward_functions(accelerator, cfg)
    plan = BatchPlan(len(prompts), 64, 64, 1, 0, 0)

    def held_out_gold(model) -> float:
        texts = sample_texts(accelerator, model, tokenizer, held_out, 4, 1.0, cfg.max_new_tokens, 64, 0, 1)
        scores = gold_rewards("sort", held_out, texts)
        return sum(map(sum, scores)) / (4 * len(scores))

    actor.zero_grad()
    for k in range(args.rollouts):
        rollout, _ = P.collect(accelerator, cfg, actor, ref, None, tokenizer, prompts, plan, k, 0.0, proxy, gold,
                               RunningMoments())
        samples = [Generation(rollout.prompt_ids[i], rollout.response_ids[i, : int(rollout.mask[i].sum())].tolist(), "", True)
                   for i in range(len(rollout))]
        batch = batch_on(samples, tokenizer.pad_token_id, "cpu")
        logps, _ = response_logprobs(actor, batch, 1.0)
        mask, width = batch["mask"], batch["mask"].shape[1]
        advantages = rollout.advantages[:, :width].clamp(min=0) if args.positive_only else rollout.advantages[:, :width]
        terms = clipped_policy_terms(importance_ratio(logps, rollout.logprobs[:, :width], mask), advantages)
        (aggregate_loss(terms, mask, cfg.loss_agg, cfg.max_new_tokens) / args.rollouts).backward()
    params = [p for p in actor.parameters() if p.grad is not None]
    norm = torch.sqrt(sum((p.grad**2).sum() for p in params)).item()
    base = held_out_gold(actor)
    print(f"samples {args.rollouts * 512}; held-out gold {base:.4f}; gradient norm {norm:.4g}")
    for mode, sizes in (("sgd", [0.01, 0.03, 0.1, 0.3]), ("sign", [1e-5, 3e-5, 1e-4, 3e-4])):
        for eta in sizes:
            moved = copy.deepcopy(actor)
            with torch.no_grad():
                for p_new, p in zip(moved.parameters(), actor.parameters()):
                    if p.grad is not None:
                        p_new -= eta * (p.grad / norm if mode == "sgd" else p.grad.sign())
            print(f"{mode} step {eta:g}: held-out gold {held_out_gold(moved) - base:+.4f}", flush=True)


if __name__ == "__main__":
    main()
