"""`forward_loss_sum` runs the LM head only on positions whose next token carries loss; its loss and gradients
equal the full projection's (`lm_loss` over [B,T,V] logits), packed or padded, with LoRA too."""

from __future__ import annotations

import torch

from alignkit.data.packing import collate
from alignkit.losses import lm_loss
from alignkit.runtime.lm import forward_loss_sum, head_projects_only
from tests.helpers import tiny_llama


def rows() -> list[dict]:
    g = torch.Generator().manual_seed(3)
    out = []
    for prompt_len, response_len in [(5, 3), (2, 9), (7, 1), (4, 0)]:  # the last row carries no loss at all
        ids = torch.randint(1, 50, (prompt_len + response_len,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:]})
    return out


def full_projection_loss(model, batch) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return lm_loss(model(**inputs, use_cache=False).logits.float(), batch["labels"], reduction="sum")


def grads(model, loss_fn, batch) -> list[torch.Tensor]:
    model.zero_grad()
    loss = loss_fn(model, batch)
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_loss_and_gradients_equal_the_full_projection_padded_and_packed():
    for packed in (False, True):
        model = tiny_llama(seed=1).train()
        batch = collate(rows(), pad_id=0, packed=packed)
        restricted, full = grads(model, forward_loss_sum, batch), grads(model, full_projection_loss, batch)
        assert len(restricted) == len(full) > 1
        assert abs(restricted[0].item() - full[0].item()) < 1e-5 and full[0].item() > 1.0
        for a, b in zip(restricted[1:], full[1:]):
            assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


def test_head_sees_only_the_positions_that_predict_a_label():
    model = tiny_llama(seed=1)
    batch = collate(rows(), pad_id=0, packed=False)
    predicts = torch.nn.functional.pad(batch["labels"][:, 1:] != -100, (0, 1), value=False)
    with torch.no_grad(), head_projects_only(model, predicts):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (1, 3 + 9 + 1, 50)  # one position per label, none for the prompt-only row
    with torch.no_grad():
        every = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(logits[0], every[predicts], atol=1e-6)  # the hook is gone after the block: [B,T,V] again


def test_lora_model_matches_too():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(seed=2).train(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = collate(rows(), pad_id=0, packed=True)
    restricted, full = grads(model, forward_loss_sum, batch), grads(model, full_projection_loss, batch)
    assert abs(restricted[0].item() - full[0].item()) < 1e-5
    for a, b in zip(restricted[1:], full[1:]):
        assert torch.allclose(a, b, atol=1e-6)
