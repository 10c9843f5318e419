"""Corrective retrieval (Part 5, chapter 04): grade each retrieved chunk, pass the relevant ones,
refine the ambiguous ones, drop the rest (in the style of CRAG, Yan et al., 2024).

- :func:`term_overlap`, :func:`grade_features` (:data:`FEATURE_NAMES`): what a grader sees of a
  (question, chunk) pair;
- :class:`ChunkGrader`: logistic regression with a relevant / ambiguous / irrelevant band (:data:`GRADES`);
- :func:`best_sentences`, :func:`corrective_context`: the context a corrective pipeline passes on
  (refinement is :func:`utils.rag.compress_context` with a term-overlap score);
- :func:`best_threshold`: the threshold for a retrieve-or-not decision.

Retrieval precision of the passed context is :func:`utils.metrics.retrieval_precision`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from utils.checks import check_positive_int
from utils.metrics import STOPWORDS
from utils.rag import compress_context
from utils.retrieval import Chunk, tokenize

__all__ = [
    "FEATURE_NAMES",
    "GRADES",
    "ChunkGrader",
    "best_sentences",
    "best_threshold",
    "corrective_context",
    "grade_features",
    "term_overlap",
]

#: Names of the columns :func:`grade_features` returns.
FEATURE_NAMES = ("cosine", "cosine gap to best", "bm25 / best bm25", "term overlap", "1 / rank")


def term_overlap(question: str, text: str) -> float:
    """Fraction of the question's distinct content tokens (:func:`utils.retrieval.tokenize`, length
    > 2, not a stop word) that occur in ``text``; 0 when the question has none."""
    wanted = {t for t in tokenize(question) if len(t) > 2 and t not in STOPWORDS}
    if not wanted:
        return 0.0
    return len(wanted & set(tokenize(text))) / len(wanted)


def grade_features(question: str, texts: Sequence[str], cosines: Sequence[float],
                   bm25: Sequence[float]) -> np.ndarray:
    """Features of (question, chunk) pairs for a relevance grader, one row per retrieved chunk in
    rank order: cosine of the embeddings, its gap to the best cosine in the list, BM25 score divided
    by the best in the list, :func:`term_overlap`, and 1/rank (:data:`FEATURE_NAMES`)."""
    n = len(texts)
    if not n or len(cosines) != n or len(bm25) != n:
        raise ValueError(f"texts, cosines and bm25 must be non-empty and of equal length, got "
                         f"{n}, {len(cosines)}, {len(bm25)}")
    cos = np.asarray(cosines, dtype=np.float64)
    b = np.asarray(bm25, dtype=np.float64)
    best_b = b.max() if b.max() > 0 else 1.0
    overlap = [term_overlap(question, t) for t in texts]
    return np.column_stack([cos, cos - cos.max(), b / best_b, overlap, 1.0 / np.arange(1, n + 1)])


GRADES = ("relevant", "ambiguous", "irrelevant")


class ChunkGrader:
    """A trained relevance grader in the style of corrective RAG (Yan et al., 2024).

    A logistic regression on :func:`grade_features` gives p(relevant); two thresholds cut it into
    ``relevant`` (p >= ``upper``), ``irrelevant`` (p < ``lower``) and ``ambiguous`` in between.
    :meth:`fit` picks the thresholds on the training pairs: ``lower`` keeps ``recall`` of the
    relevant pairs above it, ``upper`` is the lowest threshold whose precision reaches ``precision``.
    """

    def __init__(self, C: float = 1.0) -> None:
        from sklearn.linear_model import LogisticRegression

        self.model = LogisticRegression(C=C, max_iter=1000)
        self.lower = self.upper = None

    def fit(self, X: np.ndarray, y: Sequence[int], recall: float = 0.95, precision: float = 0.8
            ) -> ChunkGrader:
        """Fit on features ``X`` (n, d) and labels ``y`` (1 = the chunk is from the gold section)."""
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=int)
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError(f"X must be 2-D with one row per label, got {X.shape} and {len(y)} labels")
        if set(np.unique(y)) != {0, 1}:
            raise ValueError("y must contain both 0 (irrelevant) and 1 (relevant) labels")
        if not (0 < recall <= 1 and 0 < precision <= 1):
            raise ValueError(f"recall and precision must be in (0, 1], got {recall}, {precision}")
        self.model.fit(X, y)
        p = self.model.predict_proba(X)[:, 1]
        pos = np.sort(p[y == 1])
        self.lower = float(pos[int(np.floor((1 - recall) * len(pos)))])
        self.upper = 1.0
        for t in np.sort(np.unique(p)):
            above = p >= t
            if y[above].mean() >= precision:
                self.upper = float(t)
                break
        self.upper = max(self.upper, self.lower)
        return self

    def _check(self) -> None:
        if self.lower is None:
            raise RuntimeError("this ChunkGrader is not trained yet: call fit(X, y) first")

    def proba(self, X: np.ndarray) -> np.ndarray:
        """p(relevant) for each row of ``X``."""
        self._check()
        return self.model.predict_proba(np.asarray(X, dtype=np.float64))[:, 1]

    def grade(self, X: np.ndarray) -> list[str]:
        """``"relevant"``, ``"ambiguous"`` or ``"irrelevant"`` for each row of ``X``."""
        p = self.proba(X)
        return ["relevant" if q >= self.upper else "irrelevant" if q < self.lower else "ambiguous"
                for q in p]


def best_sentences(question: str, text: str, n: int = 2) -> str:
    """The ``n`` sentences of ``text`` (:func:`utils.rag.split_sentences` ``by_line``) with the highest
    :func:`term_overlap` with the question, in their original order (knowledge refinement: keep the
    strips of a chunk that matter): :func:`utils.rag.compress_context` of this one text, scored by
    term overlap instead of embeddings."""
    check_positive_int("n", n)
    kept = compress_context(question, [text], n, by_line=True,
                            score=lambda q, sentences: [term_overlap(q, s) for s in sentences])
    return kept[0] if kept else ""


def corrective_context(question: str, chunks: Sequence[Chunk], grades: Sequence[str],
                       refine_sentences: int = 2) -> list[Chunk]:
    """The chunks a corrective pipeline passes on: ``relevant`` ones whole, ``ambiguous`` ones cut to
    their :func:`best_sentences`, ``irrelevant`` ones dropped. May be empty (then the caller decides:
    answer closed-book, say "I don't know", or search again)."""
    if len(chunks) != len(grades):
        raise ValueError(f"one grade per chunk: got {len(chunks)} chunks and {len(grades)} grades")
    bad = sorted(set(grades) - set(GRADES))
    if bad:
        raise ValueError(f"unknown grade(s) {bad}; use {GRADES}")
    out = []
    for chunk, grade in zip(chunks, grades):
        if grade == "relevant":
            out.append(chunk)
        elif grade == "ambiguous":
            out.append(dataclasses.replace(chunk, text=best_sentences(question, chunk.text,
                                                                      refine_sentences)))
    return out


def best_threshold(scores: Sequence[float], labels: Sequence[int]) -> tuple[float, float]:
    """The threshold t maximising the accuracy of "label = 1 iff score >= t", and that accuracy.

    Candidates are the midpoints between consecutive distinct scores (and one below the lowest); ties
    go to the lowest threshold. Use it on training data only, then apply t unchanged to test data.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    if s.ndim != 1 or len(s) != len(y) or not len(s):
        raise ValueError(f"scores and labels must be non-empty 1-D of equal length, got {s.shape}, {y.shape}")
    u = np.unique(s)
    candidates = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2])
    accs = [float(((s >= t) == (y == 1)).mean()) for t in candidates]
    best = int(np.argmax(accs))
    return float(candidates[best]), accs[best]
