"""`alignkit iterate` end to end on the tiny model: round bookkeeping, the label budget, and resume after a
stop at every step of a round (and a kill inside one) giving the uninterrupted run's result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.cli import run_stage
from alignkit.config import ConfigError
from tests.helpers import max_weight_diff, read_jsonl, run_cli

STEP_OVERRIDES = [
    "label.sampling.max_new_tokens=12", "probe.sampling.max_new_tokens=12",
    "rm.max_length=64", "rm.batch_size=8", "rm.micro_batch_size=8", "rm.warmup_steps=0",
    "policy.rollout_batch_size=2", "policy.samples_per_prompt=4", "policy.mini_batch_size=8",
    "policy.micro_batch_size=8", "policy.forward_batch_size=8", "policy.sampling.max_new_tokens=12",
    "policy.max_length=64", "policy.eval_data=task:sort/prompts_eval?n=4", "policy.save_steps=1",
    "policy.eval_samples_per_prompt=1",
    "eval.n_samples=1", "eval.greedy=false", "eval.sampling.max_new_tokens=12",
]


def iterate_args(sft: Path, out: Path, *extra: str) -> list[str]:
    return ["iterate", f"sft_model={sft}", "rm_model=null", f"output_dir={out}", "config_dir=configs/tiny",
            "rounds=1", "prompts=task:sort/prompts?n=64&seed=21", "prompts_per_round=8", "n=3",
            "initial_label_budget=8", "label_budget=8", "rm_epochs=1", "policy_method=grpo", "policy_steps=2",
            "eval_prompts=task:sort/prompts_eval?n=8", "probe_prompts=task:sort/prompts?n=8&seed=77", "probe_pairs=8",
            f"overrides={json.dumps(STEP_OVERRIDES)}", *extra]


def comparable(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k != "rm"} for line in lines]  # rm: a path under output_dir


def check_full_run(out: Path) -> list[dict]:
    """Round bookkeeping of an uninterrupted 1-round run; returns its rounds.jsonl lines."""
    lines = read_jsonl(out / "rounds.jsonl")
    assert [line["round"] for line in lines] == [0, 1]
    assert [line["labels_total"] for line in lines] == [8, 16] and lines[1]["labels_round"] == 8
    label = json.loads((out / "round-1" / "label" / "summary.json").read_text())
    assert label["train_labels_used"] == 8 and len(read_jsonl(out / "round-1/label/pairs.jsonl")) <= 8
    rm_config = (out / "round-1" / "rm" / "config.yaml").read_text()
    assert "round-0/label/pairs.jsonl" in rm_config and "round-1/label/pairs.jsonl" in rm_config  # all labels so far
    assert f"model: {out / 'round-0' / 'rm' / 'final'}" in rm_config  # rm_refresh=continue
    policy_config = (out / "round-1" / "policy" / "config.yaml").read_text()
    assert f"model: {out / 'round-1' / 'rm' / 'final'}" in policy_config  # the policy round uses the refreshed RM
    for key in ("gold_reward", "rm_gold_accuracy", "proxy_heldout", "proxy_win_rate", "proxy_gold_gap", "kl", "alarms"):
        assert key in lines[1], key
    assert lines[0]["proxy_gold_gap"] == 0.0 and lines[1]["win_rate_gold"] - lines[1]["proxy_win_rate"] == \
        pytest.approx(-lines[1]["proxy_gold_gap"])
    assert (out / "plots" / "rounds.png").stat().st_size > 1000
    assert max_weight_diff(out / "final", out / "round-1" / "policy" / "final") == 0.0
    return lines


def resume_until_done(sft: Path, out: Path, stops: list[str], kill_policy: bool) -> None:
    """Run into `out` stopping after each step of `stops` in turn (and, with kill_policy, SIGKILL the policy round
    at its step 2 before it finishes), then run to the end; a finished step is never rerun."""
    first_done = None
    for step in stops:
        if kill_policy and step == "1/policy":
            killed = run_cli(iterate_args(sft, out), env={"ALIGNKIT_KILL_AT_STEP": "2"})
            assert killed.returncode != 0 and not (out / "round-1" / "policy" / "summary.json").exists()
            assert (out / "round-1" / "policy" / "checkpoints" / "step-1").is_dir()
        stopped = run_cli(iterate_args(sft, out), env={"ALIGNKIT_ITERATE_STOP_AFTER": step})
        assert stopped.returncode != 0 and f"stopped after round-{step}" in stopped.stderr, stopped.stderr[-2000:]
        assert not (out / "final").exists()
        first_done = first_done or (out / "round-0" / "label" / "summary.json").stat().st_mtime_ns
    resumed = run_cli(iterate_args(sft, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "round-0" / "label" / "summary.json").stat().st_mtime_ns == first_done  # never redone


def test_round_bookkeeping_and_resume_after_a_stop_and_a_kill(pretrained_tiny: Path, tmp_path: Path):
    sft = pretrained_tiny / "final"
    full = run_cli(iterate_args(sft, tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    lines = check_full_run(tmp_path / "full")
    # stopped between two steps (after the refresh), then killed inside the policy round, then resumed
    resume_until_done(sft, tmp_path / "stopped", ["1/rm", "1/policy"], kill_policy=True)
    assert comparable(read_jsonl(tmp_path / "stopped" / "rounds.jsonl")) == comparable(lines)
    assert max_weight_diff(tmp_path / "stopped" / "final", tmp_path / "full" / "final") < 1e-6


@pytest.mark.slow
def test_resume_after_a_stop_at_every_step_of_a_round(pretrained_tiny: Path, tmp_path: Path):
    """Covered fast in part by test_round_bookkeeping_and_resume_after_a_stop_and_a_kill (one stop, one kill)."""
    sft = pretrained_tiny / "final"
    full = run_cli(iterate_args(sft, tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    resume_until_done(sft, tmp_path / "stopped", ["0/label", "0/rm", "0/probe", "0/eval", "1/label", "1/rm",
                                                   "1/policy", "1/probe", "1/eval"], kill_policy=True)
    assert comparable(read_jsonl(tmp_path / "stopped" / "rounds.jsonl")) == comparable(
        read_jsonl(tmp_path / "full" / "rounds.jsonl"))
    assert max_weight_diff(tmp_path / "stopped" / "final", tmp_path / "full" / "final") < 1e-6


@pytest.mark.parametrize("args, message", [
    (["rm_refresh=sometimes"], "rm_refresh must be one of"),
    (["policy_method=sgd"], "policy_method must be one of"),
    (["select=ensemble"], "rm_ensemble >= 2"),
    (["rm_model=null", "initial_label_budget=0"], "round 0 needs a reward model"),
    (["label_budget=0"], "set label_budget > 0"),
    (["overrides=[\"ppo.lr=1\"]"], "unknown steps"),
])
def test_bad_config(tmp_path: Path, args: list[str], message: str):
    with pytest.raises(ConfigError, match=message):
        run_stage("iterate", [f"output_dir={tmp_path}", "rm_model=some/rm", *args])
