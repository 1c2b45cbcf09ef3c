"""Responses that share a prompt read ONE copy of it (runtime.sequences.pack_shared_prefixes): the rewards and
their gradients equal those of every response forwarded with its own copy (packed_rewards), under sdpa and eager
attention, with fewer tokens in the forward."""

from __future__ import annotations

import torch

from alignkit.models.reward import grouped_rewards, packed_rewards
from alignkit.runtime.sequences import pack_shared_prefixes, shared_prefix_length
from tests.helpers import tiny_llama


def groups_of_examples() -> tuple[list[dict], list[int]]:
    g = torch.Generator().manual_seed(5)
    rand = lambda n: torch.randint(1, 50, (n,), generator=g).tolist()  # noqa: E731
    groups = []
    for prompt, responses in [(6, [3, 5]), (2, [4, 1, 7]), (9, [2, 2])]:
        p = rand(prompt)
        groups.append([p + rand(n) for n in responses])
    p = rand(4)
    groups.append([p, p + rand(3)])  # one response is the other's prefix: the prefix stops one token short
    examples = [{"input_ids": ids, "labels": ids} for group in groups for ids in group]
    return examples, [len(group) for group in groups]


def test_shared_prefix_length_by_hand():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1  # [1, 2] keeps its last token as its suffix
    assert shared_prefix_length([[7], [7, 8]]) == 0
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3], [9]]) == 0


def test_layout_by_hand():
    examples = [{"input_ids": [1, 2, 3, 4]}, {"input_ids": [1, 2, 5]}]
    batch = pack_shared_prefixes(examples, [2], row_tokens=0, pad_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2]]
    assert batch["last"].tolist() == [3, 4]
    expected = [[1, 0, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [1, 1, 1, 0, 0],
                [1, 1, 1, 1, 0],
                [1, 1, 0, 0, 1]]  # the second response sees the prompt and itself, not the first response
    assert batch["attention_mask"][0, 0].int().tolist() == expected


def test_rewards_and_gradients_equal_one_copy_per_response():
    examples, sizes = groups_of_examples()
    for attn in ("sdpa", "eager"):
        model = tiny_llama(seed=3, classifier=True, attn=attn).train()
        results = []
        for shared in (True, False):
            model.zero_grad()
            rewards = (grouped_rewards(model, examples, sizes, 0, row_tokens=24) if shared
                       else packed_rewards(model, examples, 0, row_tokens=24))
            (rewards * torch.linspace(-1, 1, len(rewards))).sum().backward()
            results.append((rewards.detach(), [p.grad.clone() for p in model.parameters()]))
        (shared_r, shared_g), (plain_r, plain_g) = results
        assert shared_r.shape == (len(examples),) and shared_r.std() > 0
        assert torch.allclose(shared_r, plain_r, atol=1e-5), (attn, (shared_r - plain_r).abs().max())
        for a, b in zip(shared_g, plain_g):
            assert torch.allclose(a, b, atol=1e-5), attn


def test_fewer_tokens_than_one_copy_each():
    examples, sizes = groups_of_examples()
    batch = pack_shared_prefixes(examples, sizes, row_tokens=0, pad_id=0, device="cpu")
    real = sum(len(e["input_ids"]) for e in examples)
    saved = (6 + 2 * 2 + 9 + 3)  # each group's prefix once fewer than it has responses
    assert int(batch["input_ids"].ne(0).sum()) == real - saved


def test_an_ensemble_packs_once_and_scores_each_members_mean(monkeypatch):
    import alignkit.models.reward as reward

    examples, sizes = groups_of_examples()
    members = [tiny_llama(seed=s, classifier=True, attn="sdpa").eval() for s in (3, 4)]
    ensemble = reward.RewardEnsemble(members)
    with torch.no_grad():
        alone = torch.stack([packed_rewards(m, examples, 0, row_tokens=24) for m in members])  # [2,N]
        packings = {"plain": 0, "shared": 0}
        for name, fn in (("plain", "pack_for_forward"), ("shared", "pack_shared_prefixes")):
            original = getattr(reward, fn)

            def counted(*args, _original=original, _name=name, **kwargs):
                packings[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(reward, fn, counted)
        per_member = reward.member_rewards(ensemble, examples, 0, row_tokens=24)
        mean = packed_rewards(ensemble, examples, 0, row_tokens=24)
        grouped = grouped_rewards(ensemble, examples, sizes, 0, row_tokens=24)
    torch.testing.assert_close(per_member, alone)
    torch.testing.assert_close(mean, alone.mean(0))
    torch.testing.assert_close(grouped, alone.mean(0), atol=1e-5, rtol=1e-5)
    assert alone[0].sub(alone[1]).abs().max() > 1e-3  # the members differ, so the mean is a real test
    assert packings == {"plain": 2, "shared": 1}  # one packing per call, not one per member


def test_language_model_log_probs_and_gradients_equal_one_copy_per_response():
    """shared_prefix_logps (DPO's pairs, RRHF's lists) against sequence_logps (every example its own copy):
    the same sums and counts, the same gradients, under sdpa and eager; labels may start inside the shared
    prefix (two responses beginning alike) and prompts carry no labels."""
    from alignkit.runtime.sequences import sequence_logps, shared_prefix_logps

    examples, sizes = groups_of_examples()
    for e in examples[::2]:  # prompt tokens unlabelled in some examples: the first 3 positions carry no loss
        e["labels"] = [-100] * 3 + e["input_ids"][3:]
    for attn in ("sdpa", "eager"):
        results = []
        for forward in (lambda m: sequence_logps(m, examples, 0, 16),
                        lambda m: shared_prefix_logps(m, examples, sizes, 0, 16)):
            model = tiny_llama(seed=3, attn=attn)
            sums, counts = forward(model)
            (sums * torch.linspace(0.5, 1.5, len(sums))).sum().backward()
            results.append((sums.detach(), counts, [p.grad.clone() for p in model.parameters()]))
        (a, ca, ga), (b, cb, gb) = results
        assert torch.equal(ca, cb) and ca.min() > 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_without_a_4d_mask_the_log_probs_come_from_the_head_only_packed_forward(monkeypatch):
    """Attention that takes no 4D mask (flash-attention): shared_prefix_logps falls back to completion_logps,
    one copy of the prompt per response with the LM head only on predicting positions; its sums, counts and
    gradients equal sequence_logps' (every position projected), for one example per row and for several."""
    from alignkit.runtime import sequences

    examples, sizes = groups_of_examples()
    for e in examples[::2]:
        e["labels"] = [-100] * 3 + e["input_ids"][3:]
    calls = []
    head_only = sequences.completion_logps
    monkeypatch.setattr(sequences, "shared_prefix_mask", lambda config, dtype: (False, None))
    monkeypatch.setattr(sequences, "completion_logps", lambda *a: calls.append(1) or head_only(*a))
    for row_tokens in (1, 64):
        results = []
        for forward in (lambda m: sequences.sequence_logps(m, examples, 0, row_tokens),
                        lambda m: sequences.shared_prefix_logps(m, examples, sizes, 0, row_tokens)):
            model = tiny_llama(seed=4, attn="sdpa")
            sums, counts = forward(model)
            sums.sum().backward()
            results.append((sums.detach(), counts, [p.grad.clone() for p in model.parameters()]))
        (a, ca, ga), (b, cb, gb) = results
        assert torch.equal(ca, cb)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    assert len(calls) == 2
