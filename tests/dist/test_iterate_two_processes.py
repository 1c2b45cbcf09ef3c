"""`alignkit iterate launcher='accelerate launch ... --num_processes 2'`: one round with every step in two
processes (label, rm, grpo, probe; eval runs on rank 0) gives the one-process run's labels, reward model,
policy and round line."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from tests.helpers import LAUNCH, max_weight_diff, read_jsonl, run_cli
from tests.stages.test_iterate import comparable, iterate_args

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_one_round_in_two_processes_equals_one_process(pretrained_tiny: Path, tmp_path: Path):
    sft = pretrained_tiny / "final"
    one = run_cli(iterate_args(sft, tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = " ".join(shlex.quote(part) for part in LAUNCH)
    two = run_cli(iterate_args(sft, tmp_path / "two", f"launcher={json.dumps(launcher)}"), env={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    rm_summary = json.loads((tmp_path / "two" / "round-1" / "rm" / "summary.json").read_text())
    assert rm_summary["num_processes"] == 2
    for step in ("round-0/label", "round-1/label", "round-1/probe"):  # the same samples, the same labels
        assert (tmp_path / "one" / step / "pairs.jsonl").read_text() == (tmp_path / "two" / step / "pairs.jsonl").read_text()
    assert max_weight_diff(tmp_path / "one" / "round-1" / "rm" / "final", tmp_path / "two" / "round-1" / "rm" / "final") < 1e-4
    assert max_weight_diff(tmp_path / "one" / "final", tmp_path / "two" / "final") < 1e-4
    one_lines, two_lines = comparable(read_jsonl(tmp_path / "one" / "rounds.jsonl")), comparable(
        read_jsonl(tmp_path / "two" / "rounds.jsonl"))
    for a, b in zip(one_lines, two_lines):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], abs=1e-3), key
            else:
                assert a[key] == b[key], key
