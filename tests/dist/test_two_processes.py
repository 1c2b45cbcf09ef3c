"""`accelerate launch --num_processes 2` on CPU (gloo) trains the same model as one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import max_weight_diff, run_cli, sft_overrides

pytestmark = pytest.mark.dist

# On a machine without GPUs, `--multi_gpu` is accelerate's torchrun path; alignkit's Accelerator(cpu=True)
# then joins the processes into one gloo group. (`--cpu` alone starts a single process.)
LAUNCH = [
    sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
]


def test_sft_two_processes_equal_one(pretrained_tiny: Path, tmp_path: Path):
    # batch 8 = 2 processes x 2 micro-batches x 2 rows, against 1 process x 2 micro-batches x 4 rows.
    common = sft_overrides(pretrained_tiny / "final", max_steps=6, micro_batch_size=2)
    one = run_cli(["sft", *common, "micro_batch_size=4", f"output_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(["sft", *common, f"output_dir={tmp_path / 'two'}"], launcher=LAUNCH, env={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]

    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["num_processes"] == 2 and s1["num_processes"] == 1
    assert s2["train_tokens"] == s1["train_tokens"]
    assert s2["eval_loss"] == pytest.approx(s1["eval_loss"], abs=1e-4)
    assert s2["eval_loss"] < s2["eval_loss_before"]
    assert max_weight_diff(tmp_path / "one" / "final", tmp_path / "two" / "final") < 1e-4
