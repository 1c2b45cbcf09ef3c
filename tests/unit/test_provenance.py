"""Provenance of a run (runtime.provenance): fingerprints by hand, and the block every stage writes into its
config.yaml and summary.json (the 2-process run is checked in tests/dist/test_two_processes.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import transformers
import yaml

from alignkit.config import PretrainConfig, load_config
from alignkit.runtime.provenance import describe_input, fingerprint, git_state


def test_fingerprint_of_a_file_and_a_directory(tmp_path: Path):
    f = tmp_path / "data.jsonl"
    f.write_bytes(b'{"text": "a"}\n')
    assert fingerprint(f) == {"path": str(f), "bytes": 14, "sha256": hashlib.sha256(b'{"text": "a"}\n').hexdigest()}
    run = tmp_path / "run"
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    (run / "model.safetensors").write_bytes(b"abc")
    (run / "config.json").write_bytes(b"{}")
    before = fingerprint(run)
    expected = hashlib.sha256()
    for name, data in (("config.json", b"{}"), ("model.safetensors", b"abc")):
        expected.update(f"{name}\0{len(data)}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    assert before == {"path": str(run), "files": 2, "bytes": 5, "sha256": expected.hexdigest()}
    (run / "checkpoints" / "step-1" / "optimizer.bin").write_bytes(b"x" * 100)  # history, not the model
    assert fingerprint(run) == before
    (run / "model.safetensors").write_bytes(b"abd")
    assert fingerprint(run)["sha256"] != before["sha256"]
    assert describe_input("task:sort/sft?n=10") == "task:sort/sft?n=10"  # not a path: kept as given
    assert describe_input([str(f), "scratch:tiny"])[1] == "scratch:tiny"


def test_every_run_records_where_it_came_from(pretrained_tiny: Path):
    summary = json.loads((pretrained_tiny / "summary.json").read_text())
    prov = summary["provenance"]
    assert prov["versions"]["torch"] == torch.__version__ and prov["versions"]["transformers"] == transformers.__version__
    assert prov["versions"]["alignkit"] and "accelerate" in prov["versions"] and "peft" in prov["versions"]
    assert prov["num_processes"] == 1 and prov["device"] == "cpu" and prov["mixed_precision"] == "no"
    assert prov["seed"] == 0 and prov["inputs"]["model"] == "scratch:tiny"
    assert prov["inputs"]["train_data"].startswith("task:sort/pretrain")
    git = git_state()
    assert prov["git"] == git or (git is not None and prov["git"]["commit"] == git["commit"])  # dirty may change
    saved = yaml.safe_load((pretrained_tiny / "config.yaml").read_text())
    assert saved["provenance"]["versions"] == prov["versions"]
    reloaded = load_config(PretrainConfig, pretrained_tiny / "config.yaml")  # the block is skipped on load
    assert reloaded.model == "scratch:tiny" and reloaded.max_steps == saved["max_steps"]


def test_a_local_model_and_data_file_are_fingerprinted(pretrained_tiny: Path, tmp_path: Path):
    from alignkit.cli import run_stage
    from tests.helpers import sft_overrides

    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"sort: c b {x}", "completion": f"b c {x}"}) for x in "defghijklmnopqrstuvwxyz"))
    out = tmp_path / "sft"
    summary = run_stage("sft", sft_overrides(pretrained_tiny / "final", max_steps=1, train_data=str(data),
                                             eval_data="null", output_dir=str(out), batch_size=2, micro_batch_size=2, packing="false"))
    inputs = summary["provenance"]["inputs"]
    assert inputs["train_data"] == fingerprint(data)
    assert inputs["model"]["sha256"] == fingerprint(pretrained_tiny / "final")["sha256"] and inputs["model"]["files"] > 2
