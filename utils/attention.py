"""Attention, written once for the whole book (taught in Part 1, "Attention").

$$ \\operatorname{Attention}(Q, K, V) = \\operatorname{softmax}\\!\\left(\\frac{Q K^\\top}{\\sqrt{d_k}} + M\\right) V $$

where the mask $M$ holds $0$ where a query may look and $-\\infty$ where it may not.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from utils.checks import check_positive_int


__all__ = [
    "causal_mask",
    "padding_mask",
    "scaled_dot_product_attention",
    "MultiHeadAttention",
    "flash_attention",
]


def causal_mask(n_queries: int, n_keys: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask, True where query i may attend to key j (j <= i, aligned to the last key)."""
    n_keys = n_queries if n_keys is None else n_keys
    if n_queries <= 0 or n_keys <= 0:
        raise ValueError(f"sizes must be positive, got n_queries={n_queries}, n_keys={n_keys}")
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(diagonal=n_keys - n_queries)


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Boolean mask of shape (batch, 1, 1, max_len), True at real tokens, False at padding."""
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    if (lengths <= 0).any() or (lengths > max_len).any():
        raise ValueError(f"lengths must be in [1, {max_len}], got {lengths.tolist()}")
    positions = torch.arange(max_len, device=lengths.device)
    return (positions[None, :] < lengths[:, None])[:, None, None, :]


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    return_weights: bool = False,
):
    """Attention for tensors shaped (..., seq, d). ``mask`` is boolean (True = may attend) and broadcasts
    to (..., n_queries, n_keys). Same semantics as ``torch.nn.functional.scaled_dot_product_attention``
    with a boolean ``attn_mask``, including a query whose keys are all masked: its weights and its
    output are zeros (a plain softmax over a row of -inf would give NaN).
    """
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"queries and keys need the same head dimension to be compared, got "
                         f"q {tuple(q.shape)} and k {tuple(k.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"keys and values need one row per key position, got k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)}")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be boolean (True where a query may attend), got {mask.dtype}; "
                        f"for an additive mask of 0 and -inf pass `mask == 0`, for 0/1 integers "
                        f"`mask.bool()`")
    d_k = q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # (..., n_q, n_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    if mask is not None:  # a fully masked row is NaN after the softmax; torch returns zeros there
        weights = weights.masked_fill(~mask, 0.0)
    out = weights @ v
    return (out, weights) if return_weights else out


class MultiHeadAttention(nn.Module):
    """Multi-head attention: project, split into heads, attend, concatenate, project.

    $$ \\operatorname{MHA}(X_q, X_{kv}) = \\operatorname{Concat}(\\text{head}_1, \\dots, \\text{head}_h) W^O,
       \\quad \\text{head}_i = \\operatorname{Attention}(X_q W^Q_i, X_{kv} W^K_i, X_{kv} W^V_i) $$

    Self-attention passes the same sequence as query and key/value; cross-attention passes two.
    """

    def __init__(self, d_model: int, n_heads: int, bias: bool = True) -> None:
        super().__init__()
        if d_model <= 0 or n_heads <= 0 or d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a positive multiple of n_heads ({n_heads})")
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.w_q = nn.Linear(d_model, d_model, bias=bias)
        self.w_k = nn.Linear(d_model, d_model, bias=bias)
        self.w_v = nn.Linear(d_model, d_model, bias=bias)
        self.w_o = nn.Linear(d_model, d_model, bias=bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (b, n, d_model) -> (b, h, n, d_head)
        b, n, _ = x.shape
        return x.view(b, n, self.n_heads, self.d_head).transpose(1, 2)

    def forward(
        self,
        x_q: torch.Tensor,
        x_kv: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        return_weights: bool = False,
    ):
        x_kv = x_q if x_kv is None else x_kv
        q, k, v = self._split(self.w_q(x_q)), self._split(self.w_k(x_kv)), self._split(self.w_v(x_kv))
        out, weights = scaled_dot_product_attention(q, k, v, mask, return_weights=True)
        b, _, n, _ = out.shape
        out = self.w_o(out.transpose(1, 2).reshape(b, n, self.n_heads * self.d_head))
        return (out, weights) if return_weights else out


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    block_size: int = 128) -> torch.Tensor:
    """Exact attention computed one (query block, key block) tile at a time: FlashAttention's algorithm.

    The $n_q \\times n_k$ score matrix is never stored. For each block of queries we keep a running
    maximum $m$, a running softmax denominator $\\ell$ and an unnormalised output $O$; when a new key block
    raises the maximum from $m$ to $m'$, what was accumulated is rescaled by $e^{m - m'}$ (the online
    softmax). Tensors are shaped (..., seq, d); ``causal`` aligns query $i$ with key $i + n_k - n_q$,
    like :func:`causal_mask`. Extra memory: a few (block, block) tiles instead of (n_q, n_k).
    """
    check_positive_int("block_size", block_size)
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                         "need q (..., n_q, d), k (..., n_k, d), v (..., n_k, d_v)")
    n_q, n_k = q.shape[-2], k.shape[-2]
    if causal and n_q > n_k:
        raise ValueError(f"causal attention needs n_q <= n_k (queries are the last n_q positions), "
                         f"got n_q={n_q}, n_k={n_k}")
    offset = n_k - n_q  # absolute position of query 0
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    for q0 in range(0, n_q, block_size):
        q_blk = q[..., q0:q0 + block_size, :] / math.sqrt(q.shape[-1])
        rows = q_blk.shape[-2]
        m = torch.full((*q_blk.shape[:-1],), float("-inf"), dtype=q.dtype, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(*q_blk.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        k_stop = min(n_k, offset + q0 + rows) if causal else n_k  # later keys are all masked
        for k0 in range(0, k_stop, block_size):
            scores = q_blk @ k[..., k0:k0 + block_size, :].transpose(-2, -1)  # (..., rows, cols)
            if causal:
                q_pos = offset + q0 + torch.arange(rows, device=q.device)
                k_pos = k0 + torch.arange(scores.shape[-1], device=q.device)
                scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
            m_new = torch.maximum(m, scores.amax(dim=-1))
            p = torch.exp(scores - m_new[..., None])  # this tile's unnormalised weights
            rescale = torch.exp(m - m_new)  # shrink what was accumulated under the old maximum
            l = l * rescale + p.sum(dim=-1)
            acc = acc * rescale[..., None] + p @ v[..., k0:k0 + block_size, :]
            m = m_new
        out[..., q0:q0 + block_size, :] = acc / l[..., None]
    return out
