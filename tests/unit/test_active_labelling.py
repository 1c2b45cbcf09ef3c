"""Active labelling and the LLM judge: which comparisons get labels (selection.select_*_pairs) on constructed
margins, the judge's option probability and position-swap rule on hand-worked numbers, and models/judge.py's
PairJudge with a planted judge model (one that reads the two responses, with or without a position bias)."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from alignkit.selection import (candidate_pairs, first_option_probability, position_swapped_preference,
                                select_disagreement_pairs, select_random_pairs, select_uncertain_pairs)


def test_candidate_pairs_are_every_unordered_pair():
    assert candidate_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert candidate_pairs(1) == [] and candidate_pairs(0) == []
    assert len(candidate_pairs(7)) == 21


def test_uncertainty_takes_the_margins_closest_to_zero():
    # |margins| 0.9, 0.05, 0.3, 0.05, 2.0, 0.0 -> the three smallest are pairs 5, 1 and 3
    margins = torch.tensor([0.9, -0.05, 0.3, 0.05, -2.0, 0.0])
    assert select_uncertain_pairs(margins, 3) == [1, 3, 5]
    assert select_uncertain_pairs(margins, 1) == [5]
    assert select_uncertain_pairs(torch.tensor([0.1, -0.1, 0.1]), 2) == [0, 1]  # ties: the lower index
    assert select_uncertain_pairs(margins, 100) == list(range(6))  # a budget beyond the pool takes the pool
    assert select_uncertain_pairs(margins, 0) == []
    with pytest.raises(ValueError, match="budget"):
        select_uncertain_pairs(margins, -1)
    with pytest.raises(ValueError, match="NaN"):
        select_uncertain_pairs(torch.tensor([0.0, math.nan]), 1)


def test_uncertainty_matches_a_sort_by_hand():
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        margins = torch.randn(30, generator=generator).round(decimals=1)  # rounding makes ties
        budget = trial % 12
        by_hand = sorted(sorted(range(30), key=lambda i: (abs(margins[i].item()), i))[:budget])
        assert select_uncertain_pairs(margins, budget) == by_hand


def test_ensemble_takes_the_pairs_its_members_disagree_on_most():
    # columns (pairs) of 3 members' margins; spread (std, ddof=0): 0, 0.816, 0.816, 1.414
    member_margins = torch.tensor([[1.0, 1.0, 2.0, 0.0],
                                   [1.0, -1.0, 0.0, 3.0],
                                   [1.0, 0.0, 1.0, 0.0]])
    assert select_disagreement_pairs(member_margins, 1) == [3]
    assert select_disagreement_pairs(member_margins, 2) == [1, 3]  # pairs 1 and 2 tie: the lower index
    assert select_disagreement_pairs(member_margins, 3) == [1, 2, 3]
    with pytest.raises(ValueError, match="M>=2"):
        select_disagreement_pairs(member_margins[:1], 1)


def test_random_selection_spends_the_budget_exactly_and_is_seeded():
    pick = lambda seed, budget: select_random_pairs(50, budget, torch.Generator().manual_seed(seed))  # noqa: E731
    for budget in (0, 1, 17, 50, 80):
        chosen = pick(3, budget)
        assert len(chosen) == min(budget, 50) == len(set(chosen)) and chosen == sorted(chosen)
        assert all(0 <= i < 50 for i in chosen)
    assert pick(3, 17) == pick(3, 17) and pick(3, 17) != pick(4, 17)


def test_first_option_probability_renormalises_over_the_two_options():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [-5.0, 5.0]])
    assert first_option_probability(logits).tolist() == pytest.approx([0.5, 0.75, 1 / (1 + math.exp(10))])


def test_position_swap_averages_both_orders_and_ties_where_they_disagree():
    # (a, b) shown: P(first=a better); (b, a) shown: P(first=b better)
    p_ab = torch.tensor([0.9, 0.9, 0.3, 0.5, 0.6])
    p_ba = torch.tensor([0.2, 0.8, 0.6, 0.5, 0.4])
    prob_a, tie = position_swapped_preference(p_ab, p_ba)
    # a in first place 0.9 and a in second place 1 - 0.2 = 0.8 -> 0.85, both say a
    # 0.9 and 0.2 -> 0.55: the judge picks the first position both times: a tie
    # 0.3 and 0.4 -> 0.35, both say b;  0.5 and 0.5 -> undecided: a tie;  0.6 and 0.6 -> 0.6, a
    assert prob_a.tolist() == pytest.approx([0.85, 0.55, 0.35, 0.5, 0.6])
    assert tie.tolist() == [False, True, False, True, False]


# ------------------------------------------------------------------------------ a planted judge model


def _tokenizer():
    from alignkit.models.tokenizer import train_bpe_tokenizer

    corpus = ["Which response answers the request better? Request: Response A: Response B: Answer with one "
              "letter, A or B. good bad fine sort the list"] * 20
    return train_bpe_tokenizer(corpus, vocab_size=300)


class PlantedJudge(torch.nn.Module):
    """A 'model' that reads the judge prompt: the logit of option A is the number of times 'good' appears in
    Response A (+ position_bias), of option B the count in Response B. Its output embedding puts hidden
    feature 0 on the A token and feature 1 on the B token."""

    def __init__(self, tokenizer, option_ids: tuple[int, int], position_bias: float = 0.0):
        super().__init__()
        self.tokenizer, self.position_bias = tokenizer, position_bias
        self.head = torch.nn.Linear(2, len(tokenizer), bias=False)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.weight[option_ids[0], 0] = 1.0
            self.head.weight[option_ids[1], 1] = 1.0
        self.forwards = 0

    def base_model(self, input_ids, attention_mask, use_cache):
        self.forwards += len(input_ids)
        hidden = torch.zeros(*input_ids.shape, 2)
        for i, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            text = self.tokenizer.decode(ids[mask.bool()].tolist())
            first, second = re.search(r"Response A: (.*?)\s*Response B: (.*?)\s*Answer", text, re.S).groups()
            hidden[i, :] = torch.tensor([first.count("good") + self.position_bias, second.count("good")])
        return SimpleNamespace(last_hidden_state=hidden)

    def get_output_embeddings(self):
        return self.head


def _judge(tmp_path, position_bias=0.0):
    from alignkit.config import JUDGE_TEMPLATE
    from alignkit.models.judge import PairJudge, option_token_ids

    tok = _tokenizer()
    model = PlantedJudge(tok, option_token_ids(tok, ["A", "B"]), position_bias)
    return PairJudge(model, tok, JUDGE_TEMPLATE, ["A", "B"], batch_size=3, cache_path=tmp_path / "cache.jsonl"), model


def test_planted_judge_prefers_the_better_response_in_both_orders(tmp_path):
    judge, model = _judge(tmp_path)
    a = ["good good", "bad", "good", "fine"]
    b = ["good", "good good good", "bad", "fine"]
    prob_a, tie = judge(["sort the list"] * 4, a, b)
    # logits (2, 1): P(a first) = sigmoid(1); swapped, P(b first) = sigmoid(-1), so both orders give sigmoid(1)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert prob_a.tolist() == pytest.approx([sig(1), sig(-3), sig(1), 0.5])
    assert tie.tolist() == [False, False, False, True]  # equal responses: undecided, a tie
    # 4 pairs x 2 orders, batched by 3; (fine, fine) is the same judge prompt in both orders: asked once
    assert model.forwards == 7 and judge.asked == 7


def test_a_position_biased_judge_gives_ties_not_labels(tmp_path):
    judge, _ = _judge(tmp_path, position_bias=5.0)  # prefers whatever is shown first, by far
    prob_a, tie = judge(["sort the list"] * 3, ["good good", "bad", "good"], ["good", "good good good", "bad"])
    assert tie.tolist() == [True, True, True]
    # pair 0, counts (2, 1): shown (a, b) logits (7, 1): sigmoid(6) for a; shown (b, a) logits (6, 2): sigmoid(4)
    # for b, i.e. sigmoid(-4) for a. Mean of the two; the orders disagree, so a tie.
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert prob_a.tolist() == pytest.approx([(sig(6) + sig(-4)) / 2, (sig(2) + sig(-8)) / 2, (sig(6) + sig(-4)) / 2])


def test_judgements_are_cached_on_disk(tmp_path):
    judge, model = _judge(tmp_path)
    args = (["sort the list"] * 2, ["good", "bad"], ["bad", "fine"])  # 2 pairs x 2 orders: 4 judge prompts
    first = judge(*args)
    assert model.forwards == 4
    assert len((tmp_path / "cache.jsonl").read_text().splitlines()) == 4
    again = judge(*args)
    assert model.forwards == 4 and torch.equal(first[0], again[0])  # nothing asked twice
    reloaded, fresh_model = _judge(tmp_path)  # a new judge (a resumed run) reads the cache file
    assert torch.equal(reloaded(*args)[0], first[0]) and fresh_model.forwards == 0
    rows = [json.loads(line) for line in (tmp_path / "cache.jsonl").read_text().splitlines()]
    shown = [("good", "bad"), ("bad", "fine"), ("bad", "good"), ("fine", "bad")]
    assert {r["key"] for r in rows} == {judge.key("sort the list", f, s) for f, s in shown}
