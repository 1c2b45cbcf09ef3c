"""PPO's four models in less memory: parameters held, peak RSS and s/step of `alignkit ppo` per memory option.

    python bench/bench_ppo_memory.py --model tiny       # the tiny SFT model, 4 steps (1 not timed)
    python bench/bench_ppo_memory.py --model smollm2    # SmolLM2-135M-Instruct, 3 steps (1 not timed)
    python bench/bench_ppo_memory.py --quality          # held-out gold: plain vs share_backbone (configs/tiny/rl-gold/ppo.yaml)

Setups, each in its own subprocess (peak RSS is that child's own ru_maxrss, bench.common.run_worker):
  plain                   actor, frozen reference copy, critic (the policy with a fresh head), reward model
  share_backbone          actor + a value head on its last hidden state (no critic copy, one optimizer)
  lora                    LoRA actor (lora.r=8, all linear layers); the reference is the actor with its adapters off
  offload_frozen          plain, with the reference and the reward model on the CPU outside the rollout forwards
  gradient_checkpointing  plain, with actor and critic recomputing their activations in the backward
Held equal: model, prompts (`task:sort/prompts?n=2000` as chat messages, the same per step), P=4 prompts x G=2
samples, 32 new tokens, max_length 128, ppo_epochs 2 of one mini-batch, micro-batch 4, fp32, seed 0. The proxy
is a reward model: the policy's checkpoint with a fresh seeded head (untrained: its scores are not the point, its
memory is; so that the plain setup really holds four models); the sort task's gold is logged beside it.
`reward.source=gold` loads no reward model at all (three models).

Columns: parameters held = numel of every model resident in the process (actor, reference, critic or value head,
reward model), each tensor counted once; on the accelerator in the update = the same less what offload_frozen
keeps on the CPU then (on a CPU-only machine both live in the same RAM: offloading saves nothing there, it is
measured to show it costs little); trainable = parameters with gradients (AdamW keeps 2 more floats of each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    REPO, alignkit_step_timer, emit_result, markdown_table, preimport_alignkit, rates, run_alignkit, run_worker,
    write_json,
)

TINY_MODEL = Path("/work/main/runs/tiny-pipeline/sft/final")
PROMPTS = "task:sort/prompts?n=2000"
SETUPS = {
    "plain": {},
    "share_backbone": {"share_backbone": "true"},
    "lora": {"lora.r": 8, "lora.alpha": 16},
    "offload_frozen": {"offload_frozen": "true"},
    "gradient_checkpointing": {"gradient_checkpointing": "true"},
}
SETTINGS = {"tiny": dict(steps=4, lr=1e-5), "smollm2": dict(steps=3, lr=1e-6)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SETTINGS), default="tiny")
    parser.add_argument("--tiny-model", default=str(TINY_MODEL), help="the tiny SFT model directory")
    parser.add_argument("--steps", type=int, default=0, help="PPO steps per setup (default per model)")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated subset of {','.join(SETUPS)}")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the workers (0: torch default)")
    parser.add_argument("--quality", action="store_true", help="held-out gold of plain vs share_backbone instead")
    parser.add_argument("--quality-steps", type=int, default=0, help="--quality: PPO steps (default: the config's 64)")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--json", default=None, help="result file (default: WORK_DIR/bench_ppo_memory.json)")
    args = parser.parse_args(argv)
    unknown = set(args.setups.split(",")) - set(SETUPS)
    if unknown:
        parser.error(f"unknown setups {sorted(unknown)}; choose from {list(SETUPS)}")
    return args


# ------------------------------------------------------------------------------------ workers


def held_parameters(models: dict, offloaded: set[str]) -> dict[str, float]:
    """Parameter counts of the resident models (each tensor once, however many models share it)."""
    seen: set[int] = set()
    held = on_device = trainable = 0
    for name, model in models.items():
        for p in model.parameters() if model is not None else ():
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            held += p.numel()
            on_device += p.numel() if name not in offloaded else 0
            trainable += p.numel() if p.requires_grad else 0
    return {"params_held": held, "params_on_device_in_update": on_device, "params_trainable": trainable,
            "models": sorted(n for n, m in models.items() if m is not None)}


def ppo_worker(spec: dict) -> dict:
    """`alignkit ppo` with one setup's options in this process; steps timed through the run logger, the models
    it holds captured from the stage's load_run and reward loading."""
    import alignkit.rollout.ppo as rollout_ppo
    import alignkit.stages.ppo as ppo

    preimport_alignkit()
    times, cpu = alignkit_step_timer()
    models: dict = {}
    load_run, load_scorer, collect = ppo.load_run, rollout_ppo.load_scorer, ppo.collect

    def captured_load_run(accelerator, cfg, say):
        r = load_run(accelerator, cfg, say)
        unwrap = accelerator.unwrap_model
        models.update(actor=unwrap(r.actor), reference=r.ref, critic=unwrap(r.critic) if r.critic is not None else None,
                      value_head=unwrap(r.value_head) if r.value_head is not None else None)
        return r

    def captured_load_scorer(accelerator, name):
        rm, tokenizer = load_scorer(accelerator, name)
        models["reward_model"] = rm
        return rm, tokenizer

    def timed_collect(*a, **k):
        times.setdefault(0, time.perf_counter())  # no evaluation: training starts at the first rollout
        cpu.setdefault(0, time.process_time())
        return collect(*a, **k)

    ppo.load_run, rollout_ppo.load_scorer, ppo.collect = captured_load_run, captured_load_scorer, timed_collect
    overrides = {
        "model": spec["model"], "reward": "rm", "reward.model": spec["rm"], "reward.task": "sort", "train_data": PROMPTS,
        "eval_data": None, "output_dir": spec["output_dir"], "advantage": "gae", "rollout_batch_size": 4,
        "samples_per_prompt": 2, "mini_batch_size": 8, "micro_batch_size": 4, "ppo_epochs": 2,
        "sampling.max_new_tokens": 32, "max_length": 128, "max_steps": spec["steps"], "lr": spec["lr"],
        "critic_lr": spec["lr"], "log_steps": 1, "save_steps": 0, "seed": 0, "sampling.chunk": 8,
        "forward_batch_size": 8, "reward.batch_size": 8, **spec["options"],
    }
    t0 = time.perf_counter()
    summary, _ = run_alignkit("ppo", overrides)
    rows = [json.loads(line) for line in (Path(spec["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time_update" in r]
    offloaded = {"reference", "reward_model"} if spec["options"].get("offload_frozen") == "true" else set()
    return {**rates(times, cpu, 1, 8), **held_parameters(models, offloaded), "setup_s": times[0] - t0,
            "update_s": sum(r["time_update"] for r in rows[1:]) / max(len(rows) - 1, 1),
            "value_loss_first": rows[0].get("value_loss"), "value_loss_last": rows[-1].get("value_loss"),
            "self_peak_rss_mb": summary.get("peak_rss_mb")}


def rm_worker(spec: dict) -> dict:
    """The reward model the setups score with: the policy's checkpoint with a fresh seeded head, saved."""
    from alignkit.models.loading import save_model
    from alignkit.models.reward import load_reward_model

    rm, tokenizer = load_reward_model(spec["model"], new_head=True, seed=0)
    save_model(rm, tokenizer, Path(spec["output_dir"]))
    return {"rm": spec["output_dir"]}


def peak_worker(spec: dict) -> dict:
    from bench.bench_rl import matmul_peak

    return matmul_peak()


def quality_worker(spec: dict) -> dict:
    """configs/tiny/rl-gold/ppo.yaml (optionally with share_backbone) in this process: held-out gold before/after."""
    from alignkit.cli import run_stage

    summary = run_stage("ppo", ["--config", str(REPO / "configs/tiny/rl-gold/ppo.yaml"), f"model={spec['model']}",
                                f"output_dir={spec['output_dir']}", *spec["options"]])
    keys = ("eval_gold_reward_before", "eval_gold_reward_stderr_before", "eval_gold_reward", "eval_gold_reward_stderr",
            "eval_kl", "wall_s")
    return {k: summary.get(k) for k in keys}


WORKERS = {"ppo": ppo_worker, "rm": rm_worker, "peak": peak_worker, "quality": quality_worker}


# -------------------------------------------------------------------------------------- bench


def model_path(args: argparse.Namespace) -> str:
    if args.model == "tiny" or args.quality:
        if not (Path(args.tiny_model) / "config.json").exists():
            raise SystemExit(f"{args.tiny_model} missing: run `alignkit pipeline --config configs/tiny/pipeline.yaml`")
        return args.tiny_model
    from alignkit.models.loading import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


def memory_table(runs: dict[str, dict]) -> str:
    header = ["setup", "models held", "params held (M)", "on device in update (M)", "trainable (M)", "peak RSS MB",
              "s/step", "update s/step"]
    rows = [[name, "+".join(r["models"]), f"{r['params_held'] / 1e6:.2f}", f"{r['params_on_device_in_update'] / 1e6:.2f}",
             f"{r['params_trainable'] / 1e6:.2f}", f"{r['peak_rss_mb']:.0f}", f"{r['s_per_step']:.2f}",
             f"{r['update_s']:.2f}"] for name, r in runs.items()]
    return markdown_table(header, rows)


def bench(args: argparse.Namespace) -> dict:
    model = model_path(args)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_ppo_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else None
    script = Path(__file__)

    def child(kind: str, tag: str, spec: dict) -> dict:
        return run_worker(script, ["_worker", kind, json.dumps(spec)], work / f"{tag}.log", env=env)

    report = {"command": " ".join(sys.argv), "model": model, "threads": args.threads, "cpus": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M %Z"), "runs": {}}
    print(f"work dir: {work}  (worker logs there)", flush=True)
    report["matmul_before"] = child("peak", "peak-before", {})
    if args.quality:
        steps = [f"max_steps={args.quality_steps}", f"eval_steps={args.quality_steps}"] if args.quality_steps else []
        for name, options in (("plain", steps), ("share_backbone", [*steps, "share_backbone=true"])):
            r = child("quality", name, {"model": model, "output_dir": str(work / name), "options": options})
            report["runs"][name] = r
            print(f"  {name}: held-out gold {r['eval_gold_reward_before']:.3f} -> {r['eval_gold_reward']:.3f} "
                  f"+- {r['eval_gold_reward_stderr']:.3f}, KL {r['eval_kl']:.2f}, {r['wall_s']:.0f} s", flush=True)
    else:
        rm = child("rm", "rm", {"model": model, "output_dir": str(work / "rm")})["rm"]
        steps = args.steps or SETTINGS[args.model]["steps"]
        for name in args.setups.split(","):
            spec = {"model": model, "rm": rm, "steps": steps, "lr": SETTINGS[args.model]["lr"],
                    "options": SETUPS[name], "output_dir": str(work / name)}
            r = report["runs"][name] = child("ppo", name, spec)
            print(f"  {name}: {r['params_held'] / 1e6:.2f}M params held, peak {r['peak_rss_mb']:.0f} MB, "
                  f"{r['s_per_step']:.2f} s/step, load {r['load_before']:.1f}", flush=True)
    report["matmul_after"] = child("peak", "peak-after", {})
    report["text"] = render(report, args)
    print("\n" + report["text"], flush=True)
    write_json(Path(args.json or work / "bench_ppo_memory.json"), report)
    return report


def render(report: dict, args: argparse.Namespace) -> str:
    peaks = report["matmul_before"]["gflops"], report["matmul_after"]["gflops"]
    head = (f"{report['date']}, `{report['command']}`, model {report['model']}, {report['threads']} thread(s) per "
            f"worker on {report['cpus']} CPUs; fp32 matmul peak (1024^3) {peaks[0]:.1f} GFLOP/s before, "
            f"{peaks[1]:.1f} after.")
    if args.quality:
        rows = [[name, f"{r['eval_gold_reward_before']:.3f} +- {r['eval_gold_reward_stderr_before']:.3f}",
                 f"{r['eval_gold_reward']:.3f} +- {r['eval_gold_reward_stderr']:.3f}", f"{r['eval_kl']:.2f}",
                 f"{r['wall_s']:.0f}"] for name, r in report["runs"].items()]
        return head + "\n\n" + markdown_table(["setup", "held-out gold before", "after", "KL", "wall s"], rows)
    steps = args.steps or SETTINGS[args.model]["steps"]
    return (head + f" {steps} steps of 4 prompts x 2 samples, 32 new tokens, s/step over the steps after the "
            f"first; peak RSS of each child (load avg {min(r['load_before'] for r in report['runs'].values()):.1f}-"
            f"{max(r['load_after'] for r in report['runs'].values()):.1f}).\n\n" + memory_table(report["runs"]))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        emit_result(WORKERS[sys.argv[2]](json.loads(sys.argv[3])))
        return
    bench(parse_args())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
