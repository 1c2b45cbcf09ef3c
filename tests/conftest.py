"""Session fixtures shared by the stage and dist tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import TINY_PRETRAIN


@pytest.fixture(scope="session")
def pretrained_tiny(tmp_path_factory) -> Path:
    """One tiny from-scratch pretraining run shared by the stage tests (its run dir)."""
    from alignkit.cli import run_stage

    out = tmp_path_factory.mktemp("pretrain")
    run_stage("pretrain", TINY_PRETRAIN + [f"output_dir={out}"])
    return out


try:  # property-based tests (tests/unit/test_fuzz_*.py): bounded by default, many more under -m slow
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is in the dev extra; the other tests do not need it
    pass
else:
    settings.register_profile(
        "fuzz", max_examples=100, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    settings.register_profile("fuzz-slow", settings.get_profile("fuzz"), max_examples=2000, derandomize=False)
