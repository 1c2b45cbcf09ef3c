"""The pure modules import torch only: a fresh interpreter importing them must not load the heavy
libraries (transformers, accelerate, datasets, peft)."""

import json
import subprocess
import sys

PURE_MODULES = ["alignkit.ops", "alignkit.losses", "alignkit.rl", "alignkit.selection"]
HEAVY_LIBRARIES = ["transformers", "accelerate", "datasets", "peft"]

# Imports the modules one by one in a fresh interpreter (one start-up of torch, not four) and
# reports, per module, the heavy libraries loaded after importing it.
PROBE = """
import importlib, json, sys
report = {{}}
for module in {modules!r}:
    importlib.import_module(module)
    report[module] = [name for name in {heavy!r} if name in sys.modules]
print(json.dumps(report))
"""


def _run_probe(prelude: str = "") -> dict[str, list[str]]:
    code = prelude + PROBE.format(modules=PURE_MODULES, heavy=HEAVY_LIBRARIES)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_pure_modules_import_no_heavy_library():
    report = _run_probe()
    assert report == {module: [] for module in PURE_MODULES}


def test_probe_detects_a_heavy_import():
    # Guard against a probe that can never fail: a stand-in `peft` in sys.modules must be reported.
    # (A stand-in keeps this fast; the probe only looks at sys.modules.)
    report = _run_probe("import sys, types\nsys.modules['peft'] = types.ModuleType('peft')\n")
    assert report["alignkit.ops"] == ["peft"]
