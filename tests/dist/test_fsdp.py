"""FSDP2 through accelerate (configs/accelerate/fsdp.yaml) with 2 CPU processes over gloo trains the same
model as one process, resumes after a kill from its sharded checkpoints, and writes a final/ that plain
transformers loads (gathered from the shards).

Each run is `accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 -m alignkit ...`:
launch reads the config (FSDP_* variables), alignkit's make_accelerator turns accelerate's FSDP mode on
for the CPU process group (runtime/setup.py), accelerate shards with torch's fully_shard.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, max_weight_diff, read_jsonl, run_cli, sft_overrides

pytestmark = pytest.mark.dist

FSDP_LAUNCH = [
    sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate/fsdp.yaml"),
    "--num_processes", "2",
]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def fsdp_run(stage: str, args: list[str], env: dict | None = None):
    return run_cli([stage, *args], launcher=FSDP_LAUNCH, env={**ONE_THREAD, **(env or {})})


def assert_sharded_checkpoint(run_dir: Path) -> None:
    """accelerate's FSDP save_state wrote it (a distributed-checkpoint directory per model), not DDP's file."""
    step = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert (step / "pytorch_model_fsdp_0").is_dir() and (step / "optimizer_0").is_dir(), sorted(step.iterdir())
    assert not (step / "model.safetensors").exists()


def assert_plain_transformers_loads(final: Path, auto: str = "AutoModelForCausalLM") -> None:
    import transformers

    model = getattr(transformers, auto).from_pretrained(str(final))
    assert not type(model).__name__.startswith("FSDP")
    assert json.loads((final / "config.json").read_text())["architectures"][0] == type(model).__name__


def test_sft_fsdp_equals_one_process_and_resumes_after_kill(pretrained_tiny: Path, tmp_path: Path):
    # batch 8 = 2 processes x 2 micro-batches x 2 rows, against 1 process x 2 micro-batches x 4 rows.
    common = sft_overrides(pretrained_tiny / "final", max_steps=6, save_steps=2, micro_batch_size=2)
    one = run_cli(["sft", *common, "micro_batch_size=4", f"output_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]

    killed_dir = tmp_path / "fsdp"
    killed = fsdp_run("sft", [*common, f"output_dir={killed_dir}"], env={"ALIGNKIT_KILL_AT_STEP": "3"})
    assert killed.returncode != 0 and not (killed_dir / "final").exists(), killed.stderr[-3000:]
    assert [p.name for p in (killed_dir / "checkpoints").glob("step-*")] == ["step-2"]
    assert_sharded_checkpoint(killed_dir)

    resumed = fsdp_run("sft", [*common, f"output_dir={killed_dir}", "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step 2/6" in resumed.stderr

    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((killed_dir / "summary.json").read_text())
    assert (s1["num_processes"], s2["num_processes"]) == (1, 2)
    assert s2["eval_loss"] == pytest.approx(s1["eval_loss"], abs=1e-4)
    assert s2["eval_loss"] < s2["eval_loss_before"]
    train1 = [m for m in read_jsonl(tmp_path / "one" / "metrics.jsonl") if "loss" in m]
    train2 = [m for m in read_jsonl(killed_dir / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in train2] == [m["step"] for m in train1] == [2, 4, 6]
    assert [m["loss"] for m in train2] == pytest.approx([m["loss"] for m in train1], abs=1e-4)
    # final/ is gathered from the two shards: every weight, tied lm_head dropped as in a plain save
    assert max_weight_diff(tmp_path / "one" / "final", killed_dir / "final") < 1e-4
    assert_plain_transformers_loads(killed_dir / "final")


@pytest.mark.slow
def test_dpo_fsdp_equals_one_process(pretrained_tiny: Path, tmp_path: Path):
    from tests.stages.test_dpo import dpo_overrides

    # the reference model stays a plain frozen copy on every process; only the trained policy is sharded
    common = dpo_overrides(pretrained_tiny / "final", max_steps=4, batch_size=8, micro_batch_size=2,
                           precompute_ref=False, lr=5e-4)
    one = run_cli(["dpo", *common, "micro_batch_size=4", f"output_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = fsdp_run("dpo", [*common, f"output_dir={tmp_path / 'two'}"])
    assert two.returncode == 0, two.stderr[-3000:]
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s2["num_processes"] == 2 and s2["train_pairs"] == s1["train_pairs"]
    for key in ("eval_loss_before", "eval_loss", "eval_reward_margin", "eval_reward_accuracy"):
        assert s2[key] == pytest.approx(s1[key], abs=1e-4), key
    assert_sharded_checkpoint(tmp_path / "two")
    assert max_weight_diff(tmp_path / "one" / "final", tmp_path / "two" / "final") < 1e-4  # measured 1.5e-6
    assert_plain_transformers_loads(tmp_path / "two" / "final")


@pytest.mark.slow
def test_rm_fsdp_equals_one_process(pretrained_tiny: Path, tmp_path: Path):
    # the whole PackedRewardModel wrapper is prepared; final/ is its .rm, cut out of the gathered state dict
    common = [
        f"model={pretrained_tiny / 'final'}", "train_data=task:sort/prefs?n=200&seed=5", "eval_data=0.1",
        "max_length=64", "batch_size=8", "micro_batch_size=2", "lr=2e-3", "max_steps=5", "warmup_steps=1",
        "log_steps=1",
    ]
    one = run_cli(["rm", *common, "micro_batch_size=4", f"output_dir={tmp_path / 'one'}"], env=ONE_THREAD)
    assert one.returncode == 0, one.stderr[-3000:]
    two = fsdp_run("rm", [*common, f"output_dir={tmp_path / 'two'}"])
    assert two.returncode == 0, two.stderr[-3000:]
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s2["num_processes"] == 2 and s2["eval_n_pairs"] == s1["eval_n_pairs"] == 20
    for key in ("eval_loss_before", "eval_loss", "eval_margin", "eval_chosen_reward"):
        assert s2[key] == pytest.approx(s1[key], abs=1e-4), key
    assert s2["eval_accuracy"] == s1["eval_accuracy"]
    assert_sharded_checkpoint(tmp_path / "two")
    assert max_weight_diff(tmp_path / "one" / "final", tmp_path / "two" / "final") < 1e-4  # measured 4.2e-5
    assert_plain_transformers_loads(tmp_path / "two" / "final", "AutoModelForSequenceClassification")
