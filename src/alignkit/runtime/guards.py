"""What keeps a long run from ending badly: Ctrl-C / SIGTERM stop at a step boundary with a checkpoint,
and non-finite losses or gradients skip the step instead of poisoning the weights.

Both decisions are taken by every process together (a flag all-reduced when there are several), so
processes never disagree about whether a step happened, and every training loop (runtime.train_loop,
the ppo and raft stages) calls the same three functions: `StopRequests`, `NonFiniteGuard.check` and
`RunStopped`, the exception the CLI prints as one line with a non-zero exit code.

Test hooks (environment variables, as `ALIGNKIT_KILL_AT_STEP` for kills):
- `ALIGNKIT_SIGNAL_AT_STEP=N` (or `N:TERM`): send SIGINT (SIGTERM) to this process at the start of
  0-based optimizer step N, i.e. while step N+1 is in flight.
- `ALIGNKIT_NAN_AT_STEP=N[,M...]`: the loss of those 0-based steps is multiplied by NaN.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from typing import Any

import torch

SIGNAL_ENV = "ALIGNKIT_SIGNAL_AT_STEP"
NAN_ENV = "ALIGNKIT_NAN_AT_STEP"


class RunStopped(Exception):
    """A run stopped on purpose (interrupted, non-finite, disk full): one line for the user, an exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def any_process(accelerator: Any, flag: bool) -> bool:
    """True when `flag` is true on any process (one tiny all-reduce, skipped with a single process)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, "sum").item() > 0)


class StopRequests:
    """Context manager: while active, the first SIGINT / SIGTERM only sets a flag that the loop reads at the
    end of each step (`requested`); a second Ctrl-C raises KeyboardInterrupt at once, for a user who will
    not wait. Handlers are restored on exit. Outside the main thread (no signals there) it does nothing."""

    def __init__(self, stage: str, is_main_process: bool = True):
        self.stage, self.is_main_process = stage, is_main_process
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.is_main_process:
            print(f"[{self.stage}] {signal.Signals(signum).name}: finishing the step in flight, then a checkpoint "
                  "(Ctrl-C again stops at once, without one)", file=sys.stderr, flush=True)

    def requested(self, accelerator: Any) -> bool:
        """Whether any process was asked to stop; all processes get the same answer."""
        return any_process(accelerator, self.signum is not None)

    def stop(self, step: int, checkpoint: Any) -> RunStopped:
        """The exception to raise once the checkpoint at `step` is written (exit 130 for SIGINT, 143 for SIGTERM)."""
        signum = self.signum or signal.SIGINT
        return RunStopped(f"interrupted at step {step}; checkpoint {checkpoint}; rerun with resume=true",
                          exit_code=128 + int(signum))


def send_test_signal(step: int) -> None:
    """Test hook: signal this process at the start of 0-based step `step` when ALIGNKIT_SIGNAL_AT_STEP says so."""
    spec = os.environ.get(SIGNAL_ENV, "")
    if not spec:
        return
    at, _, name = spec.partition(":")
    if int(at) == step:
        os.kill(os.getpid(), signal.SIGTERM if name.upper() == "TERM" else signal.SIGINT)


def injected_nan_factor(step: int) -> float:
    """Test hook: NaN for the 0-based steps listed in ALIGNKIT_NAN_AT_STEP, else 1.0 (multiply a loss by it)."""
    spec = os.environ.get(NAN_ENV, "")
    return math.nan if spec and str(step) in spec.split(",") else 1.0


def all_finite(*values: Any) -> bool:
    """Whether every number / tensor given is finite (None is ignored)."""
    for value in values:
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            if not bool(torch.isfinite(value).all()):
                return False
        elif not math.isfinite(float(value)):
            return False
    return True


class NonFiniteGuard:
    """Counts optimizer steps skipped because a loss, gradient norm (or PPO's rewards, advantages, value
    targets) was NaN or infinite, and stops the run after `limit` of them in a row.

    `check(accelerator, step, what, *values)` returns True when the step may go ahead; when it returns
    False the caller zeroes its gradients and skips optimizer.step(), so the weights and optimizer state
    stay those of the last good step. The count is part of the checkpointed state (`state_dict`)."""

    def __init__(self, limit: int, stage: str, lr: float, is_main_process: bool = True):
        self.limit, self.stage, self.lr, self.is_main_process = max(1, limit), stage, lr, is_main_process
        self.total, self.in_a_row = 0, 0

    def check(self, accelerator: Any, step: int, what: str, *values: Any) -> bool:
        if not any_process(accelerator, not all_finite(*values)):
            self.in_a_row = 0
            return True
        self.total += 1
        self.in_a_row += 1
        if self.is_main_process:
            print(f"[{self.stage}] step {step}: non-finite {what}; optimizer step skipped "
                  f"({self.in_a_row} in a row, {self.total} in all)", file=sys.stderr, flush=True)
        if self.in_a_row >= self.limit:
            raise RunStopped(
                f"non-finite {what} at step {step}, {self.in_a_row} steps in a row (max_nonfinite_steps={self.limit}): "
                f"likely a learning rate too high for this model (lr={self.lr:g}), fp16 overflow, or a corrupt "
                "batch; the last checkpoint is untouched (resume=true continues from it, e.g. with a lower lr)")
        return False

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.in_a_row = int(state.get("total", 0)), int(state.get("in_a_row", 0))
