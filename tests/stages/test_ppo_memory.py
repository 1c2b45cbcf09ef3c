"""PPO's four models in less memory (issue 11, section 3), tiny model on the sorting task, CPU: a shared actor-critic
backbone (share_backbone; other math: it trains, resumes exactly), the LoRA reference as the adapters-off actor,
frozen models offloaded to the CPU between uses (offload_frozen) and activation checkpointing of actor and critic
(the same math: the same results as the plain run, within float tolerance)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import alignkit.rollout.ppo as rollout_ppo
import alignkit.stages.ppo as ppo_stage
from alignkit.cli import run_stage
from tests.helpers import killed_and_resumed, load_weights, max_weight_diff, read_jsonl, untrained_rm
from tests.stages.test_ppo import ppo_overrides


def train_rows(out: Path) -> list[dict]:
    return [m for m in read_jsonl(out / "metrics.jsonl") if "policy_loss" in m]


def assert_same_run(a: Path, b: Path, critic: bool = True, tol: float = 1e-5) -> None:
    """Two runs that did the same math: equal weights and logged losses within float tolerance."""
    assert max_weight_diff(a / "final", b / "final") < tol
    if critic:
        assert max_weight_diff(a / "final_critic", b / "final_critic") < tol
    for x, y in zip(train_rows(a), train_rows(b), strict=True):
        for key in ("reward", "kl", "policy_loss", "value_loss", "grad_norm", "approx_kl"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)


SHARED = dict(share_backbone="true", lr=1e-4, critic_lr=3e-2, vf_coef=0.5, kl_coef=0.0, ppo_epochs=4, eval_steps=0)


def test_share_backbone_trains_one_model_and_saves_a_plain_lm(pretrained_tiny: Path, tmp_path: Path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from alignkit.models.value import load_value_head

    seen = {}
    real_update = ppo_stage.update

    def spy(accelerator, cfg, actor, critic, optimizers, *args):
        seen.update(critic=critic, optimizers=len(optimizers), head=args[-1])
        return real_update(accelerator, cfg, actor, critic, optimizers, *args)

    monkeypatch.setattr(ppo_stage, "update", spy)
    out = tmp_path / "shared"
    summary = run_stage("ppo", ppo_overrides(pretrained_tiny / "final", output_dir=out, max_steps=6, **SHARED))
    assert seen["critic"] is None and seen["optimizers"] == 1 and seen["head"] is not None  # one model, one optimizer
    assert summary["critic_init"] == "shared backbone"
    assert not (out / "final_critic").exists() and (out / "final_value_head.safetensors").exists()
    rows = train_rows(out)
    assert all(k in rows[-1] for k in ("value_loss", "values_mean", "grad_norm", "critic_lr"))
    assert "critic_grad_norm" not in rows[-1] and rows[-1]["critic_lr"] == 3e-2
    losses = [r["value_loss"] for r in rows]
    assert sum(losses[-2:]) < 0.5 * sum(losses[:2]), losses  # the head (and backbone) learn the returns
    start, final = load_weights(pretrained_tiny / "final"), load_weights(out / "final")
    assert set(final) == set(start)  # final/ is the plain causal LM, no head inside
    assert max((final[k] - start[k]).abs().max().item() for k in final) > 1e-4
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size
    head = load_value_head(out / "final_value_head.safetensors")
    assert head.score.weight.shape == (1, model.config.hidden_size)


def test_share_backbone_critic_warmup_trains_the_head_only(pretrained_tiny: Path, tmp_path: Path):
    out = tmp_path / "warm"
    run_stage("ppo", ppo_overrides(pretrained_tiny / "final", output_dir=out, max_steps=1, critic_warmup_steps=1,
                                   **SHARED))
    assert max_weight_diff(pretrained_tiny / "final", out / "final") == 0.0  # the backbone waited
    (row,) = [m for m in read_jsonl(out / "metrics.jsonl") if "value_loss" in m]
    assert row["grad_norm"] > 0 and "policy_loss" not in row


def test_share_backbone_resume_after_kill_equals_uninterrupted(pretrained_tiny: Path, tmp_path: Path):
    common = ppo_overrides(pretrained_tiny / "final", max_steps=4, save_steps=2, **SHARED)
    killed_and_resumed("ppo", common, tmp_path, kill_at=3, checkpoint=2)
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert max_weight_diff(full / "final", killed / "final") < 1e-5
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "final_value_head.safetensors"))["score.weight"] for d in (full, killed))
    assert (a - b).abs().max().item() < 1e-5
    for x, y in zip(train_rows(full), train_rows(killed), strict=True):
        for key in ("reward", "policy_loss", "value_loss", "values_mean"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)


def test_share_backbone_config_errors(tmp_path: Path):
    from alignkit.config import ConfigError

    for extra in (["advantage=grpo", "samples_per_prompt=2"], ["critic_model=somewhere"]):
        with pytest.raises(ConfigError, match="share_backbone"):
            run_stage("ppo", [f"output_dir={tmp_path / 'o'}", "reward=gold", "share_backbone=true", *extra])


def test_lora_reference_is_the_actor_with_adapters_off(pretrained_tiny: Path, tmp_path: Path, monkeypatch):
    """LoRA holds no reference copy, and trains exactly as with the copy it used to hold."""
    import copy

    lora = dict(lora__r=4, lora__alpha=8, lr=1e-2, kl_coef=0.1, eval_steps=2)
    refs = []
    real_collect = ppo_stage.collect

    def spy(accelerator, cfg, actor, ref, *args):
        refs.append(ref)
        return real_collect(accelerator, cfg, actor, ref, *args)

    monkeypatch.setattr(ppo_stage, "collect", spy)
    run_stage("ppo", ppo_overrides(pretrained_tiny / "final", output_dir=tmp_path / "lora", **lora))
    assert refs and all(ref is None for ref in refs)
    rows = train_rows(tmp_path / "lora")
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] > 1e-3  # the KL is really measured

    def copied_reference(cfg, actor, device):  # the old way: a frozen deep copy of the (peft) starting actor
        ref = copy.deepcopy(actor).requires_grad_(False).eval()
        return ref.to(device)

    monkeypatch.setattr(ppo_stage, "load_reference", copied_reference)
    run_stage("ppo", ppo_overrides(pretrained_tiny / "final", output_dir=tmp_path / "copy", **lora))
    assert refs[-1] is not None
    assert_same_run(tmp_path / "copy", tmp_path / "lora", tol=1e-6)


def test_offload_frozen_gives_the_plain_results_with_frozen_models_on_cpu(pretrained_tiny: Path, tmp_path: Path,
                                                                         monkeypatch):
    """offload_frozen: the reference and the reward model are on the accelerator only inside the rollout forwards
    and the scoring (rollout.forwards.resident), never during an update; the run equals the plain one."""
    rm = untrained_rm(pretrained_tiny / "final", tmp_path / "rm")
    common = ppo_overrides(pretrained_tiny / "final", reward="rm", reward__model=rm, eval_steps=2)
    run_stage("ppo", [*common, f"output_dir={tmp_path / 'plain'}"])

    inside, events = [], []
    real_resident, real_update = rollout_ppo.resident, ppo_stage.update

    class Tracked:
        def __init__(self, model, device, offload):
            self.block = real_resident(model, device, offload)
            self.model, self.offload = model, offload

        def __enter__(self):
            if self.offload and self.model is not None:
                inside.append(self.model)
                events.append(("in", type(self.model).__name__))
            return self.block.__enter__()

        def __exit__(self, *exc):
            if inside and inside[-1] is self.model:
                inside.pop()
            return self.block.__exit__(*exc)

    def update(accelerator, cfg, actor, critic, optimizers, rollout, step, *args):
        assert not inside, "a frozen model is resident during the update"
        frozen = [m for m in (run_models.get("ref"), run_models.get("rm")) if m is not None]
        assert all(p.device.type == "cpu" for m in frozen for p in m.parameters())
        events.append(("update", step))
        return real_update(accelerator, cfg, actor, critic, optimizers, rollout, step, *args)

    run_models = {}  # the frozen models of the offloaded run, as loaded
    real_load_reference, real_load_scorer = ppo_stage.load_reference, rollout_ppo.load_scorer

    def load_reference(cfg, actor, device):
        run_models["ref"] = real_load_reference(cfg, actor, device)
        return run_models["ref"]

    def load_scorer(accelerator, name):
        rm_model, rm_tokenizer = real_load_scorer(accelerator, name)
        run_models["rm"] = rm_model
        return rm_model, rm_tokenizer

    monkeypatch.setattr(rollout_ppo, "resident", Tracked)
    monkeypatch.setattr(rollout_ppo, "load_scorer", load_scorer)
    monkeypatch.setattr(ppo_stage, "update", update)
    monkeypatch.setattr(ppo_stage, "load_reference", load_reference)
    run_stage("ppo", [*common, "offload_frozen=true", f"output_dir={tmp_path / 'offload'}"])
    kinds = [e[0] for e in events]
    assert kinds.count("update") == 3 and kinds.count("in") >= 2 * 3  # the reference and the RM, every step
    assert {name for kind, name in events if kind == "in"} >= {"LlamaForCausalLM", "LlamaForSequenceClassification"}
    assert_same_run(tmp_path / "plain", tmp_path / "offload", tol=1e-6)


def test_gold_reward_loads_no_reward_model(pretrained_tiny: Path, tmp_path: Path, monkeypatch):
    def refuse(*_):
        raise AssertionError("reward.source=gold loaded a reward model")

    monkeypatch.setattr(rollout_ppo, "load_scorer", refuse)
    run_stage("ppo", ppo_overrides(pretrained_tiny / "final", output_dir=tmp_path / "gold", max_steps=1,
                                   offload_frozen="true"))


def test_gradient_checkpointing_of_actor_and_critic_gives_the_plain_results(pretrained_tiny: Path, tmp_path: Path,
                                                                           monkeypatch):
    common = ppo_overrides(pretrained_tiny / "final", eval_steps=0)
    run_stage("ppo", [*common, f"output_dir={tmp_path / 'plain'}"])
    checked = []
    real_update = ppo_stage.update

    def update(accelerator, cfg, actor, critic, *args):
        for model in (actor, critic):
            flags = [getattr(m, "gradient_checkpointing", False) for m in model.modules()]
            checked.append(sum(flags))
        return real_update(accelerator, cfg, actor, critic, *args)

    monkeypatch.setattr(ppo_stage, "update", update)
    run_stage("ppo", [*common, "gradient_checkpointing=true", f"output_dir={tmp_path / 'checkpointed'}"])
    assert checked and all(n >= 2 for n in checked)  # both models checkpoint their (2) decoder layers
    assert_same_run(tmp_path / "plain", tmp_path / "checkpointed")
