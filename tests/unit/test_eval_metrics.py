"""alignkit.eval.metrics on hand-made inputs (hand-worked numbers in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignkit.eval import metrics as M


def test_mean_and_stderr_by_hand():
    # mean 2.5; sample var = (1.5^2 + 0.5^2 + 0.5^2 + 1.5^2) / 3 = 5/3; stderr = sqrt(5/3) / sqrt(4) = 0.6455
    mean, se = M.mean_and_stderr([1, 2, 3, 4])
    assert mean == pytest.approx(2.5)
    assert se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert M.mean_and_stderr(torch.tensor([7.0]))[0] == 7.0 and math.isnan(M.mean_and_stderr([7.0])[1])
    assert all(math.isnan(v) for v in M.mean_and_stderr([]))


def test_grouped_stderr_is_over_prompts_not_samples():
    # group means [0.5, 1, 0] -> mean 0.5; sample std of the means 0.5 -> stderr 0.5 / sqrt(3) = 0.2887
    mean, se = M.grouped_mean_and_stderr([[1, 0], [1, 1], [0, 0]])
    assert mean == pytest.approx(0.5)
    assert se == pytest.approx(0.5 / math.sqrt(3))
    with pytest.raises(ValueError, match="G, K"):
        M.grouped_mean_and_stderr([1, 2, 3])


def test_mean_and_stderr_by_label_groups_prompts_by_task():
    # rows (prompt means): sort [0.5, 1.0, 0.0], reverse [0.25, 0.75] (first-seen order: sort, reverse)
    # sort: mean 0.5, sample std 0.5 -> stderr 0.5 / sqrt(3); reverse: mean 0.5, std 0.3536 -> stderr 0.25
    values = [[1, 0], [0.5, 0], [1, 1], [0, 0], [1, 0.5]]
    labels = ["sort", "reverse", "sort", "sort", "reverse"]
    got = M.mean_and_stderr_by_label(values, labels)
    assert list(got) == ["sort", "reverse"]
    assert got["sort"] == pytest.approx((0.5, 0.5 / math.sqrt(3)))
    assert got["reverse"] == pytest.approx((0.5, 0.25))
    # 1-D values are the units themselves; one label is the pooled grouped_mean_and_stderr
    flat = M.mean_and_stderr_by_label([2.0, 4.0, 9.0], ["a", "b", "a"])  # a: [2, 9] -> 5.5, std 4.95 / sqrt(2)
    assert flat["a"] == pytest.approx((5.5, 3.5)) and flat["b"][0] == 4.0 and math.isnan(flat["b"][1])
    assert M.mean_and_stderr_by_label(values, ["t"] * 5)["t"] == pytest.approx(M.grouped_mean_and_stderr(values))
    with pytest.raises(ValueError, match="label per row"):
        M.mean_and_stderr_by_label(values, ["sort"])


def test_distinct_n_counts_over_the_set_without_crossing_sequences():
    # unigrams a b a | a b -> 2 distinct / 5; bigrams (a b) (b a) | (a b) -> 2 / 3
    assert M.distinct_n(["a b a", "a b"], 1) == pytest.approx(2 / 5)
    assert M.distinct_n(["a b a", "a b"], 2) == pytest.approx(2 / 3)
    assert M.distinct_n([[1, 2, 1], [1, 2]], 2) == pytest.approx(2 / 3)  # token lists work alike
    assert M.distinct_n(["a", "b"], 2) == 0.0  # no bigram inside any sequence (none spans two)
    with pytest.raises(ValueError):
        M.distinct_n(["a"], 0)


def test_win_rate_counts_ties_half():
    # outcomes [1, 0, 0.5, 1] -> 0.625; sample std sqrt(0.6875 / 3) = 0.4787 -> stderr 0.2394
    rate, se = M.win_rate([3, 1, 2, 2], [1, 3, 2, 0])
    assert rate == pytest.approx(0.625)
    assert se == pytest.approx(math.sqrt(0.6875 / 3) / 2)


def test_win_rate_pairs_samples_within_prompts():
    # prompt 0: [1 > 0, 0 < 1] -> 0.5; prompt 1: [2 > 1, 2 > 1] -> 1.0; mean 0.75, stderr std([.5, 1]) / sqrt 2 = 0.25
    rate, se = M.win_rate([[1, 0], [2, 2]], [[0, 1], [1, 1]])
    assert rate == pytest.approx(0.75)
    assert se == pytest.approx(0.25)
    with pytest.raises(ValueError, match="same shape"):
        M.win_rate([1, 2], [1])


def test_kl_from_samples_by_hand():
    # per-response log-ratios [1, 0, 2] -> mean 1, stderr 1 / sqrt(3)
    mean, se = M.kl_from_samples([-1.0, -2.0, -3.0], [-2.0, -2.0, -5.0])
    assert mean == pytest.approx(1.0)
    assert se == pytest.approx(1 / math.sqrt(3))


def test_k3_per_token_by_hand():
    # one token p=0.5, q=0.25: k3 = q/p - 1 - log(q/p) = 0.5 - 1 + ln 2 = 0.19315; two such tokens: 0.3863
    lp, ref = [math.log(0.5)] * 2, [math.log(0.25)] * 2
    mean, _ = M.kl_k3_per_token([lp], [ref])
    assert mean == pytest.approx(2 * (0.5 - 1 + math.log(2)))
    assert M.kl_k3_per_token([[0.0], [-1.0]], [[0.0], [-1.0]])[0] == 0.0  # same model: exactly 0


def test_kl_estimators_are_unbiased_against_the_exact_kl():
    # Reference: exact KL(p || q) of two categoricals; responses sampled from p (one "token" each).
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = float((p * (p / q).log()).sum())  # = 0.3961
    gen = torch.Generator().manual_seed(0)
    draws = torch.multinomial(p, 50_000, replacement=True, generator=gen)
    lp, lq = p.log()[draws], q.log()[draws]
    k1, k1_se = M.kl_from_samples(lp, lq)
    k3, k3_se = M.kl_k3_per_token(lp.view(-1, 1), lq.view(-1, 1))
    assert abs(k1 - exact) < 4 * k1_se
    assert abs(k3 - exact) < 4 * k3_se


def test_length_eos_and_perplexity():
    stats = M.length_stats([2, 4, 9])
    assert (stats["mean"], stats["median"], stats["min"], stats["max"]) == (5.0, 4.0, 2.0, 9.0)
    assert M.eos_fraction([True, False, True, True]) == 0.75
    # 3 tokens each with p = 1/4: NLL 3 ln 4 -> perplexity 4
    assert M.perplexity(3 * math.log(4), 3) == pytest.approx(4.0)
    assert math.isnan(M.perplexity(1.0, 0))


def test_rm_accuracy_and_calibration_buckets():
    # chosen - rejected = [1, 0, -1] -> outcomes [1, 0.5, 0] -> 0.5
    assert M.rm_accuracy([1, 2, 3], [0, 2, 4])[0] == pytest.approx(0.5)
    # diffs [0.1, -0.2, 3, 4] -> by |diff|: {0.1, -0.2} accuracy 0.5, {3, 4} accuracy 1
    buckets = M.calibration_buckets([0.1, -0.2, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], n_buckets=2)
    assert [b["n"] for b in buckets] == [2, 2]
    assert [b["accuracy"] for b in buckets] == [0.5, 1.0]
    assert buckets[0]["low"] == pytest.approx(0.1) and buckets[1]["high"] == pytest.approx(4.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert buckets[0]["predicted"] == pytest.approx((sig(0.1) + sig(0.2)) / 2)
    assert M.calibration_buckets([], []) == []


def test_rm_gold_accuracy_scores_against_gold_not_labels():
    # RM diffs [1, 1, -1, 1, 1]; gold margins [0.2, -0.3, -0.1, 0, nan]:
    # pair 0 right, pair 1 wrong (label flipped, RM followed it), pair 2 right (RM saw through the flip),
    # pairs 3 (gold tie) and 4 (unknown) left out -> 2/3
    acc, _ = M.rm_gold_accuracy([1, 1, 0, 1, 1], [0, 0, 1, 0, 0], [0.2, -0.3, -0.1, 0.0, float("nan")])
    assert acc == pytest.approx(2 / 3)
    assert math.isnan(M.rm_gold_accuracy([1.0], [0.0], [float("nan")])[0])


def test_pearson_by_hand():
    # x dev [-2 -1 0 1 2], y dev [-1 -2 1 0 2]: sum xy = 8, sum x^2 = sum y^2 = 10 -> r = 0.8;
    # p = erfc(|atanh(0.8)| * sqrt(5 - 3) / sqrt(2)) = erfc(atanh(0.8)) = 0.1203
    r, p = M.pearson([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert r == pytest.approx(0.8)
    assert p == pytest.approx(math.erfc(math.atanh(0.8)))
    r_line, p_line = M.pearson([1, 2, 3, 4, 5], [3, 5, 7, 9, 11])  # an exact line
    assert r_line == pytest.approx(1.0) and p_line < 1e-100
    r_const, p_const = M.pearson([1, 2, 3, 4], [1, 1, 1, 1])
    assert math.isnan(r_const) and p_const == 1.0


def test_ensemble_disagreement_by_hand():
    # sample 0: RMs say 0 and 2 -> std 1; sample 1: 2 and 2 -> std 0; mean 0.5
    assert M.ensemble_disagreement(np.array([[0.0, 2.0], [2.0, 2.0]])) == pytest.approx(0.5)
    assert math.isnan(M.ensemble_disagreement([[1.0, 2.0]]))


def test_paired_difference_by_hand():
    # 3 prompts; a: per-prompt means 0.5, 1.0, 0.0; b: 0.25, 0.75, 0.0 -> differences 0.25, 0.25, 0.0
    a = [[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    b = [[0.0, 0.5, 0.25, 0.25], [0.75, 0.75, 0.75, 0.75], [0.0, 0.0, 0.0, 0.0]]
    mean, se = M.paired_difference(a, b)
    diffs = [0.25, 0.25, 0.0]
    m = sum(diffs) / 3
    sd = (sum((d - m) ** 2 for d in diffs) / 2) ** 0.5
    assert mean == pytest.approx(1 / 6) and se == pytest.approx(sd / 3**0.5)
    # pairing removes the prompt effect: unpaired errors are much larger here
    assert se < math.hypot(M.grouped_mean_and_stderr(a)[1], M.grouped_mean_and_stderr([r[:2] for r in b])[1])
    with pytest.raises(ValueError, match="same prompts"):
        M.paired_difference(a, b[:2])
