"""`alignkit rm`: a scalar reward model trained on preference pairs or ranked lists.

config -> records (preference pairs, explicit or hh-rlhf implicit prompt; or ranked lists) -> one
training row per record: its K responses (K=2 for a pair: chosen, rejected), each tokenized once as
prompt + response + end-of-turn with the RM's own tokenizer -> the shared loop, where a micro-batch's
responses are packed padding-free into few forwards and the reward is read at each end-of-turn
token -> `final/` (an AutoModelForSequenceClassification with num_labels=1) + `summary.json`.

Loss (InstructGPT / Llama 2): Bradley-Terry over every ordered pair of a row (i better than j by
score; ties excluded), each pair once: -log sigmoid(r_i - r_j - m_ij). The margin m is 0
(margin=none), the record's 'margin' field (margin=field, pairs), or margin_scale * (score_i -
score_j) (margin=scores, ranked lists). A row weighs its number of pairs, so the loss of a step is
the mean over all pairs of the global batch. Optional reward centring adds
center_rewards_coef * mean(r^2) per row (weighted by its pairs), since Bradley-Terry only sees
differences.

Metrics, per pair (chosen = the better response): accuracy (r_chosen > r_rejected), margin
(mean r_chosen - r_rejected), mean rewards of each side; in training also their mean squares
(std = sqrt(sq - mean^2): the shared loop can only average), on held-out data their std, the
calibration (accuracy per quantile bucket of |r_chosen - r_rejected|, summary's
`eval_calibration`), and, when records carry the built-in task's gold rewards, `gold_accuracy`:
agreement with the GOLD preference (gold ties skipped), which tells whether the RM learned the
task or the annotators' noise and length bias (`label_gold_agreement` is the labels' own).

Ensembles (`ensemble=k`): k members trained as k ordinary runs in members/member-<i>/, each with its own
seed (a fresh head initialisation and data order) from the same starting model, then copied into final/
beside an ensemble.json. k seeds rather than k heads on one shared backbone: members that share the
transformer share its errors, and their spread then understates the uncertainty that active labelling
and the disagreement alarm read (Coste et al. 2023 train independent members for this reason). Started from
an ensemble (model=<ensemble>/final, an iterative refresh), member i continues member i.

Past 400 lines because the ensemble runs its members through this same run(), beside the single model's loop.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from alignkit.config import ConfigError, RMConfig
from alignkit.data.records import DataError
from alignkit.losses import bradley_terry_loss, ranking_loss, reward_centering_penalty
from alignkit.models.reward import PackedRewardModel, load_reward_model, reward_example
from alignkit.runtime.stage import finish_run, load_train_eval, record_texts, start_run
from alignkit.runtime.train_loop import save_final, train

MARGIN_MODES = ("none", "field", "scores")


# ------------------------------------------------------------------------------------------ rows


def ordered_pairs(scores: list[float]) -> list[tuple[int, int]]:
    """(i, j) for every i scored strictly above j; ties give no pair."""
    return [(i, j) for i in range(len(scores)) for j in range(len(scores)) if scores[i] > scores[j]]


def _responses(record: dict, where: str) -> tuple[list[str], list[float], list[float] | None]:
    """(responses, scores, gold rewards or None) of a preference or ranked record."""
    meta = record.get("meta") or {}
    if "chosen" in record:
        gold = [meta["gold_chosen"], meta["gold_rejected"]] if "gold_chosen" in meta and "gold_rejected" in meta else None
        return [record["chosen"], record["rejected"]], [1.0, 0.0], gold
    if "responses" in record:
        gold = meta.get("gold")
        ok = isinstance(gold, list) and len(gold) == len(record["responses"])
        return record["responses"], record["scores"], gold if ok else None
    raise DataError(f"{where}: rm trains on preference or ranked records; got fields {sorted(record)}")


def _margin(record: dict, cfg: RMConfig, where: str) -> float | None:
    if cfg.margin != "field":
        return None
    if "chosen" not in record or "margin" not in record:
        raise DataError(f"{where}: margin=field needs preference records with a numeric 'margin' field")
    return float(record["margin"])


def build_rows(tokenizer, records: list[dict], cfg: RMConfig, name: str) -> tuple[list[dict], int, int]:
    """(rows, records dropped because a response does not fit max_length, rows with a cut prompt).

    A row: examples (one token example per response), scores, pairs (ordered by score), margin
    (margin=field) and gold (built-in task) or None.
    """
    rows, dropped, truncated = [], 0, 0
    for n, record in enumerate(records, start=1):
        where = f"{name} record {n} (prompt {str(record.get('prompt'))[:60]!r})"
        responses, scores, gold = _responses(record, where)
        if cfg.margin == "scores" and "chosen" in record:
            raise DataError(f"{where}: margin=scores needs ranked records (scores per response); use margin=field for pairs")
        margin = _margin(record, cfg, where)
        examples = [reward_example(tokenizer, record["prompt"], r, cfg.max_length) for r in responses]
        if any(e is None for e in examples):
            dropped += 1
            continue
        truncated += any(e["truncated"] for e in examples)
        rows.append({"examples": examples, "scores": scores, "pairs": ordered_pairs(scores), "margin": margin, "gold": gold})
    return rows, dropped, truncated


# ------------------------------------------------------------------------------------------ loss


def rows_loss_sum(rewards: list[torch.Tensor], rows: list[dict], cfg: RMConfig) -> torch.Tensor:
    """Sum over every ordered pair of the rows of -logsigmoid(r_i - r_j - margin). rewards[b]: [K_b].

    Rows of equal K are batched into one `ranking_loss` (its mean over pairs times their count).
    """
    total = rewards[0].new_zeros(())
    if cfg.margin == "field":  # pairs only (checked when the rows were built)
        chosen = torch.stack([r[0] for r in rewards])
        rejected = torch.stack([r[1] for r in rewards])
        margin = torch.tensor([row["margin"] for row in rows], dtype=chosen.dtype, device=chosen.device)
        return bradley_terry_loss(chosen, rejected, margin) * len(rows)
    scale = cfg.margin_scale if cfg.margin == "scores" else 0.0
    for k in sorted({len(r) for r in rewards}):
        group = [b for b, r in enumerate(rewards) if len(r) == k]
        stacked = torch.stack([rewards[b] for b in group])
        scores = torch.tensor([rows[b]["scores"] for b in group], dtype=stacked.dtype, device=stacked.device)
        n_pairs = sum(len(rows[b]["pairs"]) for b in group)
        total = total + ranking_loss(stacked, scores, margin_scale=scale) * n_pairs
    return total


def centering_sum(rewards: list[torch.Tensor], rows: list[dict]) -> torch.Tensor:
    """Sum over rows of (pairs in the row) * mean(r^2) of the row."""
    return sum(reward_centering_penalty(r) * len(row["pairs"]) for r, row in zip(rewards, rows))


def pair_rewards(rewards: list[torch.Tensor], rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen[P], rejected[P]): the rewards of the better and worse response of every pair."""
    better = [r[i] for r, row in zip(rewards, rows) for i, _ in row["pairs"]]
    worse = [r[j] for r, row in zip(rewards, rows) for _, j in row["pairs"]]
    return torch.stack(better), torch.stack(worse)


def split_rewards(flat: torch.Tensor, rows: list[dict]) -> list[torch.Tensor]:
    """flat[sum K] in row order -> one [K] tensor per row."""
    return list(torch.split(flat, [len(row["examples"]) for row in rows]))


def row_rewards(model, rows: list[dict], pad_id: int, row_tokens: int, share_prompt: bool = True) -> list[torch.Tensor]:
    """Every response of `rows` through the model once, in packed forwards; share_prompt: each row's prompt
    (the responses' common prefix) forwarded once for all its responses (models.reward.grouped_rewards)."""
    examples = [e for row in rows for e in row["examples"]]
    sizes = [len(row["examples"]) for row in rows] if share_prompt else None
    return split_rewards(model(examples, pad_id, row_tokens, group_sizes=sizes), rows)


def make_micro_loss(rows: list[dict], cfg: RMConfig, pad_id: int, row_tokens: int):
    def micro_loss(model, indices: list[int]):
        chunk = [rows[i] for i in indices]
        rewards = row_rewards(model, chunk, pad_id, row_tokens, cfg.share_prompt)
        loss = rows_loss_sum(rewards, chunk, cfg)
        chosen, rejected = pair_rewards([r.detach() for r in rewards], chunk)
        metrics = {
            "accuracy": (chosen > rejected).float().sum(),
            "margin": (chosen - rejected).sum(),
            "chosen_reward": chosen.sum(),
            "rejected_reward": rejected.sum(),
            "chosen_reward_sq": (chosen**2).sum(),
            "rejected_reward_sq": (rejected**2).sum(),
        }
        if cfg.center_rewards_coef > 0:
            penalty = centering_sum(rewards, chunk)
            loss = loss + cfg.center_rewards_coef * penalty
            metrics["center_penalty"] = penalty.detach()
        return loss, metrics

    return micro_loss


# ------------------------------------------------------------------------------------ evaluation


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def calibration(diffs: list[float], buckets: int) -> list[dict]:
    """Accuracy per equal-count bucket of |r_chosen - r_rejected| (small to large).

    A calibrated RM is right more often where it is more confident. Each bucket: n, the |diff|
    range, accuracy.
    """
    ordered = sorted(diffs, key=abs)
    n = len(ordered)
    out = []
    for b in range(min(buckets, n)):
        part = ordered[b * n // min(buckets, n) : (b + 1) * n // min(buckets, n)]
        out.append({"bucket": b + 1, "n": len(part), "abs_diff_min": abs(part[0]), "abs_diff_max": abs(part[-1]),
                    "accuracy": sum(d > 0 for d in part) / len(part)})
    return out


def pair_summary(pairs: list[tuple[float, float, float, float]], buckets: int) -> tuple[dict, list[dict]]:
    """Metrics from (chosen reward, rejected reward, pair loss, gold sign) per pair.

    gold sign: +1 the gold reward agrees with the label, -1 disagrees, 0 tie or unknown.
    """
    chosen = [p[0] for p in pairs]
    rejected = [p[1] for p in pairs]
    diffs = [c - r for c, r in zip(chosen, rejected)]
    n = len(pairs)
    out = {
        "loss": sum(p[2] for p in pairs) / n,
        "accuracy": sum(d > 0 for d in diffs) / n,
        "margin": sum(diffs) / n,
        "chosen_reward": sum(chosen) / n,
        "chosen_reward_std": _std(chosen),
        "rejected_reward": sum(rejected) / n,
        "rejected_reward_std": _std(rejected),
        "n_pairs": float(n),
    }
    gold = [(d, p[3]) for d, p in zip(diffs, pairs) if p[3] != 0]
    if gold:
        # Right against gold: the RM prefers the side the gold reward prefers.
        out["gold_accuracy"] = sum((d > 0) == (sign > 0) for d, sign in gold) / len(gold)
        out["label_gold_agreement"] = sum(sign > 0 for _, sign in gold) / len(gold)
    table = calibration(diffs, buckets)
    out.update({f"accuracy_q{c['bucket']}": c["accuracy"] for c in table})
    return out, table


def _gold_sign(row: dict, i: int, j: int) -> float:
    if row["gold"] is None or row["gold"][i] == row["gold"][j]:
        return 0.0
    return 1.0 if row["gold"][i] > row["gold"][j] else -1.0


def pair_margin(row: dict, i: int, j: int, cfg: RMConfig) -> float:
    """The margin of pair (i, j) in the loss: 0, the record's margin, or margin_scale * score gap."""
    if cfg.margin == "field":
        return row["margin"]
    if cfg.margin == "scores":
        return cfg.margin_scale * (row["scores"][i] - row["scores"][j])
    return 0.0


def eval_pairs(model, rows: list[dict], cfg: RMConfig, pad_id: int, row_tokens: int) -> list[tuple]:
    """(chosen reward, rejected reward, pair loss, gold sign) for every pair of `rows`."""
    out = []
    for start in range(0, len(rows), cfg.micro_batch_size):
        chunk = rows[start : start + cfg.micro_batch_size]
        for r, row in zip(row_rewards(model, chunk, pad_id, row_tokens, cfg.share_prompt), chunk):
            for i, j in row["pairs"]:
                margin = torch.tensor([pair_margin(row, i, j, cfg)], dtype=r.dtype, device=r.device)
                loss = bradley_terry_loss(r[i : i + 1], r[j : j + 1], margin)
                out.append((r[i].item(), r[j].item(), loss.item(), _gold_sign(row, i, j)))
    return out


def make_evaluate(accelerator, rows: list[dict], cfg: RMConfig, pad_id: int, row_tokens: int, last: dict):
    """evaluate(model) over held-out rows split across processes; the calibration table goes to `last`."""
    from accelerate.utils import gather_object

    def evaluate(model) -> dict[str, float]:
        if not rows:
            return {}
        mine = rows[accelerator.process_index :: accelerator.num_processes]
        pairs = eval_pairs(accelerator.unwrap_model(model), mine, cfg, pad_id, row_tokens) if mine else []
        pairs = gather_object(pairs) if accelerator.num_processes > 1 else pairs
        metrics, last["calibration"] = pair_summary(pairs, cfg.calibration_buckets)
        return metrics

    return evaluate


# ------------------------------------------------------------------------------------------- run


def apply_rm_lora(model, cfg: RMConfig):
    """LoRA for a reward model: adapters on the transformer, the score head fully trained (and saved)."""
    if cfg.lora.r <= 0:
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                      lora_dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules, modules_to_save=["score"])
    return get_peft_model(model, lora)


def _check_config(cfg: RMConfig) -> None:
    if cfg.margin not in MARGIN_MODES:
        raise ConfigError(f"margin: {cfg.margin!r} is not one of {', '.join(MARGIN_MODES)}")
    if cfg.calibration_buckets < 1:
        raise ConfigError("calibration_buckets must be at least 1")


def _load_model(accelerator, cfg: RMConfig, train_records: list[dict]):
    from alignkit.models.loading import freeze_except, resolve_model_path

    with accelerator.main_process_first():  # a named GGUF model is converted once
        name = resolve_model_path(cfg.model)
    model, tokenizer = load_reward_model(name, cfg.tokenizer, new_head=True, seed=cfg.seed, vocab_size=cfg.vocab_size,
                                         train_texts=lambda: record_texts(train_records))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_rm_lora(model, cfg)
    if cfg.trainable:
        freeze_except(model, cfg.trainable)
    return model, tokenizer


def member_start(model: str, i: int, k: int) -> str:
    """Where member i starts: member i of an ensemble `model` (which must have k members), else `model`."""
    from alignkit.models.reward import ensemble_members

    members = ensemble_members(model)
    if members is None:
        return model
    if len(members) != k:
        raise ConfigError(f"model {model} is an ensemble of {len(members)} reward models; ensemble={k} continues "
                          f"it only with as many members")
    return str(members[i])


def run_ensemble(cfg: RMConfig) -> dict:
    """k members, each an ordinary (resumable) run in members/member-<i>/, then final/ = the ensemble."""
    import dataclasses
    import shutil
    from pathlib import Path

    from alignkit.models.reward import write_ensemble_index
    from alignkit.runtime.setup import derive_seed
    from alignkit.runtime.logging import read_summary

    started = time.time()
    accelerator = start_run(cfg)
    out = Path(cfg.output_dir)
    summaries, names = [], []
    for i in range(cfg.ensemble):
        member_dir = out / "members" / f"member-{i}"
        names.append(f"member-{i}")
        if (member_dir / "summary.json").exists():  # finished before a kill: never redone
            summaries.append(read_summary(member_dir))
            continue
        member = dataclasses.replace(cfg, ensemble=1, seed=derive_seed(cfg.seed, "member", i), output_dir=str(member_dir),
                                     model=member_start(cfg.model, i, cfg.ensemble), resume=member_dir.exists(),
                                     overwrite=False)
        summaries.append(run(member))
    if accelerator.is_main_process:
        final, tmp = out / "final", out / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in names:
            shutil.copytree(out / "members" / name / "final", tmp / name)
        write_ensemble_index(tmp, names)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {"ensemble": cfg.ensemble, "members": [s.get("eval_accuracy") for s in summaries]}
    for key in ("eval_accuracy", "eval_gold_accuracy", "steps", "train_pairs"):
        values = [s[key] for s in summaries if isinstance(s.get(key), (int, float))]
        if values:
            summary[key] = sum(values) / len(values) if key.startswith("eval") else values[0]
    summary["member_summaries"] = [{k: v for k, v in s.items() if k != "provenance"} for s in summaries]
    return finish_run(accelerator, cfg, summary, started)


def run(cfg: RMConfig) -> dict:
    if cfg.ensemble < 1:
        raise ConfigError(f"ensemble must be >= 1 reward models, got {cfg.ensemble}")
    if cfg.ensemble > 1:
        return run_ensemble(cfg)
    started = time.time()
    _check_config(cfg)
    accelerator = start_run(cfg)
    train_records, eval_records, invalid = load_train_eval(cfg, kind=None)
    model, tokenizer = _load_model(accelerator, cfg, train_records)
    pad_id = model.config.pad_token_id
    row_tokens = cfg.row_tokens or 1  # 0: rows as long as the longest sequence of the forward (see RMConfig)

    train_rows, dropped, truncated = build_rows(tokenizer, train_records, cfg, "train_data")
    if not train_rows:
        raise DataError(f"all {len(train_records)} training records have a response longer than "
                        f"max_length={cfg.max_length} tokens; raise max_length")
    eval_rows, eval_dropped, _ = build_rows(tokenizer, eval_records, cfg, "eval_data")
    eval_rows = eval_rows[: cfg.max_eval_rows] if cfg.max_eval_rows > 0 else eval_rows

    last: dict[str, Any] = {}
    wrapped, summary = train(
        cfg,
        accelerator,
        PackedRewardModel(model),
        row_weights=[float(len(row["pairs"])) for row in train_rows],
        micro_loss=make_micro_loss(train_rows, cfg, pad_id, row_tokens),
        evaluate=make_evaluate(accelerator, eval_rows, cfg, pad_id, row_tokens, last),
        stage="rm",
        input_tokens=[sum(len(e["input_ids"]) for e in row["examples"]) for row in train_rows],
    )
    from alignkit.models.loading import save_model

    save_final(accelerator, wrapped, tokenizer, cfg.output_dir, save=lambda m, tok, path: save_model(m.rm, tok, path))
    summary["train_pairs"] = int(summary.pop("train_weight"))
    summary.update(
        eval_calibration=last.get("calibration", []),
        n_train_records=len(train_records),
        n_eval_records=len(eval_records),
        n_eval_rows=len(eval_rows),
        invalid_records=len(invalid),
        dropped_records=dropped,
        dropped_eval_records=eval_dropped,
        truncated_prompts=truncated,
    )
    return finish_run(accelerator, cfg, summary, started)
