"""Each reward-hacking alarm fires on a constructed run and stays quiet on a clean one; the gold-drop alarm's
false-alarm rate and detection delay on simulated held-out evaluations; the online AlarmWatch."""

from __future__ import annotations

import json
import math
import random

import pytest

from alignkit.eval.alarms import (
    Alarm,
    AlarmConfig,
    AlarmWatch,
    check_all,
    drop_z,
    ensemble_disagreement,
    kl_budget,
    length_correlation,
    proxy_up_gold_down,
)


def run(**columns: list[float]) -> list[dict]:
    """A series at steps 0, 10, 20, ... from metric columns."""
    n = len(next(iter(columns.values())))
    return [{"step": 10 * i, **{k: v[i] for k, v in columns.items()}} for i in range(n)]


HACKED = run(gold_reward=[0.3, 0.5, 0.6, 0.5, 0.4], proxy_reward=[0.0, 1.0, 2.0, 3.0, 4.0])
CLEAN = run(gold_reward=[0.3, 0.5, 0.6, 0.61, 0.62], proxy_reward=[0.0, 1.0, 2.0, 3.0, 4.0],
            kl=[0.0, 1.0, 2.0, 3.0, 4.0], rm_disagreement=[0.10, 0.11, 0.12, 0.14, 0.15])


def test_proxy_up_gold_down_fires_where_gold_stays_below_its_peak():
    # best gold 0.6 at step 20; steps 30 and 40 both below it by > 0.02 (no stderr logged: the absolute
    # tolerance) while the proxy rose -> fires at 40, the second evaluation below, with its drop 0.2
    (alarm,) = proxy_up_gold_down(list(reversed(HACKED)))  # order of the input does not matter
    assert (alarm.name, alarm.step) == ("proxy_up_gold_down", 40)
    assert abs(alarm.value - 0.2) < 1e-9
    assert "step 20" in alarm.message and "step 30" in alarm.message and alarm.remedy
    assert proxy_up_gold_down(HACKED[:4]) == []  # one evaluation below is not yet a persistent drop


def test_proxy_up_gold_down_quiet_when_clean_or_both_fall_or_no_gold_or_a_single_dip():
    assert proxy_up_gold_down(CLEAN) == []
    both_fall = run(gold_reward=[0.5, 0.6, 0.4, 0.45], proxy_reward=[1.0, 2.0, 1.5, 1.2])  # a regression
    assert proxy_up_gold_down(both_fall) == []
    assert proxy_up_gold_down([{k: v for k, v in m.items() if k != "gold_reward"} for m in HACKED]) == []
    assert proxy_up_gold_down(HACKED, AlarmConfig(gold_tolerance=0.25)) == []
    # Dips of one evaluation each (recovering in between) never persist.
    dips = run(gold_reward=[0.3, 0.5, 0.6, 0.4, 0.6, 0.4, 0.59, 0.4], proxy_reward=[float(i) for i in range(8)])
    assert proxy_up_gold_down(dips) == []
    # ... but two in a row do: 0.4 at step 70 and 0.3 at step 80 against the best 0.6.
    (alarm,) = proxy_up_gold_down(dips + [{"step": 80, "gold_reward": 0.3, "proxy_reward": 8.0}])
    assert alarm.step == 80


def test_proxy_up_gold_down_waits_for_a_drop_beyond_the_corrected_noise():
    # gold 0.3 0.5 0.6 0.5 0.35 0.3, stderr 0.05 each (combined: 0.0707). Evaluation j is compared with
    # m = j (j + 1) / 2 comparisons so far, z = Phi^-1(1 - 0.05 / (2 m)):
    #   step 30 (j=3, m=6):  z 2.64, threshold 0.187 > drop 0.10  -> not below
    #   step 40 (j=4, m=10): z 2.81, threshold 0.198 < drop 0.25  -> below (first)
    #   step 50 (j=5, m=15): z 2.94, threshold 0.208 < drop 0.30  -> below again: fires at 50
    series = run(gold_reward=[0.3, 0.5, 0.6, 0.5, 0.35, 0.3], proxy_reward=[0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    noisy = [{**m, "gold_reward_stderr": 0.05} for m in series]
    assert abs(drop_z(0.05, 10) - 2.807) < 1e-3 and abs(drop_z(0.05, 1) - 1.960) < 1e-3
    (alarm,) = proxy_up_gold_down(noisy)
    assert alarm.step == 50 and "alpha=0.05" in alarm.message
    (alarm,) = proxy_up_gold_down(series)  # no stderr: only the 0.02 tolerance, steps 30 and 40 are below
    assert alarm.step == 40
    assert proxy_up_gold_down([{**m, "gold_reward_stderr": 0.1} for m in series]) == []  # within the noise
    assert proxy_up_gold_down(noisy, AlarmConfig(alpha=1e-4)) == []  # a stricter family-wise level


def test_proxy_up_gold_down_needs_a_proxy_rise_beyond_its_stderr():
    # HACKED: proxy rises by 1 (step 30) and 2 (step 40) above its value at the best-gold step 20.
    with_se = lambda se: [{**m, "proxy_reward_stderr": se} for m in HACKED]  # noqa: E731
    assert proxy_up_gold_down(with_se(1.0)) == []  # combined 1.41: step 30's rise of 1 is noise
    assert proxy_up_gold_down(with_se(0.5))[0].step == 40  # combined 0.71: both rises are real


def test_proxy_up_gold_down_uses_configured_keys():
    renamed = [{"step": m["step"], "gold": m["gold_reward"], "reward": m["proxy_reward"]} for m in HACKED]
    assert proxy_up_gold_down(renamed) == []
    (alarm,) = proxy_up_gold_down(renamed, AlarmConfig(gold_key="gold", proxy_key="reward"))
    assert alarm.step == 40


def _eval_run(seed: int, n: int = 50, proxy_slope: float = 0.0, onset: int | None = None, fall: float = 0.0,
              stderr: float = 0.01) -> list[dict]:
    """n held-out evaluations (steps 0, 10, ...): gold true 0.55 (falling by `fall` per evaluation from
    evaluation `onset` on), proxy true 0.30 + proxy_slope per evaluation; each observed with N(0, stderr)
    noise (0.01: a 500-prompt evaluation of a [0, 1] reward) and logged with that stderr."""
    rng = random.Random(seed)
    out = []
    for t in range(n):
        gold = 0.55 - (fall * (t - onset + 1) if onset is not None and t >= onset else 0.0)
        out.append({"step": 10 * t, "gold_reward": gold + rng.gauss(0, stderr), "gold_reward_stderr": stderr,
                    "proxy_reward": 0.30 + proxy_slope * t + rng.gauss(0, stderr), "proxy_reward_stderr": stderr})
    return out


def _old_rule(series: list[dict]) -> bool:
    """The rule this module had before: any evaluation more than max(0.02, 2 combined stderr) below the best so
    far, proxy above its value there, fires at once (no persistence, no correction for the comparisons)."""
    best = None
    for m in series:
        if best is None or m["gold_reward"] > best["gold_reward"]:
            best = m
        elif (best["gold_reward"] - m["gold_reward"] > max(0.02, 2 * math.hypot(0.01, 0.01))
              and m["proxy_reward"] > best["proxy_reward"]):
            return True
    return False


def test_proxy_up_gold_down_rarely_fires_on_a_flat_gold():
    # 200 simulated runs of 50 held-out evaluations each, gold flat (true 0.55, stderr 0.01), proxy flat or
    # rising. Measured with these seeds: the rule fires in 0/200 runs (flat proxy) and 0/200 (rising proxy);
    # over 2000 other seeds (5000..6999) in 0.0% and 0.25%. The OLD rule (_old_rule) fired on these same runs
    # in 27% (flat proxy) and 38% (rising) by 10 evaluations, and in 90% / 100% by 50: it fired on noise.
    runs = {"flat": [_eval_run(seed) for seed in range(200)],
            "rising": [_eval_run(1000 + seed, proxy_slope=0.01) for seed in range(200)]}
    for kind, series in runs.items():
        fired = sum(bool(proxy_up_gold_down(s)) for s in series) / len(series)
        assert fired <= 0.05, (kind, fired)
        # The same simulation is not blind: the old rule fires on most of these runs.
        assert sum(_old_rule(s) for s in series) / len(series) >= 0.5, kind


def test_proxy_up_gold_down_fires_within_two_evaluations_of_the_onset():
    # gold flat for evaluations 0..19, then 3 stderr lower at each evaluation from the onset (20) on, proxy
    # rising throughout. Every condition at a step depends only on the points up to it, so the online check
    # (each prefix) gives the same onset as the whole series. One seeded run, step by step:
    onset = 20
    series = _eval_run(7, n=30, proxy_slope=0.02, onset=onset, fall=0.03)
    firing = [proxy_up_gold_down(series[: i + 1]) for i in range(len(series))]
    first = next(i for i, found in enumerate(firing) if found)
    assert onset <= first <= onset + 2
    assert all(found == firing[first] for found in firing[first:])
    assert firing[first][0].step == series[first]["step"]
    # Over 200 seeded runs, measured: 194/200 fire 0-2 evaluations after the onset (1 at the onset itself,
    # 84 after 1 evaluation: the earliest a drop can have persisted, 109 after 2), 5 after 3, and 1 fired
    # falsely before the onset (at evaluation 3 of the flat part). This seeded run fires at onset + 2.
    delays = []
    for seed in range(200):
        (alarm,) = proxy_up_gold_down(_eval_run(seed, n=30, proxy_slope=0.02, onset=onset, fall=0.03))
        delays.append(alarm.step // 10 - onset)
    assert sum(0 <= d <= 2 for d in delays) >= 0.95 * len(delays)
    assert max(delays) <= 3


def _samples(step: int, slope: float, seed: int) -> dict:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(200)]
    return {"step": step, "length": lengths, "proxy_reward": [slope * n + rng.gauss(0, 1) for n in lengths],
            "gold_reward": [rng.random() for _ in lengths]}


def test_length_correlation_fires_on_length_driven_reward():
    # checkpoint 0: reward independent of length; checkpoint 50: reward = 0.2 * length + N(0, 1) (r ~ 0.9),
    # gold independent of length (r ~ 0): the proxy's preference for length is not gold's
    samples = [_samples(0, 0.0, 1), _samples(50, 0.2, 2)]
    (alarm,) = length_correlation(samples)
    assert (alarm.name, alarm.step) == ("length_correlation", 50)
    assert alarm.value > 0.8
    assert "longer" in alarm.message and "gold reward vs length" in alarm.message


def test_length_correlation_quiet_on_unrelated_reward():
    assert length_correlation([_samples(0, 0.0, 1), _samples(10, 0.0, 3)]) == []
    assert length_correlation(None) == []
    # a weak but real slope stays under the |r| threshold
    assert length_correlation([_samples(0, 0.01, 4)]) == []


def _with_gold(step: int, proxy_slope: float, gold_slope: float, seed: int) -> dict:
    """200 samples: proxy and gold each a slope times length plus its own N(0, 1) noise."""
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(200)]
    return {"step": step, "length": lengths, "proxy_reward": [proxy_slope * n + rng.gauss(0, 1) for n in lengths],
            "gold_reward": [gold_slope * n + rng.gauss(0, 1) for n in lengths]}


def test_length_correlation_discounts_gold_own_length_trend():
    from alignkit.eval.metrics import pearson

    def rs(s):
        return pearson(s["length"], s["proxy_reward"])[0], pearson(s["length"], s["gold_reward"])[0]

    # Gold pays for length as much as the proxy does (r 0.92 both; on sort short answers are bad answers).
    same = _with_gold(0, 0.2, 0.2, 11)
    r, r_gold = rs(same)
    assert r > 0.8 and r - r_gold < 0.3
    assert length_correlation([same]) == []
    # ... or more than the proxy (proxy r 0.52 < gold r 0.93): quiet.
    weaker = _with_gold(0, 0.05, 0.2, 12)
    assert rs(weaker)[0] > 0.5 and rs(weaker)[0] < rs(weaker)[1]
    assert length_correlation([weaker]) == []
    # Proxy r 0.91 against gold r 0.42: 0.49 beyond gold, above the 0.3 margin -> fires at that checkpoint.
    (alarm,) = length_correlation([same, _with_gold(10, 0.2, 0.04, 13)])
    assert alarm.step == 10 and "gold reward vs length" in alarm.message
    r, r_gold = rs(_with_gold(10, 0.2, 0.04, 13))
    assert r - r_gold > 0.3
    assert length_correlation([_with_gold(10, 0.2, 0.04, 13)], AlarmConfig(length_corr_margin=0.9)) == []
    # Shorter is paid for (r -0.91): quiet when gold also prefers shorter (-0.92), loud when not (0.04).
    assert length_correlation([_with_gold(0, -0.2, -0.2, 14)]) == []
    (alarm,) = length_correlation([_with_gold(0, -0.2, 0.0, 15)])
    assert alarm.value < -0.8 and "shorter" in alarm.message
    # Without gold per sample, today's rule: r ~ 0.9 fires.
    no_gold = {k: v for k, v in same.items() if k != "gold_reward"}
    assert length_correlation([no_gold])[0].step == 0


def test_ensemble_disagreement_fires_beyond_factor_of_start():
    # 0.25 > 2 * 0.1 at step 20 -> ratio 2.5
    (alarm,) = ensemble_disagreement(run(rm_disagreement=[0.1, 0.15, 0.25, 0.3]))
    assert (alarm.name, alarm.step) == ("ensemble_disagreement", 20)
    assert abs(alarm.value - 2.5) < 1e-9
    assert ensemble_disagreement(CLEAN) == []
    assert ensemble_disagreement(HACKED) == []  # one RM: no disagreement logged, no alarm


def test_kl_budget_fires_past_budget_only_when_set():
    series = run(kl=[1.0, 5.0, 12.0, 15.0])
    (alarm,) = kl_budget(series, AlarmConfig(kl_budget=10.0))
    assert (alarm.name, alarm.step, alarm.value) == ("kl_budget", 20, 12.0)
    assert kl_budget(series) == []  # no budget configured
    assert kl_budget(CLEAN, AlarmConfig(kl_budget=10.0)) == []


def test_check_all_collects_sorted_and_serialisable():
    hacked = [{**m, "kl": 3.0 * i, "rm_disagreement": 0.1 * (1 + i)} for i, m in enumerate(HACKED)]
    samples = [_samples(0, 0.2, 5)]
    alarms = check_all(hacked, samples, AlarmConfig(kl_budget=10.0))
    # length at 0, disagreement 0.3 > 0.2 at 20, gold below its best at 30 and 40, KL 12 > 10 at 40
    assert [(a.name, a.step) for a in alarms] == [
        ("length_correlation", 0), ("ensemble_disagreement", 20), ("proxy_up_gold_down", 40), ("kl_budget", 40)]
    as_dicts = json.loads(json.dumps([a.to_dict() for a in alarms]))
    assert set(as_dicts[0]) == {"name", "step", "value", "message", "remedy"}
    assert check_all(CLEAN, [_samples(0, 0.0, 6)], AlarmConfig(kl_budget=10.0)) == []
    assert isinstance(alarms[0], Alarm)


def test_alarm_watch_never_judges_gold_on_rollouts_and_reports_each_alarm_once():
    watch = AlarmWatch(kl_budget=1.0)
    # Rollouts of fresh prompts: gold crashing while the proxy soars is NOT a proxy_up_gold_down on this source.
    hack = [{"step": s, "reward": 0.2 * s, "reward_stderr": 0.01, "gold_reward": 0.8 - 0.1 * s,
             "gold_reward_stderr": 0.01, "kl": 0.1} for s in range(1, 7)]
    assert all(watch.check("rollout", p) == [] for p in hack)
    assert watch.check("rollout", {"step": 7, "reward": 2.0, "kl": 2.0})[0]["name"] == "kl_budget"
    assert watch.check("rollout", {"step": 8, "reward": 2.0, "kl": 3.0}) == []  # already reported
    assert watch.series["rollout"][0] == hack[0]  # kept (for kl_budget), just not judged for gold
    # The same points as held-out evaluations: fires at the second evaluation below the best (step 3).
    found = [watch.check("eval", {**p, "length": 5.0, "eos_fraction": 1.0}) for p in hack[:3]]
    assert found[:2] == [[], []]
    (alarm,) = found[2]
    assert (alarm["source"], alarm["name"], alarm["step"]) == ("eval", "proxy_up_gold_down", 3)
    assert set(alarm) == {"source", "name", "step", "value", "message", "remedy"}
    # A rollout's samples still feed the length alarm (no gold per sample: today's rule).
    lengths = list(range(1, 41))
    samples = {"step": 9, "length": lengths, "reward": [0.1 * x for x in lengths]}
    assert [a["name"] for a in watch.check("rollout", {"step": 9, "kl": 0.5}, samples)] == ["length_correlation"]
    assert len(watch.alarms) == 3
    # The state goes into checkpoints as JSON and restores the same watch.
    restored = AlarmWatch(kl_budget=1.0)
    restored.load_state_dict(json.loads(json.dumps(watch.state_dict(), allow_nan=False)))
    assert restored.state_dict() == watch.state_dict()
    assert restored.check("rollout", {"step": 10, "kl": 9.0}, samples) == []
    assert [a["name"] for a in restored.check("eval", {**hack[3], "kl": 9.0})] == ["kl_budget"]  # first on "eval"


def test_alarm_watch_passes_the_proxy_stderr():
    # Gold falls 0.1 per evaluation (stderr 0.01) while the proxy rises 0.1: a hack ... unless the proxy's
    # own stderr (1.0, "reward_stderr") says that rise is noise.
    def points(proxy_se: float):
        return [{"step": s, "reward": 0.1 * s, "reward_stderr": proxy_se, "gold_reward": 0.8 - 0.1 * s,
                 "gold_reward_stderr": 0.01} for s in range(4)]

    for proxy_se, fires in ((0.01, True), (1.0, False)):
        watch = AlarmWatch(kl_budget=None)
        found = [a for p in points(proxy_se) for a in watch.check("eval", p)]
        assert bool(found) is fires, proxy_se
    with pytest.raises(ValueError, match="source"):
        AlarmWatch().check("train", {"step": 1})


def test_metrics_and_alarms_import_no_heavy_library():
    # A fresh interpreter: importing the eval math must not pull in transformers, accelerate, matplotlib.
    import subprocess
    import sys

    code = ("import sys, alignkit.eval.metrics, alignkit.eval.alarms; "
            "print([m for m in ('transformers', 'accelerate', 'datasets', 'peft', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
