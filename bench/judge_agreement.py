"""How often an LLM judge (alignkit label annotator=judge, models/judge.py) agrees with the human or gold label.

    # SmolLM2-135M-Instruct as judge on the shared HH-RLHF harmless dev pairs, against the human labels
    python bench/judge_agreement.py hh --judge smollm2-135m-instruct --pairs 300
    # the built-in task: train a judge (scratch:small, SFT on judge prompts answered by gold), then measure it
    # on gold-labelled pairs of a policy's own samples (an `alignkit iterate` probe, or `alignkit label
    # annotator=gold label_budget=N`)
    python bench/judge_agreement.py train-task-judge --out /tmp/judge
    python bench/judge_agreement.py task --judge /tmp/judge/sft/final --data PAIRS.jsonl

Each pair is judged in both orders (position swap); a pair whose two orders disagree is a tie. Reported:
agreement with the label over all pairs (a tie counts 1/2), over decided pairs only, by the mean of the two
orders' probabilities alone (agreement_soft: is there a signal under the position bias?), the tie rate, and how
often the judge picks the first position, each with its standard error over pairs. Judgements are cached in
--out/judge_cache.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))
from bench.common import mean_stderr  # noqa: E402

HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl.gz"


def agreement(judge_model: str, pairs: list[dict], batch_size: int, max_length: int, template: str | None = None,
              cache: Path | None = None) -> dict:
    """Judge each (prompt, chosen, rejected) in both orders; agreement with `chosen` being the better one."""
    import torch

    from alignkit.config import JUDGE_TEMPLATE
    from alignkit.models.judge import PairJudge
    from alignkit.models.loading import load_causal_lm

    torch.set_grad_enabled(False)
    model, tokenizer = load_causal_lm(judge_model)
    judge = PairJudge(model, tokenizer, template or JUDGE_TEMPLATE, ["A", "B"], batch_size, max_length, cache,
                      name=judge_model)
    prompts = [p["prompt"] for p in pairs]
    chosen, rejected = [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
    p_first_cr = judge.first_probabilities(prompts, chosen, rejected)
    p_first_rc = judge.first_probabilities(prompts, rejected, chosen)
    from alignkit.selection import position_swapped_preference

    prob_chosen, tie = position_swapped_preference(p_first_cr, p_first_rc)
    scored = [0.5 if t else float(p > 0.5) for p, t in zip(prob_chosen.tolist(), tie.tolist())]
    decided = [float(p > 0.5) for p, t in zip(prob_chosen.tolist(), tie.tolist()) if not t]
    first = [float(a > 0.5) for a in p_first_cr.tolist()] + [float(b > 0.5) for b in p_first_rc.tolist()]
    out = {"judge": judge_model, "pairs": len(pairs)}
    soft = [float(p > 0.5) + 0.5 * float(p == 0.5) for p in prob_chosen.tolist()]  # the mean of both orders alone
    for key, values in (("agreement", scored), ("agreement_soft", soft), ("agreement_decided", decided), ("tie_rate", [float(t) for t in tie.tolist()]),
                        ("first_position_rate", first)):
        out[key], out[f"{key}_stderr"] = mean_stderr(values)
    out["decided_pairs"] = len(decided)
    return out


def hh_pairs(n: int, seed: int) -> list[dict]:
    from alignkit.data.records import load_records

    records = load_records(str(HH), "preference", errors=[])[0]
    random.Random(seed).shuffle(records)
    return records[:n]


def train_task_judge(out: Path, n: int, steps: int, base: str = "scratch:small") -> Path:
    """SFT of `base` (scratch:small, or a model that already knows the task) on judge prompts of the sort
    task's preference pairs, answered by gold ("A"/"B")."""
    from alignkit.config import JUDGE_TEMPLATE
    from alignkit.data.records import load_records
    from alignkit.models.judge import prompt_text

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = []
    for p in load_records(f"task:sort/prefs?n={n}&seed=31", "preference")[0]:
        if p["meta"]["gold_chosen"] == p["meta"]["gold_rejected"]:
            continue
        swap = rng.random() < 0.5
        first, second = (p["rejected"], p["chosen"]) if swap else (p["chosen"], p["rejected"])
        message = JUDGE_TEMPLATE.format(prompt=prompt_text(p["prompt"]), first=first, second=second)
        rows.append({"messages": [{"role": "user", "content": message},
                                  {"role": "assistant", "content": "B" if swap else "A"}]})
    data = out / "judge_sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "alignkit", "sft", f"model={base}", f"train_data={data}", "eval_data=0.05",
           f"output_dir={out / 'sft'}", "max_length=192", "packing=true", "batch_size=16", "micro_batch_size=16",
           "lr=2e-3", "warmup_steps=20", f"max_steps={steps}", "log_steps=20", "save_steps=0", "resume=true",
           *(["vocab_size=512"] if base.startswith("scratch:") else [])]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return out / "sft" / "final"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["hh", "task", "train-task-judge"])
    parser.add_argument("--judge", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--data", default=None, help="task mode: a pairs file with meta.gold_chosen/gold_rejected")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", default="/tmp/judge")
    parser.add_argument("--train-pairs", type=int, default=6000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default="scratch:small", help="train-task-judge: the model the judge starts from")
    args = parser.parse_args()
    if args.mode == "train-task-judge":
        print(train_task_judge(Path(args.out), args.train_pairs, args.steps, args.base))
        return
    if args.mode == "hh":
        if not HH.exists():
            sys.exit(f"{HH} is absent (../shared/data beside the checkout)")
        pairs = hh_pairs(args.pairs, args.seed)
    else:
        from alignkit.data.records import load_records

        pairs = [p for p in load_records(args.data, "preference")[0]
                 if p["meta"]["gold_chosen"] != p["meta"]["gold_rejected"]][: args.pairs]
        for p in pairs:  # the better one by GOLD is "chosen", whoever labelled the file
            if p["meta"]["gold_chosen"] < p["meta"]["gold_rejected"]:
                p["chosen"], p["rejected"] = p["rejected"], p["chosen"]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result = agreement(args.judge, pairs, args.batch_size, args.max_length, cache=Path(args.out) / "judge_cache.jsonl")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
