"""The optimisation loop every training stage shares; a stage supplies what a micro-batch costs.

A stage hands over `n_rows` training rows (whatever a row is: a packed token row, a preference pair, a
ranked list), a weight per row, and `micro_loss(model, row_indices) -> (loss_sum, metric_sums)`. The
loss of an optimizer step is the sum of micro losses over the whole GLOBAL batch divided by the global
batch's total weight (supervised tokens for language modelling, pairs for DPO). Every process knows the
whole global batch (rows are chosen by `BatchPlan` from the seed and step), so it divides by the global
weight without communication; gradients are then those of one process on the whole batch, whatever the
number of processes and micro-batches (up to float summation order). Metric sums are divided the same
way, so a metric is a weighted mean over the global batch.

The loop owns: AdamW + schedule, gradient accumulation without needless all-reduce, clipping,
logging, periodic evaluation, atomic checkpoints, resume (`resume=true`), skipping non-finite steps
and stopping cleanly on Ctrl-C / SIGTERM with a checkpoint (runtime.guards).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from alignkit.config import ConfigError
from alignkit.runtime.checkpoint import write_failed, checkpoint_to_resume, load_checkpoint, save_checkpoint
from alignkit.runtime.guards import NonFiniteGuard, StopRequests, injected_nan_factor, send_test_signal
from alignkit.runtime.logging import RunLogger
from alignkit.runtime.setup import BatchPlan, build_optimizer, build_scheduler, total_steps

KILL_ENV = "ALIGNKIT_KILL_AT_STEP"  # test hook: SIGKILL this process right after that optimizer step

MicroLoss = Callable[[torch.nn.Module, list[int]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
Evaluate = Callable[[torch.nn.Module], dict[str, float]]


def train(
    cfg: Any,
    accelerator: Accelerator,
    model: torch.nn.Module,
    row_weights: list[float],
    micro_loss: MicroLoss,
    evaluate: Evaluate,
    stage: str,
    input_tokens: list[int] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train `model`; return the prepared model and summary numbers.

    row_weights[i]: the weight of row i in the global normaliser. micro_loss returns the SUM of the loss
    over the given rows and a dict of metric SUMS. evaluate(model) returns held-out metrics (without
    prefix; they are logged as eval_<name>). input_tokens[i]: tokens in row i, for throughput.
    """
    plan, steps, model, optimizer, scheduler = _prepare(cfg, accelerator, model, row_weights)
    state, start_step, guard, logger = _start_or_resume(cfg, accelerator, model, evaluate, stage, steps)
    kill_at = int(os.environ.get(KILL_ENV, "0"))
    model.train()
    with StopRequests(stage, accelerator.is_main_process) as stops:
        for step in range(start_step, steps):
            send_test_signal(step)
            done = step + 1
            log = done % cfg.log_steps == 0 or done == steps
            record = _train_step(cfg, accelerator, model, optimizer, scheduler, plan, row_weights, micro_loss, guard,
                                 state, input_tokens, step, log)
            if log:
                logger.log(done, record)
            else:
                logger.advance(done)
            if cfg.eval_steps > 0 and done % cfg.eval_steps == 0 and done != steps:
                logger.log(done, {f"eval_{k}": v for k, v in _evaluate(model, evaluate).items()}, show=False)
            stop = stops.requested(accelerator)
            if (cfg.save_steps > 0 and done % cfg.save_steps == 0) or done == steps or stop:
                state["nonfinite"] = guard.state_dict()
                path = save_checkpoint(accelerator, cfg.output_dir, done, state, keep=cfg.save_total_limit)
            if stop:
                logger.close()
                raise stops.stop(done, path)
            if kill_at and done == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    after = _evaluate(model, evaluate)
    logger.log(steps, {f"eval_{k}": v for k, v in after.items()}, show=False)
    logger.close()
    return model, _summary(state, after, steps, row_weights, input_tokens, accelerator.num_processes, guard)


def _prepare(cfg, accelerator: Accelerator, model: torch.nn.Module, row_weights: list[float]):
    """(plan, steps, prepared model, optimizer, scheduler): the batch plan every process derives from the seed,
    the step count, AdamW and its schedule, placed by accelerate."""
    if len(row_weights) < cfg.batch_size and getattr(cfg, "packing", False):
        raise ConfigError(f"only {len(row_weights)} training rows for batch_size {cfg.batch_size}: packing puts "
                          f"several examples in one row of max_length={cfg.max_length} tokens; lower batch_size, "
                          "or set packing=false (one example per row)")
    plan = BatchPlan(
        n_rows=len(row_weights),
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
    # The scheduler is stepped by us once per optimizer step (accelerate's wrapper would step it once
    # per process); registering it puts its state into every checkpoint.
    accelerator.register_for_checkpointing(scheduler)
    return plan, steps, model, optimizer, scheduler


def _start_or_resume(cfg, accelerator: Accelerator, model, evaluate: Evaluate, stage: str, steps: int):
    """(state, start_step, guard, logger): restored from the newest checkpoint under resume=true, else fresh,
    with the held-out metrics before training logged at step 0."""
    state: dict[str, Any] = {"train_weight": 0.0, "input_tokens": 0, "train_s": 0.0}
    start_step = 0
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, stage, cfg.lr, accelerator.is_main_process)
    checkpoint = checkpoint_to_resume(cfg.output_dir, cfg.resume, accelerator.is_main_process)
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)
        start_step = state.pop("step")
        guard.load_state_dict(state.get("nonfinite", {}))
    logger = RunLogger(cfg.output_dir, stage, steps, accelerator.is_main_process, start_step)
    if checkpoint is not None:
        logger.message(f"resumed from {checkpoint} at step {start_step}/{steps}")
    else:
        before = _evaluate(model, evaluate)
        state["eval_before"] = before
        logger.log(0, {f"eval_{k}": v for k, v in before.items()})
    return state, start_step, guard, logger


def _summary(state: dict, after: dict, steps: int, row_weights: list[float], input_tokens: list[int] | None,
             world: int, guard: NonFiniteGuard) -> dict[str, Any]:
    """The run's summary numbers: held-out metrics before and after, time, throughput, weights seen."""
    summary: dict[str, Any] = {"steps": steps}
    summary.update({f"eval_{k}_before": v for k, v in state.get("eval_before", {}).items()})
    summary.update({f"eval_{k}": v for k, v in after.items()})
    summary.update({
        "train_s": state["train_s"],
        "n_train_rows": len(row_weights),
        "num_processes": world,
        "steps_per_s": steps / max(state["train_s"], 1e-9),
    })
    if input_tokens is not None:
        summary["input_tokens"] = state["input_tokens"]
        summary["tokens_per_s"] = state["input_tokens"] / max(state["train_s"], 1e-9)
    summary["train_weight"] = state["train_weight"]
    summary["nonfinite_steps"] = guard.total
    return summary


def _train_step(cfg, accelerator, model, optimizer, scheduler, plan, row_weights, micro_loss, guard, state,
                input_tokens, step: int, log: bool) -> dict[str, Any]:
    """One optimizer step over the global batch of 0-based `step`; returns what to log for it when `log`
    (gathering the metrics is a collective, so every process passes the same `log`).

    A non-finite loss or gradient norm on any process skips optimizer.step() (guard), so the weights
    stay those of the last good step; the schedule still advances, as the step's rows were consumed."""
    t0 = time.perf_counter()
    world = accelerator.num_processes
    global_rows = plan.global_rows(step)
    global_weight = sum(row_weights[i] for i in global_rows)
    micro_batches = plan.local_micro_batches(step)
    step_loss = torch.zeros((), device=accelerator.device)
    step_metrics: dict[str, torch.Tensor] = {}
    nan_factor = injected_nan_factor(step)
    for i, rows in enumerate(micro_batches):
        # Skip the gradient all-reduce on all but the last micro-batch of the step.
        sync = nullcontext() if i == len(micro_batches) - 1 else accelerator.no_sync(model)
        with sync:
            loss_sum, metric_sums = micro_loss(model, rows)
            loss = loss_sum * nan_factor / max(global_weight, 1e-12)
            # DDP averages gradients over processes; scale back up to the global-batch sum.
            accelerator.backward(loss * world)
        step_loss += loss.detach()
        for key, value in metric_sums.items():
            step_metrics[key] = step_metrics.get(key, 0.0) + value.detach().float() / max(global_weight, 1e-12)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    lr = scheduler.get_last_lr()[0]
    if guard.check(accelerator, step + 1, "loss or gradient norm", step_loss, grad_norm):
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)

    state["train_s"] += time.perf_counter() - t0
    state["train_weight"] += global_weight
    if input_tokens is not None:
        state["input_tokens"] += sum(input_tokens[i] for i in global_rows)
    if not log:
        return {}
    names = sorted(step_metrics)
    packed = torch.stack([step_loss] + [torch.as_tensor(step_metrics[n], device=accelerator.device) for n in names])
    packed = accelerator.reduce(packed, "sum").tolist()
    record = {"loss": packed[0], **dict(zip(names, packed[1:])), "lr": lr, "grad_norm": float(grad_norm),
              "nonfinite_steps": guard.total}
    if input_tokens is not None:
        record["tokens_per_s"] = state["input_tokens"] / max(state["train_s"], 1e-9)
    return record


def _evaluate(model: torch.nn.Module, evaluate: Evaluate) -> dict[str, float]:
    model.eval()
    with torch.no_grad(), whole_weights(model):
        out = evaluate(model)
    model.train()
    return out


# ids of the FSDP2 units whole_weights holds gathered now (is_sharded reads it)
_HELD_WHOLE: set[int] = set()


def _fsdp_units(model: torch.nn.Module | None) -> list:
    """The modules torch's fully_shard made FSDP units in `model` (accelerate's FSDP2 prepare), root first."""
    from torch.distributed.fsdp import FSDPModule

    return [] if model is None else [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    """True when FSDP2 shards `model` (DDP / FSDP wrappers looked through) and whole_weights does not hold it
    whole now: every forward of it is then an all-gather that every process must run in step."""
    units = _fsdp_units(getattr(model, "module", model))
    return any(id(unit) not in _HELD_WHOLE for unit in units)


@contextmanager
def whole_weights(*models: torch.nn.Module | None):
    """Under FSDP2, every process holds the whole weights of `models` inside (gathered once, on entry, by FSDP's
    own unshard), so forwards in it communicate nothing. Needed wherever processes run different numbers of
    forwards: held-out rows split unevenly over them, generation of different lengths; otherwise every
    forward is an all-gather that one process would wait for in vain. This is torch's documented eval
    recipe (FSDPModule.set_reshard_after_forward(False) for evals, back for training). Not sharded (or None):
    a no-op.

    transformers' generate() also syncs the processes on every new token when the model is FSDP-managed
    (synced_gpus: an all_reduce per step, so a process that runs fewer or shorter generate calls than another
    waits forever). It reads that from the `_is_fsdp_managed_module` flag torch's fully_shard sets; inside,
    the weights are whole and a forward needs no peer, so the flag is lowered and restored on exit."""
    per_model = [u for u in (_fsdp_units(m) for m in models) if u]
    units = [unit for model_units in per_model for unit in model_units]
    if not units:
        yield
        return
    roots = {id(model_units[0]) for model_units in per_model}
    flagged = [m for model in models if model is not None for m in model.modules()
               if getattr(m, "_is_fsdp_managed_module", False)]
    for unit in units:  # the same modules in the same order on every process: the all-gathers pair up
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    for module in flagged:
        module._is_fsdp_managed_module = False
    _HELD_WHOLE.update(id(unit) for unit in units)
    try:
        yield
    finally:
        _HELD_WHOLE.difference_update(id(unit) for unit in units)
        for module in flagged:
            module._is_fsdp_managed_module = True
        for unit in units:
            unit.reshard()
            # FSDP2 keeps a root gathered between forward and backward (its default); the others reshard
            unit.set_reshard_after_forward(id(unit) not in roots, recurse=False)


def save_final(accelerator: Accelerator, model, tokenizer, output_dir: str | Path, save: Callable | None = None) -> Path:
    """Write `output_dir/final/` (Hugging Face format, LoRA merged) atomically on the main process.

    Under FSDP (or DeepSpeed ZeRO-3) each process holds a shard: accelerate's get_state_dict gathers the
    full state dict (a collective, so every process calls it; the main process gets it on CPU) and the
    save writes from it."""
    from alignkit.models.loading import gathered_weights, save_model

    final = Path(output_dir) / "final"
    accelerator.wait_for_everyone()
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    full = accelerator.get_state_dict(model) if sharded else None
    if accelerator.is_main_process:
        tmp = Path(output_dir) / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        try:
            with gathered_weights(unwrapped, full):
                (save or save_model)(unwrapped, tokenizer, tmp)
        except OSError as err:  # a full disk: no final/ that looks complete but is not
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_failed(f"the final model {final}", err, output_dir) from None
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final
