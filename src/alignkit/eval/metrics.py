"""Evaluation metrics as pure functions (math/numpy/torch only): hand-checkable, no model inside.

Conventions: every function takes plain sequences (lists, numpy arrays or 1-D tensors) and returns
python floats. A "stderr" is the standard error of the mean, sample std (ddof=1) / sqrt(n); it is NaN
when it is undefined (fewer than 2 values), which JSON writers turn into null. Where samples come in
groups (K responses to the same prompt) the groups, not the samples, are the independent units: pass
per-group means to `mean_and_stderr` (see `grouped_mean_and_stderr`).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch

Numbers = Union[Sequence[float], np.ndarray, torch.Tensor]
NAN = float("nan")


def _array(values: Numbers) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def mean_and_stderr(values: Numbers) -> tuple[float, float]:
    """(mean, standard error of the mean) of values[N]; (nan, nan) when empty, stderr nan when N < 2."""
    x = _array(values).ravel()
    if x.size == 0:
        return NAN, NAN
    if x.size == 1:
        return float(x[0]), NAN
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def grouped_mean_and_stderr(values: Numbers) -> tuple[float, float]:
    """values[G, K] (K samples for each of G prompts): (mean of all, stderr over the G group means).

    Samples of one prompt are correlated (an easy prompt makes all K good), so the G prompts are the
    independent units. With equal K the mean equals the plain mean of all G*K values.
    """
    x = _array(values)
    if x.ndim != 2:
        raise ValueError(f"expected values[G, K], got shape {x.shape}")
    return mean_and_stderr(x.mean(axis=1)) if x.shape[1] else (NAN, NAN)


def mean_and_stderr_by_label(values: Numbers, labels: Sequence) -> dict:
    """{label: (mean, stderr)} over the rows of each label, labels in first-seen order.

    values[G] or values[G, K] (K samples for each of G prompts: a row's mean is one unit), labels[G]: each
    row's group (e.g. the task of a prompt). A label's numbers are mean_and_stderr of its rows' means, so
    with one label this equals grouped_mean_and_stderr (or mean_and_stderr of [G] values).
    """
    x = _array(values)
    if x.ndim == 2:
        x = x.mean(axis=1) if x.shape[1] else np.full(x.shape[0], NAN)
    labels = list(labels)
    if x.ndim != 1 or x.shape[0] != len(labels):
        raise ValueError(f"values {x.shape} need one label per row, got {len(labels)} labels")
    return {label: mean_and_stderr(x[[i for i, lab in enumerate(labels) if lab == label]])
            for label in dict.fromkeys(labels)}


def _ngrams(tokens: Sequence, n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(sequences: Sequence[Union[str, Sequence]], n: int) -> float:
    """Distinct n-grams / total n-grams over the whole set (Li et al. 2016); 0.0 when there are none.

    A string is split on whitespace; a list is taken as tokens. N-grams never cross sequences.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams: list[tuple] = []
    for seq in sequences:
        grams.extend(_ngrams(seq.split() if isinstance(seq, str) else list(seq), n))
    return len(set(grams)) / len(grams) if grams else 0.0


def win_outcomes(a_scores: Numbers, b_scores: Numbers) -> np.ndarray:
    """1.0 where a > b, 0.5 on ties, 0.0 where a < b (elementwise; same shape)."""
    a, b = _array(a_scores), _array(b_scores)
    if a.shape != b.shape:
        raise ValueError(f"a_scores {a.shape} and b_scores {b.shape} must have the same shape")
    return (a > b) + 0.5 * (a == b)


def win_rate(a_scores: Numbers, b_scores: Numbers) -> tuple[float, float]:
    """(rate at which a beats b, stderr), ties counted 0.5.

    a_scores[N], b_scores[N]: N independent pairs. a_scores[G, K], b_scores[G, K]: sample k of prompt g
    against sample k of the same prompt; outcomes are averaged per prompt first and the stderr is over
    the G prompts (the independent units).
    """
    outcomes = win_outcomes(a_scores, b_scores)
    return grouped_mean_and_stderr(outcomes) if outcomes.ndim == 2 else mean_and_stderr(outcomes)


def paired_difference(a_scores: Numbers, b_scores: Numbers) -> tuple[float, float]:
    """(mean of a - b, paired stderr) for two models scored on the SAME prompts.

    a_scores[G, K], b_scores[G, K'] (K and K' samples for each of G prompts, K' may differ from K) or [G]: the
    per-prompt means are subtracted first and the stderr is that of the G per-prompt differences, so the
    variation between prompts (an easy prompt is easy for both models) cancels. Smaller than the unpaired
    sqrt(se_a^2 + se_b^2) whenever the two models agree on which prompts are hard.
    """
    a, b = _array(a_scores), _array(b_scores)
    a, b = (x.mean(axis=1) if x.ndim == 2 else x for x in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"a_scores and b_scores cover {a.shape} and {b.shape} prompts; they must be the same prompts")
    return mean_and_stderr(a - b)


def kl_from_samples(policy_logps: Numbers, ref_logps: Numbers) -> tuple[float, float]:
    """(mean, stderr) of the sequence-level k1 estimate of KL(policy || reference).

    policy_logps, ref_logps: summed log-probs of responses SAMPLED FROM THE POLICY, under the policy and the
    reference, either [N] (N independent responses) or [G, K] (K responses to each of G prompts: the
    stderr is then over the G per-prompt means, the independent units). E_policy[log p(y) - log q(y)] =
    KL(p || q); single estimates can be negative, their mean is unbiased.
    """
    p, q = _array(policy_logps), _array(ref_logps)
    if p.shape != q.shape:
        raise ValueError(f"policy_logps {p.shape} and ref_logps {q.shape} must have the same shape")
    return grouped_mean_and_stderr(p - q) if p.ndim == 2 else mean_and_stderr(p - q)


def kl_k3_per_token(policy_token_logps: Sequence[Numbers], ref_token_logps: Sequence[Numbers],
                    group_size: int = 1) -> tuple[float, float]:
    """(mean, stderr) over N sampled responses of sum_t k3_t, k3 = exp(ref - lp) - 1 - (ref - lp).

    policy_token_logps[n][T_n], ref_token_logps[n][T_n]: per-token log-probs of response n. Each k3 term
    is >= 0 and its conditional mean is the per-token KL, so the sum is an unbiased, lower-variance
    estimate of the sequence KL (Schulman 2020, "Approximating KL divergence"). With group_size K > 1 the
    responses are G prompts x K samples, prompt-major, and the stderr is over the G per-prompt means.
    """
    if len(policy_token_logps) != len(ref_token_logps):
        raise ValueError("policy and reference token log-probs must have the same number of responses")
    if group_size < 1 or len(policy_token_logps) % group_size:
        raise ValueError(f"{len(policy_token_logps)} responses do not split into groups of {group_size}")
    totals = []
    for lp, ref in zip(policy_token_logps, ref_token_logps):
        log_ratio = _array(ref) - _array(lp)
        totals.append(float(np.sum(np.expm1(log_ratio) - log_ratio)))
    return grouped_mean_and_stderr(np.reshape(totals, (-1, group_size))) if totals else (NAN, NAN)


def _best_of_n_kl_one_prompt(rewards: np.ndarray) -> float:
    """best_of_n_kl_estimate's model for one prompt's n rewards [n] (see there)."""
    n = rewards.size
    _, counts = np.unique(rewards, return_counts=True)  # sizes of the reward classes, ascending reward

    def continuous_part(u: float) -> float:
        # Integral over [0, u] of the best-of-n density n v^(n-1) times its log (0 at u = 0).
        return u**n * (math.log(n) + (n - 1) * math.log(u) - (n - 1) / n) if u > 0 else 0.0

    kl, seen = 0.0, 0  # seen: samples in lower-reward classes, so the class spans F in [seen/n, (seen+count)/n]
    for count in counts.tolist():
        below, top = seen / n, (seen + count) / n
        if count == 1:  # seen once: a slice of a continuous reward distribution
            kl += continuous_part(top) - continuous_part(below)
        else:  # seen twice or more: an atom, picked when it is the best of the n
            picked = top**n - below**n
            kl += picked * math.log(picked / (count / n))
        seen += count
    return kl


def best_of_n_kl_estimate(rewards: Numbers, responses: Sequence[Sequence[str]] | None = None) -> tuple[float, float]:
    """(mean, stderr over prompts) of a sample estimate of KL(best-of-n || sampler), in nats.

    rewards[G, n]: the selecting reward of the n samples of each of G prompts; responses[G][n], when
    given, their texts: equal texts are one outcome, so each takes the reward of its first occurrence
    (a reward model may score identical texts a rounding error apart).

    What it estimates. Best-of-n with first-index tie-breaking picks among tied samples in proportion to
    the sampler, so its KL to the sampler depends only on the distribution of the reward: with F the
    sampler's reward CDF, a reward class of mass p between F = a and F = a + p is picked with probability
    (a + p)^n - a^n, and KL = sum over classes of picked * log(picked / p), plus, for a continuous part of
    the distribution, the integral of n F^(n-1) log(n F^(n-1)) dF. A continuous reward gives log n -
    (n-1)/n (Gao et al. 2022), which is the UPPER bound for any reward distribution (Beirami et al.
    2024, "Theoretical guarantees on the best-of-n alignment policy"): ties lower the KL, down to 0 for a
    sampler that always says the same thing.

    The estimate plugs each prompt's n samples into that formula: a reward seen c >= 2 times among the
    n is an atom of mass c/n (a continuous distribution never repeats a value), a reward seen once is a
    slice of width 1/n of a continuous part. All n distinct gives exactly log n - (n-1)/n; one atom of
    mass e at the top over a continuous rest gives (1-e)^n (log n + (n-1) log(1-e) - (n-1)/n) +
    (1-(1-e)^n) log((1-(1-e)^n)/e), the form of the estimator Beirami et al. propose (their section 4).
    Every estimate is the exact KL of some distribution, so it lies in [0, log n - (n-1)/n].

    Bias. It is exact for a continuous reward (every sample distinct) and for a deterministic sampler.
    In between it is usually LOW: a value repeated c times among n samples gets mass c/n, which overstates
    small atoms (one of mass 0.05 seen twice in 8 gets 0.25), and heavier atoms mean less KL. Simulated with
    n = 8 (estimate vs exact): two equal atoms 0.64 vs 0.67, four 0.95 vs 1.04, atoms (0.05, 0.15, 0.6, 0.2)
    0.81 vs 0.97, a top atom of mass 0.5 over a continuous rest 0.670 vs 0.672. Treating a value seen once
    as continuous errs the other way (a continuous slice carries the most KL for its mass): a top atom of
    mass 0.8 gives 0.239 vs 0.223. So it narrows the upper bound, it does not replace it. The prompt mean
    estimates the KL averaged over prompts.
    """
    r = _array(rewards)
    if r.ndim != 2 or r.shape[1] == 0:
        raise ValueError(f"expected rewards[G, n] with n >= 1, got shape {r.shape}")
    if responses is not None:
        if len(responses) != r.shape[0] or any(len(texts) != r.shape[1] for texts in responses):
            raise ValueError(f"responses must be [G][n] like rewards {r.shape}")
        r = r.copy()
        for g, texts in enumerate(responses):
            first: dict[str, int] = {}
            for j, text in enumerate(texts):
                r[g, j] = r[g, first.setdefault(text, j)]
    return mean_and_stderr([_best_of_n_kl_one_prompt(row) for row in r])


def length_stats(lengths: Numbers) -> dict[str, float]:
    """{"mean", "stderr", "median", "min", "max"} of response lengths[N] (tokens or words)."""
    x = _array(lengths).ravel()
    if x.size == 0:
        return {"mean": NAN, "stderr": NAN, "median": NAN, "min": NAN, "max": NAN}
    mean, stderr = mean_and_stderr(x)
    return {"mean": mean, "stderr": stderr, "median": float(np.median(x)), "min": float(x.min()), "max": float(x.max())}


def eos_fraction(finished: Sequence[bool]) -> float:
    """Share of responses that ended with the end-of-turn token (not cut at max_new_tokens)."""
    return float(np.mean(np.asarray(finished, dtype=np.float64))) if len(finished) else NAN


def rm_accuracy(chosen_rewards: Numbers, rejected_rewards: Numbers) -> tuple[float, float]:
    """(share of pairs where reward(chosen) > reward(rejected), stderr); ties count 0.5."""
    return win_rate(chosen_rewards, rejected_rewards)


def rm_gold_accuracy(chosen_rewards: Numbers, rejected_rewards: Numbers, gold_margins: Numbers) -> tuple[float, float]:
    """(accuracy, stderr) of an RM against the GOLD preference instead of the (noisy) labels.

    gold_margins[N] = gold(chosen) - gold(rejected): > 0 the labelled chosen side is truly better, < 0
    the label was flipped by annotator noise or bias; 0 (gold tie) or nan (unknown) pairs are left out.
    The RM is right where its reward difference has the sign of the gold margin (ties 0.5).
    """
    diff = _array(chosen_rewards) - _array(rejected_rewards)
    gold = _array(gold_margins)
    known = np.isfinite(gold) & (gold != 0)
    return mean_and_stderr(win_outcomes(diff[known] * np.sign(gold[known]), np.zeros(int(known.sum()))))


def calibration_buckets(chosen_rewards: Numbers, rejected_rewards: Numbers, n_buckets: int = 4) -> list[dict]:
    """Accuracy by confidence: pairs split into n_buckets equal-count buckets of |reward difference|.

    For each bucket (ascending |diff|): low/high |diff|, n, accuracy (ties 0.5) and predicted, the mean
    Bradley-Terry probability sigmoid(|diff|) that the higher-scored side is the chosen one. A
    calibrated RM has accuracy ~= predicted in every bucket; a useful one gains accuracy with |diff|.
    """
    diff = _array(chosen_rewards) - _array(rejected_rewards)
    order = np.argsort(np.abs(diff), kind="stable")
    buckets = []
    for part in np.array_split(order, min(n_buckets, diff.size)) if diff.size else []:
        d = diff[part]
        buckets.append({
            "low": float(np.abs(d).min()),
            "high": float(np.abs(d).max()),
            "n": int(d.size),
            "accuracy": float(np.mean((d > 0) + 0.5 * (d == 0))),
            "predicted": float(np.mean(1.0 / (1.0 + np.exp(-np.abs(d))))),
        })
    return buckets


def perplexity(nll_sum: float, n_tokens: float) -> float:
    """exp(total negative log-likelihood / tokens); nan without tokens. Capped at exp(50) to stay finite."""
    if n_tokens <= 0:
        return NAN
    return math.exp(min(nll_sum / n_tokens, 50.0))


def pearson(x: Numbers, y: Numbers) -> tuple[float, float]:
    """(Pearson r, two-sided p-value of r = 0) over paired samples x[N], y[N].

    The p-value uses Fisher's z = atanh(r) * sqrt(N - 3) ~ N(0, 1) (good for N >= 10; p is 1.0 for
    N <= 3). r is nan (and p 1.0) when N < 3 or either side is constant.
    """
    a, b = _array(x).ravel(), _array(y).ravel()
    if a.shape != b.shape:
        raise ValueError(f"x {a.shape} and y {b.shape} must have the same shape")
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return NAN, 1.0
    r = float(np.clip(np.corrcoef(a, b)[0, 1], -1.0, 1.0))
    if a.size <= 3:  # Fisher's z has N - 3 degrees of freedom: no evidence either way
        return r, 1.0
    if abs(r) == 1.0:
        return r, 0.0
    z = math.atanh(r) * math.sqrt(a.size - 3)
    return r, math.erfc(abs(z) / math.sqrt(2.0))


def ensemble_disagreement(rewards: Numbers) -> float:
    """rewards[M, N] (M reward models, N samples): mean over samples of the std across models (ddof=0).

    0 when every RM agrees; nan with fewer than 2 models.
    """
    r = _array(rewards)
    if r.ndim != 2:
        raise ValueError(f"expected rewards[M, N], got shape {r.shape}")
    if r.shape[0] < 2 or r.shape[1] == 0:
        return NAN
    return float(r.std(axis=0).mean())
