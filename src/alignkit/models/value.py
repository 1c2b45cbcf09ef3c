"""The PPO critic: a causal LM's transformer with a scalar head, read at EVERY position (a value per token).

It is a reward-model-shaped network (`AutoModelForSequenceClassification`, num_labels=1): InstructGPT
initialises the critic from the reward model, whose head already maps a hidden state to a score; started
from a policy checkpoint the head is fresh (seeded). Only the forward differs from a reward model: the
head reads the last `n_keep` hidden states instead of the one at the end of the text.
"""

from __future__ import annotations

from typing import Any

import torch

from alignkit.models.reward import _base_and_head, load_reward_model


class ValueModel(torch.nn.Module):
    """`forward(input_ids, attention_mask, position_ids, n_keep) -> values[B, n_keep]` (float32).

    Wraps the sequence-classification model so that DDP (accelerator.prepare) sees one module whose
    forward is the per-token value computation; `.model` is what gets saved.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                n_keep: int) -> torch.Tensor:
        """input_ids, attention_mask, position_ids [B,L] -> values [B,n_keep] of the last n_keep positions."""
        base, head = _base_and_head(self.model)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
        return head(hidden[:, -n_keep:]).squeeze(-1).float()


def load_value_model(name_or_path: str, seed: int = 0) -> tuple[ValueModel, Any]:
    """(critic, its tokenizer) from a reward-model or causal-LM checkpoint (a fresh head from `seed`)."""
    model, tokenizer = load_reward_model(name_or_path, new_head=True, seed=seed)  # a critic may start from the policy
    return ValueModel(model), tokenizer


def same_vocabulary(a: Any, b: Any) -> bool:
    """True when two tokenizers map every token to the same id (a critic must read the policy's ids)."""
    return a.get_vocab() == b.get_vocab()
