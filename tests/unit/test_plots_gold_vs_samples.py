"""plot_gold_vs_samples draws one line per run from metrics rows that carry samples and the eval key."""

from __future__ import annotations

from alignkit.eval.plots import plot_gold_vs_samples


def test_plot_gold_vs_samples_writes_a_png(tmp_path):
    rows = [{"step": 0, "samples": 0, "eval_gold_reward": 0.5, "eval_gold_reward_stderr": 0.01},
            {"step": 1, "reward": 0.3},  # a training row: no eval key, not plotted
            {"step": 8, "samples": 1024, "eval_gold_reward": 0.6, "eval_gold_reward_stderr": 0.01}]
    out = plot_gold_vs_samples({"grpo": rows, "ppo": rows[:1]}, tmp_path / "p" / "gold.png", reference=0.8)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
