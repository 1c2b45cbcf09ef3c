"""`alignkit plan key=value ...`: FLOPs, GPU time and memory per GPU of a stage (the math: alignkit.plan).

The model's size comes from `params=` or from `model=`'s config.json (read, never its weights); the
model layer (torch, transformers) is imported only for a `model=` that is not a local directory.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from alignkit import plan as P
from alignkit.config import ConfigError, field_help, load_config, opt

GIB = 2**30


@dataclass
class PlanConfig:
    """`alignkit plan`: the stage, the model's size and the hardware whose cost is estimated."""

    stage: str = opt("pretrain", f"one of {', '.join(P.STAGES)}")
    model: Union[str, None] = opt(None, "local model dir, smollm2-135m-instruct, scratch:tiny|small or a hub id in "
                                        "the local Hugging Face cache: its config.json gives the size and shape "
                                        "(Llama-style)")
    params: Union[float, None] = opt(None, "parameter count instead of model= (e.g. 175e9)")
    tokens: Union[float, None] = opt(None, "pretrain/sft/rm: one epoch's tokens; dpo: chosen + rejected tokens per "
                                           "epoch; ppo/grpo: response tokens sampled over the run; best-of-n: "
                                           "response tokens of one sample per prompt")
    prompt_tokens: float = opt(0.0, "ppo/grpo/best-of-n: prompt tokens over the run (one prompt per sequence)")
    epochs: int = opt(1, "passes over the data (pretrain/sft/rm/dpo)")
    ppo_epochs: Union[int, None] = opt(None, "ppo/grpo: passes over each rollout (default: 4 for ppo, 1 for grpo, "
                                             "as alignkit's)")
    n: int = opt(8, "best-of-n: samples per prompt")
    critic_params: Union[float, None] = opt(None, "ppo: critic size (default: the policy's)")
    ref_params: Union[float, None] = opt(None, "dpo/ppo: reference size (default: the policy's)")
    rm_params: Union[float, None] = opt(None, "ppo/best-of-n: reward model size (default: the policy's)")
    ref_cached: bool = opt(True, "dpo: reference log-probs computed once before training (precompute_ref)")
    ref_from_lora: bool = opt(False, "dpo/ppo: the reference is the policy with its LoRA adapter off (no copy)")
    offload_frozen: bool = opt(False, "ppo/best-of-n: reference and reward model kept on CPU")
    gpus: int = opt(1, "number of GPUs")
    gpu: str = opt("h100", f"one of {', '.join(P.GPU_PEAK_FLOPS)}, or anything with peak=")
    peak: Union[float, None] = opt(None, "peak FLOP/s per device, overriding gpu='s table (needed for gpu=cpu)")
    mfu: float = opt(0.4, "model-FLOPs utilisation: the fraction of peak actually sustained")
    sharding: str = opt("none", "none (DDP), zero1, zero2, zero3 or fsdp (full shard = zero3)")
    precision: str = opt("mixed", "mixed (bf16 + fp32 master weights) or fp32")
    optimizer: str = opt("adamw", "adamw or sgd (with momentum)")
    micro_batch_size: int = opt(1, "sequences per forward on one GPU (dpo: pairs)")
    max_length: int = opt(2048, "tokens per sequence")
    checkpointing: bool = opt(False, "full activation checkpointing (recompute each layer in the backward)")
    flash_attention: bool = opt(False, "attention scores not stored (FlashAttention / SDPA flash kernel)")
    trainable_params: Union[float, None] = opt(None, "LoRA or freeze tuning: parameters with gradients "
                                                     "(default: all)")
    layers: int = opt(0, "transformer layers (from model=; give with params= to estimate activations)")
    hidden: int = opt(0, "hidden size")
    heads: int = opt(0, "attention heads")
    vocab: int = opt(0, "vocabulary size (the logits' memory); scratch:* default 1024")


def parse_options(argv: list[str]) -> dict[str, object]:
    """key=value arguments -> typed options with defaults (config.load_config: an unknown key names the
    closest one, values are checked against the field types)."""
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"unexpected argument {arg!r}: alignkit plan takes key=value arguments")
    opts = dataclasses.asdict(load_config(PlanConfig, None, argv))
    if opts["tokens"] is None or (opts["params"] is None) == (opts["model"] is None):
        raise ConfigError("give tokens= and exactly one of params= or model=")
    return opts


def model_config(name: str, vocab: int = 0) -> dict:
    """config.json of `name` as a dict, read without loading weights (scratch:* from its preset)."""
    local = Path(name) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from alignkit.models import loading  # torch and transformers: only on this path

    if loading.is_scratch(name):
        preset = loading.SCRATCH_PRESETS.get(name.removeprefix(loading.SCRATCH_PREFIX))
        if preset is None:
            raise loading.ModelError(f"unknown scratch preset {name!r}; known: {', '.join(loading.SCRATCH_PRESETS)}")
        # The vocabulary is the BPE trained on the data: vocab_size (1024 by default) in the stage config.
        return {"model_type": "llama", **preset, "vocab_size": vocab or 1024}
    path = Path(loading.resolve_model_path(name)) / "config.json"  # smollm2: converted once, then cached
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name, "config.json")
        except ValueError:  # not a valid hub id either (e.g. a missing local path)
            cached = None
        if not isinstance(cached, str):
            raise loading.ModelError(f"model={name!r}: no config.json locally (alignkit plan never downloads); "
                                     "give a local directory or params=")
        path = Path(cached)
    return json.loads(path.read_text())


def model_size(opts: dict) -> dict:
    """{params, layers, hidden, heads, vocab, source}: from params= or model=, shape keys override."""
    if opts["params"] is not None:
        size = {"params": opts["params"], "layers": 0, "hidden": 0, "heads": 0, "vocab": 0,
                "source": f"params={opts['params']:g}"}
    else:
        config = model_config(opts["model"], opts["vocab"])
        try:
            params = P.llama_param_count(config)
        except (KeyError, ValueError) as err:
            raise ConfigError(f"model={opts['model']}: cannot count parameters from config.json ({err})") from None
        size = {"params": params, "layers": config["num_hidden_layers"], "hidden": config["hidden_size"],
                "heads": config["num_attention_heads"], "vocab": config["vocab_size"],
                "source": f"model={opts['model']} (config.json arithmetic)"}
    size.update({k: opts[k] for k in ("layers", "hidden", "heads", "vocab") if opts[k]})
    return size


def build_plan(opts: dict) -> dict:
    """Everything the report prints: size, flops (by component), seconds, memory (bytes by component)."""
    stage, size = opts["stage"], model_size(opts)
    if stage not in P.STAGES:
        raise ConfigError(f"stage={stage!r}; known: {', '.join(P.STAGES)}")
    peak = opts["peak"] or P.GPU_PEAK_FLOPS.get(opts["gpu"])
    if peak is None:
        raise ConfigError(f"gpu={opts['gpu']!r} has no known peak: give peak= (FLOP/s) or one of "
                          f"{', '.join(P.GPU_PEAK_FLOPS)}")
    ppo_epochs = opts["ppo_epochs"] or (1 if stage == "grpo" else 4)
    sizes = {k: opts[k] for k in ("critic_params", "ref_params", "rm_params")}
    try:
        flops = P.stage_flops(stage, size["params"], opts["tokens"], epochs=opts["epochs"],
                              prompt_tokens=opts["prompt_tokens"], ref_cached=opts["ref_cached"],
                              ppo_epochs=ppo_epochs, n=opts["n"], **sizes)
        seconds = P.gpu_time(flops["total"], opts["gpus"], peak, opts["mfu"])
        memory = P.stage_memory(
            stage, size["params"], ref_cached=opts["ref_cached"], ref_from_lora=opts["ref_from_lora"],
            offload_frozen=opts["offload_frozen"], **sizes, gpus=opts["gpus"], sharding=opts["sharding"],
            precision=opts["precision"], optimizer=opts["optimizer"], micro_batch=opts["micro_batch_size"],
            seq_len=opts["max_length"], layers=size["layers"], hidden=size["hidden"], heads=size["heads"],
            vocab=size["vocab"], checkpointing=opts["checkpointing"], flash_attention=opts["flash_attention"],
            trainable_params=opts["trainable_params"])
    except (ValueError, KeyError) as err:
        raise ConfigError(str(err).strip("'")) from None
    return {"opts": {**opts, "ppo_epochs": ppo_epochs}, "size": size, "peak": peak, "flops": flops,
            "seconds": seconds, "memory": memory}


def _num(x: float) -> str:
    """1,234.5 for large numbers, three significant digits for small ones (0.0187)."""
    return f"{x:,.1f}" if x >= 100 else f"{x:.3g}"


def _count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{unit}"
    return f"{x:g}"


def format_plan(plan: dict) -> str:
    """The report: FLOPs, time, memory per GPU (GiB) and the assumptions behind them."""
    o, size, flops, mem = plan["opts"], plan["size"], plan["flops"], plan["memory"]
    width = max(len(k) for k in [*flops, *mem]) + 2
    lines = [f"alignkit plan: stage={o['stage']}, N = {_count(size['params'])} parameters ({size['source']}), "
             f"D = {_count(o['tokens'])} tokens", "", "compute (FLOPs)"]
    lines += [f"  {k:<{width}}{v:.3e}" for k, v in flops.items() if k != "total"]
    lines.append(f"  {'total':<{width}}{flops['total']:.3e} FLOPs = {_num(P.pf_days(flops['total']))} PF-days")
    seconds, gpus = plan["seconds"], o["gpus"]
    peak = f"{plan['peak'] / 1e12:g} TFLOP/s peak " + ("given" if o["peak"] else "dense BF16") + " each"
    lines += ["", f"time on {gpus} x {o['gpu']} ({peak}) at MFU {o['mfu']:g}",
              f"  {'wall clock':<{width}}{_num(seconds / 3600)} hours = {_num(seconds / 86400)} days",
              f"  {'GPU-hours':<{width}}{_num(gpus * seconds / 3600)}"]
    lines += ["", f"memory per GPU (sharding={o['sharding']} over {gpus} GPUs, {o['precision']} precision, "
                  f"{o['optimizer']}, micro-batch {o['micro_batch_size']} x {o['max_length']} tokens)"]
    lines += [f"  {k:<{width}}{v / GIB:,.2f} GiB" for k, v in mem.items() if k != "total"]
    fits = ""
    if o["gpu"] in P.GPU_MEMORY_BYTES and not o["peak"]:
        capacity = P.GPU_MEMORY_BYTES[o["gpu"]]
        verdict = "fits" if mem["total"] < capacity else "does NOT fit"
        fits = f"  ({verdict}: {o['gpu']} holds {capacity / GIB:.1f} GiB)"
    lines.append(f"  {'total':<{width}}{mem['total'] / GIB:,.2f} GiB{fits}")
    lines += ["", "assumptions"] + [textwrap.fill(a, 100, initial_indent="  - ", subsequent_indent="    ")
                                    for a in _assumptions(o, size)]
    return "\n".join(lines)


def _assumptions(o: dict, size: dict) -> list[str]:
    notes = ["FLOPs: 6·N·D to train, 2·N·D per forward (Kaplan et al. 2020); attention's context term left out; "
             "1 PF-day = 8.64e19 FLOPs.",
             "model states: ZeRO accounting (Rajbhandari et al. 2020): mixed-precision AdamW = 2 + 2 + 12 bytes a "
             "parameter (bf16 weights, bf16 gradients, fp32 master + m + v); frozen models: 2 bytes a parameter."]
    if size["layers"] and size["hidden"] and size["heads"]:
        formula = ("2·s·b·h per layer + one layer recomputed" if o["checkpointing"] else
                   "s·b·h·(34" + ("" if o["flash_attention"] else " + 5·a·s/h") + ") per layer")
        notes.append(f"activations: Korthikanti et al. 2022, {formula} (L={size['layers']}, h={size['hidden']}, "
                     f"a={size['heads']}); logits 4·s·b·V bytes (V={size['vocab']}).")
    else:
        notes.append("activations: not estimated; give layers=, hidden=, heads= (and vocab=) with params=.")
    if o["stage"] in ("ppo", "grpo"):
        notes.append(f"ppo: ppo_epochs={o['ppo_epochs']}; generation's KV cache is freed before the update and "
                     "left out of memory.")
    notes.append("not counted: communication buffers, allocator fragmentation, CUDA context (~1 GiB a GPU).")
    return notes


def plan_help() -> str:
    out = ["usage: alignkit plan tokens=D (params=N | model=NAME) [stage=...] [key=value ...]", "",
           "FLOPs, GPU-hours and memory per GPU of a stage, from arithmetic (nothing is loaded or run).", "",
           "options (key: type = default):"]
    for key, type_name, default, meaning in field_help(PlanConfig):
        out.append(f"  {key}: {type_name} = {default!r}")
        out.extend(textwrap.wrap(meaning, width=96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(plan_help())
        return 0
    print(format_plan(build_plan(parse_options(argv))))
    return 0
