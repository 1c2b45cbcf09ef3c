"""report.html: sentences against SFT, the results table, alarms and their plot markers, embedded plots,
samples side by side, escaping, and `alignkit report` on hand-made pipeline and eval run dirs (no model)."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from alignkit.eval import html_report as H
from alignkit.report_cli import main as report_main

EVIL = "<script>alert('x')</script> & \"quotes\""
ALARM = {"name": "proxy_up_gold_down", "step": 20, "value": 0.2, "message": "gold fell while proxy rose",
         "remedy": "keep the checkpoint of step 12 <b>now</b>", "source": "eval"}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _eval_row(gold, gold_se, proxy, kl, gain=None, gain_se=None) -> dict:
    row = {"gold_reward": gold, "gold_reward_stderr": gold_se, "proxy_reward": proxy, "proxy_reward_stderr": 0.02,
           "kl": kl, "kl_stderr": 0.01, "win_rate_gold": 0.5, "length": 7.0, "distinct_2": 0.4}
    if gain is not None:
        row.update(gold_gain=gain, gold_gain_stderr=gain_se)
    return row


def make_pipeline_run(root: Path, alarm: bool = True) -> Path:
    """A pipeline run dir as `alignkit pipeline` leaves it (stage summaries and metrics, eval summary and
    samples), small and hand-made: DPO beats SFT, RRHF is within noise, PPO is below, best-of-n from its summary."""
    run = root / "pipe"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("stages: [pretrain, sft, dpo, rrhf, ppo, best_of_n]\n")
    for stage in ("pretrain", "sft", "dpo", "rrhf"):
        (run / stage).mkdir()
        (run / stage / "summary.json").write_text(json.dumps({"wall_s": 1.5, "peak_rss_mb": 100.0}))
        _write_jsonl(run / stage / "metrics.jsonl", [{"step": s, "loss": 2.0 / s} for s in (1, 2, 3)])
    (run / "ppo").mkdir()
    ppo_rows = [{"step": s, "reward": 0.1 * s, "gold_reward": 0.5 + 0.01 * s - 0.002 * s * s} for s in range(4, 33, 4)]
    ppo_rows += [{"step": s, "eval_reward": 0.1 * s, "eval_reward_stderr": 0.05, "eval_gold_reward": 0.5 - 0.003 * s,
                  "eval_gold_reward_stderr": 0.01} for s in (0, 16, 32)]
    _write_jsonl(run / "ppo" / "metrics.jsonl", ppo_rows)
    (run / "ppo" / "summary.json").write_text(json.dumps({"wall_s": 9.0, "alarms": [ALARM] if alarm else []}))
    (run / "best_of_n").mkdir()
    (run / "best_of_n" / "summary.json").write_text(json.dumps(
        {"n": 4, "gold_reward": 0.62, "gold_reward_stderr": 0.02, "proxy_reward": 0.9, "kl_estimate": 0.4,
         "kl_upper_bound": math.log(4) - 0.75, "wall_s": 2.0}))
    models = {"base": _eval_row(0.05, 0.01, -1.0, 30.0, -0.55, 0.02), "sft": _eval_row(0.6, 0.02, 0.2, 0.0, 0.0, 0.0),
              "dpo": _eval_row(0.614, 0.02, 0.3, 0.30, 0.014, 0.006), "rrhf": _eval_row(0.604, 0.02, 0.25, 0.12, 0.004, 0.006),
              "ppo": _eval_row(0.569, 0.02, 0.9, 1.2, -0.031, 0.008)}
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(json.dumps(
        {"models": models, "alarms": [], "baseline": "sft", "n_prompts": 13, "n_samples": 2, "task": "sort"}))
    prompts = [f"sort: {i} 3 1" for i in range(13)]
    for name, offset in (("base", 0.0), ("sft", 0.5), ("dpo", 0.6), ("rrhf", 0.55), ("ppo", 0.4)):
        rows = []
        for i, p in enumerate(prompts):
            text = EVIL if (name == "ppo" and i == 0) else f"1 3 {i}" if name != "dpo" else f"1 {i} 3"
            rows += [{"prompt": p, "text": text, "gold_reward": offset + 0.01 * (name == "dpo") * i, "proxy_reward": 0.1,
                      "length": 3, "finished": True}] * 2
        _write_jsonl(run / "eval" / "samples" / f"{name}.jsonl", rows)
    return run


def _images(page: str) -> list[np.ndarray]:
    """Every embedded PNG of the page, decoded to an RGBA array."""
    return [mpimg.imread(io.BytesIO(base64.b64decode(data)), format="png")
            for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def _red_pixels(img: np.ndarray) -> int:
    """Pixels of ALARM_COLOR (pure red), the colour only alarm markers are drawn in."""
    return int(((img[..., 0] > 0.9) & (img[..., 1] < 0.15) & (img[..., 2] < 0.15)).sum())


def test_sentences_say_beats_only_beyond_two_standard_errors():
    sft = {"gold_reward": 0.6, "gold_reward_stderr": 0.02}
    cls, text = H.method_sentence("dpo", {"gold_gain_vs_sft": 0.014, "gold_gain_vs_sft_stderr": 0.006, "kl": 0.3}, "sft", sft)
    assert (cls, text) == ("beats", "DPO beats SFT by 0.014 ± 0.006 gold at KL 0.30.")
    cls, text = H.method_sentence("rrhf", {"gold_gain_vs_sft": 0.004, "gold_gain_vs_sft_stderr": 0.006, "kl": 0.12}, "sft", sft)
    assert cls == "tie" and text.startswith("RRHF does not beat SFT: +0.004 ± 0.006 gold (within 2 standard errors)")
    cls, text = H.method_sentence("ppo", {"gold_gain_vs_sft": -0.031, "gold_gain_vs_sft_stderr": 0.008, "kl": 1.2}, "sft", sft)
    assert (cls, text) == ("below", "PPO is below SFT by 0.031 ± 0.008 gold at KL 1.20.")
    # best-of-n: no paired gain, so the difference of means with the unpaired stderr; its KL bound stated as a bound
    bon = {"gold_reward": 0.7, "gold_reward_stderr": 0.02, "kl": 0.2, "kl_upper_bound": 0.636}
    cls, text = H.method_sentence("best_of_n", bon, "sft", sft)
    assert cls == "beats" and "by 0.100 ± 0.028 gold at KL 0.20 (≤ 0.64, an upper bound)" in text and "not paired" in text


def test_pipeline_report_holds_every_section_and_marks_the_alarm(tmp_path: Path):
    run = make_pipeline_run(tmp_path, alarm=True)
    assert report_main([str(run)]) == 0
    page = (run / "report.html").read_text()
    assert (run / "report.md").read_text().startswith("# alignkit pipeline report")
    assert "DPO beats SFT by 0.014 ± 0.006 gold at KL 0.30." in page
    assert "PPO is below SFT by 0.031 ± 0.008 gold at KL 1.20." in page
    assert "RRHF does not beat SFT" in page
    # the table: report.md's columns, best-of-n's KL as a bound
    for column in ("gold_gain_vs_sft", "win_rate_vs_sft", "peak_rss_mb"):
        assert f"<th>{column}</th>" in page
    assert "<td>0.400; ≤ 0.636 (upper bound)</td>" in page
    # the alarm with its remedy (escaped), linked to the PPO curve it is marked on
    assert "proxy_up_gold_down" in page and "keep the checkpoint of step 12 &lt;b&gt;now&lt;/b&gt;" in page
    assert 'Marked on <a href="#curve-ppo">' in page
    # every plot decodes; the alarm's red line is on the PPO curve and on no other plot
    ids = re.findall(r'<figure id="([^"]+)"', page)
    assert ids[:2] == ["frontier", "curve-ppo"] and "training-curves" in ids
    images = _images(page)
    assert len(images) == len(ids) and all(img.ndim == 3 and img.shape[0] > 100 for img in images)
    red = dict(zip(ids, map(_red_pixels, images)))
    assert red["curve-ppo"] > 50 and all(v == 0 for k, v in red.items() if k != "curve-ppo")
    # samples: 12 prompts, every model, the escaped model text, DPO's best gold highlighted, its difference marked
    assert page.count('<table class="samples">') == 12 and "sort: 12 3 1" not in page
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "&quot;quotes&quot;" in page and '"quotes"' not in page
    assert '<tr class="best"><td>DPO</td>' in page
    assert '<td>DPO</td><td data-label="gold">0.650</td><td data-label="proxy">0.100</td><td class="response">1 <mark>5</mark> 3</td>' in page


def test_a_tie_on_gold_highlights_no_row():
    rows = {"sft": [{"text": "a", "gold_reward": 0.0}], "dpo": [{"text": "b", "gold_reward": 0.0}]}
    assert 'class="best"' not in H.samples_html({"prompts": ["p"], "responses": rows}, "sft")
    rows["dpo"][0]["gold_reward"] = 0.5
    assert '<tr class="best"><td>DPO</td>' in H.samples_html({"prompts": ["p"], "responses": rows}, "sft")


def test_no_alarm_means_no_marker(tmp_path: Path):
    run = make_pipeline_run(tmp_path, alarm=False)
    assert report_main([str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "No alarm fired." in page and 'class="alarm"' not in page
    assert all(_red_pixels(img) == 0 for img in _images(page))


def test_eval_run_dir_report(tmp_path: Path):
    """An `alignkit eval` run over a run's checkpoints: the curve is every evaluated step, the alarm marked on it."""
    run = tmp_path / "eval"
    models = {"sft": _eval_row(0.6, 0.02, 0.2, 0.0), f"ppo@step-{10}": _eval_row(0.65, 0.02, 0.5, 0.5, 0.05, 0.01),
              "ppo": _eval_row(0.55, 0.02, 0.9, 1.0, -0.05, 0.01)}
    _write_jsonl(run / "metrics.jsonl", [{"step": 100, "model": "sft", "label": "sft", **models["sft"]},
                                         {"step": 10, "model": "ppo@step-10", "label": "ppo", **models["ppo@step-10"]},
                                         {"step": 20, "model": "ppo", "label": "ppo", **models["ppo"]}])
    alarm = {**ALARM, "model": "ppo"}
    (run / "summary.json").write_text(json.dumps({"models": models, "alarms": [alarm], "baseline": "sft",
                                                  "n_prompts": 2, "n_samples": 1, "task": "sort"}))
    _write_jsonl(run / "samples" / "sft.jsonl", [{"prompt": "p1", "text": "a b", "gold_reward": 0.5}])
    _write_jsonl(run / "samples" / "ppo_step-10.jsonl", [{"prompt": "p1", "text": "never shown", "gold_reward": 0.9}])
    _write_jsonl(run / "samples" / "ppo.jsonl", [{"prompt": "p1", "text": "a c", "gold_reward": 0.4}])
    assert report_main([str(run)]) == 0
    page = (run / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "alignkit eval report" in page
    assert "PPO is below SFT by 0.050 ± 0.010 gold at KL 1.00." in page and "ppo@step-10 beats SFT" in page
    assert 'Marked on <a href="#curve-ppo">' in page and "never shown" not in page
    assert "a <mark>c</mark>" in page
    ids = re.findall(r'<figure id="([^"]+)"', page)
    red = dict(zip(ids, map(_red_pixels, _images(page))))
    assert red["curve-ppo"] > 50 and red["frontier"] == 0


def test_page_is_self_contained():
    """No script and nothing fetched: every src/href is a data URI or an in-page anchor."""
    page = H.render_html({"methods": {}, "alarms": [], "stages": {}},
                         [{"id": "x", "title": "t", "png": b"\x89PNG", "caption": ""}], {})
    assert "<script" not in page and "@import" not in page and "url(" not in page
    assert all(v.startswith(("data:", "#")) for v in re.findall(r'(?:src|href)="([^"]*)"', page))
    assert '<meta name="viewport"' in page and "overflow-x:auto" in page


def test_report_command_refuses_other_dirs(tmp_path: Path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "neither a pipeline run dir" in capsys.readouterr().err
