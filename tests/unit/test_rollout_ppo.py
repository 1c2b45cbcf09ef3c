"""PPO building blocks: the typed Rollout, its padded forward layout, score shaping and the critic's value head,
against hand-worked numbers or slow obvious references (the alarm watch: tests/unit/test_alarms.py)."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.ops import forward_batch, pad_right
from alignkit.rl import RunningMoments, build_rollout, shape_scores
from alignkit.rollout.forwards import batch_on, prompt_groups, response_logprobs, response_values
from alignkit.rollout.sampling import Generation
from tests.helpers import tiny_llama



PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
RESPONSES = [[20, 21], [22, 23, 24, 2], [25]]


def test_forward_batch_layout_by_hand():
    batch = forward_batch(PROMPTS, RESPONSES, pad_id=0)
    # W = 5 (longest prompt), R = 4 (longest response): prompts end at column 5, responses start there.
    assert batch["input_ids"].tolist() == [
        [0, 0, 5, 6, 7, 20, 21, 0, 0],
        [8, 9, 10, 11, 12, 22, 23, 24, 2],
        [0, 0, 0, 0, 13, 25, 0, 0, 0],
    ]
    assert batch["attention_mask"].tolist() == [
        [0, 0, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 0, 0, 0],
    ]
    assert batch["position_ids"][0].tolist()[2:7] == [0, 1, 2, 3, 4]
    assert batch["position_ids"][2].tolist()[4:6] == [0, 1]
    assert batch["labels"].tolist() == [[20, 21, -100, -100], [22, 23, 24, 2], [25, -100, -100, -100]]
    assert batch["mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert pad_right([[1, 2], [3]], -1, torch.long).tolist() == [[1, 2], [3, -1]]


def test_response_logprobs_and_values_equal_one_unpadded_forward_per_sample():
    actor, critic_model = tiny_llama(0), tiny_llama(1, classifier=True)
    from alignkit.models.value import ValueModel

    critic = ValueModel(critic_model)
    batch = forward_batch(PROMPTS, RESPONSES, pad_id=0)
    with torch.no_grad():
        logps, entropy = response_logprobs(actor, batch, temperature=0.7, with_entropy=True)
        values = response_values(critic, batch)
    assert logps.shape == entropy.shape == values.shape == (3, 4)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logits = actor(ids).logits[0].float() / 0.7
            hidden = critic_model.model(ids).last_hidden_state[0]
        for t, token in enumerate(r):
            row = logits[len(p) - 1 + t]  # the position before response token t predicts it
            assert logps[i, t].item() == pytest.approx(row.log_softmax(-1)[token].item(), abs=1e-5)
            probs = row.softmax(-1)
            assert entropy[i, t].item() == pytest.approx(-(probs * probs.log()).sum().item(), abs=1e-5)
            expected_value = critic_model.score(hidden[len(p) - 1 + t]).item()
            assert values[i, t].item() == pytest.approx(expected_value, abs=1e-5)
        assert logps[i, len(r):].abs().sum() == 0 and values[i, len(r):].abs().sum() == 0


def test_prompt_groups_by_hand():
    assert prompt_groups([[1, 2], [3], [1, 2], [3], [4]]) == ([0, 1, 4], [0, 1, 0, 1, 2])
    assert prompt_groups([[1], [2]]) == ([0, 1], [0, 1])


def test_shared_prompt_forward_equals_one_forward_per_sample_with_the_same_gradient():
    """Samples that share a prompt run it once (rollout.ppo.response_logits): log-probs equal the plain
    padded forward's, and so does the gradient of a loss through them (the prompt's KV cache carries it)."""
    prompts = [[5, 6, 7], [5, 6, 7], [8, 9, 10, 11, 12], [13], [8, 9, 10, 11, 12], [5, 6, 7]]
    responses = [[20, 21], [22, 2], [22, 23, 24, 2], [25], [30, 31, 2], [26, 27, 28, 29]]
    samples = [Generation(p, r, "", True) for p, r in zip(prompts, responses)]
    shared = batch_on(samples, 0, "cpu")
    plain = {k: v for k, v in shared.items() if k not in ("prompt_first", "prompt_of_row")}
    assert shared["prompt_first"].tolist() == [0, 2, 3]
    results = []
    for batch in (shared, plain):
        actor = tiny_llama(0).train()
        logps, _ = response_logprobs(actor, batch, temperature=0.7)
        (logps * torch.arange(1.0, 5.0)).sum().backward()  # weights per column: a gradient that sees every token
        results.append((logps.detach(), torch.cat([q.grad.flatten() for q in actor.parameters()])))
    (shared_logps, shared_grad), (plain_logps, plain_grad) = results
    assert torch.allclose(shared_logps, plain_logps, atol=1e-5)
    assert plain_grad.abs().max() > 1e-3  # the loss reaches the weights
    assert torch.allclose(shared_grad, plain_grad, atol=1e-5, rtol=1e-4)


def test_value_model_shapes_and_gradient():
    from alignkit.models.value import ValueModel

    critic = ValueModel(tiny_llama(2, classifier=True))
    batch = forward_batch(PROMPTS, RESPONSES, pad_id=0)
    out = critic(batch["input_ids"], batch["attention_mask"], batch["position_ids"], 3)
    assert out.shape == (3, 3) and out.dtype == torch.float32
    out.sum().backward()
    assert critic.model.score.weight.grad is not None and critic.model.score.weight.grad.abs().sum() > 0


def slow_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """Textbook GAE over one sequence, value after the end = 0."""
    out = []
    for t in range(len(rewards)):
        total = 0.0
        for k in range(t, len(rewards)):
            next_value = values[k + 1] if k + 1 < len(values) else 0.0
            delta = rewards[k] + gamma * next_value - values[k]
            total += (gamma * lam) ** (k - t) * delta
        out.append(total)
    return out


def close(tensor: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(tensor, torch.tensor(expected, dtype=tensor.dtype), atol=1e-6, rtol=1e-6)


def test_build_rollout_by_hand():
    logps = [torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-0.25])]
    refs = [torch.tensor([-1.5, -1.0, -0.5]), torch.tensor([-1.25])]
    values = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([-0.4])]
    scores = torch.tensor([2.0, -1.0])
    r = build_rollout([[1, 2], [3]], [[7, 8, 9], [4]], [True, False], logps, refs, values, scores, pad_id=0,
                      kl_coef=0.1, kl_estimator="k1", gamma=0.9, lam=0.8, whiten_advantages=False)
    assert len(r) == 2 and r.response_ids.tolist() == [[7, 8, 9], [4, 0, 0]]
    assert r.mask.tolist() == [[1, 1, 1], [1, 0, 0]] and r.finished.tolist() == [True, False]
    # k1 = logp - ref; reward = -0.1 * kl, plus the score at the last response token.
    close(r.kl, [[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]])
    close(r.rewards, [[-0.05, 0.1, 2.0], [-0.1 + -1.0, 0.0, 0.0]])
    expected0 = slow_gae([-0.05, 0.1, 2.0], [0.1, 0.2, 0.3], 0.9, 0.8)
    expected1 = slow_gae([-1.1], [-0.4], 0.9, 0.8)
    assert r.advantages[0].tolist() == pytest.approx(expected0, abs=1e-6)
    assert r.advantages[1, 0].item() == pytest.approx(expected1[0]) and r.advantages[1, 1:].abs().sum() == 0
    assert r.returns[0].tolist() == pytest.approx([a + v for a, v in zip(expected0, [0.1, 0.2, 0.3])], abs=1e-6)

    whitened = build_rollout([[1, 2], [3]], [[7, 8, 9], [4]], [True, False], logps, refs, values, scores, 0, 0.1,
                             "k1", 0.9, 0.8, whiten_advantages=True)
    raw = expected0 + expected1
    mean = sum(raw) / 4
    std = math.sqrt(sum((a - mean) ** 2 for a in raw) / 3)  # unbiased, over the 4 counted tokens of the rollout
    assert whitened.advantages[0].tolist() == pytest.approx([(a - mean) / std for a in expected0], abs=1e-5)
    assert whitened.advantages[1, 0].item() == pytest.approx((expected1[0] - mean) / std, abs=1e-5)
    assert whitened.advantages[1, 1:].abs().sum() == 0
    close(whitened.returns, r.returns.tolist())  # critic targets are not whitened


def test_build_rollout_rejects_misaligned_lengths():
    with pytest.raises(ValueError, match="values lengths"):
        build_rollout([[1]], [[7, 8]], [True], [torch.zeros(2)], [torch.zeros(2)], [torch.zeros(3)],
                      torch.zeros(1), 0, 0.1)


def test_shape_scores_penalty_normalisation_and_clip():
    raw = torch.tensor([1.0, 2.0, 3.0, 6.0])
    finished = torch.tensor([True, False, True, True])
    assert shape_scores(raw, finished, missing_eos_penalty=1.5).tolist() == [1.0, 0.5, 3.0, 6.0]
    batch = shape_scores(raw, finished, norm="batch")
    assert batch.mean().item() == pytest.approx(0.0, abs=1e-6) and batch.std().item() == pytest.approx(1.0, abs=1e-5)
    assert shape_scores(raw, finished, norm="batch", clip=1.0).max().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="none, batch or running"):
        shape_scores(raw, finished, norm="whiten")

    running = RunningMoments()
    shape_scores(raw, finished, norm="running", running=running)
    second = shape_scores(torch.tensor([10.0, -2.0]), torch.tensor([True, True]), norm="running", running=running)
    seen = torch.tensor([1.0, 2.0, 3.0, 6.0, 10.0, -2.0], dtype=torch.float64)
    assert running.count == 6 and running.mean == pytest.approx(seen.mean().item())
    assert running.std == pytest.approx(seen.std().item())
    expected = (torch.tensor([10.0, -2.0]) - seen.mean()) / seen.std()
    assert second.tolist() == pytest.approx(expected.tolist(), abs=1e-5)


# ----------------------------------------------------------------------------- PPO's models in less memory


def shared_prompt_samples() -> list[Generation]:
    prompts = [[5, 6, 7], [5, 6, 7], [8, 9, 10, 11, 12], [13]]
    responses = [[20, 21], [22, 2], [22, 23, 24, 2], [25]]
    return [Generation(p, r, "", True) for p, r in zip(prompts, responses)]


@pytest.mark.parametrize("share_prompts", [True, False])
def test_shared_backbone_values_come_from_the_policy_forward(share_prompts: bool):
    """share_backbone: one policy forward gives the log-probs (equal to response_logprobs') and the value head's
    values on the last hidden state of the positions that choose each response token; the gradient of a loss
    on both reaches the backbone and the head."""
    from alignkit.models.value import value_head_for
    from alignkit.rollout.forwards import logprobs_and_values

    samples = shared_prompt_samples()
    batch = batch_on(samples, 0, "cpu")
    if not share_prompts:
        batch = {k: v for k, v in batch.items() if k not in ("prompt_first", "prompt_of_row")}
    actor = tiny_llama(0).train()
    head = value_head_for(actor, seed=3)
    logps, entropy, values = logprobs_and_values(actor, head, batch, temperature=0.7, with_entropy=True)
    with torch.no_grad():
        plain, plain_entropy = response_logprobs(actor, batch, temperature=0.7, with_entropy=True)
    assert torch.allclose(logps, plain, atol=1e-5) and torch.allclose(entropy, plain_entropy, atol=1e-5)
    for i, s in enumerate(samples):
        with torch.no_grad():
            hidden = actor.model(torch.tensor([s.prompt_ids + s.response_ids])).last_hidden_state[0]
        for t in range(len(s.response_ids)):
            expected = head.score(hidden[len(s.prompt_ids) - 1 + t]).item()
            assert values[i, t].item() == pytest.approx(expected, abs=1e-5)
        assert values[i, len(s.response_ids):].abs().sum() == 0
    (logps.sum() + values.sum()).backward()
    assert head.score.weight.grad.abs().sum() > 0 and actor.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_value_head_saves_and_loads(tmp_path):
    from alignkit.models.value import load_value_head, save_value_head, value_head_for

    head = value_head_for(tiny_llama(0), seed=1)
    assert head.score.weight.shape == (1, 32) and torch.equal(value_head_for(tiny_llama(0), seed=1).score.weight,
                                                              head.score.weight)  # seeded
    save_value_head(head, tmp_path / "head.safetensors")
    again = load_value_head(tmp_path / "head.safetensors")
    assert torch.equal(again.score.weight, head.score.weight)


def test_lora_reference_is_the_policy_with_adapters_off():
    """A LoRA actor holds no reference copy (load_reference -> None): the reference log-probs are the policy's with
    its adapters disabled, i.e. exactly the starting weights, however far the adapters have moved."""
    import copy
    from types import SimpleNamespace

    from alignkit.models.lora import LoraOptions, apply_lora
    from alignkit.rollout.forwards import reference_logprobs
    from alignkit.rollout.ppo import load_reference

    start = tiny_llama(0)
    actor = apply_lora(copy.deepcopy(start), LoraOptions(r=4))
    assert load_reference(SimpleNamespace(ref_model=None, offload_frozen=False), actor, "cpu") is None
    assert load_reference(SimpleNamespace(ref_model=None, offload_frozen=False), start, "cpu") is not None
    with torch.no_grad():
        for name, p in actor.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # the adapters have trained
    batch = batch_on(shared_prompt_samples(), 0, "cpu")
    with torch.no_grad():
        ref = reference_logprobs(None, actor, batch, 0.7)
        expected = response_logprobs(start, batch, 0.7)[0]
        moved = response_logprobs(actor, batch, 0.7)[0]
    assert torch.equal(ref, expected)
    assert (moved - expected).abs().max() > 1e-2  # the adapters are back on after the block


def test_resident_moves_a_frozen_model_for_the_block_only():
    from alignkit.rollout.forwards import resident

    class Spy:
        def __init__(self):
            self.moves = []

        def to(self, device):
            self.moves.append(str(device))
            return self

    spy = Spy()
    with resident(spy, "cuda:0", offload=True):
        assert spy.moves == ["cuda:0"]
    assert spy.moves == ["cuda:0", "cpu"]
    with pytest.raises(RuntimeError), resident(spy, "cuda:0", offload=True):
        raise RuntimeError("a failed forward still hands the memory back")
    assert spy.moves[-1] == "cpu"
    off = Spy()
    with resident(off, "cuda:0", offload=False), resident(None, "cuda:0", offload=True):
        pass
    assert off.moves == []
