"""Issue 12, sections 0, 2 and 3 on the shared training loop (sft): Ctrl-C / SIGTERM stop with a checkpoint
that resumes exactly, non-finite steps are skipped and counted (and stop the run after max_nonfinite_steps
in a row), a kill inside a checkpoint write or a full disk never leaves a checkpoint or final/ that looks
complete but is not, and output_dir is never clobbered by accident."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from tests.helpers import load_weights, max_weight_diff, read_jsonl, run_cli, sft_overrides


@pytest.fixture(scope="module")
def uninterrupted(pretrained_tiny: Path, tmp_path_factory) -> tuple[list[str], Path]:
    """(common overrides, run dir) of an 8-step sft run without interruptions, the reference for resumes."""
    common = sft_overrides(pretrained_tiny / "final", max_steps=8, save_steps=3)
    out = tmp_path_factory.mktemp("uninterrupted")
    res = run_cli(["sft", *common, f"output_dir={out}"])
    assert res.returncode == 0, res.stderr[-3000:]
    return common, out


@pytest.mark.parametrize("signal_name, code", [("INT", 130), ("TERM", 143)])
def test_signal_finishes_the_step_checkpoints_and_resumes_exactly(uninterrupted, tmp_path: Path, signal_name, code):
    common, full = uninterrupted
    out = tmp_path / "run"
    # the signal arrives at the start of 0-based step 4, i.e. while step 5 is in flight
    res = run_cli(["sft", *common, f"output_dir={out}"], env={"ALIGNKIT_SIGNAL_AT_STEP": f"4:{signal_name}"})
    assert res.returncode == code, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "interrupted at step 5" in last and "resume=true" in last, last
    assert (out / "checkpoints" / "step-5" / "trainer_state.json").is_file()  # beyond the periodic step-3
    assert not (out / "final").exists() and not (out / "summary.json").exists()

    resumed = run_cli(["sft", *common, f"output_dir={out}", "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step 5/8" in resumed.stderr
    assert max_weight_diff(full / "final", out / "final") < 1e-5


def test_one_nan_step_is_skipped_and_counted(uninterrupted, tmp_path: Path):
    common, full = uninterrupted
    out = tmp_path / "nan"
    res = run_cli(["sft", *common, f"output_dir={out}"], env={"ALIGNKIT_NAN_AT_STEP": "3"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step 4: non-finite loss or gradient norm; optimizer step skipped" in res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nonfinite_steps"] == 1
    assert json.loads((full / "summary.json").read_text())["nonfinite_steps"] == 0
    logged = [m for m in read_jsonl(out / "metrics.jsonl") if "loss" in m]
    assert logged[-1]["nonfinite_steps"] == 1
    weights = load_weights(out / "final")
    assert all(torch.isfinite(w).all() for w in weights.values())
    # the skipped update is missing, so the weights differ from the uninterrupted run's (but stay finite)
    assert max_weight_diff(full / "final", out / "final") > 1e-6


def test_nan_steps_in_a_row_stop_the_run_and_keep_the_last_checkpoint(uninterrupted, tmp_path: Path):
    common, full = uninterrupted
    out = tmp_path / "nan3"
    res = run_cli(["sft", *common, f"output_dir={out}"], env={"ALIGNKIT_NAN_AT_STEP": "4,5,6"})
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "non-finite loss or gradient norm at step 7, 3 steps in a row (max_nonfinite_steps=3)" in last, last
    assert "learning rate" in last
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    newest = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in newest] == ["step-3", "step-6"]
    # step-6 holds the weights of step 4 (steps 5 and 6 were skipped) and resumes to a finite model
    resumed = run_cli(["sft", *common, f"output_dir={out}", "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 6/8" in resumed.stderr
    assert json.loads((out / "summary.json").read_text())["nonfinite_steps"] == 2
    assert all(torch.isfinite(w).all() for w in load_weights(out / "final").values())


def test_diverging_learning_rate_stops_with_a_clear_message(pretrained_tiny: Path, tmp_path: Path):
    out = tmp_path / "diverge"
    res = run_cli(["sft", *sft_overrides(pretrained_tiny / "final", max_steps=12, lr=1e30, warmup_steps=0,
                                         max_grad_norm=0, output_dir=out)])
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert "max_nonfinite_steps=3" in res.stderr and "lr=1e+30" in res.stderr
    assert not (out / "final").exists()


def test_kill_inside_a_checkpoint_write_is_never_resumed_from(uninterrupted, tmp_path: Path):
    common, full = uninterrupted
    out = tmp_path / "killed"
    killed = run_cli(["sft", *common, f"output_dir={out}"], env={"ALIGNKIT_KILL_IN_CHECKPOINT": "6"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (out / "checkpoints" / ".tmp-step-6").is_dir()  # half-written: model files, no trainer_state.json
    resumed = run_cli(["sft", *common, f"output_dir={out}", "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 3/8" in resumed.stderr  # the complete step-3, not the half-written step-6
    assert not (out / "checkpoints" / ".tmp-step-6").exists()
    assert max_weight_diff(full / "final", out / "final") < 1e-5


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(pretrained_tiny: Path, tmp_path: Path, monkeypatch):
    from accelerate import Accelerator

    from alignkit.cli import run_stage
    from alignkit.runtime.guards import RunStopped

    real_save_state = Accelerator.save_state

    def save_state_filling_the_disk(self, output_dir=None, **kwargs):
        if output_dir.endswith("step-6"):
            Path(output_dir, "model.safetensors").write_bytes(b"\0" * 100)  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state_filling_the_disk)
    out = tmp_path / "full-disk"
    with pytest.raises(RunStopped) as stopped:
        run_stage("sft", sft_overrides(pretrained_tiny / "final", max_steps=8, save_steps=3, output_dir=out))
    message = str(stopped.value)
    assert "No space left on device" in message and "step-3" in message and "intact" in message, message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-3"]
    assert not (out / "final").exists()


def test_full_disk_while_saving_final_leaves_no_final(pretrained_tiny: Path, tmp_path: Path, monkeypatch):
    import alignkit.models.loading as loading
    from alignkit.cli import run_stage
    from alignkit.runtime.guards import RunStopped

    def save_model_filling_the_disk(model, tokenizer, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text("{}")  # looks like a model, but the weights never come
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loading, "save_model", save_model_filling_the_disk)
    out = tmp_path / "full-final"
    with pytest.raises(RunStopped, match="the final model"):
        run_stage("sft", sft_overrides(pretrained_tiny / "final", max_steps=2, output_dir=out))
    assert not (out / "final").exists() and not (out / ".tmp-final").exists()
    assert (out / "checkpoints" / "step-2" / "trainer_state.json").is_file()


def test_output_dir_is_never_clobbered_by_accident(pretrained_tiny: Path, tmp_path: Path):
    common = sft_overrides(pretrained_tiny / "final", max_steps=2)
    foreign = tmp_path / "someone"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    res = run_cli(["sft", *common, f"output_dir={foreign}"])
    assert res.returncode == 2 and "did not write (thesis.tex)" in res.stderr and "overwrite=true" in res.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]  # not even a config.yaml

    out = tmp_path / "run"
    assert run_cli(["sft", *common, f"output_dir={out}"]).returncode == 0
    again = run_cli(["sft", *common, f"output_dir={out}"])
    assert again.returncode == 2 and "holds a finished run" in again.stderr and "resume=true" in again.stderr
    replaced = run_cli(["sft", *common, f"output_dir={out}", "overwrite=true"])
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")].count(0) == 1  # one step-0 row, not two

    beside = run_cli(["sft", *common, f"output_dir={foreign}", "overwrite=true"])
    assert beside.returncode == 0, beside.stderr[-3000:]
    assert (foreign / "thesis.tex").read_text() == "years of work" and (foreign / "final").is_dir()


def test_a_run_that_fails_on_bad_input_leaves_nothing_behind(pretrained_tiny: Path, tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "not a list"}\n')
    fresh = tmp_path / "runs" / "fresh"
    res = run_cli(["sft", *sft_overrides(pretrained_tiny / "final", train_data=bad, output_dir=fresh)])
    assert res.returncode == 1 and "bad.jsonl:1" in res.stderr
    assert not (tmp_path / "runs").exists()  # the run created it and its parent, so it removed both

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "config.yaml").write_text("lr: 0.5\n")  # an earlier run's config, not a finished run
    res = run_cli(["sft", *sft_overrides(pretrained_tiny / "final", train_data=bad, output_dir=kept)])
    assert res.returncode == 1
    assert (kept / "config.yaml").read_text() == "lr: 0.5\n"  # restored, not replaced by the failed run's


def _stage_overrides(stage: str, model_dir: Path) -> list[str]:
    from tests.stages.test_dpo import dpo_overrides
    from tests.stages.test_rm import rm_overrides
    from tests.stages.test_rrhf import rrhf_overrides

    if stage == "dpo":
        return dpo_overrides(model_dir, max_steps=6, log_steps=2)
    if stage == "rm":
        return rm_overrides(model_dir, "task:sort/prefs?n=200&seed=5", batch_size=8, micro_batch_size=4,
                            max_steps=6, log_steps=2, eval_data=0.1)
    return rrhf_overrides(model_dir, max_steps=6, log_steps=2, reward="gold", policy_samples=1, sampling__max_new_tokens=12,
                          train_data="task:sort/ranked?n=60&seed=4")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["rm", "dpo", "rrhf"])
def test_every_train_loop_stage_resumes_exactly_after_ctrl_c(pretrained_tiny: Path, tmp_path: Path, stage: str):
    common = _stage_overrides(stage, pretrained_tiny / "final")
    env = {"OMP_NUM_THREADS": "1"}  # the rm's packed forwards sum in thread-dependent order otherwise
    full = run_cli([stage, *common, f"output_dir={tmp_path / 'full'}"], env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "stopped"
    res = run_cli([stage, *common, f"output_dir={out}"], env={**env, "ALIGNKIT_SIGNAL_AT_STEP": "2"})
    assert res.returncode == 130 and "interrupted at step 3" in res.stderr, res.stderr[-3000:]
    resumed = run_cli([stage, *common, f"output_dir={out}", "resume=true"], env=env)
    assert resumed.returncode == 0 and "step 3/6" in resumed.stderr, resumed.stderr[-3000:]
    assert max_weight_diff(tmp_path / "full" / "final", out / "final") < 1e-5
