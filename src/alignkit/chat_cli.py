"""`alignkit chat MODEL`: talk to a model in its chat template, each reply streamed as it is generated.

MODEL is a run's `final/`, a run directory (its `final/` is used), a local Hugging Face directory or hub
id, or `smollm2-135m-instruct`. The conversation is rendered exactly as training data is
(`alignkit.data.chat.render_prompt`: the tokenizer's chat template, or alignkit's ChatML one for a
tokenizer without a template), so a tiny SFT model chats in the format it was trained on.

Lines typed are user turns; `/reset` clears the history, `/system TEXT` sets the system message (and
clears the history; `/system` alone removes it), `/exit`, end of input or Ctrl-C quits. `--prompt TEXT`
answers once and exits. Replies go to stdout, everything else to stderr, so stdout is the model's text.

Decoding is a function of the options alone (alignkit.rollout.sampling.sampling_config, the model's own
generation_config.json hidden): temperature 0 is greedy; otherwise softmax(logits / temperature),
truncated by --top-k (0: off) and --top-p (1: off). `--seed` seeds the session once, so the same seed
and the same lines give the same replies.

The model-loading and sampling-option helpers here are shared with `alignkit generate`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")


def add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int, seed: int | None) -> None:
    """The decoding options chat and generate share (same names, same meaning)."""
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy; else softmax(logits / T) (default 0.7)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off (default 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help=f"tokens per reply at most (default {max_new_tokens})")
    parser.add_argument("--seed", type=int, default=seed, help=f"sampling seed (default {seed})")


def sampling_settings(args: argparse.Namespace) -> dict:
    """The decoding options as a plain dict (what generate records beside every response)."""
    settings = {key: getattr(args, key) for key in SAMPLING_KEYS}
    if settings["temperature"] < 0 or not 0 < settings["top_p"] <= 1 or settings["top_k"] < 0 or settings["max_new_tokens"] < 1:
        from alignkit.config import ConfigError

        raise ConfigError("need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0, --max-new-tokens >= 1")
    return settings


def model_dir(name: str) -> str:
    """What MODEL names as something from_pretrained loads: a run directory becomes its final/.

    from-scratch presets are refused: they are untrained until a stage trains them.
    """
    from alignkit.models.loading import ModelError, is_scratch, resolve_model_path

    if is_scratch(name):
        raise ModelError(f"{name} is an untrained preset; chat with a trained model, e.g. a run's final/")
    path = Path(name).expanduser()
    if path.is_file():
        raise ModelError(f"{name} is a file; MODEL is a model directory (a run's final/), a run directory or a hub id")
    if path.is_dir() and not (path / "config.json").exists() and (path / "final" / "config.json").exists():
        return str(path / "final")
    return resolve_model_path(name)


def _refuse_reward_model(path: str) -> None:
    """A reward model loads as a causal LM without complaint (its head is dropped): say what it is instead."""
    from alignkit.models.loading import ModelError

    config = Path(path) / "config.json"
    if not config.is_file():
        return
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return  # from_pretrained reports an unreadable config itself
    if architectures and all(a.endswith("ForSequenceClassification") for a in architectures):
        raise ModelError(f"{path} is a reward model ({architectures[0]}), not a model that generates text")


def load_for_generation(name: str):
    """(model in eval mode on the GPU when there is one, tokenizer with a chat template) for MODEL.

    A ModelError's message is cut to its first line: the CLI prints it as one line, and transformers'
    load errors run to several.
    """
    import torch

    from alignkit.models.loading import ModelError, load_causal_lm

    path = model_dir(name)
    _refuse_reward_model(path)
    try:
        model, tokenizer = load_causal_lm(path)
    except ModelError as err:
        raise ModelError(str(err).strip().splitlines()[0]) from None
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    model.eval()
    return model, tokenizer


def generation_config(tokenizer, settings: dict):
    """alignkit.rollout.sampling.sampling_config for these settings, plus top_k (sampling_config leaves it off)."""
    from alignkit.rollout.sampling import sampling_config, stop_ids

    stop = stop_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    do_sample = settings["temperature"] > 0
    config = sampling_config(do_sample, settings["temperature"], settings["top_p"], settings["max_new_tokens"], stop, pad_id)
    if do_sample:
        config.top_k = settings["top_k"]
    return config


def prompt_budget(model, max_new_tokens: int) -> int | None:
    """Prompt tokens that still leave room for a whole reply in the model's context (None: no known limit)."""
    from alignkit.config import ConfigError

    context = getattr(model.config, "max_position_embeddings", None)
    if context is None:
        return None
    if context <= max_new_tokens:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in this model's {context}-token context")
    return context - max_new_tokens


def reply(model, tokenizer, messages: list[dict], settings: dict) -> str:
    """Generate the assistant's next turn for `messages`, printing its tokens to stdout as they come.

    A conversation longer than the context keeps its last tokens (the oldest turns go, as in training
    data). Returns the reply decoded without special tokens, for the history.
    """
    import torch
    from transformers import TextStreamer

    from alignkit.data.chat import render_prompt
    from alignkit.rollout.sampling import model_defaults_hidden

    config = generation_config(tokenizer, settings)
    ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    budget = prompt_budget(model, settings["max_new_tokens"])
    ids = ids[-budget:] if budget else ids
    input_ids = torch.tensor([ids], device=next(model.parameters()).device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad(), model_defaults_hidden(model):
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             generation_config=config, streamer=streamer)
    response = out[0, len(ids):].tolist()
    cut = next((k for k, t in enumerate(response) if t in config.eos_token_id), len(response))
    return tokenizer.decode(response[:cut], skip_special_tokens=True).strip()


def _note(text: str) -> None:
    print(f"[{text}]", file=sys.stderr, flush=True)


def chat_loop(respond: Callable[[list[dict]], str], system: str | None, read: Callable[[str], str]) -> int:
    """Read lines with `read` until /exit or end of input; each other line is a user turn answered by
    `respond(messages)` (the whole conversation so far). Returns the exit code."""
    history: list[dict] = []
    prompt = "you> " if sys.stdin.isatty() else ""
    while True:
        try:
            line = read(prompt).strip()
        except EOFError:
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history.clear()
            _note("history cleared")
            continue
        if line == "/system" or line.startswith("/system "):
            system = line[len("/system"):].strip() or None
            history.clear()
            _note(f"system message {'set' if system else 'removed'}; history cleared")
            continue
        if line.startswith("/"):
            _note("commands: /reset, /system TEXT, /exit")
            continue
        turn = {"role": "user", "content": line}
        text = respond(_conversation(system, history + [turn]))
        history += [turn, {"role": "assistant", "content": text}]


def _conversation(system: str | None, turns: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + turns


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="alignkit chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a run's final/, a run directory, a HF directory or hub id, or smollm2-135m-instruct")
    parser.add_argument("--system", default=None, help="system message at the start of the conversation")
    parser.add_argument("--prompt", default=None, help="answer this one user message and exit")
    add_sampling_args(parser, max_new_tokens=256, seed=None)
    args = parser.parse_args(argv)
    settings = sampling_settings(args)

    import torch

    model, tokenizer = load_for_generation(args.model)
    if settings["seed"] is not None:
        torch.manual_seed(settings["seed"])  # once per session: replies differ turn to turn, runs repeat

    def respond(messages: list[dict]) -> str:
        return reply(model, tokenizer, messages, settings)

    if args.prompt is not None:
        respond(_conversation(args.system, [{"role": "user", "content": args.prompt}]))
        return 0
    try:
        return chat_loop(respond, args.system, input)
    except KeyboardInterrupt:  # Ctrl-C is how a terminal user leaves: a clean exit, not a traceback
        print(file=sys.stderr)
        return 0
