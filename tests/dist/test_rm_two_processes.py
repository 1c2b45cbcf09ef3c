"""`accelerate launch --num_processes 2` on CPU (gloo) trains the same reward model as one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import max_weight_diff, one_and_two_processes

pytestmark = pytest.mark.dist


@pytest.mark.slow
def test_rm_two_processes_equal_one(pretrained_tiny: Path, tmp_path: Path):
    """Mechanism: the shared train loop's DDP step over pair batches; the fast suite covers it through
    tests/dist/test_two_processes.py::test_sft_two_processes_equal_one."""
    # batch 8 = 2 processes x 2 micro-batches x 2 pairs, against 1 process x 2 micro-batches x 4 pairs.
    common = [
        f"model={pretrained_tiny / 'final'}", "train_data=task:sort/prefs?n=200&seed=5", "eval_data=0.1",
        "max_length=64", "batch_size=8", "micro_batch_size=2", "lr=2e-3", "max_steps=5", "warmup_steps=1",
        "log_steps=1",
    ]
    env = {"OMP_NUM_THREADS": "1"}
    s1, s2 = one_and_two_processes("rm", common, tmp_path, one_extra=["micro_batch_size=4"], one_env=env)

    assert (s1["num_processes"], s2["num_processes"]) == (1, 2)
    assert s2["train_pairs"] == s1["train_pairs"] == 40
    # Held-out pairs are split over the processes and gathered: the same 20 pairs, the same metrics.
    assert s2["eval_n_pairs"] == s1["eval_n_pairs"] == 20
    for key in ("eval_loss", "eval_margin", "eval_chosen_reward", "eval_loss_before"):
        assert s2[key] == pytest.approx(s1[key], abs=1e-4), key
    assert s2["eval_accuracy"] == s1["eval_accuracy"]
    assert max_weight_diff(tmp_path / "one" / "final", tmp_path / "two" / "final") < 1e-4
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [m["loss"] for m in m2] == pytest.approx([m["loss"] for m in m1], abs=1e-4)
    assert [m["accuracy"] for m in m2] == pytest.approx([m["accuracy"] for m in m1], abs=1e-6)
