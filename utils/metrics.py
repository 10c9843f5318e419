"""Answer and retrieval metrics, in one place (Parts 2 and 5).

Answers against a gold answer
    - :func:`normalize_answer`, :func:`exact_match`, :func:`token_f1`, :func:`contains`: SQuAD's metrics
      (lower-case, punctuation and the articles a/an/the dropped), on :func:`multiset_f1`;
    - :func:`label_accuracy`: a classifier's first word against the gold label.

Grounded answers against a gold passage (Part 5)
    - :func:`normalize_tokens`: word tokens with citation markers ``[n]`` removed, optionally without
      :data:`STOPWORDS`; :func:`uncited_token_f1`: token F1 on those tokens;
    - :func:`containment` (precision side: how much of the answer the passage backs),
      :func:`key_terms` and :func:`key_term_recall` (recall side).

Retrieval against a gold document
    - :func:`recall_at_k`, :func:`reciprocal_rank` (per question; ``hits`` have ``.chunk.doc_id``, as
      :class:`utils.retrieval.Hit` does) and :func:`retrieval_precision` (per list of chunks).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

from utils.checks import check_positive_int

__all__ = [
    "CITATION_RE",
    "STOPWORDS",
    "containment",
    "contains",
    "exact_match",
    "key_term_recall",
    "key_terms",
    "label_accuracy",
    "multiset_f1",
    "normalize_answer",
    "normalize_tokens",
    "recall_at_k",
    "reciprocal_rank",
    "retrieval_precision",
    "token_f1",
    "uncited_token_f1",
]

_PUNCTUATION = frozenset(string.punctuation)

#: A citation marker: ``[1]``, ``[2, 3]`` or ``[1][2]`` (each bracket is one marker).
CITATION_RE = re.compile(r"\[\s*(\d+(?:\s*,\s*\d+)*)\s*\]")

#: Function words left out when :func:`containment` compares content words.
STOPWORDS = frozenset("""
a an the and or but if then else of to in on at by for with from as into onto about than that this
these those it its is are was were be been being do does did done have has had having not no nor so
such can could may might must shall should will would you your yours we our us i me my he him his
she her they them their what which who whom whose when where why how there here also just only very
all any some each every more most other same own too again further once both few many much out up
down over under off s t don't isn't it's i'm
""".split())


# --- SQuAD answer metrics ----------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower-case, drop punctuation and the articles a/an/the, squeeze spaces."""
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer needs a str, got {type(text).__name__}")
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(pred: str, gold: str) -> float:
    """1.0 if the normalised prediction equals the normalised gold answer, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gold))


def multiset_f1(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    """F1 of two token lists compared as multisets (the core of every token-F1 metric in the book);
    1.0 if both are empty, 0.0 if only one is."""
    if not pred_tokens or not gold_tokens:
        return float(len(pred_tokens) == len(gold_tokens))
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str, gold: str) -> float:
    """SQuAD's token F1: harmonic mean of precision and recall of the shared normalised words.

    With $c$ the number of words in common (counting repeats), $p = c/|\\text{pred}|$,
    $r = c/|\\text{gold}|$ and $F_1 = 2pr/(p+r)$; if either side is empty, 1.0 when both are, else 0.0.
    """
    return multiset_f1(normalize_answer(pred).split(), normalize_answer(gold).split())


def contains(pred: str, gold: str) -> float:
    """1.0 if the normalised gold answer occurs in the normalised prediction as whole words, else 0.0."""
    gold_norm = normalize_answer(gold)
    if not gold_norm:
        raise ValueError(f"gold answer {gold!r} is empty after normalisation, so containment is meaningless")
    return float(f" {gold_norm} " in f" {normalize_answer(pred)} ")


def label_accuracy(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Fraction of predictions whose first normalised word is the normalised gold label."""
    if len(preds) != len(golds):
        raise ValueError(f"got {len(preds)} predictions for {len(golds)} gold labels")
    if not golds:
        raise ValueError("label_accuracy got no examples")
    first_words = [(normalize_answer(p).split() or [""])[0] for p in preds]
    return sum(w == normalize_answer(g) for w, g in zip(first_words, golds)) / len(golds)


# --- grounded answers against a gold passage ---------------------------------------------------------

def normalize_tokens(text: str, drop_stopwords: bool = False) -> list[str]:
    """Lower-cased word tokens (``\\w+``) of ``text`` with citation markers and the articles a/an/the
    removed; with ``drop_stopwords`` also :data:`STOPWORDS`."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    tokens = re.findall(r"\w+", CITATION_RE.sub(" ", text).lower())
    drop = STOPWORDS if drop_stopwords else frozenset({"a", "an", "the"})
    return [t for t in tokens if t not in drop]


def uncited_token_f1(prediction: str, gold: str) -> float:
    """Token F1 of a cited answer: :func:`multiset_f1` of the :func:`normalize_tokens` of both sides,
    so citation markers ``[n]`` do not count and words split at every non-word character (unlike
    SQuAD's :func:`token_f1`, which deletes punctuation). Against a long gold passage recall, and so
    F1, stays small even for a right answer."""
    return multiset_f1(normalize_tokens(prediction), normalize_tokens(gold))


def containment(prediction: str, gold: str, question: str | None = None) -> float:
    """Fraction of the prediction's content words that occur in the gold passage: how much of what
    the answer says is backed by the passage that answers the question.

    Content words are :func:`normalize_tokens` without :data:`STOPWORDS`; words of ``question`` (if
    given) are left out of the prediction first, since repeating the question is free. 0.0 when
    nothing is left to check."""
    words = normalize_tokens(prediction, drop_stopwords=True)
    if question is not None:
        asked = set(normalize_tokens(question, drop_stopwords=True))
        words = [w for w in words if w not in asked]
    if not words:
        return 0.0
    backed = set(normalize_tokens(gold, drop_stopwords=True))
    return sum(w in backed for w in words) / len(words)


def key_terms(gold: str, question: str | None = None, n: int = 10) -> list[str]:
    """The ``n`` most frequent content words of the gold passage that are not in the question (ties
    broken by first appearance): what a complete answer would likely mention."""
    check_positive_int("n", n)
    asked = set(normalize_tokens(question, drop_stopwords=True)) if question is not None else set()
    words = [w for w in normalize_tokens(gold, drop_stopwords=True) if w not in asked]
    return [w for w, _ in Counter(words).most_common(n)]  # most_common keeps first-seen order on ties


def key_term_recall(prediction: str, gold: str, question: str | None = None, n: int = 10) -> float:
    """Fraction of :func:`key_terms` of the gold passage that occur in the prediction: the recall
    side of answer quality (:func:`containment` is the precision side). 0.0 if there are no key terms."""
    terms = key_terms(gold, question, n)
    if not terms:
        return 0.0
    said = set(normalize_tokens(prediction))
    return sum(t in said for t in terms) / len(terms)


# --- retrieval against a gold document ---------------------------------------------------------------

def recall_at_k(hits: Sequence[Any], gold_doc_id: str, k: int) -> float:
    """1.0 if a chunk of the gold document is among the first ``k`` hits, else 0.0 (one relevant
    document per question, so recall and "hit rate" coincide)."""
    check_positive_int("k", k)
    return float(any(h.chunk.doc_id == gold_doc_id for h in list(hits)[:k]))


def reciprocal_rank(hits: Sequence[Any], gold_doc_id: str) -> float:
    """1 / rank of the first hit from the gold document, 0.0 if none of ``hits`` is."""
    for position, h in enumerate(hits, start=1):
        if h.chunk.doc_id == gold_doc_id:
            return 1.0 / position
    return 0.0


def retrieval_precision(chunks: Sequence[Any], gold_doc_id: str) -> float:
    """Fraction of ``chunks`` (each with a ``doc_id``) from the gold document (0 for an empty list:
    nothing useful was passed)."""
    if not chunks:
        return 0.0
    return sum(c.doc_id == gold_doc_id for c in chunks) / len(chunks)
