"""End-to-end `alignkit rm` and `alignkit score` on CPU with the tiny pretrained model, in seconds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from alignkit.cli import run_stage
from alignkit.config import ConfigError
from alignkit.data.records import DataError
from tests.helpers import killed_and_resumed, max_weight_diff, run_cli


def rm_overrides(model_dir: Path, train_data: str, **extra: object) -> list[str]:
    base = {"model": str(model_dir), "train_data": train_data, "eval_data": 0.2, "max_length": 64,
            "batch_size": 16, "micro_batch_size": 16, "lr": 2e-3, "max_steps": 16, "warmup_steps": 3, "log_steps": 4}
    base.update(extra)
    return [f"{k.replace('__', '.')}={v}" for k, v in base.items()]  # sampling__chunk=4: sampling.chunk=4


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def planted_pairs(n: int, seed: int) -> list[dict]:
    """The chosen reply starts with "ok", the rejected one with "no"; the rest is a random shuffle."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        items = rng.sample("abcdefghij", rng.randint(3, 6))
        shuffled = [" ".join(rng.sample(items, len(items))) for _ in range(2)]
        records.append({"prompt": "sort: " + " ".join(items), "chosen": "ok " + shuffled[0], "rejected": "no " + shuffled[1]})
    return records


@pytest.fixture(scope="module")
def planted_run(pretrained_tiny: Path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("rm_planted")
    data = write_jsonl(tmp / "planted.jsonl", planted_pairs(400, 0))
    run_stage("rm", rm_overrides(pretrained_tiny / "final", str(data), output_dir=tmp / "run"))
    return tmp / "run"


def test_rm_learns_a_planted_preference_and_writes_the_run_dir(planted_run: Path):
    summary = json.loads((planted_run / "summary.json").read_text())
    # 80 held-out pairs. Measured: 0.21 before, 1.0 after 16 steps.
    assert summary["eval_accuracy_before"] < 0.7
    assert summary["eval_accuracy"] > 0.95
    assert summary["eval_margin"] > summary["eval_margin_before"] + 1.0
    assert summary["train_pairs"] == 16 * 16 and summary["eval_n_pairs"] == 80
    assert [c["bucket"] for c in summary["eval_calibration"]] == [1, 2, 3, 4]
    assert sum(c["n"] for c in summary["eval_calibration"]) == 80
    assert "eval_gold_accuracy" not in summary  # no gold rewards in this data
    train = [json.loads(line) for line in (planted_run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [m["step"] for m in train] == [4, 8, 12, 16]
    assert train[-1]["accuracy"] > 0.9 and train[-1]["loss"] < train[0]["loss"]
    for name in ("config.yaml", "tb", "checkpoints/step-16", "final/config.json", "final/tokenizer.json"):
        assert (planted_run / name).exists(), name


def test_final_reloads_with_transformers_and_gives_the_same_rewards(planted_run: Path):
    from transformers import AutoModelForSequenceClassification

    from alignkit.models.reward import load_reward_model, reward_example, score_texts

    final = planted_run / "final"
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert hf.config.num_labels == 1 and hf.config.architectures == ["LlamaForSequenceClassification"]
    model, tok = load_reward_model(str(final))
    prompt = [{"role": "user", "content": "sort: c a b"}]
    responses = ["ok a b c", "no c a b", "ok b"]
    ours = score_texts(model, tok, [prompt] * 3, responses, batch_size=8, max_length=64)
    assert ours[0] > ours[1] and ours[2] > ours[1]
    for response, reward in zip(responses, ours):
        ids = torch.tensor([reward_example(tok, prompt, response, 64)["input_ids"]])
        with torch.no_grad():
            assert hf(ids).logits[0, 0].item() == pytest.approx(reward, abs=1e-5)


def test_ranked_lists_train(pretrained_tiny: Path, tmp_path: Path):
    rng = random.Random(1)
    records = []
    for _ in range(200):
        items = rng.sample("abcdefghij", 4)
        replies = [w + " " + " ".join(rng.sample(items, 4)) for w in ("ok", "meh", "no")]
        records.append({"prompt": "sort: " + " ".join(items), "responses": replies, "ranks": [1, 2, 3],
                        "meta": {"gold": [1.0, 0.5, 0.5]}})
    data = write_jsonl(tmp_path / "ranked.jsonl", records)
    summary = run_stage("rm", rm_overrides(pretrained_tiny / "final", str(data), output_dir=tmp_path / "r",
                                           batch_size=8, micro_batch_size=8, max_steps=12))
    assert summary["train_pairs"] == 12 * 8 * 3  # every ordered pair of 3 ranked responses
    assert summary["eval_n_pairs"] == 40 * 3
    assert summary["eval_accuracy"] > 0.9, summary
    # Gold ties (the 2nd and 3rd reply) are skipped: 2 gold pairs per list.
    assert summary["eval_label_gold_agreement"] == 1.0 and summary["eval_gold_accuracy"] > 0.9


def test_resume_after_kill_equals_uninterrupted(pretrained_tiny: Path, tmp_path: Path):
    common = rm_overrides(pretrained_tiny / "final", "task:sort/prefs?n=200&seed=5", batch_size=8,
                          micro_batch_size=4, max_steps=6, save_steps=2, log_steps=2, eval_data=0.1)
    killed_dir = tmp_path / "killed"
    resumed = killed_and_resumed("rm", common, tmp_path, kill_at=3, checkpoint=2, env={"OMP_NUM_THREADS": "1"})
    assert "step 2/6" in resumed.stderr
    assert max_weight_diff(tmp_path / "full" / "final", killed_dir / "final") < 1e-5
    full_summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    resumed_summary = json.loads((killed_dir / "summary.json").read_text())
    assert resumed_summary["eval_accuracy"] == pytest.approx(full_summary["eval_accuracy"])
    # The built-in task's records carry gold rewards: the summary says how the RM does against them.
    # a share of the 20 held-out pairs (eval_data=0.1 of 200) whose RM margin has gold's sign
    assert full_summary["eval_gold_accuracy"] * 20 == pytest.approx(round(full_summary["eval_gold_accuracy"] * 20))
    assert "eval_label_gold_agreement" in full_summary


BAD_RECORDS = [
    ({"prompt": "sort: b a", "chosen": "a b", "rejected": "a b"}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "sort: b a", "chosen": "a b", "rejected": "  "}, "'rejected' is empty"),
    ({"prompt": "sort: b a", "responses": ["a b", "b a"], "scores": [1, 1]}, "all scores/ranks are equal"),
    ({"prompt": "sort: b a", "responses": ["a b"], "scores": [1]}, "at least 2 responses"),
]


@pytest.mark.parametrize("bad, message", BAD_RECORDS)
def test_bad_input_names_file_and_line(bad: dict, message: str, tmp_path: Path):
    good = planted_pairs(3, 0) if "chosen" in bad else [
        {"prompt": "sort: b a", "responses": ["a b", "b a"], "scores": [1, 0]}] * 3
    data = write_jsonl(tmp_path / "bad.jsonl", good + [bad])
    with pytest.raises(DataError) as err:
        run_stage("rm", rm_overrides(Path("unused"), str(data), output_dir=tmp_path / "o"))
    assert f"{data}:4" in str(err.value) and message in str(err.value)


def test_bad_input_from_the_cli_exits_with_the_message(tmp_path: Path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    res = run_cli(["rm", *rm_overrides(Path("unused"), str(data), output_dir=tmp_path / "o")])
    assert res.returncode == 1 and f"{data}:1" in res.stderr and "identical" in res.stderr


def test_margin_modes_check_their_data(pretrained_tiny: Path, tmp_path: Path):
    data = write_jsonl(tmp_path / "pairs.jsonl", planted_pairs(10, 0))
    final = pretrained_tiny / "final"
    with pytest.raises(DataError, match="margin=field needs preference records with a numeric 'margin'"):
        run_stage("rm", rm_overrides(final, str(data), output_dir=tmp_path / "a", margin="field"))
    with pytest.raises(DataError, match="margin=scores needs ranked records"):
        run_stage("rm", rm_overrides(final, str(data), output_dir=tmp_path / "b", margin="scores"))
    with pytest.raises(ConfigError, match="margin"):
        run_stage("rm", rm_overrides(final, str(data), output_dir=tmp_path / "c", margin="llama"))


def test_score_command_adds_rewards_and_keeps_fields(planted_run: Path, tmp_path: Path, capsys):
    from alignkit.stages.score import main

    pairs = planted_pairs(20, 7)
    pairs[0]["id"] = "first"
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert main(["--model", str(planted_run / "final"), "--data", str(tmp_path / "pairs.jsonl"),
                 "--out", str(tmp_path / "out" / "pairs.jsonl"), "--batch-size", "7"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("scored 20 preference records (40 responses): mean reward")
    assert "accuracy (chosen > rejected) 1.0000" in line
    scored = [json.loads(x) for x in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert scored[0]["id"] == "first" and scored[0]["chosen"] == pairs[0]["chosen"]
    assert all(r["chosen_reward"] > r["rejected_reward"] for r in scored)

    sft = [{"prompt": "sort: b a", "completion": c} for c in ("ok a b", "no b a")]
    write_jsonl(tmp_path / "sft.jsonl", sft)
    main(["--model", str(planted_run / "final"), "--data", str(tmp_path / "sft.jsonl"), "--out", str(tmp_path / "sft_out.jsonl")])
    capsys.readouterr()
    ok, no = [json.loads(x) for x in (tmp_path / "sft_out.jsonl").read_text().splitlines()]
    assert ok["completion"] == "ok a b" and ok["reward"] > no["reward"]
    # Ranked lists get one reward per response, equal to the same texts scored as a pair.
    ranked = [{"prompt": pairs[0]["prompt"], "responses": [pairs[0]["chosen"], pairs[0]["rejected"]], "scores": [1, 0]}]
    write_jsonl(tmp_path / "ranked.jsonl", ranked)
    main(["--model", str(planted_run / "final"), "--data", str(tmp_path / "ranked.jsonl"), "--out", str(tmp_path / "r.jsonl")])
    rewards = json.loads((tmp_path / "r.jsonl").read_text())["rewards"]
    assert rewards == pytest.approx([scored[0]["chosen_reward"], scored[0]["rejected_reward"]], abs=1e-5)


def test_score_refuses_a_causal_lm_and_prompt_only_records(pretrained_tiny: Path, planted_run: Path, tmp_path: Path):
    from alignkit.models.loading import ModelError
    from alignkit.stages.score import main

    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "sort: b a"}])
    with pytest.raises(ModelError, match="not a reward model"):
        main(["--model", str(pretrained_tiny / "final"), "--data", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "o")])
    with pytest.raises(DataError, match="prompts.jsonl:1.*score needs responses"):
        main(["--model", str(planted_run / "final"), "--data", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "o")])


def test_ensemble_trains_k_seeded_members_and_scores_their_mean(pretrained_tiny: Path, tmp_path: Path):
    from alignkit.models.reward import RewardEnsemble, load_reward_model, score_texts

    data = write_jsonl(tmp_path / "planted.jsonl", planted_pairs(200, 3))
    common = rm_overrides(pretrained_tiny / "final", str(data), max_steps=8)
    summary = run_stage("rm", common + ["ensemble=2", f"output_dir={tmp_path / 'ens'}"])
    final = tmp_path / "ens" / "final"
    assert json.loads((final / "ensemble.json").read_text()) == {"members": ["member-0", "member-1"]}
    assert max_weight_diff(final / "member-0", final / "member-1") > 1e-3  # two seeds: two models
    assert summary["ensemble"] == 2 and len(summary["member_summaries"]) == 2
    assert summary["eval_accuracy"] == pytest.approx(sum(s["eval_accuracy"] for s in summary["member_summaries"]) / 2)

    ensemble, tok = load_reward_model(str(final))
    assert isinstance(ensemble, RewardEnsemble)
    prompts, responses = ["sort: c a b", "sort: b a"], ["ok a b c", "no b a"]
    members = [load_reward_model(str(final / f"member-{i}"))[0] for i in range(2)]
    each = [score_texts(m, tok, prompts, responses, 4, 64) for m in members]
    assert score_texts(ensemble, tok, prompts, responses, 4, 64) == pytest.approx(
        [(a + b) / 2 for a, b in zip(*each)], abs=1e-6)
    per_member = score_texts(ensemble, tok, prompts, responses, 4, 64, per_member=True)
    assert len(per_member) == 2 and all(m == pytest.approx(e, abs=1e-6) for m, e in zip(per_member, each))

    # `alignkit score` and ppo (proxy = the mean; critic started from the first member) take the directory
    from alignkit.stages.score import main as score_main
    from tests.stages.test_ppo import ppo_overrides

    assert score_main(["--model", str(final), "--data", str(data), "--out", str(tmp_path / "scored.jsonl")]) == 0
    scored = [json.loads(x) for x in (tmp_path / "scored.jsonl").read_text().splitlines()]
    first = score_texts(ensemble, tok, [scored[0]["prompt"]], [scored[0]["chosen"]], 4, 256)[0]
    assert scored[0]["chosen_reward"] == pytest.approx(first, abs=1e-5)
    ppo = run_stage("ppo", ppo_overrides(pretrained_tiny / "final", output_dir=tmp_path / "ppo", max_steps=1,
                                         **{"reward": "rm", "reward.model": str(final)}))
    assert ppo["critic_init"] == str(final) and (tmp_path / "ppo" / "final_critic").is_dir()

    # a refresh continues each member from its own previous weights (member i from member i)
    again = run_stage("rm", common + ["ensemble=2", f"model={final}", "max_steps=2", f"output_dir={tmp_path / 'more'}"])
    assert again["ensemble"] == 2
    for i in range(2):
        assert max_weight_diff(final / f"member-{i}", tmp_path / "more" / "final" / f"member-{i}") < \
            max_weight_diff(final / f"member-{1 - i}", tmp_path / "more" / "final" / f"member-{i}")
    with pytest.raises(ConfigError, match="ensemble of 2"):
        run_stage("rm", common + ["ensemble=3", f"model={final}", f"output_dir={tmp_path / 'three'}"])
