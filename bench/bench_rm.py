"""Reward-model throughput and peak memory: `alignkit rm` vs TRL's RewardTrainer on the same model, pairs,
batch, length, precision and machine.

    python bench/bench_rm.py --quick                       # tiny model, few steps, about a minute
    python bench/bench_rm.py --model smollm2 --steps 6
    python bench/bench_rm.py --quality --train-pairs 320 --eval-pairs 200   # HH held-out accuracy, one epoch

Both train the same sequence-classification model (alignkit's `load_reward_model`: the causal LM's
transformer plus a score head seeded with 0, and the same tokenizer with the same pad token), on the same
normalized preference pairs (chosen/rejected as assistant messages after the prompt messages), with the
Bradley-Terry loss (no margin, no centring), fp32, AdamW (beta2 0.95, no weight decay, clip 1.0), constant
lr, no gradient checkpointing, the same global batch split into the same micro-batches. Pairs are kept only
when neither framework would cut or drop them at max_length (TRL drops longer sequences; alignkit cuts the
prompt), so both train on the same tokens. Each framework runs in its own subprocess, one after the other;
throughput is pairs per second over the optimizer steps after `--warmup`.

alignkit packs the 2B responses of a micro-batch padding-free into rows of `row_tokens` (0: the longest
response of the forward, so no row is wider than padding would make it) and
runs the score head on the B*2 last hidden states; TRL pads chosen and rejected to the longest of the batch
and runs the head on every position.
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
    add_speed_arguments, finish_run, speed_run,
    tiny_model_dir,
    REPO, PaddingCounter, alignkit_step_timer, count_collated_padding, count_packed_padding, emit_result, mean_stderr,
    paired_difference, preimport_alignkit, ratio_lines, rates, run_alignkit, run_worker, summarize, trl_chat_pairs, trl_step_timer,
    variant_table, write_json, write_jsonl,
)

HH_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl.gz"
TINY_MODEL = tiny_model_dir()  # $ALIGNKIT_BENCH_TINY_MODEL or the first that exists (bench/common.py)

# Per model: data source, pairs, max_length, global batch, micro-batch, lr, default steps, alignkit row_tokens.
SETTINGS = {
    "tiny": dict(data="task:sort/prefs?n=2000&seed=2", pairs=1024, max_length=128, batch=32, micro=16, lr=5e-4, steps=30,
                 row_tokens=0),
    # as configs/smollm2-hh/rm.yaml (batch 8, micro 4, max_length 256, lr 2e-5); a few steps on CPU
    "smollm2": dict(data=str(HH_DATA), pairs=48, max_length=256, batch=8, micro=4, lr=2e-5, steps=6, row_tokens=0),
}
VARIANTS = ["alignkit", "trl"]


# ---------------------------------------------------------------------------------------- data


def rm_records(source: str, n: int, model: str, max_length: int) -> list[dict]:
    """The first n valid pairs of `source` whose both sides fit max_length whole, for both frameworks:
    alignkit's reward example (prompt + response, ending at the end-of-turn token) and TRL's rendering of
    the full conversation (what its RewardTrainer filters on)."""
    from alignkit.data.records import load_records
    from alignkit.models.loading import load_tokenizer
    from alignkit.models.reward import ensure_reward_pad, reward_example

    records, _ = load_records(source, "preference", errors=[])
    tokenizer = load_tokenizer(model)
    ensure_reward_pad(tokenizer)

    def fits(record: dict) -> bool:
        for side in (record["chosen"], record["rejected"]):
            example = reward_example(tokenizer, record["prompt"], side, max_length)
            if example is None or example["truncated"]:
                return False
            messages = list(record["prompt"]) + [{"role": "assistant", "content": side}]
            trl_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            if len(trl_ids) > max_length:
                return False
        return record["chosen"] != record["rejected"]

    kept = [r for r in records if fits(r)][:n]
    if len(kept) < n:
        raise ValueError(f"{source}: only {len(kept)} usable pairs at max_length={max_length}, asked for {n}")
    return kept


def tokens_per_pair(records: list[dict], model: str, max_length: int) -> float:
    """Mean tokens of a pair's two sequences (prompt + response each), as a plain forward would see them: the
    work both frameworks must do per pair, whatever each does to save it (MFU's model FLOPs)."""
    from alignkit.models.loading import load_tokenizer
    from alignkit.models.reward import ensure_reward_pad, reward_example

    tokenizer = load_tokenizer(model)
    ensure_reward_pad(tokenizer)
    total = sum(len(reward_example(tokenizer, r["prompt"], side, max_length)["input_ids"])
                for r in records for side in (r["chosen"], r["rejected"]))
    return total / len(records)


# ------------------------------------------------------------------------------------- workers


def alignkit_worker(spec: dict) -> dict:
    """Train with `alignkit rm` in this process; time each optimizer step through the run logger."""
    import alignkit.models.reward as reward

    preimport_alignkit()
    times, cpu = alignkit_step_timer()
    padding = PaddingCounter()
    count_packed_padding(reward, padding)  # training forwards only
    t0 = time.perf_counter()
    overrides = {
        "model": spec["model"], "train_data": spec["data_file"], "data_kind": "preference", "eval_data": None,
        "output_dir": spec["output_dir"], "max_length": spec["max_length"], "batch_size": spec["batch"],
        "micro_batch_size": spec["micro"], "max_steps": spec["steps"], "lr": spec["lr"], "lr_schedule": "constant",
        "warmup_steps": 0, "log_steps": 1, "save_steps": 0, "row_tokens": spec["row_tokens"], "margin": "none",
        "center_rewards_coef": 0.0, "seed": 0, "adam_beta2": 0.95, "weight_decay": 0.0, "max_grad_norm": 1.0,
    }
    summary, losses = run_alignkit("rm", overrides)
    return {**rates(times, cpu, spec["warmup"], spec["batch"]), "setup_s": times[0] - t0, "first_loss": losses[0],
            "last_loss": losses[-1], "self_peak_rss_mb": summary["peak_rss_mb"], **padding.facts()}


def trl_worker(spec: dict) -> dict:
    """Train with TRL's RewardTrainer in this process; time each optimizer step with a callback."""
    import resource

    from trl import RewardConfig, RewardTrainer

    from alignkit.models.reward import load_reward_model

    times: dict[int, float] = {}
    cpu: dict[int, float] = {}
    t0 = time.perf_counter()
    rows, dataset = trl_chat_pairs(spec["data_file"])
    # The very model and tokenizer alignkit starts from (same seeded score head, same pad token).
    model, tokenizer = load_reward_model(spec["model"], new_head=True, seed=0)
    args = RewardConfig(
        output_dir=spec["output_dir"], per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=spec["batch"] // spec["micro"], max_steps=spec["steps"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, adam_beta2=0.95, weight_decay=0.0,
        max_grad_norm=1.0, max_length=spec["max_length"], center_rewards_coefficient=None, bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to=[], seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            callbacks=[trl_step_timer(times, cpu)])
    if len(trainer.train_dataset) != len(rows):
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {len(rows)} pairs: the data differ")
    padding = PaddingCounter()
    count_collated_padding(trainer, padding)
    trainer.train()
    if spec.get("save"):
        trainer.save_model(str(Path(spec["output_dir"]) / "final"))
        tokenizer.save_pretrained(str(Path(spec["output_dir"]) / "final"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {**rates(times, cpu, spec["warmup"], spec["batch"]), "setup_s": times[0] - t0, "first_loss": losses[0],
            "last_loss": losses[-1], "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "params": sum(p.numel() for p in model.parameters()), **padding.facts()}


# --------------------------------------------------------------------------------------- bench


def model_settings(name: str, args: argparse.Namespace) -> tuple[dict, str, int]:
    s = dict(SETTINGS[name])
    if args.row_tokens is not None:
        s["row_tokens"] = args.row_tokens
    if args.quick:
        s["pairs"] = min(s["pairs"], 256)
    steps = args.steps or (6 if args.quick else s["steps"])
    if name == "tiny":
        if not (TINY_MODEL / "config.json").exists():
            raise SystemExit(f"{TINY_MODEL} missing: run the tiny pretrain and sft configs first")
        return s, str(TINY_MODEL), steps
    from alignkit.models.loading import resolve_model_path

    return s, resolve_model_path("smollm2-135m-instruct"), steps


def bench_model(name: str, args: argparse.Namespace, work: Path) -> tuple[str, dict]:
    s, model, steps = model_settings(name, args)
    work.mkdir(parents=True, exist_ok=True)
    records = rm_records(s["data"], s["pairs"], model, s["max_length"])
    data_file = write_jsonl(records, work / "pairs.jsonl")
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else None
    results: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for framework in VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]:  # alternate: no framework always first
            tag = f"{framework}-{repeat}"
            spec = dict(s, model=model, data_file=str(data_file), output_dir=str(work / tag), steps=steps,
                        warmup=args.warmup)
            result = run_worker(Path(__file__), ["_worker", framework, json.dumps(spec)], work / f"{tag}.log", env=env)
            print(f"  {tag}: {result['examples_per_s']:.2f} pairs/s ({result['examples_per_cpu_s']:.2f} per CPU-s), "
                  f"peak {result['peak_rss_mb']:.0f} MB, pad {100 * result['pad_fraction']:.0f}%, "
                  f"first loss {result['first_loss']:.4f}, load {result['load_before']:.1f}", flush=True)
            results.setdefault(framework, []).append(result)
    medians = {label: summarize(runs) for label, runs in results.items()}
    # Model FLOPs per pair (6 x parameters x tokens of both sequences): the same for both frameworks, so MFU
    # (run_all.py divides by its measured matmul peak) compares the work done per second.
    flops = 6.0 * results["trl"][0]["params"] * tokens_per_pair(records, model, s["max_length"])
    for m in medians.values():
        m["flops_per_example"] = flops
    header = (f"model={name} ({model}), data={s['data']} (first {s['pairs']} pairs that fit), batch={s['batch']} "
              f"(micro {s['micro']}), max_length={s['max_length']}, alignkit row_tokens={s['row_tokens'] or '0 (longest of the forward)'}, "
              f"steps={steps} (first {args.warmup} not timed), fp32, AdamW, threads/worker={args.threads or 'torch default'}, "
              f"{args.repeats} repeat(s), order alternated, median (min-max); examples = pairs")
    text = "\n".join([header, "", variant_table(medians), "",
                      *ratio_lines(medians, [("alignkit", "trl", "alignkit rm vs TRL RewardTrainer")])])
    return text, {"settings": dict(s, model=model, steps=steps, warmup=args.warmup), "runs": results, "medians": medians}


def heldout_accuracy(framework: str, model_dir: str, records: list[dict], max_length: int) -> list[float]:
    """1.0 / 0.0 per held-out pair: did the trained RM score chosen above rejected? Each model is read the way its
    framework trained it: alignkit's at the end-of-turn token (score_texts); TRL's at the last token of the
    rendered conversation (a sequence-classification forward, one text at a time)."""
    import torch

    from alignkit.models.reward import load_reward_model, score_texts

    torch.set_grad_enabled(False)
    model, tokenizer = load_reward_model(model_dir)
    model.eval()
    if framework == "alignkit":
        prompts = [r["prompt"] for r in records] * 2
        responses = [r["chosen"] for r in records] + [r["rejected"] for r in records]
        scores = score_texts(model, tokenizer, prompts, responses, batch_size=8, max_length=max_length)
        n = len(records)
        return [float(c > r) for c, r in zip(scores[:n], scores[n:])]
    out = []
    for r in records:
        side = []
        for response in (r["chosen"], r["rejected"]):
            messages = list(r["prompt"]) + [{"role": "assistant", "content": response}]
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"][-max_length:]
            side.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
        out.append(float(side[0] > side[1]))
    return out


def quality(args: argparse.Namespace) -> None:
    """Held-out accuracy on the shared HH harmless dev pairs after one epoch, as one would run TRL's RewardTrainer
    (batch 8, lr 1e-5, max_length 256), both frameworks from the same model and head, each in its own process."""
    from alignkit.models.loading import resolve_model_path

    model = resolve_model_path("smollm2-135m-instruct")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_rm_quality_"))
    work.mkdir(parents=True, exist_ok=True)
    records = rm_records(str(HH_DATA), args.train_pairs + args.eval_pairs, model, 256)
    train, heldout = records[: args.train_pairs], records[args.train_pairs:]
    data_file = write_jsonl(train, work / "train.jsonl")
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else None
    steps = args.train_pairs // 8
    report = {"command": " ".join(sys.argv), "train_pairs": len(train), "eval_pairs": len(heldout), "steps": steps}
    for framework in VARIANTS:
        spec = dict(model=model, data_file=str(data_file), output_dir=str(work / framework), steps=steps, warmup=1,
                    max_length=256, batch=8, micro=4, lr=1e-5, row_tokens=0, save=True)
        t0 = time.perf_counter()
        result = run_worker(Path(__file__), ["_worker", framework, json.dumps(spec)], work / f"{framework}.log", env=env)
        report[framework] = {"train_wall_s": time.perf_counter() - t0, "examples_per_s": result["examples_per_s"],
                             "peak_rss_mb": result["peak_rss_mb"]}
        print(f"  {framework}: trained in {report[framework]['train_wall_s']:.0f} s", flush=True)
    wins = {f: heldout_accuracy(f, str(work / f / "final"), heldout, 256) for f in VARIANTS}
    for f in VARIANTS:
        report[f]["heldout_accuracy"], report[f]["heldout_accuracy_se"] = mean_stderr(wins[f])
    # alignkit - TRL, paired over the same held-out pairs
    report["accuracy_difference"], report["accuracy_difference_se"] = paired_difference(wins["trl"], wins["alignkit"])
    print(json.dumps(report, indent=1))
    write_json(Path(args.json or work / "bench_rm_quality.json"), report)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        spec = json.loads(sys.argv[3])
        emit_result((alignkit_worker if sys.argv[2] == "alignkit" else trl_worker)(spec))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_speed_arguments(parser, "bench_rm", "tiny 30, smollm2 6; quick 6", "fewer pairs and steps")
    parser.add_argument("--row-tokens", type=int, default=None, help="alignkit's row_tokens (default 0: the longest sequence of the forward)")
    parser.add_argument("--quality", action="store_true", help="held-out HH accuracy after one epoch, alignkit vs TRL")
    parser.add_argument("--train-pairs", type=int, default=320)
    parser.add_argument("--eval-pairs", type=int, default=200)
    args = parser.parse_args()
    if args.quality:
        quality(args)
        return
    models, work, report = speed_run(args, "bench_rm")
    for name in models:
        text, report["models"][name] = bench_model(name, args, work / name)
        print(f"\n## {name}\n{text}", flush=True)
    finish_run(args, "bench_rm", work, report)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
