"""The cross-encoder reranker of chapters 5-02 and 5-05."""
import pytest
import torch

from utils.models import load_embedder, mean_pool
from utils.reranker import CrossEncoder, hard_negative_groups, train_cross_encoder
from utils.retrieval import BM25Index, Chunk, RerankedIndex, embedding_text

CHUNKS = [Chunk(f"d{i}#0", f"d{i}", text, title=f"page {i}") for i, text in enumerate([
    "The open system call opens a file and returns a descriptor.",
    "close releases a file descriptor so that it may be reused.",
    "fork creates a new process by duplicating the calling process.",
    "A list comprehension builds a list from an iterable in one expression.",
    "The GIL lets only one thread execute Python bytecode at a time.",
    "Use os.path.join to build file paths portably.",
])]
QUESTIONS = [
    {"question": "How do I open a file descriptor?", "doc_id": "d0"},
    {"question": "How do I create a child process?", "doc_id": "d2"},
    {"question": "What does the GIL do to threads?", "doc_id": "d4"},
    {"question": "How do I release a descriptor?", "doc_id": "d1"},
]


@pytest.fixture(scope="module")
def model():
    encoder, tokenizer = load_embedder(device="cpu")
    return CrossEncoder(encoder, tokenizer, layers=2, max_length=48, seed=0)


def test_scores_equal_the_encoder_read_by_hand(model):
    q, chunk = "open a file", CHUNKS[0]
    with torch.no_grad():
        got = model([q], [chunk])
        batch = model.tokenizer([q], [embedding_text(chunk)], truncation="only_second",
                                max_length=48, padding=True, return_tensors="pt")
        want = model.head(mean_pool(model.encoder(**batch).last_hidden_state,
                                    batch["attention_mask"])).squeeze(-1)
    torch.testing.assert_close(got, want)
    assert len(model.encoder.encoder.layer) == 2
    assert not any(p.requires_grad for p in model.encoder.embeddings.parameters())


def test_hard_negatives_exclude_the_gold_document():
    index = BM25Index(CHUNKS)
    by_doc = {c.doc_id: c for c in CHUNKS}
    groups = hard_negative_groups(QUESTIONS, lambda q: by_doc[q["doc_id"]], [index, index],
                                  n_negatives=2)
    assert len(groups) == len(QUESTIONS)
    for (question, passages), q in zip(groups, QUESTIONS):
        assert question == q["question"] and passages[0].doc_id == q["doc_id"]
        assert len(passages) == 3 and all(p.doc_id != q["doc_id"] for p in passages[1:])
    assert hard_negative_groups(QUESTIONS, lambda q: by_doc[q["doc_id"]], [index],
                                n_negatives=9) == []  # too few chunks: every question left out


def test_training_lowers_the_loss_and_the_scorer_caches(model):
    by_doc = {c.doc_id: c for c in CHUNKS}
    groups = hard_negative_groups(QUESTIONS, lambda q: by_doc[q["doc_id"]], [BM25Index(CHUNKS)],
                                  n_negatives=2)
    losses = train_cross_encoder(model, groups, epochs=6, groups_per_step=4, lr=1e-4,
                                 head_lr=1e-2, seed=0, progress=True)
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2])
    score = model.scorer(batch_size=2)
    first = score("open a file", CHUNKS[:3])
    assert len(model._cache) == 3
    assert score("open a file", CHUNKS[:3]) == first  # from the cache
    assert model.scorer(cache=False)("open a file", CHUNKS[:3]) == pytest.approx(first, abs=1e-5)
    hits = RerankedIndex(BM25Index(CHUNKS), score, candidates=4).search("open a file", k=2)
    assert len(hits) == 2 and hits[0].rank == 1


def test_bad_inputs_say_what_to_do(model):
    encoder, tokenizer = load_embedder(device="cpu")
    with pytest.raises(ValueError, match="layers <= 6"):
        CrossEncoder(encoder, tokenizer, layers=7)
    with pytest.raises(TypeError, match="BERT-style"):
        CrossEncoder(torch.nn.Linear(2, 2), tokenizer)
    with pytest.raises(ValueError, match="one question per chunk"):
        model(["a", "b"], CHUNKS[:1])
    with pytest.raises(ValueError, match="no training groups"):
        train_cross_encoder(model, [])
    with pytest.raises(ValueError, match="group sizes"):
        train_cross_encoder(model, [("q", CHUNKS[:2]), ("r", CHUNKS[:3])])
    with pytest.raises(ValueError, match="at least one"):
        hard_negative_groups(QUESTIONS, lambda q: CHUNKS[0], [])
