"""`alignkit pretrain`: next-token prediction on a corpus of documents.

config -> data (documents -> one token stream -> rows of max_length, document-isolated) -> model
(from a hub/local path, the SmolLM2 GGUF, or a from-scratch Llama whose BPE tokenizer is trained on this
corpus) -> the shared LM loop -> `final/` + `summary.json`.
"""

from __future__ import annotations

import time

from alignkit.config import PretrainConfig
from alignkit.data.chat import document_separator_id, tokenize_text
from alignkit.data.packing import chunk_stream
from alignkit.runtime.lm import train_lm
from alignkit.runtime.train_loop import save_final
from alignkit.runtime.stage import finish_run, load_policy, load_train_eval, start_run


def token_rows(tokenizer, records: list[dict], max_length: int) -> list[dict]:
    """Documents -> one stream (each ends with a separator) -> rows; positions restart per document."""
    stream: list[int] = []
    for record in records:
        stream.extend(tokenize_text(tokenizer, record["text"]))
    return chunk_stream(stream, max_length, document_separator_id(tokenizer))


def run(cfg: PretrainConfig) -> dict:
    started = time.time()
    accelerator = start_run(cfg)

    train_records, eval_records, invalid = load_train_eval(cfg, kind="text")
    model, tokenizer = load_policy(accelerator, cfg, train_records)
    train_rows = token_rows(tokenizer, train_records, cfg.max_length)
    eval_rows = token_rows(tokenizer, eval_records, cfg.max_length)

    eval_sets = {name: token_rows(tokenizer, part, cfg.max_length)
                 for name, part in getattr(eval_records, "sets", {}).items()}  # each reported as eval_loss/<name>
    model, summary = train_lm(cfg, accelerator, model, tokenizer.pad_token_id, train_rows, eval_rows,
                              packed=True, stage="pretrain", eval_sets=eval_sets)
    save_final(accelerator, model, tokenizer, cfg.output_dir)
    summary.update(n_train_records=len(train_records), n_eval_records=len(eval_records), invalid_records=len(invalid))
    return finish_run(accelerator, cfg, summary, started)
