"""Cheap supervised fine-tuning on a CPU: a frozen trunk computed once, a trainable top (Part 2).

A causal LM with $L$ decoder layers is split at layer $L - k$. The bottom $L - k$ layers (and the
embeddings) are frozen, so their output for an example never changes: :func:`trunk_cache` computes it
once per example. Training and evaluation then run only the top $k$ layers (:func:`top_forward`) on the
cached hidden states. Works with ``transformers``' Llama-family models such as SmolLM2; what it
needs of their internals is in :mod:`utils.hf_llama`.

- :func:`trunk_cache`, :func:`pad_cached`, :func:`top_forward`: the split forward pass.
- :func:`response_loss`: the response-only loss, projecting to the vocabulary only where it is needed.
- :func:`top_parameters`, :func:`train_top_layers`: what trains (the top layers and the final norm)
  and the training loop on cached items (AdamW, warm-up and cosine decay, gradient clipping).
- :func:`answer_positions`, :func:`label_token_ids`, :func:`label_logits`: classification by comparing
  the logits of each label's first token at the position that predicts the answer.
- :func:`score_labels`: the same scores from the whole model, one forward pass per prompt.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.chat import IGNORE_INDEX, left_pad, pad_token_id, prompt_ids
from utils.checks import check_positive_int
from utils.hf_llama import check_n_top, decoder_layers, run_layers, trunk_hidden
from utils.pretrain import lr_at
from utils.sft import build_example, collate

__all__ = [
    "answer_positions",
    "label_logits",
    "label_token_ids",
    "pad_cached",
    "response_loss",
    "score_labels",
    "top_forward",
    "top_parameters",
    "train_top_layers",
    "trunk_cache",
]


@torch.no_grad()
def trunk_cache(model: nn.Module, examples: Sequence[dict], n_top: int, pad_token_id: int,
                batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(hidden, labels)`` per example: the hidden states entering layer $L - k$ ($k$ = ``n_top``).

    ``examples`` are :func:`utils.sft.build_example` outputs. Each ``hidden`` is (seq, d) for the
    example's own tokens (padding dropped), ``labels`` (seq,) its labels. No gradients are kept.
    """
    check_n_top(model, n_top)
    if not examples:
        raise ValueError("trunk_cache got no examples")
    check_positive_int("batch_size", batch_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    cache = []
    for start in range(0, len(examples), batch_size):
        batch = collate(list(examples[start:start + batch_size]), pad_token_id)
        hidden = trunk_hidden(model, n_top, input_ids=batch["input_ids"].to(device),
                              attention_mask=batch["attention_mask"].to(device))
        for row, mask, labels in zip(hidden, batch["attention_mask"], batch["labels"]):
            n = int(mask.sum())
            cache.append((row[:n].clone(), labels[:n].to(device)))
    model.train(was_training)
    return cache


def pad_cached(items: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad cached ``(hidden, labels)`` pairs to ``H`` (batch, longest, d) and ``Y`` (batch, longest).

    Padding is zeros in ``H`` and $-100$ in ``Y``. With right padding a causal model never lets a real
    token see a pad, so the real positions need no padding mask.
    """
    if not items:
        raise ValueError("pad_cached got no items")
    longest = max(h.shape[0] for h, _ in items)
    first = items[0][0]
    H = first.new_zeros(len(items), longest, first.shape[-1])
    Y = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long, device=first.device)
    for i, (h, y) in enumerate(items):
        if h.shape[0] != y.shape[0]:
            raise ValueError(f"item {i}: hidden has {h.shape[0]} positions but labels {y.shape[0]}")
        H[i, :len(h)], Y[i, :len(y)] = h, y
    return H, Y


def top_forward(model: nn.Module, hidden: torch.Tensor, n_top: int) -> torch.Tensor:
    """Run the last ``n_top`` decoder layers and the final norm on right-padded ``hidden`` (b, n, d).

    Positions are $0..n-1$ and the mask is causal, which is exact for every real token of a
    right-padded batch (:func:`utils.hf_llama.run_layers`). Returns the normalised hidden states;
    ``model.lm_head`` turns them into logits.
    """
    n_layers = check_n_top(model, n_top)
    top = decoder_layers(model)[n_layers - n_top:]
    return model.model.norm(run_layers(top, model.model.rotary_emb, hidden))


def response_loss(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:func:`utils.sft.masked_lm_loss` computed from final hidden states, projecting to the vocabulary
    only at the positions that predict a response token (a few per example, not the whole sequence)."""
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"need hidden (batch, seq, d) and labels (batch, seq), got {tuple(hidden.shape)} "
                         f"and {tuple(labels.shape)}")
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if not keep.any():
        raise ValueError("labels mark no token for the loss (all -100 after the shift)")
    logits = model.lm_head(hidden[:, :-1][keep])  # (number of response tokens, vocab)
    return F.cross_entropy(logits.float(), targets[keep])


def top_parameters(model: nn.Module, n_top: int) -> list[nn.Parameter]:
    """The parameters that :func:`train_top_layers` trains: the last ``n_top`` decoder layers' and
    the final norm's."""
    n_layers = check_n_top(model, n_top)
    top = decoder_layers(model)[n_layers - n_top:]
    return [p for layer in top for p in layer.parameters()] + list(model.model.norm.parameters())


def train_top_layers(model: nn.Module, items: Sequence[tuple[torch.Tensor, torch.Tensor]], n_top: int,
                     steps: int, batch_size: int, lr: float, warmup: int = 0, seed: int = 0,
                     clip: float | None = 1.0,
                     progress: Callable[[Iterable], Iterable] | None = None) -> list[float]:
    """Fine-tune the top ``n_top`` layers and the final norm (:func:`top_parameters`) in place on
    cached ``(hidden, labels)`` items from :func:`trunk_cache`, with the response-only loss.

    Batches of ``batch_size`` come from a fresh shuffle of the items each epoch (a generator seeded
    with ``seed``); AdamW without weight decay; the learning rate warms up linearly for ``warmup``
    steps to ``lr``, then decays by a cosine to a tenth of it (:func:`utils.pretrain.lr_at`); the
    gradient norm is clipped at ``clip`` (None: not clipped). Everything else stays frozen; the
    model is left in eval mode with no parameter requiring gradients. ``progress`` wraps the step
    loop (e.g. ``utils.progress``). Returns the loss of every step.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        check_positive_int(name, value)
    if not items:
        raise ValueError("train_top_layers needs at least one cached item (see trunk_cache)")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    trainable = top_parameters(model, n_top)
    model.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    order: list[int] = []
    losses: list[float] = []
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loop = range(steps) if progress is None else progress(range(steps))
    for step in loop:
        if len(order) < batch_size:  # a fresh shuffle of the set each epoch
            order += torch.randperm(len(items), generator=generator).tolist()
        hidden, labels = pad_cached([items[i] for i in order[:batch_size]])
        order = order[batch_size:]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, warmup, steps)
        loss = response_loss(model, top_forward(model, hidden, n_top), labels)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(trainable, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.requires_grad_(False)
    model.eval()
    return losses


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the position whose logits predict the first response token (first labelled index - 1)."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be (batch, seq), got shape {tuple(labels.shape)}")
    labelled = labels != IGNORE_INDEX
    if not labelled.any(dim=1).all() or labelled[:, 0].any():
        raise ValueError("every row needs a response (a label != -100) after at least one prompt token")
    return labelled.int().argmax(dim=1) - 1


def label_token_ids(tokenizer, prompt: str | list[dict], labels: Sequence[str],
                    system: str | None = None) -> list[int]:
    """The first response token of each label, as :func:`utils.sft.build_example` tokenizes it.

    Scoring a label by its first token is only fair when those tokens differ, which is checked.
    """
    if len(labels) < 2:
        raise ValueError(f"need at least two labels to choose between, got {list(labels)!r}")
    ids = []
    for label in labels:
        example = build_example(tokenizer, prompt, label, system=system)
        first = next(i for i, y in enumerate(example["labels"]) if y != IGNORE_INDEX)
        ids.append(example["input_ids"][first])
    if len(set(ids)) != len(ids):
        raise ValueError(f"labels {list(labels)!r} start with the same token(s) {ids}; "
                         "choose labels whose first tokens differ")
    return ids


def label_logits(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                 label_ids: Sequence[int]) -> torch.Tensor:
    """(batch, n_labels): the logit of each label's first token at each row's answer position."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    at_answer = hidden[rows, answer_positions(labels).to(hidden.device)]  # (batch, d)
    return model.lm_head(at_answer)[:, list(label_ids)]


@torch.no_grad()
def score_labels(model: nn.Module, tokenizer, prompts: Sequence[str | list[dict]], labels: Sequence[str],
                 system: str | None = None, batch_size: int = 16) -> torch.Tensor:
    """(n_prompts, n_labels) label logits from the whole model: one forward pass per prompt, no generation.

    Prompts end with the assistant header and are padded on the left, so the answer position is the
    last one and only its logits are computed (``logits_to_keep=1``).
    """
    if not prompts:
        raise ValueError("score_labels got no prompts")
    check_positive_int("batch_size", batch_size)
    ids = label_token_ids(tokenizer, prompts[0], labels, system=system)
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = []
    for start in range(0, len(prompts), batch_size):
        input_ids, mask = left_pad([prompt_ids(tokenizer, p, system)
                                    for p in prompts[start:start + batch_size]], pad_id)
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                       logits_to_keep=1).logits
        scores.append(logits[:, -1, ids])
    model.train(was_training)
    return torch.cat(scores)
