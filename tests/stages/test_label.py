"""`alignkit label`: the SFT model's own samples ranked by an annotator, as reward-model and DPO data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.cli import run_stage
from alignkit.config import ConfigError
from alignkit.data.records import load_records
from alignkit.data.tasks import get_task


def _label(model: Path, out: Path, *extra: str) -> dict:
    return run_stage("label", [f"model={model}", "train_data=task:sort/prompts?n=24&seed=3", f"output_dir={out}",
                               "n=4", "sampling.max_new_tokens=16", "sampling.chunk=8", *extra])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_gold_annotator_ranks_by_gold_and_files_load_as_rm_and_dpo_data(pretrained_tiny: Path, tmp_path: Path):
    summary = _label(pretrained_tiny / "final", tmp_path / "gold", "annotator=gold")
    task = get_task("sort")
    ranked = _rows(tmp_path / "gold" / "ranked.jsonl")
    pairs = _rows(tmp_path / "gold" / "pairs.jsonl")
    assert ranked and len(pairs) == len(ranked) == summary["train_lists"]
    for row, pair in zip(ranked, pairs):
        # scores ARE the gold rewards of the responses, recomputed here from the task
        assert row["scores"] == pytest.approx([task.gold_reward(row["prompt"], r) for r in row["responses"]])
        assert len(set(r.strip() for r in row["responses"])) == len(row["responses"])  # no duplicates
        assert all(r.strip() for r in row["responses"])  # no empty response
        assert pair["chosen"] == row["responses"][max(range(len(row["scores"])), key=row["scores"].__getitem__)]
        assert pair["meta"]["gold_chosen"] > pair["meta"]["gold_rejected"]
    assert summary["train_pair_label_gold_agreement"] == 1.0
    assert summary["train_samples"] == 24 * 4
    assert len(load_records(str(tmp_path / "gold" / "ranked.jsonl"), "ranked")[0]) == len(ranked)
    assert len(load_records(str(tmp_path / "gold" / "pairs.jsonl"), "preference")[0]) == len(pairs)


def test_simulated_annotator_is_noisy_and_seeded(pretrained_tiny: Path, tmp_path: Path):
    noisy = _label(pretrained_tiny / "final", tmp_path / "a", "annotator=task", "noise=1.0", "length_bias=0")
    again = _label(pretrained_tiny / "final", tmp_path / "b", "annotator=task", "noise=1.0", "length_bias=0")
    assert (tmp_path / "a" / "ranked.jsonl").read_text() == (tmp_path / "b" / "ranked.jsonl").read_text()
    assert noisy["train_pair_label_gold_agreement"] == again["train_pair_label_gold_agreement"]
    # with noise far above the gold differences, labels disagree with gold on some pairs
    assert noisy["train_pair_label_gold_agreement"] < 1.0


@pytest.mark.parametrize("args, message", [
    (["n=1"], "n must be >= 2"),
    (["annotator=judge"], "annotator must be one of"),
    (["annotator=rm"], "needs reward.model"),
])
def test_bad_config(tmp_path: Path, args: list[str], message: str):
    with pytest.raises(ConfigError, match=message):
        run_stage("label", ["model=unused", "train_data=task:sort/prompts?n=4", f"output_dir={tmp_path}", *args])
