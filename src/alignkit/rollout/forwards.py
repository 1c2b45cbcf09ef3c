"""The policy and critic forwards over (prompt, response) samples, shared by the rollout's no-grad forwards
(rollout.ppo.rollout_forwards) and the update (stages/ppo.py micro_step): a padded batch of samples, the logits
that score each response token (a prompt shared by several rows runs once), log-probs, entropy and values
(of a separate critic, or of a value head on the policy's own last hidden state: share_backbone), and the
reference's log-probs (a frozen copy, or the LoRA policy with its adapters off); and where a frozen model
lives between the forwards that read it (offload_frozen: resident).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from alignkit.ops import entropy_from_logits, forward_batch, logprobs_from_logits
from alignkit.rollout.sampling import Generation, prefix_cache
from alignkit.runtime.lm import output_head
from alignkit.runtime.train_loop import is_sharded


def prompt_groups(prompt_ids: list[list[int]]) -> tuple[list[int], list[int]]:
    """(first row of each distinct prompt [U], the distinct prompt of every row [B]), in order of appearance.

    [[1, 2], [3], [1, 2]] -> ([0, 1], [0, 1, 0])."""
    first: list[int] = []
    seen: dict[tuple[int, ...], int] = {}
    of_row = []
    for row, ids in enumerate(prompt_ids):
        key = tuple(ids)
        if key not in seen:
            seen[key] = len(first)
            first.append(row)
        of_row.append(seen[key])
    return first, of_row


def batch_on(samples: list[Generation], pad_id: int, device) -> dict[str, torch.Tensor]:
    """ops.forward_batch of these samples, on `device`; plus prompt_first [U] and prompt_of_row [B]
    (prompt_groups) when some rows share a prompt, so response_logits runs each prompt once."""
    prompts = [s.prompt_ids for s in samples]
    batch = forward_batch(prompts, [s.response_ids for s in samples], pad_id)
    first, of_row = prompt_groups(prompts)
    if len(first) < len(samples):
        batch.update(prompt_first=torch.tensor(first), prompt_of_row=torch.tensor(of_row))
    return {k: v.to(device) for k, v in batch.items()}


@contextmanager
def output_layer_inputs(model):
    """A list that fills with the inputs of `model`'s output projection (the LM head) while in the block: the
    last hidden states (after the final norm) of exactly the positions projected on the vocabulary, with their
    autograd graph. A hook instead of output_hidden_states, which would keep every layer's states alive."""
    seen: list[torch.Tensor] = []
    handle = output_head(model).register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def response_logits(model, batch: dict[str, torch.Tensor], keep_hidden: bool = False):
    """Logits [B,R,V] of the positions that choose each response token (column k scores response token k);
    keep_hidden: (logits, last hidden states [B,R,H] of the same positions).

    Rows that share a prompt (the G samples of a group: batch_on's prompt_first / prompt_of_row) share its
    forward: the first W-1 prompt columns run once per distinct prompt, their KV cache (with its autograd
    graph) is indexed out to every row, and the rows run only the last prompt column and the response. The
    same function of the weights as one padded forward over whole sequences (tested: equal log-probs and
    gradients), at a fraction of the tokens when prompts are longer than responses (tiny sort task, G=8:
    prompts are 3/4 of the rollout's tokens). Otherwise one forward; only the R+1 last columns are projected
    on the vocabulary (`logits_to_keep`); always one forward on a sharded model (runtime.train_loop.is_sharded).
    """
    if keep_hidden:
        with output_layer_inputs(model) as seen:
            logits = response_logits(model, batch)
        return logits, seen[-1][:, :-1]  # (the shared prefix's one projected column came first)
    ids, mask, positions = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    n_response = batch["labels"].shape[1]
    width = ids.shape[1] - n_response  # W: the prompt columns
    inner = getattr(model, "module", model)  # DDP / FSDP wrappers
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in inner.modules()) and inner.training
    # Sharded (FSDP2, outside whole_weights): every forward is an all-gather, so every process runs one per
    # micro-batch (the shared prefix would be a second forward on only the processes whose rows share a prompt)
    if "prompt_first" not in batch or width < 2 or checkpointing or is_sharded(inner):  # (checkpointing: no cache)
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                     logits_to_keep=n_response + 1).logits[:, :-1]
    # The prefix runs through the unwrapped module: DDP then sees one forward per backward, and the
    # gradient reaches the same parameters through the cache.
    shared = prefix_cache(inner, ids, mask, positions, width, batch["prompt_first"], batch["prompt_of_row"])
    return model(input_ids=ids[:, width - 1 :], attention_mask=mask, position_ids=positions[:, width - 1 :],
                 use_cache=True, logits_to_keep=n_response + 1, **shared).logits[:, :-1]


def response_logprobs(model, batch: dict[str, torch.Tensor], temperature: float, with_entropy: bool = False,
                      entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs [B,R] of the response tokens under logits / temperature, entropy [B,R] or None).

    entropy_grad=False: the entropy is only logged, so it is computed outside the autograd graph (no backward
    through a second vocabulary-wide softmax).

    The logits are response_logits' (one forward, or a shared forward per prompt). Padding positions hold 0.
    """
    return scored(response_logits(model, batch), batch, temperature, with_entropy, entropy_grad)


@torch.no_grad()
def generation_token_logps(model, generations: list, pad_id: int, group: int, temperature: float,
                           rows: int = 64) -> list[torch.Tensor]:
    """Per-token log-probs [T_n] (CPU) of each generation's response under logits / temperature.

    generations: prompt-major, `group` samples per prompt; batches of about `rows` rows keep a prompt's samples
    together, so response_logprobs runs each prompt once for all of them (the same numbers as
    eval.scoring.token_logps on the whole sequences, to float rounding: tests/stages/test_eval_kl.py). `alignkit
    eval` scores its KL with it."""
    device = next(model.parameters()).device
    step = max(group, rows // group * group)
    out: list[torch.Tensor] = []
    for start in range(0, len(generations), step):
        batch = batch_on(generations[start:start + step], pad_id, device)
        logps, _ = response_logprobs(model, batch, temperature)
        out.extend(row[mask.bool()].cpu() for row, mask in zip(logps, batch["mask"]))
    return out


def scored(logits: torch.Tensor, batch: dict[str, torch.Tensor], temperature: float, with_entropy: bool,
           entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs [B,R], entropy [B,R] or None) of response_logits' logits: response_logprobs' arithmetic."""
    logits = logits.float() / temperature  # column k scores response token k
    logps = logprobs_from_logits(logits, batch["labels"])
    entropy = None
    if with_entropy:  # detached logits build no graph for a logged-only entropy
        entropy = entropy_from_logits(logits if entropy_grad else logits.detach()) * batch["mask"]
    return logps, entropy


def logprobs_and_values(model, value_head, batch: dict[str, torch.Tensor], temperature: float,
                        with_entropy: bool = False, entropy_grad: bool = True):
    """share_backbone: (log-probs [B,R], entropy [B,R] or None, values [B,R]) from ONE forward of the policy,
    the values read by `value_head` (models.value.ValueHead) off the hidden states the LM head projects."""
    logits, hidden = response_logits(model, batch, keep_hidden=True)
    logps, entropy = scored(logits, batch, temperature, with_entropy, entropy_grad)
    return logps, entropy, value_head(hidden) * batch["mask"]


def head_values(model, value_head, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """share_backbone's critic warm-up: values [B,R] of `value_head` on the policy's hidden states computed
    without a gradient (the backbone waits; only the head learns). `model` unwrapped: no DDP forward runs
    whose parameters get no gradient."""
    with torch.no_grad():
        _, hidden = response_logits(model, batch, keep_hidden=True)
    return value_head(hidden) * batch["mask"]


def reference_logprobs(ref, policy, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """Log-probs [B,R] under the frozen reference: `ref`, or with ref None (a LoRA policy) the policy with its
    adapters disabled (peft's disable_adapter: the base weights, exactly the starting policy; no copy held)."""
    if ref is not None:
        return response_logprobs(ref, batch, temperature)[0]
    with policy.disable_adapter():
        return response_logprobs(policy, batch, temperature)[0]


def response_values(critic, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Critic values [B,R]: value of the state each response token is chosen in (0 on padding)."""
    n_response = batch["labels"].shape[1]
    values = critic(batch["input_ids"], batch["attention_mask"], batch["position_ids"], n_response + 1)
    return values[:, :-1] * batch["mask"]


@contextmanager
def resident(model, device, offload: bool):
    """offload_frozen: a frozen model (reference, reward model) kept on the CPU is moved to `device` for the
    block (the rollout phase that reads it) and back to the CPU after it, so the update phase has the
    accelerator's memory for the actor and critic. No-op without offload, for None, and on a CPU-only run."""
    if model is None or not offload:
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to("cpu")
