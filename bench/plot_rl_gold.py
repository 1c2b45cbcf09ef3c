"""Held-out gold against samples drawn, every RL estimator on one figure.

    python bench/plot_rl_gold.py runs/rl-gold/ppo runs/rl-gold/grpo runs/rl-gold/rloo --out docs/rl-gold.png

Each argument is a `alignkit ppo` run directory (its metrics.jsonl logs eval_gold_reward with `samples`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from alignkit.eval.plots import plot_gold_vs_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/rl-gold.png"))
    parser.add_argument("--target", type=float, default=0.8)
    args = parser.parse_args()
    runs = {run.name: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
            for run in args.runs}
    print(plot_gold_vs_samples(runs, args.out, reference=args.target))


if __name__ == "__main__":
    main()
