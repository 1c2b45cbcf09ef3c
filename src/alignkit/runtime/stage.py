"""Plain functions every stage calls at its start and end (no base class: a stage reads top to bottom)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from alignkit.config import save_config
from alignkit.runtime.logging import write_summary
from alignkit.runtime.setup import make_accelerator, peak_rss_mb, seed_everything


# output_dir -> provenance of the run in progress (computed once by start_run, added to summary.json by finish_run)
_PROVENANCE: dict[str, dict] = {}


def prepare_output_dir(output_dir: str) -> None:
    """Create output_dir; a ConfigError (one line) when it is a file or cannot be written."""
    from alignkit.config import ConfigError

    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir {output_dir!r} is a file, not a directory: choose another output_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".alignkit-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir {output_dir!r} cannot be written ({err.strerror or err}): choose a directory "
                          "you can write to") from None


def start_run(cfg: Any) -> Accelerator:
    """Accelerator, seeds, and `output_dir/config.yaml` (the fully resolved config, plus its provenance block:
    runtime.provenance)."""
    from alignkit.runtime.provenance import run_provenance

    accelerator = make_accelerator(cfg.mixed_precision)
    seed_everything(cfg.seed)
    if accelerator.is_main_process:
        prepare_output_dir(cfg.output_dir)
        provenance = run_provenance(cfg, accelerator.num_processes, accelerator.device.type)
        _PROVENANCE[str(Path(cfg.output_dir).resolve())] = provenance
        save_config(cfg, Path(cfg.output_dir) / "config.yaml", provenance)
    accelerator.wait_for_everyone()
    return accelerator


def load_train_eval(cfg: Any, kind: str) -> tuple[list[dict], list[dict], list[str]]:
    """(train, held-out, invalid-record messages) of `kind`.

    eval_data is a path/spec, a fraction split off train_data, or None. Invalid records stop the run
    with file:line and field, unless cfg.skip_invalid, where they are skipped and returned as messages
    (stages count them in summary.json).
    """
    from alignkit.data.records import load_records, split_records

    invalid: list[str] | None = [] if cfg.skip_invalid else None
    records, _ = load_records(cfg.train_data, cfg.data_kind or kind, errors=invalid)
    if isinstance(cfg.eval_data, float):
        train, held_out = split_records(records, cfg.eval_data, cfg.seed)
    elif cfg.eval_data:
        held_out, _ = load_records(cfg.eval_data, cfg.data_kind or kind, errors=invalid)
        train = records
    else:
        train, held_out = records, []
    if invalid:
        print(f"skipped {len(invalid)} invalid records; first: " + " | ".join(invalid[:3]), flush=True)
    return train, held_out, invalid or []


def record_texts(records: list[dict]) -> list[str]:
    """All the text in records of any kind, for training a from-scratch tokenizer."""
    texts: list[str] = []
    for r in records:
        if "text" in r:
            texts.append(r["text"])
        for key in ("messages", "prompt"):
            if isinstance(r.get(key), list):
                texts.extend(m["content"] for m in r[key])
        for key in ("chosen", "rejected"):
            if isinstance(r.get(key), str):
                texts.append(r[key])
        texts.extend(r.get("responses", []))
    return texts


def load_policy(accelerator: Accelerator, cfg: Any, train_records: list[dict]):
    """The model and tokenizer named by cfg.model, with LoRA, freeze tuning (cfg.trainable) and gradient
    checkpointing as configured."""
    from alignkit.models.loading import freeze_except, load_causal_lm, resolve_model_path
    from alignkit.models.lora import LoraOptions, apply_lora

    # A named GGUF model is converted once into the cache: the main process does it, the others wait.
    with accelerator.main_process_first():
        name = resolve_model_path(cfg.model)
    model, tokenizer = load_causal_lm(
        name,
        tokenizer=cfg.tokenizer,
        train_texts=lambda: record_texts(train_records),
        vocab_size=cfg.vocab_size,
        seed=cfg.seed,
    )
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lora = cfg.lora
    model = apply_lora(model, LoraOptions(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules))
    if cfg.trainable:
        freeze_except(model, cfg.trainable)
    return model, tokenizer


def finish_run(accelerator: Accelerator, cfg: Any, summary: dict[str, Any], started: float) -> dict[str, Any]:
    """Add wall time and memory, write summary.json on the main process, return the summary."""
    summary = {**summary, "wall_s": time.time() - started, "peak_rss_mb": peak_rss_mb()}
    provenance = _PROVENANCE.pop(str(Path(cfg.output_dir).resolve()), None)
    if provenance is not None:
        summary["provenance"] = provenance
    if accelerator.is_main_process:
        write_summary(cfg.output_dir, summary)
    accelerator.wait_for_everyone()
    return summary
