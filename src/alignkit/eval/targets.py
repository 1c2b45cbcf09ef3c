"""The models one `alignkit eval` run measures: `models` entries resolved to targets and loaded.

An entry is a run dir (its checkpoints/step-N, when asked, and final/), a final/ or checkpoint dir, or a model
path / hub id. A checkpoint's weights are a state dict loaded over its run's final/ (architecture and
tokenizer), LoRA adapters merged with the run's lora options.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from alignkit.config import ConfigError


@dataclass
class Target:
    """One set of weights to evaluate: `model_dir` (architecture + tokenizer), optionally overwritten by
    the checkpoint state dict `state` (LoRA adapters merged using `lora`, the run's lora options)."""

    name: str  # key in summary.json ("sft", "sft@step-100")
    label: str  # the run it belongs to (one line per label in plots, one series for alarms)
    step: Optional[int]
    model_dir: str
    state: Optional[Path] = None
    lora: dict = field(default_factory=dict)



def _final_step(run: Path) -> Optional[int]:
    summary = run / "summary.json"
    return json.loads(summary.read_text()).get("steps") if summary.exists() else None


def _run_lora(run: Path) -> dict:
    import yaml

    config = run / "config.yaml"
    lora = (yaml.safe_load(config.read_text()) or {}).get("lora", {}) if config.exists() else {}
    return lora if isinstance(lora, dict) else {}


def _checkpoint_target(ckpt: Path, name: str, label: str) -> Target:
    run = ckpt.parent.parent
    if not (run / "final" / "config.json").exists():
        raise ConfigError(f"checkpoint {ckpt}: its run has no final/ model to take the architecture and tokenizer from")
    step = int(ckpt.name.split("-")[1])
    return Target(name, label, step, str(run / "final"), ckpt / "model.safetensors", _run_lora(run))


def expand_entry(entry: str, label: Optional[str], checkpoints: bool) -> list[Target]:
    """Targets of one `models` entry: a run dir, a final/ dir, a checkpoint dir, or a model path/id."""
    from alignkit.runtime.checkpoint import STEP_DIR, checkpoint_dirs

    path = Path(entry)
    if (path / "final" / "config.json").exists():  # a run dir
        label = label or path.resolve().name
        step = _final_step(path)
        ckpts = [c for c in checkpoint_dirs(path) if checkpoints and int(c.name.split("-")[1]) != step]
        out = [_checkpoint_target(c, f"{label}@{c.name}", label) for c in ckpts]
        return out + [Target(label, label, step, str(path / "final"))]
    if STEP_DIR.match(path.name) and (path / "model.safetensors").exists():  # a checkpoint dir
        label = label or path.resolve().parent.parent.name
        return [_checkpoint_target(path, f"{label}@{path.name}", label)]
    if (path / "config.json").exists():  # a model dir; a run's final/ knows its step
        run = path.resolve().parent
        label = label or (run.name if path.name == "final" else path.resolve().name)
        return [Target(label, label, _final_step(run) if path.name == "final" else None, str(path))]
    from alignkit.models.loading import resolve_model_path

    return [Target(label or entry, label or entry, None, resolve_model_path(entry))]


def _dedupe(name: str, taken: set[str] | list[str]) -> str:
    """`name`, or name_2, name_3, ... if taken."""
    out, i = name, 2
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    return out


def _unique(targets: list[Target]) -> list[Target]:
    seen: set[str] = set()
    for t in targets:
        t.name = _dedupe(t.name, seen)
        seen.add(t.name)
    return targets


def _find(targets: list[Target], key: str) -> Optional[Target]:
    """The target named `key`, else the last (final) target of the run labelled `key`."""
    named = [t for t in targets if t.name == key] or [t for t in targets if t.label == key]
    return named[-1] if named else None


def resolve_targets(cfg: Any) -> tuple[list[Target], Target, Target]:
    """(targets in evaluation order, baseline, reference). The baseline is evaluated first."""
    entries = [cfg.models] if isinstance(cfg.models, str) else list(cfg.models)
    if cfg.names and len(cfg.names) != len(entries):
        raise ConfigError(f"names: {len(cfg.names)} names for {len(entries)} models")
    targets: list[Target] = []
    for i, entry in enumerate(entries):
        targets.extend(expand_entry(entry, cfg.names[i] if cfg.names else None, cfg.checkpoints))
    _unique(targets)
    first_final = [t for t in targets if t.label == targets[0].label][-1]
    baseline = _find(targets, cfg.baseline) if cfg.baseline else first_final
    if baseline is None:  # a path outside `models`: evaluate it too
        baseline = expand_entry(cfg.baseline, "baseline", checkpoints=False)[-1]
        targets = _unique([baseline] + targets)
    reference = baseline
    if cfg.reference:
        reference = _find(targets, cfg.reference) or expand_entry(cfg.reference, "reference", checkpoints=False)[-1]
    return [baseline] + [t for t in targets if t is not baseline], baseline, reference


def same_weights(a: Target, b: Target) -> bool:
    """Whether two targets are the same weights (the same model dir and checkpoint, whatever their names)."""
    return Path(a.model_dir).resolve() == Path(b.model_dir).resolve() and a.state == b.state


def load_target(target: Target, device: torch.device):
    """(model in eval mode on device, tokenizer) for a target, checkpoint weights and LoRA merged in."""
    from alignkit.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm(target.model_dir)
    if target.state is not None:
        from safetensors.torch import load_file

        from alignkit.models.lora import LoraOptions, apply_lora, merge_lora

        state = load_file(str(target.state))
        if any("lora_" in k for k in state):  # a LoRA run's checkpoint: adapters on the final/ base
            model = apply_lora(model, LoraOptions(**target.lora))
        missing, unexpected = model.load_state_dict(state, strict=False)
        # A tied output head is saved once (as the embedding), so its key is absent from the state.
        tied = {k for k in missing if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise ConfigError(f"{target.state}: does not fit {target.model_dir} "
                              f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
        model = merge_lora(model)
    return model.to(device).eval(), tokenizer
