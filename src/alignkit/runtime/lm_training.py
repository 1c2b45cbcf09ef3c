"""The next-token-prediction loop shared by `pretrain` and `sft` (they differ only in their rows).

A row is a dict of python lists: `input_ids`, `labels` (-100 where no loss), and `position_ids` when
several samples are packed into it. The loss of an optimizer step is the sum of token losses over the
whole GLOBAL batch divided by its number of supervised tokens. Every process knows the whole global
batch (rows are chosen by `BatchPlan` from the seed and step), so it can divide by the global token count
without communication; gradients are then exactly those of one process on the whole batch, whatever the
number of processes and micro-batches (up to float summation order).
"""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from alignkit.data.packing import collate
from alignkit.losses import lm_loss
from alignkit.runtime.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from alignkit.runtime.logging import RunLogger
from alignkit.runtime.setup import BatchPlan, build_optimizer, build_scheduler, total_steps

KILL_ENV = "ALIGNKIT_KILL_AT_STEP"  # test hook: SIGKILL this process right after that optimizer step


def supervised_tokens(row: dict) -> int:
    """Tokens that carry loss after the one-token shift (the first label is never predicted)."""
    return sum(1 for label in row["labels"][1:] if label != -100)


def forward_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy of one micro-batch (a scalar tensor)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**inputs, use_cache=False).logits
    return lm_loss(logits.float(), batch["labels"], reduction="sum")


@torch.no_grad()
def evaluate_lm(accelerator: Accelerator, model, rows: list[dict], micro_batch_size: int, pad_id: int, packed: bool) -> dict:
    """Token-weighted mean loss and perplexity over `rows`, split across processes."""
    if not rows:
        return {}
    model.eval()
    mine = rows[accelerator.process_index :: accelerator.num_processes]
    loss_sum = torch.zeros((), device=accelerator.device)
    n_tokens = torch.zeros((), device=accelerator.device)
    for i in range(0, len(mine), micro_batch_size):
        chunk = mine[i : i + micro_batch_size]
        batch = {k: v.to(accelerator.device) for k, v in collate(chunk, pad_id, packed).items()}
        loss_sum += forward_loss_sum(model, batch)
        n_tokens += sum(supervised_tokens(r) for r in chunk)
    loss_sum, n_tokens = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(n_tokens, "sum")
    model.train()
    loss = (loss_sum / n_tokens.clamp(min=1)).item()
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(n_tokens.item())}


def train_lm(
    cfg: Any,
    accelerator: Accelerator,
    model: torch.nn.Module,
    pad_id: int,
    train_rows: list[dict],
    eval_rows: list[dict],
    packed: bool,
    stage: str,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train `model` on `train_rows`; return the (prepared) model and the summary numbers."""
    plan = BatchPlan(
        n_rows=len(train_rows),
        batch_size=cfg.batch_size,
        micro_batch_size=cfg.micro_batch_size,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        seed=cfg.seed,
    )
    steps = total_steps(cfg.max_steps, cfg.epochs, plan.steps_per_epoch)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2))
    scheduler = build_scheduler(optimizer, cfg.lr_schedule, cfg.warmup_steps, steps, cfg.min_lr_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is stepped by us once per optimizer step (not wrapped by accelerate, which would
    # step it once per process); registering it puts its state into every checkpoint.
    accelerator.register_for_checkpointing(scheduler)

    state: dict[str, Any] = {"train_tokens": 0, "input_tokens": 0, "train_s": 0.0}
    start_step = 0
    checkpoint = latest_checkpoint(cfg.output_dir) if cfg.resume else None
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)
        start_step = state.pop("step")
    logger = RunLogger(cfg.output_dir, stage, steps, accelerator.is_main_process, start_step)
    eval_rows = eval_rows[: cfg.max_eval_rows] if cfg.max_eval_rows > 0 else eval_rows
    if checkpoint is not None:
        logger.message(f"resumed from {checkpoint} at step {start_step}/{steps}")
    else:
        before = evaluate_lm(accelerator, model, eval_rows, cfg.micro_batch_size, pad_id, packed)
        state["eval_loss_before"] = before.get("loss")
        logger.log(0, {"eval_loss": before.get("loss"), "eval_ppl": before.get("ppl")})

    label_counts = [supervised_tokens(r) for r in train_rows]
    input_counts = [len(r["input_ids"]) for r in train_rows]
    world = accelerator.num_processes
    kill_at = int(os.environ.get(KILL_ENV, "0"))
    model.train()
    for step in range(start_step, steps):
        t0 = time.perf_counter()
        global_rows = plan.global_rows(step)
        global_tokens = sum(label_counts[i] for i in global_rows)
        micro_batches = plan.local_micro_batches(step)
        step_loss = torch.zeros((), device=accelerator.device)
        for i, rows in enumerate(micro_batches):
            batch = {k: v.to(accelerator.device) for k, v in collate([train_rows[j] for j in rows], pad_id, packed).items()}
            # Skip the gradient all-reduce on all but the last micro-batch of the step.
            sync = nullcontext() if i == len(micro_batches) - 1 else accelerator.no_sync(model)
            with sync:
                loss = forward_loss_sum(model, batch) / max(1, global_tokens)
                # DDP averages gradients over processes; scale back up to the global-batch sum.
                accelerator.backward(loss * world)
            step_loss += loss.detach()
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        state["train_s"] += time.perf_counter() - t0
        state["train_tokens"] += global_tokens
        state["input_tokens"] += sum(input_counts[i] for i in global_rows)
        done = step + 1
        if done % cfg.log_steps == 0 or done == steps:
            loss_value = accelerator.reduce(step_loss, "sum").item()
            logger.log(done, {
                "loss": loss_value,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": state["input_tokens"] / max(state["train_s"], 1e-9),
                "train_tokens": state["train_tokens"],
            })
        else:
            logger.advance(done)
        if cfg.eval_steps > 0 and done % cfg.eval_steps == 0 and done != steps:
            ev = evaluate_lm(accelerator, model, eval_rows, cfg.micro_batch_size, pad_id, packed)
            logger.log(done, {"eval_loss": ev.get("loss"), "eval_ppl": ev.get("ppl")}, show=False)
        if (cfg.save_steps > 0 and done % cfg.save_steps == 0) or done == steps:
            save_checkpoint(accelerator, cfg.output_dir, done, state, keep=cfg.save_total_limit)
        if kill_at and done == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    after = evaluate_lm(accelerator, model, eval_rows, cfg.micro_batch_size, pad_id, packed)
    if after:
        logger.log(steps, {"eval_loss": after["loss"], "eval_ppl": after["ppl"]}, show=False)
    logger.close()
    summary = {
        "steps": steps,
        "eval_loss_before": state.get("eval_loss_before"),
        "eval_loss": after.get("loss"),
        "eval_ppl": after.get("ppl"),
        "train_tokens": state["train_tokens"],
        "input_tokens": state["input_tokens"],
        "tokens_per_s": state["input_tokens"] / max(state["train_s"], 1e-9),
        "train_s": state["train_s"],
        "n_train_rows": len(train_rows),
        "n_eval_rows": len(eval_rows),
        "num_processes": world,
    }
    return model, summary


def save_final(accelerator: Accelerator, model, tokenizer, output_dir: str | Path) -> Path:
    """Write `output_dir/final/` (Hugging Face format, LoRA merged) atomically on the main process."""
    from alignkit.models.loading import save_model

    final = Path(output_dir) / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = Path(output_dir) / ".tmp-final"
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        save_model(accelerator.unwrap_model(model), tokenizer, tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final
