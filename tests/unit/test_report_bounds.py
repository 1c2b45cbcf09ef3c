"""best-of-n's log n - (n-1)/n is shown as an UPPER bound in the report (json, markdown, frontier plot), beside
the sample estimate; run dirs from before the rename (`kl_bound`, no estimate) still report."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from alignkit.eval.plots import draw_frontier, plot_frontier  # noqa: E402
from alignkit.eval.report import build_report, render_markdown  # noqa: E402

BOUND8 = math.log(8) - 7 / 8  # 1.204
EVAL = {"models": {"sft": {"gold_reward": 0.54, "kl": 0.0, "kl_stderr": 0.0}}, "n_prompts": 10, "n_samples": 4}


def bon_summary(**extra) -> dict:
    return {"n": 8, "gold_reward": 0.59, "gold_reward_stderr": 0.01, "proxy_reward": 0.84, "length": 7.1,
            "wall_s": 18.0, **extra}


def method_line(markdown: str, method: str) -> str:
    """The method's row of the first table (methods; the stages table comes later)."""
    return next(x for x in markdown.splitlines() if x.startswith(f"| {method} |"))


def test_report_row_has_the_estimate_as_kl_and_the_upper_bound_beside_it(tmp_path: Path):
    stages = {"best_of_n": bon_summary(kl_upper_bound=BOUND8, kl_estimate=0.81, kl_estimate_stderr=0.02)}
    report = build_report(stages, EVAL, [])
    row = report["methods"]["best_of_n"]
    assert row["kl"] == 0.81 and row["kl_stderr"] == 0.02 and row["kl_upper_bound"] == BOUND8
    assert "upper bound" in row["kl_is"]
    md = render_markdown(report, [], tmp_path)
    assert "0.810 ± 0.020; ≤ 1.204 (upper bound)" in method_line(md, "best_of_n")
    assert "upper bound" not in method_line(md, "sft")


def test_an_old_run_dir_reports_its_kl_bound_as_an_upper_bound(tmp_path: Path):
    report = build_report({"best_of_n": bon_summary(kl_bound=BOUND8)}, EVAL, [])
    row = report["methods"]["best_of_n"]
    assert row["kl"] is None and row["kl_upper_bound"] == BOUND8
    assert "| ≤ 1.204 (upper bound) |" in method_line(render_markdown(report, [], tmp_path), "best_of_n")


@pytest.mark.parametrize("estimate", [0.81, None])
def test_frontier_marks_the_bound_as_a_bound(estimate, tmp_path: Path):
    methods = {"sft": {"kl": 0.0, "gold_reward": 0.54},
               "best_of_n": {"kl": estimate, "kl_upper_bound": BOUND8, "gold_reward": 0.59}}
    fig, ax = plt.subplots()
    assert draw_frontier(ax, methods) == 2
    bound_marks = [ln for ln in ax.lines if ln.get_marker() == "<"]
    assert [tuple(ln.get_xydata()[0]) for ln in bound_marks] == [(pytest.approx(BOUND8), 0.59)]
    texts = [t.get_text() for t in ax.texts]
    assert "upper bound" in texts and "best_of_n" in texts
    estimate_points = [ln for ln in ax.lines if ln.get_marker() == "o" and tuple(ln.get_xydata()[0]) == (estimate, 0.59)]
    assert len(estimate_points) == (1 if estimate is not None else 0)
    plt.close(fig)
    path = plot_frontier(methods, tmp_path / "frontier.png")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
    assert plot_frontier({"x": {"gold_reward": 0.5}}, tmp_path / "none.png") is None


def test_the_report_shows_the_eval_runs_provenance():
    from alignkit.eval.report import provenance_lines

    lines = provenance_lines({"versions": {"alignkit": "0.1", "torch": "2.13.0", "peft": None},
                              "git": {"commit": "0123456789abcdef", "dirty": True}, "num_processes": 1,
                              "device": "cpu", "mixed_precision": "no", "seed": 0})
    text = "\n".join(lines)
    assert "## Provenance" in text and "alignkit 0.1, torch 2.13.0" in text and "peft" not in text
    assert "0123456789ab (uncommitted changes)" in text and "processes: 1, device: cpu" in text
    assert provenance_lines(None) == []
