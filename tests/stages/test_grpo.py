"""The critic-free estimators of the ppo stage (`alignkit grpo`, advantage=...), DAPO's dynamic sampling,
prompts cut from the left, and the step-0 ratio / KL in bf16; tiny model, CPU, seconds each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit.cli import run_stage
from tests.helpers import killed_and_resumed, load_weights, max_weight_diff
from tests.stages.test_ppo import ppo_overrides, read_jsonl


def grpo_overrides(model_dir: Path, **extra: object) -> list[str]:
    base = {"samples_per_prompt": 4, "mini_batch_size": 16, "micro_batch_size": 8, "ppo_epochs": 1,
            "kl_coef": 0.04, "forward_batch_size": 8}
    base.update(extra)
    return ppo_overrides(model_dir, **base)


def train_rows(out: Path) -> list[dict]:
    return [m for m in read_jsonl(out / "metrics.jsonl") if "policy_loss" in m]


def test_grpo_alias_trains_without_a_critic(pretrained_tiny: Path, tmp_path: Path):
    out = tmp_path / "grpo"
    summary = run_stage("grpo", grpo_overrides(pretrained_tiny / "final", output_dir=out))
    assert summary["advantage"] == "grpo" and summary["critic_init"] is None
    assert (out / "final" / "model.safetensors").exists() and not (out / "final_critic").exists()
    rows = train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("kl_loss", "varied_group_fraction", "advantages_abs_mean", "samples", "clipfrac", "grad_norm"):
        assert key in rows[-1], key
    for key in ("value_loss", "critic_grad_norm", "critic_lr", "values_mean"):
        assert key not in rows[-1], key
    # one pass over the whole rollout: the update's ratio is taken before the step, so it is exactly 1
    assert rows[0]["ratio"] == pytest.approx(1.0, abs=1e-6) and rows[0]["clipfrac"] == 0.0
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5) and rows[0]["kl_loss"] == pytest.approx(0.0, abs=1e-6)
    assert summary["samples"] == 3 * 16 == rows[-1]["samples"]
    config = (out / "config.yaml").read_text()
    assert "kl_in: loss" in config and "loss_agg: seq_mean_token_mean" in config and "kl_estimator: k3" in config
    start, final = load_weights(pretrained_tiny / "final"), load_weights(out / "final")
    assert max((final[k] - start[k]).abs().max().item() for k in final) > 1e-4


@pytest.mark.parametrize("options", [
    {"advantage": "rloo", "kl_in": "reward", "kl_estimator": "k1"},
    {"advantage": "dr_grpo", "loss_agg": "seq_mean_token_sum_norm"},
    {"advantage": "reinforce_pp", "kl_in": "reward", "kl_estimator": "k1", "loss_agg": "token_mean"},
    {"ratio_level": "sequence", "clip_eps_low": 0.2, "clip_eps_high": 0.28, "overlong_buffer": 4, "ppo_epochs": 2,
     "mini_batch_size": 8},
])
def test_every_estimator_and_loss_option_trains(pretrained_tiny: Path, tmp_path: Path, options: dict):
    out = tmp_path / "run"
    summary = run_stage("grpo", grpo_overrides(pretrained_tiny / "final", output_dir=out, max_steps=2, **options))
    rows = train_rows(out)
    assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)
    assert summary["advantage"] == options.get("advantage", "grpo") and not (out / "final_critic").exists()


def test_dynamic_sampling_refills_equal_reward_groups(pretrained_tiny: Path, tmp_path: Path):
    # One-token answers of a barely pretrained model: a pair scores the same (0, or one item's credit) often,
    # so dynamic sampling must sample more prompts than one round and count every sampled response.
    out = tmp_path / "dapo"
    summary = run_stage("grpo", grpo_overrides(pretrained_tiny / "final", output_dir=out, dynamic_sampling="true",
                                               max_refills=2, max_steps=2, sampling__max_new_tokens=1, samples_per_prompt=2,
                                               mini_batch_size=8, overlong_buffer=0))
    rows = train_rows(out)
    assert all("sampling_rounds" in r and "trained_varied_fraction" in r for r in rows)
    for r in rows:
        if r["varied_group_fraction"] < 1.0:
            assert r["sampling_rounds"] > 1 and r["sampled"] == 8 * r["sampling_rounds"]
    assert summary["samples"] == sum(r["sampled"] for r in rows) and summary["samples_trained"] == 2 * 8
    assert any(r["sampling_rounds"] > 1 for r in rows), [r["varied_group_fraction"] for r in rows]


def test_grpo_resume_after_kill_equals_uninterrupted(pretrained_tiny: Path, tmp_path: Path):
    common = grpo_overrides(pretrained_tiny / "final", max_steps=4, save_steps=2, eval_steps=0)
    killed_and_resumed("grpo", common, tmp_path, kill_at=3, checkpoint=2)
    assert max_weight_diff(tmp_path / "full" / "final", tmp_path / "killed" / "final") < 1e-5


def test_step_zero_ratio_and_kl_in_bf16(pretrained_tiny: Path, tmp_path: Path):
    """The reference and the no-grad forwards run under the actor's autocast: at step 0 (actor == reference)
    the rollout KL is 0 and the first update's ratio 1, within bf16 tolerance."""
    out = tmp_path / "bf16"
    # two mini-batches: the old log-probs come from the rollout's own forward (not reused); lr 0 keeps ratio 1
    run_stage("grpo", grpo_overrides(pretrained_tiny / "final", output_dir=out, mixed_precision="bf16", max_steps=1,
                                     mini_batch_size=8, lr=0.0))
    (row,) = train_rows(out)
    assert row["kl"] == pytest.approx(0.0, abs=1e-3)
    assert row["ratio"] == pytest.approx(1.0, abs=1e-2) and row["approx_kl"] < 1e-3


@pytest.mark.parametrize("kl_coef", [0.0, 0.04])
def test_skipped_rollout_forwards_train_the_same(pretrained_tiny: Path, tmp_path: Path, monkeypatch, kl_coef: float):
    """One update per rollout: the old log-probs forward is skipped (the update's detached log-probs are the old
    ones) and, at kl_coef 0 without a KL alarm, the reference forward too. Training matches running both."""
    import alignkit.rollout.ppo as ppo_rollout
    import alignkit.stages.ppo as ppo_stage
    from alignkit.rollout.ppo import forwards_needed

    common = grpo_overrides(pretrained_tiny / "final", max_steps=2, eval_steps=0, kl_coef=kl_coef)
    cfg = ppo_stage.PPOConfig(kl_coef=kl_coef, ppo_epochs=1, mini_batch_size=16, kl_in="loss")
    assert forwards_needed(cfg, 16) == (False, kl_coef != 0)
    assert forwards_needed(ppo_stage.PPOConfig(kl_coef=kl_coef, ppo_epochs=2), 16)[0]
    skipped = run_stage("grpo", [*common, f"output_dir={tmp_path / 'skipped'}"])
    monkeypatch.setattr(ppo_rollout, "forwards_needed", lambda cfg, n: (True, True))  # read by collect
    both = run_stage("grpo", [*common, f"output_dir={tmp_path / 'both'}"])
    # float noise only: Adam turns ~1e-7 differences of near-zero gradients into ~1e-5 steps, while the two
    # updates moved the weights by ~1e-3 (a wrong gradient in either path would differ by that much)
    assert max_weight_diff(pretrained_tiny / "final", tmp_path / "skipped" / "final") > 1e-3
    assert max_weight_diff(tmp_path / "skipped" / "final", tmp_path / "both" / "final") < 1e-4
    fast, slow = train_rows(tmp_path / "skipped"), train_rows(tmp_path / "both")
    for a, b in zip(fast, slow):
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-4)
        assert a["policy_loss"] == pytest.approx(b["policy_loss"], abs=1e-5)
        if kl_coef:
            assert a["kl"] == pytest.approx(b["kl"], abs=1e-4)
        else:
            assert "kl" not in a and "kl" in b
    assert skipped["eval_kl"] == pytest.approx(both["eval_kl"], abs=1e-4)


def test_long_prompts_are_cut_from_the_left(pretrained_tiny: Path, tmp_path: Path):
    # A long multi-turn conversation: at max_length 48 the prompt must lose its START, keep its last user turn.
    turns = []
    for i in range(10):
        turns += [{"role": "user", "content": f"sort: {' '.join('abcdefgh'[: 3 + i % 5])}"},
                  {"role": "assistant", "content": " ".join("abcdefgh"[: 3 + i % 5])}]
    long_prompt = turns + [{"role": "user", "content": "sort: c b a"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": long_prompt if i % 2 else [long_prompt[-1]]}) for i in range(8)))
    out = tmp_path / "long"
    summary = run_stage("grpo", grpo_overrides(pretrained_tiny / "final", output_dir=out, train_data=str(path),
                                               eval_data="null", reward__task="sort", max_length=48, max_steps=1))
    assert summary["truncated_prompts"] == 4 and summary["steps"] == 1


def test_critic_free_config_errors(tmp_path: Path):
    from alignkit.config import ConfigError

    cases = [
        (["advantage=grpo", "samples_per_prompt=1"], "samples_per_prompt"),
        (["advantage=gae", "dynamic_sampling=true"], "group estimator"),
        (["advantage=ppo2"], "advantage must be one of"),
        (["loss_agg=sum"], "loss_agg"),
        (["ratio_level=word"], "ratio_level"),
        (["kl_in=both"], "kl_in"),
        (["overlong_buffer=99", "sampling.max_new_tokens=8"], "overlong_buffer"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_stage("ppo", [f"output_dir={tmp_path / 'o'}", "reward=gold", *overrides])
    assert not (tmp_path / "o").exists()


def test_freeze_tuning_trains_only_the_matching_parameters(pretrained_tiny: Path, tmp_path: Path):
    """trainable='^model\\.norm\\.' (the final RMSNorm gain, how the rl-gold configs sharpen the policy): that
    tensor moves, every other weight is bit-identical; a pattern matching nothing is a clear error."""
    from alignkit.models.loading import ModelError

    out = tmp_path / "frozen"
    run_stage("grpo", grpo_overrides(pretrained_tiny / "final", output_dir=out, max_steps=2, lr=1e-2,
                                     trainable=r"^model\.norm\."))
    start, final = load_weights(pretrained_tiny / "final"), load_weights(out / "final")
    moved = {k for k in final if not torch.equal(final[k], start[k])}
    assert moved == {"model.norm.weight"}, moved
    with pytest.raises(ModelError, match="matches none of the model's"):
        run_stage("grpo", grpo_overrides(pretrained_tiny / "final", output_dir=tmp_path / "bad", trainable="ln_f"))
