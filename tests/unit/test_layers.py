"""The layers' import directions, read from the source (ast; nothing is imported).

pure (rl, losses, ops, selection: torch and the standard library only) <- data, models, runtime, rollout,
eval <- stages <- entry points (cli, pipeline). A stage never imports another stage: what two stages share
lives a layer down (rollout/, runtime/). Only the stage registry (the `alignkit.stages` package namespace)
may be read from below.
"""

import ast
import sys
from pathlib import Path

import alignkit

ROOT = Path(alignkit.__file__).resolve().parent
PURE = {"alignkit.rl", "alignkit.losses", "alignkit.ops", "alignkit.selection"}
# Modules above the stages: they may import any stage module.
ENTRY_POINTS = {"alignkit.cli", "alignkit.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; `from a import b` also yields a.b: b may be a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


MODULES = {module_name(p): imports(p) for p in sorted(ROOT.rglob("*.py"))}


# The stage modules (`from alignkit.stages import POLICY_METHODS` yields alignkit.stages.POLICY_METHODS, no module)
STAGE_MODULES = {name for name in MODULES if name.startswith("alignkit.stages.")}


def is_stage_module(name: str) -> bool:
    return name in STAGE_MODULES


def test_the_walk_sees_every_layer():
    assert {"alignkit.rl", "alignkit.rollout.sampling", "alignkit.stages.ppo", "alignkit.eval.report"} <= set(MODULES)
    assert "alignkit.rollout.sampling" in MODULES["alignkit.stages.best_of_n"]
    assert "alignkit.stages.ppo" in STAGE_MODULES and "alignkit.stages" not in STAGE_MODULES


def test_pure_modules_import_only_torch_and_the_standard_library():
    for name in PURE:
        for imported in MODULES[name]:
            top = imported.split(".")[0]
            ok = (top in sys.stdlib_module_names or top == "torch" or imported in PURE
                  or imported.rpartition(".")[0] in PURE or imported == "alignkit")
            assert ok, f"{name} imports {imported}"


def test_only_entry_points_and_stages_import_a_stage_module():
    for name, imported in MODULES.items():
        if name in ENTRY_POINTS or is_stage_module(name):
            continue
        stage_imports = sorted(m for m in imported if is_stage_module(m))
        assert not stage_imports, f"{name} imports {stage_imports} (only the registry, alignkit.stages, may be read)"


def test_no_stage_imports_another_stage():
    for name, imported in MODULES.items():
        if not is_stage_module(name):
            continue
        others = sorted(m for m in imported if is_stage_module(m) and m != name)
        assert not others, f"{name} imports {others}"
