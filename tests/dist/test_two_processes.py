"""`accelerate launch --num_processes 2` on CPU (gloo) trains the same model as one process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import max_weight_diff, one_and_two_processes, sft_overrides

pytestmark = pytest.mark.dist


def test_sft_two_processes_equal_one(pretrained_tiny: Path, tmp_path: Path):
    # batch 8 = 2 processes x 2 micro-batches x 2 rows, against 1 process x 2 micro-batches x 4 rows.
    common = sft_overrides(pretrained_tiny / "final", max_steps=6, micro_batch_size=2)
    s1, s2 = one_and_two_processes("sft", common, tmp_path, one_extra=["micro_batch_size=4"])

    assert s2["num_processes"] == 2 and s1["num_processes"] == 1
    # provenance (runtime.provenance): the same inputs, versions and seed; the process count as launched
    p1, p2 = s1["provenance"], s2["provenance"]
    assert p2["num_processes"] == 2 and p1["num_processes"] == 1 and p1["device"] == p2["device"] == "cpu"
    assert p1["inputs"] == p2["inputs"] and p1["versions"] == p2["versions"] and p1["seed"] == p2["seed"]
    assert p2["inputs"]["model"]["sha256"] and p2["inputs"]["train_data"].startswith("task:sort/sft")
    assert s2["train_tokens"] == s1["train_tokens"]
    assert s2["eval_loss"] == pytest.approx(s1["eval_loss"], abs=1e-4)
    assert s2["eval_loss"] < s2["eval_loss_before"]
    assert max_weight_diff(tmp_path / "one" / "final", tmp_path / "two" / "final") < 1e-4
