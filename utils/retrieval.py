"""The retrieval toolkit of Part 5: chunking, BM25, dense and hybrid search, reranking, evaluation.

Everything a retrieval-augmented pipeline needs before the language model sees a word:

- :class:`Chunk` and :class:`Hit`, the two records every function passes around;
- chunkers: :func:`sections_as_chunks` (one chunk per documentation section), :func:`chunk_fixed`
  (fixed windows of words, optionally overlapping), :func:`chunk_recursive` (split at headings, then
  paragraphs, then sentences, then words, and merge neighbours up to a size);
- :func:`load_folder`, a reader's own ``.txt``/``.md`` files as documents;
- indexes with one interface, ``search(query, k=10, allowed_groups=None) -> list[Hit]``:
  :class:`BM25Index` (lexical), :class:`DenseIndex` (all-MiniLM-L6-v2 embeddings, cached on disk by
  :func:`utils.embed.embed_texts`), :class:`HybridIndex` (reciprocal rank fusion) and
  :class:`RerankedIndex` (any index followed by a reranker, see :func:`rerank`);
- evaluation: :func:`evaluate_retrieval` (mean :func:`utils.metrics.recall_at_k` and MRR).

Conventions, decided once here so that every chapter agrees:

- **Sizes are counted in words** (runs of non-space characters, :func:`count_words`). all-MiniLM-L6-v2
  counts WordPiece tokens, about 1.6 per word on the Python docs, and truncates at 256 of them.
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
from utils.metrics import recall_at_k, reciprocal_rank

__all__ = [
    "BM25Index",
    "Chunk",
    "DenseIndex",
    "Hit",
    "HybridIndex",
    "RerankedIndex",
    "chunk_fixed",
    "chunk_recursive",
    "count_words",
    "deduplicate_chunks",
    "embedding_text",
    "evaluate_retrieval",
    "load_folder",
    "rerank",
    "rrf_fuse",
    "sections_as_chunks",
    "split_recursive",
    "tokenize",
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
    twice embeds it once (turn it off to time query embedding).
    """

    def __init__(self, chunks: Iterable[Chunk], embeddings: np.ndarray | None = None, *, model=None,
                 tokenizer=None, max_length: int = 256,
                 embed_query: Callable[[list[str]], np.ndarray] | None = None,
                 cache_queries: bool = True) -> None:
        super().__init__(_check_chunks(chunks, "DenseIndex"))
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither (then the embedder is loaded)")
        self._model, self._tokenizer, self.max_length = model, tokenizer, max_length
        self._embed_query, self.cache_queries = embed_query, cache_queries
        if embeddings is None:
            from utils.embed import embed_texts

            self._load()
            embeddings = embed_texts([embedding_text(c) for c in self.chunks], model=self._model,
                                     tokenizer=self._tokenizer, max_length=max_length,
                                     desc="embedding chunks")
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
                                      max_length=self.max_length, cache=False, desc=None)
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


def rrf_fuse(rankings: Sequence[Sequence[Hit]], k_rrf: float = 60, k: int | None = None) -> list[Hit]:
    """Reciprocal rank fusion of several ranked lists of hits, matched by ``chunk_id``:

    $$ \\mathrm{RRF}(d) = \\sum_{i} \\frac{1}{k_{\\mathrm{rrf}} + \\mathrm{rank}_i(d)} $$

    (a list that does not contain $d$ adds nothing). Ties keep the order of first appearance."""
    if k_rrf < 0:
        raise ValueError(f"k_rrf must be >= 0, got {k_rrf}")
    fused: dict[str, float] = {}
    first: dict[str, Chunk] = {}
    for hits in rankings:
        for h in hits:
            fused[h.chunk.chunk_id] = fused.get(h.chunk.chunk_id, 0.0) + 1.0 / (k_rrf + h.rank)
            first.setdefault(h.chunk.chunk_id, h.chunk)
    order = sorted(fused, key=lambda cid: -fused[cid])  # sorted() is stable
    return [Hit(first[cid], fused[cid], r + 1) for r, cid in enumerate(order[:k])]


class HybridIndex:
    """Several indexes over the same chunks, fused by reciprocal rank (:func:`rrf_fuse`).

    Each index is searched ``max(k, depth)`` deep with the same ``allowed_groups`` (so the filter is
    applied inside every retriever, before its top-k), and the fused list is cut to ``k``.
    """

    def __init__(self, indexes: Sequence[Index], k_rrf: float = 60, depth: int = 100) -> None:
        indexes = list(indexes)
        if not indexes:
            raise ValueError("HybridIndex needs at least one index (typically a BM25Index and a DenseIndex)")
        if not all(callable(getattr(ix, "search", None)) for ix in indexes):
            raise TypeError("HybridIndex takes indexes with a search(query, k, allowed_groups) method")
        if k_rrf < 0:
            raise ValueError(f"k_rrf must be >= 0, got {k_rrf}")
        check_positive_int("depth", depth)
        self.indexes, self.k_rrf, self.depth = indexes, k_rrf, depth

    def search(self, query: str, k: int = 10, allowed_groups: Iterable[str] | None = None) -> list[Hit]:
        """The ``k`` best chunks by fused rank among those readable by ``allowed_groups``."""
        _check_query(query, k)
        rankings = [ix.search(query, k=max(k, self.depth), allowed_groups=allowed_groups)
                    for ix in self.indexes]
        return rrf_fuse(rankings, self.k_rrf, k)


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

def evaluate_retrieval(index: Index | Callable[[str, int], Sequence[Hit]], questions: Iterable[Mapping],
                       ks: Sequence[int] = (1, 5, 10), allowed_groups: Iterable[str] | None = None
                       ) -> dict[str, float]:
    """Mean ``recall@k`` for each k in ``ks`` and mean reciprocal rank within the top ``max(ks)``
    (``"MRR"``, i.e. MRR@10 for the default ks) over ``questions``: dicts with ``question`` and
    ``doc_id`` (the gold document), e.g. :func:`utils.data.python_faq_split`. ``index`` is anything
    with ``search(query, k, allowed_groups)``, or a function ``(query, k) -> hits``."""
    questions = list(questions)
    if not questions:
        raise ValueError("evaluate_retrieval got no questions")
    ks = list(ks)
    if not ks:
        raise ValueError("ks must name at least one cut-off, e.g. (1, 5, 10)")
    for k in ks:
        check_positive_int("every k in ks", k)
    depth = max(ks)
    search = getattr(index, "search", None)
    if search is None and not callable(index):
        raise TypeError("index must have a search(query, k, allowed_groups) method "
                        "or be a function (query, k)")
    totals = dict.fromkeys([f"recall@{k}" for k in ks] + ["MRR"], 0.0)
    for q in questions:
        if "question" not in q or "doc_id" not in q:
            raise ValueError("every question must be a dict with 'question' and 'doc_id' (the gold document)")
        hits = (search(q["question"], k=depth, allowed_groups=allowed_groups) if search is not None
                else index(q["question"], depth))
        for k in ks:
            totals[f"recall@{k}"] += recall_at_k(hits, q["doc_id"], k)
        totals["MRR"] += reciprocal_rank(list(hits)[:depth], q["doc_id"])
    return {name: total / len(questions) for name, total in totals.items()}
