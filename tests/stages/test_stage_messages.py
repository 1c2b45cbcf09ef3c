"""What a stage tells its user: where final/ went and the held-out numbers before -> after, on stderr at the end;
none of the libraries' noise (accelerate's shared-tensor note on every save, the tokenizer's "indexing errors"
warning on texts alignkit cuts anyway); and, from a fresh clone, the command that makes a missing model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from alignkit.runtime.stage import closing_lines
from tests.helpers import REPO, TINY_PRETRAIN, run_cli, sft_overrides

NOISE = ("Removed shared tensor", "Token indices sequence length is longer", "Writing model shards")


def closing(stderr: str, stage: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"[{stage}] ") and "step" not in line.split()[1]]


def test_a_stage_ends_with_its_final_dir_and_numbers_and_no_library_noise(tmp_path: Path):
    pre = tmp_path / "pre"
    done = run_cli(["pretrain", *TINY_PRETRAIN, f"output_dir={pre}", "max_steps=12", "save_steps=6"])
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((pre / "summary.json").read_text())
    last = closing(done.stderr, "pretrain")
    assert last[0].startswith("[pretrain] done in ") and last[0].endswith(f"model in {pre / 'final'}")
    before, after = summary["eval_loss_before"], summary["eval_loss"]
    assert f"eval_loss {before:.3f} -> {after:.3f} (held-out, before -> after)" in last[1]
    # the closing lines are the last thing printed
    assert done.stderr.rstrip().splitlines()[-2:] == last
    # two checkpoints and final/ were written, from a model with tied embeddings: no note about it
    assert (pre / "checkpoints").is_dir()
    for noise in NOISE:
        assert noise not in done.stderr

    # A tokenizer whose model_max_length is below the texts' lengths: transformers warns of "indexing errors"
    # though the SFT stage cuts every sequence to max_length itself.
    model = tmp_path / "short-context"
    shutil.copytree(pre / "final", model)
    tok_cfg = model / "tokenizer_config.json"
    tok_cfg.write_text(json.dumps({**json.loads(tok_cfg.read_text()), "model_max_length": 16}))
    sft = run_cli(["sft", *sft_overrides(model), f"output_dir={tmp_path / 'sft'}", "max_steps=4"])
    assert sft.returncode == 0, sft.stderr[-2000:]
    for noise in NOISE:
        assert noise not in sft.stderr
    assert closing(sft.stderr, "sft")[1].startswith("[sft] eval_loss ")


def test_closing_lines_of_stages_without_a_model():
    label = closing_lines("label", "/nowhere/label", {"wall_s": 9.4, "train_prompts": 48, "n": 4,
                                                       "train_pair_label_gold_agreement": 0.786})
    assert label == ["[label] done in 9s: results in /nowhere/label/summary.json",
                     "[label] 48 prompts x 4 samples, pairs agree with gold on 78.6%"]
    bon = closing_lines("best-of-n", "/nowhere/bon", {"n": 4, "gold_reward": 0.61, "sample_gold_reward": 0.48,
                                                       "eval_gold_reward": 0.6, "eval_sample_gold_reward": 0.5})
    assert bon[1] == "[best-of-n] eval_gold_reward 0.500 (all samples) -> 0.600 (best of 4, held-out prompts)"
    ppo = closing_lines("ppo", "/nowhere/ppo", {"eval_gold_reward_before": 0.48, "eval_gold_reward": 0.81,
                                                 "eval_kl_before": 0.0, "eval_kl": 0.35, "eval_reward": 1.0})
    assert ppo[1] == "[ppo] eval_gold_reward 0.480 -> 0.810, eval_kl 0.000 -> 0.350 (held-out, before -> after)"


def test_a_fresh_clone_is_told_which_command_makes_the_missing_model(tmp_path: Path, monkeypatch, capsys):
    from alignkit.cli import main

    # a fresh clone: the tiny configs, no runs/
    shutil.copytree(REPO / "configs" / "tiny", tmp_path / "configs" / "tiny")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "--config", "configs/tiny/sft.yaml"])
    assert exit_info.value.code != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    wanted = "'runs/tiny/pretrain/final' does not exist: run `alignkit pretrain --config configs/tiny/pretrain.yaml` first"
    assert len(err) == 1 and wanted in err[0], err
    assert not (tmp_path / "runs" / "tiny" / "sft" / "config.yaml").exists()

    # a run dir no config writes: the general hint, still one line
    with pytest.raises(SystemExit):
        main(["sft", "model=elsewhere/sft/final", "train_data=task:sort/sft?n=50"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and re.search(r"'elsewhere/sft/final' is neither .* output_dir elsewhere/sft finishes", err[0])
