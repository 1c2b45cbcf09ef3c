"""Checkpoint bookkeeping (runtime.checkpoint): pruning keeps the newest complete checkpoints, never the only
one, and neither a half-written .tmp-step-N nor a step-N without trainer_state.json counts as a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from alignkit.runtime.checkpoint import checkpoint_dirs, latest_checkpoint, load_checkpoint, save_checkpoint


def test_pruning_and_incomplete_checkpoints(tmp_path: Path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(float(step))
        save_checkpoint(accelerator, tmp_path, step, {"note": step}, keep=1)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-3"]  # keep=1: the newest, complete one
    (tmp_path / "checkpoints" / ".tmp-step-4").mkdir()  # a kill while writing step 4
    (tmp_path / "checkpoints" / "step-9").mkdir()  # a step dir nobody finished (no trainer_state.json)
    assert latest_checkpoint(tmp_path).name == "step-3"
    save_checkpoint(accelerator, tmp_path, 4, {"note": 4}, keep=1)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-4"]
    assert not (tmp_path / "checkpoints" / ".tmp-step-4").exists()
    with torch.no_grad():
        model.weight.zero_()
    state = load_checkpoint(accelerator, latest_checkpoint(tmp_path))
    assert state == {"step": 4, "note": 4} and torch.all(model.weight == 3.0)  # saved at step 4, unchanged since 3
