"""The pipeline's report: `alignkit eval` over every policy, then report.json, report.md, report.html and plots/.

report.json = {"stages": {stage: summary}, "methods": {method: {gold_reward, proxy_reward, kl,
win_rate_vs_sft, length, distinct_2, wall_s, peak_rss_mb, ...}}, "alarms": [...], "notes": [...]}.
`methods` has `base` (after pretraining), `sft`, and each policy method that ran; best-of-n's row (from its
own summary) has its KL estimate as `kl` and `kl_upper_bound`, the bound log n - (n-1)/n.

Past 400 lines on purpose: the report's rows (method_row, table_columns) and report.md's rendering read one
set of column names, kept in one module so the markdown and report.html (eval/html_report.py) cannot drift.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# report key -> key in eval's per-model metrics
METHOD_KEYS = {
    "gold_reward": "gold_reward",
    "gold_reward_stderr": "gold_reward_stderr",
    "greedy_gold_reward": "greedy_gold_reward",
    "proxy_reward": "proxy_reward",
    "proxy_reward_stderr": "proxy_reward_stderr",
    "kl": "kl",
    "kl_stderr": "kl_stderr",
    "gold_gain_vs_sft": "gold_gain",
    "gold_gain_vs_sft_stderr": "gold_gain_stderr",
    "win_rate_vs_sft": "win_rate_gold",
    "win_rate_vs_sft_stderr": "win_rate_gold_stderr",
    "length": "length",
    "distinct_2": "distinct_2",
    "heldout_ppl": "heldout_ppl",
}
TABLE = ["gold_reward", "gold_gain_vs_sft", "greedy_gold_reward", "proxy_reward", "kl", "win_rate_vs_sft", "length", "distinct_2",
         "heldout_ppl", "wall_s", "peak_rss_mb"]
PER_TASK = {"gold_reward/": "gold_reward/", "gold_gain_vs_sft/": "gold_gain/"}  # report prefix -> eval's (gold per task)


def method_row(metrics: dict) -> dict:
    """A method's report row from eval's per-model metrics: METHOD_KEYS, plus gold per task (gold_reward/<task>,
    gold_gain_vs_sft/<task> and their _stderr) when the prompts spanned several tasks."""
    row = {key: metrics.get(src) for key, src in METHOD_KEYS.items()}
    for ours, theirs in PER_TASK.items():
        row.update({ours + k[len(theirs):]: v for k, v in metrics.items() if k.startswith(theirs)})
    return row


def table_columns(methods: dict) -> list[str]:
    """TABLE, with a gold_reward/<task> column after gold_reward for each task some row has."""
    tasks = dict.fromkeys(k for row in methods.values() for k in row
                          if k.startswith("gold_reward/") and not k.endswith("_stderr"))
    i = TABLE.index("gold_reward") + 1
    return TABLE[:i] + list(tasks) + TABLE[i:]


def _eval_args(cfg: Any, done: dict[str, Path], output_dir: Path, models: dict[str, Path]) -> list[str]:
    """The overrides every eval run of a pipeline shares: where it writes, the seed, the models {name: final/} and
    the pipeline's reward model."""
    # JSON lists are YAML flow lists with every item quoted: safe for any path.
    args = [f"output_dir={output_dir}", f"seed={cfg.seed}", f"models={json.dumps([str(p) for p in models.values()])}",
            f"names={json.dumps(list(models))}", "checkpoints=false"]
    if "rm" in done:
        args.append(f"reward.models={json.dumps([str(done['rm'] / 'final')])}")
    return args


def eval_stage_args(cfg: Any, done: dict[str, Path]) -> list[str]:
    """The `alignkit eval` overrides that evaluate every policy of a pipeline (stages/pipeline.py runs it)."""
    from alignkit.stages import POLICY_METHODS

    # Stages without final/ (best-of-n: a sampling procedure, not a new model) report from their summary.
    # In POLICY_METHODS order, whatever order the stages ran in (`jobs` > 1 starts long stages first).
    policies = {name: done[s] / "final" for s, name in POLICY_METHODS.items() if s in done and (done[s] / "final").exists()}
    args = _eval_args(cfg, done, Path(cfg.output_dir) / "eval", policies)
    if "sft" in policies:
        args += ["baseline=sft", "reference=sft"]
    if cfg.jobs > 1:  # the policies were evaluated into the cache as their stages ended (eval_part_args)
        args.append(f"cache_dir={eval_cache_dir(cfg)}")
    return args


def eval_cache_dir(cfg: Any) -> Path:
    return Path(cfg.output_dir) / "eval" / "cache"


def eval_part_args(cfg: Any, done: dict[str, Path], method: str, part_dir: Path) -> list[str] | None:
    """The `alignkit eval` overrides that evaluate one of the pipeline's models (`method`, a POLICY_METHODS name)
    into the eval cache, with the same settings, reference and reward model as eval_stage_args (so the pipeline's
    eval reads it back); None when the method has no final/ to evaluate."""
    from alignkit.stages import POLICY_METHODS

    stage = next(s for s, name in POLICY_METHODS.items() if name == method)
    if stage not in done or not (done[stage] / "final").exists():
        return None
    args = _eval_args(cfg, done, part_dir, {method: done[stage] / "final"})
    args += [f"cache_dir={eval_cache_dir(cfg)}", "pairs=null"]  # the RM's held-out pair accuracy: once, in the pipeline's eval
    if "sft" in done:
        args.append(f"reference={done['sft'] / 'final'}")
    return args


def report_from_eval(cfg: Any, done: dict[str, Path], stage_summaries: dict, notes: list[str]) -> dict:
    """The pipeline's report (report.md, plots/, report.html; returned for report.json) from the stages'
    summaries and the finished eval run in output_dir/eval."""
    out = Path(cfg.output_dir)
    eval_summary = json.loads((out / "eval" / "summary.json").read_text())
    report = build_report(stage_summaries, eval_summary, notes)
    plots = write_plots(out, done, report)
    (out / "report.md").write_text(render_markdown(report, plots, out))
    from alignkit.eval.html_report import write_pipeline_html  # imports this module: import it here

    write_pipeline_html(out, report, done)
    return report


# best-of-n has no model to evaluate: its row comes from its own summary (selected responses to the held-out
# prompts). Its KL to the sampling (SFT) policy is the estimate from its samples (eval.metrics.best_of_n_kl_estimate;
# absent from run dirs older than it) and kl_upper_bound = log n - (n-1)/n, which older run dirs call kl_bound.
BEST_OF_N_KEYS = {"gold_reward": "gold_reward", "gold_reward_stderr": "gold_reward_stderr", "proxy_reward": "proxy_reward",
                  "proxy_reward_stderr": "proxy_reward_stderr", "kl": "kl_estimate", "kl_stderr": "kl_estimate_stderr",
                  "length": "length"}
# (its distinct-2 is over one pick per prompt, eval's over 4 samples per prompt: not comparable, so not shown)


def stage_alarms(stage_summaries: dict) -> list[dict]:
    """Alarms RL-style stages raised while training (summary["alarms"]), tagged with their stage."""
    out = []
    for stage, summary in stage_summaries.items():
        for alarm in summary.get("alarms") or []:
            if isinstance(alarm, dict):
                out.append({**alarm, "model": alarm.get("model", stage), "stage": stage, "during": "training"})
    return out


def build_report(stage_summaries: dict, eval_summary: dict, notes: list[str]) -> dict:
    """Combine stage summaries and eval metrics into the report dictionary."""
    from alignkit.stages import POLICY_METHODS

    stage_of = {method: stage for stage, method in POLICY_METHODS.items()}
    methods: dict[str, dict] = {}
    for name, metrics in eval_summary.get("models", {}).items():
        row = method_row(metrics)
        stage = stage_summaries.get(stage_of.get(name, ""), {})
        row["wall_s"] = stage.get("wall_s")
        row["peak_rss_mb"] = stage.get("peak_rss_mb")
        methods[name] = row
    bon = stage_summaries.get("best_of_n")
    if bon and "best_of_n" not in methods and bon.get("gold_reward") is not None:
        row = {key: bon.get(src) for key, src in BEST_OF_N_KEYS.items()}
        row.update(wall_s=bon.get("wall_s"), peak_rss_mb=bon.get("peak_rss_mb"), n=bon.get("n"),
                   kl_upper_bound=bon.get("kl_upper_bound", bon.get("kl_bound")),
                   kl_is="estimate from the samples; log n - (n-1)/n is an upper bound",
                   sample_gold_reward=bon.get("sample_gold_reward"))
        methods["best_of_n"] = row
    return {
        "stages": stage_summaries,
        "methods": methods,
        "alarms": eval_summary.get("alarms", []) + stage_alarms(stage_summaries),
        "reward_models": eval_summary.get("reward_models", {}),
        "eval": {k: eval_summary.get(k) for k in ("n_prompts", "n_samples", "task", "baseline", "wall_s")},
        "provenance": eval_summary.get("provenance"),
        "notes": notes,
    }


def _fmt(value: Any, stderr: Any = None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    if isinstance(stderr, float) and math.isfinite(stderr):
        text += f" ± {stderr:.3f}"
    return text


def _cell(row: dict, key: str) -> str:
    """A table cell: "mean ± stderr", and "≤ bound (upper bound)" beside it (or alone) where the row has
    "<key>_upper_bound" (best-of-n's KL)."""
    text = _fmt(row.get(key), row.get(f"{key}_stderr"))
    bound = row.get(f"{key}_upper_bound")
    if not isinstance(bound, (int, float)) or not math.isfinite(bound):
        return text
    stated = f"≤ {bound:.3f} (upper bound)"
    return stated if text == "-" else f"{text}; {stated}"


def provenance_lines(provenance: dict | None) -> list[str]:
    """The report's provenance section: versions, commit, processes, device, seed (the eval run's)."""
    if not provenance:
        return []
    versions = ", ".join(f"{k} {v}" for k, v in (provenance.get("versions") or {}).items() if v)
    git = provenance.get("git") or {}
    commit = f"{git['commit'][:12]}{' (uncommitted changes)' if git.get('dirty') else ''}" if git.get("commit") else "-"
    return ["", "## Provenance", "", f"- versions: {versions}", f"- alignkit commit: {commit}",
            f"- processes: {provenance.get('num_processes')}, device: {provenance.get('device')}, "
            f"mixed precision: {provenance.get('mixed_precision')}, seed: {provenance.get('seed')}",
            "- every stage's summary.json and config.yaml hold its own block, with fingerprints of its inputs"]


# What each column of report.md's table means (the glossary under it; report.html shows the same columns).
GLOSSARY = {
    "gold_reward": "the task's true score (0-1, higher is better) of responses sampled for the held-out prompts, "
                   "mean ± one standard error",
    "gold_gain_vs_sft": "gold_reward minus SFT's on the same prompts (paired per prompt), ± SE",
    "greedy_gold_reward": "gold reward of the greedy (temperature 0) response, one per prompt",
    "proxy_reward": "the pipeline's reward model's score of the same samples: what PPO, GRPO, RAFT and best-of-n "
                    "optimise (an RM logit, not on gold's scale)",
    "kl": "KL(method || SFT) in nats per response, estimated from the method's own samples",
    "win_rate_vs_sft": "share of prompts where the method's sample has the higher gold reward than SFT's (ties 0.5)",
    "length": "mean response length in tokens",
    "distinct_2": "distinct bigrams / all bigrams over the samples (diversity; 1 = no bigram repeats)",
    "heldout_ppl": "perplexity on held-out pretraining-style text (eval.heldout_text): how far the model moved from "
                   "plain language modelling",
    "wall_s": "wall-clock seconds of the method's stage",
    "peak_rss_mb": "peak resident memory of the stage's process, MB",
}


def verdict_lines(report: dict) -> list[str]:
    """One sentence per method against the baseline on gold: report.html's (html_report.method_sentence)."""
    from alignkit.eval.html_report import method_sentence  # html_report imports this module: import it here

    methods, baseline = report.get("methods") or {}, (report.get("eval") or {}).get("baseline")
    return [f"- {method_sentence(name, row, baseline, methods.get(baseline))[1]}" for name, row in methods.items()]


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text()) if path.exists() else None
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _count(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def reward_model_lines(report: dict, out: Path) -> list[str]:
    """Each reward model's pair accuracy on BOTH held-out sets, named: eval's (eval.pairs, the same for every RM)
    and, for the pipeline's own RM, its stage's split of the labelled samples. They differ because the pairs
    differ; without the names a reader sees two accuracies of one model and cannot tell which is which."""
    if not report.get("reward_models"):
        return []
    spec = _read_yaml(out / "eval" / "config.yaml").get("pairs")
    lines = ["", "## Reward models: pair accuracy on two held-out sets", ""]
    for name, m in report["reward_models"].items():
        on = f"eval.pairs (`{spec}`)" if spec else "eval.pairs"
        lines.append(f"- `{name}` on {on}, {_count(m.get('n_pairs'))} pairs no stage trained on: accuracy against their "
                     f"labels {_fmt(m.get('accuracy'), m.get('accuracy_stderr'))}, against gold "
                     f"{_fmt(m.get('gold_accuracy'), m.get('gold_accuracy_stderr'))}")
        own = (report.get("stages") or {}).get(name) or {}
        if isinstance(own.get("eval_accuracy"), (int, float)):
            lines.append(f"- `{name}` on its own stage's held-out split (rm eval_data: {_count(own.get('eval_n_pairs'))} pairs "
                         f"of the labelled samples, rm/summary.json): accuracy against their labels "
                         f"{_fmt(own.get('eval_accuracy_before'))} before → {_fmt(own.get('eval_accuracy'))} after "
                         f"training, against gold {_fmt(own.get('eval_gold_accuracy'))}")
    lines.append("")
    lines.append("The first is the comparison between reward models; the second is the one `alignkit rm` printed. "
                 "With n pairs one standard error is about 0.5 / sqrt(n).")
    return lines


def reproduce_lines(report: dict, out: Path) -> list[str]:
    """The commit and the commands that remake this run and this report."""
    git = (report.get("provenance") or {}).get("git") or {}
    commit = git.get("commit")
    config_dir = _read_yaml(out / "config.yaml").get("config_dir")
    lines = ["", "## Reproduce", ""]
    if commit:
        dirty = " (the run had uncommitted changes: they are not in it)" if git.get("dirty") else ""
        lines.append(f"- at commit `{commit[:12]}`{dirty}: `git checkout {commit[:12]}`")
    if (out / "config.yaml").exists():
        where = f" (stage configs from `{config_dir}`, relative to the repository root)" if config_dir else ""
        lines.append(f"- `alignkit pipeline --config {out / 'config.yaml'} output_dir=NEW_DIR`: this run's resolved "
                     f"config, its stages, overrides and seed{where}")
    lines.append(f"- `alignkit report {out}`: rebuild this report, report.html and plots/ from the run dir (no model runs)")
    return lines


def stage_lines(report: dict) -> list[str]:
    lines = ["", "## Stages", "", "Each stage's numbers on its OWN held-out split (its eval_data), before → after "
             "training; the methods' table above is eval's, on the same held-out prompts for all.", "",
             "| stage | wall_s | peak_rss_mb | key results |", "|---|---|---|---|"]
    for stage, summary in report["stages"].items():
        keys = [k for k in summary if k.startswith("eval_") and not k.endswith(("_before", "_stderr"))
                and isinstance(summary[k], (int, float))][:4]
        before = [f"{k}: {_fmt(summary.get(k + '_before'))} → {_fmt(summary[k])}" for k in keys]
        lines.append(f"| {stage} | {_fmt(summary.get('wall_s'))} | {_fmt(summary.get('peak_rss_mb'))} | {'; '.join(before)} |")
    return lines


def render_markdown(report: dict, plots: list[Path], out: Path) -> str:
    ev = report.get("eval", {})
    lines = ["# alignkit pipeline report", ""]
    lines.append(f"Held-out prompts: {ev.get('n_prompts')}, {ev.get('n_samples')} samples each (± is one "
                 f"standard error); task: {ev.get('task')}; KL and win rate against SFT. Best-of-n's KL is "
                 f"estimated from its samples, beside its upper bound log n - (n-1)/n.")
    if report.get("methods"):
        lines += ["", "## Verdict", ""] + verdict_lines(report)
    columns = table_columns(report["methods"])
    lines += ["", "| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in report["methods"].items():
        cells = [_cell(row, k) for k in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Columns:", ""] + [f"- **{k}**: {GLOSSARY[k]}" for k in TABLE if k in GLOSSARY]
    if len(columns) > len(TABLE):
        lines.append("- **gold_reward/<task>**: gold_reward over the held-out prompts of that task only")
    lines += reward_model_lines(report, out)
    lines += ["", "## Alarms", ""]
    if report["alarms"]:
        for a in report["alarms"]:
            when = "while training" if a.get("during") == "training" else "in eval"
            lines.append(f"- **{a.get('name')}** ({a.get('model')} {when}, step {a.get('step')}): {a.get('message')} "
                         f"Remedy: {a.get('remedy')}")
    else:
        lines.append("None fired.")
    lines += stage_lines(report)
    if report.get("notes"):
        lines += ["", "Notes: " + "; ".join(report["notes"])]
    lines += provenance_lines(report.get("provenance"))
    lines += reproduce_lines(report, out)
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.relative_to(out)})" for p in plots]
    return "\n".join(lines) + "\n"


def write_plots(out: Path, done: dict[str, Path], report: dict) -> list[Path]:
    """Training curves of every stage that trains, the gold-vs-KL frontier, proxy vs gold per method, and proxy
    and gold over training (rollout samples and held-out evaluations) of the RL stages."""
    from alignkit.eval.html_report import stage_curve  # html_report imports this module: import it here
    from alignkit.eval.plots import draw_proxy_gold, plot_frontier, save_figure

    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    curves = {s: train_curves(s, d / "metrics.jsonl") for s, d in done.items()}
    curves = {s: c for s, c in curves.items() if c}
    if curves:
        fig, axes = _grid(len(curves), 4, (3.6, 3.1))
        for ax, (stage, series) in zip(axes, curves.items()):
            draw_train_curves(ax, stage, series)
        written.append(save_figure(fig, plot_dir / "training_curves.png", dpi=90))
    # The base model is far off both plots' scale (tens of nats from SFT, gold near 0) and not an alignment method.
    aligned = {name: row for name, row in report["methods"].items() if name != "base"}
    for name, (x, y) in {"frontier_gold_vs_kl": ("kl", "gold_reward"), "proxy_vs_gold": ("gold_reward", "proxy_reward")}.items():
        path = plot_frontier(aligned, plot_dir / f"{name}.png", x=x, y=y, reference="SFT")
        if path is not None:
            written.append(Path(path))
    series = {s: stage_curve(d / "metrics.jsonl") for s, d in done.items()}
    series = {s: c for s, c in series.items() if len(c["train"]) + len(c["eval"]) >= 2}
    if series:
        fig, axes = _grid(len(series), 3, (4.8, 4.0))
        for ax, (stage, curve) in zip(axes, series.items()):
            draw_proxy_gold(ax, curve, f"{stage}: proxy and gold over training")
        written.append(save_figure(fig, plot_dir / "proxy_gold_over_training.png", dpi=90))
    return written


def _grid(n: int, max_cols: int, size: tuple[float, float]):
    """(figure, the first n axes) of a grid at most max_cols wide; the unused cells are hidden."""
    import matplotlib.pyplot as plt

    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    cells = [ax for row in axes for ax in row]
    for ax in cells[n:]:
        ax.set_visible(False)
    return fig, cells[:n]


# stage -> (its training loss key in metrics.jsonl, what that loss is: the y axis). Held-out eval_loss is drawn
# beside it only where it is the same quantity (HELD_OUT_LOSS): DPO's train loss adds sft_weight x NLL, RRHF's
# eval splits rank and SFT terms, so theirs would not compare.
TRAIN_LOSS = {
    "pretrain": ("loss", "cross-entropy (nats/token)"),
    "sft": ("loss", "cross-entropy (nats/token)"),
    "rm": ("loss", "reward-model loss (nats/pair)"),
    "dpo": ("loss", "DPO loss + sft_weight x NLL"),
    "rrhf": ("loss", "rank loss + sft_weight x NLL"),
    "ppo": ("policy_loss", "clipped policy loss"),
    "grpo": ("policy_loss", "clipped policy loss"),
    "raft": ("loss", "cross-entropy on kept samples (nats/token)"),
    "best_of_n": ("loss", "cross-entropy on best samples (nats/token)"),
}
HELD_OUT_LOSS = {"pretrain", "sft", "rm", "best_of_n"}


def train_curves(stage: str, metrics_path: Path) -> dict[str, list[tuple[int, float]]]:
    """{series label: [(step, value)]} of a stage's training loss (and its held-out eval_loss where comparable);
    {} for a stage that logged no loss (label: it trains nothing)."""
    key, _ = TRAIN_LOSS.get(stage, ("loss", "loss"))
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] if metrics_path.exists() else []
    train = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if not train:
        return {}
    what = "rollouts" if key == "policy_loss" else "training batches"
    series = {f"train ({what})": train}
    held = [(r["step"], r["eval_loss"]) for r in rows if isinstance(r.get("eval_loss"), (int, float))]
    if held and stage in HELD_OUT_LOSS:
        series["held-out eval"] = held
    return series


def draw_train_curves(ax, stage: str, series: dict[str, list[tuple[int, float]]]) -> None:
    """A stage's loss series against optimizer step, markers on every logged point (a short run may log one)."""
    for label, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if "held-out" in label else ".",
                ls="--" if "held-out" in label else "-", label=label)
    ax.set_title(stage)
    ax.set_xlabel("optimizer step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    steps = {p[0] for points in series.values() for p in points}
    if len(steps) == 1:  # one logged step: autoscale would show fractions of a step around it
        ax.set_xlim(min(steps) - 1, min(steps) + 1)
    ax.set_ylabel(TRAIN_LOSS.get(stage, ("loss", "loss"))[1], fontsize="small")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")


# (proxy key, gold key) pairs RL-style stages log on their own samples, most specific first.
PROXY_GOLD_KEYS = (("reward", "gold_reward"), ("sample_proxy_reward", "sample_gold_reward"))


def _proxy_gold_series(metrics_path: Path) -> list[tuple[int, float, float]]:
    """(step, proxy, gold) from a stage's metrics.jsonl lines that log both (PPO rollouts, RAFT iterations)."""
    if not metrics_path.exists():
        return []
    points = []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        for proxy, gold in PROXY_GOLD_KEYS:
            if isinstance(record.get(proxy), (int, float)) and isinstance(record.get(gold), (int, float)):
                points.append((record["step"], record[proxy], record[gold]))
                break
    return points
