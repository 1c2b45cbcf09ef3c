"""The built-in tasks: determinism, held-out split, gold reward, annotator noise and bias, specs."""
from __future__ import annotations

import itertools
import math
import random
import re

import pytest

from alignkit.data.tasks import (
    TASK_NAMES, get_task, gold_reward_fn, is_heldout, lcs_length, load_task_records,
    parse_task_spec,
)

SORT = get_task("sort")


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def item_runs(text: str) -> list[list[str]]:
    """Maximal runs of >= 3 list items (single letters or numbers) in a text.

    Commas continue a run ("a, c, d"); a word or a token ending a sentence (".", ":") ends it."""
    runs, cur = [], []
    for tok in text.split() + ["<end>"]:
        item = tok.strip(".,:;[]()")
        if re.fullmatch(r"[a-z]|\d+", item):
            cur.append(item)
            if not tok.endswith((".", ":", ";")):
                continue
        if len(cur) >= 3:
            runs.append(cur)
        cur = []
    return runs


def multiset(items: list[str]) -> tuple[str, ...]:
    return tuple(sorted(items))


# ---------------------------------------------------------------- registry and determinism

def test_task_names_and_unknown_task():
    assert TASK_NAMES[0] == "sort" and "reverse" in TASK_NAMES
    assert get_task("sort").name == "sort"
    with pytest.raises(ValueError, match="sort, reverse"):
        get_task("sorting")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_part_is_deterministic_by_seed(name):
    task = get_task(name)
    calls = [
        lambda s: task.pretrain_texts(30, s),
        lambda s: task.sft_records(30, s, imperfect=0.5),
        lambda s: task.prompt_records(30, s, "train"),
        lambda s: task.prompt_records(30, s, "eval"),
        lambda s: task.preference_records(30, s, noise=0.2, length_bias=0.1),
        lambda s: task.ranked_records(30, s, k=5, noise=0.2, length_bias=0.1),
    ]
    for call in calls:
        assert call(3) == call(3)
        assert call(3) != call(4)


def test_longer_request_extends_shorter_one():
    assert SORT.prompt_records(40, 1, "eval")[:25] == SORT.prompt_records(25, 1, "eval")
    assert SORT.preference_records(40, 1)[:25] == SORT.preference_records(25, 1)


# ---------------------------------------------------------------- held-out split

@pytest.mark.parametrize("name", TASK_NAMES)
def test_eval_instances_never_appear_in_train_derived_data(name):
    task = get_task(name)
    eval_prompts = task.prompt_records(400, 0, "eval")
    eval_sets = {multiset(task.parse_prompt(r["prompt"])) for r in eval_prompts}
    assert len(eval_sets) > 350  # distinct instances, not one repeated

    texts = list(task.pretrain_texts(1500, 0))
    texts += [r["prompt"][0]["content"] for r in task.prompt_records(1500, 0, "train")]
    texts += [m["content"] for r in task.sft_records(1500, 0, imperfect=1.0) for m in r["messages"]]
    for r in task.preference_records(800, 0):
        texts += [r["prompt"][0]["content"], r["chosen"], r["rejected"]]
    for r in task.ranked_records(400, 0, k=6):
        texts += [r["prompt"][0]["content"], *r["responses"]]

    train_lists = [run for t in texts for run in item_runs(t)]
    assert len(train_lists) > 5000
    train_sets = {multiset(run) for run in train_lists if len(set(run)) == len(run)}
    # without the hash split, short letter lists would collide all the time (C(26,3) = 2600)
    assert not eval_sets & train_sets
    assert all(is_heldout(list(s)) for s in eval_sets)
    assert not any(is_heldout(list(s)) for s in train_sets)


def test_split_is_a_function_of_the_multiset_only():
    rng = random.Random(0)
    for _ in range(300):
        items = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(3, 8))
        assert is_heldout(items) == is_heldout(rng.sample(items, len(items)))
    share = sum(is_heldout(rng.sample("abcdefghijklmnopqrstuvwxyz", 5)) for _ in range(4000)) / 4000
    assert abs(share - 0.10) < 4 * math.sqrt(0.1 * 0.9 / 4000)


def test_prompt_records_are_distinct_and_carry_meta():
    recs = SORT.prompt_records(300, 1, "train")
    texts = [r["prompt"][0]["content"] for r in recs]
    assert len(set(texts)) == 300
    r = recs[0]
    assert r["prompt"][0]["role"] == "user" and r["meta"]["split"] == "train"
    assert SORT.gold_reward(r["prompt"], r["meta"]["target"]) == 1.0
    with pytest.raises(ValueError, match="split"):
        SORT.prompt_records(1, 0, "test")


# ---------------------------------------------------------------- gold reward

def test_lcs_matches_brute_force():
    rng = random.Random(1)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 6))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 6))]
        best = max((r for r in range(len(a) + 1) for sub in itertools.combinations(a, r)
                    if _is_subsequence(list(sub), b)), default=0)
        assert lcs_length(a, b) == best


def _is_subsequence(sub: list[str], seq: list[str]) -> bool:
    it = iter(seq)
    return all(x in it for x in sub)


@pytest.mark.parametrize("response, expected", [
    ("a c d", 1.0),                 # exact
    ("", 0.0),                      # empty
    ("   ", 0.0),
    ("no idea", 0.0),               # unparseable: nothing matches
    ("c a d", 0.9 * 2 / 3),         # swap: LCS 2 of 3
    ("a d", 0.9 * 2 / 3),           # drop: LCS 2, length max(3, 2)
    ("a c d e", 0.9 * 3 / 4),       # one extra item
    ("a c d e f", 0.9 * 3 / 5),     # two extra items
    ("a c c d", 0.9 * 3 / 4),       # duplicate
    ("d c a", 0.9 * 1 / 3),         # reversed
    ("a, c, d", 0.9 * 1 / 3),       # wrong format: only "d" is an item token
    ("a c d.", 0.9 * 2 / 3),
])
def test_gold_reward_hand_cases(response, expected):
    assert SORT.gold_reward("sort: d a c", response) == pytest.approx(expected)


def test_numbers_sort_numerically_and_reverse_task():
    assert SORT.gold_reward("sort: 10 9 2", "2 9 10") == 1.0
    assert SORT.gold_reward("sort: 10 9 2", "10 2 9") == pytest.approx(0.6)  # lexicographic
    rev = get_task("reverse")
    assert rev.gold_reward("reverse: d a c", "c a d") == 1.0
    assert rev.gold_reward("reverse: d a c", "d a c") == pytest.approx(0.3)  # copying the input


def test_padding_lowers_gold_and_reward_stays_in_unit_interval():
    prompt, answer = "sort: h b e f", "b e f h"
    golds = [SORT.gold_reward(prompt, answer + " x y z"[: 2 * k]) for k in range(4)]
    assert golds[0] == 1.0 and all(a > b for a, b in zip(golds, golds[1:]))
    for r in SORT.ranked_records(200, 0, k=6):
        assert all(0.0 <= g <= 1.0 for g in r["meta"]["gold"])


def test_prompt_forms_and_errors():
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "sort: d a c"}]
    assert SORT.gold_reward(messages, "a c d") == 1.0
    rendered = "<|im_start|>user\nsort: 12 3 7<|im_end|>\n<|im_start|>assistant\n"
    assert SORT.gold_reward(rendered, "3 7 12") == 1.0
    assert SORT.answer("sort: q b k") == "b k q"
    fn = gold_reward_fn("sort")
    assert fn([messages, "sort: b a c"], ["a c d", "a b"]) == pytest.approx([1.0, 0.6])
    with pytest.raises(ValueError, match="sort: <items>"):
        SORT.gold_reward("reverse: a b c", "a b c")
    with pytest.raises(ValueError, match="no user message"):
        SORT.gold_reward([{"role": "system", "content": "sort: a b c"}], "a b c")
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        fn(["sort: a b c", "sort: a b c"], ["a"])


# ---------------------------------------------------------------- pretraining and SFT data

def test_pretrain_corpus_states_true_facts_and_is_not_chat():
    texts = SORT.pretrain_texts(400, 0)
    assert all(isinstance(t, str) and t for t in texts)
    assert not any("user" in t or "assistant" in t for t in texts)
    claims = [m for t in texts for m in re.findall(r"((?:\w+ )+)sorted is ((?:\w+ ?)+)\.", t)]
    assert len(claims) > 100
    for raw, srt in claims:
        assert srt.split() == SORT.target_items(raw.split())


def test_sft_imperfect_rate_and_gold():
    recs = SORT.sft_records(2000, 0, imperfect=0.3)
    flawed = [r for r in recs if r["meta"]["imperfect"]]
    assert abs(len(flawed) / 2000 - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 2000)
    for r in recs:
        user, assistant = r["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        gold = SORT.gold_reward(user["content"], assistant["content"])
        assert gold == r["meta"]["gold"]
        assert (gold < 1.0) == r["meta"]["imperfect"]
    assert all(r["meta"]["gold"] == 1.0 for r in SORT.sft_records(200, 0, imperfect=0.0))
    with pytest.raises(ValueError, match="imperfect"):
        SORT.sft_records(1, 0, imperfect=1.5)


# ---------------------------------------------------------------- annotator: noise and bias

def test_preference_records_are_consistent():
    for r in SORT.preference_records(300, 0, noise=0.2):
        m = r["meta"]
        assert r["chosen"] != r["rejected"]
        assert m["gold_chosen"] == SORT.gold_reward(r["prompt"], r["chosen"])
        assert m["gold_rejected"] == SORT.gold_reward(r["prompt"], r["rejected"])
        assert m["label_agrees_with_gold"] == (m["gold_chosen"] > m["gold_rejected"])
    noiseless = SORT.preference_records(300, 0, noise=0.0)
    assert all(r["meta"]["label_agrees_with_gold"] for r in noiseless)


@pytest.mark.parametrize("noise", [0.1, 0.3])
def test_label_noise_rate_matches_bradley_terry(noise):
    """Without length bias, P(label disagrees with gold) = sigmoid(-|gold gap| / noise) per pair."""
    recs = SORT.preference_records(3000, 5, noise=noise)
    gaps = [abs(r["meta"]["gold_chosen"] - r["meta"]["gold_rejected"]) for r in recs]
    p_flip = [sigmoid(-g / noise) for g in gaps]
    expected = sum(p_flip) / len(recs)
    observed = sum(not r["meta"]["label_agrees_with_gold"] for r in recs) / len(recs)
    se = math.sqrt(sum(p * (1 - p) for p in p_flip)) / len(recs)
    assert abs(observed - expected) < 4 * se
    assert 0.03 < observed < 0.45  # the knob really produces noisy labels


def _longer_chosen(recs: list[dict], noise: float) -> tuple[float, float, float]:
    """(observed, expected from gold alone, standard error) share of pairs whose longer side won."""
    obs, probs = [], []
    for r in recs:
        m = r["meta"]
        if m["len_chosen"] == m["len_rejected"]:
            continue
        chosen_longer = m["len_chosen"] > m["len_rejected"]
        g_long, g_short = ((m["gold_chosen"], m["gold_rejected"]) if chosen_longer
                           else (m["gold_rejected"], m["gold_chosen"]))
        obs.append(chosen_longer)
        probs.append(sigmoid((g_long - g_short) / noise))
    se = math.sqrt(sum(p * (1 - p) for p in probs)) / len(probs)
    return sum(obs) / len(obs), sum(probs) / len(probs), se


def test_length_bias_makes_longer_answers_win_more_than_gold_implies():
    unbiased = SORT.preference_records(3000, 7, noise=0.1, length_bias=0.0)
    observed, expected, se = _longer_chosen(unbiased, 0.1)
    assert abs(observed - expected) < 4 * se
    biased = SORT.preference_records(3000, 7, noise=0.1, length_bias=0.3)
    observed_b, expected_b, se_b = _longer_chosen(biased, 0.1)
    assert observed_b > expected_b + 8 * se_b
    agree = lambda rs: sum(r["meta"]["label_agrees_with_gold"] for r in rs) / len(rs)
    assert agree(biased) < agree(unbiased) - 0.05
    # same seed, same pairs: only the labels move
    pairs = lambda rs: [{r["chosen"], r["rejected"]} for r in rs]
    assert pairs(unbiased) == pairs(biased)


def test_ranked_records():
    for r in SORT.ranked_records(200, 0, k=5, noise=0.0):
        assert len(r["responses"]) == len(set(r["responses"])) == 5
        golds = [SORT.gold_reward(r["prompt"], x) for x in r["responses"]]
        assert r["meta"]["gold"] == golds
        assert r["scores"] == pytest.approx(golds)  # no noise, no bias: utility is gold
    biased = SORT.ranked_records(50, 0, k=3, noise=0.0, length_bias=0.1)
    for r in biased:
        expected = [g + 0.1 * len(x.split()) for g, x in zip(r["meta"]["gold"], r["responses"])]
        assert r["scores"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="k must be"):
        SORT.ranked_records(1, 0, k=1)


# ---------------------------------------------------------------- specs

def test_load_task_records_kinds_and_parameters():
    expected_kinds = {"pretrain": "text", "sft": "sft", "prompts": "prompts",
                      "prompts_eval": "prompts", "prefs": "preference", "ranked": "ranked"}
    for part, kind in expected_kinds.items():
        recs, got = load_task_records(f"task:sort/{part}?n=7&seed=2")
        assert got == kind and len(recs) == 7
    recs, _ = load_task_records("task:reverse/ranked?n=3&k=6&noise=0&length_bias=0.5")
    assert recs == get_task("reverse").ranked_records(3, 0, k=6, noise=0.0, length_bias=0.5)
    recs, _ = load_task_records("task:sort/prompts_eval?n=5")
    assert all(r["meta"]["split"] == "eval" for r in recs)
    assert load_task_records("task:sort/pretrain?n=2")[0][0].keys() == {"text"}
    defaults = {"n": 5000, "seed": 0, "imperfect": 0.2}
    assert parse_task_spec("task:sort/sft") == ("sort", "sft", defaults)


@pytest.mark.parametrize("spec, message", [
    ("sort/sft", "must look like task:<name>/<part>"),
    ("task:sorting/sft", "built-in tasks: sort, reverse"),
    ("task:sort", "parts: pretrain, sft, prompts, prompts_eval, prefs, ranked"),
    ("task:sort/rl", "parts: pretrain"),
    ("task:sort/sft?noise=0.1", "keys for sft: n=5000, seed=0, imperfect=0.2"),
    ("task:sort/sft?n", "bad query item 'n'"),
    ("task:sort/prefs?n=ten", "n='ten'.*not a valid int"),
    ("task:sort/prefs?noise=-1", "noise must be in"),
    ("task:sort/sft?n=-3", "n must be in"),
])
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        load_task_records(spec)
