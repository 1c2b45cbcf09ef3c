"""KL metrics on hand-worked numbers: stderrs grouped by prompt, and the best-of-n KL estimate and bound."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignkit.eval import metrics as M

LOG4 = math.log(4)


def test_kl_stderr_is_over_prompts_when_samples_are_grouped():
    # Two prompts x two samples, log-ratios [[1, 3], [0, 0]]: prompt means 2 and 0 -> mean 1, stderr
    # std([2, 0], ddof=1) / sqrt(2) = 1. Over the four samples as if independent it would be 0.707.
    policy = np.array([[-1.0, -1.0], [-2.0, -2.0]])
    ref = np.array([[-2.0, -4.0], [-2.0, -2.0]])
    assert M.kl_from_samples(policy, ref) == pytest.approx((1.0, 1.0))
    assert M.kl_from_samples(policy.ravel(), ref.ravel())[1] == pytest.approx(math.sqrt(2) / 2)
    # k3 per response: one token p = 0.5, q = 0.25 gives 0.5 - 1 + ln 2 = 0.19315; responses (k3, 0 | 0, 0)
    # -> prompt means (k3/2, 0): mean k3/4, stderr std([k3/2, 0], ddof=1) / sqrt(2) = k3/4.
    k3 = 0.5 - 1 + math.log(2)
    lp = [[math.log(0.5)], [0.0], [-1.0], [-1.0]]
    rf = [[math.log(0.25)], [0.0], [-1.0], [-1.0]]
    mean, se = M.kl_k3_per_token(lp, rf, group_size=2)
    assert mean == pytest.approx(k3 / 4)
    assert se == pytest.approx(k3 / 4)
    assert M.kl_k3_per_token(lp, rf)[1] == pytest.approx(np.std([k3, 0, 0, 0], ddof=1) / 2)  # ungrouped
    with pytest.raises(ValueError, match="groups of 3"):
        M.kl_k3_per_token(lp, rf, group_size=3)


def test_best_of_n_kl_estimate_by_hand():
    def G(u: float, n: int = 4) -> float:  # the continuous part's integral up to F = u
        return u**n * (math.log(n) + (n - 1) * math.log(u) - (n - 1) / n)

    bound = LOG4 - 3 / 4  # 0.636294
    # All distinct (a continuous reward): exactly the bound.
    assert M.best_of_n_kl_estimate([[0.1, 0.5, 0.3, 0.9]])[0] == pytest.approx(bound)
    # A sampler that always gives the same answer: best-of-n is that answer, KL 0.
    assert M.best_of_n_kl_estimate([[2.0, 2.0, 2.0, 2.0]])[0] == 0.0
    # Two atoms of mass 1/2: best-of-4 picks the better one with probability 15/16 -> KL of Bernoulli(15/16)
    # to Bernoulli(1/2) = 15/16 log(15/8) + 1/16 log(1/8) = 0.459356.
    two_atoms = 15 / 16 * math.log(15 / 8) + 1 / 16 * math.log(1 / 8)
    assert M.best_of_n_kl_estimate([[0.0, 1.0, 0.0, 1.0]])[0] == pytest.approx(two_atoms)
    assert two_atoms == pytest.approx(0.459356, abs=1e-6)
    # One value seen once at the bottom (a slice F in [0, 1/4]) and an atom of mass 3/4 on top, picked with
    # probability 1 - (1/4)^4 = 255/256: G(1/4) + 255/256 log((255/256) / (3/4)) = -0.013760 + 0.282659.
    top_atom = G(0.25) + 255 / 256 * math.log((255 / 256) / 0.75)
    assert top_atom == pytest.approx(0.268899, abs=1e-6)
    assert M.best_of_n_kl_estimate([[0.0, 1.0, 1.0, 1.0]])[0] == pytest.approx(top_atom)
    # It is Beirami et al.'s single-top-atom form with e = 3/4.
    e = 0.75
    assert top_atom == pytest.approx((1 - e) ** 4 * (LOG4 + 3 * math.log(1 - e) - 3 / 4)
                                     + (1 - (1 - e) ** 4) * math.log((1 - (1 - e) ** 4) / e))
    # Equal texts are one outcome even when the reward model scores them a rounding error apart: "a" is an
    # atom of mass 1/2 between two slices, F in [0, 1/4] ("b"), [1/4, 3/4] ("a"), [3/4, 1] ("c").
    middle = G(0.25) + (0.75**4 - 0.25**4) * math.log((0.75**4 - 0.25**4) / 0.5) + G(1.0) - G(0.75)
    assert middle == pytest.approx(0.547403, abs=1e-6)
    rewards, texts = [[0.5, 0.2, 0.9, 0.5000001]], [["a", "b", "c", "a"]]
    assert M.best_of_n_kl_estimate(rewards, texts)[0] == pytest.approx(middle)
    assert M.best_of_n_kl_estimate(rewards)[0] == pytest.approx(bound)  # without texts: four distinct rewards
    # Prompts are the units: mean and stderr over the per-prompt estimates.
    mean, se = M.best_of_n_kl_estimate([[0.1, 0.5, 0.3, 0.9], [2.0, 2.0, 2.0, 2.0]])
    assert (mean, se) == pytest.approx((bound / 2, bound / 2))
    # n = 1 is plain sampling.
    assert M.best_of_n_kl_estimate([[0.3], [0.7]])[0] == 0.0


def test_best_of_n_kl_estimate_never_exceeds_the_upper_bound():
    rng = np.random.default_rng(0)
    n = 8
    bound = math.log(n) - (n - 1) / n
    for levels in (2, 3, 5, 50):
        rewards = rng.integers(0, levels, (200, n)).astype(float)
        per_prompt = [M.best_of_n_kl_estimate(row[None])[0] for row in rewards]
        assert 0.0 <= min(per_prompt) and max(per_prompt) <= bound + 1e-12
    with pytest.raises(ValueError, match="rewards"):
        M.best_of_n_kl_estimate([1.0, 2.0])
    with pytest.raises(ValueError, match="responses"):
        M.best_of_n_kl_estimate([[1.0, 2.0]], [["a"]])
