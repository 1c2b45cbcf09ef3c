"""Chat templates, loss masks and tokenization of normalized records.

Loss masks. A conversation is rendered ONCE with the tokenizer's own chat template and tokenized
once; a token is trained on (label = its id) when it overlaps the text of an assistant turn's
content or the end-of-turn marker the template writes right after it (e.g. "<|im_end|>"), and is
masked (-100) everywhere else: system and user turns, role headers such as
"<|im_start|>assistant\\n", and whitespace after the end-of-turn marker. Assistant spans are found
by rendering prefixes of the conversation, so the method works for any template that renders
a conversation's prefix as a prefix of its full rendering (ChatML, Llama 2/3, Mistral, Gemma...).
A template that does not (one that rewrites earlier turns) raises a ValueError rather than
producing a silently wrong mask.

Multi-turn and multi-session samples (Llama 2 practice). Every assistant turn of a multi-turn
conversation is supervised in one sequence. Several short chat sessions share one training
sequence through packing (`alignkit.data.packing.pack_examples`): each session keeps its own
template special tokens, position ids restart at 0 for each session so no session attends to
another (block-diagonal causal mask), and the loss stays only on assistant turns.

Labels are NOT shifted here: labels[i] is the target for position i, and the model (transformers
causal LMs) shifts by one when computing the loss.
"""

from __future__ import annotations

from typing import Any

from alignkit.models.tokenizer import CHAT_TEMPLATE, ENDOFTEXT

IGNORE_INDEX = -100

# Dedicated padding tokens that some vocabularies already hold, tried in order before falling
# back to eos. Adding a new token would change the vocabulary size and need an embedding resize.
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>")


def _token_id_if_present(tokenizer: Any, token: str) -> int | None:
    """Id of `token` when it is a real vocabulary entry (not mapped to unk), else None."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
        return None
    return token_id


def ensure_chat_template(tokenizer: Any) -> None:
    """Give `tokenizer` a chat template and a pad token if it lacks them (in place).

    A hub base model may have no chat template: it gets alignkit's ChatML `CHAT_TEMPLATE`. If the
    vocabulary lacks the ChatML special tokens, "<|im_start|>"/"<|im_end|>" are tokenized as plain
    text pieces; masks stay correct (they work on character spans), the model just has to learn
    those pieces.

    A missing pad token is set to an existing dedicated token (see `_PAD_CANDIDATES`) that is not
    the eos token; eos is the last resort. Consequence of pad == eos: padding can never be told
    apart from a real end-of-turn by id, so alignkit never derives labels or attention from
    `input_ids == pad_id`; labels come from the masks built here, and attention from lengths or
    position ids. Generation still stops correctly at eos.
    """
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is not None:
        return
    for candidate in _PAD_CANDIDATES:
        present = _token_id_if_present(tokenizer, candidate) is not None
        if present and candidate != tokenizer.eos_token:
            tokenizer.pad_token = candidate
            return
    if tokenizer.eos_token is None:
        raise ValueError("tokenizer has neither a pad token nor an eos token to pad with")
    tokenizer.pad_token = tokenizer.eos_token


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_prompt(tokenizer: Any, messages: list[dict]) -> str:
    """The chat template applied to `messages` with the assistant generation prompt appended."""
    return _render(tokenizer, messages, add_generation_prompt=True)


def _generation_prefix(tokenizer: Any, messages: list[dict], i: int) -> str:
    """Rendering of messages[:i] plus the generation prompt that opens assistant turn i."""
    try:
        return _render(tokenizer, messages[:i], add_generation_prompt=True)
    except Exception:
        if i:
            raise
        # Some templates cannot render an empty conversation: take the header as whatever
        # precedes the first turn's content in its own rendering.
        first = _render(tokenizer, messages[:1], add_generation_prompt=False)
        return first[: max(first.find(messages[0]["content"]), 0)]


def assistant_char_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` and find each assistant turn's trained character span.

    Returns (full rendered text, [(start, end)] per assistant turn). A span runs from the end of
    the generation prompt before the turn to the end of the turn's rendering with trailing
    whitespace trimmed, so it covers the content and the end-of-turn marker but not the header.
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _generation_prefix(tokenizer, messages, i)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False).rstrip()
        if not (full.startswith(prefix) and full.startswith(upto) and len(prefix) <= len(upto)):
            raise ValueError(
                "the chat template does not render a conversation's prefix as a prefix of the "
                f"whole conversation (assistant turn {i}); cannot locate the assistant tokens"
            )
        spans.append((len(prefix), len(upto)))
    return full, spans


def _label_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """True for tokens overlapping any span. offsets[t] = (char start, char end) of token t."""
    mask = []
    for start, end in offsets:
        hit = False
        for span_start, span_end in spans:
            overlaps = start < span_end and end > span_start
            zero_width_inside = start == end and span_start <= start < span_end
            if overlaps or zero_width_inside:
                hit = True
                break
        mask.append(hit)
    return mask


def has_supervised_tokens(labels: list[int]) -> bool:
    """True if some label would be trained on after the model's one-token shift."""
    return any(label != IGNORE_INDEX for label in labels[1:])


def tokenize_conversation(
    tokenizer: Any, messages: list[dict], max_length: int, last_turn_only: bool = False
) -> dict | None:
    """Tokenize a chat with labels on assistant turns only (every one, or only the last).

    Returns {"input_ids": list[int], "labels": list[int]} (same length, <= max_length), or None
    when no supervised token is left after truncation (the caller counts the drop). Truncation
    keeps the start, so a partially cut assistant turn keeps its first tokens. No BOS/EOS is
    added beyond what the template writes.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("alignkit needs a fast (Rust) tokenizer for offset mappings")
    text, spans = assistant_char_spans(tokenizer, messages)
    if last_turn_only:
        spans = spans[-1:]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])[:max_length]
    mask = _label_mask(list(encoded["offset_mapping"])[:max_length], spans)
    labels = [tid if trained else IGNORE_INDEX for tid, trained in zip(input_ids, mask)]
    if not has_supervised_tokens(labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


NO_LIMIT = 1 << 30  # a max_length no sequence reaches


def tokenize_prompt_completion(
    tokenizer: Any, messages: list[dict], completion: str, max_length: int, keep_cut_completion: bool = False
) -> dict | None:
    """Tokenize prompt `messages` followed by an assistant `completion` (a preference side, a sample).

    input = render_prompt(messages) + completion + the template's end-of-turn text; labels only on
    the completion and its end-of-turn (earlier assistant turns of the prompt are context, not
    trained). Returns {"input_ids", "labels"} of at most max_length tokens: a longer sequence loses
    the START of its prompt (`cut_from_left`), so the completion, its end-of-turn and the latest turns
    it answers survive. When the completion alone does not fit: None, or (keep_cut_completion) the
    last max_length tokens.
    """
    conversation = list(messages) + [{"role": "assistant", "content": completion}]
    full = tokenize_conversation(tokenizer, conversation, NO_LIMIT, last_turn_only=True)
    return None if full is None else cut_from_left(full, max_length, keep_cut_completion)


def cut_from_left(example: dict, max_length: int, keep_cut_completion: bool = False) -> dict | None:
    """The last max_length tokens of a prompt + completion example ({"input_ids", "labels"}, the labelled
    completion at its end): the prompt loses its start, never the completion.

    An example that fits is returned as it is. When the completion (from its first label to the end)
    alone is longer than max_length: None (a caller that trains on it drops it), or
    (keep_cut_completion, for scoring) the last max_length tokens anyway.
    """
    ids, labels = example["input_ids"], example["labels"]
    if len(ids) <= max_length:
        return example
    first_label = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    if len(ids) - first_label > max_length and not keep_cut_completion:
        return None
    return {"input_ids": ids[-max_length:], "labels": labels[-max_length:]}


def document_separator_id(tokenizer: Any) -> int:
    """Id that ends a pretraining document: "<|endoftext|>" if in the vocabulary, else eos."""
    token_id = _token_id_if_present(tokenizer, ENDOFTEXT)
    if token_id is not None:
        return token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither <|endoftext|> nor eos to separate documents")
    return tokenizer.eos_token_id


def tokenize_text(tokenizer: Any, text: str) -> list[int]:
    """Pretraining document ids followed by the document separator (no other special tokens)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids + [document_separator_id(tokenizer)]
