"""bench/: the arithmetic behind the reported numbers, and that the scripts import with consistent settings (no training, no TRL)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import bench_dpo, bench_rl, bench_rm  # noqa: E402
from bench.common import PaddingCounter, ratio_lines, steady_rate, summarize, variant_table  # noqa: E402


def test_steady_rate_excludes_warmup_steps():
    # step k finished at times[k]; steps 1-2 are warm-up; steps 3..5 take 2 s each with 32 examples per step
    times = {0: 0.0, 1: 10.0, 2: 11.0, 3: 13.0, 4: 15.0, 5: 17.0}
    rate, per_step = steady_rate(times, warmup=2, examples_per_step=32)
    assert per_step == pytest.approx(2.0)
    assert rate == pytest.approx(16.0)


def test_steady_rate_needs_timed_steps():
    with pytest.raises(ValueError):
        steady_rate({0: 0.0, 1: 1.0, 2: 2.0}, warmup=2, examples_per_step=4)


def test_padding_counter_fraction():
    counter = PaddingCounter()
    counter.add(forward=100, real=75)
    counter.add(forward=100, real=85)
    assert counter.facts() == {"forward_tokens": 200, "real_tokens": 160, "pad_fraction": pytest.approx(0.2),
                               "training_forwards": 2}


def _run(rate: float, cpu_rate: float, rss: float) -> dict:
    return {"examples_per_s": rate, "examples_per_cpu_s": cpu_rate, "s_per_step": 32 / rate, "peak_rss_mb": rss,
            "setup_s": 1.0, "load_before": 2.0, "load_after": 2.5, "pad_fraction": 0.1}


def test_summarize_takes_medians_and_range():
    m = summarize([_run(10, 20, 500), _run(30, 40, 700), _run(20, 30, 600)])
    assert (m["examples_per_s"], m["rate_min"], m["rate_max"], m["peak_rss_mb"]) == (20, 10, 30, 600)
    assert m["repeats"] == 3


def test_ratio_lines_verdict_needs_speed_and_memory():
    medians = {"ours": summarize([_run(26, 26, 500)]), "fast_fat": summarize([_run(26, 26, 900)]),
               "theirs": summarize([_run(20, 20, 600)])}
    met, = ratio_lines(medians, [("ours", "theirs", "a")], target=1.3)
    assert "x1.30" in met and "x0.83" in met and "MET" in met and "NOT" not in met
    slower, = ratio_lines(medians, [("theirs", "ours", "b")], target=1.3)
    assert "NOT met" in slower
    fat, = ratio_lines(medians, [("fast_fat", "theirs", "c")], target=1.3)
    assert "NOT met" in fat  # fast enough but more peak memory
    assert ratio_lines(medians, [("ours", "absent", "d")]) == []
    assert variant_table(medians).count("\n") == 4  # header, rule, 3 rows


def test_scripts_share_the_settings_the_brief_asks_for():
    for module in (bench_dpo, bench_rm):
        assert set(module.SETTINGS) == {"tiny", "smollm2"}
        for s in module.SETTINGS.values():
            assert s["batch"] % s["micro"] == 0  # the same micro-batches for both frameworks
    assert bench_dpo.VARIANTS == [("alignkit", True), ("alignkit", False), ("trl", False), ("trl", True)]
    assert bench_rm.VARIANTS == ["alignkit", "trl"]


def test_rl_settings_one_update_per_rollout():
    s = bench_rl.run_settings(bench_rl.parse_args(["--model", "tiny"]))
    assert (s["prompts"], s["group"], s["completions"], s["accumulation"]) == (16, 8, 128, 4)
    quick = bench_rl.run_settings(bench_rl.parse_args(["--quick", "--model", "smollm2"]))
    assert quick["completions"] == quick["micro"] * quick["accumulation"] and quick["steps"] > quick["warmup"]
    for model in bench_rl.SETTINGS:
        s = bench_rl.run_settings(bench_rl.parse_args(["--model", model]))
        assert s["completions"] % s["micro"] == 0 and s["steps"] > s["warmup"]
    with pytest.raises(ValueError):  # 3 x 8 = 24 completions do not split into micro-batches of 16
        bench_rl.run_settings(bench_rl.parse_args(["--prompts", "3", "--micro", "16"]))
    with pytest.raises(SystemExit):
        bench_rl.parse_args(["--variants", "alignkit-grpo,trl-ppo"])


def test_rl_split_and_token_rates():
    # 3 steps, the first not timed; 2 timed steps of 4 s wall each
    per_step = [{"gen_s": 9.0, "fwd_s": 9.0, "update_s": 9.0, "sequences": 8, "response_tokens": 99, "all_tokens": 999},
                {"gen_s": 1.0, "fwd_s": 0.5, "update_s": 2.0, "sequences": 8, "response_tokens": 40, "all_tokens": 200},
                {"gen_s": 3.0, "fwd_s": 0.5, "update_s": 2.0, "sequences": 8, "response_tokens": 56, "all_tokens": 200}]
    split = bench_rl.split_columns(per_step, warmup=1)
    assert (split["gen_s"], split["fwd_s"], split["update_s"]) == (2.0, 0.5, 2.0)
    assert (split["response_tokens"], split["all_tokens"], split["mean_length"]) == (96, 400, 6.0)
    r = bench_rl.token_rates({**split, "s_per_step": 4.0, "timed_steps": 2})
    assert r == {"sampled_tokens_per_s": 12.0, "gen_tokens_per_s": 24.0, "update_tokens_per_s": 100.0}
    with pytest.raises(ValueError):
        bench_rl.split_columns(per_step[:1], warmup=1)


def test_rl_tables():
    row = {**_run(20, 25, 500), "gen_s": 1.0, "fwd_s": 0.2, "update_s": 0.4, "sampled_tokens_per_s": 100.0,
           "mean_length": 7.0}
    medians = {"alignkit-grpo": summarize([row]), "trl-grpo": summarize([{**row, "examples_per_s": 10.0}])}
    assert bench_rl.rl_table(medians).count("\n") == 3
    line, = ratio_lines(medians, bench_rl.COMPARISONS, bench_rl.TARGET)
    assert "x2.00" in line and "MET" in line
    floors = {"params": 1_000_000, "completions": 16, "generate": {"s": 0.5, "tokens": 100},
              "forward": {"s": 0.1, "tokens": 500}, "fwd_bwd": {"s": 0.3, "tokens": 500}}
    table = bench_rl.floor_table(floors, peak_gflops=40.0)
    assert "| 0.300 | 500 | 1666.7 | 53.33 | 10.00 | 25.0 |" in table  # 6 * 1e6 * 500 / 0.3 s = 10 GFLOP/s
    assert bench_rl.gflops(2e9, 0.5) == pytest.approx(4.0)


def test_ppo_memory_counts_each_resident_tensor_once():
    import torch

    from bench import bench_ppo_memory

    actor, critic = torch.nn.Linear(4, 3), torch.nn.Linear(4, 1, bias=False)
    ref = torch.nn.Linear(4, 3).requires_grad_(False)
    shared = torch.nn.Module()
    shared.weight = actor.weight  # a tensor two models share (a LoRA base, tied embeddings) counts once
    counts = bench_ppo_memory.held_parameters({"actor": actor, "critic": critic, "reference": ref, "tied": shared,
                                                "value_head": None}, offloaded={"reference"})
    assert counts == {"params_held": 15 + 4 + 15, "params_on_device_in_update": 19, "params_trainable": 19,
                      "models": ["actor", "critic", "reference", "tied"]}
    assert set(bench_ppo_memory.SETUPS) == {"plain", "share_backbone", "lora", "offload_frozen",
                                            "gradient_checkpointing"}


# ------------------------------------------------------------------------------ bench_sft, run_all


def test_sft_forward_counter_and_rates():
    from bench import bench_sft

    counter = bench_sft.ForwardCounter()
    for _ in range(6):  # 3 steps x 2 micro-batches of (samples, real tokens, forward tokens)
        counter.add(4, 90, 100)
    facts = counter.timed(warmup=1, last=3, accumulation=2)
    assert (facts["timed_samples"], facts["timed_real_tokens"], facts["timed_forward_tokens"]) == (16, 360, 400)
    assert facts["pad_fraction"] == pytest.approx(0.1)
    spec = {"warmup": 1, "batch": 4, "micro": 2}
    r = bench_sft.sft_rates({0: 0.0, 1: 5.0, 2: 7.0, 3: 9.0}, {0: 0.0, 1: 4.0, 2: 5.0, 3: 6.0}, counter, spec)
    assert (r["examples_per_s"], r["examples_per_cpu_s"], r["tokens_per_s"], r["rows_per_s"]) == (4.0, 8.0, 90.0, 2.0)
    assert bench_sft.mfu({"params": 1e6, "tokens_per_s": 1000.0}, peak_gflops=60.0) == pytest.approx(0.1)
    for s in bench_sft.SETTINGS.values():
        assert s["batch"] % s["micro"] == 0


def _bench_json(tmp_path: Path, name: str, payload: dict) -> Path:
    import json

    path = tmp_path / name
    path.write_text(json.dumps(payload))
    return path


def _fake_reports(tmp_path: Path) -> list[str]:
    sft = {"models": {"tiny": {"medians": {
        "alignkit": {**summarize([_run(30, 30, 500)]), "mfu": 0.4}, "trl": {**summarize([_run(20, 20, 600)]), "mfu": 0.25}}}},
        "matmul_before": {"gflops": 80.0}, "matmul_after": {"gflops": 85.0}}
    dpo = {"models": {"smollm2": {"medians": {"alignkit, ref precomputed": summarize([_run(2, 2, 500)]),
                                              "trl, ref on the fly": summarize([_run(1, 1, 400)])}}}}
    rl = {"medians": {"alignkit-grpo": summarize([_run(10, 10, 500)]), "trl-grpo": summarize([_run(10, 10, 500)])}}
    return [f"sft:tiny={_bench_json(tmp_path, 'sft.json', sft)}", f"dpo:smollm2={_bench_json(tmp_path, 'dpo.json', dpo)}",
            f"rl:tiny={_bench_json(tmp_path, 'rl.json', rl)}", f"rm:tiny={tmp_path / 'absent.json'}"]


def test_run_all_table_from_fake_results(tmp_path):
    import json

    from bench import run_all

    out = tmp_path / "table"
    report = run_all.main(["--from-json", *_fake_reports(tmp_path), "--out", str(out)])
    rows = {(r["bench"], r["model"], r["comparison"]): r for r in report["rows"]}
    assert len(rows) == 3  # sft, dpo default-vs-default (the other DPO pairs are absent), grpo (rloo absent)
    sft = rows[("sft", "tiny", "sft vs SFTTrainer (packing)")]
    assert sft["ratio"] == pytest.approx(1.5) and sft["memory_ratio"] == pytest.approx(500 / 600) and sft["met"]
    assert sft["matmul_gflops"] == [80.0, 85.0]
    dpo = rows[("dpo", "smollm2", "dpo default vs DPOTrainer default")]
    assert dpo["ratio"] == pytest.approx(2.0) and not dpo["met"]  # fast, but more memory
    assert not rows[("rl", "tiny", "grpo vs GRPOTrainer")]["met"]
    assert report["failed"] == [{"bench": "rm", "model": "tiny", "error": f"no {tmp_path / 'absent.json'}"}]
    text = out.with_suffix(".md").read_text()
    assert "| sft | tiny | sft vs SFTTrainer (packing) | 30.00 | 20.00 | x1.50 | x1.50 | x0.83 | 40.0 / 25.0 | 80.0/85.0 |" in text
    assert "trl" in json.loads(out.with_suffix(".json").read_text())["versions"]
    assert text.count("\n| ") == 5  # header, rule, 3 rows


def test_run_all_arguments_and_dry_run(capsys):
    from bench import run_all

    args = run_all.parse_args(["--only", "rm,sft", "--model", "tiny", "--repeats", "2", "--steps", "4"])
    assert (args.only, args.model) == (["sft", "rm"], ["tiny"])  # canonical order
    entries = run_all.plan(args)
    assert [(e["bench"], e["model"]) for e in entries] == [("sft", "tiny"), ("rm", "tiny")]
    assert entries[0]["command"][1:3] == ["bench/bench_sft.py", "--model"]
    assert "--repeats" in entries[1]["command"] and entries[1]["command"][-2:] == ["--steps", "4"]
    every = run_all.plan(run_all.parse_args([]))
    assert len(every) == len(run_all.BENCHES) * len(run_all.MODELS)
    dpo = next(e for e in every if e["bench"] == "dpo")
    assert dpo["command"][1:3] == ["bench/bench_dpo.py", "speed"]
    for bad in (["--only", "sft,ppo"], ["--model", "llama"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            run_all.parse_args(bad)
    assert run_all.main(["--dry-run", "--only", "rl", "--model", "smollm2"]) is None
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "bench/bench_rl.py" in printed[0] and "--model smollm2" in printed[0]
    for script in {e["command"][1] for e in every}:
        assert (run_all.REPO / script).exists()


def test_pipeline_budget_speed_against_the_reference_figures(tmp_path):
    from bench import pipeline_budget as pb

    # twice the reference's training speed at both sizes and sampling in half the time: 2x, and a 300 s run
    # here is a 600 s run there
    measured = {"train_0.9M_tokens_per_s": 27_400.0, "train_2.9M_tokens_per_s": 11_200.0, "sample_64x24_s": 0.15}
    assert pb.speed_vs_reference(measured) == pytest.approx(2.0)
    # the geometric mean: 4x, 1x and 1x -> 4^(1/3)
    measured = {"train_0.9M_tokens_per_s": 4 * 13_700.0, "train_2.9M_tokens_per_s": 5_600.0, "sample_64x24_s": 0.3}
    assert pb.speed_vs_reference(measured) == pytest.approx(4 ** (1 / 3))
    # the model sizes the brief names
    params = {size: 512 * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h for size, (h, layers, i) in pb.SIZES.items()}
    assert params["0.9M"] == pytest.approx(0.9e6, rel=0.05) and params["2.9M"] == pytest.approx(2.9e6, rel=0.05)
    for stage, wall in (("sft", 12.34), ("rm", 5.0)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "summary.json").write_text(f'{{"wall_s": {wall}}}')
    (tmp_path / "eval").mkdir()  # no summary: not complete, not counted
    assert pb.stage_times(tmp_path) == {"rm": 5.0, "sft": 12.3}
