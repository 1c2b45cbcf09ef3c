"""Optional LoRA (peft) for any stage that trains: wrap, and merge back for export.

`lora.r = 0` (the default) means full fine-tuning; `r > 0` freezes the base model and trains
low-rank adapters W + (alpha / r) * B @ A on `target_modules` ("all-linear": every linear layer
except the output head). Exports are merged (`merge_lora`), so a LoRA-trained `final/` is a plain
model that loads without peft.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class LoraOptions:
    """LoRA settings (config keys `lora.*`).

    r: adapter rank; 0 turns LoRA off. alpha: scaling numerator (update scaled by alpha / r).
    dropout: dropout on the adapter input. target_modules: module-name suffixes to adapt, or
    "all-linear".
    """

    r: int = 0
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"


def is_peft_model(model: Any) -> bool:
    """True if `model` is wrapped by peft (has adapters to merge)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft absent: nothing can be a peft model
        return False
    return isinstance(model, PeftModel)


def apply_lora(model: torch.nn.Module, opts: LoraOptions) -> torch.nn.Module:
    """Wrap a causal LM with LoRA adapters (only they stay trainable); r == 0 -> model unchanged.

    B is initialised to zero by peft, so the wrapped model starts with exactly the base logits.
    """
    if opts.r < 0:
        raise ValueError(f"lora.r must be >= 0, got {opts.r}")
    if opts.r == 0:
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=opts.r,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=opts.target_modules,
    )
    with warnings.catch_warnings():
        # peft 0.21 calls transformers' deprecated `is_gradient_checkpointing`; not ours to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def merge_lora(model: Any) -> Any:
    """Fold the adapters into the base weights and return the plain base model (in place).

    Anything that is not a peft model is returned unchanged.
    """
    if not is_peft_model(model):
        return model
    return model.merge_and_unload()
