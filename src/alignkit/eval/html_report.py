"""report.html: a pipeline run's (or an `alignkit eval` run's) report as ONE self-contained page.

The page holds, in order: one sentence per method saying what it did against the baseline (SFT) on gold,
with its standard error and KL; the results table (report.md's columns); the alarms with their remedies;
the plots (gold against KL with best-of-n's bound drawn as a bound, proxy and gold over training with every
evaluation point and a red dashed line at each alarm's step); and the responses of every method to the
same 12 held-out prompts side by side, best gold per prompt highlighted and text that differs from the
baseline's response marked.

Self-contained: plots are PNGs embedded as base64 data URIs; no script, no font, no stylesheet is fetched,
so the file opens offline, mailed or copied anywhere. Responsive CSS; wide tables scroll on a phone.
Every piece of text that comes from a run (names, messages, prompts, model responses) goes through
html.escape: model samples are arbitrary text.

`render_html` is pure (report dict + figures + samples -> str). The rest reads run-dir files and draws
the figures (matplotlib; no torch, no stage import): `write_pipeline_html` for a pipeline run,
`write_eval_html` for an eval run. Past 400 lines: the page's sections, the figures they show and the CSS
that lays them out on a laptop and a phone read best together.
"""

from __future__ import annotations

import base64
import difflib
import html
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from alignkit.eval.report import _cell, _proxy_gold_series, method_row, table_columns

ALARM_COLOR = "#ff0000"  # pure red: no other line on the plots uses it (tests look for its pixels)
N_SAMPLE_PROMPTS = 12
DISPLAY = {"base": "base (pretrained)", "sft": "SFT", "dpo": "DPO", "rrhf": "RRHF", "ppo": "PPO", "grpo": "GRPO",
           "raft": "RAFT", "best_of_n": "best-of-n"}
# Held-out evaluation points RL-style stages log in their metrics.jsonl: (proxy key, gold key).
EVAL_KEYS = (("eval_reward", "eval_gold_reward"), ("eval_proxy_reward", "eval_gold_reward"))


def display_name(name: str) -> str:
    return DISPLAY.get(name, name)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


# ------------------------------------------------------------------------------ sentences


def gold_gain(row: dict, base_row: dict | None) -> tuple[float, float | None, bool] | None:
    """(gain in gold over the baseline, its stderr, paired?) of one method's row.

    The paired gain (gold_gain_vs_sft: per-prompt differences, eval's gold_gain) where eval measured it;
    else the difference of the two means with the unpaired stderr (best-of-n, scored on its own prompts).
    None when neither the pair nor both means are known."""
    if _finite(row.get("gold_gain_vs_sft")):
        se = row.get("gold_gain_vs_sft_stderr")
        return row["gold_gain_vs_sft"], se if _finite(se) else None, True
    if base_row is None or not (_finite(row.get("gold_reward")) and _finite(base_row.get("gold_reward"))):
        return None
    ses = [r.get("gold_reward_stderr") for r in (row, base_row)]
    se = math.sqrt(sum(s * s for s in ses)) if all(_finite(s) for s in ses) else None
    return row["gold_reward"] - base_row["gold_reward"], se, False


def kl_phrase(row: dict) -> str:
    """"at KL 0.30"; for a row that knows an upper bound (best-of-n) "at KL 0.20 (≤ 0.31, an upper bound)"."""
    kl, bound = row.get("kl"), row.get("kl_upper_bound")
    if _finite(kl) and _finite(bound):
        return f"at KL {kl:.2f} (≤ {bound:.2f}, an upper bound)"
    if _finite(kl):
        return f"at KL {kl:.2f}"
    if _finite(bound):
        return f"at KL ≤ {bound:.2f} (an upper bound)"
    return "(KL not measured)"


def method_sentence(name: str, row: dict, baseline: str | None, base_row: dict | None) -> tuple[str, str]:
    """(verdict class, sentence) of one method against the baseline on gold.

    "beats" only when the gain exceeds two standard errors, "is below" when the loss does; otherwise "does
    not beat" with the gain stated: a difference inside the noise is not a win. Plain text (escape it)."""
    who, base = display_name(name), display_name(baseline or "the baseline")
    if name == baseline:
        gold = _cell(row, "gold_reward")
        return "baseline", f"{who} is the baseline: gold {gold} {kl_phrase(row)}." if gold != "-" else f"{who} is the baseline."
    gain = gold_gain(row, base_row)
    if gain is None:
        gold = _cell(row, "gold_reward")
        return "unknown", f"{who}: gold {gold} {kl_phrase(row)}; no gold comparison with {base}."
    value, se, paired = gain
    how = "" if paired else " (difference of means, not paired)"
    se_text = f" ± {se:.3f}" if se is not None else ""
    if se is not None and value > 2 * se:
        return "beats", f"{who} beats {base} by {value:.3f}{se_text} gold {kl_phrase(row)}{how}."
    if se is not None and value < -2 * se:
        return "below", f"{who} is below {base} by {-value:.3f}{se_text} gold {kl_phrase(row)}{how}."
    why = "within 2 standard errors" if se is not None else "no standard error"
    return "tie", f"{who} does not beat {base}: {value:+.3f}{se_text} gold ({why}) {kl_phrase(row)}{how}."


# ------------------------------------------------------------------------------ reading run dirs


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file ([] when it is missing); blank lines skipped."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def stage_curve(metrics_path: Path) -> dict[str, list]:
    """A training stage's proxy and gold over steps from its metrics.jsonl.

    "train": (step, proxy, gold) of its own samples (PPO rollouts, RAFT iterations: report._proxy_gold_series);
    "eval": (step, proxy, proxy_se, gold, gold_se) of every held-out evaluation it logged (proxy NaN when it
    logs gold only)."""
    evals = []
    for r in read_jsonl(metrics_path):
        for proxy, gold in EVAL_KEYS:
            if _finite(r.get(gold)) and r.get("step") is not None:
                p = r.get(proxy) if _finite(r.get(proxy)) else math.nan
                evals.append((r["step"], p, _se(r, proxy), r[gold], _se(r, gold)))
                break
    return {"train": _proxy_gold_series(metrics_path), "eval": sorted(evals)}


def _se(row: dict, key: str) -> float:
    value = row.get(f"{key}_stderr")
    return value if _finite(value) else 0.0


def eval_run_curves(rows: list[dict]) -> dict[str, dict[str, list]]:
    """An eval run's metrics.jsonl (a row per model: step, label, gold_reward, proxy_reward...) as one curve per
    run label with >= 2 evaluated steps: every point is an evaluation point."""
    by_label: dict[str, list] = {}
    for r in rows:
        if r.get("step") is not None and (_finite(r.get("gold_reward")) or _finite(r.get("proxy_reward"))):
            p = r["proxy_reward"] if _finite(r.get("proxy_reward")) else math.nan
            g = r["gold_reward"] if _finite(r.get("gold_reward")) else math.nan
            by_label.setdefault(r.get("label") or r.get("model"), []).append(
                (r["step"], p, _se(r, "proxy_reward"), g, _se(r, "gold_reward")))
    return {label: {"train": [], "eval": sorted(pts)} for label, pts in by_label.items() if len({p[0] for p in pts}) >= 2}


def load_samples(samples_dir: Path, names: list[str], n_prompts: int = N_SAMPLE_PROMPTS) -> dict:
    """The first sampled response of each model to the first `n_prompts` held-out prompts.

    samples_dir holds eval's samples/<safe name>.jsonl (prompt-major, n_samples rows per prompt). Returns
    {"prompts": [prompt text], "responses": {name: [row or None per prompt]}}, models without a file left out.
    Prompts come from the first model's file; every model was sampled on the same prompts."""
    from alignkit.eval.plots import safe_name

    files = {n: read_jsonl(samples_dir / f"{safe_name(n)}.jsonl") for n in names}
    files = {n: rows for n, rows in files.items() if rows}
    prompts: list[str] = []
    for r in next(iter(files.values()), []):
        if r.get("prompt") not in prompts and len(prompts) < n_prompts:
            prompts.append(r.get("prompt"))
    responses = {}
    for name, rows in files.items():
        first: dict[str, dict] = {}
        for r in rows:
            first.setdefault(r.get("prompt"), r)
        responses[name] = [first.get(p) for p in prompts]
    return {"prompts": prompts, "responses": responses}


# ------------------------------------------------------------------------------ figures


def png_bytes(fig, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (laid out, then closed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def frontier_figure(methods: dict[str, dict]) -> bytes | None:
    """Gold against KL, one point per method (plots.draw_frontier: best-of-n's bound as a left-pointing marker
    labelled "upper bound"); the base model is left out (far off the scale, not an alignment method)."""
    import matplotlib.pyplot as plt

    from alignkit.eval.plots import draw_frontier

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if not draw_frontier(ax, {n: m for n, m in methods.items() if n != "base"}, "kl", "gold_reward"):
        plt.close(fig)
        return None
    return png_bytes(fig)


def curve_figure(title: str, curve: dict[str, list], alarms: list[dict]) -> bytes:
    """report.md's proxy-and-gold-over-training panel (plots.draw_proxy_gold: the run's own samples, every
    held-out evaluation with stderr bars), plus a red dashed line with the alarm's name at each alarm's step."""
    import matplotlib.pyplot as plt

    from alignkit.eval.plots import draw_proxy_gold

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    draw_proxy_gold(ax, curve, f"{title}: proxy and gold over training")
    for alarm in alarms:
        ax.axvline(alarm["step"], color=ALARM_COLOR, ls="--", lw=1.5)
        ax.text(alarm["step"], 0.98, f" {alarm.get('name')}", transform=ax.get_xaxis_transform(), color=ALARM_COLOR,
                fontsize="x-small", va="top", rotation=90)
    return png_bytes(fig)


def curve_figures(curves: dict[str, dict], alarms: list[dict]) -> list[dict]:
    """One figure per run with >= 2 points; each alarm with a step is drawn on the figure of its run (its
    "stage" when it fired while training, else its "model") and remembered in the figure's "alarms"."""
    figures = []
    for name, curve in curves.items():
        if len(curve["train"]) + len(curve["eval"]) < 2:
            continue
        marked = [a for a in alarms if (a.get("stage") or a.get("model")) == name and a.get("step") is not None]
        figures.append({"id": f"curve-{name}", "title": f"{display_name(name)}: proxy and gold over training",
                        "png": curve_figure(display_name(name), curve, marked), "alarms": marked,
                        "caption": "Squares: every held-out evaluation (± one standard error); dots: the run's own "
                                   "samples. Red dashed line: an alarm, at the step it fired."})
    return figures


# ------------------------------------------------------------------------------ HTML

CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;line-height:1.45;color:#1d1d1f;
max-width:1100px;margin:0 auto;padding:1rem 1.25rem 3rem;background:#fff}
h1{font-size:1.6rem;margin:.5rem 0}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd}
h3{font-size:1rem;margin:1.2rem 0 .3rem}
.meta{color:#555;font-size:.9rem}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;max-width:100%}
table{border-collapse:collapse;font-size:.88rem;margin:.4rem 0}
th,td{padding:.3rem .55rem;border-bottom:1px solid #e3e3e3;text-align:right;white-space:nowrap;vertical-align:top}
th{background:#f5f5f7;position:sticky;top:0}
th:first-child,td:first-child{text-align:left}
ul.verdicts{padding-left:1.2rem}ul.verdicts li{margin:.25rem 0}
.beats{color:#116329}.below{color:#a40e26}.tie,.unknown,.baseline{color:#444}
.alarm{border-left:4px solid #ff0000;background:#fff4f4;padding:.45rem .8rem;margin:.6rem 0}
.alarm .remedy,.alarm .where{margin-top:.25rem}.alarm .where{font-size:.85rem;color:#555}
figure{margin:1rem 0}figure img{max-width:100%;height:auto;display:block;border:1px solid #eee}
figcaption{font-size:.85rem;color:#555}
pre.prompt{white-space:pre-wrap;word-break:break-word;background:#f5f5f7;padding:.4rem .6rem;margin:.2rem 0;font-size:.85rem}
table.samples{width:100%}
table.samples td.response,table.samples th.response{text-align:left;white-space:pre-wrap;word-break:break-word;width:100%}
table.samples td.response{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.82rem}
table.samples tr.best td{background:#e7f5ea}
td.wrap{text-align:left;white-space:normal;min-width:16rem}
mark{background:#ffe58a;padding:0 .1em}
@media (max-width:640px){body{padding:.6rem .6rem 2rem;font-size:15px}h1{font-size:1.3rem}
th,td{padding:.25rem .35rem}
table.samples,table.samples tbody{display:block}table.samples thead{display:none}
table.samples tr{display:grid;grid-template-columns:1fr auto auto;column-gap:.6rem;border-bottom:1px solid #ddd}
table.samples td{border:0}table.samples td.response{grid-column:1/-1;width:auto;padding-top:0}
table.samples tr.best{background:#e7f5ea}
table.samples td[data-label]::before{content:attr(data-label) " ";color:#777;font-size:.8rem}}
"""


def diff_marked(text: str, reference: str | None) -> str:
    """`text` escaped, with the words that differ from `reference` wrapped in <mark> (none when no reference)."""
    if reference is None or text == reference:
        return esc(text)
    a, b = re.split(r"(\s+)", reference), re.split(r"(\s+)", text)
    parts = []
    for tag, _, _, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        chunk = "".join(b[j1:j2])
        if tag == "equal" or not chunk.strip():
            parts.append(esc(chunk))
        else:  # the mark covers the words, not the spaces around them
            core = chunk.strip()
            lead, trail = chunk[: len(chunk) - len(chunk.lstrip())], chunk[len(chunk.rstrip()):]
            parts.append(f"{esc(lead)}<mark>{esc(core)}</mark>{esc(trail)}")
    return "".join(parts)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if _finite(value) else "-"


def verdicts_html(report: dict) -> str:
    methods, baseline = report.get("methods") or {}, (report.get("eval") or {}).get("baseline")
    if not methods:
        return "<p>No evaluation in this run: no method was measured on held-out prompts.</p>"
    base_row = methods.get(baseline)
    items = [method_sentence(n, row, baseline, base_row) for n, row in methods.items()]
    return '<ul class="verdicts">' + "".join(f'<li class="{k}">{esc(s)}</li>' for k, s in items) + "</ul>"


def table_html(report: dict) -> str:
    """The results table: report.md's columns and cells ("mean ± stderr"; best-of-n's bound as a bound)."""
    methods = report.get("methods") or {}
    if not methods:
        return ""
    baseline = (report.get("eval") or {}).get("baseline")
    # report.md's names say "vs_sft" (the pipeline's baseline); an eval run may have another baseline
    columns = table_columns(methods)
    names = [k.replace("_vs_sft", f"_vs_{baseline}") if baseline else k for k in columns]
    head = "".join(f"<th>{esc(k)}</th>" for k in ["method", *names])
    rows = "".join(f"<tr><td>{esc(display_name(n))}</td>" + "".join(f"<td>{esc(_cell(row, k))}</td>" for k in columns)
                   + "</tr>" for n, row in methods.items())
    return f'<div class="scroll"><table class="results"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def alarms_html(alarms: list[dict], figures: list[dict]) -> str:
    if not alarms:
        return "<p>No alarm fired.</p>"
    out = []
    for a in alarms:
        where = next((f for f in figures if a in f.get("alarms", [])), None)
        when = "while training" if a.get("during") == "training" else "in eval"
        marked = (f'Marked on <a href="#{esc(where["id"])}">{esc(where["title"])}</a> at step {esc(a.get("step"))}.'
                  if where else "Not on a plot: no curve of this run.")
        out.append(f'<div class="alarm"><strong>{esc(a.get("name"))}</strong> ({esc(a.get("model"))} {when}, step '
                   f'{esc(a.get("step"))}): {esc(a.get("message"))}'
                   f'<div class="remedy"><strong>Remedy:</strong> {esc(a.get("remedy"))}</div>'
                   f'<div class="where">{marked}</div></div>')
    return "".join(out)


def figures_html(figures: list[dict]) -> str:
    if not figures:
        return "<p>No plot: nothing was measured at two or more points.</p>"
    out = []
    for f in figures:
        data = base64.b64encode(f["png"]).decode("ascii")
        out.append(f'<figure id="{esc(f["id"])}"><img alt="{esc(f["title"])}" src="data:image/png;base64,{data}">'
                   f'<figcaption><strong>{esc(f["title"])}</strong>. {esc(f.get("caption", ""))}</figcaption></figure>')
    return "".join(out)


def samples_html(samples: dict, baseline: str | None) -> str:
    """Per prompt: each model's response, gold and proxy; the best gold highlighted, words differing from the
    baseline's response marked."""
    prompts, responses = samples.get("prompts") or [], samples.get("responses") or {}
    if not prompts:
        return "<p>No samples saved (eval's save_samples was off, or no evaluation ran).</p>"
    order = sorted(responses, key=lambda n: n != baseline)
    out = [f'<p class="meta">The first sampled response of each model to the first {len(prompts)} held-out prompts. '
           f'Green row: the best gold on that prompt (none when all tie). <mark>Marked</mark>: words that differ from '
           f'{esc(display_name(baseline or order[0]))}\'s response.</p>']
    for i, prompt in enumerate(prompts):
        rows = {n: responses[n][i] for n in order if responses[n][i] is not None}
        golds = [r.get("gold_reward") for r in rows.values() if _finite(r.get("gold_reward"))]
        best = max(golds) if golds and max(golds) > min(golds) else None  # a tie everywhere has no best
        ref = rows.get(baseline, {}).get("text") if baseline in rows else None
        body = []
        for name, r in rows.items():
            cls = ' class="best"' if best is not None and r.get("gold_reward") == best else ""
            text = r.get("text") or ""
            shown = esc(text) if name == baseline else diff_marked(text, ref)
            body.append(f"<tr{cls}><td>{esc(display_name(name))}</td><td data-label=\"gold\">{_fmt(r.get('gold_reward'))}</td>"
                        f"<td data-label=\"proxy\">{_fmt(r.get('proxy_reward'))}</td><td class=\"response\">{shown}</td></tr>")
        out.append(f'<h3>Prompt {i + 1}</h3><pre class="prompt">{esc(prompt)}</pre><div class="scroll">'
                   f'<table class="samples"><thead><tr><th>model</th><th>gold</th><th>proxy</th><th class="response">response</th>'
                   f'</tr></thead><tbody>{"".join(body)}</tbody></table></div>')
    return "".join(out)


def stages_html(stages: dict) -> str:
    if not stages:
        return ""
    rows = []
    for stage, s in stages.items():
        keys = [k for k in s if k.startswith("eval_") and not k.endswith("_before") and _finite(s.get(k))][:4]
        results = "; ".join(f"{k}: {_fmt(s.get(k + '_before'))} → {_fmt(s[k])}" for k in keys)
        rows.append(f"<tr><td>{esc(stage)}</td><td>{_fmt(s.get('wall_s'))}</td><td>{_fmt(s.get('peak_rss_mb'))}</td>"
                    f'<td class="wrap">{esc(results)}</td></tr>')
    return ('<h2>Stages</h2><div class="scroll"><table><thead><tr><th>stage</th><th>wall_s</th><th>peak_rss_mb</th>'
            f'<th>key results (before → after)</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def render_html(report: dict, figures: list[dict], samples: dict, title: str = "alignkit pipeline report") -> str:
    """The whole page. report: report.json's shape ({"methods", "alarms", "eval", "stages", "notes", ...});
    figures: [{"id", "title", "png": bytes, "caption", "alarms": [alarms drawn on it]}]; samples: load_samples's
    shape. No script, no external resource."""
    ev = report.get("eval") or {}
    baseline = ev.get("baseline")
    meta = (f"Held-out prompts: {ev.get('n_prompts')}, {ev.get('n_samples')} samples each; task: {ev.get('task')}; "
            f"baseline (and KL reference): {display_name(baseline) if baseline else '-'}. ± is one standard error "
            f"(prompts are the units).") if ev else ""
    if any(_finite(row.get("kl_upper_bound")) for row in (report.get("methods") or {}).values()):
        meta += " Best-of-n's KL is estimated from its samples, beside its upper bound log n − (n−1)/n."
    notes = report.get("notes") or []
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>", f'<p class="meta">{esc(meta)}</p>',
        "<h2>What each method did</h2>", verdicts_html(report),
        "<h2>Results</h2>", table_html(report),
        f"<h2>Alarms</h2>{alarms_html(report.get('alarms') or [], figures)}",
        f"<h2>Plots</h2>{figures_html(figures)}",
        f"<h2>Samples side by side</h2>{samples_html(samples, baseline)}",
        stages_html(report.get("stages") or {}),
        f'<p class="meta">Notes: {esc("; ".join(notes))}</p>' if notes else "",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------ writing


def _png_file(path: Path, fig_id: str, title: str, caption: str) -> list[dict]:
    return [{"id": fig_id, "title": title, "png": path.read_bytes(), "caption": caption}] if path.exists() else []


def write_pipeline_html(out: Path, report: dict, done: dict[str, Path]) -> Path:
    """out/report.html for a pipeline run: curves from each stage's metrics.jsonl, samples from out/eval/samples/,
    plus plots/training_curves.png and plots/proxy_vs_gold.png when write_plots made them."""
    out = Path(out)
    figures = []
    frontier = frontier_figure(report.get("methods") or {})
    if frontier is not None:
        figures.append({"id": "frontier", "title": "Gold reward against KL", "png": frontier,
                        "caption": "One point per method (± one standard error). Best-of-n's ◀ marker is an UPPER "
                                   "BOUND on its KL (log n − (n−1)/n): its true KL is at or left of it; the dot "
                                   "joined to it is the estimate from its samples."})
    curves = {stage: stage_curve(d / "metrics.jsonl") for stage, d in done.items()}
    figures += curve_figures(curves, report.get("alarms") or [])
    figures += _png_file(out / "plots" / "proxy_vs_gold.png", "proxy-vs-gold", "Proxy against gold per method",
                         "A method high on proxy but not on gold is exploiting the reward model.")
    figures += _png_file(out / "plots" / "training_curves.png", "training-curves", "Training loss per stage", "")
    names = list(report.get("methods") or {})
    samples = load_samples(out / "eval" / "samples", names)
    path = out / "report.html"
    path.write_text(render_html(report, figures, samples), encoding="utf-8")
    return path


def eval_report(summary: dict) -> dict:
    """An eval run's summary.json in the report's shape (METHOD_KEYS's names), so one renderer serves both."""
    methods = {name: method_row(m) for name, m in summary.get("models", {}).items()}
    return {"methods": methods, "alarms": summary.get("alarms") or [],
            "eval": {k: summary.get(k) for k in ("n_prompts", "n_samples", "task", "baseline")}, "stages": {}, "notes": []}


def write_eval_html(out_dir: Path) -> Path:
    """out_dir/report.html for an `alignkit eval` run dir (summary.json, metrics.jsonl, samples/)."""
    out_dir = Path(out_dir)
    summary = json.loads((out_dir / "summary.json").read_text())
    report = eval_report(summary)
    figures = []
    frontier = frontier_figure(report["methods"])
    if frontier is not None:
        figures.append({"id": "frontier", "title": "Gold reward against KL", "png": frontier,
                        "caption": "One point per model (± one standard error), KL to the reference model."})
    figures += curve_figures(eval_run_curves(read_jsonl(out_dir / "metrics.jsonl")), report["alarms"])
    finals = [n for n in report["methods"] if "@" not in n]  # one response per run, not per checkpoint
    samples = load_samples(out_dir / "samples", finals)
    path = out_dir / "report.html"
    path.write_text(render_html(report, figures, samples, title="alignkit eval report"), encoding="utf-8")
    return path
