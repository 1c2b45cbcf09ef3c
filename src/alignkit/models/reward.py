"""Reward models: a causal LM's transformer with a scalar head, read at the end-of-turn token.

A reward model is `AutoModelForSequenceClassification` with `num_labels=1` (for Llama:
`LlamaForSequenceClassification`, the base transformer under `model.model` and a bias-free linear
`model.score`). Started from a causal LM checkpoint, transformers keeps the transformer weights,
drops the LM head and creates a fresh `score` head; alignkit initialises it from a seed.

Input format. The RM scores TEXT: the chat-rendered prompt + response + the template's end-of-turn
marker, tokenized with the RM's own tokenizer (it may differ from the policy's), in exactly the
format the policy is trained on (`tokenize_prompt_completion`). The sequence ends AT the
end-of-turn token (the template's trailing newline is cut), and the reward is the score of the
hidden state there, i.e. after the model has read the whole response. A sequence longer than
`max_length` loses the START of its prompt (the reward needs the response and its end, not the
oldest turns); when the response alone does not fit, it is dropped from training (scoring keeps
its last tokens).

Padding. transformers' own pooling reads the reward at the last token that is not `pad_token_id`.
If the pad token were the end-of-turn token (SmolLM2 pads with <|im_end|>), that would read the
token BEFORE the end of turn; so the RM gets a pad token that differs from it, and a saved RM gives
the same rewards through `AutoModelForSequenceClassification` as through `packed_rewards`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from alignkit.data.chat import IGNORE_INDEX, NO_LIMIT, cut_from_left, tokenize_prompt_completion
from alignkit.runtime.sequences import pack_for_forward, pack_shared_prefixes, shared_prefix_mask

# Tried in order when the tokenizer pads with its end-of-turn token.
_RM_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>", "<unk>")


# ------------------------------------------------------------------------------------- loading


def _token_id(tokenizer: Any, token: str) -> int | None:
    """Id of `token` if it is a real vocabulary entry, else None."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
        return None
    return token_id


def end_of_turn_id(tokenizer: Any) -> int:
    """The token a rendered assistant turn ends with (e.g. <|im_end|>): the reward is read there."""
    example = tokenize_prompt_completion(tokenizer, [{"role": "user", "content": "x"}], "y", NO_LIMIT)
    return [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX][-1]


def ensure_reward_pad(tokenizer: Any) -> int:
    """Make the tokenizer's pad token differ from the end-of-turn token if the vocabulary allows.

    Returns the pad id to put into the model config (see the module docstring, 'Padding').
    """
    eot = end_of_turn_id(tokenizer)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eot:
        return tokenizer.pad_token_id
    for candidate in _RM_PAD_CANDIDATES:
        token_id = _token_id(tokenizer, candidate)
        if token_id is not None and token_id != eot:
            tokenizer.pad_token = candidate
            return token_id
    return tokenizer.pad_token_id  # no alternative: HF pooling will then read before the end of turn


def _resolve_tokenizer(tokenizer: Any, path: str):
    from alignkit.models.loading import load_tokenizer

    if tokenizer is None or isinstance(tokenizer, str):
        return load_tokenizer(tokenizer if tokenizer is not None else path)
    from alignkit.data.chat import ensure_chat_template

    ensure_chat_template(tokenizer)
    return tokenizer


def _from_scratch(name: str, tokenizer: Any, seed: int, train_texts, vocab_size: int):
    """A fresh RM of a scratch:* preset: the preset's transformer (seeded) and a seeded head."""
    from transformers import AutoModelForSequenceClassification

    from alignkit.models.loading import build_scratch_model, load_causal_lm

    if tokenizer is None or isinstance(tokenizer, str):
        causal, tok = load_causal_lm(name, tokenizer=tokenizer, train_texts=train_texts, vocab_size=vocab_size, seed=seed)
    else:
        tok = _resolve_tokenizer(tokenizer, name)
        causal = build_scratch_model(name, tok, seed)
    config = causal.config
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.model.load_state_dict(causal.model.state_dict())
    return model, tok


def _architectures(name_or_path: str, path: str) -> list[str]:
    """The checkpoint config's `architectures` (empty when it names none)."""
    from transformers import AutoConfig

    from alignkit.models.loading import ModelError

    try:
        return list(AutoConfig.from_pretrained(path).architectures or [])
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load reward model {name_or_path!r} from {path!r}: {err}") from err


def _refuse_untrained(name_or_path: str, architectures: Iterable[str] = (), missing: Iterable[str] = ()) -> None:
    """ModelError unless the checkpoint is a trained reward model.

    A causal LM loads as AutoModelForSequenceClassification without complaint (transformers only logs
    the score head as MISSING and draws it at random), so every reward would be noise. A saved reward
    model says `*ForSequenceClassification` in its config (checked before loading anything) and its
    weights hold the head (checked after: no missing keys).
    """
    from alignkit.models.loading import ModelError

    architectures = list(architectures)
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        why = f"its config's architectures are {architectures}"
    elif missing:
        why = f"its weights lack {sorted(missing)}"
    else:
        return
    raise ModelError(f"{name_or_path} is not a reward model ({why}): make one with "
                     f"`alignkit rm --config FILE model={name_or_path}` and pass that run's final/ directory")


def load_reward_model(
    name_or_path: str,
    tokenizer: Any = None,
    *,
    new_head: bool = False,
    seed: int = 0,
    train_texts: Callable[[], Iterable[str]] | None = None,
    vocab_size: int = 1024,
    dtype: torch.dtype = torch.float32,
):
    """(reward model, tokenizer) from a causal LM checkpoint, an RM checkpoint or a scratch:* preset.

    name_or_path: local path, hub id, "smollm2-135m-instruct" or "scratch:*" (the latter needs
    `tokenizer` or `train_texts`). tokenizer: None (the model's), a path/id, or a tokenizer object.
    new_head: False (loading a reward model to score with) refuses a checkpoint that is not a trained
    reward model (`_refuse_untrained`); True STARTS one (the rm stage, a critic): a causal LM checkpoint
    or scratch preset gets a new score head initialised from `seed` (an RM checkpoint keeps its own).
    A scratch:* preset is a fresh, untrained model: it is refused unless new_head (ppo's critic may start as one).
    The tokenizer gets a chat template, and a pad token that is not the end-of-turn token;
    config.pad_token_id is set. An ensemble directory (ensemble.json) loads as a RewardEnsemble to score
    with; with new_head, its first member is the start.
    """
    from transformers import AutoModelForSequenceClassification

    from alignkit.models.loading import ModelError, _check_exists, is_scratch, resolve_model_path

    members = ensemble_members(name_or_path)
    if members is not None and not new_head:
        return load_reward_ensemble(members, tokenizer, dtype=dtype)
    if members is not None:  # a model STARTED from an ensemble (a critic, say) starts from its first member
        name_or_path = str(members[0])
    if is_scratch(name_or_path):
        if not new_head:
            raise ModelError(f"{name_or_path} is an untrained model, not a reward model: make one with "
                             f"`alignkit rm --config FILE` and pass that run's final/ directory")
        model, tok = _from_scratch(name_or_path, tokenizer, seed, train_texts, vocab_size)
    else:
        path = resolve_model_path(name_or_path)
        _check_exists(path, "model")
        if not new_head:
            _refuse_untrained(name_or_path, architectures=_architectures(name_or_path, path))
        try:
            # The head missing from a causal LM checkpoint is initialised from the global RNG: seed it.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=1, dtype=dtype, attn_implementation="sdpa", output_loading_info=True
                )
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load reward model {name_or_path!r} from {path!r}: {err}") from err
        if not new_head:
            _refuse_untrained(name_or_path, missing=info["missing_keys"])
        tok = _resolve_tokenizer(tokenizer, path)
    if model.config.num_labels != 1:
        raise ModelError(f"{name_or_path!r} has {model.config.num_labels} labels; a reward model has 1")
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = ensure_reward_pad(tok)
    return model, tok


# ------------------------------------------------------------------------------------- ensembles

ENSEMBLE_FILE = "ensemble.json"


class RewardEnsemble(torch.nn.Module):
    """k reward models that score alike: the reward is their mean, their spread is the disagreement.

    `alignkit rm ensemble=k` writes one as final/ensemble.json + final/member-<i>/ (each a plain reward model);
    load_reward_model returns this for such a directory, and every scorer (packed_rewards, score_texts, PPO,
    best-of-n, RAFT, `alignkit score`, eval) uses the mean through packed_rewards. `.config` is the first
    member's (the members share the tokenizer and so the pad id)."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs >= 2 reward models, got {len(members)}")
        self.members = torch.nn.ModuleList(members)
        self.config = members[0].config


def ensemble_members(path: str) -> list[Path] | None:
    """The member directories of an ensemble directory (its ensemble.json), else None."""
    index = Path(path) / ENSEMBLE_FILE
    if not index.is_file():
        return None
    names = json.loads(index.read_text())["members"]
    return [Path(path) / name for name in names]


def load_reward_ensemble(members: list[Path], tokenizer: Any = None, dtype: torch.dtype = torch.float32):
    """(RewardEnsemble, the first member's tokenizer); every member must read the same token ids."""
    from alignkit.models.loading import ModelError

    loaded = [load_reward_model(str(path), tokenizer, dtype=dtype) for path in members]
    vocab = loaded[0][1].get_vocab()
    for path, (_, tok) in zip(members, loaded):
        if tok.get_vocab() != vocab:
            raise ModelError(f"ensemble member {path} has another tokenizer than {members[0]}")
    return RewardEnsemble([model for model, _ in loaded]), loaded[0][1]


def write_ensemble_index(final_dir: Path, member_names: list[str]) -> None:
    (Path(final_dir) / ENSEMBLE_FILE).write_text(json.dumps({"members": member_names}, indent=1))


# ------------------------------------------------------------------------------------- rewards


def _base_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(base transformer, score head) of a plain or peft-wrapped sequence-classification model."""
    if hasattr(model, "get_base_model"):  # peft: LoRA layers and the saved head live in the base
        model = model.get_base_model()
    return getattr(model, model.base_model_prefix), model.score


def last_positions(segment: torch.Tensor, n: int) -> torch.Tensor:
    """Flat index (into R*T) of the last token of each example. segment [R,T] (-1 = pad) -> [n]."""
    flat = segment.reshape(-1)
    index = torch.arange(flat.numel(), device=flat.device)
    real = flat >= 0
    last = torch.full((n,), -1, dtype=torch.long, device=flat.device)
    return last.scatter_reduce(0, flat[real], index[real], reduce="amax")


def scoring_models(model: Any) -> list[torch.nn.Module]:
    """The reward models whose scores `model` averages: an ensemble's members, else [model]."""
    return list(model.members) if isinstance(model, RewardEnsemble) else [model]


def rewards_at(model: Any, batch: dict, last: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One reward model's forward over an already packed batch, its head read at the flat positions `last`. -> [N]."""
    base, head = _base_and_head(model)
    mask = {} if attention_mask is None else {"attention_mask": attention_mask}
    hidden = base(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **mask).last_hidden_state
    picked = hidden.reshape(-1, hidden.shape[-1])[last]  # [N,H]
    return head(picked)[:, 0].float()


def packed_rewards(model: Any, examples: list[dict], pad_id: int, row_tokens: int) -> torch.Tensor:
    """Reward of each example, read at its last token, from padding-free packed forwards. -> [N].

    examples: {"input_ids", "labels"} lists (labels unused here), each ending at its end-of-turn
    token. Differentiable; runs the base transformer once over rows of up to `row_tokens` tokens
    (examples isolated by position-id resets) and the score head only on the N last hidden states.
    An ensemble: the members' mean (member_rewards).
    """
    return member_rewards(model, examples, pad_id, row_tokens).mean(dim=0)


def member_rewards(model: Any, examples: list[dict], pad_id: int, row_tokens: int) -> torch.Tensor:
    """Each member's reward of each example, the examples packed ONCE for all members. -> [M,N] (M=1: one model)."""
    device = next(model.parameters()).device
    batch = pack_for_forward(examples, row_tokens, pad_id, device)
    last = last_positions(batch["segment"], len(examples))
    return torch.stack([rewards_at(m, batch, last) for m in scoring_models(model)])


def grouped_rewards(model: Any, examples: list[dict], group_sizes: list[int], pad_id: int, row_tokens: int) -> torch.Tensor:
    """`packed_rewards` of examples that come in groups sharing a prompt (consecutive, group_sizes[g] each),
    with each group's common prefix forwarded once (runtime.sequences.pack_shared_prefixes). -> [N].

    The chosen and rejected responses of a preference pair repeat the same prompt, which is most of the
    tokens in multi-turn data (HH-RLHF); a 4D attention mask lets both read one copy. The rewards equal
    packed_rewards' (tests/unit/test_shared_prefix.py). Attention implementations that take no 4D mask
    (flash-attention) fall back to packed_rewards. An ensemble: one packing, each member forwarded on it."""
    models = scoring_models(model)
    base, _ = _base_and_head(models[0])
    takes_mask, mask_dtype = shared_prefix_mask(base.config, next(model.parameters()).dtype)
    if not takes_mask:
        return packed_rewards(model, examples, pad_id, row_tokens)
    device = next(model.parameters()).device
    batch = pack_shared_prefixes(examples, group_sizes, row_tokens, pad_id, device, mask_dtype)
    return torch.stack([rewards_at(m, batch, batch["last"], batch["attention_mask"]) for m in models]).mean(dim=0)


class PackedRewardModel(torch.nn.Module):
    """`forward(examples, pad_id, row_tokens) -> rewards[N]` around a reward model.

    Training wraps this module (not the RM) with DDP, so the packed forward goes through DDP's own
    forward and gradients are synchronised; `.rm` is the model that gets saved.
    """

    def __init__(self, rm: torch.nn.Module):
        super().__init__()
        self.rm = rm

    def forward(self, examples: list[dict], pad_id: int, row_tokens: int, group_sizes: list[int] | None = None) -> torch.Tensor:
        """group_sizes: the examples come in groups sharing a prompt, forwarded once each (grouped_rewards)."""
        if group_sizes is not None:
            return grouped_rewards(self.rm, examples, group_sizes, pad_id, row_tokens)
        return packed_rewards(self.rm, examples, pad_id, row_tokens)


# --------------------------------------------------------------------------------- input text


def reward_example(
    tokenizer: Any, prompt: list[dict] | str, response: str, max_length: int, keep_cut_response: bool = False
) -> dict | None:
    """Token ids of prompt + response + end-of-turn, ending AT the end-of-turn token.

    Returns {"input_ids", "labels" (response + end-of-turn), "truncated": bool} with at most
    max_length tokens: a longer sequence loses the start of its prompt (data.chat.cut_from_left, as
    every stage's prompt + completion). When even the response and its end-of-turn exceed max_length:
    None, or (keep_cut_response) the last max_length tokens.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    full = tokenize_prompt_completion(tokenizer, messages, response, NO_LIMIT)
    if full is None:  # cannot happen without truncation; kept for a template that renders nothing
        return None
    end = max(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX) + 1  # after the end-of-turn
    whole = {"input_ids": full["input_ids"][:end], "labels": full["labels"][:end]}
    kept = cut_from_left(whole, max_length, keep_cut_response)
    return None if kept is None else {**kept, "truncated": kept is not whole}


def score_texts(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict] | str],
    responses: list[str],
    batch_size: int = 16,
    max_length: int = 1024,
    per_member: bool = False,
) -> list[float] | list[list[float]]:
    """Reward of each (prompt, response) pair; prompts are messages or a user string (per_member: an
    ensemble's rewards per member, [M][N]).

    Texts are tokenized with the RM's own tokenizer; a response longer than max_length is scored on
    its last max_length tokens. `batch_size` examples are packed into each forward.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    examples = [reward_example(tokenizer, p, r, max_length, keep_cut_response=True) for p, r in zip(prompts, responses)]
    return score_examples(model, examples, batch_size, max_length, per_member)


def score_examples(model: Any, examples: list[dict], batch_size: int, row_tokens: int,
                   per_member: bool = False) -> list[float] | list[list[float]]:
    """Rewards of token examples (from `reward_example`), `batch_size` per packed forward, no grad.

    per_member (a RewardEnsemble): each member's rewards, [M][N], instead of their mean."""
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    if per_member and not isinstance(model, RewardEnsemble):
        raise ValueError("per_member scores need a reward-model ensemble (alignkit rm ensemble=k)")
    score = member_rewards if per_member else packed_rewards
    was_training = model.training
    model.eval()
    parts: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            parts.append(score(model, examples[start : start + batch_size], pad_id, row_tokens))
    model.train(was_training)
    if not parts:
        return [[] for _ in model.members] if per_member else []
    return torch.cat(parts, dim=-1).tolist()
