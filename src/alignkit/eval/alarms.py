"""Reward-hacking alarms: pure functions over a run's metric series (math/numpy only).

A series is a list of checkpoints' metrics, dicts with "step" and metric values (gold_reward,
proxy_reward, kl, rm_disagreement, optional "<metric>_stderr"), in any order: each alarm sorts by step.
Samples (for the length alarm) are per-checkpoint dicts {"step", "length": [N], "proxy_reward": [N],
optionally "gold_reward": [N]}. Each alarm returns the FIRST step where its condition holds (the onset;
an RL stage re-checking a growing series gets the same alarm back and can dedupe by name), as an
`Alarm` with a plain-language message and a remedy. Every condition at a step depends only on the
points up to that step, so checking a growing series online gives the same onset as checking it once at
the end. Key names are configurable (AlarmConfig), so an RL stage logging "reward" instead of
"proxy_reward" can use them unchanged. `AlarmWatch` runs them online for an RL stage (PPO).

Why these four: over-optimising a learned reward raises the proxy while the true (gold) reward peaks and
falls (Gao et al. 2022); RMs pick up annotators' length preference and policies exploit it; members of
an RM ensemble agree on the data they were trained on and disagree where the policy drifts out of it;
and KL from the reference is the budget that over-optimisation spends (Gao et al.: gold is a function
of sqrt(KL)).

proxy_up_gold_down compares evaluations with each other, so it must only see a FIXED held-out series
(the same prompts, ideally the same sampling seeds, at every evaluation): means over fresh prompts move
with the prompts drawn, not only with the policy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
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
    """Thresholds of the alarms (defaults suit gold rewards in [0, 1]). alpha: the false-alarm level that
    proxy_up_gold_down's Bonferroni z spends over the comparisons made so far (its docstring has the rule)."""

    gold_tolerance: float = 0.02  # gold must fall at least this far (absolute) below the reference ...
    alpha: float = 0.05  # ... and, when "<gold>_stderr" is logged, by z(alpha, m) combined standard errors
    proxy_tolerance: float = 0.0  # while proxy rose by more than this above its value at the reference ...
    proxy_stderr_z: float = 1.0  # ... and by more than this many combined "<proxy>_stderr" (when logged)
    length_corr_threshold: float = 0.5  # |Pearson r| of reward vs length above this ...
    length_corr_pvalue: float = 0.01  # ... and significant at this level ...
    length_corr_margin: float = 0.3  # ... and (gold per sample) this much beyond gold's own r with length
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


def drop_z(alpha: float, comparisons: int) -> float:
    """z = Phi^-1(1 - alpha / (2m)): the Bonferroni-corrected normal quantile for m comparisons."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return NormalDist().inv_cdf(1.0 - alpha / (2.0 * max(comparisons, 1)))


def _stderr(point: dict[str, Any], key: str) -> float:
    value = point.get(f"{key}_stderr")
    return value if _finite(value) else 0.0


def proxy_up_gold_down(series: Series, config: AlarmConfig | None = None) -> list[Alarm]:
    """Fires where gold stayed below its best earlier value for two consecutive evaluations while the proxy rose.

    The series must be a FIXED held-out evaluation (same prompts every time), never per-rollout means of
    fresh prompts. In step order, the reference b is the evaluation with the best gold so far. Evaluation
    j (0-based: it has j earlier evaluations) is "below" when

        gold_b - gold_j   > max(gold_tolerance,  z_j * hypot(se_gold_b, se_gold_j))
        proxy_j - proxy_b > max(proxy_tolerance, proxy_stderr_z * hypot(se_proxy_b, se_proxy_j))
        z_j = Phi^-1(1 - alpha / (2 m_j)),  m_j = 1 + 2 + ... + j = j (j + 1) / 2

    with se = "<key>_stderr" (0 when not logged: without gold stderrs only the absolute gold_tolerance
    counts, and without proxy stderrs only proxy_tolerance). The alarm fires at the SECOND consecutive
    evaluation that is below the same reference (a new best gold resets it); value: its gold drop.

    Why: the best-so-far is the maximum of j noisy values, so it sits above the truth; but if the maximum
    clears the threshold, so does some single earlier evaluation: evaluation j is implicitly j one-sided
    comparisons, and m_j counts every comparison made so far (Bonferroni). Under a flat gold with normal
    errors one evaluation is "below" by chance with probability <= j * alpha / (2 m_j) = alpha / (j + 1).
    (Fixed prompts make evaluations positively correlated, which only makes hypot() conservative.)
    Requiring the drop to persist for two evaluations against the same reference means a single unlucky
    evaluation, or a lucky reference, no longer fires; it costs one evaluation of delay. Simulated
    (tests/unit/test_alarms.py): 50 evaluations of a flat gold observed with stderr 0.01 fire in 0-0.25%
    of runs, flat or rising proxy (the old best-so-far, z=2, fire-at-once rule: 90-99%); gold falling 3
    stderr per evaluation fires within 2 evaluations of the onset in 97% of runs. The proxy condition only asks that the proxy really went up (one standard
    error by default), so a plain regression of both rewards is not called hacking. Silent without gold.
    """
    c = config or AlarmConfig()
    gold, proxy = c.gold_key, c.proxy_key
    best: dict[str, Any] | None = None
    pending: dict[str, Any] | None = None  # the previous evaluation, when it was already below `best`
    for j, m in enumerate(_by_step(series, gold, proxy)):
        if best is None or m[gold] > best[gold]:
            best, pending = m, None
            continue
        drop, rise = best[gold] - m[gold], m[proxy] - best[proxy]
        comparisons = j * (j + 1) // 2
        z = drop_z(c.alpha, comparisons)
        gold_se = math.hypot(_stderr(best, gold), _stderr(m, gold))
        proxy_se = math.hypot(_stderr(best, proxy), _stderr(m, proxy))
        below = (drop > max(c.gold_tolerance, z * gold_se)
                 and rise > max(c.proxy_tolerance, c.proxy_stderr_z * proxy_se))
        if not below:
            pending = None
            continue
        if pending is None:
            pending = m
            continue
        noise = f", and beyond z={z:.2f} combined standard errors (alpha={c.alpha:g})" if gold_se > 0 else ""
        return [Alarm(
            "proxy_up_gold_down", m.get("step"), drop,
            f"held-out gold reward fell from {best[gold]:.3f} ({_at(best.get('step'))}) to {pending[gold]:.3f} at "
            f"{_at(pending.get('step'))} and stayed down ({m[gold]:.3f} at {_at(m.get('step'))}: a drop of "
            f"{drop:.3f}, beyond {c.gold_tolerance:g}{noise}) while the proxy reward rose from {best[proxy]:.3f} "
            f"to {m[proxy]:.3f}: "
            "the policy is optimising the reward model's mistakes, not the task (reward hacking).",
            f"keep the checkpoint of {_at(best.get('step'))}; stop earlier or raise the KL penalty "
            "(beta / kl_coef); retrain the reward model on samples of the current policy; use an RM ensemble.",
        )]
    return []


def length_correlation(samples: Sequence[dict[str, Any]] | None, config: AlarmConfig | None = None,
                       reward_key: str | None = None) -> list[Alarm]:
    """Fires at the first checkpoint whose sampled rewards correlate with response length more than they should.

    samples: per checkpoint {"step", length_key: [N], reward_key: [N], optionally gold_key: [N]}
    (reward_key default: the proxy). Condition: r = Pearson r(length, reward) has |r| >
    length_corr_threshold and p < length_corr_pvalue; and when the checkpoint has gold rewards per
    sample, also sign(r) * (r - r_gold) > length_corr_margin, r_gold = r(length, gold) (0 when gold is
    constant or not finite). Why: on many tasks length itself is worth something (a sort whose answer is
    too short is also a wrong answer), so gold correlates with length too; only the part of the proxy's
    preference for length (or shortness) that gold does not share is a bias a policy can exploit.
    """
    c = config or AlarmConfig()
    key = reward_key or c.proxy_key
    for s in _by_step([s for s in samples or [] if key in s and c.length_key in s]):
        r, p = pearson(s[c.length_key], s[key])
        if not (_finite(r) and abs(r) > c.length_corr_threshold and p < c.length_corr_pvalue):
            continue
        gold_note = ""
        if c.gold_key in s and c.gold_key != key:
            r_gold, _ = pearson(s[c.length_key], s[c.gold_key])
            r_gold = r_gold if _finite(r_gold) else 0.0
            if math.copysign(1.0, r) * (r - r_gold) <= c.length_corr_margin:
                continue  # gold rewards length (or shortness) about as much: not a bias of the proxy
            gold_note = (f"; gold reward vs length: r={r_gold:.2f}, {abs(r - r_gold):.2f} less "
                         f"(margin {c.length_corr_margin:g})")
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


class AlarmWatch:
    """The alarms of an RL stage, online: each source's series grows one point at a time, each alarm is
    reported once per (source, name), and the state (plain JSON) goes into checkpoints.

    Sources: "eval" (held-out evaluations: the same prompts and seeds every time) gets proxy_up_gold_down
    (with the proxy's and gold's "_stderr" when the point has them) and kl_budget; "rollout" (statistics
    of each step's FRESH prompts) gets only kl_budget: a mean over fresh prompts moves with the prompts
    drawn, so comparing it across steps is not evidence of hacking. Either may pass per-sample `samples`
    (one checkpoint's lengths, proxy and gold rewards) for length_correlation.
    """

    SOURCES = ("rollout", "eval")

    def __init__(self, kl_budget: float | None = None, config: AlarmConfig | None = None):
        self.config = config or AlarmConfig(kl_budget=kl_budget, proxy_key="reward", gold_key="gold_reward",
                                            kl_key="kl")
        self.series: dict[str, list[dict]] = {source: [] for source in self.SOURCES}
        self.alarms: list[dict] = []

    def check(self, source: str, point: dict[str, Any], samples: dict[str, Any] | None = None) -> list[dict]:
        """Add `point` (step + proxy, gold and their "_stderr", kl) to `source`'s series; return NEW alarms.
        samples: this step's {"step", "length": [N], proxy: [N], gold: [N]} for the length alarm."""
        if source not in self.SOURCES:
            raise ValueError(f"source must be one of {', '.join(self.SOURCES)}, got {source!r}")
        c = self.config
        keys = (c.proxy_key, f"{c.proxy_key}_stderr", c.gold_key, f"{c.gold_key}_stderr", c.kl_key)
        kept: dict[str, Any] = {"step": None if point.get("step") is None else int(point["step"])}
        kept.update({k: float(point[k]) for k in keys if _finite(point.get(k))})
        self.series[source].append(kept)
        found = kl_budget(self.series[source], c)
        if source == "eval":
            found += proxy_up_gold_down(self.series[source], c)
        found += length_correlation([samples] if samples else [], c)
        seen = {(a["source"], a["name"]) for a in self.alarms}
        new = [{"source": source, **a.to_dict(), "value": float(a.value)}
               for a in found if (source, a.name) not in seen]
        self.alarms.extend(new)
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"series": self.series, "alarms": self.alarms}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.series = {source: list(state["series"].get(source, [])) for source in self.SOURCES}
        self.alarms = list(state["alarms"])
