"""The retrieval toolkit of Part 5: chunking, BM25, dense and hybrid search, reranking, evaluation.

Everything a retrieval-augmented pipeline needs before the language model sees a word:

- :class:`Chunk` and :class:`Hit`, the two records every function passes around;
- chunkers: :func:`sections_as_chunks` (one chunk per documentation section), :func:`chunk_fixed`
  (fixed windows of words, optionally overlapping), :func:`chunk_recursive` (split at headings, then
  paragraphs, then sentences, then words, and merge neighbours up to a size);
- :func:`load_folder`, a reader's own ``.txt``/``.md``/``.html`` files as documents;
- structure-aware loading (chapter 5-05): :func:`markdown_sections` and :func:`html_sections` read a
  document into :class:`Section` units that keep their heading path (page > section > entry), with
  definition-list and API entries as their own units and code blocks whole; :func:`chunk_sections`
  splits at headings, never merges across them, puts the heading path in the chunk's ``title``
  ("contextual chunk headers"), and with a ``tokenizer`` splits any chunk the embedder would
  truncate; :func:`overlong_chunks` flags those a chunking left too long;
- indexes with one interface, ``search(query, k=10, allowed_groups=None) -> list[Hit]``:
  :class:`BM25Index` (lexical), :class:`DenseIndex` (all-MiniLM-L6-v2 embeddings, cached on disk by
  :func:`utils.embed.embed_texts`), :class:`HybridIndex` (reciprocal rank fusion, :func:`rrf_fuse`,
  or score-normalised weighted fusion, :func:`weighted_fuse`) and :class:`RerankedIndex` (any index
  followed by a reranker, see :func:`rerank`); :func:`recommended_index` builds the toolkit's default
  configuration (chosen on the FAQ's training questions, checked on the man-page test split);
- prompts for a language model on either side of retrieval (chapter 5-05): :func:`doc2query_prompt`
  (a synthetic question for a passage, to fine-tune an embedder), :func:`hyde_prompt` (a hypothetical
  answer passage to search with) and :func:`multiquery_prompt` (a rewrite of the question), each
  with its forced reply opening in :data:`QUERY_PREFIXES`;
- evaluation: :func:`evaluate_retrieval` (recall@k and MRR at the *passage* level when questions
  carry gold passages, else the document level; the result says which) and
  :func:`first_relevant_ranks` (per question, for paired comparisons).

Conventions, decided once here so that every chapter agrees:

- **Sizes are counted in words** (runs of non-space characters, :func:`count_words`) unless an
  argument says ``tokens``. all-MiniLM-L6-v2 counts WordPiece tokens, about 1.6 per word on the
  Python docs, and truncates at 256 of them: :class:`DenseIndex` warns when it embeds chunks longer
  than that, and :func:`chunk_sections` given the tokenizer never makes one.
- **What is indexed** for a chunk is :func:`embedding_text`: its ``title`` (heading context), a blank
  line, then its ``text``. BM25 indexes the same string, so both retrievers see the same words.
  :func:`sections_as_chunks` uses the *page* title as ``title``, not the section heading: in the FAQ the
  section heading *is* the question, and indexing it would leak the held-out questions into the index.
- **BM25 tokens** are :func:`tokenize`: lower-cased runs of word characters (``re.findall(r"\\w+",
  text.lower())``), one rule for documents and queries. ``__init__`` stays one token, ``os.path``
  becomes ``os`` and ``path``. No stemming, no stop words.
- **Duplicates**: indexes keep every chunk they are given; two chunks with identical text get identical
  scores and both are returned (the earlier one first). Remove them before indexing with
  :func:`deduplicate_chunks`, or let :func:`load_folder` skip duplicate files (its default).
- **Access control**: ``allowed_groups=None`` means no filter; otherwise only chunks whose ``groups``
  intersect ``allowed_groups`` are scored and ranked. The filter is applied *before* the top-k, so a
  restricted reader still gets ``k`` hits whenever ``k`` readable chunks exist, and a chunk outside the
  groups is never returned, however well it matches.
- Bad input fails early with a message that says what to do: an empty corpus (at construction), a
  blank query, ``k < 1``. ``k`` larger than the corpus returns every (readable) chunk.
"""
from __future__ import annotations

import re
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from scipy import sparse

from utils.checks import check_positive_int

__all__ = [
    "BM25Index",
    "Chunk",
    "DEFAULT_FUSION",
    "DenseIndex",
    "HEADER_SEPARATOR",
    "Hit",
    "HybridIndex",
    "LEVELS",
    "QUERY_PREFIXES",
    "RerankedIndex",
    "RetrievalScores",
    "SPAN_MATCH_TOKENS",
    "Section",
    "chunk_fixed",
    "chunk_recursive",
    "chunk_sections",
    "count_words",
    "deduplicate_chunks",
    "doc2query_prompt",
    "embedding_text",
    "evaluate_retrieval",
    "first_relevant_ranks",
    "html_sections",
    "hyde_prompt",
    "is_relevant",
    "load_folder",
    "markdown_sections",
    "multiquery_prompt",
    "overlong_chunks",
    "recommended_index",
    "rerank",
    "rrf_fuse",
    "sections_as_chunks",
    "split_recursive",
    "tokenize",
    "weighted_fuse",
]

PUBLIC = frozenset({"public"})


@dataclass(frozen=True)
class Chunk:
    """A piece of a document that retrieval returns as a whole.

    ``chunk_id`` is unique within an index (``f"{doc_id}#{i}"``); ``doc_id`` names the source
    document (a relevant chunk is one whose ``doc_id`` is the gold one); ``title`` is heading context
    that :func:`embedding_text` puts before the text; ``groups`` says who may read the chunk.
    """

    chunk_id: str
    doc_id: str
    text: str
    title: str = ""
    groups: frozenset[str] = field(default=PUBLIC)

    def __post_init__(self) -> None:
        for name in ("chunk_id", "doc_id", "text", "title"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"Chunk.{name} must be a str, got {type(getattr(self, name)).__name__}")
        if not self.chunk_id:
            raise ValueError("Chunk.chunk_id must not be empty: give every chunk a unique id")
        object.__setattr__(self, "groups", _as_groups(self.groups, "Chunk.groups"))


@dataclass(frozen=True)
class Hit:
    """One search result: the chunk, its score under the index that found it, and its 1-based rank."""

    chunk: Chunk
    score: float
    rank: int


# ---------------------------------------------------------------------------------------- text rules

_WORD = re.compile(r"\w+")
_NONSPACE = re.compile(r"\S+")


def tokenize(text: str) -> list[str]:
    """BM25's tokens: lower-cased runs of letters, digits and underscores (``\\w+``).

    >>> tokenize("How do I use os.path.join() in Python 3?")
    ['how', 'do', 'i', 'use', 'os', 'path', 'join', 'in', 'python', '3']
    """
    if not isinstance(text, str):
        raise TypeError(f"tokenize takes a str, got {type(text).__name__}")
    return _WORD.findall(text.lower())


def count_words(text: str) -> int:
    """The size unit of every chunker here: the number of runs of non-space characters."""
    return len(_NONSPACE.findall(text))


def embedding_text(chunk: Chunk) -> str:
    """The exact string that :class:`DenseIndex` embeds and :class:`BM25Index` tokenizes for a chunk:
    ``title``, a blank line, ``text`` (just ``text`` when the title is empty). Embed these strings with
    :func:`utils.embed.embed_texts` and the disk cache is shared with every index built on them."""
    if not isinstance(chunk, Chunk):
        raise TypeError(f"embedding_text takes a Chunk, got {type(chunk).__name__}")
    return f"{chunk.title}\n\n{chunk.text}" if chunk.title else chunk.text


def _as_groups(groups: object, what: str) -> frozenset[str]:
    if isinstance(groups, str):
        return frozenset({groups})
    try:
        out = frozenset(groups)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be a str or an iterable of str, got {type(groups).__name__}") from None
    if not all(isinstance(g, str) for g in out):
        raise TypeError(f"{what} must contain only str group names, got {sorted(map(repr, out))}")
    return out


# ------------------------------------------------------------------------------------------ chunkers

def _check_docs(docs: Iterable[Mapping], fn: str) -> list[Mapping]:
    if isinstance(docs, Mapping):
        raise TypeError(f"{fn} takes a list of documents; wrap a single one as [doc]")
    docs = list(docs)
    for i, doc in enumerate(docs):
        if not isinstance(doc, Mapping) or "doc_id" not in doc or "text" not in doc:
            raise ValueError(f"{fn}: document {i} must be a dict with 'doc_id' and 'text' keys "
                             "(and optionally 'title' and 'groups')")
        if not isinstance(doc["text"], str):
            raise TypeError(f"{fn}: document {i} ({doc['doc_id']!r}) has a non-str text")
    return docs


def _doc_groups(doc: Mapping, groups: object) -> frozenset[str]:
    if groups is not None:
        return _as_groups(groups(doc) if callable(groups) else groups, "groups")
    return _as_groups(doc.get("groups", PUBLIC), f"groups of {doc['doc_id']!r}")


def sections_as_chunks(records: Iterable[Mapping], groups: object = None) -> list[Chunk]:
    """One chunk per record of :func:`utils.embed.docs_corpus` (or any dicts with ``doc_id``,
    ``text`` and optionally ``title``): ``chunk_id = f"{doc_id}#0"``, ``title`` = the page title.

    ``groups``: ``None`` keeps each record's own ``"groups"`` (default ``{"public"}``); a str or a set
    of str gives every chunk those groups; a function ``record -> groups`` decides per record.
    Records with blank text are skipped.
    """
    docs = _check_docs(records, "sections_as_chunks")
    return [Chunk(f"{d['doc_id']}#0", str(d["doc_id"]), d["text"], str(d.get("title", "")),
                  _doc_groups(d, groups))
            for d in docs if d["text"].strip()]


def chunk_fixed(docs: Iterable[Mapping], size: int, overlap: int = 0, groups: object = None) -> list[Chunk]:
    """Cut each document into windows of ``size`` words, each starting ``size - overlap`` words after
    the previous one (the last window may be shorter). A window keeps the original text between its
    first and last word, line breaks included. ``groups`` as in :func:`sections_as_chunks`."""
    docs = _check_docs(docs, "chunk_fixed")
    check_positive_int("size", size)
    check_positive_int("overlap", overlap, minimum=0)
    if overlap >= size:
        raise ValueError(f"overlap ({overlap}) must be smaller than size ({size}), or windows never advance")
    chunks = []
    for d in docs:
        spans = [m.span() for m in _NONSPACE.finditer(d["text"])]
        title, grp = str(d.get("title", "")), _doc_groups(d, groups)
        for i, start in enumerate(range(0, len(spans), size - overlap)):
            window = spans[start:start + size]
            text = d["text"][window[0][0]:window[-1][1]]
            chunks.append(Chunk(f"{d['doc_id']}#{i}", str(d["doc_id"]), text, title, grp))
            if start + size >= len(spans):
                break
    return chunks


#: Split points of :func:`chunk_recursive`, coarsest first: before a Markdown heading line, at blank
#: lines (paragraphs), after sentence-ending punctuation. Below sentences come fixed word windows.
RECURSIVE_SEPARATORS: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"\n(?=#{1,6}\s)"), "\n"),
    (re.compile(r"\n[ \t]*\n\s*"), "\n\n"),
    (re.compile(r"(?<=[.!?])\s+"), " "),
)


def split_recursive(text: str, max_words: int, level: int = 0) -> list[str]:
    """``text`` cut into pieces of at most ``max_words`` words: at Markdown headings, then blank
    lines, then sentence ends, then word windows (``level`` is the separator to try first), with
    neighbouring pieces merged while they fit; the splitter behind :func:`chunk_recursive`."""
    n_words = count_words(text)
    if n_words <= max_words:
        return [text]
    if level == len(RECURSIVE_SEPARATORS):  # a single sentence too long: fixed word windows
        spans = [m.span() for m in _NONSPACE.finditer(text)]
        return [text[spans[i][0]:spans[min(i + max_words, len(spans)) - 1][1]]
                for i in range(0, len(spans), max_words)]
    pattern, joiner = RECURSIVE_SEPARATORS[level]
    parts = [p.strip() for p in pattern.split(text) if p.strip()]
    if len(parts) == 1:
        return split_recursive(text, max_words, level + 1)
    merged: list[str] = []  # greedily merge neighbouring pieces while they fit
    merged_words = 0
    for piece in (q for p in parts for q in split_recursive(p, max_words, level + 1)):
        words = count_words(piece)
        if merged and merged_words + words <= max_words:
            merged[-1] = merged[-1] + joiner + piece
            merged_words += words
        else:
            merged.append(piece)
            merged_words = words
    return merged


def chunk_recursive(docs: Iterable[Mapping], max_tokens: int, groups: object = None) -> list[Chunk]:
    """Structure-aware chunks of at most ``max_tokens`` words: a document that fits stays whole;
    one that does not is split at Markdown headings, then pieces still too long at blank lines
    (paragraphs), then at sentence ends, then into word windows; finally neighbouring pieces are
    merged while they fit. Pieces are stripped and rejoined with a newline (headings), a blank line
    (paragraphs) or a space (sentences). ``groups`` as in :func:`sections_as_chunks`."""
    docs = _check_docs(docs, "chunk_recursive")
    check_positive_int("max_tokens", max_tokens)
    chunks = []
    for d in docs:
        if not d["text"].strip():
            continue
        title, grp = str(d.get("title", "")), _doc_groups(d, groups)
        for i, text in enumerate(split_recursive(d["text"].strip(), max_tokens, 0)):
            chunks.append(Chunk(f"{d['doc_id']}#{i}", str(d["doc_id"]), text, title, grp))
    return chunks


def _normalized(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def deduplicate_chunks(chunks: Iterable[Chunk]) -> list[Chunk]:
    """Drop every chunk whose title and text (Unicode-normalised, whitespace collapsed) equal an
    earlier chunk's; the first one is kept."""
    seen: set[tuple[str, str]] = set()
    out = []
    for c in chunks:
        key = (_normalized(c.title), _normalized(c.text))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


# ------------------------------------------------------------------------- structure-aware loading

#: What joins the parts of a heading path in a chunk's title: ``"open(2) > ERRORS > EACCES"``.
HEADER_SEPARATOR = " > "

_HEADING_MD = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_DEFINITION = re.compile(r"^:\s+")


@dataclass(frozen=True)
class Section:
    """One unit of a structured document: its heading ``path`` (page first, then sections, then
    the entry's term for a definition-list or API entry), its ``text`` (headings not repeated) and
    its ``kind``, ``"section"`` or ``"entry"``."""

    path: tuple[str, ...]
    text: str
    kind: str = "section"


class _SectionBuilder:
    """Collects text under the current heading path and emits a :class:`Section` at each break."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.headings: list[tuple[int, str]] = []
        self.entry: tuple[str, ...] = ()
        self.lines: list[str] = []
        self.kind = "section"
        self.units: list[Section] = []

    def path(self) -> tuple[str, ...]:
        heads = tuple(h for _, h in self.headings)
        root = () if (self.headings and self.headings[0][0] == 1) or not self.title else (self.title,)
        return root + heads + self.entry

    def flush(self) -> None:
        text = "\n".join(self.lines).strip()
        text = re.sub(r"\n{3,}", "\n\n", text)
        if text:
            self.units.append(Section(self.path(), text, self.kind))
        self.lines, self.entry, self.kind = [], (), "section"

    def heading(self, level: int, text: str) -> None:
        self.flush()
        self.headings = [(lv, h) for lv, h in self.headings if lv < level] + [(level, text)]

    def start_entry(self, term: str) -> None:
        self.flush()
        self.entry, self.kind = (term,), "entry"


def markdown_sections(text: str, title: str = "") -> list[Section]:
    """Markdown as :class:`Section` units that keep their heading path.

    ATX headings (``#`` to ``######``) open sections; a level-1 heading is the page (else ``title``
    is). A definition-list entry -- a term line followed by a line starting with ``": "``, its
    indented or blank-separated continuation lines included -- is a unit of its own whose path ends
    with the term. Fenced code blocks (`````` ``` `````` or ``~~~``) are kept whole and never
    read as headings. Text before the first heading belongs to the page.
    """
    if not isinstance(text, str):
        raise TypeError(f"markdown_sections takes the document's text as a str, got {type(text).__name__}")
    b = _SectionBuilder(str(title))
    lines = text.split("\n")
    in_code = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if _FENCE.match(line):
            in_code = not in_code
            b.lines.append(line)
        elif in_code:
            b.lines.append(line)
        elif (m := _HEADING_MD.match(line)):
            b.heading(len(m.group(1)), m.group(2))
        elif (line.strip() and i + 1 < len(lines) and _DEFINITION.match(lines[i + 1])
              and not _DEFINITION.match(line)):
            b.start_entry(line.strip())
            b.lines.append(_DEFINITION.sub("", lines[i + 1]))
            i += 2
            while i < len(lines):  # continuation: blank lines, indented lines, further ": " lines
                nxt = lines[i]
                if nxt.strip() and not nxt.startswith((" ", "\t")) and not _DEFINITION.match(nxt):
                    break
                b.lines.append(_DEFINITION.sub("", nxt).strip() if nxt.strip() else "")
                i += 1
            b.flush()
            continue
        else:
            b.lines.append(line)
        i += 1
    b.flush()
    return b.units


_BLOCK_TAGS = frozenset("p div section article main li ul ol table tr blockquote figure header footer "
                        "aside form body html".split())
_SKIP_TAGS = frozenset("script style nav noscript template head".split())


def html_sections(html: str, title: str = "") -> list[Section]:
    """HTML as :class:`Section` units that keep their heading path.

    ``<h1>``-``<h6>`` open sections (``<h1>`` is the page, else ``title``; with neither, the
    ``<title>`` element); each ``<dt>``/``<dd>`` pair of a definition list -- Sphinx's API entries
    (``<dl class="py function">``) are such lists -- is a unit whose path ends with the ``<dt>``
    text, nested entries (a class's methods) one level deeper; ``<pre>`` blocks are kept whole as
    fenced code; scripts, styles and navigation are dropped.
    """
    from bs4 import BeautifulSoup, NavigableString, Tag

    if not isinstance(html, str):
        raise TypeError(f"html_sections takes the page's HTML as a str, got {type(html).__name__}")
    soup = BeautifulSoup(html, "html.parser")
    if not title and soup.title and soup.title.string:
        title = soup.title.string.strip()
    b = _SectionBuilder(str(title))

    def inline(el) -> str:
        return " ".join(el.get_text(" ").split())

    def walk(el, entry: tuple[str, ...]) -> None:
        for child in el.children:
            if isinstance(child, NavigableString):
                words = " ".join(str(child).split())
                if words and child.__class__.__name__ == "NavigableString":
                    b.lines.append(words)
                continue
            if not isinstance(child, Tag) or child.name in _SKIP_TAGS:
                continue
            if re.fullmatch(r"h[1-6]", child.name):
                b.heading(int(child.name[1]), inline(child).rstrip("¶").strip())
                b.entry = entry
            elif child.name == "pre":
                b.lines.append(f"\n```\n{child.get_text().strip(chr(10))}\n```\n")
            elif child.name == "dl":
                term: tuple[str, ...] | None = None
                for item in child.find_all(["dt", "dd"], recursive=False):
                    if item.name == "dt":
                        term = entry + (inline(item).rstrip("¶").strip(),)
                    else:
                        b.flush()
                        b.entry, b.kind = term or entry, "entry"
                        walk(item, term or entry)
                        b.flush()
                        b.entry = entry
            elif child.name in _BLOCK_TAGS:
                b.lines.append("")
                walk(child, entry)
                b.lines.append("")
            else:
                b.lines.append(inline(child))

    walk(soup.body or soup, ())
    b.flush()
    joined = []
    for unit in b.units:  # inline pieces were appended one per line: join them into paragraphs
        paragraphs = [" ".join(p.split("\n")) if "```" not in p else p
                      for p in re.split(r"\n\s*\n", unit.text)]
        joined.append(Section(unit.path, "\n\n".join(p.strip() for p in paragraphs if p.strip()),
                              unit.kind))
    return joined


def _blocks(text: str) -> list[str]:
    """Paragraphs of ``text`` split at blank lines, with each fenced code block one block."""
    blocks, current, in_code = [], [], False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_code = not in_code
        if not in_code and not line.strip() and not _FENCE.match(line):
            if current:
                blocks.append("\n".join(current))
            current = []
        else:
            current.append(line)
    if current:
        blocks.append("\n".join(current))
    return [blk.strip("\n") for blk in blocks if blk.strip()]


def _split_lines(text: str, max_words: int) -> list[str]:
    """A code block too long for one chunk, cut between lines (a single long line: word windows)."""
    pieces, current, words = [], [], 0
    for line in text.split("\n"):
        n = count_words(line)
        if current and words + n > max_words:
            pieces.append("\n".join(current))
            current, words = [], 0
        current.append(line)
        words += n
    if current:
        pieces.append("\n".join(current))
    return [q for p in pieces for q in (split_recursive(p, max_words, len(RECURSIVE_SEPARATORS))
                                        if count_words(p) > max_words else [p])]


def _split_unit(text: str, max_words: int) -> list[str]:
    """A section's text in pieces of at most ``max_words`` words: blank-line blocks (code blocks
    whole) merged greedily; a block still too long is split like :func:`split_recursive` (code
    blocks between lines)."""
    out: list[str] = []
    words = 0
    for block in _blocks(text):
        n = count_words(block)
        if n > max_words:
            parts = (_split_lines(block, max_words) if _FENCE.match(block)
                     else split_recursive(block, max_words, 1))
        else:
            parts = [block]
        for part in parts:
            n = count_words(part)
            if out and words + n <= max_words and n <= max_words:
                out[-1] += "\n\n" + part
                words += n
            else:
                out.append(part)
                words = n
    return out


HEADERS = ("path", "page", "none")


def _n_tokens(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def chunk_sections(docs: Iterable[Mapping], max_words: int = 200, *, headers: str = "path",
                   max_tokens: int | None = None, tokenizer=None, format: str = "auto",
                   merge_entries: bool = True, groups: object = None) -> list[Chunk]:
    """Structure-aware chunks: each document read into :class:`Section` units
    (:func:`markdown_sections`, or :func:`html_sections` for ``.html`` files), each unit split
    into pieces of at most ``max_words`` **words** (paragraphs merged while they fit, code blocks
    whole unless longer than that), and **never merged across headings** or entries.

    ``headers`` sets each chunk's ``title``, which :func:`embedding_text` puts before the text
    ("contextual chunk headers"): ``"path"`` (default) the whole heading path joined by
    :data:`HEADER_SEPARATOR`, ``"page"`` its first part only, ``"none"`` nothing. With ``max_tokens``
    and the embedder's ``tokenizer``, a chunk whose :func:`embedding_text` is longer than
    ``max_tokens`` **tokens** (special tokens included) is split again until every piece fits, so
    the embedder never truncates one. With ``merge_entries`` (default) neighbouring units under the
    same heading -- a section's text and its definition-list entries, each entry's text led by its
    term -- are merged while they fit in ``max_words``, so a list of one-line entries (a man page's
    ERRORS) does not become a chunk per line; ``merge_entries=False`` keeps every entry its own
    chunk, titled with its term. ``format``: ``"auto"`` (HTML when the document's ``path`` or
    ``doc_id`` ends in ``.html``/``.htm``, else Markdown), ``"markdown"`` or ``"html"``. Chunk ids are
    ``f"{doc_id}#{unit}.{piece}"``; ``doc_id`` stays the document's. ``groups`` as in
    :func:`sections_as_chunks`.
    """
    docs = _check_docs(docs, "chunk_sections")
    check_positive_int("max_words", max_words)
    if headers not in HEADERS:
        raise ValueError(f"headers must be one of {HEADERS}, got {headers!r}")
    if format not in ("auto", "markdown", "html"):
        raise ValueError(f"format must be 'auto', 'markdown' or 'html', got {format!r}")
    if (max_tokens is None) != (tokenizer is None):
        raise ValueError("pass max_tokens and tokenizer together (the embedder's tokenizer counts "
                         "the tokens), or neither")
    if max_tokens is not None:
        check_positive_int("max_tokens", max_tokens, minimum=8)
    chunks = []
    for d in docs:
        name = str(d.get("path") or d["doc_id"]).lower()
        is_html = format == "html" or (format == "auto" and name.endswith((".html", ".htm")))
        parse = html_sections if is_html else markdown_sections
        grp = _doc_groups(d, groups)
        units = parse(d["text"], str(d.get("title", "")))
        if merge_entries:
            units = _merge_entries(units, max_words)
        for j, unit in enumerate(units):
            title = {"path": HEADER_SEPARATOR.join(unit.path),
                     "page": unit.path[0] if unit.path else "", "none": ""}[headers]
            pieces = _split_unit(unit.text, max_words)
            if tokenizer is not None:
                pieces = _fit_tokens(pieces, title, tokenizer, max_tokens)
            chunks.extend(Chunk(f"{d['doc_id']}#{j}.{i}", str(d["doc_id"]), piece, title, grp)
                          for i, piece in enumerate(pieces))
    return chunks


def _merge_entries(units: list[Section], max_words: int) -> list[Section]:
    """Neighbouring units under the same heading merged while they fit (entries led by their term)."""
    out: list[Section] = []
    for unit in units:
        key = unit.path[:-1] if unit.kind == "entry" else unit.path
        text = f"{unit.path[-1]}\n{unit.text}" if unit.kind == "entry" else unit.text
        last = out[-1] if out else None
        if (last is not None and last.path == key
                and count_words(last.text) + count_words(text) <= max_words):
            out[-1] = Section(key, f"{last.text}\n\n{text}", "section")
        else:
            out.append(Section(key, text, "section"))
    return out


def _fit_tokens(pieces: list[str], title: str, tokenizer, max_tokens: int) -> list[str]:
    out: list[str] = []
    todo = list(pieces)
    while todo:
        piece = todo.pop(0)
        text = f"{title}\n\n{piece}" if title else piece
        n = _n_tokens(tokenizer, [text])[0]
        if n <= max_tokens:
            out.append(piece)
            continue
        words = count_words(piece)
        if words <= 1:
            raise ValueError(f"chunk_sections: the heading path alone ({title[:60]!r}...) is longer "
                             f"than max_tokens={max_tokens}; pass headers='page' or 'none'")
        budget = max(1, min(words - 1, int(words * max_tokens / n * 0.9)))
        todo[:0] = _split_unit(piece, budget)
    return out


def overlong_chunks(chunks: Iterable[Chunk], tokenizer, max_tokens: int = 256) -> list[Chunk]:
    """The chunks whose :func:`embedding_text` is longer than ``max_tokens`` tokens of
    ``tokenizer`` (special tokens included): what an embedder reading ``max_tokens`` would
    silently truncate. all-MiniLM-L6-v2 reads 256."""
    chunks = list(chunks)
    check_positive_int("max_tokens", max_tokens)
    if not chunks:
        return []
    counts = _n_tokens(tokenizer, [embedding_text(c) for c in chunks])
    return [c for c, n in zip(chunks, counts) if n > max_tokens]


# ------------------------------------------------------------------------------------- reader's files

def load_folder(path: str | Path, pattern: str = "**/*.txt", *, errors: str = "replace",
                deduplicate: bool = True) -> list[dict]:
    """Read a folder of text files as documents: dicts with ``doc_id`` (the path relative to the
    folder, ``/``-separated), ``title`` (the file name without its extension), ``text`` and ``path``.

    Files are read in sorted path order as UTF-8 (a byte-order mark is dropped). A file that is not
    valid UTF-8 is handled as ``errors`` says: ``"replace"`` (default) decodes it with U+FFFD for the
    bad bytes and warns, naming the file; ``"strict"`` raises :class:`UnicodeDecodeError`'s message
    as a ``ValueError`` naming the file; ``"skip"`` leaves it out with a warning. With ``deduplicate``
    (default) a file whose text equals an earlier file's (whitespace collapsed) is left out with a
    warning naming both. Empty files are kept (chunkers skip blank texts).
    """
    if errors not in ("replace", "strict", "skip"):
        raise ValueError(f"errors must be 'replace', 'strict' or 'skip', got {errors!r}")
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"load_folder: {root} is not a folder; pass the folder holding your files")
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        raise ValueError(f"load_folder: no file in {root} matches {pattern!r}; "
                         "pass pattern='**/*.md' (or '**/*') for other extensions")
    docs: list[dict] = []
    first_with: dict[str, str] = {}
    for file in files:
        rel = file.relative_to(root).as_posix()
        raw = file.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            where = f"{rel} is not valid UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r})"
            if errors == "strict":
                raise ValueError(f"load_folder: {where}. Re-save it as UTF-8, or pass errors='replace' "
                                 "to decode it with U+FFFD for the bad bytes, or errors='skip'") from err
            if errors == "skip":
                warnings.warn(f"load_folder: skipped {where}", stacklevel=2)
                continue
            warnings.warn(f"load_folder: {where}; decoded with U+FFFD replacing the bad bytes", stacklevel=2)
            text = raw.decode("utf-8-sig", errors="replace")
        key = _normalized(text)
        if deduplicate and key and key in first_with:
            warnings.warn(f"load_folder: skipped {rel}, a duplicate of {first_with[key]}", stacklevel=2)
            continue
        first_with.setdefault(key, rel)
        docs.append({"doc_id": rel, "title": file.stem, "text": text, "path": str(file)})
    return docs


# ------------------------------------------------------------------------------------------- indexes

class Index(Protocol):
    """What every index here offers (and what :func:`evaluate_retrieval` needs)."""

    def search(self, query: str, k: int = 10, allowed_groups: Iterable[str] | None = None) -> list[Hit]:
        ...


def _check_query(query: object, k: object) -> None:
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    if not query.strip():
        raise ValueError("query is empty or only whitespace: pass the question as text")
    check_positive_int("k", k)


def _check_chunks(chunks: Iterable[Chunk], cls: str) -> list[Chunk]:
    chunks = list(chunks)
    if not chunks:
        raise ValueError(f"{cls} got no chunks: build the index from at least one Chunk "
                         "(did the chunker skip every document because its text was blank?)")
    bad = [i for i, c in enumerate(chunks) if not isinstance(c, Chunk)]
    if bad:
        raise TypeError(f"{cls} takes Chunk objects; item {bad[0]} is {type(chunks[bad[0]]).__name__}")
    ids = Counter(c.chunk_id for c in chunks)
    dup = [i for i, n in ids.items() if n > 1]
    if dup:
        raise ValueError(f"{cls}: chunk_id {dup[0]!r} occurs {ids[dup[0]]} times; chunk ids must be unique")
    return chunks


class _ArrayIndex:
    """Shared top-k over a score vector, with the group filter applied before ranking."""

    def __init__(self, chunks: list[Chunk]) -> None:
        self.chunks = chunks
        self._group_masks: dict[frozenset[str], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.chunks)

    def allowed_mask(self, allowed_groups: Iterable[str] | None) -> np.ndarray | None:
        """Boolean mask of the chunks readable by ``allowed_groups`` (None: no filter)."""
        if allowed_groups is None:
            return None
        allowed = _as_groups(allowed_groups, "allowed_groups")
        if allowed not in self._group_masks:
            self._group_masks[allowed] = np.fromiter((bool(c.groups & allowed) for c in self.chunks),
                                                     dtype=bool, count=len(self.chunks))
        return self._group_masks[allowed]

    def _top_k(self, scores: np.ndarray, k: int, allowed_groups: Iterable[str] | None) -> list[Hit]:
        mask = self.allowed_mask(allowed_groups)
        candidates = np.arange(len(scores)) if mask is None else np.flatnonzero(mask)
        sub = scores[candidates]
        if k < len(sub):  # partial selection, then an exact stable sort of the few kept
            keep = np.argpartition(-sub, k - 1)[:k]
            threshold = sub[keep].min()
            keep = np.flatnonzero(sub >= threshold)  # every tie at the threshold, for a stable order
        else:
            keep = np.arange(len(sub))
        order = keep[np.argsort(-sub[keep], kind="stable")][:k]
        return [Hit(self.chunks[candidates[i]], float(sub[i]), r + 1) for r, i in enumerate(order)]


class BM25Index(_ArrayIndex):
    """Okapi BM25 over :func:`tokenize` tokens of :func:`embedding_text`, in the Lucene form that
    ``bm25s`` calls ``method="lucene"``:

    $$ s(q, d) = \\sum_{t \\in q} \\ln\\Big(1 + \\frac{N - n_t + 0.5}{n_t + 0.5}\\Big)
       \\frac{f_{t,d}}{f_{t,d} + k_1 \\big(1 - b + b\\, |d| / \\overline{|d|}\\big)} $$

    with $N$ chunks, $n_t$ of them containing $t$, $f_{t,d}$ the count of $t$ in $d$ and $|d|$ its
    length in tokens. A query term repeated counts each time (as in ``bm25s`` and ``rank_bm25``); terms
    absent from the corpus add nothing, so a query sharing no term scores 0 everywhere (hits then come
    in corpus order). Scores are precomputed per (chunk, term) in a sparse matrix, so a query costs
    one column sum per query term.
    """

    def __init__(self, chunks: Iterable[Chunk], k1: float = 1.5, b: float = 0.75) -> None:
        super().__init__(_check_chunks(chunks, "BM25Index"))
        if not k1 >= 0 or not 0 <= b <= 1:
            raise ValueError(f"need k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.k1, self.b = float(k1), float(b)
        self.vocab: dict[str, int] = {}
        rows, cols, counts, lengths = [], [], [], []
        for i, chunk in enumerate(self.chunks):
            tf = Counter(tokenize(embedding_text(chunk)))
            lengths.append(sum(tf.values()))
            for term, n in tf.items():
                rows.append(i)
                cols.append(self.vocab.setdefault(term, len(self.vocab)))
                counts.append(n)
        n_docs = len(self.chunks)
        self.doc_len = np.asarray(lengths, dtype=np.float64)
        self.avg_len = float(self.doc_len.mean()) or 1.0  # all-empty corpus: every length is 0
        rows_a, cols_a = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        tf_a = np.asarray(counts, dtype=np.float64)
        self.doc_freq = np.bincount(cols_a, minlength=len(self.vocab)).astype(np.float64)
        self.idf = np.log1p((n_docs - self.doc_freq + 0.5) / (self.doc_freq + 0.5))
        norm = self.k1 * (1 - self.b + self.b * self.doc_len[rows_a] / self.avg_len)
        weights = self.idf[cols_a] * tf_a / (tf_a + norm)
        self._weights = sparse.csc_matrix((weights, (rows_a, cols_a)), shape=(n_docs, len(self.vocab)))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every chunk for ``query`` (float64, one per chunk, in corpus order)."""
        ids = [self.vocab[t] for t in tokenize(query) if t in self.vocab]
        if not ids:
            return np.zeros(len(self.chunks))
        return np.asarray(self._weights[:, ids].sum(axis=1)).ravel()

    def search(self, query: str, k: int = 10, allowed_groups: Iterable[str] | None = None) -> list[Hit]:
        """The ``k`` best chunks for ``query`` among those readable by ``allowed_groups``."""
        _check_query(query, k)
        return self._top_k(self.scores(query), k, allowed_groups)


class DenseIndex(_ArrayIndex):
    """Cosine similarity between all-MiniLM-L6-v2 embeddings of the query and of each chunk's
    :func:`embedding_text` (unit vectors, so a dot product).

    ``embeddings``: precomputed chunk vectors (n, d), e.g. from :func:`utils.embed.embed_texts`;
    by default they are computed with it (cached on disk, truncated at ``max_length`` tokens).
    Queries are embedded with the same model (``model``/``tokenizer``, loaded on first use if not
    given) unless ``embed_query`` -- a function from a list of texts to an (n, d) array -- is passed.
    With ``cache_queries`` (default) query vectors are remembered, so searching the same question
    twice embeds it once (turn it off to time query embedding). ``model_name`` names the embedder in
    the disk cache's key: give a fine-tuned model its own name, or it would read the base model's
    vectors. When it embeds the chunks itself it counts those longer than ``max_length`` tokens
    (``n_overlong``) and, as ``on_overlong`` says, warns (default), raises or ignores it.
    """

    def __init__(self, chunks: Iterable[Chunk], embeddings: np.ndarray | None = None, *, model=None,
                 tokenizer=None, max_length: int = 256,
                 embed_query: Callable[[list[str]], np.ndarray] | None = None,
                 cache_queries: bool = True, model_name: str = "all-minilm-l6-v2",
                 on_overlong: str = "warn") -> None:
        super().__init__(_check_chunks(chunks, "DenseIndex"))
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither (then the embedder is loaded)")
        if on_overlong not in ("warn", "error", "ignore"):
            raise ValueError(f"on_overlong must be 'warn', 'error' or 'ignore', got {on_overlong!r}")
        self._model, self._tokenizer, self.max_length = model, tokenizer, max_length
        self._embed_query, self.cache_queries = embed_query, cache_queries
        self.model_name = model_name
        self.n_overlong: int | None = None  # chunks longer than max_length tokens (None: not counted)
        if embeddings is None:
            from utils.embed import embed_texts

            self._load()
            self._check_overlong(on_overlong)
            embeddings = embed_texts([embedding_text(c) for c in self.chunks], model=self._model,
                                     tokenizer=self._tokenizer, max_length=max_length,
                                     model_name=model_name, desc="embedding chunks")
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(self.chunks):
            raise ValueError(f"embeddings must have shape ({len(self.chunks)}, d), one row per chunk; "
                             f"got {embeddings.shape}")
        self.embeddings = embeddings
        self._query_cache: dict[str, np.ndarray] = {}

    def _load(self) -> None:
        if self._model is None and self._embed_query is None:
            from utils.models import load_embedder

            self._model, self._tokenizer = load_embedder()

    def _check_overlong(self, on_overlong: str) -> None:
        """Count the chunks the embedder would truncate; warn or raise as ``on_overlong`` says."""
        if self._tokenizer is None:
            return
        self.n_overlong = len(overlong_chunks(self.chunks, self._tokenizer, self.max_length))
        if self.n_overlong and on_overlong != "ignore":
            message = (f"DenseIndex: {self.n_overlong:,} of {len(self.chunks):,} chunks are longer than "
                       f"max_length={self.max_length} tokens and only their beginning is embedded; "
                       f"split them with chunk_sections(..., max_tokens={self.max_length}, "
                       "tokenizer=...) or pass on_overlong='ignore'")
            if on_overlong == "error":
                raise ValueError(message)
            warnings.warn(message, stacklevel=3)

    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        """Query vectors, (len(queries), d), embedding only those not seen before (in one batch)."""
        new = [q for q in dict.fromkeys(queries) if q not in self._query_cache]
        if new:
            if self._embed_query is not None:
                vectors = np.asarray(self._embed_query(new), dtype=np.float32)
            else:
                from utils.embed import embed_texts

                self._load()
                vectors = embed_texts(new, model=self._model, tokenizer=self._tokenizer,
                                      max_length=self.max_length, model_name=self.model_name,
                                      cache=False, desc=None)
            if vectors.shape != (len(new), self.embeddings.shape[1]):
                raise ValueError(f"query embeddings have shape {vectors.shape}, expected "
                                 f"({len(new)}, {self.embeddings.shape[1]}) like the chunk embeddings")
            if not self.cache_queries:
                found = dict(zip(new, vectors))
                return np.stack([found[q] for q in queries])
            self._query_cache.update(zip(new, vectors))
        return np.stack([self._query_cache[q] for q in queries])

    def scores(self, query: str) -> np.ndarray:
        """Cosine similarity of every chunk to ``query``."""
        return self.embeddings @ self.embed_queries([query])[0]

    def search(self, query: str, k: int = 10, allowed_groups: Iterable[str] | None = None) -> list[Hit]:
        """The ``k`` chunks most similar to ``query`` among those readable by ``allowed_groups``."""
        _check_query(query, k)
        return self._top_k(self.scores(query), k, allowed_groups)


def rrf_fuse(rankings: Sequence[Sequence[Hit]], k_rrf: float = 60, k: int | None = None,
             weights: Sequence[float] | None = None) -> list[Hit]:
    """Reciprocal rank fusion of several ranked lists of hits, matched by ``chunk_id``:

    $$ \\mathrm{RRF}(d) = \\sum_{i} \\frac{w_i}{k_{\\mathrm{rrf}} + \\mathrm{rank}_i(d)} $$

    (a list that does not contain $d$ adds nothing; ``weights`` $w_i$ default to 1). Ties keep the
    order of first appearance."""
    if k_rrf < 0:
        raise ValueError(f"k_rrf must be >= 0, got {k_rrf}")
    weights = _check_weights(weights, len(rankings))
    fused: dict[str, float] = {}
    first: dict[str, Chunk] = {}
    for w, hits in zip(weights, rankings):
        for h in hits:
            fused[h.chunk.chunk_id] = fused.get(h.chunk.chunk_id, 0.0) + w / (k_rrf + h.rank)
            first.setdefault(h.chunk.chunk_id, h.chunk)
    order = sorted(fused, key=lambda cid: -fused[cid])  # sorted() is stable
    return [Hit(first[cid], fused[cid], r + 1) for r, cid in enumerate(order[:k])]


def _check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} rankings; pass one weight per retriever")
    if any(not w >= 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"weights must be >= 0 and not all 0, got {weights}")
    return weights


def weighted_fuse(rankings: Sequence[Sequence[Hit]], weights: Sequence[float] | None = None,
                  k: int | None = None) -> list[Hit]:
    """Score-normalised weighted fusion: each list's scores are min-max scaled to [0, 1] over the
    hits it returned (a list whose scores are all equal scales to 1), then

    $$ s(d) = \\sum_i w_i\\, \\frac{s_i(d) - \\min s_i}{\\max s_i - \\min s_i} $$

    with 0 for a list that did not return $d$ (``weights`` default to 1 each). Unlike RRF it keeps
    how *far* ahead a retriever's first hit is, not just its rank. Ties keep first appearance."""
    weights = _check_weights(weights, len(rankings))
    fused: dict[str, float] = {}
    first: dict[str, Chunk] = {}
    for w, hits in zip(weights, rankings):
        if not hits:
            continue
        scores = np.array([h.score for h in hits], dtype=np.float64)
        span = scores.max() - scores.min()
        scaled = (scores - scores.min()) / span if span > 0 else np.ones_like(scores)
        for h, x in zip(hits, scaled):
            fused[h.chunk.chunk_id] = fused.get(h.chunk.chunk_id, 0.0) + w * float(x)
            first.setdefault(h.chunk.chunk_id, h.chunk)
    order = sorted(fused, key=lambda cid: -fused[cid])
    return [Hit(first[cid], fused[cid], r + 1) for r, cid in enumerate(order[:k])]


class HybridIndex:
    """Several indexes over the same chunks, fused by reciprocal rank (``method="rrf"``, default,
    :func:`rrf_fuse` with ``k_rrf``) or by min-max normalised scores (``method="weighted"``,
    :func:`weighted_fuse`), each retriever weighted by ``weights`` (default: equal).

    Each index is searched ``max(k, depth)`` deep with the same ``allowed_groups`` (so the filter is
    applied inside every retriever, before its top-k), and the fused list is cut to ``k``.
    """

    def __init__(self, indexes: Sequence[Index], k_rrf: float = 60, depth: int = 100, *,
                 method: str = "rrf", weights: Sequence[float] | None = None) -> None:
        indexes = list(indexes)
        if not indexes:
            raise ValueError("HybridIndex needs at least one index (typically a BM25Index and a DenseIndex)")
        if not all(callable(getattr(ix, "search", None)) for ix in indexes):
            raise TypeError("HybridIndex takes indexes with a search(query, k, allowed_groups) method")
        if k_rrf < 0:
            raise ValueError(f"k_rrf must be >= 0, got {k_rrf}")
        if method not in ("rrf", "weighted"):
            raise ValueError(f"method must be 'rrf' or 'weighted', got {method!r}")
        check_positive_int("depth", depth)
        self.indexes, self.k_rrf, self.depth, self.method = indexes, k_rrf, depth, method
        self.weights = _check_weights(weights, len(indexes))

    def search(self, query: str, k: int = 10, allowed_groups: Iterable[str] | None = None) -> list[Hit]:
        """The ``k`` best chunks by fused rank among those readable by ``allowed_groups``."""
        _check_query(query, k)
        rankings = [ix.search(query, k=max(k, self.depth), allowed_groups=allowed_groups)
                    for ix in self.indexes]
        if self.method == "weighted":
            return weighted_fuse(rankings, self.weights, k)
        return rrf_fuse(rankings, self.k_rrf, k, self.weights)


#: The toolkit's default first stage (:func:`recommended_index`): BM25 and MiniLM dense retrieval
#: fused by min-max normalised scores, weight 0.2 on BM25 and 0.8 on dense. Chosen in chapter 5-05 on
#: the Python FAQ's training questions (its dev split) among RRF (k = 10, 60) and weighted fusion
#: (dense weight 0.3 to 0.9), then checked on both sets' test splits against each component.
DEFAULT_FUSION: dict = {"method": "weighted", "weights": (0.2, 0.8), "k_rrf": 60, "depth": 100}


def recommended_index(chunks: Iterable[Chunk], embeddings: np.ndarray | None = None, *,
                      model=None, tokenizer=None, model_name: str = "all-minilm-l6-v2",
                      **dense_kwargs) -> HybridIndex:
    """The toolkit's default retriever over ``chunks``: a :class:`BM25Index` and a
    :class:`DenseIndex` (``embeddings``, ``model``, ``tokenizer``, ``model_name`` and other keyword
    arguments go to it) fused as :data:`DEFAULT_FUSION` says (BM25 first, dense second)."""
    chunks = _check_chunks(chunks, "recommended_index")
    dense = DenseIndex(chunks, embeddings, model=model, tokenizer=tokenizer, model_name=model_name,
                       **dense_kwargs)
    return HybridIndex([BM25Index(chunks), dense], **DEFAULT_FUSION)


Scorer = Callable[[str, list[Chunk]], Sequence[float]]


def rerank(query: str, hits: Sequence[Hit], scorer: Scorer, k: int) -> list[Hit]:
    """Re-order ``hits`` by ``scorer(query, chunks)`` (one score per chunk, higher is better) and keep
    the best ``k``; the new hits carry the scorer's scores and new ranks. Ties keep the old order."""
    check_positive_int("k", k)
    hits = list(hits)
    if not hits:
        return []
    scores = np.asarray(scorer(query, [h.chunk for h in hits]), dtype=np.float64).ravel()
    if scores.shape != (len(hits),):
        raise ValueError(f"the scorer returned {scores.size} scores for {len(hits)} chunks; "
                         "it must return one score per chunk")
    order = np.argsort(-scores, kind="stable")[:k]
    return [Hit(hits[i].chunk, float(scores[i]), r + 1) for r, i in enumerate(order)]


class RerankedIndex:
    """An index followed by a reranker: retrieve ``max(k, candidates)`` hits, :func:`rerank` them,
    keep ``k``. Hits below that depth are never seen by the scorer, so the reranked recall@k can never
    exceed the first stage's recall at that depth."""

    def __init__(self, index: Index, scorer: Scorer, candidates: int = 20) -> None:
        if not callable(getattr(index, "search", None)):
            raise TypeError("RerankedIndex takes an index with a search(query, k, allowed_groups) method")
        if not callable(scorer):
            raise TypeError("scorer must be a function (query, chunks) -> one score per chunk")
        check_positive_int("candidates", candidates)
        self.index, self.scorer, self.candidates = index, scorer, candidates

    def search(self, query: str, k: int = 10, allowed_groups: Iterable[str] | None = None) -> list[Hit]:
        """The first stage's top ``candidates`` (filtered by ``allowed_groups``), reranked, best ``k``."""
        _check_query(query, k)
        hits = self.index.search(query, k=max(k, self.candidates), allowed_groups=allowed_groups)
        return rerank(query, hits, self.scorer, k)


# ------------------------------------------------------------------------------------------- metrics

#: Relevance levels of :func:`evaluate_retrieval`: ``"auto"`` picks ``"passage"`` when every question
#: names its gold passage (``passage_ids`` or ``gold_span``), else ``"document"``.
LEVELS = ("auto", "passage", "document")

#: A chunk matches a ``gold_span`` when they share this many consecutive :func:`tokenize` tokens
#: (or the whole span, if it is shorter): a piece of the gold passage, not one common word.
SPAN_MATCH_TOKENS = 8


def _ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def _span_grams(span: str) -> tuple[set[tuple[str, ...]], int]:
    tokens = tokenize(span)
    n = min(SPAN_MATCH_TOKENS, len(tokens))
    if n == 0:
        raise ValueError(f"gold_span {span[:60]!r} has no word tokens; give the gold passage's text")
    return _ngrams(tokens, n), n


def is_relevant(chunk: Chunk, question: Mapping, level: str = "auto") -> bool:
    """Whether ``chunk`` answers ``question`` at ``level`` (see :data:`LEVELS`).

    Document level: the chunk's ``doc_id`` is the question's. Passage level: its ``chunk_id`` is
    in ``question["passage_ids"]``, or -- with a ``gold_span`` (the gold passage's text) -- it comes
    from the gold document (when the question names one) and shares :data:`SPAN_MATCH_TOKENS`
    consecutive tokens with the span, so any chunking that keeps a piece of the passage counts."""
    level = _resolve_level([question], level)
    return _relevance(question, level)(chunk)


def _has_passage(q: Mapping) -> bool:
    return "passage_ids" in q or "gold_span" in q


def _resolve_level(questions: Sequence[Mapping], level: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    for q in questions:
        if not isinstance(q, Mapping) or "question" not in q:
            raise ValueError("every question must be a dict with 'question' and 'doc_id' (the gold "
                             "document) and/or 'passage_ids' or 'gold_span' (the gold passage)")
    passages = all(_has_passage(q) for q in questions)
    if level == "auto":
        level = "passage" if passages else "document"
    if level == "passage" and not passages:
        raise ValueError("level='passage' needs 'passage_ids' or 'gold_span' in every question; "
                         "use level='document' to score by 'doc_id'")
    if level == "document" and not all("doc_id" in q for q in questions):
        raise ValueError("every question must be a dict with 'question' and 'doc_id' (the gold document) "
                         "for level='document'")
    return level


def _relevance(q: Mapping, level: str) -> Callable[[Chunk], bool]:
    if level == "document":
        return lambda c: c.doc_id == q["doc_id"]
    if "passage_ids" in q:
        ids = {q["passage_ids"]} if isinstance(q["passage_ids"], str) else set(q["passage_ids"])
        return lambda c: c.chunk_id in ids
    grams, n = _span_grams(q["gold_span"])
    doc = q.get("doc_id")
    return lambda c: (doc is None or c.doc_id == doc) and bool(grams & _ngrams(tokenize(c.text), n))


def first_relevant_ranks(index: Index | Callable[[str, int], Sequence[Hit]],
                         questions: Iterable[Mapping], depth: int = 10,
                         allowed_groups: Iterable[str] | None = None,
                         level: str = "auto") -> list[int | None]:
    """For each question, the 1-based rank of the first relevant hit among the top ``depth``
    (``None`` if there is none): the per-question numbers behind recall@k and MRR, for paired
    comparisons (:func:`utils.stats.compare_metric`). Relevance as in :func:`is_relevant`."""
    questions = list(questions)
    if not questions:
        raise ValueError("first_relevant_ranks got no questions")
    check_positive_int("depth", depth)
    level = _resolve_level(questions, level)
    search = getattr(index, "search", None)
    if search is None and not callable(index):
        raise TypeError("index must have a search(query, k, allowed_groups) method "
                        "or be a function (query, k)")
    ranks: list[int | None] = []
    for q in questions:
        hits = (search(q["question"], k=depth, allowed_groups=allowed_groups) if search is not None
                else index(q["question"], depth))
        relevant = _relevance(q, level)
        ranks.append(next((r for r, h in enumerate(list(hits)[:depth], start=1)
                           if relevant(h.chunk)), None))
    return ranks


class RetrievalScores(dict):
    """Mean metrics (a plain ``{"recall@1": ..., "MRR": ...}`` dict) that also say which relevance
    ``level`` was scored (``"passage"`` or ``"document"``), over how many questions (``n``), and
    keep the per-question values (``per_question["MRR"]`` is each question's reciprocal rank) for
    paired comparisons."""

    def __init__(self, means: Mapping[str, float], level: str, per_question: Mapping[str, list]) -> None:
        super().__init__(means)
        self.level = level
        self.per_question = {name: list(values) for name, values in per_question.items()}
        self.n = len(next(iter(self.per_question.values()), []))

    def __repr__(self) -> str:
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in self.items())
        return f"RetrievalScores({self.level} level, n = {self.n}: {metrics})"


def evaluate_retrieval(index: Index | Callable[[str, int], Sequence[Hit]], questions: Iterable[Mapping],
                       ks: Sequence[int] = (1, 5, 10), allowed_groups: Iterable[str] | None = None,
                       level: str = "auto") -> RetrievalScores:
    """Mean ``recall@k`` for each k in ``ks`` and mean reciprocal rank within the top ``max(ks)``
    (``"MRR"``, i.e. MRR@10 for the default ks) over ``questions``: dicts with ``question`` and the
    gold -- ``doc_id`` (the gold document, e.g. :func:`utils.data.python_faq_split`) and/or
    ``passage_ids`` / ``gold_span`` (the gold passage, e.g. :func:`utils.embed.manpages_split`).

    ``level="auto"`` (default) scores the passage level when every question names a gold passage,
    else the document level; ``"passage"`` or ``"document"`` forces one. The result is a
    :class:`RetrievalScores` dict whose ``level`` says which was scored and whose ``per_question``
    holds each question's values. ``index`` is anything with ``search(query, k, allowed_groups)``,
    or a function ``(query, k) -> hits``."""
    questions = list(questions)
    if not questions:
        raise ValueError("evaluate_retrieval got no questions")
    ks = list(ks)
    if not ks:
        raise ValueError("ks must name at least one cut-off, e.g. (1, 5, 10)")
    for k in ks:
        check_positive_int("every k in ks", k)
    level = _resolve_level(questions, level)
    ranks = first_relevant_ranks(index, questions, max(ks), allowed_groups, level)
    per_question = {f"recall@{k}": [float(r is not None and r <= k) for r in ranks] for k in ks}
    per_question["MRR"] = [0.0 if r is None else 1.0 / r for r in ranks]
    means = {name: sum(values) / len(values) for name, values in per_question.items()}
    return RetrievalScores(means, level, per_question)


# ------------------------------------------------------------------- prompts around retrieval

#: The opening put in the model's mouth for each prompt (``assistant_prefix`` of
#: :func:`utils.chat.generate_replies`): it fixes the reply's form, which a 135M model otherwise
#: ignores ("The passage provides ..."). Strip it from the reply before use.
QUERY_PREFIXES = {"doc2query": "Question: How do I", "hyde": "", "multiquery": "Rephrased query:"}


def doc2query_prompt(chunk: Chunk, max_words: int = 60) -> str:
    """The prompt that asks a chat model for a question ``chunk`` answers (doc2query / InPars):
    its title and first ``max_words`` words, then the request. Reply opening:
    ``QUERY_PREFIXES["doc2query"]``."""
    check_positive_int("max_words", max_words)
    words = " ".join(chunk.text.split()[:max_words])
    head = f"{chunk.title}\n" if chunk.title else ""
    return f"{head}{words}\n\nWrite a question that a programmer could ask and this text answers."


def hyde_prompt(question: str, source: str = "a reference manual") -> str:
    """The prompt that asks a chat model to write the passage that would answer ``question``
    (HyDE: the hypothetical passage is embedded and searched with instead of the question)."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("hyde_prompt needs the question as a non-empty str")
    return f"Write two sentences from {source} that answer this: {question}"


def multiquery_prompt(question: str) -> str:
    """The prompt that asks a chat model to rephrase ``question`` (multi-query expansion: each
    rewrite is searched and the rankings are fused). Reply opening: ``QUERY_PREFIXES["multiquery"]``."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("multiquery_prompt needs the question as a non-empty str")
    return f"Rephrase this search query with different words: {question}"
