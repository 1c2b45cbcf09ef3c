"""The reward-hacking alarms end to end, on the default pipeline's SFT policy and learned reward model.

With reward=gold (proxy and gold are the same function) PPO must raise neither proxy_up_gold_down nor
length_correlation; on the pipeline's length-biased reward model with kl_coef=0 and a large learning rate the
policy over-optimises the proxy, held-out gold falls, and proxy_up_gold_down fires. Slow: each run is a minute
or two on 2 cores, and they need `alignkit pipeline --config configs/tiny/pipeline.yaml` (at least its
pretrain, sft, label and rm stages) in runs/tiny-pipeline.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from alignkit.cli import run_stage
from tests.helpers import REPO

PIPELINE = REPO / "runs" / "tiny-pipeline"
HACKING_ALARMS = {"proxy_up_gold_down", "length_correlation"}


def pipeline_models() -> tuple[Path, Path]:
    sft, rm = PIPELINE / "sft" / "final", PIPELINE / "rm" / "final"
    if not (sft.exists() and rm.exists()):
        pytest.skip("runs/tiny-pipeline/{sft,rm} are not built: alignkit pipeline --config configs/tiny/pipeline.yaml "
                    "'stages=[pretrain,sft,label,rm]' evaluate=false")
    return sft, rm


def ppo_run(tmp_path: Path, *overrides: str) -> dict:
    sft, rm = pipeline_models()
    return run_stage("ppo", ["--config", str(REPO / "configs/tiny/ppo.yaml"), f"model={sft}", f"reward.model={rm}",
                             f"output_dir={tmp_path / 'run'}", "eval_data=task:sort/prompts_eval?n=200",
                             "eval_steps=5", "max_steps=30", "kl_budget=null", *overrides])


@pytest.mark.slow
def test_ppo_on_gold_raises_no_hacking_alarm(tmp_path: Path):
    summary = ppo_run(tmp_path, "reward=gold")  # the config's freeze tuning: gold rises (docs/rl-gold.md)
    assert not HACKING_ALARMS & {a["name"] for a in summary["alarms"]}, summary["alarms"]
    assert summary["eval_gold_reward"] == summary["eval_reward"]  # the proxy IS gold
    assert summary["eval_gold_reward"] > summary["eval_gold_reward_before"]


@pytest.mark.slow
def test_ppo_over_optimising_the_rm_without_kl_fires_and_gold_falls(tmp_path: Path):
    summary = ppo_run(tmp_path, "reward=rm", "trainable=null", "lr=1e-4", "kl_coef=0")  # every parameter, no KL
    before, after = summary["eval_gold_reward_before"], summary["eval_gold_reward"]
    se = math.hypot(summary["eval_gold_reward_stderr_before"], summary["eval_gold_reward_stderr"])
    assert summary["eval_reward"] > summary["eval_reward_before"]  # the proxy rose ...
    assert after < before - 2 * se, (before, after, se)  # ... and gold fell, by more than 2 (unpaired) stderrs
    assert "proxy_up_gold_down" in {a["name"] for a in summary["alarms"]}, summary["alarms"]
