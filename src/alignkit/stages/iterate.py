"""`alignkit iterate`: iterative RLHF with reward-model refresh (Llama 2, Touvron et al. 2023, section 3.2.2).

The reward model limits every online method: trained on the SFT model's samples, it judges what the SFT
model writes, and a policy that moves away finds the places where it is wrong (Gao et al. 2022). Llama 2's
answer is to iterate: label the current policy's new samples and refresh the reward model, so its judgement
keeps up with the policy. Round 0 is the SFT model and the first reward model (`rm_model`, or one trained on
`initial_label_budget` labels of SFT samples). Each round r = 1..R then runs, in round-<r>/:
  1. label:  `alignkit label` samples `n` responses for the round's prompts from the current policy, picks
             `label_budget` comparisons (`select=random|uncertainty|ensemble`, margins of the current reward
             model) and has the `annotator` label them (simulated labeler, gold, a reward model or an LLM judge);
  2. rm:     `alignkit rm` on ALL labels so far, continuing the previous reward model or retrained from the SFT
             model (`rm_refresh`; `none` keeps round 0's: the frozen baseline), `rm_ensemble` seeds each;
  3. policy: a policy round from the previous policy on the refreshed reward model (`policy_method`: ppo, a
             critic-free estimator, raft, rejection sampling), the KL anchored to the SFT model or the previous
             policy (`kl_anchor`);
  4. probe:  gold-labelled random pairs of the NEW policy's samples on held-out prompts (measurement only);
  5. eval:   `alignkit eval` of the SFT model and the new policy on held-out prompts: gold, the current reward
             model's proxy, a fixed held-out reward model's proxy, KL to SFT, the alarms; plus the current reward
             model's gold accuracy on the probe pairs. One line per round in rounds.jsonl.
Every step is its own process (runtime.launch, under `launcher`) in its own folder, done when its summary.json
exists: a run killed anywhere resumes at the step it was in (resume=true) and never redoes a finished one. A
round's line is written last; the final policy is copied to final/.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from alignkit.config import ConfigError, IterateConfig, field_help, save_config
from alignkit.runtime.guards import RunStopped
from alignkit.runtime.launch import run_stage_process, split_step_overrides
from alignkit.runtime.setup import derive_seed

STEPS = ("label", "rm", "policy", "probe", "eval")
# policy_method -> (stage CLI name, its config file in config_dir, fixed overrides)
POLICY_METHODS = {
    "ppo": ("ppo", "ppo", []),
    "grpo": ("grpo", "grpo", []),
    "rloo": ("grpo", "grpo", ["advantage=rloo"]),
    "dr_grpo": ("grpo", "grpo", ["advantage=dr_grpo"]),
    "reinforce_pp": ("grpo", "grpo", ["advantage=reinforce_pp"]),
    "raft": ("raft", "raft", []),
    "rejection_sampling": ("best-of-n", "best_of_n", ["finetune=true"]),
}
REFRESH = ("continue", "retrain", "none")
STOP_ENV = "ALIGNKIT_ITERATE_STOP_AFTER"  # tests: "<round>/<step>" stops the run after that step, as a kill would


def check_config(cfg: IterateConfig) -> None:
    """Config errors before any step runs."""
    if cfg.policy_method not in POLICY_METHODS:
        raise ConfigError(f"policy_method must be one of {', '.join(POLICY_METHODS)}, got {cfg.policy_method!r}")
    if cfg.rm_refresh not in REFRESH:
        raise ConfigError(f"rm_refresh must be one of {', '.join(REFRESH)}, got {cfg.rm_refresh!r}")
    if cfg.kl_anchor not in ("sft", "previous"):
        raise ConfigError(f"kl_anchor must be sft or previous, got {cfg.kl_anchor!r}")
    if cfg.select not in ("random", "uncertainty", "ensemble"):
        raise ConfigError(f"select must be random, uncertainty or ensemble, got {cfg.select!r}")
    if cfg.select == "ensemble" and cfg.rm_ensemble < 2:
        raise ConfigError("select=ensemble reads the spread of a reward-model ensemble: set rm_ensemble >= 2")
    if cfg.rounds < 1 or cfg.prompts_per_round < 1 or cfg.policy_steps < 1 or cfg.n < 2:
        raise ConfigError("rounds, prompts_per_round and policy_steps must be >= 1, n >= 2")
    if cfg.label_budget < 0 or cfg.initial_label_budget < 0 or cfg.probe_pairs < 0:
        raise ConfigError("label budgets and probe_pairs must be >= 0")
    if cfg.rm_model is None and cfg.initial_label_budget == 0:
        raise ConfigError("round 0 needs a reward model: set rm_model, or initial_label_budget > 0 to train one")
    if cfg.rm_refresh != "none" and cfg.label_budget == 0:
        raise ConfigError(f"rm_refresh={cfg.rm_refresh} refreshes on new labels: set label_budget > 0 (or rm_refresh=none)")
    unknown = set(split_step_overrides(cfg.overrides, "iterate", "step")) - set(STEPS)
    if unknown:
        raise ConfigError(f"overrides name unknown steps {sorted(unknown)}; steps: {', '.join(STEPS)}")


class Steps:
    """Runs a round's steps as processes; skips finished ones; knows where each step writes."""

    def __init__(self, cfg: IterateConfig):
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        self.extra = split_step_overrides(cfg.overrides, "iterate", "step")

    def dir(self, r: int, step: str) -> Path:
        return self.out / f"round-{r}" / step

    def done(self, r: int, step: str) -> bool:
        return (self.dir(r, step) / "summary.json").exists()

    def summary(self, r: int, step: str) -> dict:
        return json.loads((self.dir(r, step) / "summary.json").read_text())

    def run(self, r: int, step: str, stage: str, config_name: str, args: list[str]) -> Path:
        """`alignkit <stage> --config config_dir/<config_name>.yaml output_dir=... args + the user's step overrides`."""
        from alignkit.cli import STAGES

        where = self.dir(r, step)
        if not self.done(r, step):
            where.mkdir(parents=True, exist_ok=True)
            keys = {k for k, *_ in field_help(STAGES[stage][1])}
            common = [f"output_dir={where}"] + (["resume=true"] if "resume" in keys else [])
            config_file = Path(self.cfg.config_dir) / f"{config_name}.yaml"
            run_stage_process(stage, f"round-{r}/{step}", config_file if config_file.exists() else None,
                              common + args + self.extra.get(step, []), self.cfg.launcher, where / "log.txt", "iterate")
        if os.environ.get(STOP_ENV) == f"{r}/{step}":
            raise RunStopped(f"stopped after round-{r}/{step} ({STOP_ENV}); rerun the same command to continue", 130)
        return where


# ----------------------------------------------------------------------------------------- prompts


def round_zero_prompts(cfg: IterateConfig) -> int:
    """Prompts labelled in round 0: prompts_per_round, or enough for twice initial_label_budget candidate pairs
    (a frozen arm spends the whole budget there; duplicates remove some candidates)."""
    pairs_per_prompt = cfg.n * (cfg.n - 1) // 2
    return max(cfg.prompts_per_round, math.ceil(2 * cfg.initial_label_budget / pairs_per_prompt))


def round_prompts(cfg: IterateConfig, r: int, records: list[dict]) -> Path:
    """round-<r>/prompts.jsonl: round r's slice of `prompts`, shuffled once by the seed (wraps around); round 0
    takes round_zero_prompts, each later round the next prompts_per_round."""
    path = Path(cfg.output_dir) / f"round-{r}" / "prompts.jsonl"
    if not path.exists():
        order = list(range(len(records)))
        random.Random(derive_seed(cfg.seed, "iterate-prompts")).shuffle(order)
        start, size = (0, round_zero_prompts(cfg)) if r == 0 else (
            round_zero_prompts(cfg) + (r - 1) * cfg.prompts_per_round, cfg.prompts_per_round)
        take = [order[(start + i) % len(order)] for i in range(size)]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"prompt": records[i]["prompt"]}) + "\n" for i in take))
    return path


def count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def yaml_list(items: list) -> str:
    """A list override: JSON is a YAML flow list with every item quoted, safe for any path."""
    return json.dumps([str(i) for i in items])


# ----------------------------------------------------------------------------------------- steps


def task_arg(cfg: IterateConfig) -> list[str]:
    """reward.task of the labelling steps: their prompts are files cut from `prompts`, which named the task."""
    from alignkit.rollout.rewards import task_name_for

    task = task_name_for(None, cfg.prompts, required=False)
    return [f"reward.task={task}"] if task else []


def label_args(cfg: IterateConfig, policy: str, prompts: Path, budget: int, select: str, rm: str | None) -> list[str]:
    args = [f"model={policy}", f"train_data={prompts}", "eval_data=null", f"n={cfg.n}", f"label_budget={budget}",
            f"select={select}", f"annotator={cfg.annotator}", f"seed={cfg.seed}", *task_arg(cfg)]
    if select != "random":
        args.append(f"select_model={rm}")
    if cfg.annotator == "judge":
        judge = cfg.judge
        args += [f"judge.model={judge.model}", f"judge.template={json.dumps(judge.template)}",
                 f"judge.options={yaml_list(judge.options)}", f"judge.batch_size={judge.batch_size}",
                 f"judge.max_length={judge.max_length}"]
    if cfg.annotator == "rm":
        args.append(f"reward.model={rm}")
    return args


def rm_args(cfg: IterateConfig, start: str, pair_files: list[Path], r: int) -> list[str]:
    return [f"model={start}", f"train_data={yaml_list([str(p) for p in pair_files])}", "eval_data=null",
            "max_steps=0", f"epochs={cfg.rm_epochs}", f"ensemble={cfg.rm_ensemble}", f"seed={derive_seed(cfg.seed, 'rm', r)}"]


def policy_args(cfg: IterateConfig, stage: str, policy: str, rm: str, reference: str, r: int) -> list[str]:
    from alignkit.cli import STAGES

    keys = {k for k, *_ in field_help(STAGES[stage][1])}
    args = [f"model={policy}", "reward.source=rm", f"reward.model={rm}", f"train_data={cfg.policy_prompts}",
            f"seed={derive_seed(cfg.seed, 'policy', r)}"]
    args.append(f"iterations={cfg.policy_steps}" if stage == "raft" else f"max_steps={cfg.policy_steps}")
    if "ref_model" in keys:
        args.append(f"ref_model={reference}")
    return args + POLICY_METHODS[cfg.policy_method][2]


def eval_args(cfg: IterateConfig, policy: str | None, rms: list[str]) -> list[str]:
    models, names = [cfg.sft_model], ["sft"]
    if policy is not None:
        models, names = models + [policy], names + ["policy"]
    return [f"models={yaml_list(models)}", f"names={yaml_list(names)}", "baseline=sft", "reference=sft",
            f"prompts={cfg.eval_prompts}", f"reward.models={yaml_list(rms)}", "checkpoints=false", "heldout_text=null",
            "pairs=null", f"seed={cfg.seed}"]


def probe_accuracy(reward_model: tuple, pairs_file: Path, max_length: int = 256) -> dict[str, float]:
    """The reward model's agreement with GOLD on gold-labelled pairs (gold ties skipped), with its standard error."""
    from alignkit.data.records import load_records
    from alignkit.models.reward import score_texts

    pairs = [p for p in load_records(str(pairs_file), "preference")[0]
             if p.get("meta", {}).get("gold_chosen") != p.get("meta", {}).get("gold_rejected")]
    if not pairs:
        return {}
    rm, tok = reward_model
    prompts = [p["prompt"] for p in pairs]
    chosen = score_texts(rm, tok, prompts, [p["chosen"] for p in pairs], 64, max_length)
    rejected = score_texts(rm, tok, prompts, [p["rejected"] for p in pairs], 64, max_length)
    hits = [float((c > j) == (p["meta"]["gold_chosen"] > p["meta"]["gold_rejected"])) for c, j, p in zip(chosen, rejected, pairs)]
    acc = sum(hits) / len(hits)
    return {"rm_gold_accuracy": acc, "rm_gold_accuracy_stderr": math.sqrt(acc * (1 - acc) / len(hits)),
            "probe_pairs": len(hits)}


def samples_by_prompt(eval_dir: Path, model: str) -> tuple[list[str], list[str], int]:
    """(prompts, responses, samples per prompt) of an eval's samples/<model>.jsonl (prompt-major)."""
    rows = [json.loads(line) for line in (eval_dir / "samples" / f"{model}.jsonl").read_text().splitlines() if line]
    k = json.loads((eval_dir / "summary.json").read_text())["n_samples"]
    return [r["prompt"] for r in rows], [r["text"] for r in rows], k


def rm_view(current: tuple, heldout: tuple, eval_dir: Path, max_length: int = 256) -> dict[str, float]:
    """What the reward models make of the round's held-out samples, next to gold.

    proxy_win_rate: how often the round's reward model prefers the policy's sample k of a prompt to the SFT
    model's sample k (the eval samples both with the same seed), the counterpart of eval's win_rate_gold on one
    scale; proxy_gold_gap = proxy_win_rate - win_rate_gold, 0 when the reward model judges the policy's gain as
    gold does, growing when the policy wins on the proxy only (over-optimisation). proxy_heldout: the mean
    score of the policy's samples under a FIXED reward model (Gao et al. 2022's held-out RM)."""
    import numpy as np

    from alignkit.eval import metrics as M
    from alignkit.models.reward import score_texts

    has_policy = (eval_dir / "samples" / "policy.jsonl").exists()
    policy = samples_by_prompt(eval_dir, "policy" if has_policy else "sft")
    out: dict[str, float] = {}
    views = [("proxy_current", current)] + ([] if heldout is current else [("proxy_heldout", heldout)])
    for key, (rm, tok) in views:
        scores = np.array(score_texts(rm, tok, policy[0], policy[1], 64, max_length)).reshape(-1, policy[2])
        out[key] = float(scores.mean())
        if key == "proxy_current" and has_policy:
            sft = samples_by_prompt(eval_dir, "sft")
            sft_scores = np.array(score_texts(rm, tok, sft[0], sft[1], 64, max_length)).reshape(-1, sft[2])
            out["proxy_win_rate"], out["proxy_win_rate_stderr"] = M.win_rate(scores, sft_scores)
    out.setdefault("proxy_heldout", out["proxy_current"])  # the held-out RM is the current one (round 0, frozen)
    gold = json.loads((eval_dir / "summary.json").read_text())["models"].get("policy", {})
    if "proxy_win_rate" in out and "win_rate_gold" in gold:
        out["win_rate_gold"] = gold["win_rate_gold"]
        out["proxy_gold_gap"] = out["proxy_win_rate"] - gold["win_rate_gold"]
    elif not has_policy:
        out["proxy_gold_gap"] = 0.0  # round 0: the SFT model against itself
    return out


def round_alarms(lines: list[dict]) -> list[str]:
    """The reward-hacking alarms over the rounds so far (eval.alarms), the proxy being the FIXED held-out reward
    model's (the current one changes every round, so its rise says nothing); each alarm named with its round."""
    from alignkit.eval.alarms import AlarmConfig, check_all

    series = [{"step": line["round"], **{k: line[k] for k in ("gold_reward", "gold_reward_stderr", "kl") if k in line},
               "proxy_reward": line.get("proxy_heldout")} for line in lines if line.get("proxy_heldout") is not None]
    return [f"{a.name}@round-{a.step}" for a in check_all(series, None, AlarmConfig())]


def round_line(steps: Steps, r: int, rm: str, heldout: str, labels_total: int, labels_round: int) -> dict[str, Any]:
    """rounds.jsonl's line of round r from its eval and probe (and label) summaries."""
    from alignkit.models.reward import load_reward_model

    summary = steps.summary(r, "eval")
    models = summary["models"]
    policy = models.get("policy", models["sft"])
    line: dict[str, Any] = {"round": r, "rm": rm, "labels_total": labels_total, "labels_round": labels_round}
    for key in ("gold_reward", "gold_reward_stderr", "gold_gain", "gold_gain_stderr", "win_rate_gold", "kl", "kl_stderr",
                "rm_disagreement", "length"):
        if key in policy:
            line[key] = policy[key]
    current = load_reward_model(rm)  # each reward model loaded once for the round's measurements
    line.update(rm_view(current, current if heldout == rm else load_reward_model(heldout), steps.dir(r, "eval")))
    line["eval_alarms"] = [a["name"] for a in summary.get("alarms", []) if a.get("model") in ("policy", None)]
    if steps.done(r, "probe"):
        line.update(probe_accuracy(current, steps.dir(r, "probe") / "pairs.jsonl"))
    if steps.done(r, "label"):
        label = steps.summary(r, "label")
        line.update({k: label[k] for k in ("train_pair_label_gold_agreement", "train_ties", "train_sample_gold_reward")
                     if k in label})
    return line


def measure(steps: Steps, cfg: IterateConfig, r: int, policy: str, rm: str, heldout: str, probe_file: Path) -> None:
    """Steps 4 and 5 of a round: probe pairs of `policy` labelled by gold, then the eval."""
    if cfg.probe_pairs:
        steps.run(r, "probe", "label", "label", [f"model={policy}", f"train_data={probe_file}", "eval_data=null",
                                                 f"n={cfg.n}", f"label_budget={cfg.probe_pairs}", "select=random",
                                                 "annotator=gold", f"seed={derive_seed(cfg.seed, 'probe', r)}",
                                                 *task_arg(cfg)])
    steps.run(r, "eval", "eval", "eval", eval_args(cfg, policy if r > 0 else None, [rm]))


def probe_prompt_file(cfg: IterateConfig) -> Path:
    from alignkit.data.records import load_records

    path = Path(cfg.output_dir) / "probe_prompts.jsonl"
    if not path.exists():
        records = load_records(cfg.probe_prompts, "prompts")[0]
        path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in records))
    return path


def run(cfg: IterateConfig) -> dict[str, Any]:
    started = time.time()
    check_config(cfg)
    from alignkit.data.records import load_records

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    steps = Steps(cfg)
    records = load_records(cfg.prompts, "prompts")[0]
    probe_file = probe_prompt_file(cfg)
    lines_path = out / "rounds.jsonl"
    lines = [json.loads(line) for line in lines_path.read_text().splitlines()] if lines_path.exists() else []

    def write(line: dict) -> None:
        line["alarms"] = round_alarms([*lines, line])
        lines.append(line)
        with lines_path.open("a") as handle:
            handle.write(json.dumps(line) + "\n")

    # Round 0: the SFT policy and the first reward model.
    pair_files: list[Path] = []
    if cfg.rm_model is None:
        steps.run(0, "label", "label", "label", label_args(cfg, cfg.sft_model, round_prompts(cfg, 0, records),
                                                           cfg.initial_label_budget, "random", None))
        pair_files.append(steps.dir(0, "label") / "pairs.jsonl")
        steps.run(0, "rm", "rm", "rm", rm_args(cfg, cfg.sft_model, pair_files, 0))
        rm = str(steps.dir(0, "rm") / "final")
    else:
        rm = cfg.rm_model
    heldout = cfg.heldout_rm or rm
    labels_total = cfg.initial_label_budget if cfg.rm_model is None else 0
    if not lines:
        measure(steps, cfg, 0, cfg.sft_model, rm, heldout, probe_file)
        write(round_line(steps, 0, rm, heldout, labels_total, labels_total))

    policy = cfg.sft_model
    stage, config_name, _ = POLICY_METHODS[cfg.policy_method]
    for r in range(1, cfg.rounds + 1):
        labels_round = 0
        if cfg.label_budget > 0:
            steps.run(r, "label", "label", "label", label_args(cfg, policy, round_prompts(cfg, r, records),
                                                               cfg.label_budget, cfg.select, rm))
            pair_files.append(steps.dir(r, "label") / "pairs.jsonl")
            labels_round = steps.summary(r, "label")["train_labels_used"]
        labels_total += labels_round
        if cfg.rm_refresh != "none":
            start = rm if cfg.rm_refresh == "continue" else cfg.sft_model
            steps.run(r, "rm", "rm", "rm", rm_args(cfg, start, pair_files, r))
            rm = str(steps.dir(r, "rm") / "final")
        reference = cfg.sft_model if cfg.kl_anchor == "sft" else policy
        steps.run(r, "policy", stage, config_name, policy_args(cfg, stage, policy, rm, reference, r))
        policy = str(steps.dir(r, "policy") / "final")
        if len(lines) <= r:
            measure(steps, cfg, r, policy, rm, heldout, probe_file)
            write(round_line(steps, r, rm, heldout, labels_total, labels_round))
        print(f"[iterate] round {r}: gold {lines[r].get('gold_reward')} proxy {lines[r].get('proxy_current')} "
              f"rm gold accuracy {lines[r].get('rm_gold_accuracy')}", file=sys.stderr, flush=True)

    final = out / "final"
    if not final.exists():
        tmp = out / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(policy, tmp)
        tmp.rename(final)
    plot_rounds(lines, out / "plots" / "rounds.png")
    first, last = lines[0], lines[-1]
    summary = {"rounds": cfg.rounds, "labels_total": labels_total, "policy_method": cfg.policy_method,
               "rm_refresh": cfg.rm_refresh, "select": cfg.select, "annotator": cfg.annotator,
               "eval_gold_reward_before": first.get("gold_reward"), "eval_gold_reward": last.get("gold_reward"),
               "eval_gold_reward_stderr": last.get("gold_reward_stderr"), "eval_gold_gain": last.get("gold_gain"),
               "eval_gold_gain_stderr": last.get("gold_gain_stderr"), "eval_proxy_reward": last.get("proxy_current"),
               "eval_kl": last.get("kl"), "rm_gold_accuracy": last.get("rm_gold_accuracy"),
               "final_rm": rm, "wall_s": time.time() - started}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[iterate] done: {out / 'final'}; rounds in {lines_path}", file=sys.stderr, flush=True)
    return summary


def plot_rounds(lines: list[dict], path: Path) -> None:
    """Gold, the current RM's proxy and the held-out RM's proxy per round (over-optimisation curves)."""
    from alignkit.eval.plots import plot_rounds as draw

    draw({"this run": lines}, path)
