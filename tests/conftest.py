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
