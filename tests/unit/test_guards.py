"""runtime.guards on their own: the non-finite counter, the stop-request flag and the test hooks."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from alignkit.runtime.guards import (NonFiniteGuard, RunStopped, StopRequests, all_finite, any_process,
                                     injected_nan_factor)


class OneProcess:
    num_processes = 1


def test_all_finite_looks_at_every_value():
    assert all_finite(1.0, torch.ones(3), None)
    assert not all_finite(1.0, torch.tensor([1.0, math.nan]))
    assert not all_finite(torch.tensor(math.inf))
    assert not all_finite(float("-inf"))
    assert any_process(OneProcess(), True) and not any_process(OneProcess(), False)


def test_guard_counts_skips_and_stops_after_limit_in_a_row():
    guard = NonFiniteGuard(limit=3, stage="t", lr=0.1, is_main_process=False)
    acc = OneProcess()
    assert guard.check(acc, 1, "loss", 1.0)
    assert not guard.check(acc, 2, "loss", math.nan)
    assert not guard.check(acc, 3, "loss", math.inf)
    assert guard.check(acc, 4, "loss", 0.5)  # a good step resets the run of bad ones
    assert guard.state_dict() == {"total": 2, "in_a_row": 0}
    assert not guard.check(acc, 5, "loss", math.nan)
    assert not guard.check(acc, 6, "loss", math.nan)
    with pytest.raises(RunStopped, match=r"non-finite loss at step 7, 3 steps in a row \(max_nonfinite_steps=3\)"):
        guard.check(acc, 7, "loss", torch.tensor([math.nan]))
    restored = NonFiniteGuard(3, "t", 0.1)
    restored.load_state_dict({"total": 4, "in_a_row": 2})
    assert restored.total == 4 and restored.in_a_row == 2


def test_first_signal_sets_a_flag_second_ctrl_c_raises():
    previous = signal.getsignal(signal.SIGINT)
    with StopRequests("t", is_main_process=False) as stops:
        assert not stops.requested(OneProcess())
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.requested(OneProcess()) and stops.signum == signal.SIGTERM
        err = stops.stop(5, "ckpt/step-5")
        assert err.exit_code == 143 and "interrupted at step 5" in str(err) and "resume=true" in str(err)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next bytecode
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored


def test_nan_hook_names_steps(monkeypatch):
    monkeypatch.setenv("ALIGNKIT_NAN_AT_STEP", "2,13")
    assert math.isnan(injected_nan_factor(2)) and math.isnan(injected_nan_factor(13))
    assert injected_nan_factor(1) == 1.0 and injected_nan_factor(3) == 1.0  # "13" does not match 1 or 3
    monkeypatch.delenv("ALIGNKIT_NAN_AT_STEP")
    assert injected_nan_factor(2) == 1.0
