"""`alignkit eval`'s KL: both models at the sampling temperature, standard errors over prompts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from alignkit.cli import run_stage

T = 0.7


def test_baseline_against_itself_is_zero_at_temperature_07(pretrained_tiny: Path, tmp_path: Path):
    out = tmp_path / "eval"
    run_stage("eval", [f"models=[{pretrained_tiny / 'final'}]", "names=[base]", "prompts=task:sort/prompts_eval?n=8",
                       "n_samples=2", "sampling.max_new_tokens=12", f"sampling.temperature={T}", "greedy=false", "heldout_text=null",
                       "checkpoints=false", f"output_dir={out}"])
    base = json.loads((out / "summary.json").read_text())["models"]["base"]
    # The reference is the baseline: its samples score the same under both sides, whatever the temperature.
    assert base["kl"] == 0.0 and base["kl_k3"] == 0.0 and base["kl_stderr"] == 0.0


def _tempered_logp(model, prompt_ids: list[int], response_ids: list[int], temperature: float) -> float:
    """log p_T(response | prompt) with p_T = softmax(logits / T), from one plain forward (no packing)."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float() / temperature
    return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(response_ids)[:, None]).sum())


def _reference_and_moved_policy(pretrained_tiny: Path):
    """(reference, a policy moved away from it by seeded noise, tokenizer, 6 held-out prompts), both in eval mode."""
    from alignkit.data.tasks import load_task_records
    from alignkit.models.loading import load_causal_lm

    reference, tok = load_causal_lm(str(pretrained_tiny / "final"))
    policy, _ = load_causal_lm(str(pretrained_tiny / "final"))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    reference.eval()
    policy.eval()
    return reference, policy, tok, [r["prompt"] for r in load_task_records("task:sort/prompts_eval?n=6")[0]]


def test_kl_uses_the_temperature_on_both_sides_and_groups_by_prompt(pretrained_tiny: Path):
    from alignkit.config import EvalConfig, EvalSamplingConfig
    from alignkit.rollout.sampling import generate
    from alignkit.stages.evaluate import Context, kl_metrics

    reference, policy, tok, prompts = _reference_and_moved_policy(pretrained_tiny)
    k = 3
    cfg = EvalConfig(models=["x"], n_samples=k, sampling=EvalSamplingConfig(temperature=T), max_length=256)
    flat = [g for per in generate(policy, tok, prompts, n=k, temperature=T, max_new_tokens=10, seed=0) for g in per]
    ctx = Context(cfg, prompts, None, [], (reference, tok), [])
    got = kl_metrics(ctx, policy, tok, flat)

    # By hand: k1 = log p_T(y) - log q_T(y) per sample, both at T; prompts are the units of the stderr.
    k1 = np.array([_tempered_logp(policy, g.prompt_ids, g.response_ids, T)
                   - _tempered_logp(reference, g.prompt_ids, g.response_ids, T) for g in flat]).reshape(-1, k)
    per_prompt = k1.mean(axis=1)
    assert got["kl"] == pytest.approx(k1.mean(), abs=1e-4)
    assert got["kl_stderr"] == pytest.approx(per_prompt.std(ddof=1) / math.sqrt(len(prompts)), abs=1e-4)
    # The reference at T = 1 (the old asymmetry) gives another number: the test tells the two apart.
    untempered = np.mean([_tempered_logp(policy, g.prompt_ids, g.response_ids, T)
                          - _tempered_logp(reference, g.prompt_ids, g.response_ids, 1.0) for g in flat])
    assert abs(untempered - got["kl"]) > 0.1
    assert got["kl_k3"] > 0.0 and math.isfinite(got["kl_k3_stderr"])


def test_shared_prompt_forward_gives_the_packed_rows_log_probs(pretrained_tiny: Path):
    """kl_metrics' generation_token_logps (rollout.forwards) (each prompt once for its k samples) against eval.scoring.token_logps
    (whole sequences packed into rows): the same per-token log-probs, batches cutting groups or not."""
    from alignkit.data.tasks import load_task_records
    from alignkit.eval.scoring import response_examples, token_logps
    from alignkit.models.loading import load_causal_lm
    from alignkit.rollout.sampling import generate
    from alignkit.rollout.forwards import generation_token_logps

    model, tok = load_causal_lm(str(pretrained_tiny / "final"))
    model.eval()
    prompts = [r["prompt"] for r in load_task_records("task:sort/prompts_eval?n=7")[0]]
    flat = [g for per in generate(model, tok, prompts, n=3, temperature=T, max_new_tokens=10, seed=1) for g in per]
    packed = token_logps(model, response_examples(flat, 256), tok.pad_token_id, 128, 4096, T)
    for rows in (64, 4):  # 21 samples in one batch; batches of one prompt's 3 samples
        shared = generation_token_logps(model, flat, tok.pad_token_id, 3, T, rows=rows)
        assert [len(t) for t in shared] == [len(g.response_ids) for g in flat]
        for a, b in zip(shared, packed):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_sampler_log_probs_replace_the_policy_forward(pretrained_tiny: Path):
    """generate(with_logps=True) draws the same samples and keeps each token's log-prob under logits / T as it
    drew it (DrawnTokenLogps); kl_metrics then needs no policy forward and gives the forward's KL to rounding."""
    import dataclasses

    from alignkit.config import EvalConfig, EvalSamplingConfig
    from alignkit.rollout.sampling import generate
    from alignkit.stages.evaluate import Context, kl_metrics

    reference, policy, tok, prompts = _reference_and_moved_policy(pretrained_tiny)
    k = 3
    kept = [g for per in generate(policy, tok, prompts, n=k, temperature=T, max_new_tokens=10, seed=0, with_logps=True)
            for g in per]
    plain = [g for per in generate(policy, tok, prompts, n=k, temperature=T, max_new_tokens=10, seed=0) for g in per]
    assert [g.response_ids for g in kept] == [g.response_ids for g in plain] and all(g.logps is None for g in plain)
    for g in kept:  # one log-prob per response token, the forward's to float rounding
        forward = _tempered_logp(policy, g.prompt_ids, g.response_ids, T)
        assert len(g.logps) == len(g.response_ids) and sum(g.logps) == pytest.approx(forward, abs=1e-4)
    cfg = EvalConfig(models=["x"], n_samples=k, sampling=EvalSamplingConfig(temperature=T), max_length=256)
    ctx = Context(cfg, prompts, None, [], (reference, tok), [])
    with_kept, with_forward = kl_metrics(ctx, policy, tok, kept), kl_metrics(ctx, policy, tok, plain)
    assert with_kept["kl"] > 0.01
    for key in ("kl", "kl_stderr", "kl_k3"):
        assert with_kept[key] == pytest.approx(with_forward[key], abs=1e-4), key
    # sequences cut at max_length (the packed fallback): the kept log-probs are cut where the reference's are
    short = dataclasses.replace(cfg, max_length=min(len(g.prompt_ids) + len(g.response_ids) for g in kept) - 1)
    ctx = Context(short, prompts, None, [], (reference, tok), [])
    assert kl_metrics(ctx, policy, tok, kept)["kl"] == pytest.approx(kl_metrics(ctx, policy, tok, plain)["kl"], abs=1e-4)
    # the reference itself: both sides its forward, exactly 0
    assert kl_metrics(ctx, reference, tok, kept, is_reference=True)["kl"] == 0.0
