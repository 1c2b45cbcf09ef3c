"""The edge between a stage and the machine: accelerate, seeding, the optimiser and its schedule.

Stages never touch devices or process groups directly. `make_accelerator` picks CPU/GPU, DDP (gloo on
CPU, NCCL on GPU), FSDP or DeepSpeed from `accelerate launch`'s environment, and mixed precision from
the stage config, so the same stage file runs on a laptop and on a GPU node.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from alignkit.config import ConfigError


def make_accelerator(mixed_precision: str = "no") -> Accelerator:
    """One Accelerator per run; fp16 on CPU is refused because autocast there is bf16-only."""
    has_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    if mixed_precision == "fp16" and not has_gpu:
        raise ValueError("mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
    # Several stages may run in one process (the pipeline), each with its own precision: forget the
    # previous stage's accelerator settings but keep the process group (PartialState).
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # cpu=True on a machine without a GPU makes processes started by `accelerate launch
    # --num_processes N` (torchrun underneath) join one gloo group instead of N lone runs.
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not has_gpu)
    if not has_gpu:
        _sharding_on_cpu(accelerator, mixed_precision)
    return accelerator


def _sharding_on_cpu(accelerator: Accelerator, mixed_precision: str) -> None:
    """FSDP or DeepSpeed asked for (`accelerate launch --config_file configs/accelerate/fsdp.yaml`) on CPU.

    accelerate (1.15) turns FSDP on only for GPU-like process groups: with cpu=True it silently wraps the
    model in DDP instead. FSDP2 itself runs on a CPU device mesh over gloo, so the accelerator is switched
    to accelerate's own FSDP mode with the plugin it reads from launch's environment; prepare(),
    save_state/load_state and get_state_dict then take accelerate's FSDP2 paths (torch's fully_shard,
    distributed checkpoint). DeepSpeed has no such path here: it is refused rather than run as DDP."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    # FSDP too: a later stage of the pipeline (one process) finds the type this function left in PartialState
    if accelerator.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.FSDP) or \
            getattr(accelerator.state, "fsdp_plugin", None) is not None:
        return
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ConfigError("DeepSpeed needs GPUs (accelerate runs it only on CUDA-like devices); on CPU use "
                          "--config_file configs/accelerate/fsdp.yaml (FSDP2 over gloo) or ddp.yaml")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    plugin = FullyShardedDataParallelPlugin()  # from FSDP_* variables, as Accelerator() reads them on GPUs
    if plugin.fsdp_version != 2:
        raise ConfigError("FSDP on CPU needs fsdp_version: 2 in the accelerate config (FSDP1 is GPU-only here); "
                          "see configs/accelerate/fsdp.yaml")
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def derive_seed(seed: int, *parts: int | str) -> int:
    """The seed of one random draw of a run: a hash of (seed, *parts) into [0, 2**31).

    The one rule for every derived seed (sampling chunks, batch orders, refill prompts, ...): parts name the
    draw (a string tag, then the step / epoch / chunk indices), so two draws never share a seed by arithmetic
    accident, and the value depends on nothing else (process count, Python's hash salt, platform).
    """
    import hashlib

    if not isinstance(seed, int) or any(not isinstance(p, (int, str)) for p in parts):
        raise TypeError(f"derive_seed takes an int seed and int | str parts, got {seed!r}, {parts!r}")
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**31)


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs (all devices) from one seed."""
    set_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]):
    """AdamW; no weight decay on norms, biases and other 1-D parameters (standard practice)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # foreach kernels are faster on CPU and GPU alike for many small tensors.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def build_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """Linear warm-up, then cosine (to lr * min_lr_ratio), linear (to 0) or constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class BatchPlan:
    """How a global batch of `batch_size` rows is split over processes and micro-batches.

    Rows of global batch `step` are the slice [step*batch_size, (step+1)*batch_size) of a seeded
    permutation of all rows (a new permutation each epoch). Process r takes every world_size-th row
    starting at r, then cuts its share into micro-batches. The data position is therefore a pure
    function of (seed, step): resume needs no sampler state, and 1 or N processes see the same rows.
    """

    n_rows: int
    batch_size: int
    micro_batch_size: int
    world_size: int
    rank: int
    seed: int

    def __post_init__(self) -> None:
        if self.batch_size % self.world_size:
            raise ConfigError(f"batch_size {self.batch_size} must be divisible by the {self.world_size} processes "
                              f"(it is the GLOBAL batch): use a multiple of {self.world_size}")
        if self.n_rows < self.batch_size:
            raise ConfigError(f"only {self.n_rows} training rows for batch_size {self.batch_size}; lower batch_size")
        self.steps_per_epoch = self.n_rows // self.batch_size  # drop the ragged tail, as DataLoader(drop_last)
        self._perm_epoch = -1
        self._perm: list[int] = []

    def global_rows(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            # The one seed that does not follow derive_seed: every training stage's data order. Moving it to
            # derive_seed reorders all training data and three learning-threshold stage tests (pretrain loss,
            # rm's before-training accuracy, rrhf's rank-accuracy gain) then miss; a change of its own.
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(self.n_rows, generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm[within * self.batch_size : (within + 1) * self.batch_size]

    def local_micro_batches(self, step: int) -> list[list[int]]:
        mine = self.global_rows(step)[self.rank :: self.world_size]
        m = self.micro_batch_size
        return [mine[i : i + m] for i in range(0, len(mine), m)]


def total_steps(max_steps: int, epochs: float, steps_per_epoch: int) -> int:
    return max_steps if max_steps > 0 else max(1, int(math.ceil(epochs * steps_per_epoch)))


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def is_terminal() -> bool:
    return os.isatty(1) and os.environ.get("CI", "") == ""
