"""Plain functions every stage calls at its start and end (no base class: a stage reads top to bottom)."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from alignkit.config import save_config
from alignkit.runtime.logging import write_summary
from alignkit.runtime.setup import make_accelerator, peak_rss_mb, seed_everything


# output_dir -> provenance of the run in progress (computed once by start_run, added to summary.json by finish_run)
_PROVENANCE: dict[str, dict] = {}


def prepare_output_dir(output_dir: str) -> Path | None:
    """Create output_dir; a ConfigError (one line) when it is a file or cannot be written. Returns the
    outermost directory created now (output_dir or an ancestor; None when it existed), so a run that fails
    on bad input can remove what it made (undo_failed_start)."""
    from alignkit.config import ConfigError

    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir {output_dir!r} is a file, not a directory: choose another output_dir")
    created = None
    for candidate in [path, *path.parents]:
        if candidate.exists():
            break
        created = candidate
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".alignkit-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir {output_dir!r} cannot be written ({err.strerror or err}): choose a directory "
                          "you can write to") from None
    return created


# What a run leaves in its output_dir; overwrite=true removes these (and nothing else) before starting afresh.
RUN_FILES = ("final", ".tmp-final", "final_critic", "checkpoints", "summary.json", "metrics.jsonl", "tb", "samples")
RUN_FILE_PATTERNS = ("iter-*",)  # raft's per-iteration samples


def check_output_dir(cfg: Any) -> None:
    """Refuse an output_dir whose contents this run would clobber, unless resume=true or overwrite=true.

    A finished run (final/ or summary.json) or an unfinished one with checkpoints: resume=true continues
    it, overwrite=true removes alignkit's files (RUN_FILES) and starts afresh. A non-empty directory with
    no config.yaml or metrics.jsonl was not written by alignkit: refused unless overwrite=true, and even
    then its files are left alone. A run that died before its first checkpoint just starts again."""
    from alignkit.config import ConfigError
    from alignkit.runtime.checkpoint import latest_checkpoint

    path = Path(cfg.output_dir)
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if not entries or getattr(cfg, "resume", False):
        return
    ours = (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file()
    finished = (path / "final").exists() or (path / "summary.json").exists()
    checkpoint = latest_checkpoint(path)
    if getattr(cfg, "overwrite", False):
        if ours:
            for name in RUN_FILES:
                target = path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            for pattern in RUN_FILE_PATTERNS:
                for target in path.glob(pattern):
                    shutil.rmtree(target, ignore_errors=True)
        return
    if not ours:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(f"output_dir {cfg.output_dir!r} holds files alignkit did not write ({shown}): choose another "
                          "output_dir, or set overwrite=true to write beside them")
    if finished or checkpoint is not None:
        what = "a finished run (final/, summary.json)" if finished else f"an unfinished run (checkpoint {checkpoint.name})"
        raise ConfigError(f"output_dir {cfg.output_dir!r} holds {what}: resume=true continues it, overwrite=true "
                          "replaces it, or choose another output_dir")


# output_dir -> (the outermost directory this run created or None, the config.yaml text it replaced or None)
_STARTS: dict[str, tuple[Path | None, str | None]] = {}


def undo_failed_start() -> None:
    """Leave the output_dir of a run that stopped on bad input as it was: the config.yaml it wrote is removed
    (or the previous one restored), and a directory it created is removed when it holds no checkpoint or
    final model. Called by the CLI on a ConfigError / DataError / ModelError; a no-op after finish_run."""
    from alignkit.runtime.checkpoint import latest_checkpoint

    for key, (created, previous) in list(_STARTS.items()):
        path = Path(key)
        if latest_checkpoint(path) is not None or (path / "final").exists():
            continue  # it trained before failing: the config belongs with its checkpoints
        config = path / "config.yaml"
        if previous is None:
            config.unlink(missing_ok=True)
        else:
            config.write_text(previous)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
    _STARTS.clear()


# Stages that cannot run sharded yet, and why (the exact failure without this refusal); every other stage that
# trains is tested under FSDP in tests/dist/test_fsdp.py.
FSDP_UNSUPPORTED: dict[str, str] = {}
# Options that cannot run sharded, and why: ppo's share_backbone puts its value head's parameters in the actor's
# optimizer, and accelerate's FSDP2 prepare maps an optimizer onto the shards of the one model prepared with it
SHARE_BACKBONE_UNDER_FSDP = ("the value head's parameters join the actor's optimizer, and FSDP2 prepares one model "
                             "per optimizer (accelerate: \"A parameter in the optimizer couldn't be switched to its "
                             "sharded version\")")


def refuse_under_fsdp(accelerator: Accelerator, cfg: Any) -> None:
    """A ConfigError at start, before any loading, for what FSDP cannot run here: LoRA (final/ would merge
    adapters of sharded weights: models.loading.save_model refuses it, after the whole training; it also covers
    ppo's LoRA reference, the actor with its adapters off), ppo's share_backbone and the stages in
    FSDP_UNSUPPORTED. Both run under DDP (configs/accelerate/ddp.yaml)."""
    from accelerate.utils import DistributedType

    from alignkit.config import ConfigError

    if accelerator.distributed_type != DistributedType.FSDP:
        return
    stage = stage_name(cfg)
    lora = getattr(cfg, "lora", None)
    if lora is not None and lora.r > 0:
        raise ConfigError(f"{stage}: LoRA under FSDP is not supported (lora.r={lora.r}): final/ merges the adapters "
                          "into the base weights, which FSDP holds in shards; train LoRA with "
                          "--config_file configs/accelerate/ddp.yaml, or set lora.r=0 to train every weight sharded")
    if getattr(cfg, "share_backbone", False):
        raise ConfigError(f"{stage}: share_backbone under FSDP is not supported: {SHARE_BACKBONE_UNDER_FSDP}; set "
                          "share_backbone=false (a separate critic, sharded too), or run it with "
                          "--config_file configs/accelerate/ddp.yaml")
    if stage in FSDP_UNSUPPORTED:
        raise ConfigError(f"{stage} does not run under FSDP yet: {FSDP_UNSUPPORTED[stage]}; run it with "
                          "--config_file configs/accelerate/ddp.yaml")


def start_run(cfg: Any) -> Accelerator:
    """Accelerator, seeds, and `output_dir/config.yaml` (the fully resolved config, plus its provenance block:
    runtime.provenance), after check_output_dir agreed to write there."""
    from alignkit.runtime.provenance import run_provenance

    accelerator = make_accelerator(cfg.mixed_precision)
    refuse_under_fsdp(accelerator, cfg)
    seed_everything(cfg.seed)
    if accelerator.is_main_process:
        created = prepare_output_dir(cfg.output_dir)
        check_output_dir(cfg)
        provenance = run_provenance(cfg, accelerator.num_processes, accelerator.device.type)
        key = str(Path(cfg.output_dir).resolve())
        _PROVENANCE[key] = provenance
        config = Path(cfg.output_dir) / "config.yaml"
        _STARTS[key] = (created, config.read_text() if config.is_file() else None)
        save_config(cfg, config, provenance)
    accelerator.wait_for_everyone()
    return accelerator


def load_train_eval(cfg: Any, kind: str) -> tuple[list[dict], list[dict], list[str]]:
    """(train, held-out, invalid-record messages) of `kind`.

    eval_data is a path/spec, a fraction split off train_data, None, or several held-out sets (a list),
    which are concatenated; the sets by name are kept on the returned list as `.sets` (a HeldOut). A
    weighted train_data ([{path, weight}, ...]) becomes one training set holding each source in its
    share (data.records.mix_records; `replay` adds to the last source's share); a fraction eval_data is
    then split off each source before mixing, so no held-out record is trained on. Invalid records stop
    the run with file:line and field, unless cfg.skip_invalid, where they are skipped and returned as
    messages (stages count them in summary.json).
    """
    from alignkit.data.records import data_sources, load_records, mix_records, mixture_shares, split_records

    invalid: list[str] | None = [] if cfg.skip_invalid else None
    load = lambda spec: load_records(spec, cfg.data_kind or kind, errors=invalid)[0]  # noqa: E731
    weighted = isinstance(cfg.train_data, list) and any(isinstance(s, dict) for s in cfg.train_data)
    if weighted:
        sources = data_sources(cfg.train_data)
        parts, split_off = [load(s.path) for s in sources], []
        if isinstance(cfg.eval_data, float):
            pairs = [split_records(part, cfg.eval_data, cfg.seed) for part in parts]
            parts, split_off = [p[0] for p in pairs], [p[1] for p in pairs]
        shares = mixture_shares([s.weight for s in sources], getattr(cfg, "replay", 0.0))
        train, _ = mix_records(parts, shares, cfg.seed)
        held_out = HeldOut(sum(split_off, []), {s.name: part for s, part in zip(sources, split_off)})
        counts = ", ".join(f"{s.name} {share:.0%} ({len(p)} records)" for s, share, p in zip(sources, shares, parts))
        print(f"training mixture of {len(train)} records: {counts}", flush=True)
    else:
        records = load(cfg.train_data)
        train, held_out = records, HeldOut([], {})
        if isinstance(cfg.eval_data, float):
            train, split = split_records(records, cfg.eval_data, cfg.seed)
            held_out = HeldOut(split, {})
    if cfg.eval_data and not isinstance(cfg.eval_data, float):
        sets = {s.name: load(s.path) for s in data_sources(cfg.eval_data)}
        held_out = HeldOut(sum(sets.values(), []), sets if len(sets) > 1 else {})
    if invalid:
        print(f"skipped {len(invalid)} invalid records; first: " + " | ".join(invalid[:3]), flush=True)
    return train, held_out, invalid or []


class HeldOut(list):
    """The held-out records (a plain list for every stage) with `sets`: name -> records when eval_data named
    several sets (or a weighted train_data was split by a fraction), so each can be reported on its own."""

    def __init__(self, records: list[dict], sets: dict[str, list[dict]]):
        super().__init__(records)
        self.sets = sets


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
    if not hasattr(cfg, "lora"):  # a stage that trains nothing (label): the model as it is
        return model, tokenizer
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
    _STARTS.pop(str(Path(cfg.output_dir).resolve()), None)
    provenance = _PROVENANCE.pop(str(Path(cfg.output_dir).resolve()), None)
    if provenance is not None:
        summary["provenance"] = provenance
    if accelerator.is_main_process:
        write_summary(cfg.output_dir, summary)
        print("\n".join(closing_lines(stage_name(cfg), cfg.output_dir, summary)), file=sys.stderr, flush=True)
    accelerator.wait_for_everyone()
    return summary


# Held-out numbers worth a user's first look, most telling first: the stage's summary has "<key>_before" for the
# model it started from. RL stages lead with gold reward and KL, the RM and DPO with pair accuracy, SFT with loss.
HEADLINE_KEYS = ("eval_gold_reward", "eval_kl", "eval_accuracy", "eval_reward_accuracy", "eval_rank_accuracy",
                 "eval_loss", "eval_proxy_reward", "eval_reward")


def stage_name(cfg: Any) -> str:
    """The CLI's name of the stage a config belongs to: SFTConfig -> sft, BestOfNConfig -> best-of-n."""
    name = type(cfg).__name__.removesuffix("Config")
    return "best-of-n" if name == "BestOfN" else name.lower()


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.4g}"


def headline(summary: dict[str, Any]) -> str:
    """'eval_loss 6.282 -> 0.781' (held-out, before -> after training) for up to two keys; for best-of-n, the gold
    reward of all samples -> of the selected ones; '' when the summary has neither."""
    pairs = [f"{k} {_short(summary[k + '_before'])} -> {_short(summary[k])}" for k in HEADLINE_KEYS
             if _num(summary.get(k)) and _num(summary.get(k + "_before"))][:2]
    if pairs:
        return ", ".join(pairs) + " (held-out, before -> after)"
    # RAFT without held-out prompts: the mean gold (else proxy) reward of its own samples, first -> last iteration
    for key in ("gold_reward", "proxy_reward"):
        first, last = summary.get(f"{key}_first_iteration"), summary.get(f"{key}_last_iteration")
        if _num(first) and _num(last):
            return f"sample {key} {_short(first)} -> {_short(last)} (its own samples, first -> last iteration)"
    for prefix in ("eval_", ""):  # best-of-n: held-out prompts when it had them, else the train prompts
        all_, best = summary.get(f"{prefix}sample_gold_reward"), summary.get(f"{prefix}gold_reward")
        if _num(all_) and _num(best):
            where = "held-out" if prefix else "train"
            return (f"{prefix}gold_reward {_short(all_)} (all samples) -> {_short(best)} "
                    f"(best of {summary.get('n')}, {where} prompts)")
    return ""


def closing_lines(stage: str, output_dir: str, summary: dict[str, Any]) -> list[str]:
    """What a stage prints last: where its model (or, for label / best-of-n, its data) went, and the headline."""
    out = Path(output_dir)
    wall = f" in {summary['wall_s']:.0f}s" if _num(summary.get("wall_s")) else ""
    if (out / "final").is_dir():
        where = f"model in {out / 'final'}"
    else:
        written = sorted(p.name for p in out.glob("*.jsonl") if p.name != "metrics.jsonl")
        where = f"wrote {', '.join(written)} in {out}" if written else f"results in {out / 'summary.json'}"
    lines = [f"[{stage}] done{wall}: {where}"]
    numbers = headline(summary)
    if not numbers and _num(summary.get("train_pair_label_gold_agreement")):  # label: how good are its labels
        numbers = (f"{summary.get('train_prompts')} prompts x {summary.get('n')} samples, pairs agree with gold on "
                   f"{summary['train_pair_label_gold_agreement']:.1%}")
    if numbers:
        lines.append(f"[{stage}] {numbers}")
    return lines
