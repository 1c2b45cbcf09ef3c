"""`alignkit sft`: supervised fine-tuning with the loss on assistant tokens only.

config -> records (prompt/completion or chat; every assistant turn supervised, with the end-of-turn
token) -> token rows (packed several per row by default, each sample isolated by position-id resets, as
Llama 2 put several sessions in one sequence) -> the shared LM loop -> `final/` + `summary.json`.

Records whose supervised tokens are all truncated away by max_length are dropped and counted; if
nothing is left the run fails with a message saying so.
"""

from __future__ import annotations

import time

from alignkit.config import SFTConfig
from alignkit.data.chat import tokenize_conversation
from alignkit.data.packing import pack_examples
from alignkit.data.records import DataError
from alignkit.runtime.lm import train_lm
from alignkit.runtime.train_loop import save_final
from alignkit.runtime.stage import finish_run, load_policy, load_train_eval, start_run


def token_rows(tokenizer, records: list[dict], max_length: int, packing: bool) -> tuple[list[dict], int]:
    """(rows, number of records dropped because no supervised token survived truncation)."""
    examples = [tokenize_conversation(tokenizer, r["messages"], max_length) for r in records]
    kept = [e for e in examples if e is not None]
    dropped = len(examples) - len(kept)
    return (pack_examples(kept, max_length) if packing else kept), dropped


def run(cfg: SFTConfig) -> dict:
    started = time.time()
    accelerator = start_run(cfg)

    train_records, eval_records, invalid = load_train_eval(cfg, kind="sft")
    model, tokenizer = load_policy(accelerator, cfg, train_records)
    train_rows, dropped = token_rows(tokenizer, train_records, cfg.max_length, cfg.packing)
    if not train_rows:
        raise DataError(
            f"all {len(train_records)} training records lost every supervised token to truncation at "
            f"max_length={cfg.max_length}; raise max_length or shorten the prompts"
        )
    eval_rows, eval_dropped = token_rows(tokenizer, eval_records, cfg.max_length, cfg.packing)

    # several held-out sets (eval_data as a list, or a weighted train_data split by a fraction): each is also
    # reported on its own as eval_loss/<name>, so forgetting one domain shows
    eval_sets = {name: token_rows(tokenizer, part, cfg.max_length, cfg.packing)[0]
                 for name, part in getattr(eval_records, "sets", {}).items()}
    model, summary = train_lm(cfg, accelerator, model, tokenizer.pad_token_id, train_rows, eval_rows,
                              packed=cfg.packing, stage="sft", eval_sets=eval_sets)
    save_final(accelerator, model, tokenizer, cfg.output_dir)
    summary.update(
        n_train_records=len(train_records),
        n_eval_records=len(eval_records),
        invalid_records=len(invalid),
        dropped_records=dropped,
        dropped_eval_records=eval_dropped,
    )
    return finish_run(accelerator, cfg, summary, started)
