"""Helpers shared by the benchmark scripts: per-child peak memory, step timing, data, gold-reward quality.

Nothing here is imported by `src/` (TRL is a bench-only dependency). Past 400 lines because it is the one
place the bench scripts share code (options, workers, timers, padding counters, tables): a split would only
spread one set of helpers over several files.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "
TINY_MODEL_ENV = "ALIGNKIT_BENCH_TINY_MODEL"
# Where the tiny SFT model may be: this checkout's tiny configs or pipeline run, or the main checkout's (a worktree
# has no runs/ of its own). $ALIGNKIT_BENCH_TINY_MODEL wins.
TINY_CANDIDATES = [REPO / "runs" / "tiny" / "sft" / "final", REPO / "runs" / "tiny-pipeline" / "sft" / "final",
                   Path("/work/main/runs/tiny-pipeline/sft/final"), Path("/work/main/runs/tiny/sft/final")]


def tiny_model_dir() -> Path:
    """The tiny SFT model directory the benches use: $ALIGNKIT_BENCH_TINY_MODEL, else the first candidate that
    exists (else the first candidate, for the scripts' own 'missing' message)."""
    if os.environ.get(TINY_MODEL_ENV):
        return Path(os.environ[TINY_MODEL_ENV]).resolve()
    return next((c for c in TINY_CANDIDATES if (c / "config.json").exists()), TINY_CANDIDATES[0])


# ------------------------------------------------------------------------------- subprocesses


def run_worker(script: Path, args: list[str], log_path: Path, env: dict | None = None) -> dict[str, Any]:
    """Run `python script args` as a child; return its result dict plus the child's own peak RSS.

    Peak RSS comes from os.wait4 on that child alone (ru_maxrss of RUSAGE_CHILDREN is a max over every
    child waited so far, so a second framework would inherit the first one's peak).
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(script), *args], stdout=log, stderr=subprocess.STDOUT,
                                env=full_env, cwd=str(REPO))
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log_path.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args[:2]} failed (rc={proc.returncode}); log {log_path}:\n{text[-4000:]}")
    lines = [line for line in text.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise RuntimeError(f"worker {args[:2]} printed no result; log {log_path}:\n{text[-4000:]}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024.0  # Linux: KiB
    result["child_cpu_s"] = usage.ru_utime + usage.ru_stime
    result["child_wall_s"] = time.perf_counter() - started
    # 1-minute load average before and after the child (it includes the child itself): other jobs share the box.
    result["load_before"], result["load_after"] = load_before, os.getloadavg()[0]
    return result


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """The machine-readable result of a bench run (settings, every child's numbers, the medians)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


THREADS_HELP = ("OMP_NUM_THREADS for the workers (0: torch default). 1: on a shared 2-core box, 2 OpenMP threads "
                "spin-wait on each other whenever another job takes a core")


def add_speed_arguments(parser, name: str, default_steps: str, quick: str) -> None:
    """The options every alignkit-vs-TRL speed bench takes (bench_sft, bench_rm, bench_dpo speed): which model, how
    many steps and repeats, threads per worker, where the work and the JSON (WORK_DIR/<name>.json) go."""
    parser.add_argument("--model", choices=["tiny", "smollm2", "both"], default="tiny")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--steps", type=int, default=0, help=f"optimizer steps per run (default: {default_steps})")
    parser.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant, interleaved; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--json", default=None, help=f"result file (default: WORK_DIR/{name}.json)")


def speed_run(args, name: str) -> tuple[list[str], Path, dict[str, Any]]:
    """(models to bench, the work dir (made), the report to fill) of a speed bench's arguments (add_speed_arguments)."""
    import tempfile

    models = ["tiny", "smollm2"] if args.model == "both" else [args.model]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix=f"{name}_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}  (worker logs there)", flush=True)
    return models, work, {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "threads": args.threads, "models": {}}


def finish_run(args, name: str, work: Path, report: dict[str, Any]) -> Path:
    """Write the report to --json (default WORK_DIR/<name>.json) and say where."""
    path = Path(args.json or work / f"{name}.json")
    write_json(path, report)
    print(f"\nJSON: {path}")
    return path


class PaddingCounter:
    """Counts the tokens a framework actually runs through the model vs the real (non-pad) tokens."""

    def __init__(self) -> None:
        self.forward_tokens = 0
        self.real_tokens = 0
        self.forwards = 0

    def add(self, forward: int, real: int) -> None:
        self.forward_tokens += int(forward)
        self.real_tokens += int(real)
        self.forwards += 1

    def facts(self) -> dict[str, float]:
        pad = 1.0 - self.real_tokens / self.forward_tokens if self.forward_tokens else 0.0
        return {"forward_tokens": self.forward_tokens, "real_tokens": self.real_tokens, "pad_fraction": pad,
                "training_forwards": self.forwards}


def emit_result(result: dict[str, Any]) -> None:
    """What a worker prints as its last line for run_worker to read."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def steady_rate(step_times: dict[int, float], warmup: int, examples_per_step: int) -> tuple[float, float]:
    """(examples/s, s/step) over the optimizer steps after `warmup` ones.

    step_times[k] = perf_counter() when step k had finished (k = 0: when training started).
    """
    last = max(step_times)
    if warmup >= last:
        raise ValueError(f"{last} timed steps: need more than warmup={warmup}")
    seconds = step_times[last] - step_times[warmup]
    steps = last - warmup
    return examples_per_step * steps / seconds, seconds / steps


# -------------------------------------------------------------------------------------- data


def preference_records(source: str, n: int, model: str, max_length: int) -> list[dict]:
    """The first n valid preference pairs of `source` (normalized by alignkit: prompt messages, strings)
    that keep some completion token of both sides at max_length, so neither framework drops any."""
    from alignkit.data.records import load_records
    from alignkit.models.loading import load_tokenizer
    from alignkit.stages.dpo import tokenize_pairs

    records, _ = load_records(source, "preference", errors=[])
    tokenizer = load_tokenizer(model)
    kept = [r for r in records if tokenize_pairs(tokenizer, [r], max_length)[0]][:n]
    if len(kept) < n:
        raise ValueError(f"{source}: only {len(kept)} usable pairs at max_length={max_length}, asked for {n}")
    return kept


def count_params(model_dir: str) -> int:
    """Parameters of the causal LM at `model_dir` (built on the meta device: nothing is loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def pair_tokens(records: list[dict], model: str, max_length: int) -> float:
    """Mean tokens of a pair's two sides (prompt + completion each) as alignkit's DPO tokenizes them: the work a
    plain forward does per pair, whatever a framework does to save it (MFU's model FLOPs)."""
    from alignkit.models.loading import load_tokenizer
    from alignkit.stages.dpo import tokenize_pairs

    pairs, _ = tokenize_pairs(load_tokenizer(model), records, max_length)
    return sum(len(p.chosen["input_ids"]) + len(p.rejected["input_ids"]) for p in pairs) / len(pairs)


def write_jsonl(records: list[dict], path: Path) -> Path:
    """Records as JSONL without meta (both frameworks read exactly these fields)."""
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}) + "\n")
    return path


# ------------------------------------------------------------------------------------ quality


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of independent values; (nan, nan) for none."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


def gold_quality(model_dir: str, prompts_spec: str, seed: int, max_new_tokens: int = 48) -> dict[str, Any]:
    """Mean gold reward (and its standard error) of `model_dir`'s responses to held-out task prompts,
    sampled at temperature 1 (one per prompt) and greedy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.data.records import load_records
    from alignkit.data.tasks import get_task, parse_task_spec
    from alignkit.rollout.sampling import generate

    task = get_task(parse_task_spec(prompts_spec)[0])
    records, _ = load_records(prompts_spec, "prompts")
    prompts = [r["prompt"] for r in records]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out: dict[str, Any] = {"model": model_dir, "n_prompts": len(prompts)}
    t0 = time.perf_counter()
    with torch.no_grad():
        for name, kwargs in (("sampled", {"do_sample": True, "temperature": 1.0}), ("greedy", {"do_sample": False})):
            gens = generate(model, tokenizer, prompts, n=1, max_new_tokens=max_new_tokens, seed=seed, **kwargs)
            golds = [task.gold_reward(p, g[0].text) for p, g in zip(prompts, gens)]
            out[name] = dict(zip(("mean", "stderr"), mean_stderr(golds)))
            out[name]["exact"] = sum(g == 1.0 for g in golds) / len(golds)
            out[name]["values"] = golds
    out["seconds"] = time.perf_counter() - t0
    return out


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of b - a over the same prompts (paired)."""
    return mean_stderr([y - x for x, y in zip(a, b)])


# ------------------------------------------------------------------------------------- tables


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Median of every numeric field over repeated runs of one variant, plus the examples/s range."""
    import statistics

    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    rates = [r["examples_per_s"] for r in runs]
    cpu_rates = [r["examples_per_cpu_s"] for r in runs]
    out.update(rate_min=min(rates), rate_max=max(rates), cpu_rate_min=min(cpu_rates), cpu_rate_max=max(cpu_rates),
               repeats=len(runs))
    return out


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the first column left-aligned (labels), the others right-aligned (numbers)."""
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def variant_table(medians: dict[str, dict[str, float]]) -> str:
    """Markdown table, one row per variant (label -> summarize() output)."""
    header = ["variant", "examples/s (min-max)", "examples/CPU-s (min-max)", "s/step", "peak RSS MB", "setup s",
              "ref pass s", "pad % of forward tokens", "load avg"]
    rows = [[label, f"{m['examples_per_s']:.2f} ({m['rate_min']:.2f}-{m['rate_max']:.2f})",
             f"{m['examples_per_cpu_s']:.2f} ({m['cpu_rate_min']:.2f}-{m['cpu_rate_max']:.2f})", f"{m['s_per_step']:.3f}",
             f"{m['peak_rss_mb']:.0f}", f"{m['setup_s']:.1f}", f"{m.get('ref_precompute_s', 0.0):.1f}",
             f"{100 * m.get('pad_fraction', 0.0):.1f}", f"{m['load_before']:.1f}-{m['load_after']:.1f}"]
            for label, m in medians.items()]
    return markdown_table(header, rows)


def ratio_lines(medians: dict[str, dict[str, float]], comparisons: list[tuple[str, str, str]],
                target: float | None = None) -> list[str]:
    """'- label: throughput xA (per CPU-s xB), peak memory xC' for each (ours, theirs, label) present."""
    lines = []
    for ours, theirs, label in comparisons:
        if ours not in medians or theirs not in medians:
            continue
        a, b = medians[ours], medians[theirs]
        speed = a["examples_per_s"] / b["examples_per_s"]
        cpu_speed = a["examples_per_cpu_s"] / b["examples_per_cpu_s"]
        memory = a["peak_rss_mb"] / b["peak_rss_mb"]
        verdict = ""
        if target is not None:
            met = speed >= target and memory <= 1.0
            verdict = f" -> target (>= x{target} at <= x1.00 memory) {'MET' if met else 'NOT met'}"
        lines.append(f"- {label}: throughput x{speed:.2f} (per CPU-second x{cpu_speed:.2f}), peak memory x{memory:.2f}{verdict}")
    return lines


# -------------------------------------------------------------------------------------- timers


def alignkit_step_timer() -> tuple[dict[int, float], dict[int, float]]:
    """Record (wall, CPU) time at each optimizer step of an alignkit stage run in this process.

    The shared loop logs step 0 right before its first step and logs or advances the run logger after each
    step, so wrapping RunLogger.log/advance times every step without touching the stage. Returns the two
    dicts it fills: step -> perf_counter() and step -> process_time()."""
    import alignkit.runtime.train_loop as loop

    times: dict[int, float] = {}
    cpu: dict[int, float] = {}
    log, advance = loop.RunLogger.log, loop.RunLogger.advance

    def mark(step: int) -> None:
        if step not in times:  # the final eval is logged at the last step again: keep the first mark
            times[step], cpu[step] = time.perf_counter(), time.process_time()

    def timed_log(self, step, metrics, show=True):
        mark(step)
        return log(self, step, metrics, show)

    def timed_advance(self, step):
        mark(step)
        return advance(self, step)

    loop.RunLogger.log, loop.RunLogger.advance = timed_log, timed_advance
    return times, cpu


def preimport_alignkit() -> None:
    """Import what an alignkit stage imports lazily (transformers models, peft) before the setup clock
    starts, as the TRL worker does by importing trl (which imports transformers and peft): setup_s then
    compares setup work, not import time (several seconds on a loaded 2-core box)."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import alignkit.models.loading  # noqa: F401
    import alignkit.models.lora  # noqa: F401
    import alignkit.models.reward  # noqa: F401


def trl_step_timer(times: dict[int, float], cpu: dict[int, float]):
    """A transformers TrainerCallback filling step -> perf_counter()/process_time() (0: train begin)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            times[0], cpu[0] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            times[state.global_step], cpu[state.global_step] = time.perf_counter(), time.process_time()

    return StepTimer()


def count_collated_padding(trainer, padding: PaddingCounter) -> None:
    """Wrap a transformers Trainer's data collator to count padded vs real tokens of each training batch."""
    collate = trainer.data_collator

    def counted(examples):
        batch = collate(examples)
        padding.add(batch["input_ids"].numel(), batch["attention_mask"].sum())
        return batch

    trainer.data_collator = counted


def count_packed_padding(module, padding: PaddingCounter) -> None:
    """Wrap the packing functions an alignkit module calls (`pack_for_forward`, `pack_shared_prefixes`; the names
    it looks up) to count padded vs real tokens of the training forwards; passes under no_grad (a precomputed
    reference, evaluation) are not counted. A shared prefix is one real token per position, however many
    responses read it."""
    import torch

    if hasattr(module, "pack_for_forward"):
        pack = module.pack_for_forward

        def counted_pack(examples, row_tokens, pad_id, device):
            batch = pack(examples, row_tokens, pad_id, device)
            if torch.is_grad_enabled():
                padding.add(batch["input_ids"].numel(), (batch["segment"] >= 0).sum())
            return batch

        module.pack_for_forward = counted_pack
    if hasattr(module, "pack_shared_prefixes"):
        shared = module.pack_shared_prefixes

        def counted_shared(*args, **kwargs):
            batch = shared(*args, **kwargs)
            if torch.is_grad_enabled():
                padding.add(batch["input_ids"].numel(), len({i for where in batch["token_at"] for i in where}))
            return batch

        module.pack_shared_prefixes = counted_shared


def run_alignkit(stage: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], list[float]]:
    """(summary, training losses per logged step) of `alignkit <stage>` run in this process."""
    from alignkit.cli import run_stage

    summary = run_stage(stage, [f"{k}={'null' if v is None else v}" for k, v in overrides.items()])
    rows = [json.loads(line) for line in (Path(overrides["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return summary, [r["loss"] for r in rows if "loss" in r]


def trl_chat_pairs(data_file: str):
    """(records, datasets.Dataset) of the pairs file as TRL's conversational preference format."""
    from datasets import Dataset

    rows = [json.loads(line) for line in Path(data_file).read_text().splitlines()]
    return rows, Dataset.from_list([
        {"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows
    ])


def rates(times: dict[int, float], cpu: dict[int, float], warmup: int, batch: int) -> dict[str, float]:
    """examples/s, examples/CPU-s and s/step over the steps after `warmup`."""
    rate, per_step = steady_rate(times, warmup, batch)
    cpu_rate, _ = steady_rate(cpu, warmup, batch)
    return {"examples_per_s": rate, "examples_per_cpu_s": cpu_rate, "s_per_step": per_step}
