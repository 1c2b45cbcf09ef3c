"""Byte-level BPE tokenizer training and the ChatML chat template.

`scratch:*` models have no tokenizer of their own, so one is trained on the training corpus with
the `tokenizers` library and wrapped as a `transformers.PreTrainedTokenizerFast`. It carries the
same special tokens and chat template as SmolLM2-Instruct (ChatML, without SmolLM2's default
system prompt), so every later stage treats a scratch model exactly like a hub model.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, PAD]

# ChatML as SmolLM2-Instruct renders it, minus its default system prompt: each message is
# "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Large enough never to truncate by accident; alignkit truncates explicitly with max_length.
MODEL_MAX_LENGTH = 1_000_000


def _build_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    """Train the raw `tokenizers` BPE model; byte-level so any unicode text round-trips."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols are in the vocabulary, so no text is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`, ready for chat (ChatML) use.

    Special tokens: <|endoftext|> (document separator), <|im_start|> (bos), <|im_end|> (eos,
    ends every chat turn), <|pad|> (pad). There is no unk token: byte-level covers all text.
    Deterministic: the same texts give the same vocabulary and merges.
    """
    raw = _build_bpe(texts, vocab_size, min_frequency)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
