"""runtime.setup.derive_seed: the one rule for derived seeds, and the sampling chunks that use it."""

import subprocess
import sys

import pytest

from alignkit.rollout.sampling import EVAL_SPLIT, ITERATION_SPLIT, TRAIN_SPLIT, chunk_seed
from alignkit.runtime.setup import derive_seed


def test_deterministic_in_range_and_distinct_per_part():
    seeds = {derive_seed(s, tag, i) for s in (0, 1, 42) for tag in ("a", "b") for i in range(50)}
    assert len(seeds) == 3 * 2 * 50
    assert all(0 <= x < 2**31 for x in seeds)
    assert derive_seed(7, "x", 3) == derive_seed(7, "x", 3) != derive_seed(7, "x", 4)
    assert derive_seed(1, 23) != derive_seed(12, 3)  # no arithmetic collisions of (seed, part)


def test_same_value_in_a_fresh_interpreter():
    # no dependence on Python's per-process hash salt
    code = "from alignkit.runtime.setup import derive_seed; print(derive_seed(3, 'sample', 1, 2))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert int(out.stdout) == derive_seed(3, "sample", 1, 2)


def test_chunk_seeds_of_splits_differ():
    assert chunk_seed(0, TRAIN_SPLIT, 0) != chunk_seed(0, EVAL_SPLIT, 0)
    assert chunk_seed(0, (ITERATION_SPLIT, 1), 0) != chunk_seed(0, (ITERATION_SPLIT, 0), 1)
    assert chunk_seed(5, EVAL_SPLIT, 2) == derive_seed(5, "sample", EVAL_SPLIT, 2)


def test_rejects_other_types():
    with pytest.raises(TypeError):
        derive_seed(1, 2.5)
