"""The claims ledger: every glued value of every chapter, with the machine that computed it.

A Sphinx extension (``_config.yml``: ``sphinx.local_extensions``) that fills the back-matter page
``claims.md`` with one table per chapter. It reads what myst-nb itself stores while it reads each
notebook: ``<build>/jupyter_execute/<docname>.glue.json``, written both when ``make book`` executes
the chapters inside ``jupyter-book`` and when ``make site-from-executed`` builds from the notebooks
nbval executed (execution off; myst-nb still extracts the glue outputs). The ledger page is moved to
the end of the reading order and re-read on every build, so it always lists the values the chapters
of this build carry.

Without Sphinx, ``python scripts/claims_ledger.py DIR`` prints the same ledger as Markdown from the
executed notebooks under ``DIR`` (e.g. ``_build/executed``).
"""
from __future__ import annotations

import ast
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

LEDGER_DOCNAME = "claims"
MACHINE_KEY = "chapter_machine"
MAX_VALUE_CHARS = 160


# --------------------------------------------------------------------------- reading glue


def glue_from_notebook(notebook: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The glued outputs of an executed notebook (nbformat v4 JSON), by name, in cell order.

    myst-nb's ``glue`` writes a ``display_data`` output whose metadata holds
    ``{"scrapbook": {"name": ..., "mime_prefix": ...}}``; its data keys carry the prefix, which is
    stripped here, as myst-nb does.
    """
    glue: dict[str, dict[str, Any]] = {}
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        for output in cell.get("outputs", []):
            meta = output.get("metadata", {}).get("scrapbook")
            if not meta:
                continue
            prefix = len(meta.get("mime_prefix", ""))
            glue[meta["name"]] = {"data": {k[prefix:]: v for k, v in output["data"].items()}}
    return glue


def glue_from_json(path: Path) -> dict[str, dict[str, Any]]:
    """The glued outputs myst-nb saved for one document (``<docname>.glue.json``)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def value_text(output: dict[str, Any]) -> str:
    """One line for a glued value: numbers to 6 significant figures, strings without quotes."""
    data = output.get("data", {})
    plain = data.get("text/plain")
    if plain is None:
        kinds = sorted(data)
        if any(k.startswith("image/") for k in kinds):
            return "(figure)"
        return f"({', '.join(kinds) or 'no data'})"
    if isinstance(plain, list):  # nbformat may store multi-line text as a list of lines
        plain = "".join(plain)
    try:
        value = ast.literal_eval(plain)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = plain
    if isinstance(value, bool) or value is None:
        text = str(value)
    elif isinstance(value, float):
        text = f"{value:.6g}" if math.isfinite(value) else str(value)
    elif isinstance(value, (int, str)):
        text = str(value)
    else:
        text = plain
    text = " ".join(text.split())
    if "text/html" in data and plain.lstrip().startswith(("<", " ")):
        text = "(table) " + text
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


@dataclass(frozen=True)
class ChapterClaims:
    """The ledger entry of one chapter: its glued values and the machine that computed them."""

    docname: str
    title: str
    machine: str
    rows: tuple[tuple[str, str], ...]  # (name, value) in the order the chapter glued them


def chapter_claims(docname: str, title: str, glue: dict[str, dict[str, Any]]) -> ChapterClaims:
    """Turn one chapter's glue data into its ledger entry."""
    rows = tuple((name, value_text(output)) for name, output in glue.items())
    machine = dict(rows).get(MACHINE_KEY, "not recorded (the chapter glues no chapter_machine)")
    return ChapterClaims(docname, title, machine, rows)


def ledger_markdown(chapters: Iterable[ChapterClaims]) -> str:
    """The ledger as Markdown: one section and table per chapter."""

    def cell(text: str) -> str:
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "'")

    lines: list[str] = []
    for ch in chapters:
        lines += [f"## {ch.title}", "", f"Chapter `{ch.docname}`, computed on {ch.machine}.", "",
                  "| Name | Value |", "|---|---|"]
        lines += [f"| `{cell(name)}` | {cell(value)} |" for name, value in ch.rows]
        lines.append("")
    return "\n".join(lines)


def claims_from_executed(folder: Path) -> list[ChapterClaims]:
    """Ledger entries for every executed notebook under ``folder``, in path (= book) order."""
    folder = Path(folder)
    chapters = []
    for path in sorted(folder.rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        glue = glue_from_notebook(json.loads(path.read_text(encoding="utf-8")))
        if glue:
            docname = path.relative_to(folder).with_suffix("").as_posix()
            chapters.append(chapter_claims(docname, docname, glue))
    return chapters


# --------------------------------------------------------------------------- Sphinx


def _ledger_nodes(env: Any, chapters: list[ChapterClaims]) -> list[Any]:
    from docutils import nodes
    from sphinx import addnodes

    def table(header: tuple[str, ...], rows: Iterable[tuple[Any, ...]], widths: tuple[int, ...]):
        tgroup = nodes.tgroup(cols=len(header))
        for width in widths:
            tgroup += nodes.colspec(colwidth=width)
        head, body = nodes.thead(), nodes.tbody()
        for part, content in ((head, [header]), (body, rows)):
            for row in content:
                row_node = nodes.row()
                for item in row:
                    entry = nodes.entry()
                    entry += item if isinstance(item, nodes.Node) else nodes.paragraph(text=item)
                    row_node += entry
                part += row_node
        tgroup += head
        tgroup += body
        return nodes.table("", tgroup, classes=["claims-ledger"])

    def link(ch: ChapterClaims) -> Any:
        xref = addnodes.pending_xref("", refdomain="std", reftype="doc", refexplicit=True,
                                     reftarget="/" + ch.docname, refdoc=env.docname,
                                     refwarn=True)
        xref += nodes.inline(text=ch.title)
        return nodes.paragraph("", "", xref)

    summary = table(("Chapter", "Glued values", "Computed on"),
                    [(link(ch), str(len(ch.rows)), ch.machine) for ch in chapters], (45, 10, 45))
    out = [summary]
    for ch in chapters:
        section = nodes.section(ids=[nodes.make_id(f"claims {ch.docname}")])
        section += nodes.title(text=ch.title)
        para = nodes.paragraph(text="Computed on " + ch.machine + ". ")
        xref = addnodes.pending_xref("", refdomain="std", reftype="doc", refexplicit=True,
                                     reftarget="/" + ch.docname, refdoc=env.docname,
                                     refwarn=True)
        xref += nodes.inline(text="Read the chapter")
        para += xref
        para += nodes.Text(".")
        section += para
        section += table(("Name", "Value"),
                         [(nodes.paragraph("", "", nodes.literal(text=name)), value)
                          for name, value in ch.rows], (40, 60))
        out.append(section)
    return out


def _collect(env: Any) -> list[ChapterClaims]:
    """Every document of this build that myst-nb saved glue data for, in book (path) order."""
    folder = Path(env.mystnb_config.output_folder)
    chapters = []
    for docname in sorted(env.found_docs):
        if docname == LEDGER_DOCNAME:
            continue
        path = folder.joinpath(*docname.split("/")[:-1], docname.split("/")[-1] + ".glue.json")
        if not path.exists():
            continue
        title = env.titles[docname].astext() if docname in env.titles else docname
        chapters.append(chapter_claims(docname, title, glue_from_json(path)))
    return chapters


def setup(app: Any) -> dict[str, Any]:
    """Register the ``claims-ledger`` directive; read the ledger page last, on every build."""
    from sphinx.util.docutils import SphinxDirective

    class ClaimsLedger(SphinxDirective):
        """``{claims-ledger}``: the summary table and one table of glued values per chapter."""

        has_content = False

        def run(self) -> list[Any]:
            chapters = _collect(self.env)
            if not chapters:
                raise self.error("claims-ledger: no chapter's glue data found in "
                                 f"{self.env.mystnb_config.output_folder}; is myst_nb loaded and "
                                 "are the chapters executed?")
            return _ledger_nodes(self.env, chapters)

    def read_ledger_last(app: Any, env: Any, docnames: list[str]) -> None:
        if LEDGER_DOCNAME in docnames:
            docnames.remove(LEDGER_DOCNAME)
            docnames.append(LEDGER_DOCNAME)

    def always_outdated(app: Any, env: Any, added: set, changed: set, removed: set) -> list[str]:
        return [LEDGER_DOCNAME] if LEDGER_DOCNAME in env.found_docs else []

    app.add_directive("claims-ledger", ClaimsLedger)
    app.connect("env-before-read-docs", read_ledger_last)
    app.connect("env-get-outdated", always_outdated)
    # Reading in parallel could read the ledger before the chapters: read serially.
    return {"version": "1", "parallel_read_safe": False, "parallel_write_safe": True}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(ledger_markdown(claims_from_executed(Path(sys.argv[1]))))
