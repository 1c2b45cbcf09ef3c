"""alignkit.ops: hand-worked numbers on tiny inputs, and python-loop references on random ones."""

import math

import pytest
import torch

from alignkit import ops


def test_logprobs_from_logits_by_hand():
    # Row logits [0, ln 3]: softmax = [1/4, 3/4]. Label 1 -> ln(3/4); label 0 -> ln(1/4).
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)], [5.0, 1.0]]])
    labels = torch.tensor([[1, 0, -100]])
    out = ops.logprobs_from_logits(logits, labels)
    expected = torch.tensor([[math.log(0.75), math.log(0.25), 0.0]])  # ignored label -> 0
    torch.testing.assert_close(out, expected)


def _logprobs_loop(logits, labels):
    out = torch.zeros(labels.shape, dtype=torch.float64)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[b, t] == -100:
                continue
            row = logits[b, t].double()
            out[b, t] = row[labels[b, t]] - math.log(sum(math.exp(v) for v in row.tolist()))
    return out


def test_logprobs_from_logits_matches_loop_and_log_softmax_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (3, 5))
    labels[0, 4] = -100
    labels[2, 0] = -100
    out = ops.logprobs_from_logits(logits, labels)
    torch.testing.assert_close(out.double(), _logprobs_loop(logits.detach(), labels), atol=1e-5, rtol=0)
    # Gradient equals that of the obvious log_softmax + gather formulation.
    keep = labels != -100
    ref = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    (grad_ref,) = torch.autograd.grad((ref * keep).sum(), logits)
    (grad_out,) = torch.autograd.grad(out.sum(), logits)
    torch.testing.assert_close(grad_out, grad_ref)
    assert torch.all(grad_out[0, 4] == 0)  # an ignored position gets no gradient


def test_logprobs_from_logits_bf16_upcasts_to_float32():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 11).bfloat16()
    labels = torch.randint(0, 11, (2, 3))
    out = ops.logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    # Exactly the float32 computation on the same (bf16-rounded) values.
    torch.testing.assert_close(out, ops.logprobs_from_logits(logits.float(), labels))


def test_logprobs_from_logits_shape_errors():
    with pytest.raises(ValueError, match="labels"):
        ops.logprobs_from_logits(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_masked_sum_and_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, float("nan"), 40.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    # Row 0: 1+2+4 = 7 over 3 tokens; row 1: 20 over 1; the NaN is masked and must not leak.
    torch.testing.assert_close(ops.masked_sum(x, mask, dim=1), torch.tensor([7.0, 20.0]))
    torch.testing.assert_close(ops.masked_mean(x, mask, dim=1), torch.tensor([7 / 3, 20.0]))
    torch.testing.assert_close(ops.masked_sum(x, mask), torch.tensor(27.0))
    torch.testing.assert_close(ops.masked_mean(x, mask), torch.tensor(27 / 4))
    # Column means: col0 = 1/1, col1 = (2+20)/2, col2 empty -> 0, col3 = 4/1.
    torch.testing.assert_close(ops.masked_mean(x, mask, dim=0), torch.tensor([1.0, 11.0, 0.0, 4.0]))
    # A bool mask means the same thing.
    torch.testing.assert_close(ops.masked_mean(x, mask.bool(), dim=1), torch.tensor([7 / 3, 20.0]))


def test_masked_mean_of_empty_mask_is_zero():
    out = ops.masked_mean(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0]))
    assert out.item() == 0.0


def test_masked_var_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    # mean 2; squared deviations 1, 0, 1 -> biased 2/3, unbiased 2/2 = 1.
    torch.testing.assert_close(ops.masked_var(x, mask), torch.tensor(1.0))
    torch.testing.assert_close(ops.masked_var(x, mask, unbiased=False), torch.tensor(2 / 3))
    with pytest.raises(ValueError, match="at least 2"):
        ops.masked_var(x, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_masked_var_matches_torch_var_on_selected_entries():
    torch.manual_seed(2)
    x = torch.randn(4, 9)
    mask = (torch.rand(4, 9) > 0.4).float()
    selected = x[mask.bool()]
    torch.testing.assert_close(ops.masked_var(x, mask), selected.var(unbiased=True))
    torch.testing.assert_close(ops.masked_var(x, mask, unbiased=False), selected.var(unbiased=False))


def test_whiten_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 50.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    # mean 2, unbiased var 1 -> (x - 2) / sqrt(1 + 1e-8); masked entry -> 0.
    scale = 1 / math.sqrt(1 + 1e-8)
    torch.testing.assert_close(ops.whiten(x, mask), torch.tensor([-scale, 0.0, scale, 0.0]))
    # shift_mean=False adds the mean back: [2 - s, 2, 2 + s].
    torch.testing.assert_close(
        ops.whiten(x, mask, shift_mean=False), torch.tensor([2 - scale, 2.0, 2 + scale, 0.0])
    )


def test_whiten_matches_loop():
    torch.manual_seed(3)
    x = torch.randn(3, 6) * 5 + 2
    mask = (torch.rand(3, 6) > 0.3).float()
    values = [x[b, t].item() for b in range(3) for t in range(6) if mask[b, t]]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    expected = torch.tensor(
        [[(x[b, t].item() - mean) / math.sqrt(var + 1e-8) if mask[b, t] else 0.0 for t in range(6)] for b in range(3)]
    )
    torch.testing.assert_close(ops.whiten(x, mask), expected, atol=1e-5, rtol=1e-5)
    out = ops.whiten(x, mask)
    assert abs(ops.masked_mean(out, mask).item()) < 1e-5


def test_entropy_from_logits_by_hand():
    # Uniform over 4 -> ln 4; [0, 0, -inf] -> uniform over 2 -> ln 2 (and no NaN from 0 * -inf).
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, float("-inf"), float("-inf")]]])
    torch.testing.assert_close(ops.entropy_from_logits(logits), torch.tensor([[math.log(4), math.log(2)]]))


def test_entropy_from_logits_matches_loop():
    torch.manual_seed(4)
    logits = torch.randn(2, 3, 5) * 3
    expected = torch.zeros(2, 3)
    for b in range(2):
        for t in range(3):
            exps = [math.exp(v) for v in logits[b, t].tolist()]
            probs = [e / sum(exps) for e in exps]
            expected[b, t] = -sum(p * math.log(p) for p in probs)
    torch.testing.assert_close(ops.entropy_from_logits(logits), expected, atol=1e-5, rtol=1e-5)


def test_sequence_logprobs_by_hand():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # Sums: -1-2 = -3 and -0.5-0.5-4 = -5; means: -3/2 and -5/3.
    torch.testing.assert_close(ops.sequence_logprobs(token_logps, mask), torch.tensor([-3.0, -5.0]))
    torch.testing.assert_close(
        ops.sequence_logprobs(token_logps, mask, average=True), torch.tensor([-1.5, -5 / 3])
    )
    with pytest.raises(ValueError, match="mask"):
        ops.sequence_logprobs(token_logps, mask[:, :2])


def test_shift_for_causal_lm_aligns_prediction_with_next_token():
    logits = torch.randn(2, 4, 10)
    labels = torch.tensor([[-100, 5, 6, 7], [8, 9, -100, -100]])
    shifted_logits, shifted_labels = ops.shift_for_causal_lm(logits, labels)
    assert shifted_logits.shape == (2, 3, 10) and shifted_labels.shape == (2, 3)
    assert torch.equal(shifted_logits, logits[:, :3])  # position t predicts ...
    assert shifted_labels.tolist() == [[5, 6, 7], [9, -100, -100]]  # ... the token at t+1
    # The shifted pair feeds logprobs_from_logits directly (non-contiguous views are fine).
    out = ops.logprobs_from_logits(shifted_logits, shifted_labels)
    assert out[1, 1].item() == 0.0 and out[1, 2].item() == 0.0
    torch.testing.assert_close(out[0, 0], torch.log_softmax(logits[0, 0], -1)[5])
