"""A model that is not a trained reward model is refused wherever alignkit scores with one.

A causal LM loads as AutoModelForSequenceClassification with a randomly drawn score head (transformers
only logs it as MISSING), so a stage given one would run to the end on noise. The shared loader
(`load_reward_model`, under `rollout.rewards.load_scorer`) refuses it; starting an RM from it (new_head=True,
what the rm stage and a critic do) still works.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from alignkit.cli import run_stage
from alignkit.models.loading import ModelError
from alignkit.models.reward import load_reward_model


@pytest.fixture(scope="module")
def causal_lm_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised causal LM saved with save_pretrained (LlamaForCausalLM, no score head)."""
    from alignkit.data.chat import ensure_chat_template
    from alignkit.models.loading import build_scratch_model
    from alignkit.models.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["sort: c a b", "a b c", "sort: 3 1 2", "1 2 3"] * 20, vocab_size=300)
    ensure_chat_template(tok)
    model = build_scratch_model("tiny", tok, seed=0, overrides={"num_hidden_layers": 1, "hidden_size": 32,
                                                                "intermediate_size": 64})
    out = tmp_path_factory.mktemp("causal")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def refusal(path: Path) -> str:
    """The pattern of the one-line refusal: names the path and how to make a reward model from it."""
    return rf"{re.escape(str(path))} is not a reward model .*`alignkit rm --config FILE model={re.escape(str(path))}`"


def test_loaders_refuse_a_causal_lm(causal_lm_dir: Path):
    from accelerate import Accelerator

    from alignkit.rollout.rewards import load_scorer

    with pytest.raises(ModelError, match=refusal(causal_lm_dir)) as caught:
        load_reward_model(str(causal_lm_dir))
    assert "\n" not in str(caught.value) and "ForCausalLM" in str(caught.value)
    with pytest.raises(ModelError, match=refusal(causal_lm_dir)):
        load_scorer(Accelerator(cpu=True), str(causal_lm_dir))


def test_weights_without_the_head_are_refused_even_under_a_reward_model_config(causal_lm_dir: Path, tmp_path: Path):
    import json
    import shutil

    fake = tmp_path / "fake_rm"
    shutil.copytree(causal_lm_dir, fake)
    config = json.loads((fake / "config.json").read_text())
    (fake / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(ModelError, match=rf"{re.escape(str(fake))} is not a reward model \(its weights lack \['score.weight'\]\)"):
        load_reward_model(str(fake))


def test_starting_a_reward_model_from_a_causal_lm_still_works_and_its_save_loads(causal_lm_dir: Path, tmp_path: Path):
    from alignkit.models.loading import save_model

    rm, tok = load_reward_model(str(causal_lm_dir), new_head=True, seed=1)  # what the rm stage does
    save_model(rm, tok, tmp_path / "rm")
    again, _ = load_reward_model(str(tmp_path / "rm"))  # a saved reward model is accepted
    assert again.score.weight.tolist() == rm.score.weight.tolist()


TINY_RUN = {"max_length": 64, "sampling.max_new_tokens": 8, "sampling.chunk": 4}
STAGES = {
    "best-of-n": {"train_data": "task:sort/prompts?n=4&seed=3", "eval_data": "null", "n": 2, "reward": "rm"},
    "ppo": {"train_data": "task:sort/prompts?n=8&seed=0", "eval_data": "null", "reward": "rm", "max_steps": 1,
            "rollout_batch_size": 2, "samples_per_prompt": 2, "mini_batch_size": 2, "micro_batch_size": 2},
    "label": {"train_data": "task:sort/prompts?n=4&seed=3", "n": 2, "annotator": "rm"},
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stages_refuse_a_causal_lm_as_reward_model(stage: str, causal_lm_dir: Path, tmp_path: Path):
    args = {"model": causal_lm_dir, **TINY_RUN, **STAGES[stage], "reward.model": causal_lm_dir,
            "output_dir": tmp_path / "run"}
    with pytest.raises(ModelError, match=refusal(causal_lm_dir)):
        run_stage(stage, [f"{k}={v}" for k, v in args.items()])
    assert not (tmp_path / "run" / "summary.json").exists()


def test_eval_refuses_a_causal_lm_as_reward_model(causal_lm_dir: Path, tmp_path: Path):
    with pytest.raises(ModelError, match=refusal(causal_lm_dir)):
        run_stage("eval", [f"models=[{causal_lm_dir}]", f"reward.models=[{causal_lm_dir}]",
                           "prompts=task:sort/prompts_eval?n=2", "n_samples=1", "sampling.max_new_tokens=4",
                           f"output_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_scratch_preset_is_not_a_reward_model():
    from alignkit.models.loading import ModelError
    from alignkit.models.reward import load_reward_model

    with pytest.raises(ModelError, match="untrained model, not a reward model"):
        load_reward_model("scratch:tiny")
