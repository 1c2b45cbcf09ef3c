"""`alignkit pipeline`: pretrain -> SFT -> label -> reward model -> DPO / RRHF / PPO / GRPO / RAFT / best-of-n -> eval -> report.

Each stage runs as its own process (`python -m alignkit <stage>`, or under `launcher`) with its config
file from `config_dir`, its output in `output_dir/<stage>/`, and its inputs wired from earlier stages
(the SFT model starts from the pretrained one; `label` ranks the SFT model's own samples, as InstructGPT's
labelers did, and the reward model learns from those rankings; DPO trains on the labelled pairs; PPO, RAFT
and best-of-n use the reward model...). A stage whose `summary.json` exists (written last, when the stage
completed) is skipped, and every stage runs with resume=true, so rerunning the
pipeline after a crash continues where it stopped. Separate processes also give each stage its own
peak-memory figure. With `jobs` > 1, stages whose inputs are ready run at the same time (after `rm`, the
policy stages depend on nothing but sft, label and rm), each with its share of the CPU threads: on 2 cores
two 1-thread processes do about 1.25x the work of one 2-thread process on these small models. Then each model
the report evaluates is evaluated on its own as soon as it exists (eval_part_steps, into `eval`'s cache_dir),
beside the stages still running, and the final `eval` reads them back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from alignkit.config import ConfigError, PipelineConfig
from alignkit.runtime.launch import StageProcess, split_step_overrides, start_stage_process, wait_stage_processes
from alignkit.runtime.launch import run_stage_process as run_cli_stage

# Inputs each stage takes from earlier stages: config key -> path under the pipeline directory.
WIRING: dict[str, dict[str, str]] = {
    "sft": {"model": "pretrain/final"},
    "label": {"model": "sft/final"},
    "rm": {"model": "sft/final", "train_data": "label/ranked.jsonl"},
    "dpo": {"model": "sft/final", "train_data": "label/pairs.jsonl"},
    "rrhf": {"model": "sft/final", "train_data": "label/ranked.jsonl", "reward.model": "rm/final"},
    "ppo": {"model": "sft/final", "reward.model": "rm/final"},
    "grpo": {"model": "sft/final", "reward.model": "rm/final"},
    "raft": {"model": "sft/final", "reward.model": "rm/final"},
    "best_of_n": {"model": "sft/final", "reward.model": "rm/final"},
    "iterate": {"sft_model": "sft/final", "rm_model": "rm/final"},
}


def cli_name(stage: str) -> str:
    return stage.replace("_", "-")


def stage_available(stage: str) -> bool:
    """Whether this installation has the stage (stages land one by one)."""
    from alignkit.cli import STAGES

    name = cli_name(stage) if cli_name(stage) in STAGES else stage
    return name in STAGES and importlib.util.find_spec(STAGES[name][0]) is not None


def stage_done(stage_dir: Path) -> bool:
    """summary.json is the last file a stage writes, so it marks a complete stage (with or without final/)."""
    return (stage_dir / "summary.json").exists()


def stage_overrides(stage: str, cfg: PipelineConfig, done: dict[str, Path], extra: list[str]) -> list[str]:
    """output_dir, seed, resume and the wiring from earlier stages, then the user's overrides."""
    from alignkit.cli import STAGES
    from alignkit.config import field_help

    out = Path(cfg.output_dir)
    keys = {k for k, *_ in field_help(STAGES[cli_name(stage) if cli_name(stage) in STAGES else stage][1])}
    args = [f"output_dir={out / stage}", f"seed={cfg.seed}"] + (["resume=true"] if "resume" in keys else [])
    for key, upstream in WIRING.get(stage, {}).items():
        source = upstream.split("/")[0]
        if key in keys and source in done:
            args.append(f"{key}={out / upstream}")
    # The user's word comes last and wins.
    return args + extra


def stage_inputs(stage: str, earlier: list[str]) -> set[str]:
    """The earlier stages whose outputs `stage` takes (WIRING): it starts when they are complete."""
    return {upstream.split("/")[0] for upstream in WIRING.get(stage, {}).values()} & set(earlier)


def thread_share(jobs: int) -> int:
    """CPU threads of one of `jobs` stages running at once: the cores (or OMP_NUM_THREADS) split evenly."""
    cores = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() else os.cpu_count() or 1
    return max(1, cores // jobs)


@dataclass
class Step:
    """One process of the pipeline: a stage, or (with jobs > 1) the evaluation of one policy as soon as it exists."""

    name: str  # a stage name, or eval:<method>
    directory: Path  # complete when its summary.json exists (the last file a step writes)
    needs: set[str]  # the steps whose outputs it takes: it starts when they are complete


def eval_part_steps(cfg: PipelineConfig, stages: list[str]) -> list[Step]:
    """With jobs > 1: one evaluation step per model the report evaluates (base, sft, each policy with a final/),
    each into the eval cache as soon as its stage, the reference (sft) and the reward model (rm) are complete,
    beside the stages still running. The pipeline's `eval` then finds every model in the cache and only builds
    the summary, alarms and plots. With jobs=1 nothing would run beside it: eval evaluates every model itself."""
    from alignkit.stages import POLICY_METHODS

    parts = Path(cfg.output_dir) / "eval" / "parts"
    if cfg.jobs <= 1 or not cfg.evaluate or (parts.parent / "summary.json").exists():  # (that eval is complete)
        return []
    return [Step(f"eval:{name}", parts / name, {stage} | ({"sft", "rm"} & set(stages)))
            for stage, name in POLICY_METHODS.items() if stage in stages]


def run_stages(cfg: PipelineConfig, stages: list[str], per_stage: dict[str, list[str]]) -> dict[str, Path]:
    """Run every stage not yet complete (and eval_part_steps), up to cfg.jobs at once, each as soon as the
    steps it takes inputs from are complete, in list order except that a stage others wait on goes first and
    alone (with jobs=1: one after the other, in order). Returns {stage: its directory} in pipeline order."""
    out = Path(cfg.output_dir)
    steps = [Step(s, out / s, stage_inputs(s, stages[:i])) for i, s in enumerate(stages)] + eval_part_steps(cfg, stages)
    finished = {step.name for step in steps if stage_done(step.directory)}
    for stage in stages:
        if stage in finished:
            print(f"[pipeline] {stage}: already complete in {out / stage}, skipped", file=sys.stderr, flush=True)
    running: dict[str, StageProcess] = {}

    def complete() -> dict[str, Path]:
        return {s: out / s for s in stages if s in finished}

    def start_ready() -> list[StageProcess]:
        pending = [step for step in steps if step.name not in finished]
        # A stage that later ones wait on (sft, label, rm) is the critical path: it runs alone, with every
        # thread (1.6x one thread's speed on 2 cores), rather than beside another at half the threads.
        blocking = {step.name for step in pending if any(step.name in t.needs for t in pending if t.name in stages)}
        ready = sorted((step for step in pending if step.name not in running and step.needs <= finished),
                       key=lambda step: step.name not in blocking)
        started = []
        for step in ready:
            if len(running) >= cfg.jobs or (running and (step.name in blocking or blocking & set(running))):
                break
            command = step_command(cfg, step, complete(), per_stage)
            if command is None:  # nothing to evaluate (best-of-n has no final/)
                finished.add(step.name)
                continue
            # The critical path keeps every thread; every other step its share (the sharing pays on CPU, see
            # above), even when it happens to run alone: a step's thread count, and so its float sums and numbers,
            # must not depend on the schedule (a resumed pipeline reports the same numbers as an uninterrupted one).
            alone = cfg.jobs == 1 or step.name in blocking
            threads = None if alone else thread_share(cfg.jobs)
            cli, config_file, args = command
            running[step.name] = start_stage_process(cli, step.name, config_file, args, cfg.launcher,
                                                     step.directory / "log.txt", threads=threads,
                                                     prefix=f"[{step.name}] " if cfg.jobs > 1 else "")
            started.append(running[step.name])
        return started

    def on_done(process: StageProcess) -> list[StageProcess]:
        finished.add(process.name)
        running.pop(process.name)
        return start_ready()

    first = start_ready()
    if first:
        wait_stage_processes(first, on_done)
    return complete()


def step_command(cfg: PipelineConfig, step: Step, done: dict[str, Path],
                 per_stage: dict[str, list[str]]) -> tuple[str, Path, list[str]] | None:
    """(alignkit subcommand, config file, overrides) of a step; None for an evaluation with no model to evaluate."""
    if not step.name.startswith("eval:"):
        args = stage_overrides(step.name, cfg, done, per_stage.get(step.name, []))
        return cli_stage_name(step.name), Path(cfg.config_dir) / f"{step.name}.yaml", args
    from alignkit.eval.report import eval_part_args

    args = eval_part_args(cfg, done, step.name.split(":", 1)[1], step.directory)
    return None if args is None else ("eval", Path(cfg.config_dir) / "eval.yaml", args + per_stage.get("eval", []))


def cli_stage_name(stage: str) -> str:
    from alignkit.cli import STAGES

    return cli_name(stage) if cli_name(stage) in STAGES else stage


def run_stage_process(stage: str, config_file: Path, args: list[str], launcher: str, log_path: Path) -> None:
    """Run one stage as its own process (runtime.launch.run_stage_process) under its CLI name."""
    run_cli_stage(cli_stage_name(stage), stage, config_file, args, launcher, log_path)


def evaluate_and_report(cfg: PipelineConfig, done: dict[str, Path], stage_summaries: dict, notes: list[str],
                        eval_overrides: list[str]) -> dict:
    """Run `alignkit eval` on every policy of the pipeline (unless its summary exists) and build the report
    (json, md, plots, html: eval.report.report_from_eval)."""
    from alignkit.eval.report import eval_stage_args, report_from_eval

    out = Path(cfg.output_dir)
    if not (out / "eval" / "summary.json").exists():
        (out / "eval").mkdir(parents=True, exist_ok=True)
        run_stage_process("eval", Path(cfg.config_dir) / "eval.yaml", eval_stage_args(cfg, done) + eval_overrides,
                          cfg.launcher, out / "eval" / "log.txt")
    return report_from_eval(cfg, done, stage_summaries, notes)


def run(cfg: PipelineConfig) -> dict:
    started = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from alignkit.config import save_config

    save_config(cfg, out / "config.yaml")
    per_stage = split_step_overrides(cfg.overrides, "pipeline", "stage")
    unknown = set(per_stage) - set(cfg.stages) - {"eval"}
    if unknown:
        raise ConfigError(f"overrides name stages not in the pipeline: {sorted(unknown)}")
    if cfg.jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {cfg.jobs}")

    notes: list[str] = []
    stages = []
    for stage in cfg.stages:
        config_file = Path(cfg.config_dir) / f"{stage}.yaml"
        if not stage_available(stage) or not config_file.exists():
            why = "not implemented yet" if not stage_available(stage) else f"no {config_file}"
            notes.append(f"{stage}: skipped ({why})")
            print(f"[pipeline] {stage}: skipped ({why})", file=sys.stderr, flush=True)
        else:
            stages.append(stage)
    done = run_stages(cfg, stages, per_stage)

    stage_summaries = {s: json.loads((d / "summary.json").read_text()) for s, d in done.items()}
    report: dict = {"stages": stage_summaries, "methods": {}, "alarms": [], "notes": notes}
    if cfg.evaluate and done:
        report = evaluate_and_report(cfg, done, stage_summaries, notes, per_stage.get("eval", []))
    report["wall_s"] = time.time() - started
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"[pipeline] done in {report['wall_s']:.0f}s: {out / 'report.json'}", file=sys.stderr, flush=True)
    return report
