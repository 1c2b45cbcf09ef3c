"""Evidence for `alignkit iterate` on the built-in task: arms with the same policy samples and the same label
budget, compared on held-out gold with PAIRED standard errors (the eval of every round samples the same prompts
with the same seed), plus the reward model's gold accuracy on each round's policy samples.

    python bench/iterate_arms.py --run                      # the four arms below, one after the other, then the table
    python bench/iterate_arms.py --arms frozen=/tmp/arms/frozen refresh=/tmp/arms/refresh   # the table only

Arms (configs/tiny/iterate.yaml; 4 rounds x 15 GRPO steps of 8 prompts x 8 samples at lr 0.05; 6144 labels in all
by the task's simulated labeler; the eval: 300 held-out prompts x 4 samples; the probe: 400 gold pairs of 200 prompts):
  frozen       rm_refresh=none: all 6144 labels on SFT samples up front, one reward model for every round
  refresh      2048 labels of SFT samples, then 1024 per round of the current policy's samples (random pairs of the
               3,072 candidates of 512 prompts x 4 samples), the reward model continued on all labels so far
  uncertainty  as refresh, the 1024 pairs those the current reward model's margin puts closest to 0
  retrain      as refresh, the reward model retrained from the SFT model each round
An earlier setting (2048 labels: 512 + 4 x 384, 256 prompts a round): bench/results/iterate_arms_2048_labels.md.
Writes <out>/arms.md, <out>/arms.json and <out>/rounds.png (gold and proxy per round, every arm).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

COMMON = ["--config", "configs/tiny/iterate.yaml", "rm_model=null", "rounds=4", "prompts_per_round=512",
          "prompts=task:sort/prompts?n=6000&seed=21", "policy_steps=15", "eval_prompts=task:sort/prompts_eval?n=300",
          "probe_prompts=task:sort/prompts?n=200&seed=77", "probe_pairs=400", 'overrides=["policy.lr=0.05"]']
ARMS = {
    "frozen": ["initial_label_budget=6144", "label_budget=0", "rm_refresh=none"],
    "refresh": ["initial_label_budget=2048", "label_budget=1024", "rm_refresh=continue", "select=random"],
    "uncertainty": ["initial_label_budget=2048", "label_budget=1024", "rm_refresh=continue", "select=uncertainty"],
    "retrain": ["initial_label_budget=2048", "label_budget=1024", "rm_refresh=retrain", "select=random"],
}


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def per_prompt_gold(eval_dir: Path, model: str) -> np.ndarray:
    """Gold reward of each eval sample, [prompts, samples] (the samples file is prompt-major)."""
    rows = read_lines(eval_dir / "samples" / f"{model}.jsonl")
    k = json.loads((eval_dir / "summary.json").read_text())["n_samples"]
    return np.array([r["gold_reward"] for r in rows]).reshape(-1, k)


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = a.mean(axis=1) - b.mean(axis=1)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def budget_to_reach(lines: list[dict], target: float) -> float | None:
    """Labels (total) at which rm_gold_accuracy first reaches target, linearly interpolated between rounds."""
    points = [(line["labels_total"], line.get("rm_gold_accuracy")) for line in lines if line.get("rm_gold_accuracy") is not None]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y0 >= target:
            return float(x0)
        if y1 >= target:
            return x0 + (target - y0) * (x1 - x0) / (y1 - y0)
    return float(points[0][0]) if points and points[0][1] >= target else None


def table(arms: dict[str, Path], out: Path) -> dict:
    from alignkit.eval.plots import plot_rounds

    lines = {name: read_lines(path / "rounds.jsonl") for name, path in arms.items()}
    rounds = min(len(v) for v in lines.values()) - 1
    result: dict = {"rounds": rounds, "arms": {}}
    md = ["| arm | round | labels | gold ± se | gain vs SFT ± paired se | KL to SFT | RM gold accuracy on the "
          "policy's samples ± se | proxy win rate - gold win rate |", "|---|---|---|---|---|---|---|---|"]
    for name, arm_lines in lines.items():
        for line in arm_lines[: rounds + 1]:
            eval_dir = arms[name] / f"round-{line['round']}" / "eval"
            gain = paired(per_prompt_gold(eval_dir, "policy"), per_prompt_gold(eval_dir, "sft")) if line["round"] else (0.0, 0.0)
            md.append(f"| {name} | {line['round']} | {line['labels_total']} | {line['gold_reward']:.3f} ± "
                      f"{line['gold_reward_stderr']:.3f} | {gain[0]:+.3f} ± {gain[1]:.3f} | {line.get('kl', 0):.2f} | "
                      f"{line.get('rm_gold_accuracy', math.nan):.3f} ± {line.get('rm_gold_accuracy_stderr', math.nan):.3f} | "
                      f"{line.get('proxy_gold_gap', math.nan):+.3f} |")
        result["arms"][name] = arm_lines[: rounds + 1]
    finals = {name: per_prompt_gold(path / f"round-{rounds}" / "eval", "policy") for name, path in arms.items()}
    md += ["", f"Final round ({rounds}), paired differences of held-out gold (same prompts, same sampling seed):", ""]
    names = list(arms)
    result["paired"] = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff, se = paired(finals[a], finals[b])
            result["paired"][f"{a} - {b}"] = (diff, se)
            md.append(f"- {a} - {b}: {diff:+.4f} ± {se:.4f} ({diff / se:+.1f} paired standard errors)")
    if "refresh" in lines and "uncertainty" in lines:
        target = lines["refresh"][rounds].get("rm_gold_accuracy")
        if target is not None:
            need = {n: budget_to_reach(lines[n][: rounds + 1], target) for n in ("refresh", "uncertainty")}
            result["labels_to_reach_random_final_accuracy"] = need
            md.append(f"- labels for the reward model to reach random selection's final gold accuracy ({target:.3f}): "
                      + ", ".join(f"{n} {v:.0f}" if v is not None else f"{n} not reached" for n, v in need.items()))
    (out / "arms.md").write_text("\n".join(md) + "\n")
    (out / "arms.json").write_text(json.dumps(result, indent=1))
    plot_rounds({name: v[: rounds + 1] for name, v in lines.items()}, out / "rounds.png")
    print("\n".join(md))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run the arms (skipped where rounds.jsonl is complete)")
    parser.add_argument("--out", default="/tmp/iterate_arms")
    parser.add_argument("--sft", default="runs/tiny-pipeline/sft/final")
    parser.add_argument("--only", nargs="*", default=list(ARMS), help="which arms to run")
    parser.add_argument("--arms", nargs="*", default=None, help="name=dir pairs to tabulate instead")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.arms:
        arms = {a.split("=", 1)[0]: Path(a.split("=", 1)[1]) for a in args.arms}
    else:
        arms = {name: out / name for name in args.only}
    if args.run:
        for name, path in arms.items():
            cmd = [sys.executable, "-m", "alignkit", "iterate", *COMMON, *ARMS[name], f"sft_model={args.sft}",
                   f"output_dir={path}"]
            print(" ".join(cmd), flush=True)
            with open(out / f"{name}.log", "a") as log:
                subprocess.run(cmd, check=True, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    table(arms, out)


if __name__ == "__main__":
    main()
