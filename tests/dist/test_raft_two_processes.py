"""`alignkit raft` and `alignkit best-of-n` under `accelerate launch --num_processes 2` (CPU, gloo) equal one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import max_weight_diff, one_and_two_processes

pytestmark = pytest.mark.dist


def test_raft_two_processes_equal_one(pretrained_tiny: Path, tmp_path: Path):
    # Sampling chunks of 3 prompts alternate between the processes; batch 4 = 2 processes x 2 micro-batches x 1
    # row, against 1 process x 2 micro-batches x 2 rows. Iteration 1 samples from the policy trained in
    # iteration 0, so equal samples there also mean equal weights after iteration 0.
    common = [
        f"model={pretrained_tiny / 'final'}", "train_data=task:sort/prompts?n=30&seed=2",
        "eval_data=task:sort/prompts_eval?n=6", "reward=gold", "iterations=2", "prompts_per_iteration=8",
        "samples_per_prompt=3", "steps_per_iteration=2", "batch_size=4", "micro_batch_size=1", "lr=1e-3",
        "warmup_steps=1", "sampling.max_new_tokens=10", "max_length=64", "sampling.chunk=3", "log_steps=1",
    ]
    s1, s2 = one_and_two_processes("raft", common, tmp_path, one_extra=["micro_batch_size=2"])

    assert s1["num_processes"] == 1 and s2["num_processes"] == 2
    for k in range(2):
        a, b = (tmp_path / run / f"iter-{k}" / "samples.jsonl" for run in ("one", "two"))
        assert a.read_text() == b.read_text(), k
    for key in ("gold_reward_first_iteration", "gold_reward_last_iteration", "eval_gold_reward_before", "eval_gold_reward"):
        assert s2[key] == pytest.approx(s1[key], abs=1e-6), key
    assert max_weight_diff(tmp_path / "one" / "final", tmp_path / "two" / "final") < 1e-4
    m1 = [m for m in map(json.loads, (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    m2 = [m for m in map(json.loads, (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert [m["loss"] for m in m2] == pytest.approx([m["loss"] for m in m1], rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_best_of_n_two_processes_equal_one(pretrained_tiny: Path, tmp_path: Path):
    """Mechanism: candidates sampled in seeded chunks over the processes and gathered; the fast suite covers it
    through test_raft_two_processes.py::test_raft_two_processes_equal_one (the same sampler, then training)."""
    common = [
        f"model={pretrained_tiny / 'final'}", "train_data=task:sort/prompts?n=10&seed=3", "eval_data=null",
        "reward=gold", "n=3", "sampling.max_new_tokens=10", "max_length=64", "sampling.chunk=3",
    ]
    s1, s2 = one_and_two_processes("best-of-n", common, tmp_path)
    for name in ("samples.jsonl", "best.jsonl"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text(), name
    for key in ("gold_reward", "sample_gold_reward", "proxy_reward", "length", "distinct_2", "kl_upper_bound",
                "kl_estimate"):
        assert s2[key] == s1[key], key
