"""alignkit.rl: GAE against a reversed python loop, KL estimators and controllers by hand."""

import math

import pytest
import torch

from alignkit import rl


# --------------------------------------------------------------------------- GAE


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1 is right-padded
    advantages, returns = rl.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # Row 0: t=2: delta = 1 + 0 - 0.5 = 0.5, A = 0.5; t=1: delta = 0 + 0.5 - 0.5 = 0,
    #        A = 0 + 0.5*0.5 = 0.25; t=0: delta = 0, A = 0.5*0.25 = 0.125.
    # Row 1: last counted token t=1 bootstraps from 0 (not the pad's 9): delta = 1 - 0.5 = 0.5,
    #        A = 0.5; t=0: delta = 0, A = 0.25; the pad gets A = 0.
    torch.testing.assert_close(advantages, torch.tensor([[0.125, 0.25, 0.5], [0.25, 0.5, 0.0]]))
    torch.testing.assert_close(returns, advantages + values)


def _gae_loop(rewards, values, start, end, gamma, lam):
    """Textbook reversed loop over one row's counted span [start, end)."""
    advantages = [0.0] * len(rewards)
    last = 0.0
    for t in reversed(range(start, end)):
        next_value = values[t + 1] if t + 1 < end else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        advantages[t] = last
    return advantages


def test_gae_matches_loop_with_left_masked_prompts_and_right_padding():
    torch.manual_seed(0)
    batch, length, gamma, lam = 5, 8, 0.9, 0.8
    rewards, values = torch.randn(batch, length), torch.randn(batch, length)
    spans = [(0, 8), (0, 5), (2, 8), (3, 4), (1, 6)]
    mask = torch.zeros(batch, length)
    for b, (start, end) in enumerate(spans):
        mask[b, start:end] = 1.0
    advantages, returns = rl.gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected = torch.tensor(
        [_gae_loop(rewards[b].tolist(), values[b].tolist(), *spans[b], gamma, lam) for b in range(batch)]
    )
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected + values)


def test_gae_gamma_1_lam_1_returns_reward_to_go():
    torch.manual_seed(1)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2, [0.0] + [1.0] * 3 + [0.0] * 2])
    _, returns = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    for b in range(3):
        for t in range(6):
            if mask[b, t]:
                to_go = sum(rewards[b, s].item() for s in range(t, 6) if mask[b, s])
                assert returns[b, t].item() == pytest.approx(to_go, abs=1e-5)


def test_gae_skips_a_hole_in_the_middle():
    rewards, values = torch.tensor([[1.0, 7.0, 2.0]]), torch.tensor([[0.3, 7.0, 0.6]])
    with_hole, _ = rl.gae(rewards, values, torch.tensor([[1.0, 0.0, 1.0]]), gamma=0.9, lam=0.7)
    packed, _ = rl.gae(rewards[:, [0, 2]], values[:, [0, 2]], torch.ones(1, 2), gamma=0.9, lam=0.7)
    torch.testing.assert_close(with_hole[:, [0, 2]], packed)
    assert with_hole[0, 1].item() == 0.0


def test_gae_is_detached_and_validates_shapes():
    values = torch.randn(2, 3, requires_grad=True)
    advantages, returns = rl.gae(torch.randn(2, 3), values, torch.ones(2, 3))
    assert not advantages.requires_grad and not returns.requires_grad
    with pytest.raises(ValueError, match="mask"):
        rl.gae(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 4))


# --------------------------------------------------------------------------- KL


def test_kl_penalty_estimators_by_hand():
    # log_ratio = ln 0.5 - ln 0.25 = ln 2 (first) and -ln 2 (second).
    logprobs = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    ln2 = math.log(2)
    torch.testing.assert_close(rl.kl_penalty(logprobs, ref, "k1"), torch.tensor([[ln2, -ln2]]))
    torch.testing.assert_close(rl.kl_penalty(logprobs, ref, "k2"), torch.tensor([[0.5 * ln2**2] * 2]))
    # k3 = exp(-lr) - 1 + lr: 0.5 - 1 + ln2 = 0.193147; 2 - 1 - ln2 = 0.306853
    torch.testing.assert_close(rl.kl_penalty(logprobs, ref, "k3"), torch.tensor([[ln2 - 0.5, 1 - ln2]]))
    torch.testing.assert_close(rl.kl_penalty(logprobs, ref, "abs"), torch.tensor([[ln2, ln2]]))
    with pytest.raises(ValueError, match=r"unknown KL kind 'k4'.*k1"):
        rl.kl_penalty(logprobs, ref, "k4")


def test_k1_and_k3_are_unbiased_and_k3_nonnegative():
    # E_{x~p}[k(x)] over a whole categorical equals KL(p||q) exactly for k1 and k3.
    torch.manual_seed(2)
    p = torch.softmax(torch.randn(10), 0)
    q = torch.softmax(torch.randn(10), 0)
    true_kl = (p * (p.log() - q.log())).sum()
    for kind in ("k1", "k3"):
        estimate = (p * rl.kl_penalty(p.log()[None], q.log()[None], kind)[0]).sum()
        torch.testing.assert_close(estimate, true_kl)
    samples = rl.kl_penalty(torch.randn(50, 20), torch.randn(50, 20), "k3")
    assert (samples >= 0).all()


def test_kl_shaped_rewards_by_hand():
    logprobs = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.0, 0.0, 0.0]])
    ref = torch.zeros(3, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    scores = torch.tensor([2.0, 5.0, 9.0])
    rewards, kl = rl.kl_shaped_rewards(scores, logprobs, ref, mask, kl_coef=0.5)
    # kl = log_ratio * mask; reward = -0.5*kl, and the score lands on the last counted token.
    torch.testing.assert_close(kl, torch.tensor([[0.1, 0.2, 0.0], [0.4, 0.5, 0.6], [0.0, 0.0, 0.0]]))
    expected = torch.tensor([[-0.05, -0.1 + 2.0, 0.0], [-0.2, -0.25, -0.3 + 5.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)  # the empty row 2 receives no score


def test_kl_shaped_rewards_matches_loop_with_left_masking():
    torch.manual_seed(3)
    logprobs, ref = torch.randn(4, 6), torch.randn(4, 6)
    mask = torch.zeros(4, 6)
    for b, (start, end) in enumerate([(0, 6), (1, 3), (2, 5), (0, 1)]):
        mask[b, start:end] = 1.0
    scores = torch.randn(4)
    rewards, _ = rl.kl_shaped_rewards(scores, logprobs, ref, mask, kl_coef=0.1, kind="k3")
    for b in range(4):
        last = max(t for t in range(6) if mask[b, t])
        for t in range(6):
            lr = logprobs[b, t].item() - ref[b, t].item()
            expected = -0.1 * (math.exp(-lr) - 1 + lr) if mask[b, t] else 0.0
            expected += scores[b].item() if t == last else 0.0
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-5)


def test_kl_shaped_rewards_validates_scores():
    with pytest.raises(ValueError, match="scores"):
        rl.kl_shaped_rewards(torch.zeros(3), torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2, 4), 0.1)


# --------------------------------------------------------------------------- controllers


def test_adaptive_kl_controller_by_hand():
    controller = rl.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # KL 9: error 9/6 - 1 = 0.5, clipped to 0.2; value *= 1 + 0.2 * 256 / 10000 = 1.00512.
    controller.update(current_kl=9.0, n_steps=256)
    assert controller.value == pytest.approx(0.2 * 1.00512)
    # KL 3: error -0.5 -> -0.2; value *= 1 - 0.2 * 256 / 10000 = 0.99488.
    controller.update(current_kl=3.0, n_steps=256)
    assert controller.value == pytest.approx(0.2 * 1.00512 * 0.99488)
    # KL 6.6: error 0.1 (inside the clip); value *= 1 + 0.1 * 100 / 10000 = 1.001.
    controller.update(current_kl=6.6, n_steps=100)
    assert controller.value == pytest.approx(0.2 * 1.00512 * 0.99488 * 1.001)


def test_kl_controllers_state_dict_round_trip():
    controller = rl.AdaptiveKLController(0.1, target=4.0, horizon=1000)
    controller.update(10.0, 64)
    restored = rl.AdaptiveKLController(0.5, target=1.0, horizon=5)
    restored.load_state_dict(controller.state_dict())
    restored.update(1.0, 64)
    controller.update(1.0, 64)
    assert restored.value == controller.value
    fixed = rl.FixedKLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05
    other = rl.FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05
    with pytest.raises(ValueError, match="target"):
        rl.AdaptiveKLController(0.1, target=0.0, horizon=10)
