"""Cached sentence embeddings and the Part 5 documentation corpus."""
import numpy as np
import pytest
import torch

from utils import embed
from utils.models import load_embedder, mean_pool


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMS_EXECUTED_CACHE", str(tmp_path))
    return tmp_path


def test_embeddings_equal_mean_pooling_in_any_order_and_are_cached(own_cache, monkeypatch):
    texts = ["a short one", "Python uses indentation to group statements, not braces.", "x" * 50]
    model, tokenizer = load_embedder(device="cpu")
    got = embed.embed_texts(texts, model=model, tokenizer=tokenizer, batch_size=2, desc=None)
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        want = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.dtype == np.float32 and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    path = embed.embedding_cache_path(texts)
    assert path.is_file() and path.is_relative_to(own_cache)
    monkeypatch.setattr(embed, "_encode", lambda *a, **k: pytest.fail("should read the cache"))
    np.testing.assert_array_equal(embed.embed_texts(texts), got)  # loads nothing: read from disk


def test_cache_key_depends_on_texts_model_and_length():
    a = embed.embedding_cache_path(["one", "two"])
    assert a == embed.embedding_cache_path(["one", "two"])
    assert a != embed.embedding_cache_path(["one", "two "])
    assert a != embed.embedding_cache_path(["onetwo"])
    assert a != embed.embedding_cache_path(["one", "two"], max_length=128)
    assert a != embed.embedding_cache_path(["one", "two"], model_name="other")


def test_uncached_run_with_progress_loads_the_embedder(own_cache, capsys):
    vectors = embed.embed_texts(["hello world"], cache=False, desc="embedding test")
    assert vectors.shape == (1, 384)
    assert "embedding test" in capsys.readouterr().out
    assert not (own_cache / "embeddings").exists()


def test_a_stale_cache_file_of_the_wrong_length_is_recomputed(own_cache):
    texts = ["alpha", "beta"]
    path = embed.embedding_cache_path(texts)
    path.parent.mkdir(parents=True)
    np.save(path, np.zeros((1, 384), dtype=np.float32))
    assert embed.embed_texts(texts, desc=None).shape == (2, 384)


@pytest.mark.parametrize("texts, error, match", [
    ("just a string", TypeError, "wrap a single text"),
    ([], ValueError, "no texts"),
    (["ok", 3], TypeError, "item 1 is int"),
])
def test_bad_texts_get_clear_errors(texts, error, match):
    with pytest.raises(error, match=match):
        embed.embed_texts(texts)


def test_bad_settings_get_clear_errors():
    with pytest.raises(ValueError, match="batch_size"):
        embed.embed_texts(["a"], batch_size=0)
    with pytest.raises(ValueError, match="both model and tokenizer"):
        embed.embed_texts(["a"], model=object())


def test_docs_corpus_scopes():
    narrative = embed.docs_corpus()
    full = embed.docs_corpus("full")
    assert len(full) == 14314 and 1000 < len(narrative) < 2000
    assert {r["page"].split("/")[0] for r in narrative} <= set(embed.NARRATIVE_AREAS)
    faq_ids = {r["doc_id"] for r in narrative if r["page"].startswith("faq/")}
    assert len(faq_ids) >= 179
    with pytest.raises(ValueError, match="narrative"):
        embed.docs_corpus("everything")
