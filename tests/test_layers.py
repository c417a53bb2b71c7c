"""The layers hold (docs/ARCHITECTURE.md), read from the source so a stray import fails here
before it reaches a cluster:

1. no package module imports a module of a layer above its own (the layer table as `LAYERS`),
   and every module is in that table, in the code and in the doc;
2. `ray` is imported in the Ray layer's four files only, private Ray APIs and `ray.init` in
   `ray_env.py` only, `convert/` imports neither `ray` nor `ray_env`, and the Ray-free modules
   load no `ray` at run time;
3. no doc or comment names a document that is not in the repository;
4. no function is longer than `MAX_FUNCTION_LINES` unless `LONG_FUNCTIONS` says why.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "geopose_ray"
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"

# --- 1. the layer table of docs/ARCHITECTURE.md -------------------------------------------------
BOTTOM, PARTS, CORES, EXPERIMENT, RAY_LAYER, ENTRY = range(6)
# module prefix -> rank; the longest matching prefix decides, and a module may import its own rank
# and below. Entry points (run_*.py, every __main__.py, train.py) are ENTRY and import anything.
LAYERS: dict[str, int] = {
    "geopose_ray": BOTTOM,  # the package's __init__ only (matched exactly, never as a prefix)
    "geopose_ray.constants": BOTTOM,
    "geopose_ray.errors": BOTTOM,
    "geopose_ray.redact": BOTTOM,
    "geopose_ray.atomic": BOTTOM,
    "geopose_ray.config": BOTTOM,
    "geopose_ray.yamlio": BOTTOM,
    "geopose_ray.console": BOTTOM,
    "geopose_ray.paths": BOTTOM,
    "geopose_ray.models": PARTS,
    "geopose_ray.losses": PARTS,
    "geopose_ray.metrics": PARTS,
    "geopose_ray.uncertainty": PARTS,
    "geopose_ray.score": PARTS,
    "geopose_ray.submission": PARTS,
    "geopose_ray.convert": PARTS,
    "geopose_ray.data": PARTS,
    "geopose_ray.synthetic": PARTS,
    "geopose_ray.train_loop": CORES,
    "geopose_ray.step_stats": CORES,
    "geopose_ray.precise_bn": CORES,
    "geopose_ray.validation": CORES,
    "geopose_ray.optim": CORES,
    "geopose_ray.checkpoint": CORES,
    "geopose_ray.device": CORES,
    "geopose_ray.predict": CORES,
    "geopose_ray.tta": CORES,
    "geopose_ray.experiment": EXPERIMENT,
    "geopose_ray.storage": EXPERIMENT,
    "geopose_ray.ray_env": RAY_LAYER,
    "geopose_ray.tune": RAY_LAYER,
    "geopose_ray.ensemble": RAY_LAYER,
    "geopose_ray.train": ENTRY,
}

# --- 2. where `ray` may be imported -----------------------------------------------------------
RAY_FILES = {"ray_env.py", "tune/trainer.py", "tune/tuner.py", "ensemble/job.py"}
PRIVATE_SHIM = "ray_env.py"
RAY_FREE = [
    "geopose_ray.train_loop",
    "geopose_ray.validation",
    "geopose_ray.device",
    "geopose_ray.optim",
    "geopose_ray.checkpoint",
    "geopose_ray.train",
    "geopose_ray.predict",
    "geopose_ray.convert",
    "geopose_ray.ensemble.blend",
    "geopose_ray.ensemble.written",
    "geopose_ray.ensemble.members",
    "geopose_ray.ensemble.report",
    "geopose_ray.ensemble.launch",
    "geopose_ray.experiment",
    "geopose_ray.storage",
    "geopose_ray.tune.space",
    "geopose_ray.tune.sampler",
    "geopose_ray.tune.capacity",
    "geopose_ray.tune.progress",
    "geopose_ray.tune.options",
    "geopose_ray.tune.refit_plan",
    "geopose_ray.tune.identity",
    "geopose_ray.tune.plan",
    "geopose_ray.tune.launch",  # a dry run and --help import no Ray
    "geopose_ray.ensemble.plan",
    "geopose_ray.redact",
]

# --- 3. documents that are not in the repository ---------------------------------------------
# Notes that earlier sessions kept outside the repository; their facts now live in docs/ (spelled
# in pieces so that this file does not name them itself).
OUTSIDE_DOCS = tuple("_".join(p) for p in (("RAY", "NOTES"), ("GEOPOSE", "SPEC"), ("LIBS", "NOTES"),
                                          ("LEARNING", "PROBES"), ("STYLE", "ANCHORS")))  # fmt: skip
OUTSIDE_FOLDER = re.compile(r"\.\./" + "shared")
# a path under docs/ or a bare upper-case markdown name, e.g. `docs/CLUSTER.md` or `README.md`
DOC_PATH = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*docs/[\w./-]+\.md|(?:[\w.-]+/)*[A-Z][A-Z0-9_]+\.md)\b")
# a pointer to a section, e.g. docs/GEOPOSE.md, 'Vector flow' (or with double quotes, no comma)
SECTION_POINTER = re.compile(r"docs/([\w-]+\.md),?\s*(['\"])([^'\"]+)\2")
BOLD_LEAD = re.compile(r"^\*\*([^*]+?)\.?\*\*")  # a paragraph's bold title, e.g. **S3 as the store.**
DOC_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".cfg", ".toml"}
SKIP_DIRS = {".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache"}
SKIP_TOP_DIRS = {"build", "data", "runs", ".whl"}  # ignored outputs (.gitignore)

# --- 4. function length -------------------------------------------------------------------------
MAX_FUNCTION_LINES = 60  # from the `def` line to the function's last line
# "path::Qualified.name" -> why it is still longer; remove an entry once its function is split.
LONG_FUNCTIONS: dict[str, str] = {
    "geopose_ray/tune/search.py::run_search": "a search start to end in one readable sequence; to split",
}


def _modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def _module_name(rel: str) -> str:
    """`data/cache.py` -> `geopose_ray.data.cache`; `data/__init__.py` -> `geopose_ray.data`."""
    parts = ["geopose_ray", *Path(rel).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, module: str = "", is_package: bool = False) -> set[str]:
    """Every module name imported anywhere in the file (top level or inside functions), relative
    imports resolved against `module`; `from a import b` gives both `a` and `a.b`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            if node.module:
                names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def layer_of(name: str) -> int | None:
    """Rank of a module (or of a name inside one) by the longest matching prefix of LAYERS."""
    if name.split(".")[-1] == "__main__":
        return ENTRY
    if name == "geopose_ray":
        return LAYERS[name]
    matches = [p for p in LAYERS if p != "geopose_ray" and (name == p or name.startswith(p + "."))]
    return LAYERS[max(matches, key=len)] if matches else None


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


# --- 1 ------------------------------------------------------------------------------------------
def test_every_module_has_a_layer():
    unlisted = sorted(f for f in _modules() if layer_of(_module_name(f)) is None)
    assert not unlisted, f"add these to LAYERS and to docs/ARCHITECTURE.md's layer table: {unlisted}"


def test_no_module_imports_a_layer_above_its_own():
    offenders = []
    for rel, tree in _modules().items():
        module = _module_name(rel)
        own = layer_of(module)
        for name in sorted(_imports(tree, module, rel.endswith("__init__.py"))):
            if name != "geopose_ray" and not name.startswith("geopose_ray."):
                continue
            target = layer_of(name)
            if target is not None and own is not None and target > own:
                offenders.append(f"{module} (rank {own}) imports {name} (rank {target})")
    assert not offenders, "\n".join(offenders)


def _table_rows() -> dict[int, str]:
    """rank -> the text of that row of ARCHITECTURE.md's layer table."""
    rows = {}
    for line in ARCHITECTURE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells and cells[0].isdigit():
            rows[int(cells[0])] = line
    return rows


def test_the_architecture_table_names_every_module_in_its_layer():
    rows = _table_rows()
    assert set(rows) == set(LAYERS.values()), "ARCHITECTURE.md's ranks differ from LAYERS'"
    missing = []
    for rel in _modules():
        path = Path(rel)
        if path.name == "__main__.py":
            token = f"`{rel}`"
        elif path.name == "__init__.py" and len(path.parts) > 1:
            token = f"`{path.parts[-2]}/`"
        else:
            token = f"`{path.name}`"
        if token not in rows[layer_of(_module_name(rel))]:
            missing.append(f"{rel}: {token} not in the rank-{layer_of(_module_name(rel))} row")
    for script in sorted(REPO.glob("run_*.py")):
        if f"`{script.name}`" not in rows[ENTRY]:
            missing.append(f"{script.name}: not in the entry-point row")
    assert not missing, "\n".join(missing)


# --- 2 ------------------------------------------------------------------------------------------
def test_ray_is_imported_in_four_files_and_private_apis_in_one():
    modules = _modules()
    with_ray = {f for f, t in modules.items() if any(n == "ray" or n.startswith("ray.") for n in _imports(t))}
    assert with_ray == RAY_FILES
    assert {layer_of(_module_name(f)) for f in RAY_FILES} == {RAY_LAYER}
    private = {f for f, t in modules.items() if any("._private" in n or "._internal" in n for n in _imports(t))}
    assert private <= {PRIVATE_SHIM}
    inits = {f for f, t in modules.items() if any(_is_ray_init(n) for n in ast.walk(t))}
    assert inits == {PRIVATE_SHIM}  # one ray.init helper


def test_convert_imports_neither_ray_nor_ray_env():
    """convert/ takes an injected parallel map: the Ray layer passes Ray tasks (ray_env.task_map),
    the CLIs a process pool. So it needs neither `ray` nor the Ray layer's `ray_env`."""
    found = {
        rel: sorted(n for n in _imports(t) if n.split(".")[0] == "ray" or n.startswith("geopose_ray.ray_env"))
        for rel, t in _modules().items()
        if rel.startswith("convert/")
    }
    assert not {rel: names for rel, names in found.items() if names}


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


# --- 3 ------------------------------------------------------------------------------------------
def _doc_files() -> list[Path]:
    """Every py, md, yaml, cfg, toml file and Makefile of the repository (no venv, git, outputs)."""
    found = []
    for root, dirs, files in os.walk(REPO):
        top = Path(root) == REPO
        dirs[:] = sorted(
            d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info") and not (top and d in SKIP_TOP_DIRS)
        )
        found += [Path(root) / f for f in sorted(files) if Path(f).suffix in DOC_SUFFIXES or f == "Makefile"]
    return found


def _resolves(token: str, source: Path) -> bool:
    """A doc path names a file of the repository: from the root, the citing file's folder or docs/."""
    for base in (REPO, source.parent, REPO / "docs"):
        path = (base / token).resolve()
        if path.is_file() and REPO in path.parents:
            return True
    return False


def _headings(doc: Path) -> set[str]:
    """A doc's section titles: its headings and the bold titles that open paragraphs."""
    lines = doc.read_text().splitlines()
    bold = {m.group(1).strip() for line in lines if (m := BOLD_LEAD.match(line))}
    return bold | {line.lstrip("#").strip() for line in lines if line.startswith("#")}


def test_docs_and_comments_name_only_documents_in_the_repository():
    problems = []
    for path in _doc_files():
        rel = path.relative_to(REPO)
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            problems += [f"{rel}:{number}: names {name}, not in the repository" for name in OUTSIDE_DOCS if name in line]
            if OUTSIDE_FOLDER.search(line):
                problems.append(f"{rel}:{number}: points outside the repository")
            problems += [
                f"{rel}:{number}: {m.group(1)} does not exist"
                for m in DOC_PATH.finditer(line)
                if not _resolves(m.group(1), path)
            ]
    assert not problems, "\n".join(problems)


def test_section_pointers_name_existing_sections():
    """A pointer such as docs/GEOPOSE.md, 'Units' (also one wrapped over comment lines) names a
    heading of that doc."""
    problems = []
    for path in _doc_files():
        text = re.sub(r"\s*\n\s*(?:#\s*)?", " ", path.read_text(errors="replace"))
        for m in SECTION_POINTER.finditer(text):
            doc = REPO / "docs" / m.group(1)
            if doc.is_file() and m.group(3) not in _headings(doc):
                problems.append(f"{path.relative_to(REPO)}: no section '{m.group(3)}' in docs/{m.group(1)}")
    assert not problems, "\n".join(problems)


# --- 4 ------------------------------------------------------------------------------------------
def _function_lengths() -> dict[str, int]:
    """Lines of every def in geopose_ray/, run_*.py and bench/, by `path::Qualified.name`."""
    files = sorted(PACKAGE.rglob("*.py")) + sorted(REPO.glob("run_*.py")) + sorted((REPO / "bench").rglob("*.py"))
    lengths: dict[str, int] = {}

    def walk(node: ast.AST, prefix: str, rel: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                lengths[f"{rel}::{name}"] = child.end_lineno - child.lineno + 1
                walk(child, name + ".", rel)
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".", rel)
            else:
                walk(child, prefix, rel)

    for path in files:
        walk(ast.parse(path.read_text()), "", str(path.relative_to(REPO)))
    return lengths


def test_no_function_is_longer_than_the_limit_unless_allowed():
    long = {k: n for k, n in _function_lengths().items() if n > MAX_FUNCTION_LINES and k not in LONG_FUNCTIONS}
    assert not long, f"split these (or add them to LONG_FUNCTIONS with a reason): {long}"


def test_the_allow_list_only_holds_long_functions():
    lengths = _function_lengths()
    stale = {k: lengths.get(k) for k in LONG_FUNCTIONS if lengths.get(k, 0) <= MAX_FUNCTION_LINES}
    assert not stale, f"remove these from LONG_FUNCTIONS (now short, renamed or gone): {stale}"
