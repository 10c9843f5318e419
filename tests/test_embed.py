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


# ------------------------------------------------------------- man pages and fine-tuning (5-05)

def test_manpages_corpus_and_splits_are_disjoint_and_point_at_their_pages():
    pages = embed.manpages_corpus()
    by_id = {p["doc_id"]: p for p in pages}
    dev, test = embed.manpages_split("dev"), embed.manpages_split("test")
    assert len(pages) == len(dev) + len(test) == 120 and len(by_id) == len(pages)
    assert not {q["doc_id"] for q in dev} & {q["doc_id"] for q in test}
    for q in dev + test:
        page = by_id[q["doc_id"]]
        assert q["gold_span"].split("\n\n")[0] in page["text"]
        assert "## NAME" not in page["text"] and page["path"].endswith(".md")
        assert 0 <= q["overlap_gold"] <= q["overlap_page"] <= 1
    with pytest.raises(ValueError, match="split must be"):
        embed.manpages_split("train")


def test_mnrl_loss_is_cross_entropy_over_in_batch_and_hard_negatives():
    torch.manual_seed(0)
    q, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    unit = torch.nn.functional.normalize
    logits = 20.0 * unit(q, dim=-1) @ unit(torch.cat([p, n]), dim=-1).T
    want = -torch.log_softmax(logits, dim=-1).diagonal().mean()
    torch.testing.assert_close(embed.mnrl_loss(q, p, n), want)
    in_batch = 20.0 * unit(q, dim=-1) @ unit(p, dim=-1).T
    torch.testing.assert_close(embed.mnrl_loss(q, p), -torch.log_softmax(in_batch, -1).diagonal().mean())
    with pytest.raises(ValueError, match=r"\(B, d\)"):
        embed.mnrl_loss(q, p[:2])


def test_finetune_embedder_lowers_the_loss_on_its_pairs_and_checks_its_input():
    model, tokenizer = load_embedder(device="cpu")
    queries = ["how do I close a file", "how do I open a file", "how do I get the time",
               "how do I sleep for a while"]
    positives = ["close() closes a file descriptor", "open() opens the file named by pathname",
                 "time() returns the time as the number of seconds", "sleep() suspends the thread"]
    losses = embed.finetune_embedder(model, tokenizer, queries, positives, positives[::-1], epochs=3,
                                     batch_size=4, lr=5e-5, desc=None)
    assert len(losses) == 3 and losses[-1] < losses[0] and not model.training
    assert len(embed.finetune_embedder(model, tokenizer, queries[:3], positives[:3], batch_size=2,
                                       desc="fine-tuning test")) == 1  # the batch of one is skipped
    with pytest.raises(ValueError, match="one positive per query"):
        embed.finetune_embedder(model, tokenizer, queries, positives[:2])
    with pytest.raises(ValueError, match="one negative per query"):
        embed.finetune_embedder(model, tokenizer, queries, positives, positives[:1])
    with pytest.raises(ValueError, match="batch_size >= 2"):
        embed.finetune_embedder(model, tokenizer, queries, positives, batch_size=1)


def test_retrieval_generations_cover_every_test_question_and_check_their_arguments():
    hyde = embed.retrieval_generations("hyde", "manpages")
    assert {r["key"] for r in hyde} == {q["question"] for q in embed.manpages_split("test")}
    d2q = embed.retrieval_generations("doc2query", "faq")
    assert d2q and all(r["output"].startswith("How do I") and r["input"] for r in d2q)
    with pytest.raises(ValueError, match="kind"):
        embed.retrieval_generations("summary", "faq")
    with pytest.raises(ValueError, match="corpus"):
        embed.retrieval_generations("hyde", "kjv")
