"""`accelerate launch --num_processes 2` on CPU (gloo) runs the same PPO as one process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import max_weight_diff, one_and_two_processes
from tests.stages.test_ppo import ppo_overrides, read_jsonl

pytestmark = pytest.mark.dist


def test_ppo_two_processes_equal_one(pretrained_tiny: Path, tmp_path: Path):
    # A rollout of 4 prompts x 2 samples in chunks of 3 prompts (chunk 0 on process 0, chunk 1 on process 1);
    # mini-batches of 4 sequences = 2 processes x 1 micro-batch of 2, against 1 process x 2 micro-batches.
    common = ppo_overrides(pretrained_tiny / "final", max_steps=3, mini_batch_size=4, micro_batch_size=2,
                           lr=5e-4, critic_lr=5e-4, eval_steps=2)
    s1, s2 = one_and_two_processes("ppo", common, tmp_path)

    assert s1["num_processes"] == 1 and s2["num_processes"] == 2
    assert s1["samples"] == s2["samples"] == 3 * 8
    for key in ("eval_reward_before", "eval_gold_reward_before", "eval_length_before"):
        assert s2[key] == pytest.approx(s1[key], abs=1e-9), key  # the same samples, drawn in the same chunks
    for key in ("eval_gold_reward", "eval_kl", "eval_length", "reward_last", "kl"):
        assert s2[key] == pytest.approx(s1[key], rel=1e-4, abs=1e-5), key
    train1 = [m for m in read_jsonl(tmp_path / "one" / "metrics.jsonl") if "policy_loss" in m]
    train2 = [m for m in read_jsonl(tmp_path / "two" / "metrics.jsonl") if "policy_loss" in m]
    assert len(train1) == len(train2) == 3
    for a, b in zip(train1, train2):
        for key in ("reward", "response_length", "kl", "advantages_std", "policy_loss", "value_loss", "clipfrac",
                    "approx_kl", "entropy", "grad_norm", "critic_grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    assert train1[-1]["kl"] > 0  # it trained
    # Adam turns float-rounding differences of near-zero gradients into up to lr of weight change (see the DPO test).
    assert max_weight_diff(tmp_path / "one" / "final", tmp_path / "two" / "final") < 1e-4
    assert max_weight_diff(tmp_path / "one" / "final_critic", tmp_path / "two" / "final_critic") < 1e-4


def test_grpo_with_dynamic_sampling_two_processes_equal_one(pretrained_tiny: Path, tmp_path: Path):
    # Critic-free: group advantages, the KL as a loss term and the per-sequence loss mean (its denominator is the
    # GLOBAL mini-batch's sequence count); dynamic sampling's refill rounds are seeded per (step, round).
    common = ppo_overrides(pretrained_tiny / "final", advantage="grpo", samples_per_prompt=4, kl_in="loss",
                           kl_estimator="k3", kl_coef=0.04, loss_agg="seq_mean_token_mean", max_steps=2,
                           mini_batch_size=8, micro_batch_size=2, ppo_epochs=1, dynamic_sampling="true", max_refills=1,
                           lr=5e-4, eval_steps=0)
    s1, s2 = one_and_two_processes("ppo", common, tmp_path)
    assert s1["num_processes"] == 1 and s2["num_processes"] == 2
    assert s1["samples"] == s2["samples"] and s1["samples_trained"] == s2["samples_trained"] == 2 * 16
    train1 = [m for m in read_jsonl(tmp_path / "one" / "metrics.jsonl") if "policy_loss" in m]
    train2 = [m for m in read_jsonl(tmp_path / "two" / "metrics.jsonl") if "policy_loss" in m]
    for a, b in zip(train1, train2):
        for key in ("reward", "kl", "kl_loss", "policy_loss", "advantages_abs_mean", "grad_norm", "sampled"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    assert max_weight_diff(tmp_path / "one" / "final", tmp_path / "two" / "final") < 1e-4
    assert not (tmp_path / "two" / "final_critic").exists()
