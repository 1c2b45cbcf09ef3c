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
        # a copy, not a view: FSDP2 warns about a view output (an in-place op on it would skip its backward hook)
        return head(hidden[:, -n_keep:]).squeeze(-1).float().clone()


def load_value_model(name_or_path: str, seed: int = 0) -> tuple[ValueModel, Any]:
    """(critic, its tokenizer) from a reward-model or causal-LM checkpoint (a fresh head from `seed`)."""
    model, tokenizer = load_reward_model(name_or_path, new_head=True, seed=seed)  # a critic may start from the policy
    return ValueModel(model), tokenizer


def same_vocabulary(a: Any, b: Any) -> bool:
    """True when two tokenizers map every token to the same id (a critic must read the policy's ids)."""
    return a.get_vocab() == b.get_vocab()


class ValueHead(torch.nn.Module):
    """`share_backbone=true`'s critic: a scalar linear head on the ACTOR's last hidden state (after the final
    norm, the input of the LM head), so one transformer serves policy and critic (one forward gives logits and
    values). Shaped like ValueModel's score head (a bias-free Linear) and initialised the same way: normal with
    the model's initializer_range, from `seed`. `forward(hidden[..., H]) -> values[...]` (float32)."""

    def __init__(self, hidden_size: int, seed: int = 0, std: float = 0.02, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1, bias=False, dtype=dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            torch.nn.init.normal_(self.score.weight, std=std)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1).float()


def value_head_for(policy: torch.nn.Module, seed: int) -> ValueHead:
    """A fresh ValueHead sized and typed for `policy` (a causal LM, plain or peft-wrapped)."""
    config, output = policy.config, policy.get_output_embeddings()
    return ValueHead(output.weight.shape[1], seed, getattr(config, "initializer_range", 0.02), output.weight.dtype)


def save_value_head(head: ValueHead, path) -> None:
    """The head's weight as safetensors (`score.weight` [1, H]), written to a temporary file then renamed."""
    import os

    from safetensors.torch import save_file

    tmp = f"{path}.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, tmp)
    os.replace(tmp, path)


def load_value_head(path, dtype: torch.dtype = torch.float32) -> ValueHead:
    """The ValueHead saved by save_value_head."""
    from safetensors.torch import load_file

    weights = load_file(str(path))
    head = ValueHead(weights["score.weight"].shape[1], dtype=dtype)
    head.load_state_dict(weights)
    return head
