"""`alignkit eval`: what a model (or each checkpoint of a run) does on held-out prompts, in numbers.

config -> targets (model dirs; run dirs expand to checkpoints/step-N + final/) -> for each: sample
n_samples responses per prompt (and greedy) -> gold reward (each prompt by its own task, also per task),
proxy reward per RM, KL(policy || ref) from the samples, win rate vs the baseline, length, EOS, distinct-1/2,
held-out perplexity -> alarms over each run's checkpoints -> summary.json, metrics.jsonl, samples/, plots/, a table.

Standard errors treat prompts as the independent units (a prompt's K samples are averaged first).
Every model is sampled with the same seed (common random numbers make differences less noisy).
Pure math lives in alignkit.eval.metrics / alarms, target resolution in eval.targets, the scoring forwards in
eval.scoring; sampling is rollout.sampling.sample_generations (the seeded chunked sampler of every stage);
this file wires the metrics of one evaluation run. `evaluate_models(cfg)` is the entry point for Python
callers (the pipeline).

Past 400 lines on purpose: one model's whole measurement (samples, rewards, KL, the comparison with the baseline)
and the run around it (targets, the result cache of eval.results, alarms, files) read top to bottom in one file;
the pure pieces already live in eval/.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignkit.config import ConfigError, EvalConfig, check_groups, save_config
from alignkit.eval import metrics as M
from alignkit.eval.alarms import AlarmConfig, check_all
from alignkit.eval.plots import print_table, safe_name
from alignkit.eval.results import read_result, result_key, write_result
from alignkit.eval.scoring import SCORE_ROW_TOKENS, heldout_perplexity, response_examples, token_logps
from alignkit.eval.targets import Target, _dedupe, load_target, resolve_targets, same_weights
from alignkit.rollout.forwards import generation_token_logps
from alignkit.rollout.sampling import EVAL_SPLIT, GREEDY_SPLIT, sample_generations
from alignkit.runtime.logging import _clean
from alignkit.runtime.setup import peak_rss_mb

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
    prompt_tasks: list[str] = field(default_factory=list)  # each prompt's gold task name; []: `task` for all


def task_names(ctx: Context) -> list[str]:
    """The gold task name of each prompt ([] without gold): its record's task, else ctx.task (build_context)."""
    if ctx.task is None:
        return []
    return ctx.prompt_tasks or [ctx.task.name] * len(ctx.prompts)


def gold_rewards(ctx: Context, prompts: list, texts: list[str], names: list[str]) -> list[float]:
    """Gold reward of texts[i] answering prompts[i], scored by the task names[i] (one call per task)."""
    from alignkit.data.tasks import get_task

    out = [0.0] * len(texts)
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        task = ctx.task if name == ctx.task.name else get_task(name)
        for i, g in zip(rows, task.gold_rewards([prompts[i] for i in rows], [texts[i] for i in rows])):
            out[i] = g
    return out


def _per_task(out: dict, key: str, values, names: list[str]) -> None:
    """`key/<task>` and `key/<task>_stderr` per task (prompts as units) when the prompts span >= 2 tasks."""
    if len(set(names)) >= 2:
        for name, pair in M.mean_and_stderr_by_label(values, names).items():
            _with_stderr(out, f"{key}/{name}", pair)


def _grouped(values: list[float], k: int) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1, k)


def _with_stderr(out: dict, key: str, pair: tuple[float, float]) -> None:
    out[key], out[f"{key}_stderr"] = pair


def reward_metrics(ctx: Context, flat_prompts: list, texts: list[str], k: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Gold and proxy rewards of responses: (metrics, per-sample [P, K] arrays "gold", "proxy")."""
    cfg, out, scores = ctx.cfg, {}, {}
    if ctx.task is not None:
        names = task_names(ctx)
        scores["gold"] = _grouped(gold_rewards(ctx, flat_prompts, texts, [n for n in names for _ in range(k)]), k)
        _with_stderr(out, "gold_reward", M.grouped_mean_and_stderr(scores["gold"]))  # all prompts pooled
        _per_task(out, "gold_reward", scores["gold"], names)
        out["gold_perfect"] = float(np.mean(scores["gold"] == 1.0))
    if ctx.reward_models:
        from alignkit.models.reward import score_texts

        rows = []
        for name, rm, tok in ctx.reward_models:
            # an ensemble directory (alignkit rm ensemble=k): its members scored once, their mean its reward
            ensemble = hasattr(rm, "members")
            per_member = {"per_member": True} if ensemble else {}
            scored = np.asarray(score_texts(rm, tok, flat_prompts, texts, cfg.reward.batch_size, cfg.max_length,
                                            **per_member))  # [members, P*K] or [P*K]
            if ensemble:
                out[f"rm_disagreement_{name}"] = M.ensemble_disagreement(scored)
            rows.append(_grouped(scored.mean(axis=0) if ensemble else scored, k))
        per_rm = np.stack(rows)  # [M, P, K]
        scores["proxy"] = per_rm.mean(axis=0)
        _with_stderr(out, "proxy_reward", M.grouped_mean_and_stderr(scores["proxy"]))
        for (name, _, _), r in zip(ctx.reward_models, per_rm):
            out[f"proxy_reward_{name}"] = float(r.mean())
        if len(ctx.reward_models) >= 2:
            out["rm_disagreement"] = M.ensemble_disagreement(per_rm.reshape(len(per_rm), -1))
        else:  # one ensemble: its own spread
            out.update({"rm_disagreement": v for key, v in out.items() if key.startswith("rm_disagreement_")})
    return out, scores


def kl_metrics(ctx: Context, model, tokenizer, generations: list, is_reference: bool = False) -> dict:
    """KL(policy || reference) from the policy's own samples: k1 of sequence sums and per-token k3.

    The policy's side is the log-probs the sampler kept (Generation.logps: no second forward) when every
    generation has them, else a forward; the reference's is a forward. is_reference (the model evaluated is the
    reference): both sides are the reference's forward, so the KL is exactly 0.

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
    pad, k, temperature = tokenizer.pad_token_id, ctx.cfg.n_samples, ctx.cfg.sampling.temperature
    if all(0 < len(g.response_ids) and len(g.prompt_ids) + len(g.response_ids) <= ctx.cfg.max_length for g in generations):
        # a prompt's k samples share one forward of it (rollout.forwards): the tiny task's prompts are most tokens
        def logps(m):
            return generation_token_logps(m, generations, pad, k, temperature)
    else:  # some sample is cut at max_length (or empty): packed rows of the cut sequences
        examples = response_examples(generations, ctx.cfg.max_length)

        def logps(m):
            return token_logps(m, examples, pad, SCORE_ROW_TOKENS, ctx.cfg.score_tokens, temperature)
    ref = logps(ref_model)
    if is_reference:
        pol = ref
    elif all(g.logps is not None for g in generations):  # as sampled, cut where the reference's rows were cut
        pol = [torch.tensor(g.logps[: len(r)]) for g, r in zip(generations, ref)]
    else:
        pol = logps(model)
    out: dict[str, float] = {}
    _with_stderr(out, "kl", M.kl_from_samples(_grouped([p.sum().item() for p in pol], k),
                                              _grouped([r.sum().item() for r in ref], k)))
    _with_stderr(out, "kl_k3", M.kl_k3_per_token(pol, ref, group_size=k))
    return out


def evaluate_policy(model, tokenizer, ctx: Context, is_reference: bool = False) -> tuple[dict, dict[str, Any]]:
    """(metrics, per-sample data for alarms and samples.jsonl) of one model (is_reference: it is the KL's reference)."""
    cfg, k = ctx.cfg, ctx.cfg.n_samples
    # chunks of sampling.chunk prompts, seeded from (seed, EVAL_SPLIT, chunk): the same for every model
    sampled = sample_generations(None, model, tokenizer, ctx.prompts, k, cfg.sampling.temperature,
                                 cfg.sampling.max_new_tokens, cfg.sampling.chunk, cfg.seed, EVAL_SPLIT,
                                 top_p=cfg.sampling.top_p, with_logps=not is_reference)
    flat = [g for per_prompt in sampled for g in per_prompt]
    flat_prompts = [p for p in ctx.prompts for _ in range(k)]
    texts = [g.text for g in flat]
    out, scores = reward_metrics(ctx, flat_prompts, texts, k)
    if cfg.greedy and ctx.task is not None:
        greedy = [g[0].text for g in sample_generations(None, model, tokenizer, ctx.prompts, 1, 0.0,
                                                          cfg.sampling.max_new_tokens, cfg.sampling.chunk * k,
                                                          cfg.seed, GREEDY_SPLIT)]
        greedy_gold = gold_rewards(ctx, ctx.prompts, greedy, task_names(ctx))
        _with_stderr(out, "greedy_gold_reward", M.mean_and_stderr(greedy_gold))
        _per_task(out, "greedy_gold_reward", greedy_gold, task_names(ctx))
    out.update(kl_metrics(ctx, model, tokenizer, flat, is_reference))
    lengths = [len(g.response_ids) for g in flat]
    stats = M.length_stats(lengths)
    out.update(length=stats["mean"], length_stderr=stats["stderr"], length_median=stats["median"], length_max=stats["max"])
    out.update(eos_fraction=M.eos_fraction([g.finished for g in flat]),
               distinct_1=M.distinct_n(texts, 1), distinct_2=M.distinct_n(texts, 2))
    if ctx.heldout:
        out.update(heldout_perplexity(model, tokenizer, ctx.heldout, cfg))
    per_sample = {"text": texts, "length": lengths, "finished": [g.finished for g in flat], "prompt": flat_prompts}
    per_sample.update({f"{key}_reward": v.ravel().tolist() for key, v in scores.items()})
    if len(set(task_names(ctx))) >= 2:
        per_sample["task"] = [n for n in task_names(ctx) for _ in range(k)]
    return out, {"scores": scores, **per_sample}


def baseline_metrics(scores: dict[str, np.ndarray], baseline: dict[str, np.ndarray], names: list[str]) -> dict:
    """Win rates and the paired gold gain of one model over the baseline, from their per-sample [P, K] "gold" /
    "proxy" scores on the same prompts with the same sampling seeds. names: each prompt's task ([] without gold)."""
    out: dict[str, float] = {}
    for key, name in (("gold", "win_rate_gold"), ("proxy", "win_rate_rm")):
        if key in scores and key in baseline:
            _with_stderr(out, name, M.win_rate(scores[key], baseline[key]))
    if "gold" in scores and "gold" in baseline:  # same prompts: the paired gain over the baseline
        _with_stderr(out, "gold_gain", M.paired_difference(scores["gold"], baseline["gold"]))
        _per_task(out, "gold_gain", scores["gold"].mean(axis=1) - baseline["gold"].mean(axis=1), names)
    return out


# ------------------------------------------------------------------------------ reward models on pairs


def rm_pair_metrics(ctx: Context, pairs: list[dict]) -> dict[str, dict]:
    """Per RM: accuracy on held-out pairs vs their labels, vs the gold preference (when known), calibration."""
    from alignkit.models.reward import score_texts

    cfg, out = ctx.cfg, {}
    prompts = [p["prompt"] for p in pairs]
    meta = [p.get("meta") or {} for p in pairs]
    gold_margins = [m.get("gold_chosen", np.nan) - m.get("gold_rejected", np.nan) for m in meta]
    for name, rm, tok in ctx.reward_models:
        chosen, rejected = (score_texts(rm, tok, prompts, [p[side] for p in pairs], cfg.reward.batch_size, cfg.max_length)
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
    check_groups(cfg)
    if cfg.n_samples < 1 or cfg.score_tokens < 1:
        raise ConfigError("n_samples and score_tokens must be positive")
    if cfg.sampling.temperature <= 0:
        raise ConfigError("sampling.temperature must be > 0 (greedy decoding is greedy=true)")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: {cfg.device!r} is not one of auto, cpu, cuda")


def _task(cfg: EvalConfig):
    """The task named by `task`; with task=auto the task of a `task:` prompts spec (rollout.rewards.task_name_for)."""
    from alignkit.data.tasks import get_task
    from alignkit.rollout.rewards import task_name_for

    if cfg.reward.task in (None, "none", "null"):
        return None
    name = task_name_for(None if cfg.reward.task == "auto" else cfg.reward.task, cfg.prompts, required=False)
    return get_task(name) if name else None


def prompt_task_names(cfg: EvalConfig, records: list[dict], task) -> list[str]:
    """Each prompt's gold task: with reward.task=auto a prompt record's own built-in task (meta "task", as
    task: specs make them), else `task`; a task named in reward.task scores every prompt. [] without gold."""
    from alignkit.data.tasks import TASK_NAMES

    if task is None:
        return []
    if cfg.reward.task != "auto":
        return [task.name] * len(records)
    own = [(r.get("meta") or {}).get("task") for r in records]
    return [name if name in TASK_NAMES else task.name for name in own]


def rm_label(path: str, taken: list[str]) -> str:
    """A short unique name for a reward model: its run's name for a run's final/, else the basename."""
    p = Path(path)
    return _dedupe(safe_name(p.parent.name if p.name == "final" else p.name), taken)


def build_context(cfg: EvalConfig, reference: Target, device: torch.device) -> tuple[Context, list[dict]]:
    """Prompts, task, reward models, reference and held-out text; plus held-out pairs (when RMs)."""
    from alignkit.data.records import load_records

    records, _ = load_records(cfg.prompts, "prompts")
    records = records[: cfg.max_prompts or None]
    prompts = [r["prompt"] for r in records]
    heldout = [r["text"] for r in load_records(cfg.heldout_text, "text")[0]] if cfg.heldout_text else []
    rms = []
    for path in cfg.reward.models:
        from alignkit.models.reward import load_reward_model

        rm, tok = load_reward_model(path, seed=cfg.seed)
        rms.append((rm_label(path, [name for name, _, _ in rms]), rm.to(device).eval(), tok))
    pairs = load_records(cfg.pairs, "preference")[0] if cfg.pairs and rms else []
    task = _task(cfg)
    ctx = Context(cfg, prompts, task, rms, load_target(reference, device), heldout,
                  prompt_tasks=prompt_task_names(cfg, records, task))
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
    keys = [k for k in ("task", "text", "gold_reward", "proxy_reward", "length", "finished") if k in data]
    with open(path, "w") as f:
        for i, prompt in enumerate(data["prompt"]):
            row = {"prompt": prompt[-1]["content"], **{k: data[k][i] for k in keys}}
            f.write(json.dumps(_json(row)) + "\n")


def model_result(cfg: EvalConfig, target: Target, reference: Target, ctx: Context, device: torch.device) -> tuple[dict, dict]:
    """evaluate_policy's (metrics, per-sample data) of one target, read back from cfg.cache_dir when it holds this
    model's result for these settings (eval.results), else evaluated (and kept there, with a cache_dir)."""
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None
    key = result_key(cfg, target, reference) if cache_dir else ""
    kept = read_result(cache_dir, key) if cache_dir else None
    if kept is not None:
        print(f"eval: {target.name} read from {cache_dir / key}.json (evaluated before, same settings and weights)",
              flush=True)
        return kept
    t0 = time.time()
    model, tokenizer = load_target(target, device)
    metrics, data = evaluate_policy(model, tokenizer, ctx, is_reference=same_weights(target, reference))
    del model
    metrics["eval_s"] = time.time() - t0
    print(f"eval: {target.name} done in {metrics['eval_s']:.1f}s", flush=True)
    if cache_dir:
        write_result(cache_dir, key, target.name, metrics, data)
    return metrics, data


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
    results = {target.name: model_result(cfg, target, reference, ctx, device) for target in targets}
    models: dict[str, dict] = {}
    samples: dict[str, list[dict]] = {}
    (out_dir / "metrics.jsonl").write_text("")
    for target in targets:
        metrics, data = results[target.name]
        if target is not baseline:  # every other model against the baseline, on the same prompts and seeds
            metrics = {**metrics, **baseline_metrics(data["scores"], results[baseline.name][1]["scores"], task_names(ctx))}
        models[target.name] = metrics
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
                   **({"tasks": list(dict.fromkeys(task_names(ctx)))} if len(set(task_names(ctx))) >= 2 else {}),
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
