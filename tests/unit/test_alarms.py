"""Each reward-hacking alarm fires on a constructed run and stays quiet on a clean one."""

from __future__ import annotations

import json
import random

from alignkit.eval.alarms import (
    Alarm,
    AlarmConfig,
    check_all,
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


def test_proxy_up_gold_down_fires_where_gold_leaves_its_peak():
    # best gold 0.6 at step 20; step 30: gold -0.1 (> 0.02) while proxy +1 -> fires at 30 with value 0.1
    (alarm,) = proxy_up_gold_down(list(reversed(HACKED)))  # order of the input does not matter
    assert (alarm.name, alarm.step) == ("proxy_up_gold_down", 30)
    assert alarm.value == 0.1 or abs(alarm.value - 0.1) < 1e-9
    assert "step 20" in alarm.message and alarm.remedy


def test_proxy_up_gold_down_quiet_when_clean_or_both_fall_or_no_gold():
    assert proxy_up_gold_down(CLEAN) == []
    both_fall = run(gold_reward=[0.5, 0.6, 0.4], proxy_reward=[1.0, 2.0, 1.5])  # a regression, not hacking
    assert proxy_up_gold_down(both_fall) == []
    assert proxy_up_gold_down([{k: v for k, v in m.items() if k != "gold_reward"} for m in HACKED]) == []
    assert proxy_up_gold_down(HACKED, AlarmConfig(gold_tolerance=0.25)) == []


def test_proxy_up_gold_down_waits_for_a_drop_beyond_the_noise():
    # stderr 0.05 each: 2 * hypot(0.05, 0.05) = 0.141 > drop 0.1 at step 30; drop 0.2 at step 40 fires
    noisy = [{**m, "gold_reward_stderr": 0.05} for m in HACKED]
    (alarm,) = proxy_up_gold_down(noisy)
    assert alarm.step == 40


def test_proxy_up_gold_down_uses_configured_keys():
    renamed = [{"step": m["step"], "gold": m["gold_reward"], "reward": m["proxy_reward"]} for m in HACKED]
    assert proxy_up_gold_down(renamed) == []
    (alarm,) = proxy_up_gold_down(renamed, AlarmConfig(gold_key="gold", proxy_key="reward"))
    assert alarm.step == 30


def _samples(step: int, slope: float, seed: int) -> dict:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(200)]
    return {"step": step, "length": lengths, "proxy_reward": [slope * n + rng.gauss(0, 1) for n in lengths],
            "gold_reward": [rng.random() for _ in lengths]}


def test_length_correlation_fires_on_length_driven_reward():
    # checkpoint 0: reward independent of length; checkpoint 50: reward = 0.2 * length + N(0, 1) (r ~ 0.9)
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
    # length at 0, disagreement 0.3 > 0.2 at 20, gold drop at 30, KL 12 > 10 at 40
    assert [(a.name, a.step) for a in alarms] == [
        ("length_correlation", 0), ("ensemble_disagreement", 20), ("proxy_up_gold_down", 30), ("kl_budget", 40)]
    as_dicts = json.loads(json.dumps([a.to_dict() for a in alarms]))
    assert set(as_dicts[0]) == {"name", "step", "value", "message", "remedy"}
    assert check_all(CLEAN, [_samples(0, 0.0, 6)], AlarmConfig(kl_budget=10.0)) == []
    assert isinstance(alarms[0], Alarm)


def test_metrics_and_alarms_import_no_heavy_library():
    # A fresh interpreter: importing the eval math must not pull in transformers, accelerate, matplotlib.
    import subprocess
    import sys

    code = ("import sys, alignkit.eval.metrics, alignkit.eval.alarms; "
            "print([m for m in ('transformers', 'accelerate', 'datasets', 'peft', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
