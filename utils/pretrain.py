"""Pretraining a small language model on a CPU (Part 1, "Pretraining a small GPT"), reused wherever a
chapter trains a tiny model from scratch (mixture of experts, later parts).

- :class:`CharTokenizer`: one id per character, the simplest tokenizer that covers a corpus.
- :func:`pack` and :func:`split_train_val`: documents -> one token stream -> train and validation parts.
- :func:`get_batch`: random windows of the stream, targets shifted by one token.
- :func:`lr_at`: linear warm-up then cosine decay.
- :func:`evaluate` and :func:`train_lm`: the training loop (AdamW, gradient clipping, optional bf16
  autocast, an optional extra loss such as a mixture-of-experts balancing term).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


__all__ = [
    "CharTokenizer",
    "pack",
    "split_train_val",
    "get_batch",
    "lr_at",
    "lm_loss",
    "next_token_loss",
    "evaluate",
    "TrainConfig",
    "History",
    "train_lm",
    "sample",
]


class CharTokenizer:
    """Maps each character of a fixed alphabet to an id (ids follow the sorted alphabet)."""

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text:
            raise ValueError("CharTokenizer needs a non-empty string whose characters form the alphabet")
        self.alphabet = sorted(set(text))
        self.to_id = {ch: i for i, ch in enumerate(self.alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text``; raises ``ValueError`` naming any unknown character."""
        if not isinstance(text, str):
            raise TypeError(f"encode needs a str, got {type(text).__name__}")
        unknown = sorted(set(text) - self.to_id.keys())
        if unknown:
            raise ValueError(f"characters not in the alphabet: {unknown[:10]!r}; "
                             "build the tokenizer from text that contains them")
        return [self.to_id[ch] for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        """The characters for ``ids`` (a list or a 1-D tensor)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids outside 0..{self.vocab_size - 1}: {bad[:10]}")
        return "".join(self.alphabet[i] for i in ids)


def pack(documents: Iterable[str], tokenizer: CharTokenizer, separator: str = "\n") -> torch.Tensor:
    """Concatenate the documents, ``separator`` between them, into one 1-D stream of token ids.

    Packing wastes no compute on padding: every position of every training window is a real token.
    """
    text = separator.join(documents)
    if not text:
        raise ValueError("pack got no text: pass at least one non-empty document")
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def split_train_val(stream: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``1 - val_fraction`` of the stream for training, the rest for validation.

    A contiguous split (not random windows) so that no validation text was seen in training.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if stream.dim() != 1:
        raise ValueError(f"stream must be 1-D, got shape {tuple(stream.shape)}")
    cut = int(len(stream) * (1 - val_fraction))
    return stream[:cut], stream[cut:]


def get_batch(data: torch.Tensor, batch_size: int, context: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``context`` tokens, and the same windows shifted by one (targets)."""
    if batch_size < 1 or context < 1:
        raise ValueError(f"batch_size and context must be >= 1, got {batch_size}, {context}")
    if len(data) < context + 1:
        raise ValueError(f"data has {len(data)} tokens; a window needs context + 1 = {context + 1}")
    starts = torch.randint(len(data) - context, (batch_size,), generator=generator)
    x = torch.stack([data[s:s + context] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + 1 + context] for s in starts.tolist()])
    return x, y


def lr_at(step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Learning rate at ``step``: linear warm-up to ``max_lr``, then cosine decay to ``min_lr_ratio * max_lr``.

    $$\\eta_t = \\eta_{min} + \\tfrac12(\\eta_{max}-\\eta_{min})(1+\\cos(\\pi\\,\\tfrac{t-w}{T-w}))$$
    """
    if not 0 <= warmup_steps <= total_steps or total_steps < 1:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, "
                         f"got {warmup_steps}, {total_steps}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    min_lr = max_lr * min_lr_ratio
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (batch, n, vocab) against target ids (batch, n), in nats."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, $-\\frac1N\\sum\\log p(y_t\\mid x_{\\le t})$ (in nats)."""
    return next_token_loss(model(x), y)


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, batch_size: int, context: int,
             n_batches: int = 10, seed: int = 0) -> float:
    """Mean loss over ``n_batches`` fixed random windows of ``data`` (same windows on every call)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    losses = []
    for _ in range(n_batches):
        x, y = get_batch(data, batch_size, context, generator)
        losses.append(lm_loss(model, x.to(device), y.to(device)).item())
    model.train(was_training)
    return sum(losses) / len(losses)


@dataclass
class TrainConfig:
    """Everything the loop needs besides the model and the data."""

    steps: int = 300
    batch_size: int = 16
    context: int = 128
    max_lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 0
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16 for mixed precision

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "context", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_lr <= 0:
            raise ValueError(f"max_lr must be positive, got {self.max_lr}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        lr_at(0, self.max_lr, self.warmup_steps, self.steps, self.min_lr_ratio)  # validates warm-up


@dataclass
class History:
    """What :func:`train_lm` recorded: per-step training loss, lr and gradient norm; periodic val loss."""

    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: dict[str, list[float]] = field(default_factory=dict)  # one curve per validation set
    seconds: float = 0.0


def train_lm(model: nn.Module, train_data: torch.Tensor, cfg: TrainConfig,
             val_data: torch.Tensor | dict[str, torch.Tensor] | None = None,
             extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
             optimizer: torch.optim.Optimizer | None = None,
             progress: Callable | None = None) -> History:
    """Train ``model`` (token ids -> logits) on random windows of ``train_data`` with AdamW.

    Each step: sample a batch, compute the next-token loss (under ``cfg.autocast_dtype`` autocast if
    set) plus ``extra_loss(model)`` if given, backpropagate, clip the global gradient norm to
    ``cfg.grad_clip``, set the warm-up + cosine learning rate, step. ``val_data`` (one stream, or a
    dict of named streams) is evaluated every ``cfg.eval_every`` steps and after the last. Pass
    ``optimizer`` to continue with existing state.
    """
    if val_data is not None and not isinstance(val_data, dict):
        val_data = {"val": val_data}
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(cfg.seed)
    if optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.max_lr, weight_decay=cfg.weight_decay,
                                      betas=(0.9, 0.95))
    history = History(val_loss={name: [] for name in (val_data or {})})
    steps = progress(range(cfg.steps), desc="training") if progress else range(cfg.steps)
    start = time.perf_counter()
    model.train()
    for step in steps:
        lr = lr_at(step, cfg.max_lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(train_data, cfg.batch_size, cfg.context, generator)
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=cfg.autocast_dtype or torch.float32,
                            enabled=cfg.autocast_dtype is not None):
            loss = lm_loss(model, x, y)
            total = loss + extra_loss(model) if extra_loss is not None else loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        history.train_loss.append(loss.item())
        history.lr.append(lr)
        history.grad_norm.append(grad_norm.item())
        last = step == cfg.steps - 1
        if val_data is not None and ((step + 1) % cfg.eval_every == 0 or last):
            history.val_steps.append(step + 1)
            for name, data in val_data.items():
                history.val_loss[name].append(evaluate(model, data, cfg.batch_size, cfg.context,
                                                       cfg.eval_batches, seed=cfg.seed + 1))
    history.seconds = time.perf_counter() - start
    return history


@torch.no_grad()
def sample(model: nn.Module, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int = 200,
           temperature: float = 0.8, context: int | None = None, seed: int = 0) -> str:
    """Continue ``prompt`` by sampling (temperature-scaled softmax); keeps the last ``context`` tokens."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([tokenizer.encode(prompt)], device=device)
    for _ in range(max_new_tokens):
        window = idx if context is None else idx[:, -context:]
        probs = torch.softmax(model(window)[:, -1].float() / temperature, dim=-1)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
    model.train(was_training)
    return tokenizer.decode(idx[0, -max_new_tokens:]) if max_new_tokens else ""
