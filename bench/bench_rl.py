"""Online RL throughput and peak memory: alignkit's critic-free RL vs TRL's GRPOTrainer and RLOOTrainer.

    python bench/bench_rl.py --quick                  # tiny model, 3 steps of 4 prompts x 4, every variant
    python bench/bench_rl.py --model tiny             # 9 steps (1 not timed) of 16 prompts x 8, 32 new tokens
    python bench/bench_rl.py --model smollm2          # 3 steps (1 not timed) of 4 prompts x 4, 64 new tokens

Variants, each in its own subprocess, one after the other (peak RSS is that child's own ru_maxrss, os.wait4):
  alignkit-grpo  `alignkit grpo advantage=grpo`   vs  trl-grpo  GRPOTrainer (loss_type=grpo, scale_rewards=group)
  alignkit-rloo  `alignkit grpo advantage=rloo`   vs  trl-rloo  RLOOTrainer
  alignkit-gae   `alignkit ppo advantage=gae` (critic from the policy): time split only, no TRL counterpart here
  floors         HF `generate` alone on the same prompts x group, a plain fwd+bwd (and no-grad forward) of the
                 model on the sequences it sampled; the fp32 matmul peak is measured at the start and the end.
Held equal: the model directory and tokenizer (alignkit's load_tokenizer, same chat template), the prompts of
every step (`task:sort/prompts?n=2000` as chat messages; TRL reads alignkit's per-step choice in order, and both
workers record a digest of each step's prompts, compared in the report), the reward (the sort task's gold reward of the decoded text), the
group size G, prompts per step P, max new tokens, temperature 1 / top_p 1 / top_k off, one optimizer update per
rollout (alignkit mini_batch_size = P*G, ppo_epochs 1; TRL per_device_train_batch_size = micro,
gradient_accumulation_steps = P*G/micro, steps_per_generation = that, num_iterations 1), the same micro-batch,
fp32, AdamW (lr, beta2 0.95, no weight decay, clip 1.0), constant lr, no KL (alignkit kl_coef 0, TRL beta 0),
clip eps 0.2, dropout off, no gradient checkpointing, no evaluation, logging every step.
Throughput: completions (sampled responses) per second over the steps after --warmup (step 1 holds one-off
costs); model load, dataset preparation and trainer construction are `setup s` (everything before the first step).

Not equal (the frameworks' own designs, kept): alignkit always loads a frozen reference copy (its held-out KL is
measured at every evaluation), though at kl_coef 0 with one update per rollout it runs neither the reference nor
the old log-prob forward in a rollout (rollout.ppo.forwards_needed); TRL's GRPOTrainer at beta 0 and num_iterations 1
loads no reference and skips the old log-prob forward too (the ratio is the detached current one); TRL's
RLOOTrainer runs the old log-prob forward, not the reference. TRL's RLOO ratio is per sequence, alignkit's
per token (the same compute).

One file past 400 lines: the workers of both frameworks, the floors and the report are one benchmark, run as one
command, and read best together.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    tiny_model_dir,
    REPO, alignkit_step_timer, emit_result, markdown_table, preimport_alignkit, ratio_lines, rates, run_alignkit,
    run_worker, summarize, trl_step_timer, write_json,
)

TINY_MODEL = tiny_model_dir()  # $ALIGNKIT_BENCH_TINY_MODEL or the first that exists (bench/common.py)
PROMPTS = "task:sort/prompts?n=2000"
TASK = "sort"

# Per model: prompts per step P, group size G, max new tokens, micro-batch (sequences per training forward),
# max_length, lr, optimizer steps (the first --warmup of them not timed).
SETTINGS = {
    "tiny": dict(prompts=16, group=8, max_new_tokens=32, micro=32, max_length=128, lr=2e-5, steps=9),
    # 135M parameters on one shared CPU core: ~1-2 min per step, so few small steps
    "smollm2": dict(prompts=4, group=4, max_new_tokens=64, micro=8, max_length=128, lr=1e-6, steps=3),
}
QUICK = dict(prompts=4, group=4, max_new_tokens=16, micro=8, steps=3)  # caps applied by --quick
VARIANTS = ["alignkit-grpo", "trl-grpo", "alignkit-rloo", "trl-rloo", "alignkit-gae", "floors"]
COMPARISONS = [("alignkit-grpo", "trl-grpo", "GRPO: alignkit grpo vs TRL GRPOTrainer"),
               ("alignkit-rloo", "trl-rloo", "RLOO: alignkit grpo advantage=rloo vs TRL RLOOTrainer")]
TARGET = 1.3  # the project's goal: alignkit >= 1.3x TRL's completions/s at no more peak memory


# ---------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SETTINGS), default="tiny")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: caps {QUICK}")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per run (default per model)")
    parser.add_argument("--warmup", type=int, default=1, help="first steps not timed")
    parser.add_argument("--prompts", type=int, default=0, help="prompts per step P (default per model)")
    parser.add_argument("--group", type=int, default=0, help="completions per prompt G (default per model)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="default per model")
    parser.add_argument("--micro", type=int, default=0, help="sequences per training forward (default per model)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each RL variant, interleaved; median reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS for the workers (0: torch default); 1 on a shared 2-core box")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--json", default=None, help="result file (default: WORK_DIR/bench_rl.json)")
    args = parser.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    return args


def run_settings(args: argparse.Namespace) -> dict:
    """The settings of this invocation: SETTINGS[model], --quick caps, then explicit overrides."""
    s = dict(SETTINGS[args.model])
    if args.quick:
        s.update({k: min(s[k], v) for k, v in QUICK.items()})
    for key in ("steps", "prompts", "group", "max_new_tokens", "micro"):
        if getattr(args, key):
            s[key] = getattr(args, key)
    s["warmup"] = args.warmup
    s["completions"] = s["prompts"] * s["group"]
    if s["completions"] % s["micro"]:
        raise ValueError(f"micro {s['micro']} must divide prompts x group = {s['completions']} (one update per rollout)")
    if s["group"] < 2:
        raise ValueError("group must be >= 2: GRPO and RLOO compare responses to the same prompt")
    if s["steps"] <= s["warmup"]:
        raise ValueError(f"steps {s['steps']} must exceed warmup {s['warmup']}")
    s["accumulation"] = s["completions"] // s["micro"]
    return s


# ------------------------------------------------------------------------------- arithmetic


def matmul_peak(n: int = 1024, trials: int = 5, min_s: float = 0.4) -> dict:
    """Best fp32 GFLOP/s of an n x n x n torch.mm over `trials` runs of at least min_s seconds each (this
    process's thread count: the workers')."""
    import torch

    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    best = 0.0
    for _ in range(trials):
        reps, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < min_s:
            torch.mm(a, b, out=c)
            reps += 1
        best = max(best, gflops(2.0 * n**3 * reps, elapsed))
    return {"gflops": best, "n": n, "threads": torch.get_num_threads()}


def gflops(flop: float, seconds: float) -> float:
    return flop / seconds / 1e9


def prompt_digest(prompts: list) -> str:
    """Order-free fingerprint of a step's distinct prompts (both frameworks record one per step)."""
    distinct = sorted({json.dumps(p, sort_keys=True) for p in prompts})
    return hashlib.sha1(json.dumps(distinct).encode()).hexdigest()[:12]


def step_prompts(records: list[dict], prompts: int, steps: int, seed: int = 0) -> list[dict]:
    """The prompt records alignkit's ppo stage trains on, step after step (its BatchPlan over the prompts, rows
    of step k = a seeded permutation's k-th slice): TRL reads them in this order (shuffle_dataset=False)."""
    from alignkit.runtime.setup import BatchPlan

    plan = BatchPlan(len(records), prompts, prompts, 1, 0, seed)
    return [records[i] for step in range(steps) for i in plan.global_rows(step)]


def mean_over_timed(rows: list[dict], key: str, warmup: int) -> float:
    """Mean of rows[k][key] over the steps after `warmup` (rows[k] is step k + 1)."""
    values = [r[key] for r in rows[warmup:]]
    return sum(values) / len(values)


def split_columns(per_step: list[dict], warmup: int) -> dict[str, float]:
    """Per-step phase means over the timed steps and token totals from per-step {gen_s, fwd_s, update_s,
    response_tokens, all_tokens, sequences} rows."""
    timed = per_step[warmup:]
    if not timed:
        raise ValueError(f"{len(per_step)} steps recorded: need more than warmup={warmup}")
    out = {f"{k}": mean_over_timed(per_step, k, warmup) for k in ("gen_s", "fwd_s", "update_s")}
    out["response_tokens"] = sum(r["response_tokens"] for r in timed)
    out["all_tokens"] = sum(r["all_tokens"] for r in timed)
    out["mean_length"] = out["response_tokens"] / sum(r["sequences"] for r in timed)
    return out


def token_rates(result: dict) -> dict[str, float]:
    """Sampled tokens/s over the timed wall time, and per phase: generate (sampled tokens / gen_s) and update
    (all prompt + response tokens / update_s)."""
    steps = result["timed_steps"]
    return {"sampled_tokens_per_s": result["response_tokens"] / (result["s_per_step"] * steps),
            "gen_tokens_per_s": result["response_tokens"] / (result["gen_s"] * steps),
            "update_tokens_per_s": result["all_tokens"] / (result["update_s"] * steps)}


def token_ratio_lines(medians: dict[str, dict[str, float]], runs: dict[str, list[dict]]) -> list[str]:
    """Per comparison: the ratio of sampled tokens/s (completions/s corrected for different response lengths) and
    whether both frameworks were given the same prompts at every step."""
    lines = []
    for ours, theirs, label in COMPARISONS:
        if ours not in medians or theirs not in medians:
            continue
        a, b = medians[ours], medians[theirs]
        same = all(r["prompt_digests"] == runs[ours][0]["prompt_digests"] for r in runs[ours] + runs[theirs])
        lines.append(f"- {label.split(':')[0]}, per sampled token: x{a['sampled_tokens_per_s'] / b['sampled_tokens_per_s']:.2f} "
                     f"(mean response length {a['mean_length']:.1f} vs {b['mean_length']:.1f} tokens); same prompts at "
                     f"every step: {'yes' if same else 'NO'}")
    return lines


def rl_table(medians: dict[str, dict[str, float]]) -> str:
    """Markdown table, one row per variant (label -> summarize() output)."""
    header = ["variant", "completions/s (min-max)", "completions/CPU-s", "s/step", "gen+score s", "no-grad fwd s",
              "update s", "sampled tokens/s", "mean length", "peak RSS MB", "setup s", "load avg"]
    rows = [[label, f"{m['examples_per_s']:.2f} ({m['rate_min']:.2f}-{m['rate_max']:.2f})",
             f"{m['examples_per_cpu_s']:.2f}", f"{m['s_per_step']:.3f}", f"{m['gen_s']:.3f}", f"{m['fwd_s']:.3f}",
             f"{m['update_s']:.3f}", f"{m['sampled_tokens_per_s']:.1f}", f"{m['mean_length']:.1f}",
             f"{m['peak_rss_mb']:.0f}", f"{m['setup_s']:.1f}", f"{m['load_before']:.1f}-{m['load_after']:.1f}"]
            for label, m in medians.items()]
    return markdown_table(header, rows)


def floor_table(floors: dict, peak_gflops: float) -> str:
    """The floors worker's numbers as a markdown table, with model GFLOP/s as a share of the matmul peak."""
    header = ["floor", "s per batch", "tokens", "tokens/s", "completions/s", "model GFLOP/s", "% of matmul peak"]
    rows = []
    for name, label, flop_per_token in (("generate", "HF generate alone (sampled tokens)", 2),
                                        ("forward", "no-grad forward, same sequences (all tokens)", 2),
                                        ("fwd_bwd", "fwd+bwd, same sequences, same micro-batches (all tokens)", 6)):
        f = floors[name]
        model_gflops = gflops(flop_per_token * floors["params"] * f["tokens"], f["s"])
        rows.append([label, f"{f['s']:.3f}", str(f["tokens"]), f"{f['tokens'] / f['s']:.1f}",
                     f"{floors['completions'] / f['s']:.2f}", f"{model_gflops:.2f}",
                     f"{100 * model_gflops / peak_gflops:.1f}"])
    return markdown_table(header, rows)


def gae_lines(gae: dict, floors: dict | None) -> list[str]:
    """Where alignkit PPO's step goes, against the floors when measured."""
    lines = [f"- alignkit ppo advantage=gae: {gae['s_per_step']:.3f} s/step = generate+score {gae['gen_s']:.3f} + "
             f"no-grad forwards (policy old log-probs, reference, critic values) {gae['fwd_s']:.3f} + update "
             f"(actor and critic fwd+bwd, 2 AdamW steps) {gae['update_s']:.3f}; {gae['sampled_tokens_per_s']:.1f} "
             f"sampled tokens/s over the step, {gae['gen_tokens_per_s']:.1f} in the generate phase, "
             f"{gae['update_tokens_per_s']:.1f} tokens/s (prompt + response) in the update"]
    if floors:
        gen = floors["generate"]["tokens"] / floors["generate"]["s"]
        fb = floors["fwd_bwd"]["tokens"] / floors["fwd_bwd"]["s"]
        fw = floors["forward"]["tokens"] / floors["forward"]["s"]
        lines.append(f"- against the floors: generate phase x{gae['gen_tokens_per_s'] / gen:.2f} of HF generate alone; "
                     f"update x{gae['update_tokens_per_s'] / fb:.2f} of one model's plain fwd+bwd (two models train: "
                     f"x0.5 is par); no-grad forwards {gae['all_tokens'] / gae['timed_steps'] / gae['fwd_s']:.1f} "
                     f"tokens/s vs {fw:.1f} for one model's plain forward (three models run: x0.33 is par)")
    return lines


# ------------------------------------------------------------------------------------ workers


def alignkit_worker(spec: dict) -> dict:
    """`alignkit grpo` (advantage grpo / rloo) or `alignkit ppo advantage=gae` in this process; steps timed
    through the run logger, rollout tokens counted by wrapping the stage's collect()."""
    import alignkit.stages.ppo as ppo

    preimport_alignkit()
    times, cpu = alignkit_step_timer()
    tokens: list[dict] = []
    collect = ppo.collect

    def counted_collect(*a, **k):
        times.setdefault(0, time.perf_counter())  # no step-0 evaluation without eval data: training starts here
        cpu.setdefault(0, time.process_time())
        rollout, info = collect(*a, **k)
        response = int(rollout.mask.sum())
        prompts, plan, step = a[6:9]  # collect(accelerator, cfg, actor, ref, critic, tokenizer, prompts, plan, step, ...)
        tokens.append({"sequences": len(rollout), "response_tokens": response,
                       "all_tokens": response + sum(len(p) for p in rollout.prompt_ids),
                       "prompt_digest": prompt_digest([prompts[i] for i in plan.global_rows(step)])})
        return rollout, info

    ppo.collect = counted_collect
    t0 = time.perf_counter()
    gae = spec["algo"] == "gae"
    overrides = {
        "model": spec["model"], "reward": "gold", "train_data": PROMPTS, "eval_data": None,
        "output_dir": spec["output_dir"], "advantage": spec["algo"], "samples_per_prompt": spec["group"],
        "rollout_batch_size": spec["prompts"], "mini_batch_size": spec["completions"],
        "micro_batch_size": spec["micro"], "ppo_epochs": 1, "sampling.max_new_tokens": spec["max_new_tokens"],
        "max_length": spec["max_length"], "max_steps": spec["steps"], "lr": spec["lr"], "lr_schedule": "constant",
        "warmup_steps": 0, "adam_beta2": 0.95, "weight_decay": 0.0, "max_grad_norm": 1.0, "sampling.temperature": 1.0,
        "clip_eps": 0.2, "log_steps": 1, "save_steps": 0, "seed": 0,
        # one generate call per rollout (as TRL's generation batch); no-grad forwards in micro-sized chunks
        "sampling.chunk": spec["prompts"], "forward_batch_size": spec["micro"],
    }
    if gae:
        overrides.update(critic_lr=spec["lr"])  # PPO's own KL default (0.05, in the reward); the forwards run anyway
    else:
        overrides.update(kl_coef=0.0)
    summary, _ = run_alignkit("ppo" if gae else "grpo", overrides)
    rows = [json.loads(line) for line in (Path(spec["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time_update" in r]
    per_step = [{"gen_s": r["time_generate_and_score"], "fwd_s": r["time_forward"], "update_s": r["time_update"], **t}
                for r, t in zip(rows, tokens)]
    result = {**rates(times, cpu, spec["warmup"], spec["completions"]), **split_columns(per_step, spec["warmup"]),
              "timed_steps": spec["steps"] - spec["warmup"], "setup_s": times[0] - t0,
              "gold_first": rows[0].get("gold_reward"), "gold_last": rows[-1].get("gold_reward"),
              "summary_samples_per_s": summary["samples_per_s"], "self_peak_rss_mb": summary.get("peak_rss_mb"),
              "prompt_digests": [t["prompt_digest"] for t in tokens]}
    return {**result, **token_rates(result)}


def trl_worker(spec: dict) -> dict:
    """TRL's GRPOTrainer or RLOOTrainer in this process; steps timed with a callback, generate+score and the
    no-grad forwards timed by wrapping the trainer's own methods."""
    import resource

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from alignkit.data.records import load_records
    from alignkit.data.tasks import get_task
    from alignkit.models.loading import load_tokenizer

    times: dict[int, float] = {}
    cpu: dict[int, float] = {}
    t0 = time.perf_counter()
    records, _ = load_records(PROMPTS, "prompts")
    ordered = step_prompts(records, spec["prompts"], spec["steps"])  # alignkit's prompts of each step, in order
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in ordered])  # conversational prompts
    task = get_task(TASK)

    def gold(prompts, completions, **_):
        # alignkit scores the decoded response stripped of surrounding whitespace: the same here
        return [task.gold_reward(p, c[0]["content"].strip()) for p, c in zip(prompts, completions)]

    tokenizer = load_tokenizer(spec["model"])  # the same tokenizer (chat template, pad) alignkit uses
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="float32", attn_implementation="sdpa")
    grpo = spec["algo"] == "grpo"
    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if grpo else (RLOOConfig, RLOOTrainer)
    algo_args = dict(loss_type="grpo", scale_rewards="group") if grpo else dict(normalize_advantages=False)
    args = config_cls(
        output_dir=spec["output_dir"], per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=spec["accumulation"], num_generations=spec["group"],
        max_completion_length=spec["max_new_tokens"], num_iterations=1, beta=0.0, epsilon=0.2,
        temperature=1.0, top_p=1.0, top_k=0, use_vllm=False, disable_dropout=True,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, adam_beta2=0.95, weight_decay=0.0,
        max_grad_norm=1.0, max_steps=spec["steps"],
        # CPU, fp32, no checkpointing (TRL's defaults are bf16=True, gradient_checkpointing=True), no reporting
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, report_to=[], dataloader_num_workers=0,
        logging_steps=1, save_strategy="no", eval_strategy="no", seed=0, disable_tqdm=True, shuffle_dataset=False,
        **algo_args,
    )
    trainer = trainer_cls(model=model, reward_funcs=[gold], args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[trl_step_timer(times, cpu)])
    setup_done = time.perf_counter()
    calls: list[dict] = []
    no_grad_s = [0.0]
    generate_and_score, logps = trainer._generate_and_score_completions, trainer._get_per_token_logps_and_entropies

    def timed_logps(*a, **k):
        if torch.is_grad_enabled():
            return logps(*a, **k)
        t = time.perf_counter()
        out = logps(*a, **k)
        no_grad_s[0] += time.perf_counter() - t
        return out

    def timed_generate_and_score(inputs):
        no_grad_s[0], t = 0.0, time.perf_counter()
        out = generate_and_score(inputs)
        total = time.perf_counter() - t
        response = int(out["completion_mask"].sum())
        calls.append({"gen_s": total - no_grad_s[0], "fwd_s": no_grad_s[0], "sequences": out["completion_mask"].shape[0],
                      "response_tokens": response, "all_tokens": response + int(out["prompt_mask"].sum()),
                      "prompt_digest": prompt_digest([x["prompt"] for x in inputs])})
        return out

    trainer._get_per_token_logps_and_entropies = timed_logps
    trainer._generate_and_score_completions = timed_generate_and_score
    trainer.train()
    if len(calls) != spec["steps"]:
        raise RuntimeError(f"{len(calls)} generation rounds for {spec['steps']} steps: expected one per step")
    step_s = [times[k + 1] - times[k] for k in range(spec["steps"])]
    per_step = [{**c, "update_s": s - c["gen_s"] - c["fwd_s"]} for c, s in zip(calls, step_s)]
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    result = {**rates(times, cpu, spec["warmup"], spec["completions"]), **split_columns(per_step, spec["warmup"]),
              "timed_steps": spec["steps"] - spec["warmup"], "setup_s": times[0] - t0, "trainer_init_s": setup_done - t0,
              "gold_first": rewards[0] if rewards else None, "gold_last": rewards[-1] if rewards else None,
              "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
              "prompt_digests": [c["prompt_digest"] for c in calls]}
    return {**result, **token_rates(result)}


def floors_worker(spec: dict) -> dict:
    """HF generate alone on P prompts x G (one call, the same sampling), then a plain fwd+bwd and a no-grad forward
    of the model over the sequences it sampled, in the same micro-batches; each timed after a warm-up."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from alignkit.data.records import load_records
    from alignkit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="float32", attn_implementation="sdpa")
    records, _ = load_records(PROMPTS, "prompts")
    prompts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
               for r in records[: spec["prompts"]]]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts for _ in range(spec["group"])]
    stop = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None, tokenizer.unk_token_id})
    pad = tokenizer.pad_token_id
    width = max(map(len, prompt_ids))
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids])
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids])
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                              max_new_tokens=spec["max_new_tokens"], eos_token_id=stop, pad_token_id=pad)
    model.eval()

    def sample(seed: int) -> tuple[float, list[list[int]]]:
        torch.manual_seed(seed)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
        seconds = time.perf_counter() - t
        responses = []
        for row in out[:, width:].tolist():
            cut = next((k for k, tok in enumerate(row) if tok in stop), None)
            responses.append(row if cut is None else row[: cut + 1])
        return seconds, responses

    sample(0)  # warm-up
    runs = [sample(1 + k) for k in range(spec["reps"])]
    responses = runs[-1][1]
    generate = {"s": statistics.median(s for s, _ in runs), "tokens": sum(len(r) for r in responses)}

    sequences = [p + r for p, r in zip(prompt_ids, responses)]
    micro = [sequences[i : i + spec["micro"]] for i in range(0, len(sequences), spec["micro"])]

    def batch(rows: list[list[int]]) -> dict:
        longest = max(map(len, rows))
        ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    batches = [batch(rows) for rows in micro]
    model.train()

    def fwd_bwd() -> float:
        t = time.perf_counter()
        for b in batches:
            model(**b).loss.backward()
        seconds = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        return seconds

    def forward() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                model(**{k: v for k, v in b.items() if k != "labels"})
        return time.perf_counter() - t

    fwd_bwd(), forward()  # warm-up
    all_tokens = sum(map(len, sequences))
    timed = lambda fn: statistics.median(fn() for _ in range(spec["reps"]))  # noqa: E731
    return {"params": sum(p.numel() for p in model.parameters()), "completions": len(sequences), "generate": generate,
            "fwd_bwd": {"s": timed(fwd_bwd), "tokens": all_tokens}, "forward": {"s": timed(forward), "tokens": all_tokens},
            "pad_fraction": 1 - all_tokens / sum(b["input_ids"].numel() for b in batches)}


def peak_worker(spec: dict) -> dict:
    return matmul_peak()


WORKERS = {"alignkit": alignkit_worker, "trl": trl_worker, "floors": floors_worker, "peak": peak_worker}


# --------------------------------------------------------------------------------------- bench


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def model_path(name: str) -> str:
    if name == "tiny":
        if not (TINY_MODEL / "config.json").exists():
            raise SystemExit(f"{TINY_MODEL} missing: run the tiny pipeline (`alignkit pipeline --config "
                             "configs/tiny/pipeline.yaml`) first")
        return str(TINY_MODEL)
    from alignkit.models.loading import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


def bench(args: argparse.Namespace) -> dict:
    s = run_settings(args)
    model = model_path(args.model)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_rl_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else None
    chosen = args.variants.split(",")
    script = Path(__file__)
    report = {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "threads": args.threads, "model": model,
              "settings": s, "uptime_before": uptime(), "runs": {}, "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    print(f"work dir: {work}  (worker logs there)\n{report['uptime_before']}", flush=True)

    def child(kind: str, tag: str, spec: dict) -> dict:
        return run_worker(script, ["_worker", kind, json.dumps(spec)], work / f"{tag}.log", env=env)

    report["matmul_before"] = child("peak", "peak-before", {})
    print(f"  fp32 matmul peak: {report['matmul_before']['gflops']:.1f} GFLOP/s", flush=True)
    base = dict(s, model=model)
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        order = [v for v in VARIANTS[:4] if v in chosen]
        for variant in order if repeat % 2 == 0 else order[::-1]:  # alternate the order: no variant always first
            framework, algo = variant.split("-")
            tag = f"{variant}-{repeat}"
            r = child(framework, tag, dict(base, algo=algo, output_dir=str(work / tag)))
            runs.setdefault(variant, []).append(r)
            print(f"  {tag}: {r['examples_per_s']:.2f} completions/s ({r['examples_per_cpu_s']:.2f} per CPU-s), "
                  f"{r['s_per_step']:.2f} s/step = gen {r['gen_s']:.2f} + fwd {r['fwd_s']:.2f} + update {r['update_s']:.2f}, "
                  f"peak {r['peak_rss_mb']:.0f} MB, length {r['mean_length']:.1f}, load {r['load_before']:.1f}", flush=True)
    if "alignkit-gae" in chosen:
        r = child("alignkit", "alignkit-gae", dict(base, algo="gae", output_dir=str(work / "alignkit-gae")))
        runs["alignkit-gae"] = [r]
        print(f"  alignkit-gae: {r['s_per_step']:.2f} s/step, peak {r['peak_rss_mb']:.0f} MB", flush=True)
    if "floors" in chosen:
        report["floors"] = child("floors", "floors", dict(base, reps=2))
        print(f"  floors: generate {report['floors']['generate']}, fwd+bwd {report['floors']['fwd_bwd']}", flush=True)
    report["matmul_after"] = child("peak", "peak-after", {})
    report["uptime_after"] = uptime()
    report["runs"] = runs
    report["medians"] = {v: summarize(rs) for v, rs in runs.items()}
    report["text"] = render(report, args)
    print("\n" + report["text"], flush=True)
    json_path = Path(args.json or work / "bench_rl.json")
    write_json(json_path, report)
    print(f"\nJSON: {json_path}")
    return report


def render(report: dict, args: argparse.Namespace) -> str:
    s, medians = report["settings"], report["medians"]
    peaks = (report["matmul_before"]["gflops"], report["matmul_after"]["gflops"])
    header = (f"model={args.model} ({report['model']}), {PROMPTS}, reward=gold ({TASK}), {s['prompts']} prompts x "
              f"{s['group']} completions per step, max_new_tokens={s['max_new_tokens']}, micro {s['micro']} "
              f"(x{s['accumulation']} accumulation, one update per rollout), max_length={s['max_length']}, lr={s['lr']}, "
              f"steps={s['steps']} (first {s['warmup']} not timed), fp32, threads/worker={args.threads or 'torch default'}, "
              f"{args.repeats} repeat(s) (order reversed every other repeat), median (min-max). fp32 matmul peak "
              f"(1024^3, {report['matmul_before']['threads']} thread(s)): {peaks[0]:.1f} GFLOP/s before, "
              f"{peaks[1]:.1f} after.\n"
              f"before: {report['uptime_before']}\nafter:  {report['uptime_after']}")
    rl = {k: v for k, v in medians.items() if k != "alignkit-gae"}
    parts = [header, ""]
    if rl:
        parts += [rl_table(rl), "", *ratio_lines(rl, COMPARISONS, TARGET), *token_ratio_lines(rl, report["runs"])]
    if "alignkit-gae" in medians:
        parts += ["", "PPO with critic (alignkit ppo advantage=gae), same settings:", "",
                  rl_table({"alignkit-gae": medians["alignkit-gae"]})]
    if "floors" in report:
        f = report["floors"]
        parts += ["", f"Floors (load {f['load_before']:.1f}-{f['load_after']:.1f}), same model, {f['completions']} "
                  f"completions of the first {s['prompts']} prompts "
                  f"({f['pad_fraction'] * 100:.0f}% padding in the fwd+bwd micro-batches; model GFLOP/s = 2 or 6 x "
                  f"{f['params'] / 1e6:.2f}M params x tokens / s, attention not counted):", "",
                  floor_table(f, max(peaks))]
    if "alignkit-gae" in medians:
        parts += [""] + gae_lines(medians["alignkit-gae"], report.get("floors"))
    return "\n".join(parts)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        emit_result(WORKERS[sys.argv[2]](json.loads(sys.argv[3])))
        return
    bench(parse_args())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
