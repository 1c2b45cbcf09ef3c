"""Run directory writers: metrics.jsonl, TensorBoard, summary.json, and progress on the terminal.

Only the main process writes. On a terminal progress is a rich bar (step, loss, tokens/s); elsewhere
(CI, log files) it is a plain line every `log_steps` steps, so logs stay readable.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from alignkit.runtime.setup import is_terminal


def _clean(value: Any) -> Any:
    """JSON-safe numbers (NaN/inf become null; tensors become floats)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    """Appends metrics, mirrors them to TensorBoard, drives the progress display."""

    def __init__(self, output_dir: str | Path, stage: str, total_steps: int, enabled: bool, start_step: int = 0):
        self.dir = Path(output_dir)
        self.stage = stage
        self.total = total_steps
        self.enabled = enabled
        self.start_time = time.time()
        self._bar = None
        self._tb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._truncate_metrics_after(start_step)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(self.dir / "tb"))
        if is_terminal():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn(f"[bold]{stage}[/bold]"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._task = self._bar.add_task(stage, total=total_steps, completed=start_step, info="")
            self._bar.start()

    def _truncate_metrics_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the file tells one consistent story; a fresh
        start (step 0: there is no step-0 checkpoint) drops them all, so no second step-0 row appears."""
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines()
                if line and step > 0 and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, Any], show: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(f"{self.stage}/{key}", value, step)
        if show:
            self._show(step, record)

    def _show(self, step: int, record: dict[str, Any]) -> None:
        parts = [f"{k}={_fmt(v)}" for k, v in record.items() if k != "step" and isinstance(v, (int, float))]
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=" ".join(parts[:5]))
        else:
            print(f"[{self.stage}] step {step}/{self.total} " + " ".join(parts), file=sys.stderr, flush=True)

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(f"[{self.stage}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self._tb is not None:
            self._tb.close()


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def write_summary(output_dir: str | Path, summary: dict[str, Any]) -> None:
    path = Path(output_dir) / "summary.json"
    path.write_text(json.dumps({k: _clean(v) for k, v in summary.items()}, indent=1))


def read_summary(output_dir: str | Path) -> dict[str, Any] | None:
    path = Path(output_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None
