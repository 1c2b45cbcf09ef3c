"""End-to-end `alignkit best-of-n` on the built-in task with a tiny model, on CPU, in seconds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from alignkit.cli import run_stage
from alignkit.config import ConfigError
from tests.helpers import max_weight_diff, read_jsonl


def bon_overrides(model_dir: Path, **extra: object) -> list[str]:
    base = {
        "model": str(model_dir), "train_data": "task:sort/prompts?n=12&seed=3", "eval_data": "null",
        "n": 4, "reward": "gold", "sampling.max_new_tokens": 10, "max_length": 64, "sampling.chunk": 5,
    }
    base.update(extra)
    return [f"{k.replace('__', '.')}={v}" for k, v in base.items()]  # sampling__chunk=4: sampling.chunk=4


def test_best_is_the_argmax_of_reward_and_best_jsonl_is_sft_data(pretrained_tiny: Path, tmp_path: Path):
    from alignkit.data.records import load_records

    out = tmp_path / "run"
    summary = run_stage("best-of-n", bon_overrides(pretrained_tiny / "final", output_dir=out))
    samples, best = read_jsonl(out / "samples.jsonl"), read_jsonl(out / "best.jsonl")
    assert len(samples) == len(best) == 12
    for s, b in zip(samples, best):
        assert len(s["responses"]) == len(s["reward"]) == len(s["gold"]) == 4
        top = max(s["reward"])
        assert s["best"] == s["reward"].index(top)  # first index on ties
        assert b["completion"] == s["responses"][s["best"]] and b["reward"] == top and b["n"] == 4
        assert s["gold"] == s["reward"]  # reward=gold: the proxy IS the gold reward
    # Hand-worked: log 4 - 3/4 = 1.386294 - 0.75, an upper bound on the KL; the estimate from the samples
    # (equal responses are one outcome) lies below it.
    assert summary["kl_upper_bound"] == pytest.approx(0.636294, abs=1e-6)
    from alignkit.eval.metrics import best_of_n_kl_estimate

    estimate = best_of_n_kl_estimate([s["reward"] for s in samples], [s["responses"] for s in samples])
    assert (summary["kl_estimate"], summary["kl_estimate_stderr"]) == pytest.approx(estimate)
    assert 0.0 <= summary["kl_estimate"] <= summary["kl_upper_bound"]
    assert summary["proxy_reward"] == pytest.approx(sum(b["reward"] for b in best) / 12)
    all_rewards = [r for s in samples for r in s["reward"]]
    assert summary["sample_proxy_reward"] == pytest.approx(sum(all_rewards) / 48)
    assert summary["gold_reward"] == pytest.approx(summary["proxy_reward"])
    assert summary["oracle_gold_reward"] == pytest.approx(summary["gold_reward"])
    assert summary["gold_reward"] > summary["sample_gold_reward"]  # strictly: the samples differ in gold
    chosen = [s["length"][s["best"]] for s in samples]
    assert summary["length"] == pytest.approx(sum(chosen) / 12)
    for key in ("gold_reward_stderr", "proxy_reward_stderr", "distinct_2", "eos_fraction", "wall_s", "peak_rss_mb"):
        assert key in summary
    assert not (out / "final").exists() and not (out / "checkpoints").exists()  # inference only
    assert json.loads((out / "summary.json").read_text())["n"] == 4

    records, kind = load_records(str(out / "best.jsonl"), "sft")
    assert kind == "sft" and len(records) == 12
    assert records[0]["messages"] == samples[0]["prompt"] + [{"role": "assistant", "content": best[0]["completion"]}]


def test_n1_is_plain_sampling(pretrained_tiny: Path, tmp_path: Path):
    from accelerate import Accelerator

    from alignkit.data.tasks import load_task_records
    from alignkit.models.loading import load_causal_lm
    from alignkit.rollout.sampling import sample_texts

    out = tmp_path / "run"
    summary = run_stage("best-of-n", bon_overrides(pretrained_tiny / "final", output_dir=out, n=1, seed=5))
    assert summary["kl_upper_bound"] == 0.0 and summary["kl_estimate"] == 0.0
    assert summary["proxy_reward"] == pytest.approx(summary["sample_proxy_reward"])
    records, _ = load_task_records("task:sort/prompts?n=12&seed=3")
    model, tok = load_causal_lm(str(pretrained_tiny / "final"))
    plain = sample_texts(Accelerator(cpu=True), model, tok, [r["prompt"] for r in records], 1, 1.0, 10, chunk=5, seed=5, split=0)
    assert [b["completion"] for b in read_jsonl(out / "best.jsonl")] == [texts[0] for texts in plain]


def test_finetune_on_best_writes_final_and_eval_split(pretrained_tiny: Path, tmp_path: Path):
    out = tmp_path / "run"
    summary = run_stage("best-of-n", bon_overrides(
        pretrained_tiny / "final", output_dir=out, eval_data="task:sort/prompts_eval?n=6", finetune="true",
        max_steps=3, batch_size=4, micro_batch_size=2, lr=1e-3, warmup_steps=1, log_steps=1,
    ))
    assert summary["steps"] == 3 and summary["n_eval_prompts"] == 6
    assert "eval_gold_reward" in summary and "eval_loss" in summary and "eval_loss_before" in summary
    assert max_weight_diff(pretrained_tiny / "final", out / "final") > 1e-4  # params moved
    splits = [s["split"] for s in read_jsonl(out / "samples.jsonl")]
    assert splits == ["train"] * 12 + ["eval"] * 6
    assert len(read_jsonl(out / "best.jsonl")) == 12  # held-out prompts are not training data
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl") if "loss" in m] == [1, 2, 3]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"n": 0}, "n (samples per prompt) must be >= 1"),
        ({"reward": "rm"}, "reward=rm needs reward.model"),
        ({"reward": "judge"}, "reward.source must be one of rm, gold"),
        ({"sampling.temperature": -1}, "sampling.temperature must be >= 0"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, extra: dict, message: str):
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_stage("best-of-n", bon_overrides(tmp_path / "no-model", output_dir=tmp_path / "run", **extra))


def test_gold_without_a_task_is_a_clear_error(tmp_path: Path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "sort: b a c"}) + "\n")
    with pytest.raises(ConfigError, match="a gold reward needs a built-in task"):
        run_stage("best-of-n", bon_overrides(tmp_path / "no-model", train_data=prompts, output_dir=tmp_path / "run"))
