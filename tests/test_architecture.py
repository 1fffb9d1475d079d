"""The layout rules of docs/architecture.md, checked on the source (no imports run).

- imports between the three packages run one way: structures <- simgen <- training;
- no import cycle between modules of the project;
- no private name (``_x``) of one module is imported or used by another
  (``from m import _x`` or ``m._x``);
- every third-party package the code imports is declared in pyproject.toml.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("structures", "simgen", "training")
LAYER = {"structures": 0, "simgen": 1, "training": 2}
#: import name -> distribution name in pyproject.toml, where they differ.
DISTRIBUTIONS = {
    "PIL": "pillow",
    "cupy": "cupy-cuda12x",
    "cupyx": "cupy-cuda12x",
    "dask_cuda": "dask-cuda",
    "dask_jobqueue": "dask-jobqueue",
    "rsciio": "rosettasciio",
    "skimage": "scikit-image",
    "yaml": "pyyaml",
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not MODULES[module].name == "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str):
    """(imported module, names or None, aliases) of every import in ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None, a.asname or a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in MODULES:  # ``from pkg import module``
                    yield sub, None, a.asname or a.name
                else:
                    yield target, a.name, a.asname or a.name


def _project_graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _ in _imports(m):
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != m:
                graph[m].add(target)
    return graph


def test_packages_import_one_way():
    bad = [
        f"{m} imports {t}"
        for m, targets in _project_graph().items()
        for t in targets
        if LAYER[t.split(".")[0]] > LAYER[m.split(".")[0]]
    ]
    assert not bad


def test_no_import_cycle():
    graph = _project_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles


def test_no_private_name_crosses_modules():
    bad = []
    for m in MODULES:
        aliases = {}
        for target, name, alias in _imports(m):
            if target.split(".")[0] not in PACKAGES:
                continue
            if name is None:
                aliases[alias] = target
            elif name.startswith("_") and not name.startswith("__"):
                bad.append(f"{m}: from {target} import {name}")
        tree = ast.parse(MODULES[m].read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                bad.append(f"{m}: {aliases[node.value.id]}.{node.attr}")
    assert not bad


def test_every_third_party_import_is_declared():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(meta["dependencies"])
    for extra in meta["optional-dependencies"].values():
        declared += extra
    names = set()
    for spec in declared:
        name = spec.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        names.add(name.strip().lower())
    missing = set()
    for m in MODULES:
        for target, _, _ in _imports(m):
            top = target.split(".")[0]
            if top in PACKAGES or top in sys.stdlib_module_names or not top:
                continue
            if DISTRIBUTIONS.get(top, top).lower() not in names:
                missing.add(f"{top} (in {m})")
    assert not missing
