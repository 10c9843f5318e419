"""Sentence embeddings with a disk cache, and the documentation corpus Part 5 searches.

Embedding the corpus is the most expensive step of every retrieval chapter (about 2,700 tokens/s on one
CPU thread with all-MiniLM-L6-v2), so :func:`embed_texts` stores its result on disk, keyed by the model,
the truncation length and the exact texts: the first chapter of a build pays, the others read a file.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from utils.book import progress
from utils.data import load_python_docs
from utils.models import load_embedder, mean_pool
from utils.paths import cache_dir


__all__ = [
    "NARRATIVE_AREAS",
    "SCOPES",
    "docs_corpus",
    "embedding_cache_path",
    "embed_texts",
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
