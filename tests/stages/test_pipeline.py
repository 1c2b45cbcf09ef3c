"""`alignkit pipeline` end to end on the built-in task with tiny step counts: stages wired, report
written, and a rerun skips what is complete."""

from __future__ import annotations

import json
from pathlib import Path

from alignkit.cli import run_stage

QUICK = [
    "pretrain.max_steps=30", "pretrain.train_data=task:sort/pretrain?n=1500", "pretrain.batch_size=16",
    "pretrain.max_length=64", "pretrain.save_steps=0",
    "sft.max_steps=30", "sft.train_data=task:sort/sft?n=600", "sft.batch_size=16", "sft.max_length=64", "sft.save_steps=0",
    "rm.max_steps=10", "rm.train_data=task:sort/prefs?n=300", "rm.batch_size=16", "rm.save_steps=0",
    "dpo.max_steps=6", "dpo.train_data=task:sort/prefs?n=200", "dpo.batch_size=8", "dpo.save_steps=0",
    "rrhf.max_steps=4", "rrhf.train_data=task:sort/ranked?n=100", "rrhf.batch_size=8", "rrhf.save_steps=0",
    "eval.n_samples=2", "eval.prompts=task:sort/prompts_eval?n=40", "eval.heldout_text=task:sort/pretrain?n=20&seed=99",
    "eval.pairs=task:sort/prefs?n=40&seed=99",
]


def test_pipeline_runs_every_available_stage_and_reports(tmp_path: Path):
    out = tmp_path / "pipe"
    stages = ["pretrain", "sft", "rm", "dpo", "rrhf"]
    report = run_stage("pipeline", [f"output_dir={out}", f"stages=[{', '.join(stages)}]",
                                    f"overrides={json.dumps(QUICK)}"])
    ran = [s for s in stages if (out / s / "summary.json").exists()]
    assert ran[:3] == ["pretrain", "sft", "rm"]
    # wiring: SFT started from the pretrained model, the RM from SFT
    sft_cfg = (out / "sft" / "config.yaml").read_text()
    assert f"model: {out / 'pretrain' / 'final'}" in sft_cfg
    assert f"model: {out / 'sft' / 'final'}" in (out / "rm" / "config.yaml").read_text()

    saved = json.loads((out / "report.json").read_text())
    assert set(saved) >= {"stages", "methods", "alarms"}
    assert {"base", "sft"} <= set(saved["methods"])
    for method in saved["methods"].values():
        assert 0.0 <= method["gold_reward"] <= 1.0 and method["wall_s"] > 0
    # SFT learned the task's answer format; the base model never saw a chat
    assert saved["methods"]["sft"]["gold_reward"] > saved["methods"]["base"]["gold_reward"]
    assert saved["methods"]["sft"]["proxy_reward"] is not None  # the RM scored it
    assert (out / "report.md").read_text().startswith("# alignkit pipeline report")
    assert (out / "plots" / "training_curves.png").exists()

    # A rerun skips every complete stage (and the finished eval) and rewrites the same report.
    again = run_stage("pipeline", [f"output_dir={out}", f"stages=[{', '.join(stages)}]",
                                   f"overrides={json.dumps(QUICK)}"])
    assert again["methods"] == report["methods"]
