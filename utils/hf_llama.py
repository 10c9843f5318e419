"""The one place that knows ``transformers``' Llama internals (Parts 2 and 3).

Several parts split a Hugging Face Llama-family causal LM (SmolLM2) at layer $L - k$: a frozen
*trunk* (embeddings and the bottom $L - k$ decoder layers) whose output is computed once and cached,
and a *top* (the last $k$ layers and the final norm) that trains or scores. Everything here reads
``model.model.layers``, ``model.model.norm``, ``model.model.rotary_emb``, ``model.config`` and the
layers' call signature, so that a ``transformers`` upgrade touches this file only.

- :func:`decoder_layers`, :func:`check_n_top`: the layers, and a valid split.
- :func:`trunk_hidden`: hidden states entering layer $L - k$ for a batch;
  :func:`prefix_trunk_hidden`: the same for many continuations of one shared prefix, the prefix run
  once and its key/value cache reused (the same numbers, fewer tokens).
- :func:`causal_mask`, :func:`run_layers`: decoder layers run on cached hidden states, with
  positions starting anywhere and an optional key/value cache in front.
- :func:`last_token_top_layer`: the last layer and final norm at each row's last real token only.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from utils.chat import repeat_cache
from utils.checks import check_positive_int

__all__ = [
    "causal_mask",
    "check_n_top",
    "decoder_layers",
    "last_token_top_layer",
    "prefix_trunk_hidden",
    "run_layers",
    "trunk_hidden",
]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError("expected a Hugging Face causal LM with `model.model.layers` (an nn.ModuleList), "
                        f"got {type(model).__name__}")
    return layers


def check_n_top(model: nn.Module, n_top: int) -> int:
    """The model's layer count $L$, after checking that ``n_top`` (the top's $k$) is in $1..L$."""
    n_layers = len(decoder_layers(model))
    if not isinstance(n_top, int) or isinstance(n_top, bool) or not 1 <= n_top <= n_layers:
        raise ValueError(f"n_top must be an int in 1..{n_layers} (the model's layer count), got {n_top!r}")
    return n_layers


@torch.no_grad()
def trunk_hidden(model: nn.Module, n_top: int, **inputs) -> torch.Tensor:
    """(batch, seq, d): the hidden states entering layer $L - k$ ($k$ = ``n_top``) for ``inputs``
    (``input_ids``, ``attention_mask``, ``past_key_values``, ...) passed to ``model.model``."""
    n_layers = check_n_top(model, n_top)
    return model.model(**inputs, output_hidden_states=True).hidden_states[n_layers - n_top]


@torch.no_grad()
def prefix_trunk_hidden(model: nn.Module, prefix_ids: Sequence[int], continuations: Sequence[Sequence[int]],
                        n_top: int, batch_size: int = 16) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(prefix, parts)``: hidden states entering layer $L - k$ of ``prefix_ids`` (p, d) and of each
    continuation ``c`` after it (len(c), d).

    The prefix runs through the frozen layers once; its key/value cache is copied for each batch of
    continuations (right-padded, so no real token sees padding) at positions $p, p + 1, \\dots$.
    Equal to running every ``prefix_ids + c`` in full, up to float rounding.
    """
    check_n_top(model, n_top)
    if not prefix_ids or not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError("need a non-empty prefix and at least one continuation, each non-empty")
    check_positive_int("batch_size", batch_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n_prefix = len(prefix_ids)
    out = model.model(input_ids=torch.tensor([list(prefix_ids)], device=device), use_cache=True,
                      output_hidden_states=True)
    prefix = out.hidden_states[len(decoder_layers(model)) - n_top][0]
    parts = []
    for start in range(0, len(continuations), batch_size):
        chunk = [list(c) for c in continuations[start:start + batch_size]]
        longest = max(len(c) for c in chunk)
        ids = torch.tensor([c + [c[-1]] * (longest - len(c)) for c in chunk], device=device)
        mask = torch.tensor([[1] * (n_prefix + len(c)) + [0] * (longest - len(c)) for c in chunk],
                            device=device)
        cache = repeat_cache(out.past_key_values, len(chunk))
        hidden = trunk_hidden(model, n_top, input_ids=ids, attention_mask=mask, past_key_values=cache,
                              use_cache=True)
        parts += [h[:len(c)].clone() for h, c in zip(hidden, chunk)]
    model.train(was_training)
    return prefix.clone(), parts


def causal_mask(n_query: int, n_past: int, like: torch.Tensor) -> torch.Tensor:
    """(1, 1, q, past + q) additive mask (eager and SDPA attention alike): every past key visible,
    causal among the ``n_query`` new ones; dtype and device of ``like``."""
    mask = torch.zeros(1, 1, n_query, n_past + n_query, dtype=like.dtype, device=like.device)
    future = torch.ones(n_query, n_query, dtype=torch.bool, device=like.device).triu(1)
    mask[..., n_past:] = mask[..., n_past:].masked_fill(future, torch.finfo(like.dtype).min)
    return mask


def run_layers(layers: Sequence[nn.Module], rotary_emb: nn.Module, hidden: torch.Tensor, start: int = 0,
               past_key_values=None, n_past: int = 0) -> torch.Tensor:
    """Run decoder ``layers`` on ``hidden`` (b, n, d) at positions ``start .. start + n - 1``.

    The mask is causal among the $n$ tokens, which see all ``n_past`` keys and values already in
    ``past_key_values`` (a ``transformers`` cache, or anything with its ``update`` method). Exact for
    every real token of a right-padded batch. Returns the hidden states after the last layer.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (batch, seq, d), got shape {tuple(hidden.shape)}")
    n = hidden.shape[1]
    positions = torch.arange(start, start + n, device=hidden.device)[None]
    rope = rotary_emb(hidden, positions)
    mask = causal_mask(n, n_past, hidden)
    for layer in layers:
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, past_key_values=past_key_values,
                       position_embeddings=rope)
    return hidden


def last_token_top_layer(model: nn.Module, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(batch, d): the model's last decoder layer and final norm, computed at each row's last real
    position only.

    A reward read at the last token needs the top layer's output there alone: keys and values for
    every position, but one query, one attention row and one MLP call per sequence, instead of one per
    token. Equal to ``top_forward(model, hidden, 1)[rows, lengths - 1]`` (:mod:`utils.finetune`) on
    right-padded ``hidden`` (batch, seq, d). Rotary embeddings are ``transformers``' own
    ``apply_rotary_pos_emb`` (the half-split layout).
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (batch, seq, d), got shape {tuple(hidden.shape)}")
    lengths = torch.as_tensor(lengths, device=hidden.device).long()
    b, n, _ = hidden.shape
    if lengths.shape != (b,) or (lengths < 1).any() or (lengths > n).any():
        raise ValueError(f"need one length in 1..{n} per row, got {lengths.tolist()}")
    layer, cfg = decoder_layers(model)[-1], model.config
    attn, n_heads, n_kv = layer.self_attn, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = attn.head_dim
    positions = torch.arange(n, device=hidden.device)
    cos, sin = model.model.rotary_emb(hidden, positions[None])  # (1, n, head_dim)
    x = layer.input_layernorm(hidden)
    k = attn.k_proj(x).view(b, n, n_kv, head_dim).transpose(1, 2)  # (b, kv heads, n, head_dim)
    v = attn.v_proj(x).view(b, n, n_kv, head_dim).transpose(1, 2)
    k, _ = apply_rotary_pos_emb(k, k, cos, sin)
    rows, last = torch.arange(b, device=hidden.device), lengths - 1
    q = attn.q_proj(x[rows, last]).view(b, n_heads, 1, head_dim)
    q, _ = apply_rotary_pos_emb(q, q, cos[0, last][:, None], sin[0, last][:, None])
    visible = (positions[None] < lengths[:, None])[:, None, None]  # (b, 1, 1, n): real tokens only
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=attn.scaling,
                                         enable_gqa=n_heads != n_kv)
    h = hidden[rows, last] + attn.o_proj(out.reshape(b, n_heads * head_dim))
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.model.norm(h)
