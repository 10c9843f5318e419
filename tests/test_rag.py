"""Tests for utils.rag on a tiny ChatML tokenizer and a tiny random LlamaForCausalLM (no download),
with a fake index and a bag-of-words embedder; one test uses the real MiniLM embedder."""
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from tiny_chatml import chatml_tokenizer, tiny_llama

from utils import rag
from utils.metrics import normalize_tokens

CORPUS = ["Python uses indentation to group statements. Sources: [1] [2] [3] Question: Answer",
          "Strings are immutable. Lists are mutable. Tuples are immutable sequences.",
          "user assistant system According to source [1], the answer is"] * 5


@dataclass(frozen=True)
class Chunk:  # the shape of utils.retrieval.Chunk
    chunk_id: str
    doc_id: str
    text: str
    title: str = ""
    groups: frozenset = frozenset({"public"})


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float
    rank: int


CHUNKS = [Chunk("a#0", "a", "Strings are immutable. This helps hashing.", "Design FAQ"),
          Chunk("b#0", "b", "Lists are mutable.\n\nYou can append to them!", "Tutorial"),
          Chunk("c#0", "c", "Indentation groups statements.", groups=frozenset({"staff"}))]


class FakeIndex:
    """Returns the chunks in order, filtered by group before ranking, as utils.retrieval does."""

    def search(self, query, k=10, allowed_groups=None):
        pool = [c for c in CHUNKS if allowed_groups is None or c.groups & set(allowed_groups)]
        return [Hit(c, 1.0 / (i + 1), i + 1) for i, c in enumerate(pool[:k])]


def bow_embed(texts):
    """Unit bag-of-words vectors over a fixed vocabulary: similarity = shared words."""
    vocab = sorted({w for t in texts for w in normalize_tokens(t, drop_stopwords=True)})
    rows = np.zeros((len(texts), max(len(vocab), 1)), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in normalize_tokens(t, drop_stopwords=True):
            rows[i, vocab.index(w)] += 1
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms == 0, 1, norms)


@pytest.fixture(scope="module")
def tokenizer():
    return chatml_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer, num_hidden_layers=2, max_position_embeddings=1024)


# ---------------------------------------------------------------------------------------- prompts

def test_sources_prompt_numbers_titles_and_clips():
    (msg,) = rag.sources_prompt(" Why immutable? ", CHUNKS, max_words=3)
    assert msg["role"] == "user"
    user = msg["content"]
    assert user.startswith("Sources:\n[1] Design FAQ: Strings are immutable. ...")
    assert "\n\n[2] Tutorial: Lists are mutable. ...\n\n[3] Indentation groups statements.\n" in user
    assert user.endswith("Question: Why immutable?\n" + rag.GROUNDED_INSTRUCTIONS.format(
        numbers="[1], [2] or [3]"))
    plain = rag.sources_prompt("q", ["raw text", {"text": "dict text", "title": "T"}],
                               instructions="Cite {numbers}.", system="Be brief.")
    assert plain[0] == {"role": "system", "content": "Be brief."}
    assert "[1] raw text\n\n[2] T: dict text" in plain[1]["content"]
    assert plain[1]["content"].endswith("Cite [1] or [2].")
    assert rag.sources_prompt("q", ["x"])[0]["content"].endswith("as [1].")


def test_clip_words_and_closed_book():
    assert rag.clip_words("a  b\nc", None) == "a  b\nc"
    assert rag.clip_words("a  b\nc", 3) == "a b c"
    assert rag.clip_words("a b c d", 2) == "a b ..."
    assert rag.closed_book_prompt("Why?") == [
        {"role": "user", "content": "Question: Why?\n" + rag.CLOSED_BOOK_INSTRUCTIONS}]
    assert rag.closed_book_prompt("Why?", system="S")[0] == {"role": "system", "content": "S"}


@pytest.mark.parametrize("call, error, match", [
    (lambda: rag.sources_prompt("", CHUNKS), ValueError, "non-empty string"),
    (lambda: rag.sources_prompt("q", []), ValueError, "closed_book_prompt"),
    (lambda: rag.sources_prompt("q", [{"title": "no text"}]), TypeError, "'text' key"),
    (lambda: rag.sources_prompt("q", [3]), TypeError, "text attribute"),
    (lambda: rag.clip_words("x", 0), ValueError, "max_words"),
    (lambda: rag.closed_book_prompt(None), ValueError, "non-empty string"),
])
def test_prompt_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# -------------------------------------------------------------------------------------- citations

def test_cited_numbers():
    assert rag.cited_numbers("A [2]. B [1, 3] and [2][ 4 ].") == [2, 1, 3, 4]
    assert rag.cited_numbers("no citations, [x] or [] or (1)") == []
    with pytest.raises(TypeError, match="string"):
        rag.cited_numbers(None)


def test_check_citations_definition():
    ok = rag.check_citations("Immutable [1].", CHUNKS, "a")
    assert ok.correct and ok.cites_any and ok.all_exist and ok.cites_gold and ok.gold_precision == 1.0
    assert ok.cited == (1,) and ok.n_sources == 3
    half = rag.check_citations("[1] and [2]", CHUNKS, "a")
    assert half.correct and half.gold_precision == 0.5
    wrong = rag.check_citations("Mutable [2].", CHUNKS, "a")
    assert not wrong.correct and not wrong.cites_gold and wrong.all_exist
    missing = rag.check_citations("[1] and [7]", CHUNKS, "a")
    assert missing.cites_gold and not missing.all_exist and not missing.correct
    none = rag.check_citations("No citation.", CHUNKS, "a")
    assert not none.cites_any and not none.correct and none.gold_precision == 0.0
    assert rag.citation_correct("[1]", [{"doc_id": "a", "text": "t"}], "a")
    assert not rag.citation_correct("[0]", CHUNKS, "a")
    with pytest.raises(TypeError, match="doc_id"):
        rag.check_citations("[1]", ["plain string"], "a")


# ------------------------------------------------------------------------------------ compression

def test_split_sentences():
    text = "First one. Second one!  Third:\nstill third? 4th starts.\n\nNew para. lower. case"
    assert rag.split_sentences(text) == ["First one.", "Second one!", "Third: still third?",
                                         "4th starts.", "New para. lower. case"]
    assert rag.split_sentences("") == []


def test_compress_context_keeps_the_most_similar_sentences_in_order():
    chunks = [Chunk("a#0", "a", "Lists are mutable. Strings are immutable objects. Cats sleep."),
              Chunk("b#0", "b", "Dogs bark loudly."),
              Chunk("c#0", "c", "Immutable strings can be hashed. Tuples too.")]
    out = rag.compress_context("Why are strings immutable?", chunks, 2, embed=bow_embed)
    assert [c.doc_id for c in out] == ["a", "c"]  # b has no kept sentence: dropped
    assert out[0].text == "Strings are immutable objects."
    assert out[1].text == "Immutable strings can be hashed."
    assert out[0].chunk_id == "a#0" and out[0].title == ""
    as_dicts = rag.compress_context("strings", [{"doc_id": "a", "text": "x y. Strings z."}], 1,
                                    embed=bow_embed)
    assert as_dicts == [{"doc_id": "a", "text": "Strings z."}]
    assert rag.compress_context("strings", ["One. Strings two."], 5, embed=bow_embed) == [
        "One. Strings two."]
    assert rag.compress_context("strings", ["", "  "], 2, embed=bow_embed) == []


def test_compress_context_errors():
    with pytest.raises(ValueError, match="max_sentences"):
        rag.compress_context("q", CHUNKS, 0)
    with pytest.raises(ValueError, match="non-empty"):
        rag.compress_context(" ", CHUNKS, 1)
    with pytest.raises(ValueError, match="rows"):
        rag.compress_context("q", ["A. B."], 1, embed=lambda texts: np.ones((1, 4)))

    class Opaque:
        text = "One. Two."

    with pytest.raises(TypeError, match="cannot rebuild"):
        rag.compress_context("one", [Opaque()], 1, embed=bow_embed)


def test_compress_context_with_the_real_embedder():
    chunks = ["Cats sleep a lot. Python strings cannot be changed after creation.",
              "The weather was sunny."]
    out = rag.compress_context("Why are Python strings immutable?", chunks, 1)
    assert out == ["Python strings cannot be changed after creation."]


# ---------------------------------------------------------------------------------------- pipeline

def test_answer_questions_end_to_end(model, tokenizer):
    qs = ["Why are strings immutable?", "Are lists mutable?"]
    answers = rag.answer_questions(qs, FakeIndex(), model, tokenizer, k=2, max_new_tokens=3,
                                   assistant_prefix="According to source [")
    assert [a.question for a in answers] == qs
    first = answers[0]
    assert [h.rank for h in first.hits] == [1, 2] and first.sources == (CHUNKS[0], CHUNKS[1])
    assert first.text.startswith("According to source [")
    assert first.citations == tuple(rag.cited_numbers(first.text))
    assert first.messages == tuple(rag.sources_prompt(qs[0], CHUNKS[:2], max_words=80))
    assert first.check("a") == rag.check_citations(first.text, first.sources, "a")
    one = rag.answer_question(qs[0], FakeIndex(), model, tokenizer, k=3, allowed_groups={"staff"},
                              max_new_tokens=3)
    assert one.sources == (CHUNKS[2],)  # only what the group may read
    squeezed = rag.answer_question(qs[0], FakeIndex(), model, tokenizer, k=3, compress_to=1,
                                   max_new_tokens=2, embed=bow_embed)
    assert [c.text for c in squeezed.sources] == ["Strings are immutable."]


def test_answer_questions_falls_back_to_closed_book_when_nothing_is_allowed(model, tokenizer):
    (a,) = rag.answer_questions(["Why?"], FakeIndex(), model, tokenizer, allowed_groups={"nobody"},
                                max_new_tokens=2, assistant_prefix="Source [")
    assert a.hits == () and a.sources == ()
    assert a.messages == tuple(rag.closed_book_prompt("Why?"))
    assert not a.text.startswith("Source [")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(questions="one question"), TypeError, "answer_question for one"),
    (dict(k=0), ValueError, "k must be"),
    (dict(index=object()), TypeError, "search"),
    (dict(questions=["ok", ""]), ValueError, "non-empty"),
])
def test_answer_questions_errors(model, tokenizer, kwargs, error, match):
    args = dict(questions=["ok"], index=FakeIndex(), model=model, tokenizer=tokenizer)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        rag.answer_questions(**args)


def test_pipeline_with_the_toolkit_index_and_access_control(model, tokenizer):
    from utils.retrieval import BM25Index, Chunk as ToolkitChunk

    docs = [ToolkitChunk("s#0", "s", "Strings are immutable objects.", "FAQ"),
            ToolkitChunk("l#0", "l", "Lists are mutable sequences.", "Tutorial"),
            ToolkitChunk("x#0", "x", "Strings hold the admin password.", groups=frozenset({"staff"}))]
    index = BM25Index(docs)
    (a,) = rag.answer_questions(["Are strings immutable?"], index, model, tokenizer, k=3,
                                allowed_groups={"public"}, max_new_tokens=2)
    assert {c.doc_id for c in a.sources} <= {"s", "l"} and a.sources[0].doc_id == "s"
    assert "password" not in a.messages[-1]["content"]
    squeezed = rag.compress_context("Are strings immutable?", list(a.sources), 1, embed=bow_embed)
    assert [c.chunk_id for c in squeezed] == ["s#0"] and isinstance(squeezed[0], ToolkitChunk)


def test_split_sentences_by_line_and_compress_context_with_a_score():
    text = "def f(x)\nReturns x. Raises ValueError!  e.g. this"
    assert rag.split_sentences(text, by_line=True) == ["def f(x)", "Returns x.", "Raises ValueError!",
                                                       "e.g.", "this"]  # any stop ends a sentence
    assert rag.split_sentences(text) == ["def f(x) Returns x.", "Raises ValueError!  e.g. this".replace("  ", " ")]
    with pytest.raises(TypeError, match="string"):
        rag.split_sentences(None)
    chunks = ["Lists grow. Dicts map.", "Lists shrink with pop. Cats."]
    by_len = rag.compress_context("q?", chunks, 2, score=lambda q, sents: [len(s) for s in sents])
    assert by_len == ["Lists grow.", "Lists shrink with pop."]
    with pytest.raises(ValueError, match="not both"):
        rag.compress_context("q?", chunks, 1, embed=bow_embed, score=lambda q, s: [0] * len(s))
    with pytest.raises(ValueError, match="score returned"):
        rag.compress_context("q?", chunks, 1, score=lambda q, s: [0.0])
