"""Write the one setup cell into every chapter, and the repository's URL wherever the book names it.

    python scripts/setup_cell.py            # rewrite what differs; prints what it changed
    python scripts/setup_cell.py --check    # change nothing; exit 1 if anything differs

The repository's URL and branch have one source: ``repository.url`` and ``repository.branch`` in
``_config.yml`` (Jupyter Book's launch buttons read them there too). From them this script writes

- the setup cell (cell 1 of every chapter, tagged ``hide-input``) from :data:`TEMPLATE`;
- the GitHub, Colab and Binder addresses in README.md and intro.md.

Only that cell and those addresses change; every other cell and the files' JSON formatting stay as
they are (nbformat's layout: indent 1, non-ASCII kept, trailing newline): it is safe to rerun while
other cells are being edited. tests/test_reader_paths.py fails when a chapter's cell or an address
differs from what this script would write.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CLONE_DIR = "llms-executed"  # the folder the cell clones into, whatever the repository is called
SETUP_INDEX = 1  # the setup cell's position: after the title, before the resource card
MARKDOWN_FILES = ("README.md", "intro.md")

TEMPLATE = """\
# Setup: in Colab, fetch the book's repository and install what Colab lacks (Colab's own torch is
# left alone); on your machine this only finds the repository so that `import utils` works.
# Written by scripts/setup_cell.py from _config.yml: edit the template there, never this cell.
import pathlib, sys

if "google.colab" in sys.modules and not pathlib.Path("{clone_dir}/.colab-ready").exists():
    get_ipython().system(  # noqa: F821 -- Colab's IPython shows the install log as it runs
        "rm -rf {clone_dir} && git clone -q --depth 1 --branch {branch}"
        " {url} {clone_dir}"
        " && bash {clone_dir}/scripts/colab_setup.sh && touch {clone_dir}/.colab-ready")
    if not pathlib.Path("{clone_dir}/.colab-ready").exists():
        raise RuntimeError("Colab setup failed: see the log above, then run this cell again.")
here = pathlib.Path.cwd().resolve()
candidates = [here, *here.parents, here / "{clone_dir}"]
root = next((p for p in candidates if (p / "utils" / "__init__.py").exists()), None)
if root is None:
    raise RuntimeError("Run this notebook in the book's repository (or Colab): utils/ not found.")
sys.path.insert(0, str(root))
# utils first, before any library: its filters for harmless import-time warnings hold everywhere
import utils  # noqa: E402,F401"""

# Where the repository's owner/name (group "slug") and branch (group "branch") appear in an address.
# README.md and intro.md name no other GitHub repository (the bibliography holds those).
_ADDRESSES = (
    re.compile(r"colab\.research\.google\.com/github/"
               r"(?P<slug>[\w.-]+/[\w.-]+)/blob/(?P<branch>[\w.-]+)"),
    re.compile(r"mybinder\.org/v2/gh/(?P<slug>[\w.-]+/[\w.-]+)/(?P<branch>[\w.-]+)"),
    re.compile(r"github\.com/(?P<slug>[\w.-]+/[\w.-]+)/(?:blob|tree)/(?P<branch>[\w.-]+)"),
    re.compile(r"github\.com/(?P<slug>[\w.-]+/[\w.-]+?)(?=[/)\s`\"'>]|$)"),
)


def repository(config: Path = ROOT / "_config.yml") -> tuple[str, str]:
    """``(url, branch)`` from ``_config.yml``'s ``repository``: the one place to change them."""
    repo = (yaml.safe_load(config.read_text()) or {}).get("repository") or {}
    url, branch = str(repo.get("url", "")).rstrip("/"), str(repo.get("branch", "main"))
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise SystemExit(f"{config}: repository.url must be https://github.com/<owner>/<name>,"
                         f" got {url!r}")
    return url, branch


def setup_cell_source(url: str, branch: str) -> str:
    """The setup cell's code for a repository URL and branch."""
    return TEMPLATE.format(url=url, branch=branch, clone_dir=CLONE_DIR)


def chapters() -> list[Path]:
    return sorted(ROOT.glob("chapters/*/*.ipynb"))


def setup_cell(notebook: dict, path: Path) -> dict:
    """The chapter's setup cell, checked to be the cell this script owns."""
    cells = notebook.get("cells", [])
    cell = cells[SETUP_INDEX] if len(cells) > SETUP_INDEX else {}
    source = "".join(cell.get("source", []))
    if cell.get("cell_type") != "code" or not source.startswith("# Setup:"):
        raise SystemExit(f"{path}: cell {SETUP_INDEX} is not the setup cell (a code cell starting"
                         " '# Setup:'); put it back after the title, then rerun.")
    return cell


def _lines(text: str) -> list[str]:
    """A source string as nbformat stores it: lines, each but the last ending in a newline."""
    return text.splitlines(keepends=True)


def with_setup_cell(text: str, source: str, path: Path) -> str:
    """A notebook's JSON text with its setup cell made ``source`` (tagged hide-input)."""
    notebook = json.loads(text)
    cell = setup_cell(notebook, path)
    tags = cell.setdefault("metadata", {}).get("tags", [])
    if "".join(cell["source"]) == source and "hide-input" in tags:
        return text
    cell["source"] = _lines(source)
    cell["metadata"]["tags"] = tags if "hide-input" in tags else [*tags, "hide-input"]
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def write_chapter(path: Path, source: str, check: bool) -> bool:
    """Make the chapter's setup cell ``source``; True if it differed (``check``: write nothing)."""
    text = path.read_text(encoding="utf-8")
    updated = with_setup_cell(text, source, path)
    if updated != text and not check:
        path.write_text(updated, encoding="utf-8")
    return updated != text


def addresses(text: str, url: str, branch: str) -> str:
    """``text`` with every GitHub, Colab and Binder address pointing at ``url`` (and ``branch``)."""
    wanted = {"slug": url.removeprefix("https://github.com/"), "branch": branch}

    def point(match: re.Match) -> str:
        out, last = [], match.start()
        for group in ("slug", "branch"):
            if group in match.re.groupindex:
                out += [match.string[last:match.start(group)], wanted[group]]
                last = match.end(group)
        return "".join(out) + match.string[last:match.end()]

    for pattern in _ADDRESSES:
        text = pattern.sub(point, text)
    return text


def repository_addresses(text: str) -> set[tuple[str, str | None]]:
    """Every ``(owner/name, branch or None)`` that an address in ``text`` names."""
    found = set()
    for pattern in _ADDRESSES:
        for match in pattern.finditer(text):
            branch = match.group("branch") if "branch" in pattern.groupindex else None
            found.add((match.group("slug"), branch))
    return found


def main(argv: list[str]) -> int:
    check = "--check" in argv
    url, branch = repository()
    source = setup_cell_source(url, branch)
    changed = [p for p in chapters() if write_chapter(p, source, check)]
    for name in MARKDOWN_FILES:
        path = ROOT / name
        text = path.read_text(encoding="utf-8")
        if addresses(text, url, branch) != text:
            changed.append(path)
            if not check:
                path.write_text(addresses(text, url, branch), encoding="utf-8")
    verb = "differ from" if check else "rewritten for"
    for path in changed:
        print(f"{path.relative_to(ROOT)}: {verb} {url} ({branch})")
    if not changed:
        print(f"every setup cell and address already matches {url} ({branch})")
    return 1 if check and changed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
