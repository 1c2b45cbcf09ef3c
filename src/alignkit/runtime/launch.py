"""Run a stage as its own process, its output shown live and kept in a log: `alignkit pipeline` and
`alignkit iterate` run their steps this way (separate processes give each its own peak memory, and a launcher
such as `accelerate launch --num_processes 2` applies to each).

Without a launcher, a step is forked from a multiprocessing fork server that has imported torch, transformers
and the stage modules once (`python -m alignkit ...` spends about 3-4 s of CPU importing them, and a pipeline
runs some 25 steps). The forked step still is its own process, with its own memory, exit code and log; it gets
the caller's current environment and working directory. With a launcher (or where no fork server exists) the
step is `<launcher> python -m alignkit ...` as a plain subprocess.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.config import ConfigError

FORK_ENV = "ALIGNKIT_FORK_STEPS"  # "0": every step a fresh `python -m alignkit` (as under a launcher)
# What the fork server imports once; each name is best effort (multiprocessing skips one that fails to import).
PRELOAD = ["torch", "transformers", "alignkit.cli", "alignkit.runtime.stage", "alignkit.runtime.train_loop",
           "alignkit.rollout.sampling", "alignkit.models.loading", "alignkit.models.reward", "alignkit.eval.plots",
           "alignkit.stages.evaluate", "alignkit.stages.label", "alignkit.stages.rm", "alignkit.stages.ppo",
           "alignkit.stages.dpo", "alignkit.stages.rrhf", "alignkit.stages.raft", "alignkit.stages.best_of_n",
           "alignkit.stages.pretrain", "alignkit.stages.sft"]
_FORK_CONTEXT = None


def split_step_overrides(overrides: list[str], caller: str, unit: str) -> dict[str, list[str]]:
    """Per-step overrides '<unit>.<key>=<value>' of a command that runs steps: -> {unit: ['key=value', ...]}."""
    out: dict[str, list[str]] = {}
    for item in overrides:
        name, sep, rest = item.partition(".")
        if not sep or "=" not in rest:
            raise ConfigError(f"{caller} override '{item}' is not '<{unit}>.<key>=<value>'")
        out.setdefault(name, []).append(rest)
    return out


def _fork_context():
    """The fork-server context (started on first use), or None where there is none (Windows) or FORK_ENV=0."""
    global _FORK_CONTEXT
    import multiprocessing

    if os.environ.get(FORK_ENV, "1") == "0" or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    if _FORK_CONTEXT is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        _FORK_CONTEXT = context
    return _FORK_CONTEXT


def _forked_step(argv: list[str], log_path: str, env: dict[str, str], cwd: str) -> None:
    """The body of a forked step: the caller's environment and directory, output to the log, then the CLI."""
    import atexit

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    if env.get("OMP_NUM_THREADS", "").isdigit():  # OpenMP read it when the server imported torch, not now: set it
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = ["alignkit", *argv]
    from alignkit.cli import main

    try:
        main(argv)
    finally:  # a forked child leaves through os._exit: run what a normal interpreter exit runs
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()


@dataclass
class StageProcess:
    """One running step: its process, its log (tailed to the terminal) and what to say when it ends."""

    name: str  # the step in messages
    shown: str  # the command that reruns it alone
    log_path: Path
    caller: str
    prefix: str = ""  # put before each echoed line (several steps at once)
    proc: object = None  # subprocess.Popen or multiprocessing.Process
    offset: int = 0
    partial: str = field(default="", repr=False)

    def poll(self) -> int | None:
        if isinstance(self.proc, subprocess.Popen):
            return self.proc.poll()
        return None if self.proc.is_alive() else self.proc.exitcode

    def terminate(self) -> None:
        """SIGTERM: the stage checkpoints and stops (runtime.guards)."""
        if self.poll() is None:
            if isinstance(self.proc, subprocess.Popen):
                self.proc.send_signal(signal.SIGTERM)
            else:
                os.kill(self.proc.pid, signal.SIGTERM)

    def echo(self, final: bool = False) -> None:
        """Show what the step wrote to its log since the last call."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.offset)
                data = log.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        lines = (self.partial + data.decode("utf-8", errors="replace")).split("\n")
        self.partial = lines.pop()  # a line not yet ended ("" when the text ends with a newline)
        if final and self.partial:
            lines, self.partial = lines + [self.partial], ""
        for line in lines:  # a stage's own "[sft] ..." lines already carry the prefix
            sys.stderr.write(f"{'' if line.startswith(self.prefix) else self.prefix}{line}\n")
        sys.stderr.flush()

    def outcome(self, code: int, interrupted: bool) -> None:
        """Raise RunStopped for a step that did not finish (exit code), with its log's end and how to rerun it."""
        from alignkit.runtime.guards import RunStopped

        if code in (130, 143, -signal.SIGTERM, -signal.SIGINT) or interrupted:
            raise RunStopped(f"interrupted in stage {self.name} ({self.log_path.parent}); rerun the same {self.caller} "
                             "command to continue: complete stages are skipped, this one resumes",
                             143 if code in (143, -signal.SIGTERM) else 130)
        if code != 0:
            tail = "\n".join("    " + line for line in self.log_path.read_text(errors="replace").splitlines()[-12:])
            raise RunStopped(f"stage {self.name} failed with exit code {code}; the end of {self.log_path}:\n{tail}\n"
                             f"rerun it alone: {self.shown}\nthen rerun the {self.caller} to continue after it")


def start_stage_process(name: str, stage: str, config_file: Path | None, args: list[str], launcher: str,
                        log_path: Path, caller: str = "pipeline", threads: int | None = None,
                        prefix: str = "") -> StageProcess:
    """Start `alignkit <name> [--config config_file] args...` (forked, or under `launcher`), output appended to
    log_path. threads: torch threads of the step (None: the caller's setting)."""
    argv = [name, *(["--config", str(config_file)] if config_file else []), *args]
    launch = shlex.split(launcher) if launcher else [sys.executable]
    shown = " ".join(shlex.quote(c) for c in [*launch, "-m", "alignkit", *argv])
    print(f"[{caller}] {shown}", file=sys.stderr, flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    offset = log_path.stat().st_size if log_path.exists() else 0
    step = StageProcess(stage, shown, log_path, caller, prefix, offset=offset)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    context = None if launcher else _fork_context()
    if context is not None:
        step.proc = context.Process(target=_forked_step, args=(argv, str(log_path), env, os.getcwd()),
                                    name=f"alignkit {stage}")
        step.proc.start()
    else:
        with open(log_path, "ab") as log:
            step.proc = subprocess.Popen([*launch, "-m", "alignkit", *argv], stdout=log, stderr=subprocess.STDOUT, env=env)
    return step


def wait_stage_processes(steps: list[StageProcess], on_done=None, poll_s: float = 0.2) -> None:
    """Wait for every step, echoing their output; on_done(step) as each finishes (it may return new steps to
    wait for). The first step that fails stops the others (SIGTERM: they checkpoint) and its RunStopped is raised
    once all have ended. Ctrl-C reaches the steps too (same process group): this waits while they checkpoint;
    a second Ctrl-C stops waiting. SIGTERM sent to the caller alone is passed on to the steps."""
    running = list(steps)
    failure: BaseException | None = None
    interrupted = False

    def stop_all(signum=None, frame=None) -> None:
        for step in running:
            step.terminate()

    previous = signal.signal(signal.SIGTERM, stop_all)
    try:
        while running:
            try:
                time.sleep(poll_s)
                for step in list(running):
                    code = step.poll()
                    step.echo(final=code is not None)
                    if code is None:
                        continue
                    running.remove(step)
                    try:
                        step.outcome(code, interrupted)
                        if failure is None and on_done is not None:
                            running.extend(on_done(step) or [])
                    except Exception as e:  # RunStopped, or on_done's error: stop the others, raise at the end
                        if failure is None:
                            failure = e
                            stop_all()
            except KeyboardInterrupt:  # the steps got it too: let them finish their step and checkpoint
                if interrupted:
                    raise
                interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failure is not None:
        raise failure


def run_stage_process(name: str, stage: str, config_file: Path | None, args: list[str], launcher: str,
                      log_path: Path, caller: str = "pipeline", threads: int | None = None) -> None:
    """Run one stage as `alignkit <name> ...` in its own process (start_stage_process), its output shown live
    and appended to log_path, and wait for it (wait_stage_processes).

    stage: the step's name in messages; caller: the command running it (pipeline, iterate).
    A stage that fails raises RunStopped with the log's last lines and the command that reruns it alone.
    Either way, rerunning the caller's command continues (complete stages are skipped, the interrupted one resumes)."""
    wait_stage_processes([start_stage_process(name, stage, config_file, args, launcher, log_path, caller, threads)])
