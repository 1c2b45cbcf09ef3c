"""Run a stage as its own process, its output shown live and kept in a log: `alignkit pipeline` and
`alignkit iterate` run their steps this way (separate processes give each its own peak memory, and a launcher
such as `accelerate launch --num_processes 2` applies to each)."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
from pathlib import Path

from alignkit.config import ConfigError


def split_step_overrides(overrides: list[str], caller: str, unit: str) -> dict[str, list[str]]:
    """Per-step overrides '<unit>.<key>=<value>' of a command that runs steps: -> {unit: ['key=value', ...]}."""
    out: dict[str, list[str]] = {}
    for item in overrides:
        name, sep, rest = item.partition(".")
        if not sep or "=" not in rest:
            raise ConfigError(f"{caller} override '{item}' is not '<{unit}>.<key>=<value>'")
        out.setdefault(name, []).append(rest)
    return out


def run_stage_process(name: str, stage: str, config_file: Path | None, args: list[str], launcher: str,
                      log_path: Path, caller: str = "pipeline") -> None:
    """Run one stage as `python -m alignkit <name> ...`, its output shown live and appended to log_path.

    stage: the step's name in messages; caller: the command running it (pipeline, iterate).
    A stage that fails raises RunStopped with the log's last lines and the command that reruns it alone.
    Ctrl-C reaches the stage too (same process group): the caller waits while the stage checkpoints,
    then stops; SIGTERM sent to the caller alone is passed on to the stage. Either way, rerunning the
    caller's command continues (complete stages are skipped, the interrupted one resumes)."""
    from alignkit.runtime.guards import RunStopped

    prefix = shlex.split(launcher) if launcher else [sys.executable]
    cmd = [*prefix, "-m", "alignkit", name, *(["--config", str(config_file)] if config_file else []), *args]
    shown = " ".join(shlex.quote(c) for c in cmd)
    print(f"[{caller}] {shown}", file=sys.stderr, flush=True)
    interrupted = False
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
        try:
            while True:
                try:
                    _copy_output(proc, log)
                    break
                except KeyboardInterrupt:  # the stage got it too: let it finish its step and checkpoint
                    if interrupted:
                        raise
                    interrupted = True
            code = proc.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
    if code in (130, 143) or interrupted:
        raise RunStopped(f"interrupted in stage {stage} ({log_path.parent}); rerun the same {caller} command to "
                         "continue: complete stages are skipped, this one resumes", 130 if code != 143 else 143)
    if code != 0:
        tail = "\n".join("    " + line for line in log_path.read_text(errors="replace").splitlines()[-12:])
        raise RunStopped(f"stage {stage} failed with exit code {code}; the end of {log_path}:\n{tail}\n"
                         f"rerun it alone: {shown}\nthen rerun the {caller} to continue after it")


def _copy_output(proc: subprocess.Popen, log) -> None:
    """Show the stage's output live and keep it in its log."""
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(line)
        log.write(line)
