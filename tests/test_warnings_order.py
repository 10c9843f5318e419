"""The warning filters of ``utils`` hold whatever order a chapter imports things in.

Some libraries print harmless warnings the moment they are imported (tqdm.auto, through transformers,
in a Jupyter kernel without ipywidgets; bitsandbytes on CPUs without its optional kernels package).
``utils`` filters them, but a filter only helps if it is installed before the import, so every
chapter's setup cell (cell 1, run before any other) imports ``utils``. This test runs, in a real
Jupyter kernel as nbval does, a chapter's setup cell, then the libraries, then ``utils``, and checks
that nothing reaches the page's stderr.
"""
from __future__ import annotations

import ast
import json
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHAPTER = ROOT / "chapters" / "2-finetuning" / "02-lora-from-scratch.ipynb"  # uses peft and transformers


def _setup_cell(path: pathlib.Path) -> str:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    return "".join(code[0]["source"])


def test_every_chapter_setup_cell_imports_utils():
    def imports_utils(source: str) -> bool:
        tree = ast.parse("\n".join("" if line.lstrip().startswith(("%", "!")) else line
                                   for line in source.split("\n")))
        return any(isinstance(node, ast.Import) and any(a.name == "utils" for a in node.names)
                   for node in tree.body)

    lacking = [str(p.relative_to(ROOT)) for p in sorted(ROOT.glob("chapters/*/*.ipynb"))
               if not imports_utils(_setup_cell(p))]
    assert not lacking, f"these chapters' setup cells do not import utils first: {lacking}"


def test_libraries_imported_before_utils_print_no_warnings(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cells = [
        _setup_cell(CHAPTER),
        "import transformers\nimport peft\nimport bitsandbytes\nimport torch",  # libraries first
        "import utils\nfrom utils.lora import apply_lora",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(CHAPTER.parent)}})
    client.execute()
    printed = [out.get("text", "") for cell in nb.cells for out in cell.outputs
               if out.get("name") == "stderr" or out.get("output_type") == "error"]
    assert not printed, "warnings reached the page:\n" + "\n".join(printed)
