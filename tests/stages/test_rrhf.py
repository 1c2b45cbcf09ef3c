"""End-to-end `alignkit rrhf` on the built-in task with a tiny model, on CPU, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit.cli import run_stage
from alignkit.data.tasks import get_task, load_task_records
from tests.helpers import killed_and_resumed, max_weight_diff, read_jsonl, run_cli, untrained_rm


def rrhf_overrides(model_dir: Path, **extra: object) -> list[str]:
    base = {
        "model": str(model_dir), "train_data": "task:sort/ranked?n=120&seed=4", "eval_data": 0.2,
        "max_length": 64, "batch_size": 8, "micro_batch_size": 4, "lr": 1e-3, "max_steps": 6,
        "warmup_steps": 1, "log_steps": 1, "reward": "given",
    }
    base.update(extra)
    return [f"{k.replace('__', '.')}={v}" for k, v in base.items()]  # sampling__chunk=4: sampling.chunk=4


def ragged_file(path: Path, n: int) -> Path:
    """Task ranked records cut to K = 2, 3, 4, 2, 3, 4, ... responses (scores never all tied)."""
    records, _ = load_task_records(f"task:sort/ranked?n={n}&seed=7")
    with open(path, "w") as handle:
        for i, r in enumerate(records):
            k = 2 + i % 3
            handle.write(json.dumps({"prompt": r["prompt"], "responses": r["responses"][:k], "scores": r["scores"][:k]}) + "\n")
    return path


def hand_loss(model_dir: Path, data: Path, rank_weight: float, sft_weight: float) -> dict[str, float]:
    """Mean RRHF loss over the file's lists, each response run through the model ALONE, written out plainly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.data.chat import tokenize_prompt_completion

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ranks, sfts = [], []
    for record in read_jsonl(data):
        logps, lengths = [], []
        for response in record["responses"]:
            ex = tokenize_prompt_completion(tok, record["prompt"], response, 64)
            ids = torch.tensor([ex["input_ids"]])
            with torch.no_grad():
                logp = model(ids).logits[0].float().log_softmax(-1)
            total, count = 0.0, 0
            for t in range(1, len(ex["labels"])):
                if ex["labels"][t] != -100:
                    total += logp[t - 1, ex["labels"][t]].item()
                    count += 1
            logps.append(total)
            lengths.append(count)
        p = [s / n for s, n in zip(logps, lengths)]
        r = record["scores"]
        rank = sum(max(p[i] - p[j], 0.0) for i in range(len(p)) for j in range(len(p)) if r[i] < r[j])
        best = max(range(len(r)), key=r.__getitem__)
        ranks.append(rank)
        sfts.append(-logps[best] / lengths[best])
    n = len(ranks)
    return {
        "rank_loss": sum(ranks) / n,
        "sft_loss": sum(sfts) / n,
        "loss": (rank_weight * sum(ranks) + sft_weight * sum(sfts)) / n,
    }


def test_step0_loss_equals_hand_assembled_rrhf_plus_nll(pretrained_tiny: Path, tmp_path: Path):
    # 9 ragged lists (K = 2, 3, 4), all in the one step's batch, over 3 micro-batches of uneven K mixes.
    data = ragged_file(tmp_path / "ragged.jsonl", 9)
    out = tmp_path / "run"
    run_stage("rrhf", rrhf_overrides(
        pretrained_tiny / "final", train_data=data, eval_data="null", batch_size=9, micro_batch_size=3,
        max_steps=1, rank_weight=0.7, sft_weight=1.3, output_dir=out,
    ))
    first = next(m for m in read_jsonl(out / "metrics.jsonl") if "loss" in m)
    expected = hand_loss(pretrained_tiny / "final", data, 0.7, 1.3)
    assert first["step"] == 1
    for key, value in expected.items():
        assert first[key] == pytest.approx(value, rel=1e-4), key
    assert expected["rank_loss"] > 0.05 and expected["sft_loss"] > 0.1  # both terms really contribute


def test_rank_accuracy_rises_on_heldout_lists_and_run_dir_is_complete(pretrained_tiny: Path, tmp_path: Path):
    out = tmp_path / "run"
    summary = run_stage("rrhf", rrhf_overrides(
        pretrained_tiny / "final", output_dir=out, train_data="task:sort/ranked?n=400&seed=4", eval_data=0.15,
        max_steps=30, batch_size=16, micro_batch_size=8, lr=2e-3, sft_weight=0.1, log_steps=5, save_steps=10,
    ))
    # Measured: 0.43 -> 0.71 (seed 0).
    assert summary["eval_rank_accuracy"] > summary["eval_rank_accuracy_before"] + 0.15, summary
    assert summary["eval_rank_loss"] < summary["eval_rank_loss_before"]
    assert summary["n_train_lists"] == 340 and summary["n_eval_lists"] == 60
    assert summary["dropped_lists"] == 0 and summary["responses_per_list"] == 4
    metrics = read_jsonl(out / "metrics.jsonl")
    train = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train] == [5, 10, 15, 20, 25, 30]
    for key in ("rank_loss", "sft_loss", "rank_accuracy", "top_reward", "best_reward", "grad_norm"):
        assert key in train[-1]
    for name in ("config.yaml", "summary.json", "lists.jsonl", "final/model.safetensors", "checkpoints/step-30"):
        assert (out / name).exists(), name
    assert any((out / "tb").iterdir())
    saved = json.loads((out / "summary.json").read_text())
    assert saved["eval_rank_accuracy"] == pytest.approx(summary["eval_rank_accuracy"])
    assert "eval_sft_loss" in saved and "eval_sft_loss_before" in saved


def test_gold_rewards_and_policy_samples(pretrained_tiny: Path, tmp_path: Path):
    out = tmp_path / "run"
    summary = run_stage("rrhf", rrhf_overrides(
        pretrained_tiny / "final", output_dir=out, train_data="task:sort/ranked?n=30&seed=4", eval_data=0.2,
        reward="gold", policy_samples=3, sampling__chunk=7, sampling__max_new_tokens=12, max_steps=1,
    ))
    task = get_task("sort")
    records, _ = load_task_records("task:sort/ranked?n=30&seed=4")
    gold_of_data = {(r["prompt"][0]["content"], t): g for r in records for t, g in zip(r["responses"], r["meta"]["gold"])}
    lists = read_jsonl(out / "lists.jsonl")
    assert len(lists) == 30 and sum(item["split"] == "eval" for item in lists) == 6
    n_samples = 0
    for item in lists:
        assert len(set(item["responses"])) == len(item["responses"])  # de-duplicated
        assert len(item["responses"]) <= 4 + 3
        for text, source, reward in zip(item["responses"], item["sources"], item["rewards"]):
            assert reward == task.gold_reward(item["prompt"], text)
            if source == "data":
                assert reward == gold_of_data[(item["prompt"][0]["content"], text)]
        n_samples += item["sources"].count("sample")
        assert item["sources"][:4] == ["data"] * 4
    assert n_samples > 0
    assert summary["samples_drawn"] == 3 * 24
    train_samples = sum(i["sources"].count("sample") for i in lists if i["split"] == "train")
    assert summary["samples_added"] == train_samples
    assert summary["responses_per_list"] == pytest.approx(4 + train_samples / 24)
    train_sample_rewards = [r for i in lists if i["split"] == "train"
                            for r, source in zip(i["rewards"], i["sources"]) if source == "sample"]
    assert summary["sample_reward_mean"] == pytest.approx(sum(train_sample_rewards) / len(train_sample_rewards))
    assert summary["reward"] == "gold"


def test_reward_model_scores_the_responses(pretrained_tiny: Path, tmp_path: Path):
    try:
        from alignkit.models.reward import load_reward_model, score_texts
    except ImportError as err:
        pytest.skip(f"alignkit.models.reward is not there yet: {err}")
    out = tmp_path / "run"
    # A reward model initialised from the tiny LM (fresh scalar head): untrained, but it scores.
    rm_dir = untrained_rm(pretrained_tiny / "final", tmp_path / "rm")
    run_stage("rrhf", rrhf_overrides(
        pretrained_tiny / "final", output_dir=out, train_data="task:sort/ranked?n=20&seed=4", eval_data="null",
        reward="rm", reward__model=rm_dir, policy_samples=1, max_steps=1,
    ))
    rm, rm_tok = load_reward_model(str(rm_dir))
    lists = read_jsonl(out / "lists.jsonl")
    prompts = [i["prompt"] for i in lists for _ in i["responses"]]
    responses = [r for i in lists for r in i["responses"]]
    with torch.no_grad():
        expected = score_texts(rm, rm_tok, prompts, responses, 8, 64)
    got = [r for i in lists for r in i["rewards"]]
    assert got == pytest.approx(list(expected), abs=1e-4)


def test_resume_after_kill_equals_uninterrupted(pretrained_tiny: Path, tmp_path: Path):
    # With policy samples: the resumed run must sample the same responses from the starting policy.
    common = rrhf_overrides(
        pretrained_tiny / "final", max_steps=8, save_steps=3, log_steps=2, reward="gold", policy_samples=1,
        sampling__max_new_tokens=12, train_data="task:sort/ranked?n=60&seed=4",
    )
    killed_dir = tmp_path / "killed"
    resumed = killed_and_resumed("rrhf", common, tmp_path, kill_at=5, checkpoint=3)
    assert "resumed from" in resumed.stderr and "step 3/8" in resumed.stderr
    assert max_weight_diff(tmp_path / "full" / "final", killed_dir / "final") < 1e-5
    assert (tmp_path / "full" / "lists.jsonl").read_text() == (killed_dir / "lists.jsonl").read_text()
    steps = [m["step"] for m in read_jsonl(killed_dir / "metrics.jsonl") if "loss" in m]
    assert steps == [2, 4, 6, 8]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "sort: b a", "responses": ["a b"], "scores": [1.0]}, "at least 2 responses"),
        ({"prompt": "sort: b a", "responses": ["a b", "b a"], "scores": [0.5, 0.5]}, "all scores/ranks are equal"),
    ],
    ids=["single-response", "ties-only"],
)
def test_bad_ranked_list_is_a_data_error(pretrained_tiny: Path, tmp_path: Path, record: dict, message: str):
    from alignkit.data.records import DataError

    good = {"prompt": "sort: c a b", "responses": ["a b c", "c a b"], "scores": [1.0, 0.0]}
    data = tmp_path / "ranked.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message) as err:
        run_stage("rrhf", rrhf_overrides(pretrained_tiny / "final", output_dir=tmp_path / "o", train_data=data, eval_data="null"))
    assert f"{data}:2" in str(err.value)


def test_config_errors_before_any_work(tmp_path: Path):
    from alignkit.config import ConfigError

    cases = [
        (["reward=given", "policy_samples=2"], "policy_samples"),
        (["reward=rm"], "reward.model"),
        (["reward=gold", f"train_data={tmp_path / 'x.jsonl'}"], "reward.task=sort"),
        (["reward=best"], "given, gold, rm"),
        (["rank_weight=0", "sft_weight=0"], "not both 0"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_stage("rrhf", [f"output_dir={tmp_path / 'o'}", *overrides])
    assert not (tmp_path / "o").exists()  # nothing was started
    # From the command line: a message and exit code 2, no traceback.
    res = run_cli(["rrhf", f"output_dir={tmp_path / 'o'}", "reward=given", "policy_samples=2"])
    assert res.returncode == 2 and "reward=gold" in res.stderr and "Traceback" not in res.stderr
