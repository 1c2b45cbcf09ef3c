"""One model's evaluation result kept on disk (`alignkit eval cache_dir=`), under a key of everything that shapes it.

The pipeline evaluates each policy alone as soon as its stage ends, beside the stages still running, and its
final `eval` over every model reads these back (stages/evaluate.py); a model retrained since, or any other
setting, has another key, so a stale result is never read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from alignkit.eval.targets import Target


def _plain(value: Any) -> Any:
    """numpy values as JSON (NaN stays NaN: Python's json reads it back)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# Fields that do not change one model's result: they choose, name or compare models, or only act afterwards
# (the reference is in the key by its weights, whatever name or path chose it).
NOT_IN_RESULT_KEY = {"models", "names", "baseline", "reference", "checkpoints", "output_dir", "cache_dir", "save_samples", "pairs",
                     "kl_budget", "alarm_gold_tolerance", "alarm_length_corr", "alarm_disagreement_factor"}


def _files_stamp(path: str | Path | None) -> Any:
    """What identifies a file's or a directory's contents cheaply: (name, size, mtime) of its files; a string that
    is no local path (a hub id, a task: spec) stands for itself."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return [p.name, p.stat().st_size, p.stat().st_mtime_ns]
    if p.is_dir():
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(p.iterdir()) if f.is_file()]
    return str(path)


def _target_stamp(target: Target) -> list:
    return [str(Path(target.model_dir).resolve()) if Path(target.model_dir).exists() else target.model_dir,
            _files_stamp(target.model_dir), _files_stamp(target.state), target.lora]


def result_key(cfg: Any, target: Target, reference: Target) -> str:
    """The key of one model's result: every setting that shapes it (all of cfg but NOT_IN_RESULT_KEY), the
    model's, the reference's and the reward models' weights (by path, size and mtime), and the prompt and
    held-out text files. A retrained model or any other setting gives another key, so a stale result is never read."""
    import hashlib
    from dataclasses import asdict

    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_RESULT_KEY}
    files = [_files_stamp(p) for p in ([cfg.prompts] if isinstance(cfg.prompts, str) else cfg.prompts)]
    files += [_files_stamp(cfg.heldout_text), [_files_stamp(m) for m in cfg.reward.models]]
    blob = json.dumps([settings, files, _target_stamp(target), _target_stamp(reference)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def read_result(cache_dir: Path, key: str) -> tuple[dict, dict] | None:
    """(metrics, per-sample data with its [P, K] "scores" arrays) kept under `key`, or None."""
    path = cache_dir / f"{key}.json"
    if not path.exists():
        return None
    kept = json.loads(path.read_text())
    data = kept["data"]
    data["scores"] = {k: np.asarray(v, dtype=np.float64) for k, v in data["scores"].items()}
    return kept["metrics"], data


def write_result(cache_dir: Path, key: str, name: str, metrics: dict, data: dict) -> None:
    """Keep one model's result (written whole, then renamed: a reader never sees half a file)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    kept = {"name": name, "metrics": metrics, "data": {**data, "scores": {k: v.tolist() for k, v in data["scores"].items()}}}
    part = cache_dir / f"{key}.json.{os.getpid()}"
    part.write_text(json.dumps(kept, default=_plain))
    part.replace(cache_dir / f"{key}.json")
