"""`alignkit dpo`: direct preference optimisation (DPO, IPO, conservative DPO) against a frozen reference.

config -> preference records (explicit prompt, chat lists, or hh-rlhf implicit prompts) -> each side
tokenized as prompt + completion with labels on the completion only (a side longer than max_length loses
the start of its prompt; pairs with a completion that alone does not fit are dropped and counted) ->
reference log-probs -> the shared loop, one row = one pair (weight 1) -> `final/` + `summary.json`.

Reference (DPO's pi_ref): `ref_model`, or the starting policy. With `precompute_ref=true` (default) the
reference log-probs of every train and held-out pair are computed once before training, cached in
`output_dir/ref_logps.pt` under a fingerprint of the reference weights and the token ids (reused on
resume and reruns), and the reference model is not kept in memory. With `precompute_ref=false` it stays
in memory, frozen in eval mode, and runs beside every micro-batch; under LoRA with no `ref_model` the
reference is the policy with its adapters disabled (no second copy).

Each micro-batch scores chosen and rejected of all its pairs in ONE forward (runtime.sequences.shared_prefix_logps):
a pair's prompt is in it once and both completions read it through a 4D mask, pairs are packed first-fit into
rows as long as the longest pair (no row is wider than a padded batch would be), and the LM head runs only on
positions that predict a completion token. Log-probs are summed over completion tokens (docs/architecture.md,
"Reductions"). `sft_weight` adds sft_weight * NLL of the chosen completion, averaged over that
completion's tokens (a per-pair token mean, so long and short answers weigh the same), summed over
pairs and divided by the number of pairs like the DPO term.

Metrics (TRL's names): loss, rewards/chosen, rewards/rejected, rewards/accuracies (chosen reward >
rejected reward, a tie counts as wrong, as in TRL), rewards/margins, logps/chosen, logps/rejected.
Held-out (eval_*): loss (DPO term), reward_accuracy (a tie counts as half, so policy == reference
scores exactly 0.5, chance), reward_margin, reward_chosen, reward_rejected, and gold_accuracy (how
often the implicit reward orders a pair as the built-in task's gold reward does) when the pairs carry
the task's gold meta.
"""

from __future__ import annotations

import array
import copy
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from alignkit.config import ConfigError, DPOConfig
from alignkit.data.chat import tokenize_prompt_completion
from alignkit.data.records import DataError
from alignkit.losses import LOSS_TYPES, dpo_loss
from alignkit.runtime.sequences import shared_prefix_logps
from alignkit.runtime.stage import finish_run, load_policy, load_train_eval, start_run
from alignkit.runtime.train_loop import save_final, train

REF_CACHE = "ref_logps.pt"

# ref(model, split, pair indices) -> (reference chosen logps [B], reference rejected logps [B]).
RefLogps = Callable[[torch.nn.Module, str, list[int]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Pair:
    """One tokenized preference pair. chosen/rejected: {"input_ids", "labels"} (labels -100 off the completion).
    gold: the built-in task's gold reward of (chosen, rejected) when the record carries it."""

    chosen: dict
    rejected: dict
    gold: tuple[float, float] | None = None


# ---------------------------------------------------------------------------------------- data


def check_options(cfg: DPOConfig) -> None:
    """Loss options that must fail before any model is loaded."""
    if cfg.loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type: {cfg.loss_type!r} is not one of {', '.join(sorted(LOSS_TYPES))}")
    if cfg.beta <= 0:
        raise ConfigError(f"beta must be > 0, got {cfg.beta}")
    if not 0.0 <= cfg.label_smoothing <= 0.5:
        raise ConfigError(f"label_smoothing must be in [0, 0.5], got {cfg.label_smoothing}")
    if cfg.label_smoothing and cfg.loss_type != "sigmoid":
        raise ConfigError("label_smoothing (conservative DPO) applies to loss_type=sigmoid only")
    if cfg.sft_weight < 0:
        raise ConfigError(f"sft_weight must be >= 0, got {cfg.sft_weight}")


def _gold(record: dict) -> tuple[float, float] | None:
    meta = record.get("meta") or {}
    chosen, rejected = meta.get("gold_chosen"), meta.get("gold_rejected")
    if isinstance(chosen, (int, float)) and isinstance(rejected, (int, float)):
        return float(chosen), float(rejected)
    return None


def tokenize_pairs(tokenizer, records: list[dict], max_length: int) -> tuple[list[Pair], dict[str, int]]:
    """(pairs, drop counts). A side longer than max_length keeps its last tokens (the prompt loses its
    oldest turns, data.chat.tokenize_prompt_completion). A pair is dropped when a completion alone does not
    fit ("truncated") or both sides are identical ("identical": nothing to prefer)."""
    pairs: list[Pair] = []
    dropped = {"truncated": 0, "identical": 0}
    for record in records:
        chosen = tokenize_prompt_completion(tokenizer, record["prompt"], record["chosen"], max_length)
        rejected = tokenize_prompt_completion(tokenizer, record["prompt"], record["rejected"], max_length)
        if chosen is None or rejected is None:
            dropped["truncated"] += 1
        elif chosen == rejected:
            dropped["identical"] += 1
        else:
            pairs.append(Pair(chosen, rejected, _gold(record)))
    return pairs, dropped


def pair_logps(model, pairs: list[Pair], pad_id: int, row_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen logps [B], rejected logps [B], chosen completion tokens [B]): summed completion log-probs
    of both sides of B pairs from one packed forward, each pair's prompt in it once (shared_prefix_logps)."""
    sums, counts = shared_prefix_logps(model, [e for p in pairs for e in (p.chosen, p.rejected)], [2] * len(pairs),
                                       pad_id, row_tokens)
    return sums[0::2], sums[1::2], counts[0::2]


def _my_chunks(accelerator: Accelerator, n: int, size: int) -> list[list[int]]:
    """Chunks [0,size), [size,2size), ... of range(n), dealt round-robin to processes: this process's share.

    The grouping depends only on `size`, so a pair's log-prob is the same float on 1 or N processes, and
    policy and reference scored through the same chunks agree bit for bit while they are the same model."""
    starts = range(0, n, size)
    return [list(range(s, min(s + size, n))) for k, s in enumerate(starts) if k % accelerator.num_processes == accelerator.process_index]


# ----------------------------------------------------------------------------------- reference


def compute_ref_logps(accelerator: Accelerator, ref_model, pairs: list[Pair], pad_id: int, row_tokens: int, chunk: int) -> torch.Tensor:
    """Reference logps [N,2] (chosen, rejected) of every pair, no grad, eval mode. Every process computes
    its chunks into a zero table; a sum over processes completes it (each entry has one author, so the
    sum adds exact zeros)."""
    table = torch.zeros(len(pairs), 2, device=accelerator.device)
    was_training = ref_model.training
    ref_model.eval()
    with torch.no_grad():
        for idx in _my_chunks(accelerator, len(pairs), chunk):
            chosen, rejected, _ = pair_logps(ref_model, [pairs[i] for i in idx], pad_id, row_tokens)
            table[idx] = torch.stack([chosen, rejected], dim=1).float()
    ref_model.train(was_training)
    return accelerator.reduce(table, "sum") if accelerator.num_processes > 1 else table


def ref_fingerprint(ref_model, splits: dict[str, list[Pair]], row_tokens: int, chunk: int) -> str:
    """sha256 of the reference weights, every pair's token ids and labels, and the forward grouping."""
    h = hashlib.sha256(f"dpo-ref|{row_tokens}|{chunk}".encode())
    for name, tensor in sorted(ref_model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    for split, pairs in splits.items():
        h.update(f"|{split}:{len(pairs)}".encode())
        for p in pairs:
            for side in (p.chosen, p.rejected):
                h.update(array.array("q", side["input_ids"]).tobytes())
                h.update(array.array("q", side["labels"]).tobytes())
    return h.hexdigest()


def cached_ref_logps(accelerator: Accelerator, ref_model, splits: dict[str, list[Pair]], pad_id: int,
                     row_tokens: int, chunk: int, output_dir: str) -> tuple[dict[str, torch.Tensor], str]:
    """({split: logps [N,2]}, "cached" | "computed"), reading/writing output_dir/ref_logps.pt."""
    path = Path(output_dir) / REF_CACHE
    fingerprint = ref_fingerprint(ref_model, splits, row_tokens, chunk)
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("fingerprint") == fingerprint:
            return {k: saved[k].to(accelerator.device) for k in splits}, "cached"
    tables = {k: compute_ref_logps(accelerator, ref_model, pairs, pad_id, row_tokens, chunk) for k, pairs in splits.items()}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = path.with_suffix(".tmp")
        torch.save({"fingerprint": fingerprint, **{k: v.cpu() for k, v in tables.items()}}, tmp)
        tmp.replace(path)  # atomic: a killed run never leaves a half-written cache
    accelerator.wait_for_everyone()
    return tables, "computed"


def load_ref_model(cfg: DPOConfig, tokenizer):
    """The model named by cfg.ref_model; it must score the policy tokenizer's ids."""
    from alignkit.models.loading import load_causal_lm

    ref, _ = load_causal_lm(cfg.ref_model, tokenizer=cfg.tokenizer, seed=cfg.seed)
    rows = ref.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise ConfigError(f"ref_model {cfg.ref_model!r} has {rows} token embeddings but the policy tokenizer has "
                          f"{len(tokenizer)} tokens: the reference must share the policy's tokenizer")
    return ref


def _is_peft(model) -> bool:
    from alignkit.models.lora import is_peft_model

    return is_peft_model(model)


def build_reference(accelerator: Accelerator, cfg: DPOConfig, model, tokenizer, splits: dict[str, list[Pair]],
                    row_tokens: int) -> tuple[RefLogps, dict]:
    """The reference log-prob lookup for training and evaluation, and summary facts about it."""
    pad_id, chunk = tokenizer.pad_token_id, cfg.micro_batch_size
    separate = load_ref_model(cfg, tokenizer) if cfg.ref_model else None
    if cfg.precompute_ref:
        t0 = time.perf_counter()
        scorer = (separate or model).to(accelerator.device)
        tables, how = cached_ref_logps(accelerator, scorer, splits, pad_id, row_tokens, chunk, cfg.output_dir)
        del separate, scorer  # the reference is not kept: its log-probs are all we need
        facts = {"ref_logps": how, "ref_precompute_s": time.perf_counter() - t0}

        def lookup(_model, split: str, idx: list[int]):
            rows = tables[split][idx]
            return rows[:, 0], rows[:, 1]

        return lookup, facts

    lora_ref = separate is None and _is_peft(model)
    ref = None if lora_ref else (separate or copy.deepcopy(model))
    if ref is not None:
        ref.to(accelerator.device).eval().requires_grad_(False)

    def on_the_fly(model, split: str, idx: list[int]):
        pairs = [splits[split][i] for i in idx]
        if ref is not None:
            with torch.no_grad():
                chosen, rejected, _ = pair_logps(ref, pairs, pad_id, row_tokens)
            return chosen, rejected
        policy = accelerator.unwrap_model(model)  # the base model = the policy with its adapters off
        was_training = policy.training
        policy.eval()
        with torch.no_grad(), policy.disable_adapter():
            chosen, rejected, _ = pair_logps(policy, pairs, pad_id, row_tokens)
        policy.train(was_training)
        return chosen, rejected

    return on_the_fly, {"ref_logps": "adapters_disabled" if lora_ref else "on_the_fly"}


# ------------------------------------------------------------------------------ loss and eval


def pair_losses(cfg: DPOConfig, pc, pr, rc, rr):
    """dpo_loss with the run's options: (losses [B], chosen rewards [B], rejected rewards [B])."""
    return dpo_loss(pc, pr, rc, rr, beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)


def make_micro_loss(cfg: DPOConfig, pairs: list[Pair], ref: RefLogps, pad_id: int, row_tokens: int):
    def micro_loss(model, indices: list[int]):
        pc, pr, n_chosen = pair_logps(model, [pairs[i] for i in indices], pad_id, row_tokens)
        rc, rr = ref(model, "train", indices)
        losses, chosen_r, rejected_r = pair_losses(cfg, pc, pr, rc, rr)
        loss_sum = losses.sum()
        metrics = {
            "rewards/chosen": chosen_r.sum(),
            "rewards/rejected": rejected_r.sum(),
            "rewards/accuracies": (chosen_r > rejected_r).float().sum(),
            "rewards/margins": (chosen_r - rejected_r).sum(),
            "logps/chosen": pc.detach().sum(),
            "logps/rejected": pr.detach().sum(),
        }
        if cfg.sft_weight > 0:
            nll = -pc / n_chosen.clamp(min=1)  # per-pair mean over chosen completion tokens
            loss_sum = loss_sum + cfg.sft_weight * nll.sum()
            metrics["nll/chosen"] = nll.detach().sum()
        return loss_sum, metrics

    return micro_loss


def evaluate_pairs(accelerator: Accelerator, cfg: DPOConfig, model, pairs: list[Pair], ref: RefLogps,
                   pad_id: int, row_tokens: int) -> dict[str, float]:
    """Held-out DPO loss, implicit-reward accuracy (ties half), margins, and gold accuracy when known."""
    if not pairs:
        return {}
    # loss, accuracy, margin, chosen reward, rejected reward, gold agreement, pairs with gold
    sums = torch.zeros(7, device=accelerator.device, dtype=torch.float64)
    for idx in _my_chunks(accelerator, len(pairs), cfg.micro_batch_size):
        batch = [pairs[i] for i in idx]
        pc, pr, _ = pair_logps(model, batch, pad_id, row_tokens)
        rc, rr = ref(model, "eval", idx)
        losses, chosen_r, rejected_r = pair_losses(cfg, pc, pr, rc, rr)
        gap = (chosen_r - rejected_r).double()
        wins = (gap > 0).double() + 0.5 * (gap == 0).double()
        golds = [(k, p.gold) for k, p in enumerate(batch) if p.gold is not None]
        gold_agree = sum(_agreement(gap[k].item(), g[0] - g[1]) for k, g in golds)
        sums += torch.tensor([losses.sum().item(), wins.sum().item(), gap.sum().item(), chosen_r.sum().item(),
                              rejected_r.sum().item(), gold_agree, len(golds)], device=sums.device, dtype=sums.dtype)
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, "sum")
    s = sums.tolist()
    n = len(pairs)
    out = {"loss": s[0] / n, "reward_accuracy": s[1] / n, "reward_margin": s[2] / n,
           "reward_chosen": s[3] / n, "reward_rejected": s[4] / n}
    if s[6] > 0:
        out["gold_accuracy"] = s[5] / s[6]
    return out


def _agreement(reward_gap: float, gold_gap: float) -> float:
    """1 when the implicit reward orders the pair as gold does, 0 when opposite, 0.5 for a tie of either."""
    if reward_gap == 0 or gold_gap == 0:
        return 0.5
    return 1.0 if (reward_gap > 0) == (gold_gap > 0) else 0.0


# ----------------------------------------------------------------------------------------- run


def run(cfg: DPOConfig) -> dict:
    check_options(cfg)
    started = time.time()
    accelerator = start_run(cfg)

    train_records, eval_records, invalid = load_train_eval(cfg, kind="preference")
    model, tokenizer = load_policy(accelerator, cfg, train_records)
    train_pairs, dropped = tokenize_pairs(tokenizer, train_records, cfg.max_length)
    if not train_pairs:
        raise DataError(
            f"no training pair left out of {len(train_records)}: {dropped['truncated']} lost a whole completion to "
            f"truncation at max_length={cfg.max_length} and {dropped['identical']} had identical sides after it; "
            "raise max_length or shorten the prompts"
        )
    eval_pairs, eval_dropped = tokenize_pairs(tokenizer, eval_records, cfg.max_length)
    eval_pairs = eval_pairs[: cfg.max_eval_rows] if cfg.max_eval_rows > 0 else eval_pairs
    row_tokens = cfg.row_tokens or 1  # 0: rows as long as the longest sequence of the forward (see DPOConfig)
    pad_id = tokenizer.pad_token_id

    ref, ref_facts = build_reference(accelerator, cfg, model, tokenizer, {"train": train_pairs, "eval": eval_pairs}, row_tokens)
    model, summary = train(
        cfg,
        accelerator,
        model,
        row_weights=[1.0] * len(train_pairs),
        micro_loss=make_micro_loss(cfg, train_pairs, ref, pad_id, row_tokens),
        evaluate=lambda m: evaluate_pairs(accelerator, cfg, m, eval_pairs, ref, pad_id, row_tokens),
        stage="dpo",
        input_tokens=[len(p.chosen["input_ids"]) + len(p.rejected["input_ids"]) for p in train_pairs],
    )
    save_final(accelerator, model, tokenizer, cfg.output_dir)
    summary["train_pairs"] = int(summary.pop("train_weight"))
    summary.update(
        ref_facts,
        examples_per_s=summary["train_pairs"] / max(summary["train_s"], 1e-9),
        n_train_records=len(train_records),
        n_eval_records=len(eval_records),
        n_train_pairs=len(train_pairs),
        n_eval_pairs=len(eval_pairs),
        invalid_records=len(invalid),
        dropped_pairs=dropped["truncated"],
        dropped_identical_pairs=dropped["identical"],
        dropped_eval_pairs=eval_dropped["truncated"] + eval_dropped["identical"],
    )
    return finish_run(accelerator, cfg, summary, started)
