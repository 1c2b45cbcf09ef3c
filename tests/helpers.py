"""Shared test helpers: run a stage in-process or as a subprocess, and compare saved weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Small enough for seconds on 2 CPU cores, big enough that losses move for real.
TINY_PRETRAIN = [
    "model=scratch:tiny", "vocab_size=512", "train_data=task:sort/pretrain?n=1500&seed=0", "eval_data=0.1",
    "max_length=64", "batch_size=16", "micro_batch_size=8", "lr=3e-3", "max_steps=40", "warmup_steps=5",
    "log_steps=5",
]


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (blank lines skipped)."""
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def tiny_llama(seed: int = 0, classifier: bool = False, attn: str | None = None, **config: object):
    """A 2-layer Llama (vocab 50, hidden 32, 4 heads) in eval mode, its weights seeded with `seed`: a causal LM,
    or with classifier=True a 1-label sequence classifier (a reward model's shape). `config` overrides any
    LlamaConfig field; `attn` sets the attention implementation."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    fields = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=64, num_labels=1, pad_token_id=0)
    llama = LlamaConfig(**{**fields, **config})
    if attn is not None:
        llama._attn_implementation = attn
    torch.manual_seed(seed)
    return (LlamaForSequenceClassification if classifier else LlamaForCausalLM)(llama).eval()


def sft_overrides(model_dir: str | Path, **extra: object) -> list[str]:
    base = {
        "model": str(model_dir), "train_data": "task:sort/sft?n=600&seed=0", "eval_data": 0.15,
        "max_length": 64, "batch_size": 8, "micro_batch_size": 4, "lr": 2e-3, "max_steps": 12,
        "warmup_steps": 2, "log_steps": 2,
    }
    base.update(extra)
    return [f"{k.replace('__', '.')}={v}" for k, v in base.items()]  # sampling__chunk=4: sampling.chunk=4


def run_cli(args: list[str], env: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """`python -m alignkit ARGS` (or under `launcher`) as a subprocess, output captured."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = (launcher or [sys.executable]) + ["-m", "alignkit", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=str(REPO), timeout=600)


def killed_and_resumed(stage: str, common: list[str], out: Path, kill_at: int, checkpoint: int,
                       env: dict | None = None) -> subprocess.CompletedProcess:
    """The kill/resume check of every stage: run `stage` whole into out/full, then into out/killed with a
    SIGKILL at step `kill_at` (ALIGNKIT_KILL_AT_STEP: no chance to clean up), assert it died leaving no final/
    and the checkpoint of step `checkpoint` as the newest complete one, rerun it with resume=true and return
    that (successful) run; the caller compares out/full with out/killed."""
    full = run_cli([stage, *common, f"output_dir={out / 'full'}"], env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    killed_dir = out / "killed"
    killed = run_cli([stage, *common, f"output_dir={killed_dir}"], env={**(env or {}), "ALIGNKIT_KILL_AT_STEP": str(kill_at)})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (killed_dir / "final").exists()
    steps = sorted(int(p.name.split("-")[1]) for p in (killed_dir / "checkpoints").glob("step-*"))
    assert steps and steps[-1] == checkpoint, steps
    resumed = run_cli([stage, *common, f"output_dir={killed_dir}", "resume=true"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return resumed


# On a machine without GPUs, `--multi_gpu` is accelerate's torchrun path; alignkit's Accelerator(cpu=True)
# then joins the processes into one gloo group. (`--cpu` alone starts a single process.)
LAUNCH = [
    sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
]


def one_and_two_processes(stage: str, common: list[str], out: Path, one_extra: list[str] = (),
                          one_env: dict | None = None) -> tuple[dict, dict]:
    """Run `stage` with `common` overrides in one process (out/one, plus `one_extra`) and under LAUNCH in two
    (out/two, one OpenMP thread each); assert both succeeded and return their summaries (one, two)."""
    import json

    one = run_cli([stage, *common, *one_extra, f"output_dir={out / 'one'}"], env=one_env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli([stage, *common, f"output_dir={out / 'two'}"], launcher=LAUNCH, env={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    return (json.loads((out / "one" / "summary.json").read_text()),
            json.loads((out / "two" / "summary.json").read_text()))


def untrained_rm(lm_dir: str | Path, out: Path, seed: int = 0) -> Path:
    """A reward model saved at `out`: the causal LM at `lm_dir` with a fresh seeded head (untrained, but a
    real reward model on disk; scoring with the causal LM itself is refused)."""
    from alignkit.models.loading import save_model
    from alignkit.models.reward import load_reward_model

    rm, tok = load_reward_model(str(lm_dir), new_head=True, seed=seed)
    save_model(rm, tok, out)
    return out


def load_weights(model_dir: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def max_weight_diff(a_dir: str | Path, b_dir: str | Path) -> float:
    a, b = load_weights(a_dir), load_weights(b_dir)
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


