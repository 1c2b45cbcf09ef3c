"""Where a run came from, written into its config.yaml and summary.json so a month-old run directory can say how
it was made: package versions, the alignkit git commit (in a checkout), processes, mixed precision, device type,
seed, and a fingerprint (bytes + sha256) of every input file or directory the config names.

Config fields that name something that does not exist on disk (a `task:` spec, a hub id, `scratch:tiny`) are
recorded as given. Directories are fingerprinted over their files in sorted order, leaving out checkpoints/ and
tb/ (a run directory's history, not the model it hands on).
"""

from __future__ import annotations

import hashlib
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("alignkit", "torch", "transformers", "accelerate", "peft", "datasets", "tokenizers", "safetensors")
# config fields naming inputs (those a stage does not have are skipped)
INPUT_FIELDS = ("model", "tokenizer", "train_data", "eval_data", "reward.model", "critic_model", "ref_model",
                "reference", "reward.models", "models")
SKIPPED_DIRS = {"checkpoints", "tb", "__pycache__"}
_CHUNK = 1 << 20


def package_versions() -> dict[str, str | None]:
    """Installed version of each of PACKAGES (None when not installed)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(path: Path | None = None) -> dict[str, Any] | None:
    """{"commit": sha, "dirty": bool} of the git checkout holding `path` (default: this package), or None."""
    where = str((path or Path(__file__)).resolve().parent)
    try:
        commit = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(path: str | Path) -> dict[str, Any]:
    """{"path", "bytes", "sha256"} of a file; of a directory also "files", the sha256 then covering every file's
    relative path, size and content (checkpoints/ and tb/ left out)."""
    path = Path(path)
    if path.is_file():
        return {"path": str(path), "bytes": path.stat().st_size, "sha256": _file_sha256(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not SKIPPED_DIRS & set(p.relative_to(path).parts[:-1]))
    digest, total = hashlib.sha256(), 0
    for p in files:
        size = p.stat().st_size
        total += size
        digest.update(f"{p.relative_to(path).as_posix()}\0{size}\0{_file_sha256(p)}\n".encode())
    return {"path": str(path), "files": len(files), "bytes": total, "sha256": digest.hexdigest()}


def describe_input(value: Any) -> Any:
    """A fingerprint when `value` names an existing path, the value itself otherwise; lists item by item."""
    if isinstance(value, (list, tuple)):
        return [describe_input(v) for v in value]
    if isinstance(value, str) and value and Path(value).exists():
        return fingerprint(value)
    return value


def _field(cfg: Any, dotted: str) -> Any:
    """cfg's value at a dotted key ('reward.model'), None where the stage has no such key."""
    for part in dotted.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def run_provenance(cfg: Any, num_processes: int, device_type: str) -> dict[str, Any]:
    """The provenance block of one run of `cfg` (a stage config dataclass)."""
    inputs = {name: describe_input(_field(cfg, name)) for name in INPUT_FIELDS
              if _field(cfg, name) not in (None, "", [])}
    return {"versions": package_versions(), "git": git_state(), "num_processes": num_processes,
            "mixed_precision": getattr(cfg, "mixed_precision", None), "device": device_type,
            "seed": getattr(cfg, "seed", None), "inputs": inputs}
