"""The shape of ``utils`` as the chapters see it, checked by parsing (nothing is imported or run).

- No chapter and no ``utils`` module imports a private name (one starting with ``_``) from ``utils``,
  neither ``from utils.x import _y`` nor ``utils.x._y``.
- Every ``utils`` module that a chapter imports from declares ``__all__``; ``__all__`` lists only names
  the module defines or imports; and a chapter, or another ``utils`` module, imports from a module only
  names in its ``__all__`` (the public names; see the rules in ``utils/__init__.py``).
"""
from __future__ import annotations

import ast
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
UTILS = sorted((ROOT / "utils").glob("*.py"))
CHAPTERS = sorted((ROOT / "chapters").glob("*/*.ipynb"))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _cell_tree(source: str) -> ast.Module:
    """A code cell's AST, with IPython lines (``%magic``, ``!shell``) blanked out."""
    lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in source.split("\n")]
    return ast.parse("\n".join(lines))


def _sources() -> list[tuple[str, ast.Module]]:
    out = [(str(p.relative_to(ROOT)), ast.parse(p.read_text(encoding="utf-8"))) for p in UTILS]
    for nb in CHAPTERS:
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        for i, cell in enumerate(cells):
            if cell["cell_type"] == "code":
                out.append((f"{nb.relative_to(ROOT)} cell {i}", _cell_tree("".join(cell["source"]))))
    return out


SOURCES = _sources()


def _utils_module(node: ast.ImportFrom, where: str) -> str | None:
    """'utils.x' for ``from utils.x import ...`` (or ``from .x import ...`` inside utils), else None."""
    if node.level:
        return None if not where.startswith("utils/") else ("utils." + node.module if node.module else "utils")
    if node.module and (node.module == "utils" or node.module.startswith("utils.")):
        return node.module
    return None


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _imports(tree: ast.Module, where: str) -> list[tuple[str, str]]:
    """(module, name) for every name imported from a utils module (``from`` imports and attribute use)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = _utils_module(node, where)
            if module:
                found += [(module, alias.name) for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted and dotted.startswith("utils.") and dotted.count(".") == 2:
                _, module, name = dotted.split(".")
                found.append((f"utils.{module}", name))
            elif dotted and dotted.startswith("utils.") and dotted.count(".") == 1:
                found.append(("utils", dotted.split(".")[1]))  # utils.glue, or a submodule
    return found


def _module_path(module: str) -> pathlib.Path | None:
    path = ROOT / (module.replace(".", "/") + ".py")
    if module == "utils":
        path = ROOT / "utils" / "__init__.py"
    return path if path.exists() else None


def _all_of(path: pathlib.Path) -> tuple[list[str] | None, set[str]]:
    """The module's ``__all__`` (None if absent) and every name bound at its top level."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    declared, bound = None, set()
    for node in tree.body:
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Name):
                bound.add(target.id)
                if target.id == "__all__" and isinstance(node, ast.Assign):
                    declared = list(ast.literal_eval(node.value))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
    return declared, bound


def _is_own(where: str, module: str) -> bool:
    path = _module_path(module)
    return path is not None and where == str(path.relative_to(ROOT))


def test_no_private_names_are_imported_from_utils():
    offences = [f"{where}: {module}.{name}" for where, tree in SOURCES
                for module, name in _imports(tree, where)
                if _is_private(name) and not _is_own(where, module)]
    assert not offences, ("private names imported from utils (make them public, or keep them in their "
                          "module):\n" + "\n".join(offences))


def _chapter_modules() -> set[str]:
    return {module for where, tree in SOURCES if where.startswith("chapters/")
            for module, _ in _imports(tree, where) if _module_path(module)} | {
        f"utils.{alias.name.split('.')[1]}" for where, tree in SOURCES if where.startswith("chapters/")
        for node in ast.walk(tree) if isinstance(node, ast.Import)
        for alias in node.names if alias.name.startswith("utils.")}


@pytest.mark.parametrize("module", sorted(_chapter_modules() | {"utils"}))
def test_modules_chapters_use_declare_all_of_existing_names(module):
    path = _module_path(module)
    assert path is not None, f"chapters import {module}, which does not exist"
    declared, bound = _all_of(path)
    assert declared is not None, f"{module} is imported by chapters but declares no __all__"
    assert len(declared) == len(set(declared)), f"{module}.__all__ lists a name twice"
    missing = sorted(set(declared) - bound)
    assert not missing, f"{module}.__all__ lists names the module does not define: {missing}"


def test_imports_across_modules_use_only_public_names():
    """A chapter or utils module imports from a utils module only what that module's ``__all__`` lists."""
    offences = []
    for where, tree in SOURCES:
        for module, name in _imports(tree, where):
            path = _module_path(module)
            if path is None or _is_own(where, module) or _is_private(name):
                continue  # private names: the test above
            if module == "utils" and (ROOT / "utils" / f"{name}.py").exists():
                continue  # `from utils import tokenization` names a submodule
            declared, _ = _all_of(path)
            if declared is not None and name not in declared:
                offences.append(f"{where}: {module}.{name} is not in {module}.__all__")
    assert not offences, "\n".join(offences)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_cell_ids_are_unique(path):
    """A copied cell keeps its id; nbformat then rewrites it with a warning on every read."""
    ids = [c.get("id") for c in json.loads(path.read_text(encoding="utf-8"))["cells"]]
    repeated = sorted({i for i in ids if i is not None and ids.count(i) > 1})
    assert not repeated, f"{path.name}: cell ids {repeated} appear more than once; give copies new ids"
