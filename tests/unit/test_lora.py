"""models/lora.py: which parameters train, merge equivalence, merged export."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit.models.loading import build_scratch_model, count_parameters, save_model
from alignkit.models.lora import LoraOptions, apply_lora, is_peft_model, merge_lora
from alignkit.models.tokenizer import train_bpe_tokenizer

CORPUS = [f"a little text number {i} about {w}" for i in range(40) for w in ("rain", "sun", "snow")]
HIDDEN, INTER, LAYERS = 128, 352, 6  # the tiny preset


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(CORPUS, vocab_size=200)


def _base(tokenizer, seed: int = 0):
    return build_scratch_model("tiny", tokenizer, seed=seed)


def _ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer(CORPUS[i])["input_ids"][:8] for i in range(3)])


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _train_steps(model, ids: torch.Tensor, steps: int) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_r_zero_leaves_the_model_alone(tokenizer):
    model = _base(tokenizer)
    assert apply_lora(model, LoraOptions()) is model
    assert merge_lora(model) is model
    assert not is_peft_model(model)


def test_negative_rank_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="lora.r"):
        apply_lora(_base(tokenizer), LoraOptions(r=-1))


def test_only_lora_parameters_are_trainable_all_linear(tokenizer):
    r = 4
    model = apply_lora(_base(tokenizer), LoraOptions(r=r))
    # Each adapted Linear(in, out) adds A [r, in] and B [out, r]: q,k,v,o are 128->128,
    # gate/up 128->352, down 352->128; lm_head is excluded by "all-linear".
    per_layer = r * (4 * (HIDDEN + HIDDEN) + 3 * (HIDDEN + INTER))
    assert count_parameters(model, trainable_only=True) == LAYERS * per_layer == 59_136
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_target_module_list(tokenizer):
    model = apply_lora(_base(tokenizer), LoraOptions(r=2, target_modules=["q_proj", "v_proj"]))
    assert count_parameters(model, trainable_only=True) == LAYERS * 2 * 2 * (HIDDEN + HIDDEN)


def test_fresh_adapters_do_not_change_the_output(tokenizer):
    base = _base(tokenizer).eval()
    ids = _ids(tokenizer)
    expected = _logits(base, ids)
    adapted = apply_lora(base, LoraOptions(r=4)).eval()
    torch.testing.assert_close(_logits(adapted, ids), expected, atol=0, rtol=0)


def test_training_changes_only_lora_parameters(tokenizer):
    model = apply_lora(_base(tokenizer), LoraOptions(r=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_steps(model, _ids(tokenizer), steps=1)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    # With B initialised to 0, A gets no gradient on the first step: exactly the B's move.
    assert {n for n in changed} == {n for n in before if "lora_B" in n}


def test_merge_matches_adapted_model_and_uses_alpha_over_r(tokenizer):
    r, alpha = 4, 8
    model = apply_lora(_base(tokenizer), LoraOptions(r=r, alpha=alpha))
    ids = _ids(tokenizer)
    _train_steps(model, ids, steps=3)
    adapted_logits = _logits(model, ids)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    expected_q = q.base_layer.weight + (alpha / r) * q.lora_B["default"].weight @ q.lora_A["default"].weight
    expected_q = expected_q.detach().clone()

    merged = merge_lora(model)
    assert not is_peft_model(merged)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected_q)
    torch.testing.assert_close(_logits(merged, ids), adapted_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(_base(tokenizer).eval(), ids), adapted_logits, atol=1e-3)


def test_save_model_exports_a_plain_merged_model(tokenizer, tmp_path):
    model = apply_lora(_base(tokenizer), LoraOptions(r=4, alpha=16))
    ids = _ids(tokenizer)
    _train_steps(model, ids, steps=3)
    adapted_logits = _logits(model, ids)

    save_model(model, tokenizer, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not is_peft_model(reloaded)
    torch.testing.assert_close(_logits(reloaded, ids), adapted_logits, atol=1e-5, rtol=1e-5)

    # The caller's model is still the adapted, trainable peft model.
    assert is_peft_model(model)
    assert count_parameters(model, trainable_only=True) == LAYERS * 4 * (4 * 256 + 3 * 480)
    torch.testing.assert_close(_logits(model, ids), adapted_logits, atol=0, rtol=0)
