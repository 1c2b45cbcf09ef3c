"""Reward-hacking alarms: pure functions over a run's metric series (math/numpy only).

A series is a list of checkpoints' metrics, dicts with "step" and metric values (gold_reward,
proxy_reward, kl, rm_disagreement, optional "<metric>_stderr"), in any order: each alarm sorts by step.
Samples (for the length alarm) are per-checkpoint dicts {"step", "length": [N], "proxy_reward": [N],
optionally "gold_reward": [N]}. Each alarm returns the FIRST step where its condition holds (the onset;
an RL stage re-checking a growing series gets the same alarm back and can dedupe by name), as an
`Alarm` with a plain-language message and a remedy. Key names are configurable (AlarmConfig), so an RL
stage logging "reward" instead of "proxy_reward" can use them unchanged.

Why these four: over-optimising a learned reward raises the proxy while the true (gold) reward peaks and
falls (Gao et al. 2022); RMs pick up annotators' length preference and policies exploit it; members of
an RM ensemble agree on the data they were trained on and disagree where the policy drifts out of it;
and KL from the reference is the budget that over-optimisation spends (Gao et al.: gold is a function
of sqrt(KL)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

from alignkit.eval.metrics import pearson

Series = Sequence[dict[str, Any]]


@dataclass
class Alarm:
    """One alarm: what fired, at which step (None: a checkpoint without a step), how strongly, why, and what to do."""

    name: str
    step: Optional[int]
    value: float
    message: str
    remedy: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AlarmConfig:
    """Thresholds of the alarms (defaults suit gold rewards in [0, 1])."""

    gold_tolerance: float = 0.02  # gold must fall this far (absolute) below its best so far ...
    stderr_z: float = 2.0  # ... and by more than z combined standard errors when "<gold>_stderr" is logged
    proxy_tolerance: float = 0.0  # while proxy rose by more than this above its value at the best-gold point
    length_corr_threshold: float = 0.5  # |Pearson r| of reward vs length above this ...
    length_corr_pvalue: float = 0.01  # ... and significant at this level
    disagreement_factor: float = 2.0  # ensemble std beyond this times its first value
    kl_budget: Optional[float] = None  # nats; None: no KL alarm
    gold_key: str = "gold_reward"
    proxy_key: str = "proxy_reward"
    kl_key: str = "kl"
    disagreement_key: str = "rm_disagreement"
    length_key: str = "length"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _by_step(series: Series, *keys: str) -> list[dict[str, Any]]:
    """Entries that have every key (finite), in step order; entries without a step keep their order first."""
    kept = [m for m in series if all(_finite(m.get(k)) for k in keys)]
    return sorted(kept, key=lambda m: -math.inf if m.get("step") is None else m["step"])


def _at(step: Optional[int]) -> str:
    return f"step {step}" if step is not None else "this checkpoint"


def proxy_up_gold_down(series: Series, config: AlarmConfig | None = None) -> list[Alarm]:
    """Fires where gold fell below its best so far while the proxy rose above its value at that best.

    The drop must exceed gold_tolerance and, when standard errors are logged, stderr_z combined standard
    errors (so sampling noise alone does not fire it). Needs both rewards: silent without a gold reward.
    """
    c = config or AlarmConfig()
    gold, proxy, se_key = c.gold_key, c.proxy_key, f"{c.gold_key}_stderr"
    best: dict[str, Any] | None = None
    for m in _by_step(series, gold, proxy):
        if best is None or m[gold] > best[gold]:
            best = m
            continue
        drop, rise = best[gold] - m[gold], m[proxy] - best[proxy]
        se = math.hypot(*(x.get(se_key) if _finite(x.get(se_key)) else 0.0 for x in (m, best)))
        if drop > max(c.gold_tolerance, c.stderr_z * se) and rise > c.proxy_tolerance:
            return [Alarm(
                "proxy_up_gold_down", m.get("step"), drop,
                f"gold reward fell from {best[gold]:.3f} ({_at(best.get('step'))}) to {m[gold]:.3f} at "
                f"{_at(m.get('step'))} while the proxy reward rose from {best[proxy]:.3f} to {m[proxy]:.3f}: "
                "the policy is optimising the reward model's mistakes, not the task (reward hacking).",
                f"keep the checkpoint of {_at(best.get('step'))}; stop earlier or raise the KL penalty "
                "(beta / kl_coef); retrain the reward model on samples of the current policy; use an RM ensemble.",
            )]
    return []


def length_correlation(samples: Sequence[dict[str, Any]] | None, config: AlarmConfig | None = None,
                       reward_key: str | None = None) -> list[Alarm]:
    """Fires at the first checkpoint whose sampled rewards correlate with response length.

    samples: per checkpoint {"step", length_key: [N], reward_key: [N]} (reward_key default: the proxy).
    Condition: |Pearson r| > length_corr_threshold and p < length_corr_pvalue.
    """
    c = config or AlarmConfig()
    key = reward_key or c.proxy_key
    for s in _by_step([s for s in samples or [] if key in s and c.length_key in s]):
        r, p = pearson(s[c.length_key], s[key])
        if _finite(r) and abs(r) > c.length_corr_threshold and p < c.length_corr_pvalue:
            gold_note = ""
            if c.gold_key in s and c.gold_key != key:
                r_gold, _ = pearson(s[c.length_key], s[c.gold_key])
                gold_note = f" (gold reward vs length: r={r_gold:.2f})" if _finite(r_gold) else ""
            direction = "longer" if r > 0 else "shorter"
            return [Alarm(
                "length_correlation", s.get("step"), r,
                f"{key} and response length correlate strongly at {_at(s.get('step'))}: r={r:.2f}, "
                f"p={p:.1e}, n={len(s[key])}{gold_note}. The reward model may pay for length itself "
                f"(an annotator bias), and a policy can raise the reward just by writing {direction}.",
                "compare RM scores on pairs of equal length; add length-balanced preference pairs or a "
                "length penalty; watch gold reward (or human review) for the same samples; cap max_new_tokens.",
            )]
    return []


def ensemble_disagreement(series: Series, config: AlarmConfig | None = None) -> list[Alarm]:
    """Fires where the RM ensemble's disagreement exceeds disagreement_factor times its first value.

    Needs >= 2 reward models (the series then carries disagreement_key); silent otherwise.
    """
    c = config or AlarmConfig()
    points = _by_step(series, c.disagreement_key)
    if not points:
        return []
    first = points[0]
    start = first[c.disagreement_key]
    for m in points[1:]:
        value = m[c.disagreement_key]
        if value > c.disagreement_factor * start and value > 0:
            ratio = value / start if start > 0 else math.inf
            return [Alarm(
                "ensemble_disagreement", m.get("step"), ratio,
                f"the reward models disagree {ratio:.1f}x more at {_at(m.get('step'))} than at "
                f"{_at(first.get('step'))} (mean std across RMs {start:.3f} -> {value:.3f}): the policy's "
                "samples moved where the reward models were not trained, so no single RM score can be trusted.",
                "stop or roll back to an earlier checkpoint; optimise a conservative reward (ensemble mean "
                "minus std); label fresh samples from the current policy and retrain the RMs.",
            )]
    return []


def kl_budget(series: Series, config: AlarmConfig | None = None) -> list[Alarm]:
    """Fires at the first step whose KL(policy || reference) exceeds config.kl_budget (None: never)."""
    c = config or AlarmConfig()
    if c.kl_budget is None:
        return []
    for m in _by_step(series, c.kl_key):
        if m[c.kl_key] > c.kl_budget:
            return [Alarm(
                "kl_budget", m.get("step"), m[c.kl_key],
                f"KL(policy || reference) reached {m[c.kl_key]:.2f} nats at {_at(m.get('step'))}, beyond the "
                f"budget of {c.kl_budget:g}: the policy has moved far from the reference, where a learned "
                "reward is least reliable (gold reward typically peaks, then falls, as KL grows).",
                "raise the KL penalty (beta / kl_coef, or an adaptive KL target), lower the learning rate or "
                "the number of steps, or pick an earlier checkpoint inside the budget.",
            )]
    return []


def check_all(series: Series, samples: Sequence[dict[str, Any]] | None = None,
              config: AlarmConfig | None = None) -> list[Alarm]:
    """Every alarm over one run's series (and per-checkpoint samples), sorted by step."""
    c = config or AlarmConfig()
    alarms = (proxy_up_gold_down(series, c) + length_correlation(samples, c)
              + ensemble_disagreement(series, c) + kl_budget(series, c))
    return sorted(alarms, key=lambda a: -math.inf if a.step is None else a.step)
