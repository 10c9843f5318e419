"""pytest hooks shared by the unit tests and nbval.

``--save-executed DIR``: while nbval executes a chapter, keep each cell's outputs and write the
executed notebook to ``DIR/<same relative path>``. CI then builds the site from those notebooks
instead of executing every chapter a second time (see README, "How CI works").
"""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--save-executed",
        metavar="DIR",
        default=None,
        help="write notebooks executed by nbval, with their outputs, under DIR",
    )


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    target_dir = item.config.getoption("--save-executed")
    cell = getattr(item, "cell", None)
    if not target_dir or cell is None or not hasattr(item, "test_outputs"):
        return  # not an nbval cell, or not saving
    notebook = item.parent
    notebook._executed_count = getattr(notebook, "_executed_count", 0) + 1
    cell.outputs = item.test_outputs or []
    cell.execution_count = notebook._executed_count
    if nextitem is None or nextitem.parent is not notebook:  # last cell of this notebook
        target = Path(target_dir) / Path(str(notebook.fspath)).resolve().relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook.nb, str(target))
