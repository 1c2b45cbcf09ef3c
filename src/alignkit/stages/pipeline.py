"""`alignkit pipeline`: pretrain -> SFT -> label -> reward model -> DPO / RRHF / PPO / GRPO / RAFT / best-of-n -> eval -> report.

Each stage runs as its own process (`python -m alignkit <stage>`, or under `launcher`) with its config
file from `config_dir`, its output in `output_dir/<stage>/`, and its inputs wired from earlier stages
(the SFT model starts from the pretrained one; `label` ranks the SFT model's own samples, as InstructGPT's
labelers did, and the reward model learns from those rankings; DPO trains on the labelled pairs; PPO, RAFT
and best-of-n use the reward model...). A stage whose `summary.json` exists (written last, when the stage
completed) is skipped, and every stage runs with resume=true, so rerunning the
pipeline after a crash continues where it stopped. Separate processes also give each stage its own
peak-memory figure.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

from alignkit.config import ConfigError, PipelineConfig
from alignkit.runtime.launch import run_stage_process as run_cli_stage
from alignkit.runtime.launch import split_step_overrides

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


def run_stage_process(stage: str, config_file: Path, args: list[str], launcher: str, log_path: Path) -> None:
    """Run one stage as its own process (runtime.launch.run_stage_process) under its CLI name."""
    from alignkit.cli import STAGES

    run_cli_stage(cli_name(stage) if cli_name(stage) in STAGES else stage, stage, config_file, args, launcher, log_path)


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

    done: dict[str, Path] = {}
    notes: list[str] = []
    for stage in cfg.stages:
        config_file = Path(cfg.config_dir) / f"{stage}.yaml"
        if not stage_available(stage) or not config_file.exists():
            why = "not implemented yet" if not stage_available(stage) else f"no {config_file}"
            notes.append(f"{stage}: skipped ({why})")
            print(f"[pipeline] {stage}: skipped ({why})", file=sys.stderr, flush=True)
            continue
        stage_dir = out / stage
        if stage_done(stage_dir):
            print(f"[pipeline] {stage}: already complete in {stage_dir}, skipped", file=sys.stderr, flush=True)
        else:
            stage_dir.mkdir(parents=True, exist_ok=True)
            args = stage_overrides(stage, cfg, done, per_stage.get(stage, []))
            run_stage_process(stage, config_file, args, cfg.launcher, stage_dir / "log.txt")
        done[stage] = stage_dir

    stage_summaries = {s: json.loads((d / "summary.json").read_text()) for s, d in done.items()}
    report: dict = {"stages": stage_summaries, "methods": {}, "alarms": [], "notes": notes}
    if cfg.evaluate and done:
        report = evaluate_and_report(cfg, done, stage_summaries, notes, per_stage.get("eval", []))
    report["wall_s"] = time.time() - started
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"[pipeline] done in {report['wall_s']:.0f}s: {out / 'report.json'}", file=sys.stderr, flush=True)
    return report
