"""End-to-end `alignkit dpo` on the sorting task's preference pairs with the tiny pretrained model, on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from alignkit.cli import run_stage
from tests.helpers import killed_and_resumed, max_weight_diff, read_jsonl, run_cli

LOG2 = math.log(2.0)


def dpo_overrides(model_dir: str | Path, **extra: object) -> list[str]:
    base = {
        "model": str(model_dir), "train_data": "task:sort/prefs?n=400&seed=3", "eval_data": 0.2,
        "max_length": 64, "batch_size": 16, "micro_batch_size": 8, "lr": 1e-3, "max_steps": 3,
        "warmup_steps": 0, "lr_schedule": "constant", "log_steps": 1, "beta": 0.1,
    }
    base.update(extra)
    return [f"{k.replace('__', '.')}={v}" for k, v in base.items()]  # sampling__chunk=4: sampling.chunk=4


def train_logs(out: Path) -> list[dict]:
    return [m for m in read_jsonl(out / "metrics.jsonl") if "loss" in m]


def test_dpo_implicit_reward_learns_held_out_preferences(pretrained_tiny: Path, tmp_path: Path):
    out = tmp_path / "dpo"
    summary = run_stage("dpo", dpo_overrides(pretrained_tiny / "final", output_dir=out, max_steps=30, log_steps=5, lr=2e-3, beta=0.3))
    # Before training policy == reference: every implicit reward is exactly 0, a tie counted as half.
    assert summary["eval_loss_before"] == pytest.approx(LOG2, abs=1e-6)
    assert summary["eval_reward_accuracy_before"] == 0.5
    assert summary["eval_reward_margin_before"] == 0.0
    # Measured on 80 held-out pairs: accuracy 0.5 -> 0.69, loss 0.693 -> 0.53, margin 0 -> 1.26, gold
    # accuracy 0.5 -> 0.72 (a 40-step pretrained model, 1.5 epochs of 320 pairs).
    assert summary["eval_reward_accuracy"] > 0.62, summary
    assert summary["eval_loss"] < 0.6
    assert summary["eval_reward_margin"] > 0.5
    assert summary["eval_gold_accuracy"] > 0.62  # the task's pairs carry gold meta
    assert summary["n_train_pairs"] == 320 and summary["n_eval_pairs"] == 80 and summary["dropped_pairs"] == 0
    assert summary["ref_logps"] == "computed" and summary["examples_per_s"] > 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/model.safetensors", "ref_logps.pt",
                 "checkpoints/step-30/trainer_state.json"):
        assert (out / name).exists(), name
    assert any((out / "tb").iterdir())
    logs = train_logs(out)
    assert [m["step"] for m in logs] == [5, 10, 15, 20, 25, 30]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert key in logs[-1], key
    last = logs[-1]
    assert last["rewards/margins"] == pytest.approx(last["rewards/chosen"] - last["rewards/rejected"], abs=1e-5)


def test_first_step_loss_is_log2_and_precompute_matches_on_the_fly(pretrained_tiny: Path, tmp_path: Path):
    pre = run_stage("dpo", dpo_overrides(pretrained_tiny / "final", output_dir=tmp_path / "pre", max_steps=2))
    fly = run_stage("dpo", dpo_overrides(pretrained_tiny / "final", output_dir=tmp_path / "fly", max_steps=2, precompute_ref=False))
    assert fly["ref_logps"] == "on_the_fly" and not (tmp_path / "fly" / "ref_logps.pt").exists()
    first_pre, first_fly = train_logs(tmp_path / "pre")[0], train_logs(tmp_path / "fly")[0]
    # Step 1 is scored by the untouched policy: h = 0, loss = -log sigmoid(0) = log 2.
    assert first_pre["loss"] == pytest.approx(LOG2, abs=1e-5)
    assert first_fly["loss"] == pytest.approx(first_pre["loss"], abs=1e-6)
    # Step 2 (after one update) and the held-out numbers agree too: same reference, only computed differently.
    assert train_logs(tmp_path / "fly")[1]["loss"] == pytest.approx(train_logs(tmp_path / "pre")[1]["loss"], abs=1e-5)
    assert fly["eval_loss"] == pytest.approx(pre["eval_loss"], abs=1e-5)
    assert max_weight_diff(tmp_path / "pre" / "final", tmp_path / "fly" / "final") < 1e-5
    # A separate ref_model (here the same weights from disk) is the same reference.
    sep = run_stage("dpo", dpo_overrides(pretrained_tiny / "final", output_dir=tmp_path / "sep", max_steps=2,
                                         ref_model=str(pretrained_tiny / "final")))
    assert sep["eval_loss"] == pytest.approx(pre["eval_loss"], abs=1e-6)


def test_lora_reference_with_adapters_disabled_matches_precomputed(pretrained_tiny: Path, tmp_path: Path):
    common = dict(max_steps=2, **{"lora.r": 4, "lr": 1e-2})
    pre = run_stage("dpo", dpo_overrides(pretrained_tiny / "final", output_dir=tmp_path / "pre", **common))
    off = run_stage("dpo", dpo_overrides(pretrained_tiny / "final", output_dir=tmp_path / "off", precompute_ref=False, **common))
    assert off["ref_logps"] == "adapters_disabled"
    assert train_logs(tmp_path / "off")[1]["loss"] == pytest.approx(train_logs(tmp_path / "pre")[1]["loss"], abs=1e-5)
    assert off["eval_loss"] == pytest.approx(pre["eval_loss"], abs=1e-5)
    assert abs(off["eval_loss"] - LOG2) > 1e-3  # the adapters moved the policy away from its (frozen) base


def test_ipo_label_smoothing_and_sft_term_first_losses(pretrained_tiny: Path, tmp_path: Path):
    beta = 0.1
    ipo = run_stage("dpo", dpo_overrides(pretrained_tiny / "final", output_dir=tmp_path / "ipo", loss_type="ipo", beta=beta, lr=1e-4,
                                         max_steps=10))
    assert train_logs(tmp_path / "ipo")[0]["loss"] == pytest.approx((1 / (2 * beta)) ** 2, rel=1e-5)  # h = 0: (0 - 1/(2 beta))^2 = 25
    assert ipo["eval_loss_before"] == pytest.approx(25.0, rel=1e-6)
    # Ten steps (measured: held-out loss 25 -> 22.93, accuracy 0.5 -> 0.6); three steps gave 0.6 in an earlier
    # session but 0.49 on this machine: too few for a stable check.
    assert ipo["eval_loss"] < ipo["eval_loss_before"] and ipo["eval_reward_accuracy"] > 0.55

    cdpo = run_stage("dpo", dpo_overrides(pretrained_tiny / "final", output_dir=tmp_path / "cdpo", label_smoothing=0.2,
                                          lr=2e-3, beta=0.3, max_steps=10))
    assert train_logs(tmp_path / "cdpo")[0]["loss"] == pytest.approx(LOG2, abs=1e-5)  # both mixture terms are log 2 at h = 0
    # Measured: held-out accuracy 0.5 -> 0.59, loss 0.693 -> 0.678 (ten steps).
    assert cdpo["eval_reward_accuracy"] > 0.55 and cdpo["eval_loss"] < cdpo["eval_loss_before"]

    run_stage("dpo", dpo_overrides(pretrained_tiny / "final", output_dir=tmp_path / "sft", sft_weight=0.5, max_steps=1))
    first = train_logs(tmp_path / "sft")[0]
    # loss = DPO term (log 2 at the start) + 0.5 * per-token NLL of the chosen completion (mean over pairs).
    assert first["nll/chosen"] > 0
    assert first["loss"] == pytest.approx(LOG2 + 0.5 * first["nll/chosen"], abs=1e-5)


def test_resume_after_kill_equals_uninterrupted_and_reuses_reference(pretrained_tiny: Path, tmp_path: Path):
    common = dpo_overrides(pretrained_tiny / "final", max_steps=6, save_steps=2, log_steps=2)
    killed_dir = tmp_path / "killed"
    resumed = killed_and_resumed("dpo", common, tmp_path, kill_at=3, checkpoint=2)
    assert "step 2/6" in resumed.stderr
    assert json.loads((killed_dir / "summary.json").read_text())["ref_logps"] == "cached"
    assert max_weight_diff(tmp_path / "full" / "final", killed_dir / "final") < 1e-5
    assert [m["step"] for m in train_logs(killed_dir)] == [2, 4, 6]


def _pairs_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"prompt": "sort: b a", "chosen": "a b", "rejected": "a b"}, "identical"),
        ({"prompt": "sort: b a", "chosen": "a b", "rejected": "   "}, "'rejected' is empty"),
        ({"prompt": "sort: b a", "chosen": "a b"}, "rejected"),
    ],
)
def test_bad_pairs_name_file_line_and_problem(tmp_path: Path, bad_row: dict, message: str):
    good = {"prompt": "sort: c a b", "chosen": "a b c", "rejected": "c a b"}
    data = _pairs_file(tmp_path / "pairs.jsonl", [good, bad_row])
    res = run_cli(["dpo", "model=scratch:tiny", f"train_data={data}", "eval_data=null", f"output_dir={tmp_path / 'o'}"])
    assert res.returncode == 1, res.stderr[-2000:]
    assert f"{data}:2" in res.stderr and message in res.stderr
    assert "Traceback" not in res.stderr


def test_every_pair_truncated_and_bad_options_are_clear_errors(pretrained_tiny: Path, tmp_path: Path):
    res = run_cli(["dpo", *dpo_overrides(pretrained_tiny / "final", output_dir=tmp_path / "t", max_length=4)])
    assert res.returncode == 1 and "max_length=4" in res.stderr and "truncation" in res.stderr, res.stderr[-2000:]
    res = run_cli(["dpo", "loss_type=hinge", f"output_dir={tmp_path / 'h'}"])
    assert res.returncode == 2 and "loss_type" in res.stderr and "ipo" in res.stderr
    res = run_cli(["dpo", "loss_type=ipo", "label_smoothing=0.1", f"output_dir={tmp_path / 'i'}"])
    assert res.returncode == 2 and "label_smoothing" in res.stderr


def test_pair_logps_equal_full_sequence_logps(pretrained_tiny: Path):
    """pair_logps (each prompt once, the head only on completion tokens) against sequence_logps of every
    sequence whole: the same log-probs and gradients."""
    import torch

    from alignkit.data.records import load_records
    from alignkit.models.loading import load_causal_lm
    from alignkit.runtime.sequences import sequence_logps
    from alignkit.stages.dpo import pair_logps, tokenize_pairs

    model, tok = load_causal_lm(str(pretrained_tiny / "final"))
    records, _ = load_records("task:sort/prefs?n=6&seed=1", "preference")
    pairs, _ = tokenize_pairs(tok, records, 64)
    examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    b = len(pairs)
    for row_tokens in (1, 256):  # one pair per row vs several packed in a row
        model.zero_grad()
        full, full_counts = sequence_logps(model, examples, tok.pad_token_id, row_tokens)
        full.sum().backward()
        full_grad = model.get_input_embeddings().weight.grad.clone()
        model.zero_grad()
        chosen, rejected, chosen_counts = pair_logps(model, pairs, tok.pad_token_id, row_tokens)
        (chosen.sum() + rejected.sum()).backward()
        assert torch.equal(chosen_counts, full_counts[:b])
        torch.testing.assert_close(torch.cat([chosen, rejected]), full, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.get_input_embeddings().weight.grad, full_grad, rtol=1e-4, atol=1e-5)
    assert all(0 < c < len(e["input_ids"]) for c, e in zip(full_counts.tolist(), examples))
