"""The KV cache and cached generation for our Llama (Part 4, "Inference arithmetic and the KV cache").

Generating token $t$ needs every earlier token's keys and values in every layer. Without a cache they
are recomputed from scratch at every step ($O(t)$ work per token, $O(t^2)$ in all); with one, each step
computes the new token's keys and values only and appends them:

$$ K_{1:t} = [\\,K_{1:t-1};\\; k_t\\,], \\qquad V_{1:t} = [\\,V_{1:t-1};\\; v_t\\,] $$

:class:`KVCache` preallocates room for ``max_len`` tokens (no reallocation while generating) and checks
that it is used with the model and batch size it was made for. :func:`generate` is greedy or sampled
decoding with it: the book's one generation loop for our Llama (``use_cache=False`` runs it without a
cache, as Part 1 does). ``truncate`` rolls the cache back (speculative decoding rejects drafted tokens) and
``clone`` copies it (prefix caching: one shared prompt, many continuations).
"""
from __future__ import annotations

import torch

from utils.checks import check_positive_int
from utils.llama import Llama, LlamaConfig


__all__ = [
    "KVCache",
    "generate",
]


class KVCache:
    """Keys and values of every layer, for one model configuration and one batch size.

    ``k`` and ``v`` have shape (n_layers, batch, n_kv_heads, max_len, head_dim); the first ``length``
    positions are filled. Memory: ``2 * n_layers * batch * n_kv_heads * max_len * head_dim`` values.
    """

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        check_positive_int("batch_size", batch_size)
        check_positive_int("max_len", max_len)
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.cfg, self.batch_size, self.max_len = cfg, batch_size, max_len
        self.length = 0  # positions filled so far

    @classmethod
    def for_model(cls, model: Llama, batch_size: int, max_len: int) -> "KVCache":
        """A cache with the model's config, dtype and device."""
        weight = model.tok_emb.weight
        return cls(model.cfg, batch_size, max_len, dtype=weight.dtype, device=weight.device)

    @property
    def nbytes(self) -> int:
        """Bytes held by the preallocated keys and values (filled or not)."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def check(self, cfg: LlamaConfig, batch_size: int, n_new: int) -> None:
        """Raise if this cache was made for another model or batch size, or has no room for n_new."""
        if cfg != self.cfg:
            raise ValueError(f"this cache was made for another model configuration:\n  cache: {self.cfg}\n"
                             f"  model: {cfg}\nmake one with KVCache.for_model(model, batch_size, max_len)")
        if batch_size != self.batch_size:
            raise ValueError(f"this cache holds a batch of {self.batch_size}, got a batch of {batch_size}")
        if self.length + n_new > self.max_len:
            raise ValueError(f"the cache holds {self.length} of at most {self.max_len} positions and cannot "
                             f"take {n_new} more: make it with a larger max_len")

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys/values (batch, n_kv_heads, n, head_dim) after the cached ones and
        return views of all of them, (batch, n_kv_heads, length + n, head_dim). ``length`` moves on
        only in :meth:`advance`, once every layer has written."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Mark n more positions as filled (called by the model after its last layer)."""
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (e.g. drafted tokens the target model rejected)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"can truncate to 0..{self.length} positions, got {length}")
        self.length = length

    def clone(self) -> "KVCache":
        """An independent copy (e.g. a cached shared prompt, reused by several requests)."""
        copy = KVCache.__new__(KVCache)
        copy.k, copy.v = self.k.clone(), self.v.clone()
        copy.cfg, copy.batch_size, copy.max_len, copy.length = self.cfg, self.batch_size, self.max_len, self.length
        return copy


def _next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """(batch, vocab) logits -> (batch, 1) token ids: argmax, or a sample at ``temperature``."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model: Llama, idx: torch.Tensor, max_new_tokens: int, cache: KVCache | None = None,
             eos_token_id: int | None = None, temperature: float = 0.0,
             generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
    """Prompt ids (batch, n) -> prompt + up to ``max_new_tokens`` new ids, decoded with a KV cache.

    Greedy when ``temperature`` is 0, else sampled from softmax(logits / temperature). Stops early
    once every sequence has just produced ``eos_token_id``. Pass a ``cache`` that already holds the
    first ``cache.length`` tokens of ``idx`` (a cached shared prefix) to skip their prefill; without
    one, a cache of exactly the needed size is made. ``use_cache=False`` decodes without any cache, as
    Part 1 does: each step runs the model over the whole sequence so far and keeps the last position's
    logits (the same tokens, at $O(t^2)$ cost).
    """
    check_positive_int("max_new_tokens", max_new_tokens)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must have shape (batch, n) with n >= 1, got {tuple(idx.shape)}")
    if not use_cache:
        if cache is not None:
            raise ValueError("use_cache=False decodes without a cache: pass cache=None")
        logits = model(idx)[:, -1]
    else:
        if cache is None:
            cache = KVCache.for_model(model, idx.shape[0], idx.shape[1] + max_new_tokens)
        if cache.length >= idx.shape[1]:
            raise ValueError(f"the cache already holds {cache.length} positions but the prompt has only "
                             f"{idx.shape[1]}: at least the prompt's last token must be new")
        logits = model(idx[:, cache.length:], cache=cache, last_only=True)[:, -1]  # prefill
    new_tokens = []
    for step in range(max_new_tokens):
        next_id = _next_token(logits, temperature, generator)
        new_tokens.append(next_id)
        if step == max_new_tokens - 1 or (eos_token_id is not None and (next_id == eos_token_id).all()):
            break
        if use_cache:
            logits = model(next_id, cache=cache, last_only=True)[:, -1]  # decode: one token in, one out
        else:
            logits = model(torch.cat([idx, *new_tokens], dim=1))[:, -1]  # re-read the whole sequence
    return torch.cat([idx, *new_tokens], dim=1)
