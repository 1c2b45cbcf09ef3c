"""Language-modelling pieces shared by `pretrain` and `sft`: a row is a dict of python lists
`input_ids`, `labels` (-100 where no loss) and `position_ids` when several samples are packed in it."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator

from alignkit.data.packing import collate
from alignkit.losses import lm_loss
from alignkit.ops import IGNORE_INDEX
from alignkit.runtime.train_loop import train


MOSTLY_SCORED = 0.9  # above this fraction of positions carrying loss, the LM head projects them all


def supervised_tokens(row: dict) -> int:
    """Tokens that carry loss after the one-token shift (the first label is never predicted)."""
    return sum(1 for label in row["labels"][1:] if label != -100)


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The LM head (output projection onto the vocabulary) of a model, under DDP-style `.module` wrappers;
    peft models answer get_output_embeddings themselves. None for a model without one."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    get = getattr(model, "get_output_embeddings", None)
    return get() if get is not None else None


@contextmanager
def head_projects_only(model: torch.nn.Module, predicts: torch.Tensor):
    """While in the block, the LM head of `model` projects only the hidden states where `predicts` [B,T] (bool)
    is True, so the forward's logits are [1,K,V] for its K True positions, in row-major order.

    Why: SFT and DPO score only completion tokens, and projecting every prompt and padding position onto the
    vocabulary ([B,T,V], V = 49k for SmolLM2) is most of a small model's step. Everything else in the forward
    (packing, DDP, FSDP, LoRA, gradient checkpointing) is untouched, so the loss equals the full projection's."""
    head = output_head(model)
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0][predicts].unsqueeze(0), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def forward_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy of one micro-batch (a scalar tensor); equals
    `lm_loss(model(...).logits, labels, reduction="sum")`, with the LM head run only on positions whose next
    token carries loss (head_projects_only)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    labels = batch["labels"]
    scored = labels[:, 1:] != IGNORE_INDEX  # the label at t+1 is predicted from the hidden state at t
    # Pretraining scores nearly every position: selecting them would copy the hidden states and save nothing.
    if output_head(model) is None or scored.float().mean() > MOSTLY_SCORED:
        logits = model(**inputs, use_cache=False).logits
        return lm_loss(logits.float(), labels, reduction="sum")
    predicts = torch.nn.functional.pad(scored, (0, 1), value=False)
    with head_projects_only(model, predicts):
        logits = model(**inputs, use_cache=False).logits  # [1,K,V]
    return torch.nn.functional.cross_entropy(logits[0].float(), labels[:, 1:][scored], reduction="sum")


def evaluate_lm(accelerator: Accelerator, model, rows: list[dict], micro_batch_size: int, pad_id: int, packed: bool) -> dict:
    """Token-weighted mean loss and perplexity over `rows`, split across processes."""
    if not rows:
        return {}
    mine = rows[accelerator.process_index :: accelerator.num_processes]
    loss_sum = torch.zeros((), device=accelerator.device)
    n_tokens = torch.zeros((), device=accelerator.device)
    for i in range(0, len(mine), micro_batch_size):
        chunk = mine[i : i + micro_batch_size]
        batch = {k: v.to(accelerator.device) for k, v in collate(chunk, pad_id, packed).items()}
        loss_sum += forward_loss_sum(model, batch)
        n_tokens += sum(supervised_tokens(r) for r in chunk)
    loss_sum, n_tokens = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(n_tokens, "sum")
    loss = (loss_sum / n_tokens.clamp(min=1)).item()
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


def train_lm(
    cfg: Any,
    accelerator: Accelerator,
    model: torch.nn.Module,
    pad_id: int,
    train_rows: list[dict],
    eval_rows: list[dict],
    packed: bool,
    stage: str,
    eval_sets: dict[str, list[dict]] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Next-token training on rows; the loss is normalised by supervised tokens of the global batch.

    eval_sets: name -> rows of each held-out set when there are several (eval_data as a list); each is
    then also evaluated on its own and logged as eval_loss/<name>, eval_ppl/<name>, so forgetting one
    domain while learning another shows in the run's metrics."""
    cap = (lambda rows: rows[: cfg.max_eval_rows]) if cfg.max_eval_rows > 0 else (lambda rows: rows)
    eval_rows = cap(eval_rows)
    sets = {name: cap(rows) for name, rows in (eval_sets or {}).items() if rows}

    def micro_loss(model, indices: list[int]):
        batch = collate([train_rows[i] for i in indices], pad_id, packed)
        return forward_loss_sum(model, {k: v.to(accelerator.device) for k, v in batch.items()}), {}

    def evaluate(m) -> dict:
        out = evaluate_lm(accelerator, m, eval_rows, cfg.micro_batch_size, pad_id, packed)
        for name, rows in sets.items():
            for key, value in evaluate_lm(accelerator, m, rows, cfg.micro_batch_size, pad_id, packed).items():
                out[f"{key}/{name}"] = value
        return out

    model, summary = train(
        cfg,
        accelerator,
        model,
        row_weights=[supervised_tokens(r) for r in train_rows],
        micro_loss=micro_loss,
        evaluate=evaluate,
        stage=stage,
        input_tokens=[len(r["input_ids"]) for r in train_rows],
    )
    summary["train_tokens"] = int(summary.pop("train_weight"))
    summary["n_eval_rows"] = len(eval_rows)
    return model, summary
