"""DPO throughput and peak memory: alignkit vs TRL on the same model, data, batch, length, precision, machine.

    python bench/bench_dpo.py speed --quick                 # tiny model, few steps, < 2 min
    python bench/bench_dpo.py speed --model smollm2 --steps 6
    python bench/bench_dpo.py gold --models runs/tiny/sft/final runs/tiny/dpo/final

`speed` trains DPO four ways, one after the other, each in its own subprocess (peak RSS is that child's
own ru_maxrss, from os.wait4):
  alignkit  precompute_ref=true   reference log-probs computed once before training (default)
  alignkit  precompute_ref=false  reference model kept, run beside each micro-batch
  trl       on-the-fly reference  (TRL's default)
  trl       precompute_ref_log_probs=True
Throughput is examples (pairs) per second over the steady-state optimizer steps: the first `--warmup`
steps and everything before training (model load, tokenization, a precomputed reference pass) are
excluded; the precompute pass is reported on its own in `setup_s`. examples/CPU-s divides by the
process's CPU time over the same steps instead of wall time: on a machine shared with other jobs it
is the steadier of the two. Both use float32, no gradient
checkpointing, AdamW, constant lr, the same global batch (split in the same micro-batches), max_length
and number of steps, and the same normalized pairs (alignkit's loader), as chat messages.

`gold` samples responses of model dirs to held-out task prompts (temperature 1 and greedy) and reports the
mean gold reward with its standard error, and the paired difference of each model against the first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    add_speed_arguments, finish_run, speed_run,
    tiny_model_dir,
    REPO, PaddingCounter, alignkit_step_timer, count_collated_padding, count_packed_padding, emit_result, gold_quality, paired_difference,
    count_params, pair_tokens, preference_records, preimport_alignkit, ratio_lines, rates, run_worker, summarize, trl_step_timer, variant_table,
    run_alignkit, trl_chat_pairs, write_jsonl,
)

HH_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl.gz"
TINY_MODEL = tiny_model_dir()  # $ALIGNKIT_BENCH_TINY_MODEL or the first that exists (bench/common.py)

# Per model: data source, pairs, max_length, global batch, micro-batch, lr, default optimizer steps, and
# alignkit's row_tokens (0: rows as long as the longest sequence of the forward; --row-tokens overrides).
SETTINGS = {
    # row_tokens (alignkit only): 64 as in configs/tiny/dpo.yaml (two ~32-token sequences per row; within noise of 0).
    "tiny": dict(data="task:sort/prefs?n=2000&seed=3", pairs=1024, max_length=128, batch=32, micro=16, lr=5e-4, steps=30,
                 row_tokens=64),
    # Both frameworks precompute over the whole dataset, so it is only as big as the steps need (CPU: ~15 s/step).
    "smollm2": dict(data=str(HH_DATA), pairs=24, max_length=256, batch=4, micro=4, lr=1e-6, steps=6, row_tokens=0),
}
VARIANTS = [("alignkit", True), ("alignkit", False), ("trl", False), ("trl", True)]
TARGET = 1.3  # the goal: alignkit DPO at least 1.3x TRL's throughput at no more peak memory


# ------------------------------------------------------------------------------------ workers


def alignkit_worker(spec: dict) -> dict:
    """Train with `alignkit dpo` in this process; time each optimizer step through the run logger."""
    import alignkit.runtime.sequences as sequences  # dpo's forwards pack there (shared_prefix_logps)

    preimport_alignkit()
    times, cpu = alignkit_step_timer()
    padding = PaddingCounter()
    count_packed_padding(sequences, padding)  # training forwards only (reference passes run under no_grad)
    t0 = time.perf_counter()
    overrides = {
        "model": spec["model"], "train_data": spec["data_file"], "data_kind": "preference", "eval_data": None,
        "output_dir": spec["output_dir"], "max_length": spec["max_length"], "batch_size": spec["batch"],
        "micro_batch_size": spec["micro"], "max_steps": spec["steps"], "lr": spec["lr"], "lr_schedule": "constant",
        "warmup_steps": 0, "log_steps": 1, "save_steps": 0, "precompute_ref": spec["precompute"],
        "row_tokens": spec["row_tokens"], "beta": 0.1, "loss_type": "sigmoid", "seed": 0, "adam_beta2": 0.95,
    }
    summary, losses = run_alignkit("dpo", overrides)
    return {**rates(times, cpu, spec["warmup"], spec["batch"]), "setup_s": times[0] - t0,
            "ref_precompute_s": summary.get("ref_precompute_s", 0.0), "first_loss": losses[0], "last_loss": losses[-1],
            "tokens": summary["input_tokens"], "self_peak_rss_mb": summary["peak_rss_mb"], **padding.facts()}


def trl_worker(spec: dict) -> dict:
    """Train with TRL's DPOTrainer in this process; time each optimizer step with a callback."""
    import resource

    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from alignkit.models.loading import load_tokenizer

    times: dict[int, float] = {}
    cpu: dict[int, float] = {}
    precompute_s = [0.0]
    precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **k):  # runs inside DPOTrainer.__init__
        t = time.perf_counter()
        out = precompute(self, *a, **k)
        precompute_s[0] += time.perf_counter() - t
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute

    t0 = time.perf_counter()
    rows, dataset = trl_chat_pairs(spec["data_file"])
    tokenizer = load_tokenizer(spec["model"])  # the same tokenizer (chat template, pad) alignkit uses
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="float32", attn_implementation="sdpa")
    args = DPOConfig(
        output_dir=spec["output_dir"], per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=spec["batch"] // spec["micro"], max_steps=spec["steps"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, adam_beta2=0.95, weight_decay=0.0,
        max_grad_norm=1.0, max_length=spec["max_length"], beta=0.1, loss_type=["sigmoid"],
        precompute_ref_log_probs=spec["precompute"], bf16=False, fp16=False, gradient_checkpointing=False,
        use_cpu=True, logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[trl_step_timer(times, cpu)])
    setup_done = time.perf_counter()
    padding = PaddingCounter()
    count_collated_padding(trainer, padding)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {**rates(times, cpu, spec["warmup"], spec["batch"]), "setup_s": times[0] - t0,
            "trainer_init_s": setup_done - t0, "ref_precompute_s": precompute_s[0],
            "first_loss": losses[0], "last_loss": losses[-1],
            "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, **padding.facts()}


# ------------------------------------------------------------------------------------- speed


def speed(args: argparse.Namespace) -> None:
    models, work, report = speed_run(args, "bench_dpo")
    for name in models:
        text, report["models"][name] = bench_model(name, args, work / name)
        print(f"\n## {name}\n{text}", flush=True)
    finish_run(args, "bench_dpo", work, report)


def model_settings(name: str, args: argparse.Namespace) -> tuple[dict, str, int]:
    """(settings, model path, optimizer steps) for a SETTINGS entry after command-line overrides."""
    s = dict(SETTINGS[name])
    if args.row_tokens is not None:
        s["row_tokens"] = args.row_tokens
    if args.quick:
        s["pairs"] = min(s["pairs"], 256)
    steps = args.steps or (6 if args.quick else s["steps"])
    if name == "tiny":
        if not (TINY_MODEL / "config.json").exists():
            raise SystemExit(f"{TINY_MODEL} missing: run `alignkit pretrain --config configs/tiny/pretrain.yaml` "
                             "and `alignkit sft --config configs/tiny/sft.yaml` first")
        return s, str(TINY_MODEL), steps
    from alignkit.models.loading import resolve_model_path

    if not HH_DATA.exists():
        s["data"] = "task:sort/prefs?n=2000&seed=3"
    return s, resolve_model_path("smollm2-135m-instruct"), steps


def bench_model(name: str, args: argparse.Namespace, work: Path) -> tuple[str, dict]:
    s, model, steps = model_settings(name, args)
    work.mkdir(parents=True, exist_ok=True)
    records = preference_records(s["data"], s["pairs"], model, s["max_length"])
    data_file = write_jsonl(records, work / "pairs.jsonl")
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else None
    results: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for framework, precompute in VARIANTS:
            if args.variants and f"{framework}-{'pre' if precompute else 'fly'}" not in args.variants.split(","):
                continue
            label = f"{framework}, ref {'precomputed' if precompute else 'on the fly'}"
            tag = f"{framework}-{'pre' if precompute else 'fly'}-{repeat}"
            spec = dict(s, model=model, data_file=str(data_file), output_dir=str(work / tag), steps=steps,
                        warmup=args.warmup, precompute=precompute)
            result = run_worker(Path(__file__), ["_worker", framework, json.dumps(spec)], work / f"{tag}.log", env=env)
            print(f"  {tag}: {result['examples_per_s']:.2f} ex/s ({result['examples_per_cpu_s']:.2f} per CPU-s), "
                  f"peak {result['peak_rss_mb']:.0f} MB, pad {100 * result['pad_fraction']:.0f}%, "
                  f"first loss {result['first_loss']:.4f}, load {result['load_before']:.1f}", flush=True)
            results.setdefault(label, []).append(result)
    medians = {label: summarize(runs) for label, runs in results.items()}
    # Model FLOPs per pair: 6 x parameters x tokens of both sides (the policy's forward and backward; the
    # reference's forward is left out so every variant does the same counted work). run_all.py makes it MFU.
    flops = 6.0 * count_params(model) * pair_tokens(records, model, s["max_length"])
    for m in medians.values():
        m["flops_per_example"] = flops
    header = (f"model={name} ({model}), data={s['data']} (first {s['pairs']} pairs), batch={s['batch']} "
              f"(micro {s['micro']}), max_length={s['max_length']}, alignkit row_tokens={s['row_tokens']}, "
              f"steps={steps} (first {args.warmup} not timed), fp32, AdamW, threads/worker={args.threads or 'torch default'}, "
              f"{args.repeats} repeat(s) interleaved, median (min-max)")
    ours, theirs = "alignkit, ref precomputed", "trl, ref on the fly"
    comparisons = [(ours, theirs, "alignkit default vs TRL default"),
                   (ours, "trl, ref precomputed", "both precomputed"),
                   ("alignkit, ref on the fly", theirs, "both on the fly")]
    text = "\n".join([header, "", variant_table(medians), "", *ratio_lines(medians, comparisons, TARGET)])
    return text, {"settings": dict(s, model=model, steps=steps, warmup=args.warmup), "runs": results, "medians": medians}


# -------------------------------------------------------------------------------------- gold


def gold(args: argparse.Namespace) -> None:
    reports = [gold_quality(m, args.prompts, args.seed, args.max_new_tokens) for m in args.models]
    for mode in ("sampled", "greedy"):
        print(f"\n{mode} ({'temperature 1' if mode == 'sampled' else 'greedy'}), {reports[0]['n_prompts']} prompts {args.prompts}")
        print("| model | mean gold | stderr | exact | diff vs first (paired) |")
        print("| --- | ---: | ---: | ---: | --- |")
        base = reports[0][mode]["values"]
        for r in reports:
            d, se = paired_difference(base, r[mode]["values"])
            diff = "" if r is reports[0] else f"{d:+.4f} +- {se:.4f} ({d / se if se else float('inf'):.1f} se)"
            print(f"| {r['model']} | {r[mode]['mean']:.4f} | {r[mode]['stderr']:.4f} | {r[mode]['exact']:.3f} | {diff} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        spec = json.loads(sys.argv[3])
        emit_result((alignkit_worker if sys.argv[2] == "alignkit" else trl_worker)(spec))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("speed", help="throughput and peak memory, alignkit vs TRL")
    add_speed_arguments(sp, "bench_dpo", "tiny 30, smollm2 8; quick 6", "fewer pairs and steps (tiny: under 2 minutes)")
    sp.add_argument("--row-tokens", type=int, default=None, help="alignkit's row_tokens (default: per model, see SETTINGS)")
    sp.add_argument("--variants", default="",
                    help="comma-separated subset of alignkit-pre,alignkit-fly,trl-fly,trl-pre (default: all four)")
    gp = sub.add_parser("gold", help="gold reward of models on held-out task prompts")
    gp.add_argument("--models", nargs="+", required=True)
    gp.add_argument("--prompts", default="task:sort/prompts_eval?n=500")
    gp.add_argument("--seed", type=int, default=0)
    gp.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    speed(args) if args.command == "speed" else gold(args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
