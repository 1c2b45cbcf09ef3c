"""The pipeline's plots: every stage that trains has its panel, point labels do not overlap, every axis has
its unit and every figure a legend naming rollout vs held-out series."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from alignkit.eval import plots  # noqa: E402
from alignkit.eval.report import write_plots  # noqa: E402

# One short run of each kind, as a tiny pipeline logs it: most stages log a single training row.
METRICS = {
    "pretrain": [{"step": 0, "eval_loss": 6.0}, {"step": 10, "loss": 5.0}, {"step": 20, "loss": 4.0},
                 {"step": 20, "eval_loss": 3.9}],
    "label": [],
    "rm": [{"step": 0, "eval_loss": 0.69}, {"step": 6, "loss": 0.67}, {"step": 6, "eval_loss": 0.65}],
    "dpo": [{"step": 0, "eval_loss": 0.69}, {"step": 4, "loss": 5.5}, {"step": 4, "eval_loss": 0.64}],
    "rrhf": [{"step": 0, "eval_rank_loss": 0.4}, {"step": 4, "loss": 3.8}],
    "ppo": [{"step": 0, "eval_reward": -0.37, "eval_gold_reward": 0.058}, {"step": 1, "eval_reward": -0.34,
            "eval_gold_reward": 0.075}, {"step": 2, "policy_loss": -0.003, "reward": -0.45, "gold_reward": 0.04},
            {"step": 2, "eval_reward": -0.33, "eval_gold_reward": 0.073}],
    "raft": [{"step": 1, "loss": 4.1}, {"step": 1, "sample_proxy_reward": -0.38, "sample_gold_reward": 0.08},
             {"step": 2, "loss": 4.2}, {"step": 2, "sample_proxy_reward": -0.41, "sample_gold_reward": 0.09}],
}
# the crowded corner of a real tiny pipeline's frontier (sft, raft and dpo labels used to print over each other)
METHODS = {"sft": {"kl": 0.0, "gold_reward": 0.062, "gold_reward_stderr": 0.007},
           "raft": {"kl": 0.003, "kl_stderr": 0.02, "gold_reward": 0.061, "gold_reward_stderr": 0.007},
           "dpo": {"kl": 0.093, "kl_stderr": 0.06, "gold_reward": 0.0623, "gold_reward_stderr": 0.007},
           "ppo": {"kl": 0.146, "gold_reward": 0.066},
           "grpo": {"kl": 0.374, "gold_reward": 0.065},
           "best_of_n": {"kl": 0.193, "kl_upper_bound": 0.193, "gold_reward": 0.097}}


@pytest.fixture
def figures(tmp_path: Path, monkeypatch) -> dict[str, plt.Figure]:
    """write_plots on a run dir of METRICS; the figures it saves, by file name, kept open for inspection."""
    done = {}
    for stage, rows in METRICS.items():
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        done[stage] = tmp_path / stage
    saved: dict[str, plt.Figure] = {}

    def keep(fig, path, dpi=100):  # instead of writing the PNG: lay out, draw, keep the figure
        fig.tight_layout()
        fig.canvas.draw()
        saved[Path(path).name] = fig
        return Path(path)

    monkeypatch.setattr(plots, "save_figure", keep)
    written = write_plots(tmp_path, done, {"methods": METHODS})
    assert [p.name for p in written] == list(saved)
    yield saved
    plt.close("all")


def test_every_stage_that_trains_has_a_training_curve(figures):
    axes = [ax for ax in figures["training_curves.png"].axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["pretrain", "rm", "dpo", "rrhf", "ppo", "raft"]  # not label
    for ax in axes:
        assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel()
        assert ax.get_legend() is not None
    legends = {ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()] for ax in axes}
    assert legends["pretrain"] == ["train (training batches)", "held-out eval"]
    assert legends["ppo"] == ["train (rollouts)"]
    # DPO's train loss carries its SFT term: no held-out eval_loss beside it as if it were the same quantity
    assert legends["dpo"] == ["train (training batches)"]


def test_proxy_and_gold_over_training_names_rollout_and_held_out_series(figures):
    axes = figures["proxy_gold_over_training.png"].axes
    titles = [ax.get_title() for ax in axes if ax.get_title()]
    assert titles == ["ppo: proxy and gold over training", "raft: proxy and gold over training"]
    ppo = next(ax for ax in axes if ax.get_title().startswith("ppo"))
    labels = [t.get_text() for t in ppo.get_legend().get_texts()]
    assert labels == ["proxy, rollout samples", "proxy, held-out eval", "gold, rollout samples", "gold, held-out eval"]
    units = {ax.get_ylabel() for ax in axes}
    assert {"proxy reward (RM score, logit)", "gold reward (0-1)"} <= units


def test_frontier_labels_do_not_overlap_and_axes_have_units(figures):
    fig = figures["frontier_gold_vs_kl.png"]
    ax = fig.axes[0]
    assert ax.get_xlabel() == "KL to SFT (nats per response)" and ax.get_ylabel() == "gold reward (0-1)"
    assert ax.get_legend() is not None
    renderer = fig.canvas.get_renderer()
    boxes = {t.get_text(): t.get_window_extent(renderer) for t in ax.texts}
    assert set(boxes) >= {"sft", "raft", "dpo", "upper bound"}
    overlapping = [(a, b) for (a, ba), (b, bb) in combinations(boxes.items(), 2) if ba.overlaps(bb)]
    assert not overlapping


def test_place_labels_staggers_labels_of_coincident_points():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], ls="none")
    offsets = plots.place_labels(ax, [("one", 0.5, 0.5), ("two", 0.5, 0.5), ("three", 0.5, 0.5)])
    assert len(set(offsets)) == 3
    plt.close(fig)
