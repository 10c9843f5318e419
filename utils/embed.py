"""Sentence embeddings with a disk cache, the corpora Part 5 searches, and contrastive fine-tuning.

Embedding the corpus is the most expensive step of every retrieval chapter (about 2,700 tokens/s on one
CPU thread with all-MiniLM-L6-v2), so :func:`embed_texts` stores its result on disk, keyed by the model,
the truncation length and the exact texts: the first chapter of a build pays, the others read a file.

Two corpora: the Python 3.11 documentation (:func:`docs_corpus`, with the FAQ questions of
:func:`utils.data.python_faq_split`), and Linux man pages as a second evaluation set that nothing was
tuned on (:func:`manpages_corpus`, :func:`manpages_split`; chapter 5-05). :func:`mnrl_loss` and
:func:`finetune_embedder` fine-tune the embedder contrastively on (query, passage) pairs (5-05).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from utils.book import progress
from utils.data import data_file, load_python_docs
from utils.models import load_embedder, mean_pool
from utils.paths import cache_dir


__all__ = [
    "GENERATION_KINDS",
    "MANPAGE_SPLITS",
    "NARRATIVE_AREAS",
    "SCOPES",
    "docs_corpus",
    "embedding_cache_path",
    "embed_texts",
    "finetune_embedder",
    "manpages_corpus",
    "manpages_split",
    "mnrl_loss",
    "retrieval_generations",
]


#: Documentation areas (first folder of a page's path) in the ``"narrative"`` corpus: the tutorial,
#: the language reference, the FAQ, the glossary and the guides -- prose a reader's question is
#: answered by. The ``library/``, ``c-api/``, ``howto/`` and ``whatsnew/`` areas are left out of it
#: to keep dense embedding affordable on a CPU; ``scope="full"`` has every section.
NARRATIVE_AREAS = ("faq", "tutorial", "reference", "glossary.html", "using", "extending", "install",
                   "installing", "distributing", "bugs.html", "about.html")

SCOPES = ("narrative", "full")


def docs_corpus(scope: str = "narrative") -> list[dict]:
    """Sections of the Python 3.11 documentation as dicts (``doc_id``, ``page``, ``title``,
    ``section``, ``url``, ``text``), in the order of ``data/python_docs.jsonl.gz``.

    ``scope="narrative"`` keeps the areas in :data:`NARRATIVE_AREAS` (every FAQ answer is among them);
    ``scope="full"`` keeps all 14,314 sections.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}")
    rows = list(load_python_docs())
    if scope == "full":
        return rows
    return [r for r in rows if r["page"].split("/")[0] in NARRATIVE_AREAS]


def _cache_key(texts: Sequence[str], model_name: str, max_length: int) -> str:
    digest = hashlib.sha256(f"{model_name}\x00{max_length}\x00{len(texts)}".encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()[:32]


def embedding_cache_path(texts: Sequence[str], model_name: str = "all-minilm-l6-v2",
                         max_length: int = 256) -> Path:
    """Where :func:`embed_texts` keeps (or would keep) the embeddings of exactly these texts."""
    return cache_dir() / "embeddings" / f"{_cache_key(texts, model_name, max_length)}.npy"


@torch.inference_mode()
def _encode(texts: Sequence[str], model, tokenizer, batch_size: int, max_length: int,
            desc: str | None) -> np.ndarray:
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    starts = range(0, len(texts), batch_size)
    for start in progress(starts, desc=desc) if desc else starts:
        idx = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state
        out[idx] = mean_pool(hidden, batch["attention_mask"]).float().cpu().numpy()
    return out


def embed_texts(
    texts: Sequence[str],
    *,
    model=None,
    tokenizer=None,
    model_name: str = "all-minilm-l6-v2",
    batch_size: int = 32,
    max_length: int = 256,
    cache: bool = True,
    desc: str | None = "embedding",
) -> np.ndarray:
    """Unit-length sentence embeddings, one float32 row per text (mean pooling, :func:`mean_pool`).

    Texts longer than ``max_length`` tokens are truncated, as sentence-transformers does (its default
    for all-MiniLM-L6-v2 is 256). With ``cache=True`` the result is read from, or written to,
    :func:`embedding_cache_path`; pass ``model``/``tokenizer`` to reuse a loaded embedder (then
    ``model_name`` must name it, since it is part of the cache key).
    """
    if isinstance(texts, str):
        raise TypeError("embed_texts takes a list of texts; wrap a single text as [text]")
    texts = list(texts)
    if not texts:
        raise ValueError("embed_texts got no texts: pass at least one string")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"embed_texts takes strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size}, {max_length}")
    if (model is None) != (tokenizer is None):
        raise ValueError("pass both model and tokenizer, or neither (then the embedder is loaded)")
    path = embedding_cache_path(texts, model_name, max_length)
    if cache and path.is_file():
        cached = np.load(path)
        if cached.shape[0] == len(texts):
            return cached
    if model is None:
        model, tokenizer = load_embedder(model_name)
    vectors = _encode(texts, model, tokenizer, batch_size, max_length, desc)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, vectors)
        os.replace(tmp, path)  # atomic: two chapters running at once never read half a file
    return vectors


# ------------------------------------------------------------------------------ the man-page set

MANPAGE_SPLITS = ("dev", "test")


def _manpage_records(data_dir: Path | None = None) -> list[dict]:
    import gzip
    import json

    with gzip.open(data_file("manpages.jsonl.gz", data_dir), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def manpages_corpus(data_dir: Path | None = None) -> list[dict]:
    """The man-page corpus of ``data/manpages.jsonl.gz`` as documents for the chunkers of
    :mod:`utils.retrieval`: ``doc_id`` (``"man2/open.2"``), ``title`` (``"open(2)"``), ``text`` (the
    page as Markdown without its NAME section), ``path`` (``doc_id + ".md"``, so
    :func:`utils.retrieval.chunk_sections` reads it as Markdown) and ``licence``."""
    return [{"doc_id": r["doc_id"], "title": r["title"], "text": r["text"],
             "path": r["doc_id"] + ".md", "licence": r["licence"]}
            for r in _manpage_records(data_dir)]


def manpages_split(split: str, data_dir: Path | None = None) -> list[dict]:
    """The man-page questions of one split, ``"dev"`` (for choosing settings) or ``"test"`` (scored
    once): dicts with ``question`` (the NAME line's description, names masked), ``doc_id`` (the gold
    page), ``gold_span`` (its gold passage: the first paragraph of DESCRIPTION), ``title`` and the
    question's word ``overlap_gold`` / ``overlap_page`` with its gold passage / page."""
    if split not in MANPAGE_SPLITS:
        raise ValueError(f"split must be one of {MANPAGE_SPLITS}, got {split!r}")
    keys = ("question", "doc_id", "gold_span", "title", "overlap_gold", "overlap_page")
    return [{k: r[k] for k in keys} for r in _manpage_records(data_dir) if r["split"] == split]


GENERATION_KINDS = ("doc2query", "hyde", "multiquery")


def retrieval_generations(kind: str, corpus: str, data_dir: Path | None = None) -> list[dict]:
    """What SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32) wrote around retrieval, greedily,
    for chapter 5-05 (``data/retrieval_generations.jsonl.gz``, built by
    ``scripts/build_retrieval_generations.py``): ``kind`` is ``"doc2query"`` (a synthetic question
    per passage: ``key`` the chunk id, ``input`` its :func:`utils.retrieval.embedding_text`),
    ``"hyde"`` (a hypothetical answer passage per test question) or ``"multiquery"`` (a rewrite per
    test question; ``key`` and ``input`` are the question); ``corpus`` is ``"manpages"`` or
    ``"faq"``. Each record's ``output`` is the generated text."""
    import gzip
    import json

    if kind not in GENERATION_KINDS:
        raise ValueError(f"kind must be one of {GENERATION_KINDS}, got {kind!r}")
    if corpus not in ("manpages", "faq"):
        raise ValueError(f"corpus must be 'manpages' or 'faq', got {corpus!r}")
    with gzip.open(data_file("retrieval_generations.jsonl.gz", data_dir), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r["kind"] == kind and r["corpus"] == corpus]


# ------------------------------------------------------------------------ contrastive fine-tuning

def mnrl_loss(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
              scale: float = 20.0) -> torch.Tensor:
    """Multiple-negatives ranking loss (InfoNCE with in-batch negatives), as sentence-transformers'
    ``MultipleNegativesRankingLoss`` computes it: for query $i$ the candidates are every positive of
    the batch (the others are its in-batch negatives) and every hard negative, scored by
    ``scale`` times cosine similarity, and the loss is the cross-entropy of picking its own positive:

    $$ \\mathcal{L} = -\\frac{1}{B} \\sum_i \\log \\frac{e^{s\\cos(q_i, p_i)}}
       {\\sum_j e^{s\\cos(q_i, p_j)} + \\sum_j e^{s\\cos(q_i, n_j)}} $$

    ``queries`` and ``positives`` are (B, d); ``negatives`` (B, d) or None."""
    if queries.ndim != 2 or queries.shape != positives.shape:
        raise ValueError(f"queries and positives must both be (B, d), got {tuple(queries.shape)} and "
                         f"{tuple(positives.shape)}")
    candidates = positives if negatives is None else torch.cat([positives, negatives])
    q = torch.nn.functional.normalize(queries, dim=-1)
    c = torch.nn.functional.normalize(candidates, dim=-1)
    logits = scale * q @ c.T
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(q), device=q.device))


def _embed_train(model, tokenizer, texts: Sequence[str], max_length: int) -> torch.Tensor:
    device = next(model.parameters()).device
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(device)
    return mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])


def finetune_embedder(model, tokenizer, queries: Sequence[str], positives: Sequence[str],
                      negatives: Sequence[str] | None = None, *, epochs: int = 1,
                      batch_size: int = 16, lr: float = 2e-5, scale: float = 20.0,
                      max_length: int = 256, seed: int = 0, desc: str | None = "fine-tuning"
                      ) -> list[float]:
    """Fine-tune a mean-pooling embedder (``model``, e.g. from :func:`utils.models.load_embedder`)
    in place on (query, positive passage[, hard negative]) triples with :func:`mnrl_loss`, AdamW at
    ``lr``, batches of ``batch_size`` triples in a seeded shuffle, ``epochs`` passes. Returns the
    loss of every step. The model is left in eval mode. Give the result its own ``model_name`` in
    :func:`embed_texts` / :class:`utils.retrieval.DenseIndex`, or the cache serves old vectors."""
    import random

    queries, positives = list(queries), list(positives)
    if not queries or len(queries) != len(positives):
        raise ValueError(f"need one positive per query and at least one pair, got {len(queries)} "
                         f"queries and {len(positives)} positives")
    if negatives is not None and len(negatives) != len(queries):
        raise ValueError(f"need one negative per query, got {len(negatives)} for {len(queries)}")
    if batch_size < 2 or epochs < 1 or not lr > 0:
        raise ValueError(f"need batch_size >= 2 (in-batch negatives), epochs >= 1 and lr > 0, got "
                         f"{batch_size}, {epochs}, {lr}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    losses: list[float] = []
    model.train()
    steps = [(epoch, start) for epoch in range(epochs)
             for start in range(0, len(queries), batch_size)]
    order: list[int] = []
    for epoch, start in progress(steps, desc=desc) if desc else steps:
        if start == 0:
            order = rng.sample(range(len(queries)), len(queries))
        idx = order[start:start + batch_size]
        if len(idx) < 2:
            continue  # a batch of one has no in-batch negative
        q = _embed_train(model, tokenizer, [queries[i] for i in idx], max_length)
        p = _embed_train(model, tokenizer, [positives[i] for i in idx], max_length)
        n = (_embed_train(model, tokenizer, [negatives[i] for i in idx], max_length)
             if negatives is not None else None)
        loss = mnrl_loss(q, p, n, scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
