"""alignkit.losses: hand-worked numbers, python-loop references, gradients in clipped regions."""

import itertools
import math

import pytest
import torch

from alignkit import losses

LN2 = math.log(2.0)
SOFTPLUS_1 = math.log1p(math.exp(-1.0))  # -logsigmoid(1) = ln(1 + e^-1) = 0.3132617


def softplus(x: float) -> float:
    """-logsigmoid(-x) = ln(1 + e^x), the scalar reference."""
    return math.log1p(math.exp(x))


# --------------------------------------------------------------------------- lm_loss


def test_lm_loss_by_hand_shifts_by_one():
    # Position 0 logits [0, ln 3] predict labels[1] = 1: p = 3/4. Position 1 logits [0, 0] predict
    # labels[2] = 0: p = 1/2. Position 2 predicts nothing (no label after it).
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [9.0, -9.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    nll = [-math.log(0.75), LN2]
    torch.testing.assert_close(losses.lm_loss(logits, labels), torch.tensor(sum(nll) / 2))
    torch.testing.assert_close(losses.lm_loss(logits, labels, reduction="sum"), torch.tensor(sum(nll)))
    ignored_last = torch.tensor([[-100, 1, -100]])
    torch.testing.assert_close(losses.lm_loss(logits, ignored_last), torch.tensor(nll[0]))


def test_lm_loss_matches_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 5)
    labels = torch.randint(0, 5, (3, 6))
    labels[0, :3] = -100
    labels[2, 5] = -100
    total, count = 0.0, 0
    for b in range(3):
        for t in range(5):
            target = labels[b, t + 1].item()
            if target == -100:
                continue
            row = logits[b, t].tolist()
            total += math.log(sum(math.exp(v) for v in row)) - row[target]
            count += 1
    torch.testing.assert_close(losses.lm_loss(logits, labels), torch.tensor(total / count))
    torch.testing.assert_close(losses.lm_loss(logits, labels, reduction="sum"), torch.tensor(total))


def test_lm_loss_all_ignored_is_zero_and_bad_reduction_raises():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    out = losses.lm_loss(logits, torch.full((1, 3), -100))
    assert out.item() == 0.0 and out.requires_grad
    with pytest.raises(ValueError, match="reduction"):
        losses.lm_loss(logits, torch.zeros(1, 3, dtype=torch.long), reduction="none")


# --------------------------------------------------------------------------- reward models


def test_bradley_terry_by_hand_with_and_without_margin():
    chosen = torch.tensor([2.0, 0.0])
    rejected = torch.tensor([1.0, 0.0])
    # Gaps 1 and 0: losses ln(1+e^-1) and ln 2.
    torch.testing.assert_close(
        losses.bradley_terry_loss(chosen, rejected), torch.tensor((SOFTPLUS_1 + LN2) / 2)
    )
    # Margin [0.5, -1]: gaps 0.5 and 1 -> ln(1+e^-0.5) and ln(1+e^-1).
    margin = torch.tensor([0.5, -1.0])
    expected = (softplus(-0.5) + SOFTPLUS_1) / 2
    torch.testing.assert_close(losses.bradley_terry_loss(chosen, rejected, margin), torch.tensor(expected))


def test_bradley_terry_shape_error_names_argument():
    with pytest.raises(ValueError, match="rejected_rewards"):
        losses.bradley_terry_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="margin"):
        losses.bradley_terry_loss(torch.zeros(3), torch.zeros(3), torch.zeros(1))


def test_ranking_loss_by_hand():
    # scores order responses 0 > 2 > 1. Pairs (0,1): 3-1 = 2; (0,2): 3-2 = 1; (2,1): 2-1 = 1.
    rewards = torch.tensor([[3.0, 1.0, 2.0]])
    scores = torch.tensor([[2.0, 0.0, 1.0]])
    expected = (softplus(-2.0) + 2 * SOFTPLUS_1) / 3
    torch.testing.assert_close(losses.ranking_loss(rewards, scores), torch.tensor(expected))
    # Ties contribute nothing: scores [1, 1, 0] -> pairs (0,2): gap 1, (1,2): gap -1.
    tied = torch.tensor([[1.0, 1.0, 0.0]])
    torch.testing.assert_close(
        losses.ranking_loss(rewards, tied), torch.tensor((SOFTPLUS_1 + softplus(1.0)) / 2)
    )
    # margin_scale 0.5: margins 0.5*(2-0)=1, 0.5*(2-1)=0.5, 0.5*(1-0)=0.5 -> gaps 1, 0.5, 0.5.
    torch.testing.assert_close(
        losses.ranking_loss(rewards, scores, margin_scale=0.5),
        torch.tensor((SOFTPLUS_1 + 2 * softplus(-0.5)) / 3),
    )


def test_ranking_loss_is_mean_of_pairwise_bradley_terry():
    torch.manual_seed(1)
    rewards = torch.randn(4, 5)
    scores = torch.randint(0, 3, (4, 5)).float()  # small range: plenty of ties
    for margin_scale in (0.0, 0.7):
        chosen, rejected, margins = [], [], []
        for b in range(4):
            for i, j in itertools.permutations(range(5), 2):
                if scores[b, i] > scores[b, j]:
                    chosen.append(rewards[b, i])
                    rejected.append(rewards[b, j])
                    margins.append(margin_scale * (scores[b, i] - scores[b, j]))
        expected = losses.bradley_terry_loss(torch.stack(chosen), torch.stack(rejected), torch.stack(margins))
        torch.testing.assert_close(losses.ranking_loss(rewards, scores, margin_scale), expected)


def test_ranking_loss_with_k2_equals_bradley_terry_and_all_ties_is_zero():
    rewards = torch.tensor([[0.3, 1.2], [2.0, -1.0]])
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # row 0: 0 better; row 1: 1 better
    expected = losses.bradley_terry_loss(torch.tensor([0.3, -1.0]), torch.tensor([1.2, 2.0]))
    torch.testing.assert_close(losses.ranking_loss(rewards, scores), expected)
    assert losses.ranking_loss(rewards, torch.ones(2, 2)).item() == 0.0
    with pytest.raises(ValueError, match="scores"):
        losses.ranking_loss(rewards, torch.ones(2, 3))


def test_reward_centering_penalty_by_hand():
    # (1 + 4 + 9) / 3
    torch.testing.assert_close(losses.reward_centering_penalty(torch.tensor([1.0, -2.0, 3.0])), torch.tensor(14 / 3))


# --------------------------------------------------------------------------- DPO family


def _dpo_inputs(requires_grad: bool = False):
    # h = (pc - rc) - (pr - rr) = (-1 + 2) - (-3 + 2) = 2
    pc = torch.tensor([-1.0], requires_grad=requires_grad)
    pr = torch.tensor([-3.0], requires_grad=requires_grad)
    rc = torch.tensor([-2.0], requires_grad=requires_grad)
    rr = torch.tensor([-2.0], requires_grad=requires_grad)
    return pc, pr, rc, rr


def test_dpo_sigmoid_by_hand():
    # beta 0.5: beta*h = 1 -> -logsigmoid(1) = ln(1+e^-1). Rewards 0.5*(+1) and 0.5*(-1).
    out, chosen_rewards, rejected_rewards = losses.dpo_loss(*_dpo_inputs(), beta=0.5)
    torch.testing.assert_close(out, torch.tensor([SOFTPLUS_1]))
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.5]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.5]))


def test_cdpo_label_smoothing_by_hand():
    # 0.9 * ln(1+e^-1) + 0.1 * ln(1+e^1); ln(1+e) = 1 + ln(1+e^-1), so this is ln(1+e^-1) + 0.1.
    out, _, _ = losses.dpo_loss(*_dpo_inputs(), beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(out, torch.tensor([SOFTPLUS_1 + 0.1]))


def test_ipo_by_hand():
    # beta 0.5: 1/(2 beta) = 1 -> (2 - 1)^2 = 1. beta 0.25: target 2 = h -> 0.
    out, _, _ = losses.dpo_loss(*_dpo_inputs(), beta=0.5, loss_type="ipo")
    torch.testing.assert_close(out, torch.tensor([1.0]))
    out, _, _ = losses.dpo_loss(*_dpo_inputs(), beta=0.25, loss_type="ipo")
    torch.testing.assert_close(out, torch.tensor([0.0]))


def test_dpo_matches_loop_on_random_inputs():
    torch.manual_seed(2)
    pc, pr, rc, rr = (torch.randn(6) * 3 for _ in range(4))
    for loss_type, ls in (("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)):
        beta = 0.3
        out, cr, rjr = losses.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=ls)
        for b in range(6):
            h = (pc[b].item() - rc[b].item()) - (pr[b].item() - rr[b].item())
            if loss_type == "sigmoid":
                expected = (1 - ls) * softplus(-beta * h) + ls * softplus(beta * h)
            else:
                expected = (h - 1 / (2 * beta)) ** 2
            assert out[b].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
            assert cr[b].item() == pytest.approx(beta * (pc[b].item() - rc[b].item()), rel=1e-5, abs=1e-6)
            assert rjr[b].item() == pytest.approx(beta * (pr[b].item() - rr[b].item()), rel=1e-5, abs=1e-6)


def test_dpo_gradients():
    pc, pr, rc, rr = _dpo_inputs(requires_grad=True)
    out, chosen_rewards, rejected_rewards = losses.dpo_loss(pc, pr, rc, rr, beta=0.5)
    out.sum().backward()
    # d/dpc [-logsigmoid(beta*h)] = -beta * sigmoid(-beta*h) = -0.5 * sigmoid(-1) = -0.1344707
    expected = -0.5 / (1 + math.e)
    assert pc.grad.item() == pytest.approx(expected, rel=1e-5)
    assert pr.grad.item() == pytest.approx(-expected, rel=1e-5)
    # The frozen reference and the metric rewards carry no gradient.
    assert rc.grad is None and rr.grad is None
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    # IPO at its optimum h = 1/(2 beta) has zero gradient.
    pc, pr, rc, rr = _dpo_inputs(requires_grad=True)
    losses.dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo")[0].sum().backward()
    assert pc.grad.item() == 0.0 and pr.grad.item() == 0.0


def test_dpo_validation():
    args = _dpo_inputs()
    with pytest.raises(ValueError, match=r"unknown loss_type 'hinge'.*\['ipo', 'sigmoid'\]"):
        losses.dpo_loss(*args, loss_type="hinge")
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        losses.dpo_loss(*args[:3], torch.zeros(2))
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(*args, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        losses.dpo_loss(*args, beta=0.0)
    assert set(losses.LOSS_TYPES) == {"sigmoid", "ipo"}


# --------------------------------------------------------------------------- RRHF


def test_rrhf_by_hand():
    # Row 0, rewards 1 < 2 < 3. Pairs (worse, better): (0,1): relu(-1 - -2) = 1;
    # (0,2): relu(-1 - -0.5) = 0; (1,2): relu(-2 - -0.5) = 0 -> 1. Row 1: equal scores -> 0.
    scores = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 2.0]])
    torch.testing.assert_close(losses.rrhf_loss(scores, rewards), torch.tensor(0.5))
    # Tied rewards form no pair: rewards [1, 1, 3] drop (0,1) -> row 0 gives 0.
    torch.testing.assert_close(
        losses.rrhf_loss(scores, torch.tensor([[1.0, 1.0, 3.0], [0.0, 1.0, 2.0]])), torch.tensor(0.0)
    )


def test_rrhf_matches_loop():
    torch.manual_seed(3)
    scores = torch.randn(4, 5)
    rewards = torch.randint(0, 3, (4, 5)).float()
    per_prompt = []
    for b in range(4):
        total = 0.0
        for i in range(5):
            for j in range(5):
                if rewards[b, i] < rewards[b, j]:
                    total += max(0.0, scores[b, i].item() - scores[b, j].item())
        per_prompt.append(total)
    assert losses.rrhf_loss(scores, rewards).item() == pytest.approx(sum(per_prompt) / 4, rel=1e-5)


# --------------------------------------------------------------------------- PPO


def _ppo_tokens(requires_grad: bool = True):
    # old logprob 0 everywhere, eps 0.2. Tokens: (A=+1, ratio 1.5), (A=+1, ratio 0.5),
    # (A=-1, ratio 1.5), (A=-1, ratio 0.5), and a masked 5th token with a huge advantage.
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5, 3.0]])).requires_grad_(requires_grad)
    old = torch.zeros(1, 5)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    return logprobs, old, advantages, mask


def test_ppo_policy_loss_clipping_by_hand():
    logprobs, old, advantages, mask = _ppo_tokens()
    # max(-A r, -A clip(r)):
    #   A=+1, r=1.5: max(-1.5, -1.2) = -1.2  (clipped: no incentive to push r further up)
    #   A=+1, r=0.5: max(-0.5, -0.8) = -0.5  (unclipped)
    #   A=-1, r=1.5: max( 1.5,  1.2) =  1.5  (unclipped)
    #   A=-1, r=0.5: max( 0.5,  0.8) =  0.8  (clipped)
    # mean over 4 counted tokens = 0.6 / 4 = 0.15
    out = losses.ppo_policy_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    torch.testing.assert_close(out, torch.tensor(0.15))
    out.backward()
    # d/dlogprob of -A*r is -A*r (r = exp(lp - old)); clipped tokens get exactly 0; divided by 4.
    expected_grad = torch.tensor([[0.0, -0.5 / 4, 1.5 / 4, 0.0, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected_grad)
    assert losses.ppo_clip_fraction(logprobs, old, advantages, mask).item() == pytest.approx(0.5)


def test_ppo_policy_loss_matches_loop():
    torch.manual_seed(4)
    logprobs = torch.randn(3, 7) * 0.3
    old = torch.randn(3, 7) * 0.3
    advantages = torch.randn(3, 7)
    mask = (torch.rand(3, 7) > 0.3).float()
    terms = []
    for b in range(3):
        for t in range(7):
            if mask[b, t]:
                r = math.exp(logprobs[b, t].item() - old[b, t].item())
                a = advantages[b, t].item()
                terms.append(max(-a * r, -a * min(max(r, 0.8), 1.2)))
    out = losses.ppo_policy_loss(logprobs, old, advantages, mask)
    assert out.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_ppo_value_loss_clipping_by_hand():
    # old values 0, eps 0.2:
    #   v=0.5, R=1: unclipped (0.5-1)^2 = 0.25, clipped v=0.2: (0.2-1)^2 = 0.64 -> 0.64 (clipped)
    #   v=-0.5, R=1: unclipped 2.25, clipped v=-0.2: 1.44 -> 2.25 (unclipped)
    #   v=0.1, R=0: inside the clip range, both 0.01
    # 0.5 * (0.64 + 2.25 + 0.01) / 3 = 0.48333; masked 4th token ignored.
    values = torch.tensor([[0.5, -0.5, 0.1, 7.0]], requires_grad=True)
    old = torch.zeros(1, 4)
    returns = torch.tensor([[1.0, 1.0, 0.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = losses.ppo_value_loss(values, old, returns, mask, clip_eps=0.2)
    torch.testing.assert_close(out, torch.tensor(0.5 * 2.9 / 3))
    out.backward()
    # Gradient 0.5 * 2 (v - R) / 3 on unclipped tokens, 0 on the clipped one and the masked one.
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -1.5 / 3, 0.1 / 3, 0.0]]))


def test_ppo_value_loss_matches_loop():
    torch.manual_seed(5)
    values, old, returns = torch.randn(3, 6), torch.randn(3, 6), torch.randn(3, 6)
    mask = (torch.rand(3, 6) > 0.3).float()
    terms = []
    for b in range(3):
        for t in range(6):
            if mask[b, t]:
                v, o, r = values[b, t].item(), old[b, t].item(), returns[b, t].item()
                clipped = o + min(max(v - o, -0.2), 0.2)
                terms.append(max((v - r) ** 2, (clipped - r) ** 2))
    out = losses.ppo_value_loss(values, old, returns, mask)
    assert out.item() == pytest.approx(0.5 * sum(terms) / len(terms), rel=1e-5)


def test_ppo_shape_errors_name_argument():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        losses.ppo_policy_loss(x, x, torch.zeros(2, 4), x)
    with pytest.raises(ValueError, match="returns"):
        losses.ppo_value_loss(x, x, torch.zeros(3, 3), x)
