"""rollout.rewards.score_proxy: an ensemble proxy's mean and spread from one scoring pass, by hand."""

from __future__ import annotations

import pytest

from alignkit.rollout.rewards import score_proxy


def test_plain_proxy_passes_through_without_disagreement():
    proxy = lambda prompts, texts: [[float(len(t)) for t in per] for per in texts]  # noqa: E731
    assert score_proxy(proxy, ["p", "q"], [["a", "bb"], ["ccc"]]) == ([[1.0, 2.0], [3.0]], None)


def test_ensemble_proxy_gives_member_mean_and_mean_std_from_one_call():
    calls = []

    def proxy(prompts, texts):  # never called: the ensemble path reads per_member only
        raise AssertionError("scored twice")

    def per_member(prompts, texts):
        calls.append(1)
        return [[[0.0, 2.0], [1.0, 1.0]], [[4.0, 0.0]]]  # [prompt][response][member]

    proxy.per_member = per_member
    rewards, disagreement = score_proxy(proxy, ["p", "q"], [["a", "b"], ["c"]])
    assert rewards == [[1.0, 1.0], [2.0]]
    # per-sample std over the 2 members (ddof 0): 1, 0, 2 -> mean 1
    assert disagreement == pytest.approx(1.0)
    assert calls == [1]
