"""Grounded generation for retrieval-augmented generation (Part 5): prompts with numbered sources,
citation checks and extractive context compression.

- :func:`sources_prompt`, :func:`closed_book_prompt`: the chat messages a model reads (instructions,
  sources ``[1]..[n]``, the question); :func:`utils.chat.render_prompt` shows exactly what reaches
  it, and :func:`utils.chat.generate_replies` answers many prompts at once.
- :func:`cited_numbers`, :func:`check_citations`, :func:`citation_correct`: which sources an answer
  cites, and whether those citations are right (see :class:`CitationCheck` for the definition).
  Answer quality against a gold passage is measured in :mod:`utils.metrics`.
- :func:`split_sentences`, :func:`compress_context`: keep only the sentences of the retrieved chunks
  most similar to the question (extractive compression).
- :func:`answer_questions`, :func:`answer_question`: retrieve, build the prompt, generate, parse the
  citations -- the whole pipeline over any index with ``search(query, k, allowed_groups)`` (the
  toolkit's :mod:`utils.retrieval` indexes).

A *chunk* here is anything with a ``text`` attribute (and a ``doc_id`` and optional ``title`` for
citations), such as :class:`utils.retrieval.Chunk`, a dict with those keys, or a plain string.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from utils.chat import generate_replies
from utils.checks import check_positive_int
from utils.metrics import CITATION_RE

__all__ = [
    "CLOSED_BOOK_INSTRUCTIONS",
    "GROUNDED_INSTRUCTIONS",
    "CitationCheck",
    "RagAnswer",
    "answer_question",
    "answer_questions",
    "check_citations",
    "citation_correct",
    "cited_numbers",
    "clip_words",
    "closed_book_prompt",
    "compress_context",
    "format_sources",
    "sources_prompt",
    "split_sentences",
]

#: The instruction closing a grounded prompt; ``{numbers}`` becomes "[1], [2] or [3]" for three sources.
#: It comes *after* the sources and the question: a 135M model follows the instruction it read last
#: far better than a system message before a few hundred tokens of sources.
GROUNDED_INSTRUCTIONS = ("Answer the question in one or two sentences using only the sources above, "
                         "and cite the source you used as {numbers}.")

#: The instruction closing a closed-book prompt (no sources).
CLOSED_BOOK_INSTRUCTIONS = "Answer the question in one or two sentences."

# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------

def _text(chunk: Any) -> str:
    if isinstance(chunk, str):
        return chunk
    if isinstance(chunk, dict):
        if "text" not in chunk:
            raise TypeError(f"a chunk given as a dict needs a 'text' key; it has {sorted(chunk)}")
        return chunk["text"]
    if not hasattr(chunk, "text"):
        raise TypeError(f"a chunk must be a string, a dict with 'text', or have a .text attribute; "
                        f"got {type(chunk).__name__}")
    return chunk.text


def _field(chunk: Any, name: str, default: str = "") -> str:
    if isinstance(chunk, dict):
        return chunk.get(name, default)
    return getattr(chunk, name, default)


def _check_question(question: str) -> None:
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r:.60}")


def clip_words(text: str, max_words: int | None) -> str:
    """``text`` cut to its first ``max_words`` words (whitespace collapsed), with "..." when cut.
    ``None`` keeps the text as it is."""
    if max_words is None:
        return text
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1 (or None for no limit), got {max_words}")
    words = text.split()
    return " ".join(words[:max_words]) + (" ..." if len(words) > max_words else "")


def format_sources(chunks: Sequence[Any], max_words: int | None = None) -> str:
    """The numbered sources block: ``[1] title: text`` per chunk, separated by blank lines."""
    lines = []
    for i, chunk in enumerate(chunks, start=1):
        title = _field(chunk, "title") if not isinstance(chunk, str) else ""
        body = clip_words(_text(chunk), max_words)
        lines.append(f"[{i}] {title}: {body}" if title else f"[{i}] {body}")
    return "\n\n".join(lines)


def _numbers(n: int) -> str:
    marks = [f"[{i}]" for i in range(1, n + 1)]
    return marks[0] if n == 1 else ", ".join(marks[:-1]) + " or " + marks[-1]


def _chat(user: str, system: str | None) -> list[dict]:
    messages = [{"role": "user", "content": user}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def sources_prompt(question: str, chunks: Sequence[Any], *, max_words: int | None = None,
                   instructions: str = GROUNDED_INSTRUCTIONS, system: str | None = None) -> list[dict]:
    """Chat messages for a grounded answer: one user message holding the numbered sources
    ``[1]..[n]`` (each cut to ``max_words`` words), the question, and ``instructions`` (whose
    ``{numbers}``, if present, lists the cite-able markers). Cite-able numbers are the 1-based
    positions in ``chunks``. ``system`` adds a system message (else the chat template's default)."""
    _check_question(question)
    if not chunks:
        raise ValueError("sources_prompt needs at least one chunk; use closed_book_prompt for none")
    user = (f"Sources:\n{format_sources(chunks, max_words)}\n\nQuestion: {question.strip()}\n"
            + instructions.replace("{numbers}", _numbers(len(chunks))))
    return _chat(user, system)


def closed_book_prompt(question: str, *, instructions: str = CLOSED_BOOK_INSTRUCTIONS,
                       system: str | None = None) -> list[dict]:
    """Chat messages asking the question with no sources (the model answers from its weights),
    in the same shape as :func:`sources_prompt`."""
    _check_question(question)
    return _chat(f"Question: {question.strip()}\n{instructions}", system)


# ----------------------------------------------------------------------------------------------
# Citations
# ----------------------------------------------------------------------------------------------

def cited_numbers(answer: str) -> list[int]:
    """Source numbers cited in ``answer`` as ``[n]`` or ``[n, m]``, in order of first appearance,
    each once. Numbers that name no source (``[0]``, ``[7]`` of three) are kept: see
    :func:`check_citations`."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a string, got {type(answer).__name__}")
    seen: list[int] = []
    for match in CITATION_RE.finditer(answer):
        for number in match.group(1).split(","):
            n = int(number)
            if n not in seen:
                seen.append(n)
    return seen


@dataclass(frozen=True)
class CitationCheck:
    """What an answer's citations get right, against the sources it was shown.

    - ``cited``: the cited numbers (:func:`cited_numbers`); ``n_sources``: how many it was shown.
    - ``cites_any``: at least one citation. ``all_exist``: every cited number is a shown source
      (1..n_sources). ``cites_gold``: some cited source's ``doc_id`` is the gold one.
    - ``correct`` = ``cites_any and all_exist and cites_gold``: the answer points the reader to a
      source that holds the answer and points nowhere that does not exist. (It does *not* require
      every cited source to be gold; ``gold_precision`` says how many of the valid ones are.)
    """

    cited: tuple[int, ...]
    n_sources: int
    cites_any: bool
    all_exist: bool
    cites_gold: bool
    gold_precision: float

    @property
    def correct(self) -> bool:
        return self.cites_any and self.all_exist and self.cites_gold


def check_citations(answer: str, chunks: Sequence[Any], gold_doc_id: str) -> CitationCheck:
    """The :class:`CitationCheck` of ``answer`` given the ``chunks`` numbered ``[1]..[n]`` in its
    prompt (each with a ``doc_id``) and the gold document id."""
    cited = cited_numbers(answer)
    docs = [_field(c, "doc_id", None) for c in chunks]
    if any(d is None for d in docs):
        raise TypeError("every chunk needs a doc_id (a Chunk, or a dict with 'doc_id') to check "
                        "citations against the gold document")
    valid = [n for n in cited if 1 <= n <= len(docs)]
    gold_hits = [n for n in valid if docs[n - 1] == gold_doc_id]
    return CitationCheck(cited=tuple(cited), n_sources=len(docs), cites_any=bool(cited),
                         all_exist=len(valid) == len(cited), cites_gold=bool(gold_hits),
                         gold_precision=len(gold_hits) / len(valid) if valid else 0.0)


def citation_correct(answer: str, chunks: Sequence[Any], gold_doc_id: str) -> bool:
    """True when ``answer`` cites at least one source, every cited number exists among ``chunks``,
    and at least one cited source is the gold document (:class:`CitationCheck`)."""
    return check_citations(answer, chunks, gold_doc_id).correct


# ----------------------------------------------------------------------------------------------
# Extractive context compression
# ----------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+(?=[A-Z0-9\"'(\[])")
_LINE_OR_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str, by_line: bool = False) -> list[str]:
    """Sentences of ``text``, stripped, none empty.

    Prose (default): paragraphs (blank-line separated) split after ``. ! ? :`` followed by a capital,
    digit, quote or bracket; whitespace inside a sentence is collapsed. ``by_line=True``, for
    documentation text whose lines are items (signatures, bullets): every line break ends a sentence,
    and so does ``. ! ?`` followed by whitespace."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    if by_line:
        return [s.strip() for s in _LINE_OR_SENTENCE_END.split(text) if s.strip()]
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        out.extend(s for s in _SENTENCE_END.split(flat) if s)
    return out


def _default_embed(texts: list[str]) -> np.ndarray:
    from utils.embed import embed_texts

    return embed_texts(texts, cache=False, desc=None)


def _with_text(chunk: Any, text: str) -> Any:
    if isinstance(chunk, str):
        return text
    if isinstance(chunk, dict):
        return {**chunk, "text": text}
    if dataclasses.is_dataclass(chunk):
        return dataclasses.replace(chunk, text=text)
    raise TypeError(f"cannot rebuild a chunk of type {type(chunk).__name__} with shorter text; "
                    "pass Chunk objects, dicts or strings")


def compress_context(question: str, chunks: Sequence[Any], max_sentences: int = 3, *,
                     embed: Callable[[list[str]], np.ndarray] | None = None,
                     score: Callable[[str, list[str]], Sequence[float]] | None = None,
                     by_line: bool = False) -> list[Any]:
    """Extractive compression: keep the ``max_sentences`` sentences of all ``chunks`` that score
    highest against the question (ties: the earlier sentence), each chunk keeping its kept sentences
    in their original order; chunks left with no sentence are dropped (so the survivors are
    renumbered [1]..[m] in a new prompt, and citations must be checked against the returned list).

    The score is the cosine of the embeddings of sentence and question, ``embed`` mapping a list of
    texts to unit-length rows (default: all-MiniLM-L6-v2 through :func:`utils.embed.embed_texts`,
    not cached on disk); or, with ``score``, ``score(question, sentences)`` (one number per sentence).
    Sentences are :func:`split_sentences` (``by_line`` passed on). Chunks come back as the same kind
    (a :class:`utils.retrieval.Chunk` with shorter ``text``, a dict, or a string)."""
    _check_question(question)
    check_positive_int("max_sentences", max_sentences)
    if embed is not None and score is not None:
        raise ValueError("pass embed (cosine scores) or score (your own), not both")
    per_chunk = [split_sentences(_text(c), by_line) for c in chunks]
    flat = [(ci, si, s) for ci, sents in enumerate(per_chunk) for si, s in enumerate(sents)]
    if not flat:
        return []
    texts = [s for _, _, s in flat]
    if score is not None:
        scores = np.asarray(score(question, texts), dtype=np.float64)
        if scores.shape != (len(flat),):
            raise ValueError(f"score returned shape {scores.shape} for {len(flat)} sentences")
    else:
        vectors = np.asarray((embed or _default_embed)([question] + texts), dtype=np.float32)
        if vectors.shape[0] != len(flat) + 1:
            raise ValueError(f"embed returned {vectors.shape[0]} rows for {len(flat) + 1} texts")
        scores = vectors[1:] @ vectors[0]
    keep = {(flat[j][0], flat[j][1]) for j in np.argsort(-scores, kind="stable")[:max_sentences]}
    out = []
    for ci, (chunk, sents) in enumerate(zip(chunks, per_chunk)):
        kept = [s for si, s in enumerate(sents) if (ci, si) in keep]
        if kept:
            out.append(_with_text(chunk, " ".join(kept)))
    return out


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RagAnswer:
    """One answer of :func:`answer_questions`: the ``text``, the retrieval ``hits``, the ``sources``
    actually shown as ``[1]..[n]`` (after compression, if any), the ``citations`` in the text, and
    the chat ``messages`` that produced it."""

    question: str
    text: str
    hits: tuple
    sources: tuple
    citations: tuple[int, ...]
    messages: tuple

    def check(self, gold_doc_id: str) -> CitationCheck:
        """:func:`check_citations` of this answer against its own sources."""
        return check_citations(self.text, self.sources, gold_doc_id)


def answer_questions(questions: Sequence[str], index, model, tokenizer, k: int = 3,
                     allowed_groups=None, *, max_words: int | None = 80,
                     compress_to: int | None = None, max_new_tokens: int = 48,
                     batch_size: int = 8, assistant_prefix: str = "",
                     embed: Callable[[list[str]], np.ndarray] | None = None) -> list[RagAnswer]:
    """Retrieve-then-generate for many questions: ``index.search(q, k=k,
    allowed_groups=allowed_groups)``, the hits' chunks as numbered sources (each cut to ``max_words``
    words, or compressed to ``compress_to`` sentences by :func:`compress_context`), a grounded prompt
    (:func:`sources_prompt`) and batched greedy generation (:func:`utils.chat.generate_replies`, which starts
    each answer with ``assistant_prefix``). A question for which the index returns nothing (all
    its chunks filtered out by ``allowed_groups``) is asked closed-book, without the prefix.
    ``allowed_groups`` is passed to the index, which filters before ranking (access control)."""
    if isinstance(questions, str):
        raise TypeError("answer_questions takes a list of questions; use answer_question for one")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not hasattr(index, "search"):
        raise TypeError(f"index must have a search(query, k, allowed_groups) method (a "
                        f"utils.retrieval index); got {type(index).__name__}")
    for q in questions:
        _check_question(q)
    all_hits, all_sources, all_messages = [], [], []
    for q in questions:
        hits = tuple(index.search(q, k=k, allowed_groups=allowed_groups))
        sources = tuple(h.chunk for h in hits)
        if compress_to is not None and sources:
            sources = tuple(compress_context(q, sources, compress_to, embed=embed))
        messages = (sources_prompt(q, sources, max_words=max_words) if sources
                    else closed_book_prompt(q))  # nothing the reader may see: answer unaided
        all_hits.append(hits)
        all_sources.append(sources)
        all_messages.append(messages)
    grounded = [i for i, s in enumerate(all_sources) if s]
    unaided = [i for i, s in enumerate(all_sources) if not s]
    texts = [""] * len(questions)
    for rows, prefix in ((grounded, assistant_prefix), (unaided, "")):
        outs = generate_replies(model, tokenizer, [all_messages[i] for i in rows],
                                max_new_tokens=max_new_tokens, batch_size=batch_size,
                                assistant_prefix=prefix)
        for i, out in zip(rows, outs):
            texts[i] = out
    return [RagAnswer(question=q, text=t, hits=h, sources=s, citations=tuple(cited_numbers(t)),
                      messages=tuple(m))
            for q, t, h, s, m in zip(questions, texts, all_hits, all_sources, all_messages)]


def answer_question(question: str, index, model, tokenizer, k: int = 3, allowed_groups=None,
                    **kwargs) -> RagAnswer:
    """:func:`answer_questions` for one question (same keyword arguments)."""
    return answer_questions([question], index, model, tokenizer, k, allowed_groups, **kwargs)[0]
