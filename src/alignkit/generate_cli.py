"""`alignkit generate MODEL --data PROMPTS --out FILE`: sample responses to every prompt of a prompts file.

PROMPTS is anything `load_records(..., kind="prompts")` reads: a JSONL/JSON/parquet file of `prompt`
(str or messages) or `messages` records, a dataset, or a `task:<name>/<part>` spec; sft, preference and
ranked records give their prompts. MODEL is what `alignkit chat` takes (a run's final/, a run directory,
a HF directory or hub id, smollm2-135m-instruct).

Output: JSONL, one row per (prompt, sample), prompt by prompt, samples in order:
    {"prompt": [messages], "response": str, "index": i, "sample": j, "finished": bool,
     "sampling": {"model", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "n", "batch_size"},
     "meta": {...}  (only when the prompt record has one)}
`finished` is false when the reply was cut by --max-new-tokens. Every row carries its `sampling`, so rows
keep their settings when files are concatenated or filtered. A row is also an sft record (prompt +
response), so `alignkit score --data FILE` scores it as it stands.

Sampling goes through alignkit.rollout.sampling.generate in batches of about --batch-size sequences (prompts x n);
batch c is seeded from (--seed, c) as in the stages (alignkit.rollout.sampling.chunk_seed), so the same seed and
batch size give the same file.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from alignkit.chat_cli import add_sampling_args, load_for_generation, sampling_settings


class _WithTopK:
    """`model` whose generate() also keeps only the top_k most likely tokens.

    alignkit.rollout.sampling.generate builds its whole GenerationConfig from its own arguments, which have no
    top_k (sampling_config sets top_k=0); this adds the one knob without copying its batching loop.
    Everything else (parameters, eval/train, modules) is the wrapped model's.
    """

    def __init__(self, model, top_k: int):
        self._model, self._top_k = model, top_k

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def generate(self, *args, generation_config, **kwargs):
        config = copy.deepcopy(generation_config)
        config.top_k = self._top_k
        return self._model.generate(*args, generation_config=config, **kwargs)


def read_prompts(source: str) -> list[dict]:
    """Normalized prompts records ({"prompt": messages, optional "meta"}) of a file, dataset or task spec."""
    from alignkit.data.records import load_records

    records, _ = load_records(source, kind="prompts")
    return records


def sample_rows(model, tokenizer, records: list[dict], settings: dict, n: int, batch_size: int, progress) -> list[dict]:
    """n responses per record as output rows (without `sampling`); progress(k) is told each batch's k prompts."""
    from alignkit.rollout.sampling import TRAIN_SPLIT, chunk_seed, generate

    if settings["temperature"] > 0 and settings["top_k"] > 0:
        model = _WithTopK(model, settings["top_k"])
    per_batch = max(1, batch_size // n)  # prompts per generate call, so a call holds about batch_size sequences
    seed = settings["seed"]
    rows = []
    for c, start in enumerate(range(0, len(records), per_batch)):
        part = records[start : start + per_batch]
        gens = generate(
            model, tokenizer, [r["prompt"] for r in part], n=n, do_sample=settings["temperature"] > 0,
            temperature=max(settings["temperature"], 1e-6), top_p=settings["top_p"],
            max_new_tokens=settings["max_new_tokens"], batch_size=len(part) * n,
            seed=None if seed is None else chunk_seed(seed, TRAIN_SPLIT, c),
        )
        for i, (record, samples) in enumerate(zip(part, gens), start=start):
            for j, g in enumerate(samples):
                row = {"prompt": record["prompt"], "response": g.text, "index": i, "sample": j, "finished": g.finished}
                if record.get("meta"):
                    row["meta"] = record["meta"]
                rows.append(row)
        progress(len(part))
    return rows


def _progress_bar(total: int):
    """(advance(k), close()) of a rich bar on stderr; rich prints it once at the end when not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]generate[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
                   TimeRemainingColumn(), console=Console(stderr=True))
    task = bar.add_task("generate", total=total)
    bar.start()
    return (lambda k: bar.advance(task, k)), bar.stop


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="alignkit generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a run's final/, a run directory, a HF directory or hub id, or smollm2-135m-instruct")
    parser.add_argument("--data", required=True, help="prompts: file, dataset name or task:<name>/<part> spec")
    parser.add_argument("--out", required=True, help="output JSONL: one row per (prompt, sample)")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt (default 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences (prompts x n) per generate call (default 32)")
    add_sampling_args(parser, max_new_tokens=128, seed=0)
    args = parser.parse_args(argv)
    settings = sampling_settings(args)
    if args.n < 1 or args.batch_size < 1:
        parser.error("--n and --batch-size must be >= 1")

    if Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a directory; give the JSONL file to write")
    records = read_prompts(args.data)  # before the model: a bad data file fails fast
    model, tokenizer = load_for_generation(args.model)
    advance, close = _progress_bar(len(records))
    try:
        rows = sample_rows(model, tokenizer, records, settings, args.n, args.batch_size, advance)
    finally:
        close()
    sampling = {"model": args.model, **settings, "n": args.n, "batch_size": args.batch_size}
    write_rows(Path(args.out), [{**row, "sampling": sampling} for row in rows])
    finished = sum(r["finished"] for r in rows)
    print(f"wrote {len(rows)} responses ({len(records)} prompts x {args.n}) to {args.out}; "
          f"{len(rows) - finished} cut at --max-new-tokens", flush=True)
    return 0
