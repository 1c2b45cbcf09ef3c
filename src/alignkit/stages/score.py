"""`alignkit score --model RM --data FILE --out FILE`: add reward-model scores to records.

Every record keeps its original fields and gains rewards: a preference pair "chosen_reward" and
"rejected_reward", a ranked list "rewards" (one per response), a prompt/completion or chat record
"reward" (of its last assistant turn, given the turns before it). Output is JSONL, in input order.
Texts are re-tokenized with the RM's own tokenizer (alignkit.models.reward), so any policy's
responses can be scored. Prints one summary line: count, mean reward, and for pairs the accuracy
(how often chosen outscores rejected).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from alignkit.data.records import DataError, detect_kind, normalize_record

SCORABLE = ("preference", "ranked", "sft")


def read_raw(source: str) -> list[tuple[str, dict]]:
    """(location, raw record) for each record of a file, dataset or task:<...> spec."""
    if source.startswith("task:"):
        from alignkit.data.tasks import load_task_records

        records, _ = load_task_records(source)
        return [(f"{source}#{i}", r) for i, r in enumerate(records, start=1)]
    from alignkit.data.records import _read_source  # the same readers (and errors) as training data

    rows = _read_source(source)
    if not rows:
        raise DataError(f"{source}: no records (empty file or dataset)")
    return rows


def scoring_items(kind: str, record: dict) -> list[tuple[list[dict], str]]:
    """(prompt messages, response) to score for one normalized record, in output order."""
    if kind == "preference":
        return [(record["prompt"], record["chosen"]), (record["prompt"], record["rejected"])]
    if kind == "ranked":
        return [(record["prompt"], r) for r in record["responses"]]
    messages = record["messages"]
    return [(messages[:-1], messages[-1]["content"])]


def attach(kind: str, raw: dict, rewards: list[float]) -> dict:
    out = dict(raw)
    if kind == "preference":
        out["chosen_reward"], out["rejected_reward"] = rewards
    elif kind == "ranked":
        out["rewards"] = rewards
    else:
        out["reward"] = rewards[0]
    return out


def summary_line(kind: str, scored: list[dict], n_truncated: int) -> str:
    if kind == "preference":
        values = [r[k] for r in scored for k in ("chosen_reward", "rejected_reward")]
        wins = sum(r["chosen_reward"] > r["rejected_reward"] for r in scored)
        extra = f"; accuracy (chosen > rejected) {wins / len(scored):.4f}"
    elif kind == "ranked":
        values = [v for r in scored for v in r["rewards"]]
        extra = ""
    else:
        values = [r["reward"] for r in scored]
        extra = ""
    cut = f"; {n_truncated} inputs longer than max_length (start of prompt cut)" if n_truncated else ""
    return f"scored {len(scored)} {kind} records ({len(values)} responses): mean reward {sum(values) / len(values):.4f}{extra}{cut}"


def _check_kinds(rows: list[tuple[str, dict]]) -> str:
    """The one kind of all records (each checked), which must carry responses to score."""
    kinds = [detect_kind(raw) if isinstance(raw, dict) else None for _, raw in rows]
    if kinds[0] not in SCORABLE:
        raise DataError(f"record at {rows[0][0]}: score needs responses to score (preference, ranked, or "
                        f"prompt/completion records); got kind {kinds[0]}")
    for (loc, _), kind in zip(rows, kinds):
        if kind != kinds[0]:
            raise DataError(f"record at {loc} is of kind {kind}, but the first record is {kinds[0]}")
    return kinds[0]


def score_records(model, tokenizer, source: str, batch_size: int, max_length: int) -> tuple[str, list[dict], int]:
    """(kind, raw records with rewards attached, number of inputs whose prompt start was cut)."""
    from alignkit.models.reward import reward_example, score_examples

    rows = read_raw(source)
    kind = _check_kinds(rows)
    items = [scoring_items(kind, normalize_record(raw, kind, loc)) for loc, raw in rows]
    examples = [reward_example(tokenizer, p, r, max_length, keep_cut_response=True) for its in items for p, r in its]
    rewards = score_examples(model, examples, batch_size, max_length)
    scored, start = [], 0
    for (_, raw), its in zip(rows, items):
        scored.append(attach(kind, raw, rewards[start : start + len(its)]))
        start += len(its)
    return kind, scored, sum(e["truncated"] for e in examples)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="alignkit score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="reward model directory (an `alignkit rm` run's final/)")
    parser.add_argument("--data", required=True, help="records: file, dataset name or task:<name>/<part> spec")
    parser.add_argument("--out", required=True, help="output JSONL path (original fields + rewards)")
    parser.add_argument("--batch-size", type=int, default=32, help="responses per packed forward (default 32)")
    parser.add_argument("--max-length", type=int, default=1024, help="token cap per input; longer ones lose the prompt's start")
    args = parser.parse_args(argv)

    import torch

    from alignkit.models.reward import load_reward_model

    model, tokenizer = load_reward_model(args.model)  # refuses a model that is not a trained reward model
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    kind, scored, truncated = score_records(model, tokenizer, args.data, args.batch_size, args.max_length)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        for record in scored:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(summary_line(kind, scored, truncated), file=sys.stdout, flush=True)
    return 0
