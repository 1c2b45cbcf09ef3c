"""`alignkit data check`: what a stage would see in a data source, before training on it.

For each record the full sample is tokenized exactly as the stages do (chat template, loss mask)
without truncation, then again at `max_length`. The report holds the record count and kind,
invalid records (skipped, with their messages), token-length percentiles, how many records
`max_length` truncates, how many lose every supervised token (the stages drop those), and one
rendered example with the trained tokens wrapped in [[...]].

Per kind, a record's length and losses are those of:
- text: the document plus its separator (token counts only: pretraining chunks the stream);
- sft: the conversation;
- preference: its longer side (prompt + chosen, prompt + rejected); it loses all supervised
  tokens when either side does, because a pair needs both;
- ranked: its longest prompt + response; lost when any response loses every token;
- prompts: the rendered prompt with the generation prompt; "lost" means it fills max_length
  and leaves no room to generate a response.
Percentiles are nearest-rank: the smallest length with at least p% of records at or below it.
"""

from __future__ import annotations

import math
from typing import Any

from alignkit.data.chat import (
    IGNORE_INDEX,
    render_prompt,
    tokenize_conversation,
    tokenize_prompt_completion,
    tokenize_text,
)
from alignkit.data.records import DataError, load_records

_UNLIMITED = 10**9
_MAX_INVALID_SHOWN = 5


def _percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _sequences(tokenizer: Any, record: dict, kind: str, max_length: int) -> list[tuple]:
    """[(full example | None, truncated example | None)] for each sequence the record trains."""
    if kind == "sft":
        messages = record["messages"]
        full = tokenize_conversation(tokenizer, messages, _UNLIMITED)
        return [(full, tokenize_conversation(tokenizer, messages, max_length))]
    replies = record["responses"] if kind == "ranked" else [record["chosen"], record["rejected"]]
    return [
        (
            tokenize_prompt_completion(tokenizer, record["prompt"], reply, _UNLIMITED),
            tokenize_prompt_completion(tokenizer, record["prompt"], reply, max_length),
        )
        for reply in replies
    ]


def _measure(tokenizer: Any, record: dict, kind: str, max_length: int) -> tuple[int, bool, bool]:
    """(full length, truncated by max_length, lost every supervised token) of one record."""
    if kind == "text":
        return len(tokenize_text(tokenizer, record["text"])), False, False
    if kind == "prompts":
        text = render_prompt(tokenizer, record["prompt"])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return len(ids), len(ids) > max_length, len(ids) >= max_length
    sequences = _sequences(tokenizer, record, kind, max_length)
    lengths = [len(full["input_ids"]) if full else 0 for full, _ in sequences]
    lost = any(cut is None for _, cut in sequences)
    return max(lengths), max(lengths) > max_length, lost


def mark_supervised(tokenizer: Any, example: dict) -> str:
    """Decoded example with each run of trained tokens (label != -100) wrapped in [[...]]."""
    pieces, run, run_trained = [], [], None
    for token, label in zip(example["input_ids"], example["labels"]):
        trained = label != IGNORE_INDEX
        if run and trained != run_trained:
            pieces.append(_decode_run(tokenizer, run, run_trained))
            run = []
        run.append(token)
        run_trained = trained
    if run:
        pieces.append(_decode_run(tokenizer, run, run_trained))
    return "".join(pieces)


def _decode_run(tokenizer: Any, ids: list[int], trained: bool) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return f"[[{text}]]" if trained else text


def _example(tokenizer: Any, record: dict, kind: str, max_length: int) -> str:
    """One record rendered as a stage trains on it (at max_length)."""
    if kind == "text":
        return tokenizer.decode(tokenize_text(tokenizer, record["text"])[:max_length])
    if kind == "prompts":
        return render_prompt(tokenizer, record["prompt"])
    if kind == "sft":
        example = tokenize_conversation(tokenizer, record["messages"], max_length)
        full = tokenize_conversation(tokenizer, record["messages"], _UNLIMITED)
    else:
        reply = record["responses"][0] if kind == "ranked" else record["chosen"]
        example = tokenize_prompt_completion(tokenizer, record["prompt"], reply, max_length)
        full = tokenize_prompt_completion(tokenizer, record["prompt"], reply, _UNLIMITED)
    if example is not None:
        return mark_supervised(tokenizer, example)
    kept = tokenizer.decode(full["input_ids"][:max_length], skip_special_tokens=False)
    return f"{kept}\n(no supervised token left within max_length={max_length})"


def load_for_check(source: str, kind: str | None) -> tuple[list[dict], str, list[str]]:
    """(valid records, kind, messages of the invalid ones): bad records are counted, not fatal; a source with
    no valid record at all is one DataError that also quotes the first bad record's file:line message."""
    errors: list[str] = []
    try:
        records, kind = load_records(source, kind, errors=errors)
    except DataError as err:
        if errors:
            raise DataError(f"{err}; first: {errors[0]}") from None
        raise
    return records, kind, errors


def run_data_check(source: str, kind: str | None, tokenizer: Any, max_length: int) -> dict:
    """Load `source` as a stage would and measure it with `tokenizer` at `max_length`."""
    records, kind, errors = load_for_check(source, kind)
    measured = [_measure(tokenizer, record, kind, max_length) for record in records]
    lengths = sorted(length for length, _, _ in measured)
    report: dict[str, Any] = {
        "source": source,
        "kind": kind,
        "max_length": max_length,
        "n_records": len(records),
        "n_invalid": len(errors),
        "invalid_examples": errors[:_MAX_INVALID_SHOWN],
        "tokens": {
            "total": sum(lengths),
            "p50": _percentile(lengths, 50),
            "p90": _percentile(lengths, 90),
            "p99": _percentile(lengths, 99),
            "max": lengths[-1],
        },
    }
    if kind != "text":
        report["n_truncated"] = sum(truncated for _, truncated, _ in measured)
        report["n_no_supervised"] = sum(lost for _, _, lost in measured)
    kept = [r for r, (_, _, lost) in zip(records, measured) if not lost] or records
    report["example"] = _example(tokenizer, kept[0], kind, max_length)
    return report


def format_data_check(report: dict) -> str:
    """The report as text for a terminal."""
    tokens = report["tokens"]
    lines = [
        f"source:      {report['source']}",
        f"kind:        {report['kind']}",
        f"records:     {report['n_records']} valid, {report['n_invalid']} invalid (skipped)",
    ]
    lines += [f"  invalid:   {message}" for message in report["invalid_examples"]]
    lines.append(
        f"tokens:      p50 {tokens['p50']}  p90 {tokens['p90']}  p99 {tokens['p99']}  "
        f"max {tokens['max']}  total {tokens['total']}"
    )
    if "n_truncated" in report:
        n = max(report["n_records"], 1)
        if report["kind"] == "prompts":
            lost_meaning = "no room left to generate"
        else:
            lost_meaning = "lose every supervised token (dropped)"
        truncated, lost = report["n_truncated"], report["n_no_supervised"]
        lines += [
            f"max_length:  {report['max_length']}",
            f"truncated:   {truncated} ({100 * truncated / n:.1f}%)",
            f"{lost_meaning}: {lost} ({100 * lost / n:.1f}%)",
        ]
    trains = report["kind"] in ("sft", "preference", "ranked")
    marks = " (trained tokens in [[...]])" if trains else ""
    lines += ["", f"example{marks}:", report["example"]]
    return "\n".join(lines)
