"""rollout.sampling.generate samples from the caller's arguments alone, and cuts long prompts from the left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from alignkit.rollout.sampling import generate
from alignkit.models.loading import build_scratch_model, load_causal_lm

PROMPTS = [[{"role": "user", "content": "sort: 3 1 2"}], [{"role": "user", "content": "hello there, please reply"}],
           [{"role": "user", "content": "sort: c a b"}]]
# Defaults a hub checkpoint may ship in its generation_config.json. The last three have no "off" value
# but None, so only hiding the model's own config keeps them out of a passed GenerationConfig.
MODEL_DEFAULTS = {"do_sample": True, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "top_k": 5, "top_p": 0.5, "temperature": 0.3,
                  "min_p": 0.2, "suppress_tokens": [5, 6, 7], "min_new_tokens": 4}


@pytest.fixture(scope="module")
def tokenizer():
    from alignkit.data.chat import ensure_chat_template
    from alignkit.models.tokenizer import train_bpe_tokenizer

    texts = ["sort: c a b", "a b c", "c b a", "sort: 3 1 2", "1 2 3", "hello there", "please reply"] * 20
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    ensure_chat_template(tok)
    return tok


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """(plain, with_defaults): the same weights, saved without and with a generation_config full of defaults."""
    model = build_scratch_model("tiny", tokenizer, seed=0, overrides={"num_hidden_layers": 2, "hidden_size": 64,
                                                                      "intermediate_size": 128, "tie_word_embeddings": False})
    # A random init predicts nearly uniformly, where penalties and truncation change no draw; a larger head
    # gives the peaked next-token distributions of a trained model.
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    plain, with_defaults = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("with_defaults")
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    model.generation_config = GenerationConfig(**{**model.generation_config.to_dict(), **MODEL_DEFAULTS})
    model.save_pretrained(with_defaults)
    tokenizer.save_pretrained(with_defaults)
    return plain, with_defaults


def _ids(gens: list[list]) -> list[list[int]]:
    return [g.response_ids for per_prompt in gens for g in per_prompt]


def test_model_generation_defaults_do_not_change_what_is_sampled(model_dirs):
    plain_dir, defaults_dir = model_dirs
    saved = json.loads((defaults_dir / "generation_config.json").read_text())
    assert saved["repetition_penalty"] == 1.3 and saved["no_repeat_ngram_size"] == 2 and saved["top_k"] == 5
    plain, tok = load_causal_lm(str(plain_dir))
    with_defaults, _ = load_causal_lm(str(defaults_dir))
    assert with_defaults.generation_config.repetition_penalty == 1.3  # the loaded model does carry them

    # The test can fail: transformers' own generate, given only our sampling arguments, merges the defaults in.
    def raw(model):
        torch.manual_seed(0)
        ids = tok(["<|im_start|>user\nsort: 3 1 2<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")["input_ids"]
        return model.generate(ids, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=24,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).tolist()

    assert raw(plain) != raw(with_defaults)

    for kwargs in ({"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.9}, {"do_sample": False}):
        a = generate(plain, tok, PROMPTS, n=3, max_new_tokens=24, seed=11, **kwargs)
        b = generate(with_defaults, tok, PROMPTS, n=3, max_new_tokens=24, seed=11, **kwargs)
        assert _ids(a) == _ids(b), kwargs
    # The model's own config is back after the call.
    assert with_defaults.generation_config.repetition_penalty == 1.3 and with_defaults.generation_config.top_k == 5


def test_max_prompt_tokens_keeps_the_end_of_a_long_prompt(model_dirs):
    from alignkit.data.chat import render_prompt

    model, tok = load_causal_lm(str(model_dirs[0]))
    dialogue = []
    for turn in range(8):
        dialogue += [{"role": "user", "content": f"sort: {turn} 3 1 2"}, {"role": "assistant", "content": "1 2 3"}]
    dialogue.append({"role": "user", "content": "sort: c a b"})
    full = tok(render_prompt(tok, dialogue), add_special_tokens=False)["input_ids"]
    assert len(full) > 40
    (cut,) = generate(model, tok, [dialogue], do_sample=False, max_new_tokens=8, max_prompt_tokens=20)
    assert cut[0].prompt_ids == full[-20:]  # the last 20 tokens: the final question and the generation prompt
    assert tok.decode(cut[0].prompt_ids).endswith("sort: c a b<|im_end|>\n<|im_start|>assistant\n")
    # The model was conditioned on the cut prompt: greedy from those 20 ids alone gives the same response.
    torch.manual_seed(0)
    alone = model.generate(torch.tensor([full[-20:]]), do_sample=False, max_new_tokens=8, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)[0, 20:].tolist()
    assert alone[: len(cut[0].response_ids)] == cut[0].response_ids
    # A limit the prompt fits in changes nothing.
    (whole,) = generate(model, tok, [dialogue], do_sample=False, max_new_tokens=8)
    (roomy,) = generate(model, tok, [dialogue], do_sample=False, max_new_tokens=8, max_prompt_tokens=len(full))
    assert whole[0].prompt_ids == roomy[0].prompt_ids == full and whole[0].response_ids == roomy[0].response_ids
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        generate(model, tok, [dialogue], max_prompt_tokens=0)


def test_shared_prompt_prefill_samples_what_a_full_prefill_samples(model_dirs, monkeypatch):
    """n samples of a prompt share one prefill of its first W-1 columns (sampling.prompt_cache); the samples
    are those of a prefill over all n copies, token for token, with prompts of different lengths (left
    padding) in one batch, and a PEFT-wrapped model takes the same path."""
    import alignkit.rollout.sampling as sampling

    model, tok = load_causal_lm(str(model_dirs[0]))
    calls = []
    real = sampling.prompt_cache

    def counted(*args):
        out = real(*args)
        calls.append(sum(1 for _ in out))
        return out

    monkeypatch.setattr(sampling, "prompt_cache", counted)
    shared = _ids(generate(model, tok, PROMPTS, n=4, max_new_tokens=12, batch_size=8, seed=3))
    assert calls == [1, 1]  # two batches (2 prompts x 4, then 1 x 4), each with a shared cache
    monkeypatch.setattr(sampling, "prompt_cache", lambda *args: {})
    full = _ids(generate(model, tok, PROMPTS, n=4, max_new_tokens=12, batch_size=8, seed=3))
    assert shared == full
    assert len({tuple(r) for r in full}) > 3  # the draws differ: the comparison is not between copies of one answer

    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(sampling, "prompt_cache", counted)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert _ids(generate(wrapped, tok, PROMPTS, n=4, max_new_tokens=12, batch_size=8, seed=3)) == full  # B = 0: same model
