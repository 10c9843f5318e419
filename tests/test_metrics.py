"""Tests for utils.metrics: SQuAD answer metrics, grounded-answer metrics and retrieval metrics."""
from dataclasses import dataclass

import pytest

from utils.metrics import (contains, containment, exact_match, key_term_recall, key_terms,
                           label_accuracy, multiset_f1, normalize_answer, normalize_tokens, recall_at_k,
                           reciprocal_rank, retrieval_precision, token_f1, uncited_token_f1)


@dataclass(frozen=True)
class Chunk:  # the shape of utils.retrieval.Chunk
    chunk_id: str
    doc_id: str
    text: str


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float
    rank: int


def test_squad_metrics_on_hand_checked_cases():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert exact_match("the Denver Broncos", "Denver Broncos!") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0
    # SQuAD: pred "Denver Broncos won" vs gold "the Denver Broncos": p = 2/3, r = 1, F1 = 0.8
    assert token_f1("Denver Broncos won", "the Denver Broncos") == pytest.approx(0.8)
    assert token_f1("Santa Clara, California", "Levi's Stadium") == 0.0
    assert token_f1("a", "the") == 1.0 and token_f1("", "Denver") == 0.0  # both / one side empty
    assert token_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)  # repeats counted once each side
    assert multiset_f1(["x", "y"], ["y", "x"]) == 1.0  # order does not matter
    assert multiset_f1([], []) == 1.0 and multiset_f1([], ["x"]) == 0.0
    assert contains("I think it is the Denver Broncos.", "Denver Broncos") == 1.0
    assert contains("nonpositive", "positive") == 0.0  # whole words only
    with pytest.raises(ValueError, match="empty after normalisation"):
        contains("x", "the")
    with pytest.raises(TypeError, match="needs a str"):
        normalize_answer(None)


def test_label_accuracy():
    assert label_accuracy(["Positive.", "negative, clearly", "", "The positive one"],
                          ["positive", "positive", "negative", "positive"]) == 0.5
    with pytest.raises(ValueError, match="2 predictions for 1"):
        label_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no examples"):
        label_accuracy([], [])


def test_normalize_tokens_and_uncited_token_f1():
    assert normalize_tokens("The cat [1], a HAT!") == ["cat", "hat"]
    assert normalize_tokens("The cat is on a hat", drop_stopwords=True) == ["cat", "hat"]
    assert uncited_token_f1("the cat sat", "A cat sat!") == 1.0
    assert uncited_token_f1("cat sat down", "cat sat") == pytest.approx(0.8)  # P 2/3, R 1
    assert uncited_token_f1("dog", "cat") == 0.0
    assert uncited_token_f1("", "") == 1.0 and uncited_token_f1("the", "cat") == 0.0
    with pytest.raises(TypeError, match="string"):
        normalize_tokens(3)


def test_containment_ignores_stopwords_and_question_words():
    gold = "Strings are immutable because hashing needs fixed values."
    assert containment("Strings are immutable [1].", gold) == 1.0
    assert containment("Strings are mutable.", gold) == 0.5
    q = "Why are strings immutable?"
    assert containment("Strings are immutable.", gold, q) == 0.0  # only repeats the question
    assert containment("Strings are immutable for hashing and speed.", gold, q) == 0.5
    assert containment("", gold) == 0.0


def test_key_terms_and_their_recall():
    gold = "Strings are immutable. Immutable strings hash fast; hash values never change. Speed."
    assert key_terms(gold, n=3) == ["strings", "immutable", "hash"]
    assert key_terms(gold, "Why are strings immutable?", n=3) == ["hash", "fast", "values"]
    got = key_term_recall("They hash fast [1].", gold, "Why are strings immutable?", n=3)
    assert got == pytest.approx(2 / 3)
    assert key_term_recall("anything", "the a an", n=3) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        key_terms(gold, n=0)


def test_token_f1_and_uncited_token_f1_differ_only_in_normalisation():
    # SQuAD deletes punctuation ("don't" -> "dont", "[1]" -> "1"); the uncited F1 splits on it and drops [n]
    assert token_f1("don't [1]", "dont") == pytest.approx(2 / 3)
    assert uncited_token_f1("don't [1]", "don t") == 1.0


def test_recall_and_reciprocal_rank():
    hits = [Hit(Chunk(f"{d}#{i}", d, "t"), 1.0, i + 1) for i, d in enumerate(["a", "b", "b", "c"])]
    assert recall_at_k(hits, "b", 1) == 0.0 and recall_at_k(hits, "b", 2) == 1.0
    assert recall_at_k(hits, "z", 10) == 0.0
    assert reciprocal_rank(hits, "b") == 0.5 and reciprocal_rank(hits, "c") == 0.25
    assert reciprocal_rank(hits, "z") == 0.0
    with pytest.raises(ValueError):
        recall_at_k(hits, "b", 0)
    chunks = [h.chunk for h in hits]
    assert retrieval_precision(chunks, "b") == 0.5 and retrieval_precision([], "b") == 0.0
