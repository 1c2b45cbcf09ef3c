"""Cost planning from arithmetic alone: FLOPs, GPU time and memory per GPU for a stage.

Standard library only (no torch): `alignkit plan` answers at once and every number can be checked by
hand. Units: FLOPs are floating-point operations (a count, not a rate), FLOP/s a rate, memory is
bytes, time is seconds. Sources (docs/papers.md, "Cost planning"):

- 6·N·D training FLOPs: Kaplan et al. 2020, *Scaling Laws for Neural Language Models*, Section 2.1
  (forward 2N per token, backward twice that; attention's context term 2·n_layer·n_ctx·d_model per
  token is left out, as in the paper's C = 6ND). Check: GPT-3 175B on 300B tokens is 3.14e23 FLOPs,
  3,640 PF-days (Brown et al. 2020, Table D.1).
- model states: Rajbhandari et al. 2020, *ZeRO*, Sections 3.1 and 5: mixed-precision Adam holds
  2Ψ + 2Ψ + KΨ bytes (bf16 weights, bf16 gradients, K = 12 for fp32 master weights, m and v).
- activations: Korthikanti et al. 2022, *Reducing Activation Recomputation in Large Transformer
  Models*, Section 4.1 (Eq. 1): s·b·h·(34 + 5·a·s/h) bytes per layer; 2·s·b·h with full
  recomputation (Section 5).
Left out everywhere: communication buffers, allocator fragmentation, CUDA context (~1 GiB a GPU).
"""

from __future__ import annotations

PF_DAY_FLOPS = 1e15 * 86400  # FLOPs of one petaFLOP/s sustained for a day

# Peak dense BF16 tensor throughput per GPU in FLOP/s: the vendor's datasheet figure WITHOUT 2:4
# sparsity (datasheets often headline the sparse figure, twice these). Other chips: peak=.
GPU_PEAK_FLOPS: dict[str, float] = {
    "h100": 989e12,  # H100 SXM5
    "h100-pcie": 756e12,
    "h200": 989e12,  # the H100's compute with more, faster memory
    "a100": 312e12,
    "l4": 121e12,
    "rtx4090": 165e12,  # GeForce RTX 4090, BF16 with FP32 accumulate
}
# Datasheet memory per GPU in bytes (GB = 1e9), to say whether a plan fits.
GPU_MEMORY_BYTES: dict[str, float] = {
    "h100": 80e9, "h100-pcie": 80e9, "h200": 141e9, "a100": 80e9, "l4": 24e9, "rtx4090": 24e9,
}

STAGES = ("pretrain", "sft", "rm", "dpo", "ppo", "grpo", "best-of-n")
# ZeRO stage of each sharding: what is split over the GPUs (FSDP FULL_SHARD = ZeRO-3).
SHARDING = {"none": 0, "ddp": 0, "zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}
# Bytes per parameter of (weights, gradients, master weights kept with the optimizer).
PRECISION_BYTES = {"mixed": (2, 2, 4), "fp32": (4, 4, 0)}
OPTIMIZER_STATE_BYTES = {"adamw": 8, "sgd": 4}  # fp32 m and v; SGD's fp32 momentum
FROZEN_BYTES_PER_PARAM = 2  # reference and reward model: bf16 weights, no gradients or optimizer


def training_flops(params: float, tokens: float) -> float:
    """6·N·D FLOPs to train N parameters on D tokens (forward 2N + backward 4N per token)."""
    return 6.0 * params * tokens


def forward_flops(params: float, tokens: float) -> float:
    """2·N·D FLOPs of a forward pass (a multiply and an add per weight per token), no gradient."""
    return 2.0 * params * tokens


def pf_days(flops: float) -> float:
    """FLOPs in PF-days: 1 PF-day = 1e15 FLOP/s for 86,400 s = 8.64e19 FLOPs."""
    return flops / PF_DAY_FLOPS


def gpu_time(flops: float, gpus: int, peak_flops_per_gpu: float, mfu: float) -> float:
    """Wall-clock seconds for `flops` on `gpus` GPUs of peak FLOP/s each at model-FLOPs utilisation `mfu`."""
    if gpus <= 0 or peak_flops_per_gpu <= 0 or not 0 < mfu <= 1:
        raise ValueError(f"need gpus > 0, peak > 0 and 0 < mfu <= 1 (got {gpus}, {peak_flops_per_gpu}, {mfu})")
    return flops / (gpus * peak_flops_per_gpu * mfu)


def _with_total(parts: dict[str, float]) -> dict[str, float]:
    return {**parts, "total": sum(parts.values())}


def dpo_flops(params: float, tokens: float, epochs: int = 1, ref_params: float | None = None,
              ref_cached: bool = True) -> dict[str, float]:
    """FLOPs of DPO; `tokens` = chosen + rejected tokens of one epoch (D).

    policy: 6·N·D·epochs. reference: 2·N_ref·D·epochs when it runs beside the policy every epoch,
    2·N_ref·D once when its log-probs are precomputed and cached (alignkit's precompute_ref=true).
    """
    ref = params if ref_params is None else ref_params
    ref_passes = 1 if ref_cached else epochs
    return _with_total({f"policy fwd+bwd (6ND x {epochs} epochs)": training_flops(params, tokens) * epochs,
                        f"reference fwd (2ND x {ref_passes})": forward_flops(ref, tokens) * ref_passes})


def ppo_flops(params: float, tokens: float, prompt_tokens: float = 0, critic_params: float | None = None,
              ref_params: float | None = None, rm_params: float | None = None,
              ppo_epochs: int = 1) -> dict[str, float]:
    """FLOPs of PPO over a run that samples `tokens` response tokens after `prompt_tokens` prompt tokens.

    Generation: 2N per prompt token (prefill) and 2N per sampled token (a KV cache reads each once).
    Every other pass reads whole sequences, S = prompt_tokens + tokens: reference 2·N_ref·S, reward
    model 2·N_rm·S, critic values for GAE 2·N_c·S; old log-probs 2·N·S only when ppo_epochs > 1 (one
    update per rollout reuses its own forward, ratio 1; pass ppo_epochs=2 for several mini-batches);
    updates 6·N·S and 6·N_c·S per epoch. critic_params=0: no critic (GRPO). Sizes default to N.
    """
    critic = params if critic_params is None else critic_params
    ref = params if ref_params is None else ref_params
    rm = params if rm_params is None else rm_params
    seq = prompt_tokens + tokens
    parts = {
        "generation (2N per prompt + sampled token)": forward_flops(params, seq),
        "reference fwd (2N_ref)": forward_flops(ref, seq),
        "reward model fwd (2N_rm)": forward_flops(rm, seq),
        "old log-probs fwd (2N, ppo_epochs > 1)": forward_flops(params, seq) if ppo_epochs > 1 else 0.0,
        f"actor fwd+bwd (6N x {ppo_epochs} epochs)": training_flops(params, seq) * ppo_epochs,
    }
    if critic:
        parts["critic values fwd (2N_c)"] = forward_flops(critic, seq)
        parts[f"critic fwd+bwd (6N_c x {ppo_epochs} epochs)"] = training_flops(critic, seq) * ppo_epochs
    return _with_total(parts)


def best_of_n_flops(params: float, tokens: float, prompt_tokens: float = 0, n: int = 1,
                    rm_params: float | None = None) -> dict[str, float]:
    """FLOPs of best-of-n: n samples per prompt, each scored; `tokens` = response tokens of ONE sample
    per prompt over all prompts. generation n·2N·(P + R); reward model n·2·N_rm·(P + R) (each sample's
    prompt prefilled on its own: an upper bound when the prefill is shared)."""
    rm = params if rm_params is None else rm_params
    seq = prompt_tokens + tokens
    return _with_total({f"generation (n={n} x 2N)": n * forward_flops(params, seq),
                        f"reward model fwd (n={n} x 2N_rm)": n * forward_flops(rm, seq)})


def stage_flops(stage: str, params: float, tokens: float, *, epochs: int = 1, prompt_tokens: float = 0,
                ref_params: float | None = None, critic_params: float | None = None,
                rm_params: float | None = None, ref_cached: bool = True, ppo_epochs: int = 1,
                n: int = 1) -> dict[str, float]:
    """FLOPs of a stage by component, plus "total". pretrain / sft / rm: 6·N·D·epochs (`tokens` = one
    epoch's; the reward model's scalar head is negligible). dpo, ppo, grpo, best-of-n: see their functions."""
    if stage in ("pretrain", "sft", "rm"):
        return _with_total({f"training (6ND x {epochs} epochs)": training_flops(params, tokens) * epochs})
    if stage == "dpo":
        return dpo_flops(params, tokens, epochs, ref_params, ref_cached)
    if stage in ("ppo", "grpo"):
        critic = 0 if stage == "grpo" else critic_params
        return ppo_flops(params, tokens, prompt_tokens, critic, ref_params, rm_params, ppo_epochs)
    if stage == "best-of-n":
        return best_of_n_flops(params, tokens, prompt_tokens, n, rm_params)
    raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")


def model_state_bytes(params: float, gpus: int = 1, sharding: str = "none", precision: str = "mixed",
                      optimizer: str = "adamw", trainable_params: float | None = None) -> dict[str, float]:
    """Bytes per GPU of a trained model's weights, gradients and optimizer states (ZeRO, Section 3.1).

    Mixed-precision AdamW: 2Ψ bf16 weights + 2Ψ bf16 gradients + 12Ψ (fp32 master, m, v) = 16Ψ.
    ZeRO-1 splits the optimizer states (with the master copy) over `gpus`, ZeRO-2 the gradients too,
    ZeRO-3 / FSDP the weights too. trainable_params (LoRA, freeze tuning): gradients and optimizer
    states for those only; weights for all `params`.
    """
    if sharding not in SHARDING:
        raise ValueError(f"unknown sharding {sharding!r}; known: {', '.join(SHARDING)}")
    level = SHARDING[sharding]
    weight_b, grad_b, master_b = PRECISION_BYTES[precision]
    trainable = params if trainable_params is None else trainable_params
    split = {stage: (gpus if level >= stage else 1) for stage in (1, 2, 3)}
    return {"weights": weight_b * params / split[3],
            "gradients": grad_b * trainable / split[2],
            "optimizer": (master_b + OPTIMIZER_STATE_BYTES[optimizer]) * trainable / split[1]}


def frozen_weight_bytes(params: float, gpus: int = 1, sharding: str = "none", offload: bool = False) -> float:
    """Bytes per GPU of a frozen model (reference, reward model): bf16 weights only; split over the GPUs
    under ZeRO-3 / FSDP like the trained model; 0 when offloaded to CPU (it then costs PCIe time)."""
    if offload:
        return 0.0
    return FROZEN_BYTES_PER_PARAM * params / (gpus if SHARDING[sharding] >= 3 else 1)


def activation_bytes(micro_batch: int, seq_len: int, layers: int, hidden: int, heads: int, vocab: int = 0,
                     checkpointing: bool = False, flash_attention: bool = False) -> dict[str, float]:
    """Bytes one GPU keeps for the backward of one micro-batch (16-bit activations, no tensor parallelism).

    Per layer s·b·h·(34 + 5·a·s/h) (Korthikanti et al. 2022, Section 4.1, a GPT block with a 4h MLP; a
    SwiGLU block with an 8h/3 MLP is close); 5·a·s²·b is the attention scores, softmax and dropout mask,
    which FlashAttention never stores (flash_attention=True drops it). With full checkpointing each layer
    keeps its input, 2·s·b·h (Section 5, full recomputation), plus one layer's activations while it is recomputed.
    logits: 4·s·b·V, the fp32 logits the loss reads (often the largest tensor of a small model).
    """
    s, b, h = seq_len, micro_batch, hidden
    attention = 0 if flash_attention else 5 * heads * s / h
    per_layer = s * b * h * (34 + attention)
    kept = (2 * s * b * h * layers + per_layer) if checkpointing else per_layer * layers
    return {"activations": float(kept), "logits": 4.0 * s * b * vocab}


def memory_per_gpu(params: float, gpus: int = 1, sharding: str = "none", precision: str = "mixed",
                   optimizer: str = "adamw", micro_batch: int = 1, seq_len: int = 0, layers: int = 0,
                   hidden: int = 0, heads: int = 0, vocab: int = 0, checkpointing: bool = False,
                   flash_attention: bool = False, trainable_params: float | None = None) -> dict[str, float]:
    """Bytes per GPU of one trained model: model states + activations (0 without layers, hidden, heads
    and seq_len: the shape is unknown) + "total"."""
    parts = model_state_bytes(params, gpus, sharding, precision, optimizer, trainable_params)
    if seq_len and layers and hidden and heads:
        parts.update(activation_bytes(micro_batch, seq_len, layers, hidden, heads, vocab,
                                      checkpointing, flash_attention))
    return _with_total(parts)


def stage_memory(stage: str, params: float, *, ref_params: float | None = None,
                 critic_params: float | None = None, rm_params: float | None = None,
                 ref_cached: bool = True, ref_from_lora: bool = False, offload_frozen: bool = False,
                 **train: object) -> dict[str, float]:
    """Bytes per GPU of a stage's models, by component, plus "total"; `train` goes to memory_per_gpu.

    pretrain / sft / rm: one trained model. dpo: the policy (micro_batch counts pairs: chosen and
    rejected share a forward) + the reference unless its log-probs are cached first (it is freed) or
    it is the policy with LoRA off. ppo: actor and critic trained (the critic: the actor's shape with a
    value head, so no logits), reference and reward model frozen; grpo: no critic. best-of-n: policy and reward model frozen
    (generation's KV cache, 4·s·b·n_kv·d_head bytes per layer, is left out: smaller than training's).
    Options: ref_from_lora (the reference is the actor with its adapter off: no copy), offload_frozen
    (reference and reward model on CPU).
    """
    gpus, sharding = train.get("gpus", 1), train.get("sharding", "none")

    def frozen(size: float | None) -> float:
        return frozen_weight_bytes(params if size is None else size, gpus, sharding, offload_frozen)

    if stage == "best-of-n":
        policy = frozen_weight_bytes(params, gpus, sharding)  # it generates: never offloaded
        return _with_total({"policy weights (frozen)": policy, "reward model weights": frozen(rm_params)})
    if stage == "dpo":
        train = {**train, "micro_batch": 2 * train.get("micro_batch", 1)}
    parts = {f"actor {k}" if stage in ("ppo", "grpo") else k: v
             for k, v in memory_per_gpu(params, **train).items() if k != "total"}
    if stage == "dpo":
        parts["reference weights"] = 0.0 if (ref_cached or ref_from_lora) else frozen(ref_params)
    elif stage in ("ppo", "grpo"):
        parts["reference weights"] = 0.0 if ref_from_lora else frozen(ref_params)
        parts["reward model weights"] = frozen(rm_params)
        critic = params if critic_params is None else critic_params
        if stage == "ppo" and critic:
            value_model = memory_per_gpu(critic, **{**train, "vocab": 0, "trainable_params": None})
            parts.update({f"critic {k}": v for k, v in value_model.items() if k not in ("total", "logits")})
    elif stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    return _with_total(parts)


def llama_param_count(config: dict) -> int:
    """Parameters of a Llama-style decoder (llama, mistral, qwen2) from config.json fields, no weights read.

    Embedding V·h (+ an untied lm_head V·h); per layer: q and o h·a·d, k and v h·kv·d (grouped-query
    attention), SwiGLU MLP 3·h·I, two RMSNorm gains 2h; a final norm h. Biases: qwen2's q, k, v;
    attention_bias / mlp_bias when set.
    """
    if config.get("model_type") not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"model_type {config.get('model_type')!r} is not Llama-style; give params= instead")
    h, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or h // heads
    inter, vocab = config["intermediate_size"], config["vocab_size"]
    attention = 2 * h * heads * d + 2 * h * kv * d
    if config.get("attention_bias"):
        attention += heads * d + 2 * kv * d + h
    elif config["model_type"] == "qwen2":
        attention += heads * d + 2 * kv * d
    mlp = 3 * h * inter + ((2 * inter + h) if config.get("mlp_bias") else 0)
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings", False) else 2)
    return embeddings + layers * (attention + mlp + 2 * h) + h
