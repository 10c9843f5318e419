"""A small cross-encoder reranker, trained on a CPU: built in chapter 5-02, reused in 5-05.

A bi-encoder (:class:`utils.retrieval.DenseIndex`) embeds a question and a passage separately; a
*cross-encoder* reads them together, ``[CLS] question [SEP] passage [SEP]``, so every layer can compare
their words, and outputs one relevance score ``s(q, p)`` (Nogueira and Cho, 2019). No pretrained
cross-encoder ships offline with this book, so :class:`CrossEncoder` is made from the sentence
embedder: its first ``layers`` transformer layers, mean pooling over the joint sequence, and a
linear head. :func:`train_cross_encoder` fits it on groups of one positive passage and a few hard
negatives with the softmax cross-entropy over each group (the positive should score highest)::

    L = -log( exp s(q, p+) / (exp s(q, p+) + sum_j exp s(q, p-_j)) )

:func:`hard_negative_groups` builds those groups from the top hits of first-stage indexes, and
:meth:`CrossEncoder.scorer` is the ``(query, chunks) -> scores`` function that
:class:`utils.retrieval.RerankedIndex` calls, with the scores of pairs already seen remembered.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from utils.checks import check_positive_int
from utils.models import mean_pool
from utils.retrieval import Chunk, embedding_text

__all__ = ["CrossEncoder", "hard_negative_groups", "train_cross_encoder"]

#: A training group: the question, then its passages with the positive first.
Group = tuple[str, Sequence[Chunk]]


class CrossEncoder(torch.nn.Module):
    """The first ``layers`` layers of a BERT-style ``encoder`` reading (question, passage) pairs.

    ``encoder`` and ``tokenizer`` are a Hugging Face encoder and its tokenizer (e.g. from
    :func:`utils.load_embedder`); the encoder is cut *in place* to its first ``layers`` layers (a
    cheaper reader) and its embedding table frozen. Pairs are truncated to ``max_length`` word pieces,
    the passage side only. The linear head is initialised from ``seed``.
    """

    def __init__(self, encoder: torch.nn.Module, tokenizer, layers: int = 3, max_length: int = 80,
                 seed: int = 0) -> None:
        super().__init__()
        check_positive_int("layers", layers)
        check_positive_int("max_length", max_length, minimum=8)
        blocks = getattr(getattr(encoder, "encoder", None), "layer", None)
        if blocks is None:
            raise TypeError("CrossEncoder needs a BERT-style encoder with .encoder.layer (e.g. "
                            "utils.load_embedder()'s model)")
        if layers > len(blocks):
            raise ValueError(f"layers={layers} but the encoder has only {len(blocks)}; pass "
                             f"layers <= {len(blocks)}")
        encoder.encoder.layer = blocks[:layers]
        encoder.config.num_hidden_layers = layers
        for p in encoder.embeddings.parameters():
            p.requires_grad_(False)
        self.encoder, self.tokenizer, self.max_length = encoder, tokenizer, max_length
        generator = torch.Generator().manual_seed(seed)
        head = torch.nn.Linear(encoder.config.hidden_size, 1)
        with torch.no_grad():  # nn.Linear's default init, drawn from our own generator
            bound = 1 / encoder.config.hidden_size ** 0.5
            head.weight.uniform_(-bound, bound, generator=generator)
            head.bias.uniform_(-bound, bound, generator=generator)
        self.head = head.to(next(encoder.parameters()).device)
        self._cache: dict[tuple[str, str], float] = {}

    def forward(self, questions: Sequence[str], chunks: Sequence[Chunk]) -> torch.Tensor:
        """One score per (question, chunk) pair: ``head(mean_pool(encoder(q [SEP] p)))``."""
        if len(questions) != len(chunks):
            raise ValueError(f"{len(questions)} questions for {len(chunks)} chunks; pass one "
                             "question per chunk")
        device = self.head.weight.device
        batch = self.tokenizer(list(questions), [embedding_text(c) for c in chunks],
                               truncation="only_second", max_length=self.max_length, padding=True,
                               return_tensors="pt").to(device)
        hidden = self.encoder(**batch).last_hidden_state
        return self.head(mean_pool(hidden, batch["attention_mask"])).squeeze(-1)

    def clear_cache(self) -> None:
        """Forget every remembered pair score (training changes the scores)."""
        self._cache.clear()

    def scorer(self, batch_size: int = 32, cache: bool = True) -> Callable[[str, list[Chunk]],
                                                                          list[float]]:
        """The reranking function ``(query, chunks) -> scores`` for :class:`RerankedIndex`.

        Runs in inference mode, ``batch_size`` pairs at a time. With ``cache`` a pair's score is
        computed once: a score depends only on the question and the chunk, not on which first stage
        proposed it. Train first; training clears the cache.
        """
        check_positive_int("batch_size", batch_size)

        @torch.inference_mode()
        def score(query: str, chunks: list[Chunk]) -> list[float]:
            was_training = self.training
            self.eval()
            todo = [c for c in chunks if not cache or (query, c.chunk_id) not in self._cache]
            fresh: dict[str, float] = {}
            for i in range(0, len(todo), batch_size):
                part = todo[i:i + batch_size]
                for c, s in zip(part, self([query] * len(part), part).tolist()):
                    fresh[c.chunk_id] = s
            if cache:
                self._cache.update({(query, cid): s for cid, s in fresh.items()})
            self.train(was_training)
            return [self._cache[(query, c.chunk_id)] if cache else fresh[c.chunk_id]
                    for c in chunks]

        return score


def hard_negative_groups(questions: Sequence[dict], positive_of: Callable[[dict], Chunk],
                         indexes: Sequence, n_negatives: int = 3, depth: int = 10) -> list[Group]:
    """One training group per question: its positive chunk, then ``n_negatives`` hard negatives.

    Negatives are the top hits of the first-stage ``indexes`` (their lists read alternately, each to
    ``depth``) whose ``doc_id`` is not the question's ``doc_id`` — wrong passages a retriever found
    convincing. Questions with fewer negatives than asked are left out.
    """
    check_positive_int("n_negatives", n_negatives)
    check_positive_int("depth", depth)
    if not indexes:
        raise ValueError("pass at least one first-stage index to mine negatives from")
    groups = []
    for q in questions:
        lists = [index.search(q["question"], k=depth) for index in indexes]
        found: list[Chunk] = []
        for rank in range(depth):
            for hits in lists:
                if rank < len(hits):
                    chunk = hits[rank].chunk
                    if chunk.doc_id != q["doc_id"] and chunk not in found:
                        found.append(chunk)
        if len(found) >= n_negatives:
            groups.append((q["question"], [positive_of(q), *found[:n_negatives]]))
    return groups


def train_cross_encoder(model: CrossEncoder, groups: Sequence[Group], *, epochs: int = 2,
                        groups_per_step: int = 4, lr: float = 2e-4, head_lr: float = 2e-3,
                        seed: int = 0, progress: bool = True) -> list[float]:
    """Fit ``model`` with the group softmax loss (module docstring); returns the loss of each step.

    Each epoch visits the groups in a new order (from ``seed``), ``groups_per_step`` groups per
    AdamW step, with learning rate ``lr`` for the encoder and ``head_lr`` for the new head. Every group
    must hold the same number of passages (positive first).
    """
    check_positive_int("epochs", epochs)
    check_positive_int("groups_per_step", groups_per_step)
    if not groups:
        raise ValueError("no training groups: build them with hard_negative_groups(...)")
    sizes = {len(passages) for _, passages in groups}
    if len(sizes) != 1 or min(sizes) < 2:
        raise ValueError(f"every group needs the positive and the same number (>= 1) of negatives; "
                         f"got group sizes {sorted(sizes)}")
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": encoder_params, "lr": lr},
                                   {"params": model.head.parameters(), "lr": head_lr}])
    rng = random.Random(seed)
    epoch_iter: Sequence[int] | object = range(epochs)
    if progress:
        from utils.book import progress as progress_bar

        epoch_iter = progress_bar(range(epochs), desc="cross-encoder epochs")
    losses: list[float] = []
    model.train()
    model.clear_cache()
    device = model.head.weight.device
    for _ in epoch_iter:
        order = rng.sample(list(groups), len(groups))
        for i in range(0, len(order), groups_per_step):
            step = order[i:i + groups_per_step]
            scores = model([q for q, ps in step for _ in ps], [p for _, ps in step for p in ps])
            loss = torch.nn.functional.cross_entropy(
                scores.view(len(step), -1), torch.zeros(len(step), dtype=torch.long, device=device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    model.eval()
    return losses
