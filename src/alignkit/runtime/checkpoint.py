"""Resumable checkpoints, written atomically.

A checkpoint `output_dir/checkpoints/step-N/` holds what `accelerator.save_state` writes (model,
optimizer, registered objects such as the LR scheduler, and every process's RNG states; sharded
correctly under FSDP/DeepSpeed) plus `trainer_state.json` (step, counters, anything the stage needs).

Atomicity: everything is written into `checkpoints/.tmp-step-N/` and renamed to `step-N/` only when
complete (a rename within one filesystem is atomic), so a crash mid-save never leaves a broken newest
checkpoint; leftovers of an interrupted save are removed by the next one.

Trust: resume from a checkpoint directory you trust, because accelerate's `load_state` unpickles the
LR schedulers that alignkit registers for checkpointing (`custom_checkpoint_*.pkl`, read with
`weights_only=False`), so a crafted file there runs code; keeping that state in `trainer_state.json`
(JSON) instead would remove this.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from alignkit.runtime.guards import any_process

STEP_DIR = re.compile(r"^step-(\d+)$")
KILL_IN_CHECKPOINT_ENV = "ALIGNKIT_KILL_IN_CHECKPOINT"  # test hook: SIGKILL while writing checkpoint step-N


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first: step-N directories holding trainer_state.json, which save_checkpoint
    writes last (a damaged or foreign step-N without it is neither resumed from nor counted when pruning)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def checkpoint_to_resume(output_dir: str | Path, resume: bool, is_main_process: bool = True) -> Path | None:
    """The newest checkpoint when resume=true, else None; says so when resume=true finds none (the run then
    starts from step 0 rather than silently looking like a resumed one)."""
    if not resume:
        return None
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None and is_main_process:
        print(f"resume=true: no checkpoint in {Path(output_dir) / 'checkpoints'}, starting from step 0",
              file=sys.stderr, flush=True)
    return checkpoint


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2
) -> Path:
    """Write checkpoint `step` atomically on every process; prune to the newest `keep`.

    A write that fails (a full disk, a quota) removes the partial .tmp directory and raises RunStopped
    naming the newest complete checkpoint, which is untouched: pruning runs only after the rename."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    failure: OSError | None = None
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        if os.environ.get(KILL_IN_CHECKPOINT_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)  # between accelerate's files and trainer_state.json
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    except OSError as err:
        failure = err
    # every process learns of a failed write on any of them, so none waits at a barrier for the others
    if any_process(accelerator, failure is not None):
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = failure or OSError("a write failed on another process")
        raise write_failed(f"checkpoint {final}", reason, output_dir) from None
    if accelerator.is_main_process:
        if final.exists():  # a rerun of the same step: replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def write_failed(what: str, err: OSError, output_dir: str | Path) -> Exception:
    """RunStopped for a failed write: what failed, why, and which checkpoint is still complete."""
    from alignkit.runtime.guards import RunStopped

    newest = latest_checkpoint(output_dir)
    kept = f"the newest complete checkpoint {newest} is intact" if newest else "no complete checkpoint exists yet"
    return RunStopped(f"could not write {what} ({err.strerror or err}); nothing partial was left behind and {kept}; "
                      "free space, then rerun with resume=true")


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> dict[str, Any]:
    """Restore model/optimizer/scheduler/RNG from `path`; return its trainer_state."""
    accelerator.load_state(str(path))
    return json.loads((Path(path) / "trainer_state.json").read_text())
