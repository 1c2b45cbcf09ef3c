"""Issue 12, section 4: `alignkit pipeline` killed at any moment (inside a stage, between stages, during
evaluation) and rerun with the same command ends with the uninterrupted run's report; a stage that fails
is reported with its log's last lines and the command that reruns it alone."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, run_cli
from tests.stages.test_pipeline import QUICK

STAGES = ["pretrain", "sft", "label", "rm", "dpo", "ppo", "best_of_n"]
# the test pipeline's overrides for these stages; later ones win: sft leaves a checkpoint to resume from
RESUMABLE = [o for o in QUICK if o.split(".")[0] in [*STAGES, "eval"]] + ["sft.save_steps=10"]
# Fields that measure the machine, not the result.
TIMING = ("wall_s", "train_s", "peak_rss_mb", "per_s", "time_", "provenance", "resumed")


def pipeline_args(out: Path) -> list[str]:
    # jobs=2, as the default pipeline: stages side by side, then each model evaluated on its own
    return ["pipeline", f"output_dir={out}", f"stages=[{', '.join(STAGES)}]", "jobs=2", f"overrides={json.dumps(RESUMABLE)}"]


def test_a_failed_stage_is_reported_with_its_log_and_the_command_to_rerun_it(tmp_path: Path):
    out = tmp_path / "pipe"
    res = run_cli(["pipeline", f"output_dir={out}", "stages=[sft]", "evaluate=false",
                   f"overrides={json.dumps(['sft.train_data=' + str(tmp_path / 'missing.jsonl')])}"])
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert "stage sft failed with exit code" in res.stderr and "log.txt" in res.stderr
    assert "missing.jsonl" in res.stderr.split("the end of")[-1]  # the log's last lines name the cause
    rerun = [line for line in res.stderr.splitlines() if line.startswith("rerun it alone: ")]
    assert rerun and "-m alignkit sft --config" in rerun[0] and f"output_dir={out / 'sft'}" in rerun[0]


def _numbers(value, path=""):
    """{dotted path: float} of every number in a report, timing fields left out."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not (any(t in str(key) for t in TIMING) or str(key).endswith("_s")):  # *_s: seconds
                out.update(_numbers(item, f"{path}.{key}"))
        return out
    if isinstance(value, list):
        out = {}
        for i, item in enumerate(value):
            out.update(_numbers(item, f"{path}[{i}]"))
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {path: float(value)}
    return {}


def _run_until(out: Path, condition, timeout: float = 900) -> int:
    """Start the pipeline in its own process group; SIGKILL the whole group once condition() holds (the
    terminal closing, the OOM killer on the group). Returns the exit status (-9 when killed)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "alignkit", *pipeline_args(out)], cwd=str(REPO), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    return proc.wait()


def _run_pipeline(out: Path) -> subprocess.CompletedProcess:
    """The whole pipeline to the end (run_cli's 10-minute cap is too short for it on a busy 2-core machine)."""
    return subprocess.run([sys.executable, "-m", "alignkit", *pipeline_args(out)], cwd=str(REPO), capture_output=True,
                          text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=3600)


@pytest.mark.slow
def test_killed_pipeline_resumes_to_the_same_report(tmp_path: Path):
    full = tmp_path / "full"
    res = _run_pipeline(full)
    assert res.returncode == 0, res.stderr[-3000:]

    out = tmp_path / "killed"
    moments = [
        ("inside sft, after its step-10 checkpoint", lambda: (out / "sft" / "checkpoints" / "step-10").is_dir()),
        ("between rm and dpo", lambda: (out / "rm" / "summary.json").exists()),
        ("inside ppo", lambda: (out / "ppo" / "metrics.jsonl").exists()),
        # jobs=2: a model evaluated on its own (its result kept), the others not yet
        ("among the per-model evaluations", lambda: any((out / "eval" / "cache").glob("*.json"))),
        ("during the pipeline's evaluation", lambda: (out / "eval" / "config.yaml").exists()),
    ]
    for moment, condition in moments:
        code = _run_until(out, condition)
        assert code == -signal.SIGKILL, f"{moment}: the pipeline ended ({code}) before the kill"
        assert not (out / "report.json").exists(), moment
    res = _run_pipeline(out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already complete" in res.stderr
    assert "resumed from" in (out / "sft" / "log.txt").read_text()  # the run after the first kill resumed sft

    expected = _numbers(json.loads((full / "report.json").read_text()))
    got = _numbers(json.loads((out / "report.json").read_text()))
    assert expected.keys() == got.keys()
    assert len(expected) > 100  # the report really holds the methods' numbers
    different = {k: (expected[k], got[k]) for k in expected
                 if not math.isclose(expected[k], got[k], rel_tol=1e-4, abs_tol=1e-6)}
    assert not different, different
