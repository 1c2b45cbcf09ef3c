"""runtime.launch: a step forked from the fork server behaves as `python -m alignkit ...` would (its output in
its log, its exit code, the caller's environment and directory), and stages/pipeline.run_stages starts each
stage when its inputs are complete, at most `jobs` at once, with its share of the threads."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from alignkit.runtime import launch
from alignkit.runtime.guards import SIGNAL_ENV, RunStopped
from alignkit.stages import pipeline


def test_a_forked_step_writes_its_output_to_its_log_and_reads_the_callers_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # after the fork server may have started elsewhere: the step must follow
    Path("records.jsonl").write_text(json.dumps({"prompt": "2 1", "response": "1 2"}) + "\n")
    log = tmp_path / "step" / "log.txt"
    step = launch.start_stage_process("data", "check", None, ["check", "records.jsonl"], "", log)
    assert step.proc is not None and not isinstance(step.proc, subprocess.Popen)  # forked, not a new interpreter
    launch.wait_stage_processes([step])
    text = log.read_text()
    assert "source:      records.jsonl" in text and "records:     1 valid, 0 invalid" in text


def test_a_forked_step_that_fails_raises_with_its_exit_code_and_log(tmp_path):
    log = tmp_path / "log.txt"
    with pytest.raises(RunStopped) as stopped:
        launch.run_stage_process("sft", "sft", None, ["no_such_key=3", f"output_dir={tmp_path / 'o'}"], "", log)
    message = str(stopped.value)
    assert "exit code 2" in message and "no_such_key" in message and "rerun it alone" in message
    assert "config error" in log.read_text()


def test_a_forked_step_sees_the_callers_environment_of_now(tmp_path, monkeypatch):
    # set after the fork server started (the tests above started it): the step is told at 2 steps in to stop
    monkeypatch.setenv(SIGNAL_ENV, "2:TERM")
    out = tmp_path / "pt"
    with pytest.raises(RunStopped, match="interrupted in stage pretrain") as stopped:
        launch.run_stage_process("pretrain", "pretrain", None, [
            "model=scratch:tiny", "vocab_size=300", "train_data=task:sort/pretrain?n=200", "eval_data=null",
            "max_steps=6", "batch_size=4", "max_length=32", "save_steps=0", f"output_dir={out}"], "", tmp_path / "pt.log")
    assert stopped.value.exit_code == 143
    assert "SIGTERM: finishing the step" in (tmp_path / "pt.log").read_text() and (out / "checkpoints" / "step-3").is_dir()


def test_without_the_fork_server_the_step_is_a_plain_subprocess_with_the_same_log(tmp_path, monkeypatch):
    Path(tmp_path / "r.jsonl").write_text(json.dumps({"prompt": "2 1", "response": "1 2"}) + "\n")
    logs = {}
    for fork in ("1", "0"):
        monkeypatch.setenv(launch.FORK_ENV, fork)
        log = tmp_path / f"log{fork}.txt"
        step = launch.start_stage_process("data", "check", None, ["check", str(tmp_path / "r.jsonl")], "", log)
        assert isinstance(step.proc, subprocess.Popen) == (fork == "0")
        launch.wait_stage_processes([step])
        logs[fork] = log.read_text()
    assert logs["1"] == logs["0"] and logs["1"]


class FakeStep(launch.StageProcess):
    """A step that ends after `polls` polls and then writes the stage's summary.json, as a stage does last."""

    def __init__(self, name, summary: Path, polls: int):
        super().__init__(name, name, summary.parent / "log.txt", "pipeline")
        self.summary, self.polls = summary, polls

    def poll(self):
        self.polls -= 1
        if self.polls > 0:
            return None
        self.summary.write_text("{}")
        return 0

    def echo(self, final=False):
        pass


def test_run_stages_starts_a_stage_once_its_inputs_are_complete_and_at_most_jobs_at_once(tmp_path, monkeypatch):
    starts, running, peak, alongside = [], set(), [0], {}
    length = {"pretrain": 2, "sft": 2, "label": 1, "rm": 1, "iterate": 6, "ppo": 3, "dpo": 1, "grpo": 1}

    def fake_start(name, stage, config_file, args, launcher, log_path, caller="pipeline", threads=None, prefix=""):
        done_now = {s for s in length if (tmp_path / s / "summary.json").exists()}
        starts.append((stage, threads, frozenset(done_now)))
        alongside[stage] = set(running)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        step = FakeStep(stage, log_path.parent / "summary.json", length[stage])
        original = step.poll

        def poll():
            code = original()
            if code is not None:
                running.discard(stage)
            return code

        step.poll = poll
        running.add(stage)
        peak[0] = max(peak[0], len(running))
        return step

    monkeypatch.setattr(pipeline, "start_stage_process", fake_start)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    (tmp_path / "configs").mkdir()
    cfg = pipeline.PipelineConfig(output_dir=str(tmp_path), config_dir=str(tmp_path / "configs"), jobs=2)
    order = list(length)
    done = pipeline.run_stages(cfg, order, {})
    assert list(done) == order  # pipeline order, whatever order they ended in
    started = [s for s, _, _ in starts]
    # ready stages start in list order, but rm, which the later ones wait on, first and alone: dpo (ready
    # after label, it needs no reward model) waits for it
    assert started == ["pretrain", "sft", "label", "rm", "iterate", "ppo", "dpo", "grpo"]
    needs = {"sft": {"pretrain"}, "label": {"sft"}, "rm": {"sft", "label"}, "iterate": {"sft", "rm"},
             "ppo": {"sft", "rm"}, "dpo": {"sft", "label"}, "grpo": {"sft", "rm"}}
    for stage, threads, complete in starts:
        assert needs.get(stage, set()) <= complete, stage
        # the chain runs alone with every thread; beside another stage, each gets half
        assert threads == (None if stage in ("pretrain", "sft", "label", "rm") else 2), stage
    assert peak[0] == 2
    assert alongside["rm"] == set() and alongside["iterate"] == set() and "rm" not in alongside["dpo"]


def test_with_one_job_the_stages_run_one_after_the_other_in_order(tmp_path, monkeypatch):
    seen = []

    def fake_start(name, stage, config_file, args, launcher, log_path, caller="pipeline", threads=None, prefix=""):
        seen.append((stage, threads, sorted(p.parent.name for p in tmp_path.glob("*/summary.json"))))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        return FakeStep(stage, log_path.parent / "summary.json", 1)

    monkeypatch.setattr(pipeline, "start_stage_process", fake_start)
    cfg = pipeline.PipelineConfig(output_dir=str(tmp_path), config_dir=str(tmp_path), jobs=1)
    pipeline.run_stages(cfg, ["pretrain", "sft", "dpo", "ppo"], {})
    assert [(s, t) for s, t, _ in seen] == [("pretrain", None), ("sft", None), ("dpo", None), ("ppo", None)]
    assert [len(done) for _, _, done in seen] == [0, 1, 2, 3]


def test_a_failed_stage_stops_the_others_and_is_raised(tmp_path, monkeypatch):
    terminated = []

    class Failing(FakeStep):
        def poll(self):
            return 1

    class Long(FakeStep):
        def poll(self):
            return 143 if terminated else None

        def terminate(self):
            terminated.append(self.name)

    def fake_start(name, stage, config_file, args, launcher, log_path, caller="pipeline", threads=None, prefix=""):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("boom\n")
        return (Failing if stage == "dpo" else Long)(stage, log_path.parent / "summary.json", 1)

    monkeypatch.setattr(pipeline, "start_stage_process", fake_start)
    cfg = pipeline.PipelineConfig(output_dir=str(tmp_path), config_dir=str(tmp_path), jobs=2)
    with pytest.raises(RunStopped, match="stage dpo failed with exit code 1"):
        pipeline.run_stages(cfg, ["iterate", "dpo", "ppo"], {})
    assert terminated == ["iterate"]  # ppo never started


def test_jobs_below_one_is_a_config_error_naming_the_field(tmp_path):
    from alignkit.cli import run_stage
    from alignkit.config import ConfigError

    with pytest.raises(ConfigError, match="jobs must be >= 1, got 0"):
        run_stage("pipeline", [f"output_dir={tmp_path / 'p'}", "jobs=0", "stages=[pretrain]"])


def test_each_model_is_evaluated_alone_once_it_exists_and_not_when_the_eval_is_complete(tmp_path, monkeypatch):
    starts = []
    length = {"pretrain": 1, "sft": 1, "label": 1, "rm": 1, "ppo": 12, "dpo": 1, "best_of_n": 1}

    def fake_start(name, stage, config_file, args, launcher, log_path, caller="pipeline", threads=None, prefix=""):
        complete = frozenset(p.parent.name for p in tmp_path.glob("*/summary.json"))
        starts.append((stage, name, args, complete))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if stage in length and stage not in ("label", "best_of_n"):  # a model; best-of-n and label leave none
            (log_path.parent / "final").mkdir(exist_ok=True)
        return FakeStep(stage, log_path.parent / "summary.json", length.get(stage, 1))

    monkeypatch.setattr(pipeline, "start_stage_process", fake_start)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    cfg = pipeline.PipelineConfig(output_dir=str(tmp_path), config_dir=str(tmp_path), jobs=2)
    pipeline.run_stages(cfg, list(length), {})
    evals = {stage: (args, complete) for stage, name, args, complete in starts if name == "eval"}
    # base, sft and each policy with a final/ (best-of-n has none), each after its stage, sft and rm
    assert set(evals) == {"eval:base", "eval:sft", "eval:ppo", "eval:dpo"}
    for step, stage in (("eval:base", "pretrain"), ("eval:sft", "sft"), ("eval:ppo", "ppo"), ("eval:dpo", "dpo")):
        args, complete = evals[step]
        assert {stage, "sft", "rm"} <= complete, step
        assert f"models={json.dumps([str(tmp_path / stage / 'final')])}" in args
        assert f"cache_dir={tmp_path / 'eval' / 'cache'}" in args and f"reference={tmp_path / 'sft' / 'final'}" in args
    # dpo's evaluation did not wait for ppo, which was still running
    assert "ppo" not in evals["eval:dpo"][1]
    # an eval that is complete already (a run dir of before): nothing is evaluated again
    for part in tmp_path.glob("eval/parts/*/summary.json"):
        part.unlink()
    (tmp_path / "eval" / "summary.json").write_text("{}")
    starts.clear()
    pipeline.run_stages(cfg, list(length), {})
    assert starts == []
