"""`alignkit pipeline` end to end on the built-in task with tiny step counts: stages wired, report
written, and a rerun skips what is complete."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from alignkit.cli import run_stage

QUICK = [
    "pretrain.max_steps=30", "pretrain.train_data=task:sort/pretrain?n=1500", "pretrain.batch_size=16",
    "pretrain.max_length=64", "pretrain.save_steps=0",
    "sft.max_steps=30", "sft.train_data=task:sort/sft?n=600", "sft.batch_size=16", "sft.max_length=64", "sft.save_steps=0",
    "label.train_data=task:sort/prompts?n=48", "label.sampling.max_new_tokens=16",
    "rm.max_steps=6", "rm.batch_size=8", "rm.save_steps=0",
    "dpo.max_steps=4", "dpo.batch_size=8", "dpo.save_steps=0",
    "rrhf.max_steps=4", "rrhf.train_data=task:sort/ranked?n=100", "rrhf.batch_size=8", "rrhf.save_steps=0",
    "ppo.max_steps=2", "ppo.rollout_batch_size=8", "ppo.samples_per_prompt=1", "ppo.mini_batch_size=8",
    "ppo.micro_batch_size=8", "ppo.eval_data=task:sort/prompts_eval?n=8", "ppo.eval_steps=1", "ppo.save_steps=0",
    "ppo.sampling.max_new_tokens=16",
    "grpo.max_steps=2", "grpo.rollout_batch_size=4", "grpo.samples_per_prompt=2", "grpo.mini_batch_size=8",
    "grpo.micro_batch_size=8", "grpo.eval_data=task:sort/prompts_eval?n=8", "grpo.eval_steps=1", "grpo.save_steps=0",
    "grpo.sampling.max_new_tokens=16",
    "raft.iterations=2", "raft.prompts_per_iteration=8", "raft.samples_per_prompt=2", "raft.keep_top_k=1",
    "raft.batch_size=8", "raft.micro_batch_size=8", "raft.sampling.max_new_tokens=16",
    "best_of_n.train_data=task:sort/prompts_eval?n=16", "best_of_n.n=2", "best_of_n.sampling.max_new_tokens=16",
    "iterate.rounds=1", "iterate.prompts_per_round=8", "iterate.label_budget=8", "iterate.policy_steps=1",
    "iterate.probe_pairs=8", "iterate.probe_prompts=task:sort/prompts?n=8&seed=77",
    "iterate.eval_prompts=task:sort/prompts_eval?n=8",
    "iterate.overrides=" + json.dumps([
        "label.sampling.max_new_tokens=16", "probe.sampling.max_new_tokens=16", "rm.batch_size=8", "rm.warmup_steps=0",
        "policy.rollout_batch_size=4", "policy.samples_per_prompt=2", "policy.mini_batch_size=8",
        "policy.micro_batch_size=8", "policy.eval_data=task:sort/prompts_eval?n=4", "policy.save_steps=0",
        "policy.sampling.max_new_tokens=16", "eval.n_samples=1", "eval.greedy=false", "eval.sampling.max_new_tokens=16"]),
    "eval.n_samples=2", "eval.prompts=task:sort/prompts_eval?n=40", "eval.heldout_text=task:sort/pretrain?n=20&seed=99",
    "eval.pairs=task:sort/prefs?n=40&seed=99", "eval.sampling.max_new_tokens=16",
]


def test_pipeline_runs_every_available_stage_and_reports(tmp_path: Path):
    out = tmp_path / "pipe"
    # the default pipeline's order and jobs: two stages at once once their inputs are ready
    stages = ["pretrain", "sft", "label", "rm", "iterate", "ppo", "rrhf", "dpo", "best_of_n", "grpo", "raft"]
    report = run_stage("pipeline", [f"output_dir={out}", f"stages=[{', '.join(stages)}]", "jobs=2",
                                    f"overrides={json.dumps(QUICK)}"])
    ran = [s for s in stages if (out / s / "summary.json").exists()]
    assert ran == stages
    # each stage writes config.yaml when it starts and summary.json when it ends: some ran at the same time,
    # and none started before the stages it takes inputs from had ended
    span = {s: ((out / s / "config.yaml").stat().st_mtime, (out / s / "summary.json").stat().st_mtime) for s in stages}
    assert any(span[a][0] < span[b][1] and span[b][0] < span[a][1] for a in stages for b in stages if a < b)
    for stage, inputs in {"sft": ["pretrain"], "label": ["sft"], "rm": ["label"], "dpo": ["label"],
                          "iterate": ["rm"], "ppo": ["rm"], "rrhf": ["rm", "label"]}.items():
        assert all(span[i][1] <= span[stage][0] for i in inputs), stage
    # each model was evaluated on its own as soon as its stage (and sft, rm) had ended, beside the stages still
    # running; the pipeline's eval then read every one back instead of evaluating it again
    eval_log = (out / "eval" / "log.txt").read_text()
    for stage, method in {"pretrain": "base", "sft": "sft", "dpo": "dpo", "rrhf": "rrhf", "ppo": "ppo", "grpo": "grpo",
                          "raft": "raft", "iterate": "iterate"}.items():
        part = out / "eval" / "parts" / method
        assert (part / "summary.json").exists(), method
        assert max(span[stage][1], span["rm"][1]) <= (part / "config.yaml").stat().st_mtime, method
        assert f"eval: {method} read from" in eval_log and f"eval: {method} done" not in eval_log
    assert not (out / "eval" / "parts" / "best_of_n").exists()  # no model: its row comes from its summary
    # the report keeps the methods' order, not the order the stages ran in
    assert [m for m in report["methods"] if m not in ("sft", "base")][:5] == ["dpo", "rrhf", "ppo", "grpo", "raft"]
    # wiring: SFT started from the pretrained model; the RM from SFT, on the labelled SFT samples; DPO on the
    # labelled pairs; the RL methods from SFT with the pipeline's reward model
    sft_cfg = (out / "sft" / "config.yaml").read_text()
    assert f"model: {out / 'pretrain' / 'final'}" in sft_cfg
    rm_cfg = (out / "rm" / "config.yaml").read_text()
    assert f"model: {out / 'sft' / 'final'}" in rm_cfg and f"train_data: {out / 'label' / 'ranked.jsonl'}" in rm_cfg
    assert f"train_data: {out / 'label' / 'pairs.jsonl'}" in (out / "dpo" / "config.yaml").read_text()
    for stage in ("ppo", "grpo", "raft", "best_of_n"):
        assert yaml.safe_load((out / stage / "config.yaml").read_text())["reward"]["model"] == str(out / "rm" / "final")
    iterate_cfg = yaml.safe_load((out / "iterate" / "config.yaml").read_text())  # round 0: the pipeline's SFT and RM
    assert iterate_cfg["sft_model"] == str(out / "sft" / "final") and iterate_cfg["rm_model"] == str(out / "rm" / "final")

    saved = json.loads((out / "report.json").read_text())
    assert set(saved) >= {"stages", "methods", "alarms"}
    assert set(saved["methods"]) == {"base", "sft", "dpo", "rrhf", "ppo", "grpo", "raft", "best_of_n", "iterate"}
    # best-of-n is a procedure, not a model: its row comes from its own summary, with its KL estimated from
    # the samples and the analytic upper bound beside it
    bon = saved["methods"]["best_of_n"]
    assert bon["kl_upper_bound"] == pytest.approx(math.log(2) - 1 / 2)
    assert bon["kl"] == saved["stages"]["best_of_n"]["kl_estimate"] and 0.0 <= bon["kl"] <= bon["kl_upper_bound"]
    assert saved["methods"]["best_of_n"]["gold_reward"] == saved["stages"]["best_of_n"]["gold_reward"]
    for method in saved["methods"].values():
        assert method["wall_s"] > 0
    # SFT learned the task's answer format; the base model never saw a chat
    assert saved["methods"]["sft"]["gold_reward"] > saved["methods"]["base"]["gold_reward"]
    assert saved["methods"]["sft"]["proxy_reward"] is not None  # the RM scored it
    assert (out / "report.md").read_text().startswith("# alignkit pipeline report")
    assert (out / "plots" / "training_curves.png").exists()
    assert (out / "plots" / "proxy_gold_over_training.png").exists()  # PPO rollouts / RAFT iterations

    # A rerun skips every complete stage (and the finished eval) and rewrites the same report.
    again = run_stage("pipeline", [f"output_dir={out}", f"stages=[{', '.join(stages)}]", "jobs=2",
                                   f"overrides={json.dumps(QUICK)}"])
    assert again["methods"] == report["methods"]
