"""The claims-ledger generator (scripts/claims_ledger.py) on a small synthetic executed notebook."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("claims_ledger",
                                               ROOT / "scripts" / "claims_ledger.py")
claims_ledger = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("claims_ledger", claims_ledger)  # dataclasses look their module up
_spec.loader.exec_module(claims_ledger)

MACHINE = "2-core Test CPU, 8 GiB RAM, no GPU; torch 2.0, Python 3.11"


def glued(name: str, plain: str) -> nbformat.NotebookNode:
    """An output exactly as myst-nb's ``glue(name, value)`` records it in an executed notebook."""
    prefix = "application/papermill.record/"
    return nbformat.v4.new_output(
        "display_data", data={prefix + "text/plain": plain},
        metadata={"scrapbook": {"mime_prefix": prefix, "name": name}})


def executed_notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# A tiny chapter\n\nThe ratio is {glue:text}`ratio:.2f`."),
        nbformat.v4.new_code_cell("glue('ratio', 0.5912345678)", outputs=[
            nbformat.v4.new_output("stream", name="stdout", text="not glued\n"),
            glued("ratio", "0.5912345678"), glued("n_items", "24")]),
        nbformat.v4.new_code_cell("glue('verdict', v.text)", outputs=[
            glued("verdict", "'0.59× the time (1.7× faster)'"),
            glued("pipe", "'a | b'")]),
        nbformat.v4.new_code_cell("glue('chapter_machine', describe_machine())", outputs=[
            glued("chapter_machine", repr(MACHINE))]),
    ]
    return nb


def test_glue_from_notebook_reads_every_glued_output_in_order():
    glue = claims_ledger.glue_from_notebook(json.loads(nbformat.writes(executed_notebook())))
    assert list(glue) == ["ratio", "n_items", "verdict", "pipe", "chapter_machine"]
    assert glue["ratio"]["data"] == {"text/plain": "0.5912345678"}


def test_value_text_formats_numbers_strings_and_figures():
    vt = claims_ledger.value_text
    assert vt({"data": {"text/plain": "0.5912345678"}}) == "0.591235"
    assert vt({"data": {"text/plain": "24"}}) == "24"
    assert vt({"data": {"text/plain": "'faster'"}}) == "faster"
    assert vt({"data": {"text/plain": "True"}}) == "True"
    assert vt({"data": {"image/png": "iVBOR..."}}) == "(figure)"
    assert vt({"data": {"text/plain": "tensor([1, 2])"}}) == "tensor([1, 2])"
    assert vt({"data": {"text/plain": "'" + "x" * 500 + "'"}}).endswith("…")


def test_chapter_claims_and_markdown_name_the_machine_and_every_value(tmp_path):
    folder = tmp_path / "executed" / "chapters" / "9-test"
    folder.mkdir(parents=True)
    nbformat.write(executed_notebook(), folder / "01-tiny.ipynb")
    nbformat.write(nbformat.v4.new_notebook(), folder / "02-no-glue.ipynb")
    chapters = claims_ledger.claims_from_executed(tmp_path / "executed")
    assert [ch.docname for ch in chapters] == ["chapters/9-test/01-tiny"]
    (chapter,) = chapters
    assert chapter.machine == MACHINE and len(chapter.rows) == 5
    text = claims_ledger.ledger_markdown(chapters)
    assert f"computed on {MACHINE}" in text
    assert "| `ratio` | 0.591235 |" in text and "| `pipe` | a \\| b |" in text
    missing = claims_ledger.chapter_claims("x", "X", {"a": {"data": {"text/plain": "1"}}})
    assert "not recorded" in missing.machine


@pytest.mark.skipif(shutil.which("jupyter-book", path=str(Path(sys.executable).parent)) is None,
                    reason="jupyter-book is not installed in this environment")
def test_the_sphinx_extension_builds_the_ledger_page_with_warnings_as_errors(tmp_path):
    book = tmp_path / "book"
    (book / "chapters").mkdir(parents=True)
    (book / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "claims_ledger.py", book / "scripts")
    shutil.copy2(ROOT / "claims.md", book)
    nbformat.write(executed_notebook(), book / "chapters" / "tiny.ipynb")
    (book / "intro.md").write_text("# Intro\n\nSee the [claims ledger](claims.md).\n")
    config = {"title": "t", "only_build_toc_files": True,
              "execute": {"execute_notebooks": "off"},
              "sphinx": {"local_extensions": {"claims_ledger": "scripts"}}}
    toc = {"format": "jb-book", "root": "intro",
           "chapters": [{"file": "chapters/tiny"}, {"file": "claims"}]}
    (book / "_config.yml").write_text(yaml.safe_dump(config))
    (book / "_toc.yml").write_text(yaml.safe_dump(toc))
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    run = subprocess.run([str(jupyter_book), "build", str(book), "-W", "--keep-going"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    page = (book / "_build" / "html" / "claims.html").read_text(encoding="utf-8")
    assert MACHINE in page and "0.591235" in page and "0.59× the time (1.7× faster)" in page
    assert 'href="chapters/tiny.html"' in page  # each chapter's table links to the chapter
