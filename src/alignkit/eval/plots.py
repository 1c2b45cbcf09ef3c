"""Presentation of evaluation results: PNG plots (matplotlib, Agg backend: no display needed) and the
terminal table.

- `plot_metrics_over_steps`: each metric against training step, one line per run, error bars from
  "<metric>_stderr" when present.
- `plot_frontier`: one point per method in the plane of two metrics (gold reward against KL), the
  picture of what each method bought and what it cost; a metric known only as an upper bound (best-of-n's
  KL) is drawn as one; point labels are staggered (`place_labels`) so none overlaps another.
- `draw_proxy_gold`: proxy and gold reward over training, the run's own (rollout) samples and its held-out
  evaluations as separately named series.
- `print_table`: one row per model, "mean ± stderr" cells (rich).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

SKIP_KEYS = {"step", "model"}

# Axis labels with units for the metrics the reports plot; other keys are shown as they are.
AXIS_LABELS = {
    "kl": "KL to {reference} (nats per response)",
    "gold_reward": "gold reward (0-1)",
    "proxy_reward": "proxy reward (RM score, logit)",
    "greedy_gold_reward": "greedy gold reward (0-1)",
    "length": "response length (tokens)",
    "heldout_ppl": "held-out perplexity",
}


def axis_label(key: str, reference: str = "the reference") -> str:
    return AXIS_LABELS.get(key, key).format(reference=reference)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def safe_name(text: str) -> str:
    """A file-name-safe version of a metric or model name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "metric"


def plottable_metrics(series: dict[str, list[dict]]) -> list[str]:
    """Numeric metrics (not stderrs) that some run logs at >= 2 distinct steps, in first-seen order."""
    seen: dict[str, None] = {}
    for points in series.values():
        for m in points:
            for key, value in m.items():
                if key not in SKIP_KEYS and not key.endswith("_stderr") and _finite(value):
                    seen.setdefault(key)
    return [k for k in seen if any(len(_curve(points, k)[0]) >= 2 for points in series.values())]


def _curve(points: Iterable[dict], key: str) -> tuple[list[float], list[float], list[float]]:
    """(steps, values, stderrs) of `key` over the points that have a step and a finite value."""
    rows = sorted((m["step"], m[key], m.get(f"{key}_stderr")) for m in points
                  if m.get("step") is not None and _finite(m.get(key)))
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] if _finite(r[2]) else 0.0 for r in rows]


def plot_metrics_over_steps(series: dict[str, list[dict]], out_dir: str | Path,
                            metrics: list[str] | None = None) -> list[Path]:
    """One PNG per metric (out_dir/<metric>.png): value against step, a line per run in `series`.

    series: run label -> list of metric dicts with "step". Runs with fewer than 2 steps of a metric are
    left out of its plot. Returns the written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key in metrics or plottable_metrics(series):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        drawn = 0
        for label, points in series.items():
            steps, values, errors = _curve(points, key)
            if len(steps) >= 2:
                ax.errorbar(steps, values, yerr=errors, marker="o", capsize=3, label=label)
                drawn += 1
        if drawn:
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(axis_label(key))
            ax.set_title(key)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
            fig.tight_layout()
            path = out / f"{safe_name(key)}.png"
            fig.savefig(path, dpi=100)
            written.append(path)
        plt.close(fig)
    return written


def plot_frontier(methods: dict[str, dict], path: str | Path, x: str = "kl", y: str = "gold_reward",
                  reference: str = "the reference") -> Path | None:
    """Scatter of methods in the (x, y) plane (draw_frontier) written to `path`; None when no method has a point."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if not draw_frontier(ax, methods, x, y, reference=reference):
        plt.close(fig)
        return None
    return save_figure(fig, path)


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Lay out, write (parents created) and close `fig`; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# Offsets (points) tried in turn for a point's label: right-above, right-below, left-above, left-below, then
# further up and down. A label takes the first that does not overlap a label already placed.
LABEL_OFFSETS = [(5, 4), (5, -12), (-5, 4), (-5, -12), (5, 14), (5, -22), (-5, 14), (-5, -22), (5, 24), (5, -32)]


def _overlaps(box: tuple, boxes: list[tuple]) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in boxes)


def place_labels(ax, points: list[tuple[str, float, float]], fontsize: float = 8.0) -> list[tuple[float, float]]:
    """Annotate each (text, x, y) beside its point at the first LABEL_OFFSETS offset whose text box (estimated
    from the character count; no solver, no extra dependency) overlaps no earlier label. Returns the offsets."""
    ax.autoscale_view()
    to_px = ax.figure.dpi / 72.0
    char_w, height = 0.6 * fontsize * to_px, 1.2 * fontsize * to_px
    boxes: list[tuple] = []
    chosen = []
    for text, x, y in points:
        px, py = ax.transData.transform((x, y))
        width = char_w * len(text)
        for dx, dy in LABEL_OFFSETS:
            left = px + dx * to_px if dx >= 0 else px + dx * to_px - width
            box = (left, py + dy * to_px, left + width, py + dy * to_px + height)
            if not _overlaps(box, boxes):
                break
        else:
            dx, dy = LABEL_OFFSETS[0]
        boxes.append(box)
        chosen.append((dx, dy))
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                    ha="left" if dx >= 0 else "right")
    return chosen


def draw_frontier(ax, methods: dict[str, dict], x: str = "kl", y: str = "gold_reward",
                  reference: str = "the reference") -> int:
    """Draw methods in the (x, y) plane on `ax`, with stderr bars ("<x>_stderr", "<y>_stderr"), labelled beside
    their points (staggered so no two labels overlap) and in a legend; axes named with their units.

    A method may know only an upper bound on x ("<x>_upper_bound", e.g. best-of-n's log n - (n-1)/n): it gets
    a left-pointing marker there, labelled "upper bound" (its true x is at or left of it), joined by a
    dotted line to its estimate when it has one. Methods missing y, or both x and its bound, are left out.
    Returns the number of methods drawn.
    """
    drawn, labels = 0, []
    for name, m in methods.items():
        value, bound = m.get(x), m.get(f"{x}_upper_bound")
        if not _finite(m.get(y)) or not (_finite(value) or _finite(bound)):
            continue
        yerr = m.get(f"{y}_stderr") if _finite(m.get(f"{y}_stderr")) else 0.0
        color = None
        if _finite(value):
            xerr = m.get(f"{x}_stderr") if _finite(m.get(f"{x}_stderr")) else 0.0
            color = ax.errorbar([value], [m[y]], xerr=[xerr], yerr=[yerr], marker="o", capsize=3,
                                label=name).lines[0].get_color()
        labels.append((name, value if _finite(value) else bound, m[y]))
        if _finite(bound):
            (mark,) = ax.plot([bound], [m[y]], marker="<", markersize=9, linestyle="none", color=color,
                              label=f"{name}: {x} upper bound")
            if _finite(value):
                ax.plot([value, bound], [m[y], m[y]], linestyle=":", color=mark.get_color())
            labels.append(("upper bound", bound, m[y]))
        drawn += 1
    if drawn:
        place_labels(ax, labels)
        ax.set_xlabel(axis_label(x, reference))
        ax.set_ylabel(axis_label(y, reference))
        ax.set_title(f"{y} against {x}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", loc="best")
    return drawn


def draw_proxy_gold(ax, curve: dict[str, list], title: str) -> None:
    """Proxy (left axis, orange) and gold (right axis, blue) reward against optimizer step on `ax`: lines with dots
    through the run's own samples ("rollout": PPO's rollouts, RAFT's iterations), squares with stderr bars at
    every held-out evaluation; one legend naming all four series.

    curve: {"train": [(step, proxy, gold)], "eval": [(step, proxy, proxy_se, gold, gold_se)]} (proxy NaN when the
    run logs gold only), as html_report.stage_curve reads it from a metrics.jsonl."""
    gold_ax = ax.twinx()
    train, evals = curve.get("train") or [], curve.get("eval") or []
    if train:
        steps = [p[0] for p in train]
        ax.plot(steps, [p[1] for p in train], marker=".", lw=1, color="tab:orange", label="proxy, rollout samples")
        gold_ax.plot(steps, [p[2] for p in train], marker=".", lw=1, color="tab:blue", label="gold, rollout samples")
    if evals:
        steps = [p[0] for p in evals]
        if any(_finite(p[1]) for p in evals):
            ax.errorbar(steps, [p[1] for p in evals], yerr=[p[2] for p in evals], marker="s", ls="--", capsize=3,
                        color="tab:orange", label="proxy, held-out eval")
        gold_ax.errorbar(steps, [p[3] for p in evals], yerr=[p[4] for p in evals], marker="s", ls="--", capsize=3,
                         color="tab:blue", label="gold, held-out eval")
    ax.set_xlabel("optimizer step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(axis_label("proxy_reward"), color="tab:orange")
    gold_ax.set_ylabel(axis_label("gold_reward"), color="tab:blue")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles = [h for a in (ax, gold_ax) for h in a.get_legend_handles_labels()[0]]
    if handles:
        ax.legend(handles=handles, fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)


def _cell(value: Any, stderr: Any) -> str:
    if not isinstance(value, (int, float)):
        return ""
    return f"{value:.3f}" + (f" ± {stderr:.3f}" if isinstance(stderr, float) and math.isfinite(stderr) else "")


def print_table(models: dict[str, dict]) -> None:
    """The main metrics of each model (name -> metrics) as a table on the terminal; absent columns are left out."""
    from rich.console import Console
    from rich.table import Table

    columns = [("gold_reward", "gold"), ("greedy_gold_reward", "greedy gold"), ("proxy_reward", "proxy"),
               ("kl", "KL"), ("win_rate_gold", "win (gold)"), ("win_rate_rm", "win (RM)"), ("length", "length"),
               ("eos_fraction", "EOS"), ("distinct_1", "dist-1"), ("distinct_2", "dist-2"), ("heldout_ppl", "ppl")]
    per_task = dict.fromkeys(k for m in models.values() for k in m if k.startswith("gold_reward/") and not k.endswith("_stderr"))
    columns[1:1] = [(k, f"gold {k.partition('/')[2]}") for k in per_task]  # prompts of several tasks: gold per task
    shown = [(k, h) for k, h in columns if any(k in m for m in models.values())]
    table = Table(title="alignkit eval")
    table.add_column("model")
    for _, header in shown:
        table.add_column(header, justify="right")
    for name, m in models.items():
        table.add_row(name, *(_cell(m.get(key), m.get(f"{key}_stderr")) for key, _ in shown))
    Console(width=200).print(table)


def plot_gold_vs_samples(runs: dict[str, list[dict]], path: str | Path, key: str = "eval_gold_reward",
                         reference: float | None = None) -> Path:
    """Held-out `key` (with "<key>_stderr" error bars) against the number of responses sampled so far, one line per
    run (e.g. per RL estimator), on one figure: learning measured in samples, not steps or seconds.

    runs: name -> metrics.jsonl rows; rows carrying `key` and "samples" are plotted. reference: a horizontal
    line (e.g. the target, or the SFT model's greedy gold)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in runs.items():
        points = sorted((r["samples"], r[key], r.get(f"{key}_stderr", 0.0)) for r in rows
                        if _finite(r.get(key)) and _finite(r.get("samples")))
        if points:
            xs, ys, es = zip(*points)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", label=f"target {reference:g}")
    ax.set_xlabel("samples drawn (responses)")
    ax.set_ylabel(f"held-out {key.removeprefix('eval_').replace('_', ' ')} (T=1, ± s.e.)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path, dpi=120)


def plot_rounds(arms: dict[str, list[dict]], path: str | Path) -> Path:
    """Iterative RLHF per round (rounds.jsonl lines of `alignkit iterate`), one colour per arm: held-out gold
    (with standard errors), the proxy of the reward model each round trained on, and the proxy of a fixed
    held-out reward model (Gao et al. 2022's over-optimisation picture: the proxy climbs, gold follows or not)."""
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(13.5, 4.0))
    for i, (arm, lines) in enumerate(arms.items()):
        colour = f"C{i}"
        rounds = [line["round"] for line in lines]
        gold = [line.get("gold_reward", math.nan) for line in lines]
        left.errorbar(rounds, gold, yerr=[line.get("gold_reward_stderr", 0.0) or 0.0 for line in lines], color=colour,
                      marker="o", capsize=3, label=arm)
        mid.plot(rounds, [line.get("proxy_current") if line.get("proxy_current") is not None else math.nan
                          for line in lines], color=colour, marker="s", label=arm)
        right.plot(rounds, [line.get("proxy_heldout") if line.get("proxy_heldout") is not None else math.nan
                            for line in lines], color=colour, marker="^", label=arm)
    left.set(title="held-out gold reward", xlabel="round", ylabel=AXIS_LABELS["gold_reward"])
    mid.set(title="proxy: the round's reward model", xlabel="round", ylabel=AXIS_LABELS["proxy_reward"])
    right.set(title="proxy: a fixed held-out reward model", xlabel="round", ylabel=AXIS_LABELS["proxy_reward"])
    for ax in (left, mid, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)
