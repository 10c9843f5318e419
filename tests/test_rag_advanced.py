"""Tests for utils.rag_advanced: corrective retrieval (grader features, the grader, refined context)."""
import numpy as np
import pytest

from utils import rag_advanced as ra
from utils.metrics import retrieval_precision
from utils.retrieval import Chunk


def test_term_overlap_and_features():
    assert ra.term_overlap("How do lists grow?", "lists grow by append") == 1.0
    assert ra.term_overlap("is it?", "anything") == 0.0
    X = ra.grade_features("lists append", ["lists append", "dict keys"], [0.9, 0.4], [3.0, 0.0])
    assert X.shape == (2, len(ra.FEATURE_NAMES))
    np.testing.assert_allclose(X[:, 1], [0.0, -0.5])
    np.testing.assert_allclose(X[:, 2], [1.0, 0.0])
    np.testing.assert_allclose(X[:, 4], [1.0, 0.5])
    X0 = ra.grade_features("q", ["a"], [0.1], [0.0])  # no BM25 match at all
    assert X0[0, 2] == 0.0
    with pytest.raises(ValueError, match="equal length"):
        ra.grade_features("q", ["a", "b"], [0.1], [0.0, 1.0])


def toy_training(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, 5)) + y[:, None] * 1.5
    return X, y


def test_grader_fit_thresholds_and_grades():
    X, y = toy_training()
    grader = ra.ChunkGrader().fit(X, y, recall=0.9, precision=0.8)
    assert 0 < grader.lower <= grader.upper <= 1
    p = grader.proba(X)
    assert (p[y == 1] >= grader.lower).mean() >= 0.9
    assert y[p >= grader.upper].mean() >= 0.8
    grades = grader.grade(X)
    assert set(grades) <= set(ra.GRADES) and len(grades) == len(y)
    assert grades[int(np.argmax(p))] == "relevant" and grades[int(np.argmin(p))] == "irrelevant"
    unreachable = ra.ChunkGrader().fit(X, y, recall=0.5, precision=1.0)
    assert unreachable.upper >= unreachable.lower


def test_grader_validation():
    X, y = toy_training(20)
    with pytest.raises(RuntimeError, match="fit"):
        ra.ChunkGrader().grade(X)
    with pytest.raises(ValueError, match="2-D"):
        ra.ChunkGrader().fit(X[:, 0], y)
    with pytest.raises(ValueError, match="both 0"):
        ra.ChunkGrader().fit(X, np.ones_like(y))
    with pytest.raises(ValueError, match="recall"):
        ra.ChunkGrader().fit(X, y, recall=0)


def test_best_sentences_and_corrective_context():
    text = "Dicts map keys. Lists grow with append. Tuples are fixed. Lists can shrink with pop."
    assert ra.best_sentences("How do lists grow and shrink?", text, n=2) == \
        "Lists grow with append. Lists can shrink with pop."
    assert ra.best_sentences("q", "One sentence only.", n=2) == "One sentence only."
    with pytest.raises(ValueError, match="n must"):
        ra.best_sentences("q", text, n=0)
    chunks = [Chunk("a#0", "a", text), Chunk("b#0", "b", text), Chunk("c#0", "c", "x")]
    out = ra.corrective_context("How do lists grow?", chunks, ["relevant", "ambiguous", "irrelevant"],
                                refine_sentences=1)
    assert [c.doc_id for c in out] == ["a", "b"]
    assert out[0].text == text and out[1].text == "Lists grow with append."
    assert retrieval_precision(out, "a") == 0.5
    assert retrieval_precision([], "a") == 0.0
    with pytest.raises(ValueError, match="one grade per chunk"):
        ra.corrective_context("q", chunks, ["relevant"])
    with pytest.raises(ValueError, match="unknown grade"):
        ra.corrective_context("q", chunks[:1], ["maybe"])


def test_best_threshold():
    t, acc = ra.best_threshold([0.1, 0.2, 0.6, 0.8], [0, 0, 1, 1])
    assert 0.2 < t < 0.6 and acc == 1.0
    t, acc = ra.best_threshold([0.5, 0.5], [1, 1])
    assert t < 0.5 and acc == 1.0
    with pytest.raises(ValueError, match="equal length"):
        ra.best_threshold([0.1], [0, 1])
