"""End-to-end `pretrain` and `sft` on the built-in task with `scratch:tiny`, on CPU, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from alignkit.cli import run_stage
from tests.helpers import killed_and_resumed, max_weight_diff, read_jsonl, run_cli, sft_overrides


def test_pretrain_writes_run_dir_and_loss_falls(pretrained_tiny: Path):
    out = pretrained_tiny
    summary = json.loads((out / "summary.json").read_text())
    # A random init predicts ~uniformly over 512 tokens: ln(512) = 6.24. Forty steps must cut it by a third (measured: 6.0 -> 3.8).
    assert summary["eval_loss_before"] > 5.0
    assert summary["eval_loss"] < 0.7 * summary["eval_loss_before"]
    for key in ("train_tokens", "tokens_per_s", "wall_s", "steps"):
        assert summary[key] > 0
    assert summary["steps"] == 40
    metrics = read_jsonl(out / "metrics.jsonl")
    train = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train] == list(range(5, 41, 5))
    assert train[-1]["loss"] < train[0]["loss"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == "scratch:tiny" and saved["provenance"]["inputs"]["model"] == "scratch:tiny"
    assert any((out / "tb").iterdir())
    assert (out / "checkpoints" / "step-40" / "trainer_state.json").exists()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert tok.chat_template and tok.pad_token_id is not None
    ids = tok("sort: c a b", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 6.0  # it learned something about the task's language


def test_sft_eval_loss_falls_well_below_start(pretrained_tiny: Path, tmp_path: Path):
    out = tmp_path / "sft"
    summary = run_stage("sft", sft_overrides(pretrained_tiny / "final", output_dir=out, max_steps=80, batch_size=16, lr=3e-3))
    assert summary["eval_loss"] < 0.5 * summary["eval_loss_before"], summary
    assert summary["dropped_records"] == 0
    saved = json.loads((out / "summary.json").read_text())
    assert saved["eval_loss"] == pytest.approx(summary["eval_loss"])
    # The tokenizer travels with the model, chat template included.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "final")
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )


def test_sft_with_lora_moves_only_adapters_and_exports_merged(pretrained_tiny: Path, tmp_path: Path):
    out = tmp_path / "lora"
    summary = run_stage("sft", sft_overrides(pretrained_tiny / "final", output_dir=out, **{"lora.r": 4, "lr": 1e-2}))
    assert summary["eval_loss"] < summary["eval_loss_before"]
    # The export is a plain model (adapters merged) that differs from the base in the adapted layers only.
    from alignkit.models.loading import count_parameters  # noqa: F401  (import proves the module API)
    from tests.helpers import load_weights

    base, tuned = load_weights(pretrained_tiny / "final"), load_weights(out / "final")
    assert base.keys() == tuned.keys()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all("proj" in k for k in changed), changed
    assert not any("norm" in k or "embed" in k for k in changed)


def test_resume_after_kill_equals_uninterrupted(pretrained_tiny: Path, tmp_path: Path):
    common = sft_overrides(pretrained_tiny / "final", max_steps=8, save_steps=3)
    killed_dir = tmp_path / "killed"
    resumed = killed_and_resumed("sft", common, tmp_path, kill_at=5, checkpoint=3)
    assert "resumed from" in resumed.stderr and "step 3/8" in resumed.stderr
    assert max_weight_diff(tmp_path / "full" / "final", killed_dir / "final") < 1e-5
    steps = [m["step"] for m in read_jsonl(killed_dir / "metrics.jsonl") if "loss" in m]
    assert steps == sorted(set(steps)) == [2, 4, 6, 8]  # no duplicate lines from the killed attempt


def test_packed_and_unpacked_sft_train_the_same_samples(pretrained_tiny: Path, tmp_path: Path):
    unpacked = run_stage("sft", sft_overrides(pretrained_tiny / "final", output_dir=tmp_path / "u", packing=False))
    assert unpacked["eval_loss"] < unpacked["eval_loss_before"]
    # Same held-out samples, same model before training: the starting loss cannot depend on packing.
    packed = run_stage("sft", sft_overrides(pretrained_tiny / "final", output_dir=tmp_path / "p", max_steps=1))
    assert packed["eval_loss_before"] == pytest.approx(unpacked["eval_loss_before"], rel=1e-5)


def test_all_records_truncated_is_an_error(pretrained_tiny: Path, tmp_path: Path):
    res = run_cli(["sft", *sft_overrides(pretrained_tiny / "final", output_dir=tmp_path / "t", max_length=4)])
    assert res.returncode == 1
    assert "supervised token" in res.stderr and "max_length=4" in res.stderr


def test_resume_without_a_checkpoint_says_it_starts_from_step_0(pretrained_tiny: Path, tmp_path: Path, capsys):
    from alignkit.cli import run_stage
    from tests.helpers import sft_overrides

    out = tmp_path / "fresh"
    summary = run_stage("sft", sft_overrides(pretrained_tiny / "final", output_dir=out, max_steps=2, resume="true"))
    assert summary["steps"] == 2
    assert f"resume=true: no checkpoint in {out / 'checkpoints'}, starting from step 0" in capsys.readouterr().err


def test_too_few_packed_rows_names_packing(pretrained_tiny: Path, tmp_path: Path):
    from alignkit.cli import run_stage
    from alignkit.config import ConfigError
    from tests.helpers import run_cli, sft_overrides

    data = tmp_path / "few.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"sort: c b {x}", "completion": f"b c {x}"}) for x in "defghijk"))
    common = sft_overrides(pretrained_tiny / "final", train_data=str(data), eval_data="null", batch_size=8,
                           micro_batch_size=4, max_steps=1)
    with pytest.raises(ConfigError, match="packing=false"):
        run_stage("sft", [*common, f"output_dir={tmp_path / 'a'}"])
    res = run_cli(["sft", *common, f"output_dir={tmp_path / 'b'}"])
    assert res.returncode != 0 and "Traceback" not in res.stderr and "packing=false" in res.stderr, res.stderr[-2000:]
    # one example per row: 8 rows are enough for batch_size 8
    assert run_stage("sft", [*common, f"output_dir={tmp_path / 'c'}", "packing=false"])["steps"] == 1


def test_an_output_dir_that_is_a_file_is_one_line(pretrained_tiny: Path, tmp_path: Path):
    from alignkit.cli import run_stage
    from alignkit.config import ConfigError
    from tests.helpers import sft_overrides

    a_file = tmp_path / "taken"
    a_file.write_text("someone's data")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        run_stage("sft", sft_overrides(pretrained_tiny / "final", output_dir=a_file, max_steps=1))
    assert a_file.read_text() == "someone's data"


def test_an_unwritable_output_dir_is_one_line(tmp_path: Path, monkeypatch):
    import errno

    from alignkit.config import ConfigError
    from alignkit.runtime.stage import prepare_output_dir

    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):  # what a read-only location does (tests may run as root, who may write)
        if "locked" in str(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(ConfigError, match=r"'.*locked/run' cannot be written \(Permission denied\)"):
        prepare_output_dir(str(tmp_path / "locked" / "run"))
    prepare_output_dir(str(tmp_path / "fine"))
    assert (tmp_path / "fine").is_dir() and not list((tmp_path / "fine").iterdir())
