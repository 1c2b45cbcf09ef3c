"""models/loading.py: scratch presets, HF-directory loading, export round trips, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.models.loading import (
    SCRATCH_PRESETS,
    ModelError,
    build_scratch_model,
    cache_dir,
    count_parameters,
    is_scratch,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
    save_model,
)
from alignkit.models.tokenizer import train_bpe_tokenizer

CORPUS = [
    f"the {animal} number {i} eats {food} near the {place}."
    for i, (animal, food, place) in enumerate(
        (a, f, p)
        for a in ("cat", "dog", "fox", "owl", "bee")
        for f in ("bread", "seeds", "fish", "honey", "apples")
        for p in ("river", "hill", "barn", "forest", "road", "lake", "town", "field")
    )
]  # 200 strings


class FakeTokenizer:
    """Just what build_scratch_model reads: a vocabulary size and the special-token ids."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    model, tok = load_causal_lm("scratch:tiny", train_texts=lambda: CORPUS, vocab_size=300, seed=0)
    return model.eval(), tok


def _expected_llama_params(vocab: int, hidden: int, layers: int, inter: int) -> int:
    """Tied embeddings + per layer (q,k,v,o; gate,up,down; 2 RMSNorms) + final RMSNorm."""
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    return vocab * hidden + layers * per_layer + hidden


def test_preset_parameter_counts_at_vocab_1024():
    tiny = build_scratch_model("tiny", FakeTokenizer(1024), seed=0)
    small = build_scratch_model("scratch:small", FakeTokenizer(1024), seed=0)
    assert count_parameters(tiny) == _expected_llama_params(1024, 128, 6, 352) == 1_336_960
    assert count_parameters(small) == _expected_llama_params(1024, 256, 6, 704) == 5_082_368
    assert 1_000_000 <= count_parameters(tiny) <= 5_000_000
    assert 5_000_000 <= count_parameters(small) <= 8_000_000
    assert tiny.lm_head.weight is tiny.model.embed_tokens.weight  # tied


def test_config_takes_vocab_and_special_ids_from_tokenizer():
    model = build_scratch_model("tiny", FakeTokenizer(77), seed=0)
    cfg = model.config
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (77, 1, 2, 3)
    assert model.get_input_embeddings().weight.shape == (77, 128)


def test_overrides_replace_preset_fields():
    model = build_scratch_model("tiny", FakeTokenizer(64), seed=0, overrides={"num_hidden_layers": 2})
    assert len(model.model.layers) == 2
    assert SCRATCH_PRESETS["tiny"]["num_hidden_layers"] == 6  # the preset itself is untouched


def _reference_llama_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Independent Llama forward from the state dict: pre-norm RMSNorm, RoPE, SwiGLU, tied head.

    ids [B, T] -> logits [B, T, V].
    """
    cfg, sd = model.config, model.state_dict()
    n_heads, eps = cfg.num_attention_heads, cfg.rms_norm_eps
    head_dim = cfg.hidden_size // n_heads
    batch, seq = ids.shape

    def rms_norm(x, weight):
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(seq).float(), inv_freq)  # [T, head_dim/2]
    cos, sin = angles.cos(), angles.sin()

    def rope(x):  # [B, H, T, head_dim]; rotates pairs (i, i + head_dim/2)
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def heads(x):
        return x.view(batch, seq, n_heads, head_dim).transpose(1, 2)

    causal = torch.full((seq, seq), float("-inf")).triu(1)
    h = sd["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = rms_norm(h, sd[p + "input_layernorm.weight"])
        q = rope(heads(x @ sd[p + "self_attn.q_proj.weight"].T))
        k = rope(heads(x @ sd[p + "self_attn.k_proj.weight"].T))
        v = heads(x @ sd[p + "self_attn.v_proj.weight"].T)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim) + causal, dim=-1)
        h = h + (att @ v).transpose(1, 2).reshape(batch, seq, -1) @ sd[p + "self_attn.o_proj.weight"].T
        x = rms_norm(h, sd[p + "post_attention_layernorm.weight"])
        gated = F.silu(x @ sd[p + "mlp.gate_proj.weight"].T) * (x @ sd[p + "mlp.up_proj.weight"].T)
        h = h + gated @ sd[p + "mlp.down_proj.weight"].T
    return rms_norm(h, sd["model.norm.weight"]) @ sd["model.embed_tokens.weight"].T


def test_architecture_matches_reference_llama():
    model = build_scratch_model("tiny", FakeTokenizer(64), seed=0).eval()
    # Perturb every weight (RMSNorm weights start at 1) so the comparison exercises all of them.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    ids = torch.randint(0, 64, (2, 11), generator=gen)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, _reference_llama_logits(model, ids), atol=1e-4, rtol=1e-4)


def test_same_seed_same_weights_and_global_rng_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_scratch_model("tiny", FakeTokenizer(64), seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    b = build_scratch_model("tiny", FakeTokenizer(64), seed=7)
    c = build_scratch_model("tiny", FakeTokenizer(64), seed=8)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ModelError, match="scratch:tiny, scratch:small"):
        build_scratch_model("scratch:huge", FakeTokenizer(64), seed=0)


def test_scratch_without_training_text_is_an_error():
    with pytest.raises(ModelError, match="training text"):
        load_causal_lm("scratch:tiny")


def test_load_scratch_tiny_trains_tokenizer_and_generates(tiny):
    model, tok = tiny
    assert tok.chat_template and tok.pad_token == "<|pad|>" and tok.eos_token == "<|im_end|>"
    assert model.config.vocab_size == len(tok) == model.get_input_embeddings().weight.shape[0]
    assert model.config.eos_token_id == tok.eos_token_id
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "the cat"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 4)
    assert torch.equal(out[0, : prompt["input_ids"].shape[1]], prompt["input_ids"][0])
    assert isinstance(tok.decode(out[0, -4:]), str)


def test_scratch_with_given_tokenizer_path(tiny, tmp_path):
    _, tok = tiny
    tok.save_pretrained(tmp_path)
    model, loaded = load_causal_lm("scratch:tiny", tokenizer=str(tmp_path), seed=0)
    assert loaded.get_vocab() == tok.get_vocab()
    assert model.config.vocab_size == len(tok)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_save_model_reloads_with_auto_classes(tiny, tmp_path):
    model, tok = tiny
    save_model(model, tok, tmp_path / "final")
    assert (tmp_path / "final" / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    reloaded_tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    ids = tok(CORPUS[:2], return_tensors="pt", padding=True)["input_ids"]
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=0, rtol=0)
    assert reloaded_tok(CORPUS[5])["input_ids"] == tok(CORPUS[5])["input_ids"]
    assert reloaded_tok.chat_template == tok.chat_template
    assert reloaded_tok.pad_token == tok.pad_token


def test_local_hf_directory_loads_through_load_causal_lm(tiny, tmp_path):
    model, tok = tiny
    save_model(model, tok, tmp_path)
    loaded, loaded_tok = load_causal_lm(str(tmp_path), dtype=torch.float32)
    ids = torch.tensor([tok(CORPUS[3])["input_ids"]])
    torch.testing.assert_close(_logits(loaded.eval(), ids), _logits(model, ids), atol=0, rtol=0)
    assert loaded_tok.get_vocab() == tok.get_vocab()
    assert loaded.config.use_cache is model.config.use_cache  # config left as saved


def test_bfloat16_dtype_is_honoured(tiny, tmp_path):
    model, tok = tiny
    save_model(model, tok, tmp_path)
    loaded, _ = load_causal_lm(str(tmp_path), dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16


def test_tokenizer_with_extra_tokens_resizes_embeddings(tiny, tmp_path):
    model, tok = tiny
    save_model(model, tok, tmp_path / "model")
    bigger = AutoTokenizer.from_pretrained(tmp_path / "model")
    bigger.add_tokens(["<|tool|>", "<|obs|>"], special_tokens=True)
    bigger.save_pretrained(tmp_path / "tok")
    loaded, loaded_tok = load_causal_lm(str(tmp_path / "model"), tokenizer=str(tmp_path / "tok"))
    assert len(loaded_tok) == len(tok) + 2
    assert loaded.get_input_embeddings().weight.shape[0] >= len(tok) + 2
    # the original rows are kept
    old_rows = model.get_input_embeddings().weight
    torch.testing.assert_close(loaded.get_input_embeddings().weight[: len(tok)], old_rows)


@pytest.mark.parametrize("missing", ["/nonexistent/alignkit-model", "./no/such/dir", "runs/a/final"])
def test_missing_path_is_a_model_error_naming_it(missing):
    with pytest.raises(ModelError, match="neither an existing path") as info:
        load_causal_lm(missing)
    assert missing in str(info.value)
    with pytest.raises(ModelError, match="neither an existing path"):
        load_tokenizer(missing)


def test_directory_without_a_model_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match=str(tmp_path)):
        load_causal_lm(str(tmp_path))


def test_names_and_cache_dir(monkeypatch, tmp_path):
    assert is_scratch("scratch:tiny") and not is_scratch("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model_path("/some/local/dir") == "/some/local/dir"
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ALIGNKIT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "alignkit"


def test_count_parameters_trainable_only(tiny):
    model = build_scratch_model("tiny", FakeTokenizer(64), seed=0)
    model.model.embed_tokens.weight.requires_grad_(False)  # tied: the head goes with it
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - 64 * 128


def test_a_run_directory_as_model_points_at_its_final(tmp_path):
    from alignkit.models.loading import ModelError, load_causal_lm

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    (run / "config.yaml").write_text("lr: 1\n")
    with pytest.raises(ModelError, match=r"is a run directory, not a model: use .*run/final"):
        load_causal_lm(str(run))
