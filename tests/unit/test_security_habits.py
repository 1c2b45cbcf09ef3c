"""Security habits, checked on the source: nothing runs code that a file or a model repository brings along.

Read with `ast`, not regexes, so `model.eval()` is a method call and not the builtin, and a string or
comment that mentions `torch.load(` is not code. Flagged:
- `eval(...)` / `exec(...)`: the builtins run arbitrary strings;
- `yaml.load` / `yaml.unsafe_load` / `yaml.full_load` (also imported by name): they build arbitrary
  Python objects; `yaml.safe_load` is the one allowed;
- `torch.load(...)` without `weights_only=True`: it unpickles, i.e. runs whatever the file says;
- `pickle.load` / `pickle.loads` (also imported by name): the same;
- `trust_remote_code=True` written as a constant: it runs a hub repository's Python, so it may only come
  from a user's own config value.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCANNED = [REPO / "src" / "alignkit", REPO / "bench"]

UNSAFE_ATTRIBUTES = {"yaml": {"load", "unsafe_load", "full_load"}, "pickle": {"load", "loads"}}


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def violations(source: str, filename: str = "<string>") -> list[str]:
    """'file:line: what' for every unsafe call in `source`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module in UNSAFE_ATTRIBUTES:
            found += [f"{where}: from {node.module} import {a.name}" for a in node.names
                      if a.name in UNSAFE_ATTRIBUTES[node.module]]
        if isinstance(node, ast.Dict):  # {"trust_remote_code": True} passed as **kwargs
            found += [f"{where}: trust_remote_code=True" for k, v in zip(node.keys, node.values)
                      if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and _is_true(v)]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
            found.append(f"{where}: {func.id}()")
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            module, name = func.value.id, func.attr
            if name in UNSAFE_ATTRIBUTES.get(module, ()):
                found.append(f"{where}: {module}.{name}()")
            if (module, name) == ("torch", "load") and not any(
                k.arg == "weights_only" and _is_true(k.value) for k in node.keywords
            ):
                found.append(f"{where}: torch.load() without weights_only=True")
        found += [f"{where}: trust_remote_code=True" for k in node.keywords
                  if k.arg == "trust_remote_code" and _is_true(k.value)]
    return found


def test_the_checker_flags_each_habit_and_not_its_safe_twin():
    bad = """
import yaml, torch, pickle
from yaml import full_load
from pickle import loads
eval("1 + 1")
exec(code)
yaml.load(text)
yaml.unsafe_load(text)
torch.load(path)
torch.load(path, weights_only=False)
pickle.load(handle)
AutoModel.from_pretrained(name, trust_remote_code=True)
AutoModel.from_pretrained(name, **{"trust_remote_code": True})
"""
    flagged_lines = sorted(int(v.split(":")[1]) for v in violations(bad))
    assert flagged_lines == list(range(3, 14)), violations(bad)  # every line but the plain import, once
    safe = """
model.eval()
self.eval()
yaml.safe_load(text)
torch.load(path, map_location="cpu", weights_only=True)
AutoModel.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
print("torch.load(x) and eval(y) in a string are not calls")
"""
    assert violations(safe) == []


def test_source_has_no_unsafe_loading_or_code_execution():
    files = sorted(p for root in SCANNED for p in root.rglob("*.py"))
    assert len(files) > 20  # the scan really reads the package
    found = [v for p in files for v in violations(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))]
    assert found == [], "\n".join(found)
