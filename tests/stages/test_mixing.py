"""Weighted train_data sources (domain mixing, replay) and several held-out sets in sft / pretrain."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from alignkit import config as C
from alignkit.cli import run_stage
from alignkit.data.records import data_sources, mix_records, mixture_shares
from alignkit.runtime.setup import BatchPlan
from alignkit.runtime.stage import load_train_eval
from tests.helpers import sft_overrides


def _parts() -> list[list[dict]]:
    domain = [{"text": f"domain {i}", "src": 0} for i in range(50)]
    general = [{"text": f"general {i}", "src": 1} for i in range(950)]
    return [domain, general]


def test_mixture_holds_each_source_in_its_share_exactly():
    # 1000 records, weights 0.3 / 0.7: 300 from the 50-record domain (each repeated 6 times), 700 of the 950.
    records, ids = mix_records(_parts(), mixture_shares([0.3, 0.7]), seed=0)
    assert len(records) == 1000 and Counter(ids) == {0: 300, 1: 700}
    assert Counter(r["src"] for r in records) == {0: 300, 1: 700}
    domain_counts = Counter(r["text"] for r in records if r["src"] == 0)
    assert set(domain_counts.values()) == {6}  # upsampled evenly: whole passes over the small source
    assert len({r["text"] for r in records if r["src"] == 1}) == 700  # subsampled without repeats
    again, _ = mix_records(_parts(), mixture_shares([0.3, 0.7]), seed=0)
    other, _ = mix_records(_parts(), mixture_shares([0.3, 0.7]), seed=1)
    assert again == records and other != records  # deterministic from the seed, and it matters
    # largest remainder: shares that do not divide the size still add up exactly
    _, ids = mix_records([[{"a": 1}]] * 3, mixture_shares([1, 1, 1]), seed=0, size=10)
    assert sorted(Counter(ids).values()) == [3, 3, 4]


def test_replay_adds_to_the_last_source_share():
    assert mixture_shares([1.0, 0.0], replay=0.2) == pytest.approx([0.8, 0.2])
    assert mixture_shares([0.5, 0.5], replay=0.2) == pytest.approx([0.4, 0.6])
    with pytest.raises(ValueError):
        mixture_shares([0.0, 0.0])


def test_batches_sample_the_sources_by_weight_over_many_steps():
    # Each step's batch is a seeded draw from the mixture (BatchPlan): over 300 steps of 32 rows the
    # domain share is 0.3 within sampling error, identically on 1 and 2 processes.
    records, ids = mix_records(_parts(), mixture_shares([0.3, 0.7]), seed=0)
    one = BatchPlan(n_rows=len(records), batch_size=32, micro_batch_size=8, world_size=1, rank=0, seed=0)
    two = [BatchPlan(n_rows=len(records), batch_size=32, micro_batch_size=8, world_size=2, rank=r, seed=0) for r in (0, 1)]
    drawn = []
    for step in range(300):
        rows = one.global_rows(step)
        local = sorted(i for plan in two for micro in plan.local_micro_batches(step) for i in micro)
        assert sorted(rows) == local
        drawn.extend(ids[i] for i in rows)
    share = drawn.count(0) / len(drawn)
    assert share == pytest.approx(0.3, abs=0.01)
    per_step = [sum(ids[i] == 0 for i in one.global_rows(s)) / 32 for s in range(300)]
    assert min(per_step) < 0.3 < max(per_step)  # a per-step draw, not a fixed pattern


def test_source_names_and_config_checks():
    names = [s.name for s in data_sources(["task:sort/sft?n=5", "task:sort/prompts?n=5", "data/general.jsonl.gz",
                                           {"path": "x.jsonl", "name": "mine", "weight": 2}])]
    assert names == ["sort", "sort_prompts", "general", "mine"]
    cfg = C.load_config(C.SFTConfig, None, ["train_data=[{path: a.jsonl, weight: 0.3}, {path: b.jsonl}]", "replay=0.1"])
    assert cfg.train_data == [{"path": "a.jsonl", "weight": 0.3}, {"path": "b.jsonl"}]
    for bad, message in [
        ("train_data=[{path: a.jsonl, wieght: 1}]", "did you mean 'weight'"),
        ("train_data=[{path: a.jsonl, weight: -1}]", "train_data[0].weight"),
        ("train_data=[{weight: 1}]", "train_data[0].path: required"),
        ("train_data=[{path: a, weight: 0}, {path: b, weight: 0}]", "sum to 0"),
        ("train_data=[{path: a}, b.jsonl]", "is not a"),
    ]:
        with pytest.raises(C.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            C.load_config(C.SFTConfig, None, [bad])
    with pytest.raises(C.ConfigError, match="replay: needs weighted train_data"):
        C.load_config(C.SFTConfig, None, ["train_data=a.jsonl", "replay=0.2"])
    with pytest.raises(C.ConfigError, match="is not a"):  # other stages keep plain train_data
        C.load_config(C.DPOConfig, None, ["train_data=[{path: a.jsonl, weight: 1}]"])


def test_load_train_eval_mixes_and_names_held_out_sets():
    cfg = C.load_config(C.SFTConfig, None, [
        "train_data=[{path: 'task:reverse/sft?n=100&seed=1', weight: 0.25}, {path: 'task:sort/sft?n=300&seed=1', weight: 0.75}]",
        "eval_data=['task:sort/sft?n=20&seed=9', 'task:reverse/sft?n=30&seed=9']"])
    train, held_out, _ = load_train_eval(cfg, "sft")
    tasks = Counter(r["meta"]["task"] for r in train)
    assert tasks == {"reverse": 100, "sort": 300}  # 400 records, 25% / 75%
    assert len(held_out) == 50 and {k: len(v) for k, v in held_out.sets.items()} == {"sort": 20, "reverse": 30}
    # a fraction is split off each source before mixing: none of the held-out records is trained on
    cfg = C.load_config(C.SFTConfig, None, [
        "train_data=[{path: 'task:reverse/sft?n=100&seed=1', weight: 1}, {path: 'task:sort/sft?n=100&seed=1', weight: 0}]",
        "eval_data=0.1", "replay=0.5"])
    train, held_out, _ = load_train_eval(cfg, "sft")
    assert Counter(r["meta"]["task"] for r in train) == {"reverse": 90, "sort": 90}
    assert {k: len(v) for k, v in held_out.sets.items()} == {"reverse": 10, "sort": 10}
    trained = {json.dumps(r, sort_keys=True) for r in train}
    assert not any(json.dumps(r, sort_keys=True) in trained for r in held_out)


def test_sft_runs_on_a_weighted_mixture(pretrained_tiny: Path, tmp_path: Path):
    out = tmp_path / "mix"
    summary = run_stage("sft", sft_overrides(
        pretrained_tiny / "final", output_dir=out, max_steps=6,
        train_data="[{path: 'task:reverse/sft?n=200&seed=0', weight: 0.5}, {path: 'task:sort/sft?n=200&seed=0', weight: 0.5}]",
        eval_data="['task:sort/sft?n=40&seed=9', 'task:reverse/sft?n=40&seed=9']"))
    assert summary["n_train_records"] == 400 and summary["eval_loss"] < summary["eval_loss_before"]
    # each named held-out set is reported on its own, before and after, and the overall loss mixes them
    for name in ("sort", "reverse"):
        assert summary[f"eval_loss/{name}"] < summary[f"eval_loss/{name}_before"]
    low, high = sorted([summary["eval_loss/sort"], summary["eval_loss/reverse"]])
    assert low < summary["eval_loss"] < high
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["eval_loss/sort"] == summary["eval_loss/sort_before"]
    saved = C.load_config(C.SFTConfig, out / "config.yaml")  # the resolved config loads back
    assert saved.train_data[0] == {"path": "task:reverse/sft?n=200&seed=0", "weight": 0.5}


def test_train_lm_reports_each_held_out_set(pretrained_tiny: Path, tmp_path: Path):
    # The hook sft/pretrain pass several held-out sets through: eval_loss/<name> before and after, beside the
    # overall eval_loss, each a real loss over its own rows (the sets differ, so their losses differ).
    from alignkit.models.loading import load_causal_lm
    from alignkit.runtime.lm import train_lm
    from alignkit.runtime.setup import make_accelerator
    from alignkit.stages.sft import token_rows

    cfg = C.load_config(C.SFTConfig, None, sft_overrides(pretrained_tiny / "final", output_dir=tmp_path / "run", max_steps=4))
    (tmp_path / "run").mkdir()
    accelerator = make_accelerator("no")
    model, tokenizer = load_causal_lm(str(pretrained_tiny / "final"))
    train, _, _ = load_train_eval(cfg, "sft")
    cfg2 = C.load_config(C.SFTConfig, None, ["eval_data=['task:sort/sft?n=30&seed=9', 'task:reverse/sft?n=30&seed=9']"])
    _, held_out, _ = load_train_eval(cfg2, "sft")
    rows = lambda records: token_rows(tokenizer, records, cfg.max_length, cfg.packing)[0]  # noqa: E731
    sets = {name: rows(records) for name, records in held_out.sets.items()}
    _, summary = train_lm(cfg, accelerator, model, tokenizer.pad_token_id, rows(train), rows(held_out), True, "sft",
                          eval_sets=sets)
    for name in ("sort", "reverse"):
        assert 0 < summary[f"eval_loss/{name}"] < summary[f"eval_loss/{name}_before"] + 1.0
        assert f"eval_ppl/{name}" in summary
    assert summary["eval_loss/sort"] != summary["eval_loss/reverse"]
    low, high = sorted([summary["eval_loss/sort"], summary["eval_loss/reverse"]])
    assert low <= summary["eval_loss"] <= high  # the overall loss is the token-weighted mix of the two
