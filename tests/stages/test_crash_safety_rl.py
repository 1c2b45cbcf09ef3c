"""Issue 12, sections 2 and 3 for the stages with loops of their own (ppo, raft): Ctrl-C / SIGTERM stop
with a checkpoint that resumes to the uninterrupted run's weights, and non-finite rewards or losses are
skipped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import load_weights, max_weight_diff, run_cli
from tests.stages.test_ppo import ppo_overrides
from tests.stages.test_raft import iteration_lines, raft_overrides


def test_ppo_sigterm_checkpoints_and_resumes_exactly(pretrained_tiny: Path, tmp_path: Path):
    # adaptive KL and running reward normalisation carry state across steps: the interruption checkpoint holds it
    common = ppo_overrides(pretrained_tiny / "final", max_steps=4, adaptive_kl="true", kl_target=0.5, kl_horizon=20,
                           reward_norm="running")
    full = run_cli(["ppo", *common, f"output_dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "stopped"
    res = run_cli(["ppo", *common, f"output_dir={out}"], env={"ALIGNKIT_SIGNAL_AT_STEP": "1:TERM"})
    assert res.returncode == 143, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert "interrupted at step 2" in res.stderr.strip().splitlines()[-1]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"] and not (out / "final").exists()

    resumed = run_cli(["ppo", *common, f"output_dir={out}", "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-2 at step 2/4" in resumed.stderr
    assert max_weight_diff(tmp_path / "full" / "final", out / "final") < 1e-5
    assert max_weight_diff(tmp_path / "full" / "final_critic", out / "final_critic") < 1e-5


def test_ppo_nan_reward_skips_the_update_and_counts_it(pretrained_tiny: Path, tmp_path: Path):
    out = tmp_path / "nan"
    res = run_cli(["ppo", *ppo_overrides(pretrained_tiny / "final", reward_norm="running"), f"output_dir={out}"],
                  env={"ALIGNKIT_NAN_AT_STEP": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step 2: non-finite rewards, advantages or value targets; optimizer step skipped" in res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nonfinite_steps"] == 1
    assert all(torch.isfinite(w).all() for w in load_weights(out / "final").values())
    # the NaN never reached the running reward statistics: later steps still have finite rewards and losses
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in steps if m.get("step") == 3 and "policy_loss" in m][0]
    assert all(v is not None for k, v in last.items() if k in ("policy_loss", "value_loss", "score"))


def test_raft_interrupted_inside_an_iteration_resumes_on_its_own_samples(pretrained_tiny: Path, tmp_path: Path):
    common = raft_overrides(pretrained_tiny / "final", iterations=3)
    full = run_cli(["raft", *common, f"output_dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "stopped"
    # 0-based step 2 is the first step of iteration 1 (2 steps each): the checkpoint lands inside it
    res = run_cli(["raft", *common, f"output_dir={out}"], env={"ALIGNKIT_SIGNAL_AT_STEP": "2"})
    assert res.returncode == 130, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "interrupted at step 3" in res.stderr
    state = json.loads((out / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["iteration"] == 1 and state["partial"]["inner_step"] == 1

    resumed = run_cli(["raft", *common, f"output_dir={out}", "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max_weight_diff(tmp_path / "full" / "final", out / "final") < 1e-5
    assert [m["iteration"] for m in iteration_lines(out)] == [0, 1, 2]
    for k in range(3):
        assert (out / f"iter-{k}" / "kept.jsonl").read_text() == (tmp_path / "full" / f"iter-{k}" / "kept.jsonl").read_text()
    full_lines, resumed_lines = iteration_lines(tmp_path / "full"), iteration_lines(out)
    assert resumed_lines[1]["train_loss"] == pytest.approx(full_lines[1]["train_loss"], rel=1e-5)


def test_raft_nan_loss_is_skipped_and_counted(pretrained_tiny: Path, tmp_path: Path):
    out = tmp_path / "nan"
    res = run_cli(["raft", *raft_overrides(pretrained_tiny / "final"), f"output_dir={out}"],
                  env={"ALIGNKIT_NAN_AT_STEP": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["nonfinite_steps"] == 1
    assert all(torch.isfinite(w).all() for w in load_weights(out / "final").values())
