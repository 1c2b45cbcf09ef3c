"""Read records from files, datasets or built-in tasks, validate them and normalize their shape.

The rest of alignkit consumes only these normalized shapes (messages are lists of
{"role": "system" | "user" | "assistant", "content": str}):

- text:       {"text": str}
- sft:        {"messages": [...]} with at least one assistant turn, ending with one
- preference: {"prompt": [... ending with a user turn], "chosen": str, "rejected": str,
               optional "margin": float}
- ranked:     {"prompt": [...], "responses": [str, ...], "scores": [float, ...]} (higher is better)
- prompts:    {"prompt": [... ending with a user turn]}

Every kind keeps the input fields it does not use under "meta" (a dict, merged with an input
"meta" dict), so e.g. a task's gold reward can read ids or answers. Normalization is idempotent:
normalized records are valid input of the same kind.

Input formats per kind:
- text: `text`.
- sft: `messages`; or `prompt` (str or messages) with `completion` or `response`; an optional
  `system` field becomes a leading system message.
- preference: `prompt` (str, messages, or an hh-rlhf "\\n\\nHuman: ...\\n\\nAssistant:" string)
  with `chosen`/`rejected` as strings or message lists holding the assistant reply; or no prompt
  and `chosen`/`rejected` as full message lists sharing every turn but the last; or no prompt and
  hh-rlhf dialogue strings sharing everything up to the last "\\n\\nAssistant:" (consecutive turns
  of one speaker are merged with a blank line; turn contents are stripped). Optional `margin`.
- ranked: `prompt`, `responses`, and `scores` (higher is better) or `ranks` (1 is best,
  converted to scores = -rank).
- prompts: `prompt` (str or messages) or `messages`; a trailing assistant turn is dropped and
  kept as meta["completion"].

Conversions, allowed only when the caller names the kind (auto-detection never converts):
- prompts <- sft, preference or ranked records: the prompt (other fields go to meta).
- sft <- preference: prompt + the chosen reply; sft <- ranked: prompt + the best-scored response.

Past 400 lines: every record kind's validation and every source (files, datasets, tasks) share one reader.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("text", "sft", "preference", "ranked", "prompts")
ROLES = ("system", "user", "assistant")
_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


class DataError(ValueError):
    """Bad input data; the message names the source, the line or record, and the field."""


class _Missing(Exception):
    def __init__(self, field: str, needs: str):
        super().__init__(field)
        self.field, self.needs = field, needs


class _Invalid(Exception):
    pass


# ---------------------------------------------------------------------------- field helpers


def _present(record: dict, field: str) -> bool:
    return record.get(field) is not None


def _text_field(record: dict, field: str, needs: str, strip: bool = False) -> str:
    if not _present(record, field):
        raise _Missing(field, needs)
    value = record[field]
    if not isinstance(value, str):
        raise _Invalid(f"'{field}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _Invalid(f"'{field}' is empty")
    return value.strip() if strip else value


def _messages(value: Any, field: str) -> list[dict]:
    """Validate a list of {role, content} messages; returns clean copies."""
    if not isinstance(value, list) or not value:
        raise _Invalid(f"'{field}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise _Invalid(f"'{field}'[{i}] must be a dict with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise _Invalid(f"'{field}'[{i}] has role {role!r}; expected one of {list(ROLES)}")
        if not isinstance(content, str):
            raise _Invalid(f"'{field}'[{i}] content must be a string")
        if role == "assistant" and not content.strip():
            raise _Invalid(f"'{field}'[{i}] is an empty assistant turn")
        out.append({"role": role, "content": content})
    return out


def _with_system(record: dict, messages: list[dict]) -> list[dict]:
    system = record.get("system")
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    if not isinstance(system, str):
        raise _Invalid("'system' must be a string")
    return [{"role": "system", "content": system}] + messages


def _ends_with_user(messages: list[dict], field: str) -> list[dict]:
    if not messages or messages[-1]["role"] != "user":
        raise _Invalid(f"'{field}' must end with a user turn")
    return messages


def _meta(record: dict, used: set[str]) -> dict:
    """Unused input fields, merged into a copy of the input's own "meta" dict."""
    meta = dict(record["meta"]) if isinstance(record.get("meta"), dict) else {}
    for key, value in record.items():
        if key not in used and key != "meta" and value is not None:
            meta[key] = value
    if record.get("meta") is not None and not isinstance(record["meta"], dict):
        meta["meta"] = record["meta"]
    return meta


def _finish(out: dict, record: dict, used: set[str]) -> dict:
    meta = _meta(record, used)
    if meta:
        out["meta"] = meta
    return out


# --------------------------------------------------------------------------- hh-rlhf dialogues

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_HH_LAST = "\n\nAssistant:"


def looks_like_hh(text: Any) -> bool:
    return isinstance(text, str) and text.lstrip(" ").startswith(("\n\nHuman:", "Human:"))


def parse_hh_dialogue(text: str) -> list[dict]:
    """Parse "\\n\\nHuman: ...\\n\\nAssistant: ..." into messages (contents stripped).

    Consecutive turns of one speaker (a known quirk of hh-rlhf) are merged with a blank line.
    A final "Assistant:" with nothing after it stays as an empty assistant turn for the caller.
    """
    text = text.lstrip(" ")
    if text.startswith("Human:"):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise _Invalid("hh dialogue has text before the first '\\n\\nHuman:'")
    messages: list[dict] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role, content = _HH_ROLES[speaker], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = (messages[-1]["content"] + "\n\n" + content).strip()
        else:
            messages.append({"role": role, "content": content})
    return messages


def _hh_split_pair(chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    """Shared prompt turns and the two final assistant replies of an hh-rlhf pair.

    The dialogues must be identical up to their last "\n\nAssistant:"; the replies are what
    follows it, stripped.
    """
    cuts = []
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        cut = text.rfind(_HH_LAST)
        if cut < 0 or text.rfind("\n\nHuman:") > cut:
            raise _Invalid(f"'{name}' does not end with an '\\n\\nAssistant:' turn")
        cuts.append(cut)
    if chosen[: cuts[0]] != rejected[: cuts[1]]:
        common = os.path.commonprefix([chosen[: cuts[0]], rejected[: cuts[1]]])
        raise _Invalid(
            "'chosen' and 'rejected' do not share the dialogue before their last "
            f"'\\n\\nAssistant:' (they first differ in turn {len(_HH_TURN.findall(common))})"
        )
    prompt = _messages(parse_hh_dialogue(chosen[: cuts[0]]), "chosen")  # no empty assistant turn inside
    start_c, start_r = cuts[0] + len(_HH_LAST), cuts[1] + len(_HH_LAST)
    return prompt, chosen[start_c:].strip(), rejected[start_r:].strip()


# ---------------------------------------------------------------------------- kind normalizers

_NEEDS = {
    "text": "'text'",
    "sft": "'messages', or 'prompt' and 'completion' (or 'response')",
    "preference": "'chosen' and 'rejected' (plus 'prompt' unless they are full dialogues)",
    "ranked": "'prompt', 'responses' and 'scores' (or 'ranks')",
    "prompts": "'prompt' or 'messages'",
}


def _prompt(record: dict, kind: str) -> list[dict]:
    """The prompt as messages ending with a user turn (a trailing assistant turn is an error)."""
    if not _present(record, "prompt"):
        raise _Missing("prompt", _NEEDS[kind])
    value = record["prompt"]
    if looks_like_hh(value):
        messages = parse_hh_dialogue(value)
        if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
            messages = messages[:-1]  # "...\n\nAssistant:" opening the reply to complete
        messages = _messages(messages, "prompt")  # an empty assistant turn inside is an error, as in a list
    elif isinstance(value, str):
        if not value.strip():
            raise _Invalid("'prompt' is empty")
        messages = [{"role": "user", "content": value}]
    else:
        messages = _messages(value, "prompt")
    return _ends_with_user(_with_system(record, messages), "prompt")


def _as_text(record: dict) -> dict:
    return _finish({"text": _text_field(record, "text", _NEEDS["text"])}, record, {"text"})


def _reply(record: dict, field: str, prompt: list[dict], strip: bool) -> str:
    """A preference side: a string, or messages holding the assistant reply (maybe after prompt)."""
    value = record.get(field)
    if isinstance(value, list):
        messages = _messages(value, field)
        if messages[-1]["role"] != "assistant" or messages[:-1] not in ([], prompt):
            raise _Invalid(f"'{field}' must be the assistant reply, alone or after the prompt")
        return messages[-1]["content"]
    return _text_field(record, field, _NEEDS["preference"], strip=strip)


def _as_preference(record: dict) -> dict:
    for field in ("chosen", "rejected"):
        if not _present(record, field):
            raise _Missing(field, _NEEDS["preference"])
    chosen, rejected = record["chosen"], record["rejected"]
    if _present(record, "prompt"):
        prompt = _prompt(record, "preference")
        hh = looks_like_hh(record["prompt"])
        chosen = _reply(record, "chosen", prompt, strip=hh)
        rejected = _reply(record, "rejected", prompt, strip=hh)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        chosen_msgs, rejected_msgs = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        if chosen_msgs[-1]["role"] != "assistant" or rejected_msgs[-1]["role"] != "assistant":
            raise _Invalid("'chosen' and 'rejected' dialogues must end with an assistant turn")
        if chosen_msgs[:-1] != rejected_msgs[:-1]:
            raise _Invalid("'chosen' and 'rejected' dialogues differ before their last turn")
        prompt = _ends_with_user(_with_system(record, chosen_msgs[:-1]), "prompt")
        chosen, rejected = chosen_msgs[-1]["content"], rejected_msgs[-1]["content"]
    elif looks_like_hh(chosen) and looks_like_hh(rejected):
        prompt, chosen, rejected = _hh_split_pair(chosen, rejected)
        prompt = _ends_with_user(_with_system(record, prompt), "prompt")
    else:
        raise _Missing("prompt", _NEEDS["preference"])
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            raise _Invalid(f"'{name}' is empty")
    if chosen == rejected:
        raise _Invalid("'chosen' and 'rejected' are identical")
    out: dict = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if _present(record, "margin"):
        margin = record["margin"]
        if not _is_number(margin):
            raise _Invalid("'margin' must be a finite number")
        out["margin"] = float(margin)
    return _finish(out, record, {"prompt", "chosen", "rejected", "margin", "system"})


def _is_number(value: Any) -> bool:
    """An int or float (not a bool) with a finite float value: JSON's NaN, Infinity or a 400-digit
    integer would turn a loss into NaN or overflow."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _numbers(value: Any, field: str) -> list[float]:
    if not isinstance(value, list) or not all(_is_number(v) for v in value):
        raise _Invalid(f"'{field}' must be a list of finite numbers")
    return [float(v) for v in value]


def _as_ranked(record: dict) -> dict:
    prompt = _prompt(record, "ranked")
    if not _present(record, "responses"):
        raise _Missing("responses", _NEEDS["ranked"])
    responses = record["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise _Invalid("'responses' must be a list of at least 2 responses")
    if any(not isinstance(r, str) or not r.strip() for r in responses):
        raise _Invalid("'responses' holds an empty or non-string response")
    if _present(record, "scores"):
        scores = _numbers(record["scores"], "scores")
    elif _present(record, "ranks"):
        scores = [-rank for rank in _numbers(record["ranks"], "ranks")]
    else:
        raise _Missing("scores", _NEEDS["ranked"])
    if len(scores) != len(responses):
        raise _Invalid(f"{len(responses)} 'responses' but {len(scores)} scores/ranks")
    if len(set(scores)) == 1:
        raise _Invalid("all scores/ranks are equal: the record ranks nothing")
    out = {"prompt": prompt, "responses": list(responses), "scores": scores}
    return _finish(out, record, {"prompt", "responses", "scores", "ranks", "system"})


def _as_sft(record: dict) -> dict:
    if _present(record, "messages"):
        messages = _with_system(record, _messages(record["messages"], "messages"))
        if messages[-1]["role"] != "assistant":
            raise _Invalid("'messages' must end with an assistant turn")
        return _finish({"messages": messages}, record, {"messages", "system"})
    if _present(record, "chosen") and _present(record, "rejected"):  # preference -> sft
        pref = _as_preference(record)
        reply = pref.pop("chosen")
    elif _present(record, "responses"):  # ranked -> sft: the best-scored response
        pref = _as_ranked(record)
        best = max(range(len(pref["scores"])), key=lambda i: pref["scores"][i])
        reply = pref["responses"][best]
    else:
        prompt = _prompt(record, "sft")
        has_completion = _present(record, "completion")
        field = "response" if _present(record, "response") and not has_completion else "completion"
        reply = _text_field(record, field, _NEEDS["sft"])
        messages = prompt + [{"role": "assistant", "content": reply}]
        return _finish({"messages": messages}, record, {"prompt", field, "system"})
    messages = pref["prompt"] + [{"role": "assistant", "content": reply}]
    return _finish({"messages": messages}, record, {"prompt", "chosen", "responses", "system"})


def _as_prompts(record: dict) -> dict:
    implicit = _present(record, "chosen") and _present(record, "rejected")
    if implicit and not _present(record, "prompt"):
        # preference with an implicit prompt -> prompts
        return _finish({"prompt": _as_preference(record)["prompt"]}, record, {"system"})
    if _present(record, "prompt"):
        value, field = record["prompt"], "prompt"
    elif _present(record, "messages"):
        value, field = record["messages"], "messages"
    else:
        raise _Missing("prompt", _NEEDS["prompts"])
    dropped = None
    if isinstance(value, list):
        messages = _with_system(record, _messages(value, field))
        if messages[-1]["role"] == "assistant":
            dropped = messages.pop()["content"]
        prompt = _ends_with_user(messages, field)
    else:
        prompt = _prompt(record, "prompts")
    out = _finish({"prompt": prompt}, record, {field, "system"})
    if dropped is not None:
        out.setdefault("meta", {})["completion"] = dropped
    return out


NORMALIZERS: dict[str, Callable[[dict], dict]] = {
    "text": _as_text,
    "sft": _as_sft,
    "preference": _as_preference,
    "ranked": _as_ranked,
    "prompts": _as_prompts,
}


def detect_kind(record: dict) -> str | None:
    """The kind a record's own fields say it is (no conversion), or None."""
    if _present(record, "chosen") and _present(record, "rejected"):
        return "preference"
    if _present(record, "responses"):
        return "ranked"
    if _present(record, "messages"):
        messages = record["messages"]
        last = messages[-1] if isinstance(messages, list) and messages else None
        return "sft" if isinstance(last, dict) and last.get("role") == "assistant" else "prompts"
    if _present(record, "prompt"):
        has_reply = _present(record, "completion") or _present(record, "response")
        return "sft" if has_reply else "prompts"
    if _present(record, "text"):
        return "text"
    return None


def _accepting_kinds(record: dict) -> list[str]:
    accepted = []
    for kind, normalize in NORMALIZERS.items():
        try:
            normalize(record)
            accepted.append(kind)
        except (_Missing, _Invalid):
            pass
    return accepted


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(record: dict) -> tuple[str, str] | None:
    """(field path, character) of the first string, value or key, holding a lone UTF-16 surrogate.

    JSON's "\\ud800" escapes decode to such strings; no tokenizer and no UTF-8 file can take them.
    """
    stack: list[tuple[str, Any]] = [("", record)]
    while stack:  # not recursive: a record nested 1000 deep is fine
        path, value = stack.pop()
        if isinstance(value, str):
            found = _SURROGATE.search(value)
            if found:
                return path, found.group()
        elif isinstance(value, dict):
            for key, item in value.items():
                name = f"{path}[{key!r}]" if path else repr(key)
                if isinstance(key, str) and _SURROGATE.search(key):
                    return name, _SURROGATE.search(key).group()
                stack.append((name, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def normalize_record(record: Any, kind: str, loc: str) -> dict:
    """Normalize one raw record as `kind`; DataError naming `loc` and the field if it won't fit."""
    if not isinstance(record, dict):
        raise DataError(f"record at {loc} must be a JSON object, got {type(record).__name__}")
    surrogate = _lone_surrogate(record)
    if surrogate is not None:
        raise DataError(f"record at {loc}: {surrogate[0]} holds a lone surrogate {surrogate[1]!r} (an unpaired "
                        "\\ud800-\\udfff escape), which no tokenizer or UTF-8 file can take")
    fields = sorted(k for k, v in record.items() if v is not None)
    try:
        return NORMALIZERS[kind](record)
    except _Missing as missing:
        accepting = ", ".join(_accepting_kinds(record)) or "none"
        raise DataError(
            f"record at {loc} has fields {fields}: missing '{missing.field}' ({kind} needs "
            f"{missing.needs}); kinds that accept this record: {accepting}"
        ) from None
    except _Invalid as invalid:
        raise DataError(f"record at {loc} ({kind}): {invalid}") from None


# ------------------------------------------------------------------------------------- reading


def _decode(raw: bytes, path: Path, line_no: int) -> str:
    """UTF-8 text of one line (a byte-order mark is allowed at the start of the file); a DataError naming
    file:line and the offending byte otherwise."""
    try:
        return raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}:{line_no}: not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                        "re-save the file as UTF-8") from None


def _parse_json(text: str, path: Path, line_no: int) -> Any:
    """json.loads, with every way it fails (a syntax error, nesting past the recursion limit, an
    integer past Python's 4300-digit limit) as one DataError naming file:line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{line_no + err.lineno - 1}: invalid JSON: {err}") from None
    except RecursionError:
        raise DataError(f"{path}:{line_no}: invalid JSON: nested too deeply") from None
    except ValueError as err:
        raise DataError(f"{path}:{line_no}: invalid JSON: {str(err).splitlines()[0]}") from None


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    rows, line_no = [], 0
    try:
        # bytes, decoded line by line, so an encoding error names its exact line
        with opener(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                line = _decode(raw, path, line_no)
                if not line.strip():
                    continue
                rows.append((f"{path}:{line_no}", _parse_json(line.rstrip("\n"), path, line_no)))
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"{path}: the gzip stream is truncated or corrupt after line {line_no} ({err}); "
                        "re-download or re-compress the file") from None
    return rows


def _read_json(path: Path) -> list[tuple[str, Any]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x}); re-save the file as UTF-8") from None
    data = _parse_json(text, path, 1)
    wrapped = isinstance(data, dict) and isinstance(data.get("data"), list)
    if wrapped:
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}:1: expected a JSON list of records or {{\"data\": [...]}}, got {type(data).__name__}")
    lines = _json_record_lines(text, wrapped)
    return [(f"{path}:{line} (record {i})", row) for i, (line, row) in enumerate(zip(lines, data), start=1)]


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _json_record_lines(text: str, wrapped: bool) -> list[int]:
    """Line of each record of a valid JSON list (the document, or its top-level "data" list)."""
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:  # past JSON whitespace
        return _JSON_SPACE.match(text, i).end()

    def past(i: int) -> int:  # past the value starting at i, and the whitespace after it
        return skip(decoder.raw_decode(text, i)[1])

    i = skip(0)
    if wrapped:  # the top-level object's "data" list (its last "data" key, as in json.loads)
        i, data_at = skip(i + 1), 0
        while text[i] != "}":
            key, end = decoder.raw_decode(text, i)
            value_at = skip(skip(end) + 1)  # past the ':'
            data_at = value_at if key == "data" else data_at
            i = past(value_at)
            i = skip(i + 1) if text[i] == "," else i
        i = data_at
    i, starts = skip(i + 1), []  # past the '['
    while text[i] != "]":
        starts.append(i)
        i = past(i)
        i = skip(i + 1) if text[i] == "," else i
    lines, line, pos = [], 1, 0
    for start in starts:
        line, pos = line + text.count("\n", pos, start), start
        lines.append(line)
    return lines


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    import pyarrow.parquet as pq

    import pyarrow

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as err:
        problem = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: not a readable parquet file ({problem})") from None
    return [(f"{path}:row {i}", row) for i, row in enumerate(table.to_pylist(), 1)]


def _read_dataset(name: str, split: str | None, local: bool) -> list[tuple[str, Any]]:
    """A dataset saved with save_to_disk, a folder of data files, or a Hugging Face hub name."""
    import datasets

    markers = ("dataset_info.json", "dataset_dict.json", "state.json")  # written by save_to_disk
    if local and any((Path(name) / marker).exists() for marker in markers):
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
            split = split or "train"
            if split not in loaded:
                raise DataError(f"{name}: no split {split!r}; splits: {sorted(loaded)}")
            loaded = loaded[split]
    else:
        split = split or "train"
        loaded = datasets.load_dataset(name, split=split)  # the hub path; needs a network
    label = f"{name}[{split}]" if split else name
    return [(f"{label}:row {i}", row) for i, row in enumerate(loaded, start=1)]


def _read_source(source: str) -> list[tuple[str, Any]]:
    path = Path(source)
    if path.is_file():
        if source.endswith((".jsonl", ".jsonl.gz")):
            return _read_jsonl(path)
        if source.endswith(".json"):
            return _read_json(path)
        if source.endswith(".parquet"):
            return _read_parquet(path)
        raise DataError(f"{source}: unknown file type; expected one of {list(_FILE_SUFFIXES)}")
    if path.is_dir():
        return _read_dataset(source, None, local=True)
    base, _, split = source.rpartition(":")
    if base and Path(base).is_dir():
        return _read_dataset(base, split, local=True)
    if source.endswith(_FILE_SUFFIXES) or path.is_absolute() or source.startswith("."):
        raise DataError(f"{source}: no such file")
    name, split = (base, split) if base else (source, "")
    return _read_dataset(name, split or None, local=False)


def _read_task(spec: str) -> tuple[list[tuple[str, Any]], str]:
    from alignkit.data.tasks import load_task_records  # lazy: tasks are optional for data tests

    records, kind = load_task_records(spec)
    return [(f"{spec}#{i}", row) for i, row in enumerate(records, start=1)], kind


def read_raw(source: str) -> tuple[list[tuple[str, Any]], str | None]:
    """(location, record as stored) of every record of one source, unvalidated, and the kind a
    built-in task declares (None for files and datasets). Empty sources raise DataError. For callers
    that must write records back in their input format (alignkit select); stages use load_records."""
    if source.startswith("task:"):
        got, kind = _read_task(source)
    else:
        got, kind = _read_source(source), None
    if not got:
        raise DataError(f"{source}: no records (empty file or dataset)")
    return got, kind


def load_records(
    source: str | list[str], kind: str | None = None, errors: list[str] | None = None
) -> tuple[list[dict], str]:
    """Load, validate and normalize records from one or more sources.

    source: path(s) to .jsonl / .jsonl.gz / .json / .parquet, a local dataset directory
    (optionally "DIR:split"), a Hugging Face dataset name (optionally "name:split"), or
    "task:..." (a built-in task). kind None: detected from the first record, and every record
    must be of that same kind; a named kind allows the conversions in the module docstring.
    errors: None (default) raises DataError at the first invalid record; a list collects one
    message per invalid record, which is then skipped (the caller reports the count). Malformed
    files and empty sources always raise. Returns (records, kind).
    """
    if kind is not None and kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {list(KINDS)}")
    auto = kind is None
    rows: list[tuple[str, Any]] = []
    for one in [source] if isinstance(source, str) else list(source):
        got, task_kind = read_raw(one)
        kind = kind or task_kind  # a task says its kind; its records are checked against it
        rows.extend(got)
    if kind is None:
        kind = _detect_first(*rows[0])
    records = []
    for loc, raw in rows:
        try:
            records.append(_normalize_checked(raw, kind, loc, auto))
        except DataError as err:
            if errors is None:
                raise
            errors.append(str(err))
    if not records:
        raise DataError(f"no valid {kind} records in {source} ({len(errors or [])} invalid)")
    return records, kind


def _detect_first(loc: str, record: Any) -> str:
    kind = detect_kind(record) if isinstance(record, dict) else None
    if kind is None:
        fields = sorted(record) if isinstance(record, dict) else type(record).__name__
        needs = "; ".join(f"{k}: {v}" for k, v in _NEEDS.items())
        raise DataError(
            f"record at {loc} has fields {fields}: no kind accepts it; expected {needs}"
        )
    return kind


def _normalize_checked(record: Any, kind: str, loc: str, auto: bool) -> dict:
    """normalize_record, plus (auto-detected kind) no silent conversion of another kind."""
    normalized = normalize_record(record, kind, loc)
    own = detect_kind(record)
    if auto and own != kind:
        raise DataError(
            f"record at {loc} has fields {sorted(record)} of kind '{own}', but the first record "
            f"is '{kind}'; name the kind to convert records (see alignkit.data.records)"
        )
    return normalized


def split_records(
    records: list[dict], eval_fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Split off round(eval_fraction * N) records (at least 1) for evaluation, chosen by `seed`.

    Deterministic for the same records and seed; both parts keep the input order.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if len(records) < 2:
        raise DataError(f"cannot split {len(records)} record(s) into train and eval")
    n_eval = min(max(1, round(eval_fraction * len(records))), len(records) - 1)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    eval_ids = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in eval_ids]
    evals = [r for i, r in enumerate(records) if i in eval_ids]
    return train, evals


# ------------------------------------------------------------------------- weighted sources


@dataclass
class Source:
    """One entry of train_data / eval_data: where its records come from, its mixture weight, its report name."""

    name: str
    path: str
    weight: float = 1.0


def source_name(spec: str) -> str:
    """A short name for a data source: a task spec's task ('task:sort/sft?n=9' -> 'sort'), a file's stem
    ('data/general.jsonl.gz' -> 'general'), a dataset's last path part ('org/set:train' -> 'set')."""
    if spec.startswith("task:"):
        return spec[len("task:"):].split("/", 1)[0]
    name = Path(spec.split(":", 1)[0] if not Path(spec).exists() else spec).name
    for suffix in (".jsonl.gz", *_FILE_SUFFIXES):
        name = name.removesuffix(suffix)
    return name or spec


def data_sources(value: str | list) -> list[Source]:
    """train_data / eval_data -> sources: a string or list of strings (weight 1 each), or a list of
    {path, weight, name} mappings (checked by config.validate). Names are unique: a repeated one gets
    its part or position appended ('sort', 'sort_sft', or 'sort_2')."""
    items = [value] if isinstance(value, str) else list(value)
    sources: list[Source] = []
    for item in items:
        spec = item if isinstance(item, str) else item["path"]
        name = item.get("name") if isinstance(item, dict) else None
        weight = float(item.get("weight", 1.0)) if isinstance(item, dict) else 1.0
        base = name or source_name(spec)
        taken = {s.name for s in sources}
        if base in taken and not name and spec.startswith("task:"):
            base = f"{base}_{spec.split('/', 1)[-1].split('?', 1)[0]}"
        unique, n = base, 2
        while unique in taken:
            unique, n = f"{base}_{n}", n + 1
        sources.append(Source(unique, spec, weight))
    return sources


def mixture_shares(weights: list[float], replay: float = 0.0) -> list[float]:
    """Share of each source in the mixture: weights normalised; with replay r, the LAST source (the
    general data) gets r on top of its own weighted share of the rest: r + (1 - r) * w_last / sum(w)."""
    total = sum(weights)
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
    shares = [(1.0 - replay) * w / total for w in weights]
    shares[-1] += replay
    return shares


def mix_records(parts: list[list[dict]], shares: list[float], seed: int, size: int | None = None) -> tuple[list[dict], list[int]]:
    """A training set of `size` records (default: all parts together) holding each part in its share:
    part i contributes round(shares[i] * size) records (largest remainder, so the counts add up exactly),
    drawn without replacement from a seeded shuffle of the part, reshuffled each time it runs out (so a
    small domain is repeated, a big one subsampled). Deterministic from the seed on any process count.
    Returns (records, the part index of each record)."""
    size = sum(len(p) for p in parts) if size is None else size
    exact = [s * size for s in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(parts)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: size - sum(counts)]:
        counts[i] += 1
    records: list[dict] = []
    source_ids: list[int] = []
    for i, (part, count) in enumerate(zip(parts, counts)):
        if count and not part:
            raise DataError(f"mixture part {i} has no records but a share of {shares[i]:.3f}")
        drawn: list[dict] = []
        cycle = 0
        while len(drawn) < count:
            order = list(range(len(part)))
            random.Random(f"alignkit-mix/{seed}/{i}/{cycle}").shuffle(order)
            drawn.extend(part[j] for j in order[: count - len(drawn)])
            cycle += 1
        records.extend(drawn)
        source_ids.extend([i] * count)
    return records, source_ids
