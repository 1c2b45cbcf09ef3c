"""The CLI on bad input (clear messages, no tracebacks), `data check`, and training options
(bf16 autocast, gradient checkpointing) that must run without changing what is learned much."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.cli import run_stage
from tests.helpers import run_cli, sft_overrides


def test_malformed_json_names_file_and_line(pretrained_tiny: Path, tmp_path: Path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n')
    res = run_cli(["sft", *sft_overrides(pretrained_tiny / "final", output_dir=tmp_path / "o", train_data=data)])
    assert res.returncode == 1
    assert f"{data}:2" in res.stderr and "invalid JSON" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_field_names_field_and_kinds(pretrained_tiny: Path, tmp_path: Path):
    data = tmp_path / "missing.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    res = run_cli(["sft", *sft_overrides(pretrained_tiny / "final", output_dir=tmp_path / "o", train_data=data, data_kind="sft")])
    assert res.returncode == 1
    assert f"{data}:2" in res.stderr and "completion" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_model_path_is_a_clear_error(tmp_path: Path):
    res = run_cli(["sft", "model=/nonexistent/model", f"output_dir={tmp_path / 'o'}", "train_data=task:sort/sft?n=50"])
    assert res.returncode == 1 and "/nonexistent/model" in res.stderr and "Traceback" not in res.stderr


def test_data_check_cli_reports_counts_and_marks_supervised_tokens(tmp_path: Path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"sort: {x}", "completion": "a b c"}) + "\n" for x in ("c b a", "b a c", "a c b")))
    res = run_cli(["data", "check", str(data), "--max-length", "64"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "3" in res.stdout and "sft" in res.stdout
    assert "[[" in res.stdout  # the trained span of the rendered example is marked


def test_bf16_and_gradient_checkpointing_train(pretrained_tiny: Path, tmp_path: Path):
    plain = run_stage("sft", sft_overrides(pretrained_tiny / "final", output_dir=tmp_path / "a", max_steps=4))
    gc = run_stage("sft", sft_overrides(pretrained_tiny / "final", output_dir=tmp_path / "b", max_steps=4, gradient_checkpointing=True))
    # Recomputing activations changes memory, not maths.
    assert gc["eval_loss"] == pytest.approx(plain["eval_loss"], abs=1e-4)
    bf16 = run_stage("sft", sft_overrides(pretrained_tiny / "final", output_dir=tmp_path / "c", max_steps=4, mixed_precision="bf16"))
    assert bf16["eval_loss"] < bf16["eval_loss_before"]
    assert bf16["eval_loss"] == pytest.approx(plain["eval_loss"], abs=0.1)


def test_plain_progress_lines_when_not_a_terminal(pretrained_tiny: Path, tmp_path: Path):
    res = run_cli(["sft", *sft_overrides(pretrained_tiny / "final", output_dir=tmp_path / "o", max_steps=4)])
    assert res.returncode == 0
    lines = [l for l in res.stderr.splitlines() if l.startswith("[sft] step")]
    assert len(lines) >= 2 and "tokens_per_s=" in lines[-1] and "loss=" in lines[-1]
