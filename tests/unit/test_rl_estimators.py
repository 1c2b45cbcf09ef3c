"""Critic-free estimators and the policy-gradient loss family: hand-worked numbers, a slow loop reference,
and a planted bandit whose optimum is known."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses import (aggregate_loss, clip_fraction, clipped_policy_terms, importance_ratio, loss_denominator,
                             loss_numerator, ppo_policy_loss)
from alignkit.rl import (broadcast_to_tokens, group_advantages, overlong_penalty, reinforce_pp_advantages,
                         varied_groups)


def test_group_advantages_hand_worked():
    r = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    # group 0: mean 2, std (Bessel) 1; group 1: all equal -> 0 under every estimator
    assert torch.allclose(group_advantages(r, "grpo"), torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), atol=1e-5)
    assert torch.allclose(group_advantages(r, "dr_grpo"), torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    # rloo: 1 - mean(2, 3) = -1.5; 2 - 2 = 0; 3 - 1.5 = 1.5
    assert torch.allclose(group_advantages(r, "rloo"), torch.tensor([[-1.5, 0.0, 1.5], [0.0, 0.0, 0.0]]))
    # grpo with a different spread: [0, 4] -> mean 2, std sqrt(8) -> -+2/sqrt(8)
    two = group_advantages(torch.tensor([[0.0, 4.0]]), "grpo")
    assert torch.allclose(two, torch.tensor([[-2 / math.sqrt(8), 2 / math.sqrt(8)]]), atol=1e-5)


def slow_group_advantages(rewards: list[list[float]], estimator: str, eps: float = 1e-6) -> list[list[float]]:
    out = []
    for group in rewards:
        g = len(group)
        mean = sum(group) / g
        if estimator == "grpo":
            std = math.sqrt(sum((x - mean) ** 2 for x in group) / (g - 1))
            out.append([(x - mean) / (std + eps) for x in group])
        elif estimator == "dr_grpo":
            out.append([x - mean for x in group])
        else:
            out.append([x - (sum(group) - x) / (g - 1) for x in group])
    return out


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_match_a_loop(estimator):
    rewards = torch.rand(7, 5, generator=torch.Generator().manual_seed(3))
    expected = torch.tensor(slow_group_advantages(rewards.tolist(), estimator))
    assert torch.allclose(group_advantages(rewards, estimator), expected, atol=1e-5)


def test_group_advantages_reject_bad_input():
    with pytest.raises(ValueError, match="G=1"):
        group_advantages(torch.ones(3, 1), "rloo")
    with pytest.raises(ValueError, match="unknown group estimator"):
        group_advantages(torch.ones(3, 2), "ppo")
    with pytest.raises(ValueError, match=r"\[P,G\]"):
        group_advantages(torch.ones(3), "grpo")


def test_reinforce_pp_is_whitened_return_to_go():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # returns-to-go (gamma 1): row 0 [1, 1, 1]; row 1 [2, 2, -] -> 5 counted values, mean 1.4
    returns = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0])
    expected = (returns - returns.mean()) / returns.std()
    adv = reinforce_pp_advantages(rewards, mask)
    assert torch.allclose(adv[mask != 0], expected, atol=1e-4)
    assert adv[1, 2] == 0


def test_broadcast_varied_and_overlong():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.equal(broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask), torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))
    assert varied_groups(torch.tensor([[1.0, 1.0], [0.0, 1.0]])).tolist() == [False, True]
    # cap 10, buffer 4: <= 6 free; 8 -> -(8-6)/4 = -0.5; 10 -> -1 (times factor 2)
    pen = overlong_penalty(torch.tensor([3, 6, 8, 10]), 10, 4, factor=2.0)
    assert torch.allclose(pen, torch.tensor([0.0, 0.0, -1.0, -2.0]))
    with pytest.raises(ValueError):
        overlong_penalty(torch.tensor([1]), 10, 0)


def test_loss_aggregations_hand_worked():
    per_token = torch.tensor([[1.0, 3.0, 9.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate_loss(per_token, mask, "token_mean").item() == pytest.approx((1 + 3 + 2) / 3)
    assert aggregate_loss(per_token, mask, "seq_mean_token_mean").item() == pytest.approx((2 + 2) / 2)
    assert aggregate_loss(per_token, mask, "seq_mean_token_sum_norm", max_tokens=4).item() == pytest.approx((4 + 2) / 4 / 2)
    # split the batch: numerators add up, divided once by the whole batch's denominator
    parts = [slice(0, 1), slice(1, 2)]
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        total = sum(loss_numerator(per_token[s], mask[s], agg, 4) for s in parts) / loss_denominator(mask, agg)
        assert total.item() == pytest.approx(aggregate_loss(per_token, mask, agg, 4).item())


def test_clipped_terms_and_ratio_levels():
    logprobs = torch.tensor([[0.0, math.log(2.0)], [math.log(0.5), 0.0]], requires_grad=True)
    old = torch.zeros(2, 2)
    mask = torch.ones(2, 2)
    ratio = importance_ratio(logprobs, old, mask, "token")
    assert torch.allclose(ratio, torch.tensor([[1.0, 2.0], [0.5, 1.0]]))
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    # symmetric 0.2: [-1, -1.2] (ratio 2 clipped at 1.2 for A>0); [0.8 (0.5 clipped up to 0.8: max(0.5, 0.8)), 1]
    terms = clipped_policy_terms(ratio, adv, 0.2)
    assert torch.allclose(terms, torch.tensor([[-1.0, -1.2], [0.8, 1.0]]))
    # DAPO clip-higher 0.28 lets the A>0 token grow to 1.28
    assert clipped_policy_terms(ratio, adv, 0.2, 0.28)[0, 1].item() == pytest.approx(-1.28)
    assert clip_fraction(ratio, adv, mask, 0.2).item() == pytest.approx(0.5)
    # GSPO: sequence ratio exp(mean log ratio): row 0 sqrt(2), row 1 sqrt(0.5), on every token
    seq = importance_ratio(logprobs, old, mask, "sequence")
    assert torch.allclose(seq, torch.tensor([[2 ** 0.5] * 2, [0.5 ** 0.5] * 2]), atol=1e-6)
    # the general pieces reproduce the contract's ppo_policy_loss
    assert torch.allclose(aggregate_loss(terms, mask), ppo_policy_loss(logprobs, old, adv, mask, 0.2))


def test_sequence_ratio_ignores_padding():
    logprobs = torch.tensor([[math.log(2.0), 5.0]])
    mask = torch.tensor([[1.0, 0.0]])
    assert importance_ratio(logprobs, torch.zeros(1, 2), mask, "sequence")[0, 0].item() == pytest.approx(2.0)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_planted_bandit_converges_to_the_best_arm(estimator):
    """A softmax policy over 6 arms, reward 1 for arm 4 only: group estimator + clipped loss + Adam must put
    almost all probability on arm 4 (the known optimum) within 60 steps of 16 samples."""
    torch.manual_seed(0)
    logits = torch.zeros(6, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(60):
        with torch.no_grad():
            old = torch.log_softmax(logits, -1)
            arms = torch.multinomial(old.exp(), 16, replacement=True, generator=generator)
        rewards = (arms == 4).float().view(2, 8)  # 2 prompts x 8 samples
        adv = group_advantages(rewards, estimator).view(16, 1)
        logp = torch.log_softmax(logits, -1)[arms].view(16, 1)
        loss = aggregate_loss(clipped_policy_terms(importance_ratio(logp, old[arms].view(16, 1), torch.ones(16, 1)),
                                                   adv), torch.ones(16, 1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.softmax(logits, -1)[4].item() > 0.95
