"""The layers hold (docs/ARCHITECTURE.md): where `ray` may be imported, which modules never load it,
and that library code never imports a command module. Read from the source, so a stray import
fails here before it reaches a cluster."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "geopose_ray"
RAY_FILES = {"ray_env.py", "tune/trainer.py", "tune/tuner.py", "ensemble/job.py"}
PRIVATE_SHIM = "ray_env.py"
RAY_FREE = [
    "geopose_ray.train_loop",
    "geopose_ray.optim",
    "geopose_ray.checkpoint",
    "geopose_ray.train",
    "geopose_ray.predict",
    "geopose_ray.ensemble.blend",
    "geopose_ray.ensemble.written",
    "geopose_ray.ensemble.members",
    "geopose_ray.experiment",
    "geopose_ray.storage",
    "geopose_ray.tune.space",
    "geopose_ray.tune.capacity",
    "geopose_ray.tune.progress",
]


def _modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(tree: ast.Module) -> set[str]:
    """Every module name imported anywhere in the file (top level or inside functions)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _is_ray_init(node: ast.AST) -> bool:
    """A call `ray.init(...)`."""
    func = getattr(node, "func", None)
    return isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr == "init" and (
        getattr(func.value, "id", "") == "ray"
    )


def _is_command(tree: ast.Module) -> bool:
    """A command module: it ends in `if __name__ == "__main__":`."""
    return any(
        isinstance(n, ast.If) and isinstance(n.test, ast.Compare) and getattr(n.test.left, "id", "") == "__name__"
        for n in tree.body
    )


def test_ray_is_imported_in_four_files_and_private_apis_in_one():
    modules = _modules()
    with_ray = {f for f, t in modules.items() if any(n == "ray" or n.startswith("ray.") for n in _imports(t))}
    assert with_ray == RAY_FILES
    private = {f for f, t in modules.items() if any("._private" in n or "._internal" in n for n in _imports(t))}
    assert private <= {PRIVATE_SHIM}
    inits = {f for f, t in modules.items() if any(_is_ray_init(n) for n in ast.walk(t))}
    assert inits == {PRIVATE_SHIM}  # one ray.init helper


def test_library_code_never_imports_a_command_module():
    modules = _modules()
    commands = {"geopose_ray." + f[:-3].replace("/", ".") for f, t in modules.items() if _is_command(t)}
    assert commands  # convert, score, train, ...
    offenders = {
        f: sorted(_imports(t) & commands) for f, t in modules.items() if not _is_command(t) and _imports(t) & commands
    }
    assert not offenders


@pytest.mark.parametrize("module", RAY_FREE)
def test_ray_free_modules_load_no_ray(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
