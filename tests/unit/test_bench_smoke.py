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
