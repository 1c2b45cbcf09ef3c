"""`alignkit eval`: what a model (or each checkpoint of a run) does on held-out prompts, in numbers.

config -> targets (model dirs; run dirs expand to checkpoints/step-N + final/) -> for each: sample
n_samples responses per prompt (and greedy) -> gold reward, proxy reward per RM, KL(policy || ref)
from the samples, win rate vs the baseline, length, EOS, distinct-1/2, held-out perplexity -> alarms
over each run's checkpoints -> summary.json, metrics.jsonl, samples/, plots/, a table.

Standard errors treat prompts as the independent units (a prompt's K samples are averaged first).
Every model is sampled with the same seed (common random numbers make differences less noisy).
Pure math lives in alignkit.eval.metrics / alarms; this file only runs models. `evaluate_models(cfg)`
is the entry point for Python callers (the pipeline). Past 400 lines: target resolution, sampling, every
metric's wiring and the outputs of one evaluation run read best in one file.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from alignkit.config import ConfigError, EvalConfig, save_config
from alignkit.eval import metrics as M
from alignkit.eval.alarms import AlarmConfig, check_all
from alignkit.eval.plots import print_table, safe_name
from alignkit.runtime.logging import _clean
from alignkit.runtime.setup import peak_rss_mb

# Packed rows when scoring: short rows keep attention (quadratic in the row) cheap; an example longer
# than this gets a row of its own.
SCORE_ROW_TOKENS = 128


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


# ------------------------------------------------------------------------------ resolving models


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


def resolve_targets(cfg: EvalConfig) -> tuple[list[Target], Target, Target]:
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


# ------------------------------------------------------------------------------ scoring


def _chunks(examples: list[dict], token_budget: int) -> list[list[int]]:
    """Consecutive index groups of at most `token_budget` tokens (at least one example each)."""
    groups, current, used = [], [], 0
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        if current and used + n > token_budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    return groups + [current] if current else groups


@torch.no_grad()
def token_logps(model, examples: list[dict], pad_id: int, row_tokens: int, token_budget: int,
                temperature: float = 1.0) -> list[torch.Tensor]:
    """Per-token log-probs of each example's label tokens: list of [T_n] float tensors (CPU).

    Same packing and shift as runtime.sequences.sequence_logps (their sums are equal), with logits
    divided by `temperature` (the distribution responses were sampled from). Examples are packed into
    rows of `row_tokens` (short rows: attention cost grows with the row length squared), at most
    `token_budget` tokens per forward.
    """
    from alignkit.ops import logprobs_from_logits
    from alignkit.runtime.sequences import pack_for_forward

    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for group in _chunks(examples, token_budget):
        batch = pack_for_forward([examples[i] for i in group], row_tokens, pad_id, device)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        labels = batch["labels"][:, 1:]
        lp = logprobs_from_logits(logits[:, :-1].float() / temperature, labels)
        counted = labels != -100
        seg = batch["segment"][:, 1:][counted]
        order = torch.argsort(seg, stable=True)  # row-major order keeps each example's tokens in sequence
        counts = torch.bincount(seg, minlength=len(group)).tolist()
        out.extend(t.cpu() for t in torch.split(lp[counted][order], counts))
    return out


@torch.no_grad()
def heldout_perplexity(model, tokenizer, texts: list[str], cfg: EvalConfig) -> dict[str, float]:
    """Token-level NLL and perplexity of pretraining-style texts (each truncated to max_length)."""
    from alignkit.data.chat import tokenize_text
    from alignkit.runtime.sequences import sequence_logps

    examples = [{"input_ids": ids, "labels": ids} for ids in (tokenize_text(tokenizer, t)[: cfg.max_length] for t in texts)]
    nll, tokens = 0.0, 0.0
    for group in _chunks(examples, cfg.score_tokens):
        sums, counts = sequence_logps(model, [examples[i] for i in group], tokenizer.pad_token_id, SCORE_ROW_TOKENS)
        nll, tokens = nll - sums.sum().item(), tokens + counts.sum().item()
    return {"heldout_nll": nll / max(tokens, 1.0), "heldout_ppl": M.perplexity(nll, tokens)}


def response_examples(generations: list, max_length: int) -> list[dict]:
    """{input_ids: prompt + response, labels: -100 on the prompt} per generation, cut to max_length."""
    out = []
    for g in generations:
        ids = (g.prompt_ids + g.response_ids)[:max_length]
        labels = ([-100] * len(g.prompt_ids) + g.response_ids)[:max_length]
        out.append({"input_ids": ids, "labels": labels})
    return out


# ------------------------------------------------------------------------------ one model


@dataclass
class Context:
    """What every model is measured against (loaded once)."""

    cfg: EvalConfig
    prompts: list[list[dict]]
    task: Any  # a data.tasks task with gold_rewards, or None
    reward_models: list[tuple[str, Any, Any]]  # (name, model, tokenizer)
    reference: tuple[Any, Any]  # (model, tokenizer)
    heldout: list[str]
    baseline: dict[str, np.ndarray] = field(default_factory=dict)  # per-sample [P, K] scores of the baseline


def _grouped(values: list[float], k: int) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1, k)


def _with_stderr(out: dict, key: str, pair: tuple[float, float]) -> None:
    out[key], out[f"{key}_stderr"] = pair


def reward_metrics(ctx: Context, flat_prompts: list, texts: list[str], k: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Gold and proxy rewards of responses: (metrics, per-sample [P, K] arrays "gold", "proxy")."""
    cfg, out, scores = ctx.cfg, {}, {}
    if ctx.task is not None:
        scores["gold"] = _grouped(ctx.task.gold_rewards(flat_prompts, texts), k)
        _with_stderr(out, "gold_reward", M.grouped_mean_and_stderr(scores["gold"]))
        out["gold_perfect"] = float(np.mean(scores["gold"] == 1.0))
    if ctx.reward_models:
        from alignkit.models.reward import score_texts

        per_rm = np.stack([_grouped(score_texts(rm, tok, flat_prompts, texts, cfg.batch_size, cfg.max_length), k)
                           for _, rm, tok in ctx.reward_models])  # [M, P, K]
        scores["proxy"] = per_rm.mean(axis=0)
        _with_stderr(out, "proxy_reward", M.grouped_mean_and_stderr(scores["proxy"]))
        for (name, _, _), r in zip(ctx.reward_models, per_rm):
            out[f"proxy_reward_{name}"] = float(r.mean())
        if len(ctx.reward_models) >= 2:
            out["rm_disagreement"] = M.ensemble_disagreement(per_rm.reshape(len(per_rm), -1))
    return out, scores


def kl_metrics(ctx: Context, model, tokenizer, generations: list) -> dict:
    """KL(policy || reference) from the policy's own samples: k1 of sequence sums and per-token k3.

    generations: the policy's samples, prompt-major, n_samples per prompt. Both sides score them with
    logits / temperature: the responses were drawn from the policy's tempered distribution, and the KL is
    between the two models as they would sample at that temperature, so a model against itself is 0 at
    any temperature (top_p truncation is not modelled). Standard errors are over prompts (a prompt's
    samples are averaged first), as for the rewards.
    """
    ref_model, ref_tok = ctx.reference
    if tokenizer.get_vocab() != ref_tok.get_vocab():
        print("eval: the reference has another tokenizer; KL skipped for this model", flush=True)
        return {}
    examples = response_examples(generations, ctx.cfg.max_length)
    pad, rows, budget, k = tokenizer.pad_token_id, SCORE_ROW_TOKENS, ctx.cfg.score_tokens, ctx.cfg.n_samples
    pol = token_logps(model, examples, pad, rows, budget, ctx.cfg.temperature)
    ref = token_logps(ref_model, examples, pad, rows, budget, ctx.cfg.temperature)
    out: dict[str, float] = {}
    _with_stderr(out, "kl", M.kl_from_samples(_grouped([p.sum().item() for p in pol], k),
                                              _grouped([r.sum().item() for r in ref], k)))
    _with_stderr(out, "kl_k3", M.kl_k3_per_token(pol, ref, group_size=k))
    return out


def evaluate_policy(model, tokenizer, ctx: Context) -> tuple[dict, dict[str, Any]]:
    """(metrics, per-sample data for alarms and samples.jsonl) of one model."""
    from alignkit.rollout.sampling import generate

    cfg, k = ctx.cfg, ctx.cfg.n_samples
    sampled = generate(model, tokenizer, ctx.prompts, n=k, temperature=cfg.temperature, top_p=cfg.top_p,
                       max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed)
    flat = [g for per_prompt in sampled for g in per_prompt]
    flat_prompts = [p for p in ctx.prompts for _ in range(k)]
    texts = [g.text for g in flat]
    out, scores = reward_metrics(ctx, flat_prompts, texts, k)
    if cfg.greedy and ctx.task is not None:
        greedy = [g[0].text for g in generate(model, tokenizer, ctx.prompts, n=1, do_sample=False,
                                                max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)]
        _with_stderr(out, "greedy_gold_reward", M.mean_and_stderr(ctx.task.gold_rewards(ctx.prompts, greedy)))
    out.update(kl_metrics(ctx, model, tokenizer, flat))
    for key, name in (("gold", "win_rate_gold"), ("proxy", "win_rate_rm")):
        if key in scores and key in ctx.baseline:
            _with_stderr(out, name, M.win_rate(scores[key], ctx.baseline[key]))
    if "gold" in scores and "gold" in ctx.baseline:  # same prompts: the paired gain over the baseline
        _with_stderr(out, "gold_gain", M.paired_difference(scores["gold"], ctx.baseline["gold"]))
    lengths = [len(g.response_ids) for g in flat]
    stats = M.length_stats(lengths)
    out.update(length=stats["mean"], length_stderr=stats["stderr"], length_median=stats["median"], length_max=stats["max"])
    out.update(eos_fraction=M.eos_fraction([g.finished for g in flat]),
               distinct_1=M.distinct_n(texts, 1), distinct_2=M.distinct_n(texts, 2))
    if ctx.heldout:
        out.update(heldout_perplexity(model, tokenizer, ctx.heldout, cfg))
    per_sample = {"text": texts, "length": lengths, "finished": [g.finished for g in flat], "prompt": flat_prompts}
    per_sample.update({f"{key}_reward": v.ravel().tolist() for key, v in scores.items()})
    return out, {"scores": scores, **per_sample}


# ------------------------------------------------------------------------------ reward models on pairs


def rm_pair_metrics(ctx: Context, pairs: list[dict]) -> dict[str, dict]:
    """Per RM: accuracy on held-out pairs vs their labels, vs the gold preference (when known), calibration."""
    from alignkit.models.reward import score_texts

    cfg, out = ctx.cfg, {}
    prompts = [p["prompt"] for p in pairs]
    meta = [p.get("meta") or {} for p in pairs]
    gold_margins = [m.get("gold_chosen", np.nan) - m.get("gold_rejected", np.nan) for m in meta]
    for name, rm, tok in ctx.reward_models:
        chosen, rejected = (score_texts(rm, tok, prompts, [p[side] for p in pairs], cfg.batch_size, cfg.max_length)
                            for side in ("chosen", "rejected"))
        acc = {"n_pairs": len(pairs)}
        _with_stderr(acc, "accuracy", M.rm_accuracy(chosen, rejected))
        if np.isfinite(gold_margins).any():
            _with_stderr(acc, "gold_accuracy", M.rm_gold_accuracy(chosen, rejected, gold_margins))
        acc["calibration"] = M.calibration_buckets(chosen, rejected)
        out[name] = acc
    return out


# ------------------------------------------------------------------------------ the run


def check_config(cfg: EvalConfig) -> None:
    if not cfg.models:
        raise ConfigError("models: give at least one model dir, run dir or model id")
    if cfg.n_samples < 1 or cfg.max_new_tokens < 1 or cfg.batch_size < 1 or cfg.score_tokens < 1:
        raise ConfigError("n_samples, max_new_tokens, batch_size and score_tokens must be positive")
    if cfg.temperature <= 0:
        raise ConfigError("temperature must be > 0 (greedy decoding is greedy=true)")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: {cfg.device!r} is not one of auto, cpu, cuda")


def _task(cfg: EvalConfig):
    from alignkit.data.tasks import get_task, parse_task_spec

    if cfg.task in (None, "none", "null"):
        return None
    if cfg.task == "auto":
        return get_task(parse_task_spec(cfg.prompts)[0]) if cfg.prompts.startswith("task:") else None
    return get_task(cfg.task)


def rm_label(path: str, taken: list[str]) -> str:
    """A short unique name for a reward model: its run's name for a run's final/, else the basename."""
    p = Path(path)
    return _dedupe(safe_name(p.parent.name if p.name == "final" else p.name), taken)


def build_context(cfg: EvalConfig, reference: Target, device: torch.device) -> tuple[Context, list[dict]]:
    """Prompts, task, reward models, reference and held-out text; plus held-out pairs (when RMs)."""
    from alignkit.data.records import load_records

    records, _ = load_records(cfg.prompts, "prompts")
    prompts = [r["prompt"] for r in records][: cfg.max_prompts or None]
    heldout = [r["text"] for r in load_records(cfg.heldout_text, "text")[0]] if cfg.heldout_text else []
    rms = []
    for path in cfg.reward_models:
        from alignkit.models.reward import load_reward_model

        rm, tok = load_reward_model(path, seed=cfg.seed)
        rms.append((rm_label(path, [name for name, _, _ in rms]), rm.to(device).eval(), tok))
    pairs = load_records(cfg.pairs, "preference")[0] if cfg.pairs and rms else []
    ctx = Context(cfg, prompts, _task(cfg), rms, load_target(reference, device), heldout)
    return ctx, pairs


def _json(value: Any) -> Any:
    """NaN/inf -> null, numpy -> python, recursively."""
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    return _clean(value)


def _write_samples(out_dir: Path, name: str, data: dict) -> None:
    path = out_dir / "samples" / f"{safe_name(name)}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = [k for k in ("text", "gold_reward", "proxy_reward", "length", "finished") if k in data]
    with open(path, "w") as f:
        for i, prompt in enumerate(data["prompt"]):
            row = {"prompt": prompt[-1]["content"], **{k: data[k][i] for k in keys}}
            f.write(json.dumps(_json(row)) + "\n")


def evaluate_models(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate every target; write the run dir; return the summary ({"models", "alarms", ...}).

    Evaluation runs in one process: under a multi-process launcher the other ranks return {} at once
    (so they never write the same files).
    """
    started = time.time()
    check_config(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from alignkit.runtime.provenance import run_provenance

    provenance = run_provenance(cfg, 1, device.type)
    save_config(cfg, out_dir / "config.yaml", provenance)
    targets, baseline, reference = resolve_targets(cfg)
    ctx, pairs = build_context(cfg, reference, device)
    models: dict[str, dict] = {}
    samples: dict[str, list[dict]] = {}
    (out_dir / "metrics.jsonl").write_text("")
    for target in targets:
        t0 = time.time()
        model, tokenizer = load_target(target, device)
        metrics, data = evaluate_policy(model, tokenizer, ctx)
        del model
        if target is baseline:
            ctx.baseline = data["scores"]
        metrics["eval_s"] = time.time() - t0
        models[target.name] = metrics
        print(f"eval: {target.name} done in {metrics['eval_s']:.1f}s", flush=True)
        with open(out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_json({"step": target.step, "model": target.name, "label": target.label, **metrics})) + "\n")
        samples.setdefault(target.label, []).append({"step": target.step, **{k: data[k] for k in data if k != "scores"}})
        if cfg.save_samples:
            _write_samples(out_dir, target.name, data)
    summary = {"models": models, "alarms": _alarms(cfg, targets, models, samples)}
    if ctx.reward_models and pairs:
        summary["reward_models"] = rm_pair_metrics(ctx, pairs)
    summary.update(baseline=baseline.name, reference=reference.model_dir, n_prompts=len(ctx.prompts),
                   n_samples=cfg.n_samples, task=getattr(ctx.task, "name", None),
                   plots=_plots(targets, models, out_dir), wall_s=time.time() - started, peak_rss_mb=peak_rss_mb(),
                   provenance=provenance)
    (out_dir / "summary.json").write_text(json.dumps(_json(summary), indent=1))
    from alignkit.eval.html_report import write_eval_html

    write_eval_html(out_dir)  # report.html: the numbers, alarms, plots and samples on one page
    print_table(models)
    for alarm in summary["alarms"]:
        print(f"ALARM {alarm['name']} ({alarm['model']}, step {alarm['step']}): {alarm['message']}", flush=True)
    return summary


def _series(targets: list[Target], models: dict[str, dict]) -> dict[str, list[dict]]:
    series: dict[str, list[dict]] = {}
    for t in targets:
        series.setdefault(t.label, []).append({"step": t.step, **models[t.name]})
    return series


def _alarms(cfg: EvalConfig, targets: list[Target], models: dict, samples: dict) -> list[dict]:
    """check_all per run (label): its checkpoints form the series.

    The checkpoints of one run are a FIXED held-out series (the same prompts and sampling seed for every
    model), so proxy_up_gold_down may compare them; each point carries gold_reward_stderr and
    proxy_reward_stderr (stderr over prompts, reward_metrics), which its noise test and Bonferroni z use,
    and the length alarm gets each sample's gold reward (task known) to discount gold's own length trend."""
    config = AlarmConfig(gold_tolerance=cfg.alarm_gold_tolerance, length_corr_threshold=cfg.alarm_length_corr,
                         disagreement_factor=cfg.alarm_disagreement_factor, kl_budget=cfg.kl_budget)
    found = []
    for label, series in _series(targets, models).items():
        found.extend({"model": label, **a.to_dict()} for a in check_all(series, samples.get(label), config))
    return found


def _plots(targets: list[Target], models: dict, out_dir: Path) -> list[str]:
    """Each metric against step, for runs evaluated at >= 2 steps."""
    series = {k: v for k, v in _series(targets, models).items() if len({m["step"] for m in v}) >= 2}
    if not series:
        return []
    from alignkit.eval.plots import plot_metrics_over_steps

    metrics = [k for k in next(iter(series.values()))[0] if k not in ("step", "eval_s") and not k.endswith("_stderr")]
    return [str(p) for p in plot_metrics_over_steps(series, out_dir / "plots", metrics)]


def run(cfg: EvalConfig) -> dict[str, Any]:
    return evaluate_models(cfg)
