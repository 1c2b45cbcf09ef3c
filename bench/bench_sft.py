"""SFT throughput, peak memory and MFU: `alignkit sft` vs TRL's SFTTrainer on the same model, data, batch,
length, precision and machine, packing on for both.

    python bench/bench_sft.py --quick                        # tiny model, few steps, about a minute
    python bench/bench_sft.py --model tiny --repeats 3
    python bench/bench_sft.py --model smollm2 --steps 5

Both train the same causal-LM directory with the same tokenizer (alignkit's `load_tokenizer`, so the same
chat template) on the same single-turn conversations (user message -> assistant message: the sort task's SFT
records on tiny, the chosen side of hh-rlhf harmless dialogues with one human and one assistant turn on
SmolLM2), loss on the assistant tokens only (TRL: conversational prompt-completion records, its
completion-only loss), fp32, AdamW (beta2 0.95, no weight decay, clip 1.0), constant lr, no gradient
checkpointing, the same global batch of packed rows split into the same micro-batches, the same max_length
and optimizer steps. Only records that fit max_length whole in both renderings are used (no truncation).

Packing: alignkit packs the samples first-fit-decreasing into rows of max_length (position ids restart per
sample; transformers builds a block-diagonal mask per row) and pads the rows of a micro-batch to the longest.
TRL packs best-fit-decreasing into rows of max_length (`packing_strategy="bfd"`) and, padding-free,
concatenates the micro-batch's rows into one sequence with position ids.

Examples are samples (conversations), counted in the training forwards of the timed steps; tokens are their
real (non-pad) tokens. MFU = 6 x parameters x real tokens per second / the fp32 matmul peak (torch.mm 1024^3,
one thread like the workers) measured in the same invocation (attention not counted).
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
    REPO, alignkit_step_timer, emit_result, markdown_table, preimport_alignkit, run_alignkit, run_worker, steady_rate,
    summarize, tiny_model_dir, trl_step_timer,
)

HH_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl.gz"
if not HH_DATA.exists():
    HH_DATA = Path("/work/shared/data/hh-rlhf-harmless/dev.jsonl.gz")
TINY_MODEL = tiny_model_dir()
TARGET = 1.3  # the goal: alignkit >= 1.3x TRL's examples/s at no more peak memory

# Per model: data source, samples, max_length, global batch (packed rows), micro-batch (rows), lr, default steps.
SETTINGS = {
    "tiny": dict(data="task:sort/sft?n=6000", samples=6000, max_length=128, batch=16, micro=8, lr=5e-4, steps=30),
    # as configs/smollm2-hh/sft.yaml (max_length 256, batch 8, micro 4, lr 2e-5); a few steps on CPU
    "smollm2": dict(data=str(HH_DATA), samples=400, max_length=256, batch=8, micro=4, lr=2e-5, steps=5),
}
VARIANTS = ["alignkit", "trl"]


# ---------------------------------------------------------------------------------------- data


def sft_records(source: str, n: int, model: str, max_length: int) -> list[dict]:
    """The first n single-turn (user, assistant) records of `source` that both frameworks keep whole."""
    from alignkit.data.chat import tokenize_conversation
    from alignkit.data.records import load_records
    from alignkit.models.loading import load_tokenizer

    records, _ = load_records(source, "sft", errors=[])
    tokenizer = load_tokenizer(model)
    kept = []
    for r in records:
        messages = r["messages"]
        if [m["role"] for m in messages] != ["user", "assistant"] or not messages[1]["content"].strip():
            continue
        ours = tokenize_conversation(tokenizer, messages, max_length + 1)
        trl_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        if ours is None or len(ours["input_ids"]) > max_length or len(trl_ids) > max_length:
            continue
        kept.append({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]})
        if len(kept) == n:
            break
    if len(kept) < n:
        raise ValueError(f"{source}: only {len(kept)} usable single-turn records at max_length={max_length}, asked for {n}")
    return kept


def write_records(records: list[dict], path: Path) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


# ------------------------------------------------------------------------------------- counters


class ForwardCounter:
    """Samples, real tokens and forward tokens of each training micro-batch, in order."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int]] = []

    def add(self, samples: int, real: int, forward: int) -> None:
        self.rows.append((int(samples), int(real), int(forward)))

    def timed(self, warmup: int, last: int, accumulation: int) -> dict[str, float]:
        """Totals over the micro-batches of optimizer steps warmup+1..last (accumulation forwards per step)."""
        part = self.rows[warmup * accumulation : last * accumulation]
        samples, real, forward = (sum(r[i] for r in part) for i in range(3))
        return {"timed_samples": samples, "timed_real_tokens": real, "timed_forward_tokens": forward,
                "pad_fraction": 1.0 - real / forward if forward else 0.0, "training_forwards": len(self.rows)}


def sft_rates(times: dict, cpu: dict, counter: ForwardCounter, spec: dict) -> dict[str, float]:
    """examples (samples)/s, tokens/s, examples/CPU-s, s/step over the steps after warmup."""
    warmup, last = spec["warmup"], max(times)
    facts = counter.timed(warmup, last, spec["batch"] // spec["micro"])
    wall = times[last] - times[warmup]
    cpu_s = cpu[last] - cpu[warmup]
    _, per_step = steady_rate(times, warmup, spec["batch"])
    return {**facts, "examples_per_s": facts["timed_samples"] / wall, "examples_per_cpu_s": facts["timed_samples"] / cpu_s,
            "tokens_per_s": facts["timed_real_tokens"] / wall, "tokens_per_cpu_s": facts["timed_real_tokens"] / cpu_s,
            "rows_per_s": spec["batch"] * (last - warmup) / wall, "s_per_step": per_step}


# ------------------------------------------------------------------------------------- workers


def alignkit_worker(spec: dict) -> dict:
    """Train with `alignkit sft` in this process; time each optimizer step through the run logger."""
    import torch

    import alignkit.runtime.lm as lm
    import alignkit.stages.sft as sft

    preimport_alignkit()
    times, cpu = alignkit_step_timer()
    counter = ForwardCounter()
    collate, train_lm, params = lm.collate, sft.train_lm, {}

    def counted_collate(rows, pad_id, packed):
        batch = collate(rows, pad_id, packed)
        if torch.is_grad_enabled():
            counter.add(sum(r.get("n_samples", 1) for r in rows), sum(len(r["input_ids"]) for r in rows),
                        batch["input_ids"].numel())
        return batch

    def counted_train_lm(cfg, accelerator, model, *a, **k):
        params["n"] = sum(p.numel() for p in model.parameters())
        return train_lm(cfg, accelerator, model, *a, **k)

    lm.collate, sft.train_lm = counted_collate, counted_train_lm
    t0 = time.perf_counter()
    overrides = {
        "model": spec["model"], "train_data": spec["data_file"], "data_kind": "sft", "eval_data": None,
        "output_dir": spec["output_dir"], "max_length": spec["max_length"], "batch_size": spec["batch"],
        "micro_batch_size": spec["micro"], "max_steps": spec["steps"], "lr": spec["lr"], "lr_schedule": "constant",
        "warmup_steps": 0, "log_steps": 1, "save_steps": 0, "packing": True, "seed": 0, "adam_beta2": 0.95,
        "weight_decay": 0.0, "max_grad_norm": 1.0, "gradient_checkpointing": False,
    }
    summary, losses = run_alignkit("sft", overrides)
    return {**sft_rates(times, cpu, counter, spec), "setup_s": times[0] - t0, "first_loss": losses[0],
            "last_loss": losses[-1], "params": params["n"], "self_peak_rss_mb": summary["peak_rss_mb"]}


def trl_worker(spec: dict) -> dict:
    """Train with TRL's SFTTrainer in this process; time each optimizer step with a callback."""
    import resource

    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from alignkit.models.loading import load_tokenizer

    times: dict[int, float] = {}
    cpu: dict[int, float] = {}
    t0 = time.perf_counter()
    rows = [json.loads(line) for line in Path(spec["data_file"]).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], torch_dtype="float32")
    tokenizer = load_tokenizer(spec["model"])
    args = SFTConfig(
        output_dir=spec["output_dir"], per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=spec["batch"] // spec["micro"], max_steps=spec["steps"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, adam_beta2=0.95, weight_decay=0.0,
        max_grad_norm=1.0, max_length=spec["max_length"], packing=True, packing_strategy="bfd", bf16=False,
        fp16=False, gradient_checkpointing=False, use_cpu=True, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to=[], seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[trl_step_timer(times, cpu)])
    counter = ForwardCounter()
    collate = trainer.data_collator

    def counted(examples):
        batch = collate(examples)
        real = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        counter.add((batch["position_ids"] == 0).sum(), real, batch["input_ids"].numel())
        return batch

    trainer.data_collator = counted
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {**sft_rates(times, cpu, counter, spec), "setup_s": times[0] - t0, "first_loss": losses[0],
            "last_loss": losses[-1], "params": sum(p.numel() for p in model.parameters()),
            "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def peak_worker(spec: dict) -> dict:
    from bench.bench_rl import matmul_peak

    return matmul_peak()


WORKERS = {"alignkit": alignkit_worker, "trl": trl_worker, "peak": peak_worker}


# --------------------------------------------------------------------------------------- report


def mfu(m: dict[str, float], peak_gflops: float) -> float:
    """Model FLOP utilisation: 6 x params x real tokens/s over the fp32 matmul peak."""
    return 6.0 * m["params"] * m["tokens_per_s"] / (peak_gflops * 1e9)


def sft_table(medians: dict[str, dict[str, float]], peak_gflops: float) -> str:
    header = ["variant", "examples/s (min-max)", "examples/CPU-s", "tokens/s", "rows/s", "s/step", "MFU %",
              "peak RSS MB", "setup s", "pad %", "first loss", "last loss", "load avg"]
    rows = [[label, f"{m['examples_per_s']:.2f} ({m['rate_min']:.2f}-{m['rate_max']:.2f})", f"{m['examples_per_cpu_s']:.2f}",
             f"{m['tokens_per_s']:.0f}", f"{m['rows_per_s']:.2f}", f"{m['s_per_step']:.3f}",
             f"{100 * mfu(m, peak_gflops):.1f}", f"{m['peak_rss_mb']:.0f}", f"{m['setup_s']:.1f}",
             f"{100 * m['pad_fraction']:.1f}", f"{m['first_loss']:.4f}", f"{m['last_loss']:.4f}",
             f"{m['load_before']:.1f}-{m['load_after']:.1f}"] for label, m in medians.items()]
    return markdown_table(header, rows)


def ratio_line(medians: dict[str, dict[str, float]]) -> str:
    if "alignkit" not in medians or "trl" not in medians:
        return ""
    a, b = medians["alignkit"], medians["trl"]
    speed, memory = a["examples_per_s"] / b["examples_per_s"], a["peak_rss_mb"] / b["peak_rss_mb"]
    met = speed >= TARGET and memory <= 1.0
    return (f"- alignkit sft vs TRL SFTTrainer: examples/s x{speed:.2f} (per CPU-s "
            f"x{a['examples_per_cpu_s'] / b['examples_per_cpu_s']:.2f}), tokens/s x{a['tokens_per_s'] / b['tokens_per_s']:.2f}, "
            f"peak memory x{memory:.2f} -> target (>= x{TARGET} at <= x1.00 memory) {'MET' if met else 'NOT met'}")


# --------------------------------------------------------------------------------------- bench


def model_settings(name: str, args: argparse.Namespace) -> tuple[dict, str, int]:
    s = dict(SETTINGS[name])
    if args.quick:
        s["samples"] = min(s["samples"], 1000 if name == "tiny" else 200)
    if args.samples:
        s["samples"] = args.samples
    steps = args.steps or (6 if args.quick else s["steps"])
    if name == "tiny":
        if not (TINY_MODEL / "config.json").exists():
            raise SystemExit(f"{TINY_MODEL} missing: run the tiny pipeline first (or set $ALIGNKIT_BENCH_TINY_MODEL)")
        return s, str(TINY_MODEL), steps
    from alignkit.models.loading import resolve_model_path

    if not Path(s["data"]).exists():
        s["data"] = "task:sort/sft?n=4000"
    return s, resolve_model_path("smollm2-135m-instruct"), steps


def bench_model(name: str, args: argparse.Namespace, work: Path, child) -> tuple[str, dict]:
    s, model, steps = model_settings(name, args)
    work.mkdir(parents=True, exist_ok=True)
    data_file = write_records(sft_records(s["data"], s["samples"], model, s["max_length"]), work / "sft.jsonl")
    results: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for framework in VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]:  # alternate: no framework always first
            tag = f"{framework}-{repeat}"
            spec = dict(s, model=model, data_file=str(data_file), output_dir=str(work / tag), steps=steps,
                        warmup=args.warmup)
            r = child(framework, work / f"{tag}.log", spec)
            print(f"  {tag}: {r['examples_per_s']:.2f} samples/s ({r['examples_per_cpu_s']:.2f} per CPU-s), "
                  f"{r['tokens_per_s']:.0f} tokens/s, peak {r['peak_rss_mb']:.0f} MB, pad {100 * r['pad_fraction']:.0f}%, "
                  f"first loss {r['first_loss']:.4f}, load {r['load_before']:.1f}", flush=True)
            results.setdefault(framework, []).append(r)
    medians = {label: summarize(runs) for label, runs in results.items()}
    return s, model, steps, results, medians


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        emit_result(WORKERS[sys.argv[2]](json.loads(sys.argv[3])))
        return
    from bench.bench_rl import uptime

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_speed_arguments(parser, "bench_sft", "tiny 30, smollm2 5; quick 6", "fewer samples and steps")
    parser.add_argument("--samples", type=int, default=0, help="records to train on (default per model)")
    args = parser.parse_args()
    models, work, report = speed_run(args, "bench_sft")
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else None

    def child(kind: str, log: Path, spec: dict) -> dict:
        return run_worker(Path(__file__), ["_worker", kind, json.dumps(spec)], log, env=env)

    report.update(uptime_before=uptime(), date=time.strftime("%Y-%m-%d %H:%M %Z"))
    print(report["uptime_before"], flush=True)
    report["matmul_before"] = child("peak", work / "peak-before.log", {})
    print(f"  fp32 matmul peak: {report['matmul_before']['gflops']:.1f} GFLOP/s", flush=True)
    outs = {name: bench_model(name, args, work / name, child) for name in models}
    report["matmul_after"] = child("peak", work / "peak-after.log", {})
    report["uptime_after"] = uptime()
    peaks = (report["matmul_before"]["gflops"], report["matmul_after"]["gflops"])
    for name, (s, model, steps, results, medians) in outs.items():
        header = (f"model={name} ({model}), data={s['data']} (first {s['samples']} single-turn records that fit), "
                  f"batch={s['batch']} packed rows (micro {s['micro']}), max_length={s['max_length']}, packing on for both, "
                  f"steps={steps} (first {args.warmup} not timed), fp32, AdamW, threads/worker={args.threads or 'torch default'}, "
                  f"{args.repeats} repeat(s), order alternated, median (min-max); examples = samples. fp32 matmul peak "
                  f"(1024^3, {report['matmul_before']['threads']} thread(s)) {peaks[0]:.1f} GFLOP/s before, {peaks[1]:.1f} after; "
                  f"MFU against the higher.\nbefore: {report['uptime_before']}\nafter:  {report['uptime_after']}")
        text = "\n".join([header, "", sft_table(medians, max(peaks)), "", ratio_line(medians)])
        for m in medians.values():
            m["mfu"] = mfu(m, max(peaks))
        report["models"][name] = {"settings": dict(s, model=model, steps=steps, warmup=args.warmup), "runs": results,
                                  "medians": medians, "text": text}
        print(f"\n## {name}\n{text}", flush=True)
    finish_run(args, "bench_sft", work, report)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
