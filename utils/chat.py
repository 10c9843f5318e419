"""The chat interface every part uses: messages, prompt token ids, left padding, batched greedy replies.

One rule per idea, decided here once:

- **Messages.** :func:`messages` turns a prompt (a string, or a list of ``{"role", "content"}`` dicts)
  and an optional system message into the list a chat template reads.
- **Token ids.** :func:`chat_ids` renders messages with the tokenizer's chat template; :func:`prompt_ids`
  is the prompt up to the opened assistant turn (``add_generation_prompt=True``), optionally followed by
  words put in the model's mouth (``assistant_prefix``). :func:`render_prompt` is the same as text, and
  :func:`prompt_tokens` its length (what prefill processes).
- **Padding.** :func:`pad_token_id`: the tokenizer's pad token, else its end-of-sequence token, else a
  clear error (the attention mask hides padding, so any real token id will do). :func:`left_pad`
  pads prompts on the left, so every row's next token follows its own last token.
- **Generation.** :func:`greedy_continuations` (token-id prompts) and :func:`generate_replies`
  (chat prompts): greedy, batched, left-padded, stopping at the end-of-sequence token.
- **A cache that does not copy itself.** :class:`InPlaceCache` is ``transformers``' ``DynamicCache``
  with each step's keys and values written into spare room (as :class:`utils.kvcache.KVCache` does)
  instead of concatenated onto a new copy of the whole cache; the generation helpers here use it.
- **A shared prefix, run once.** :func:`prefix_cache` runs a prompt prefix once and keeps its
  key/value cache; :func:`repeat_cache` copies it for a batch of rows: :mod:`utils.prompting` and
  :mod:`utils.hf_llama` use them to score or encode many suffixes after one prefix.
- **A shared prefix, read once.** :class:`ChatGenerator` replies to many chats that share a system
  prompt or examples (greedy or sampled, optionally under a token mask). It keeps the prefix's cache
  as one row and never copies it: its attention (:func:`shared_prefix_attention`, registered with
  ``transformers`` as :data:`SHARED_PREFIX_ATTENTION`) scores every row's queries against the
  prefix with one matrix product and against the row's own keys apart, under one softmax; rows
  that have finished leave the batch.
- :data:`IGNORE_INDEX`: the label that cross-entropy (ours and transformers') skips.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from utils.checks import check_positive_int

__all__ = [
    "IGNORE_INDEX",
    "ChatGenerator",
    "InPlaceCache",
    "SHARED_PREFIX_ATTENTION",
    "chat_ids",
    "generate_replies",
    "greedy_continuations",
    "left_pad",
    "messages",
    "pad_token_id",
    "prefix_cache",
    "prompt_ids",
    "prompt_tokens",
    "render_prompt",
    "repeat_cache",
    "shared_prefix_attention",
]

IGNORE_INDEX = -100  # label value that cross-entropy (ours and transformers') skips


def messages(prompt: str | list[dict], system: str | None = None) -> list[dict]:
    """The chat messages of a prompt: a bare string becomes one user turn; ``system`` goes first."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("prompt is empty: pass the user's message (a non-empty string)")
        chat = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        for m in prompt:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise TypeError(f"each message must be a dict with str 'role' and 'content', got {m!r}")
        chat = [dict(m) for m in prompt]
    else:
        raise TypeError("prompt must be a non-empty str or a non-empty list of {'role', 'content'} dicts, "
                        f"got {type(prompt).__name__} {prompt!r:.60}")
    if system is not None:
        if not isinstance(system, str):
            raise TypeError(f"system must be a str or None, got {type(system).__name__}")
        if chat[0]["role"] == "system":
            raise ValueError("the prompt already starts with a system message; pass system=None or drop it")
        chat.insert(0, {"role": "system", "content": system})
    return chat


def _check_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat_template; set one (tokenizer.chat_template = '...jinja...') "
                         "or use a chat model such as SmolLM2-135M-Instruct (utils.load_llm())")


def chat_ids(tokenizer, chat: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of the messages ``chat`` rendered with the tokenizer's chat template."""
    _check_template(tokenizer)
    encoded = tokenizer.apply_chat_template(messages(chat), tokenize=True, return_dict=True,
                                            add_generation_prompt=add_generation_prompt)
    return list(encoded["input_ids"])


def render_prompt(tokenizer, prompt: str | list[dict], assistant_prefix: str = "",
                  system: str | None = None) -> str:
    """The exact text the model reads: the prompt's :func:`messages` through the chat template, with
    the assistant turn opened (``add_generation_prompt=True``) and started with ``assistant_prefix``
    (words put in the model's mouth, e.g. ``"According to source ["`` to make it pick a source)."""
    chat = messages(prompt, system)
    _check_template(tokenizer)
    if not isinstance(assistant_prefix, str):
        raise TypeError(f"assistant_prefix must be a string, got {type(assistant_prefix).__name__}")
    return tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) + assistant_prefix


def prompt_ids(tokenizer, prompt: str | list[dict], system: str | None = None,
               assistant_prefix: str = "") -> list[int]:
    """Token ids of :func:`render_prompt`: the prompt up to the opened assistant turn (plus
    ``assistant_prefix``), ready for the model's first reply token. Without a prefix it equals
    ``chat_ids(tokenizer, messages(prompt, system), add_generation_prompt=True)``."""
    text = render_prompt(tokenizer, prompt, assistant_prefix, system)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_tokens(tokenizer, prompt: str | list[dict], assistant_prefix: str = "",
                  system: str | None = None) -> int:
    """Number of tokens of :func:`render_prompt` (what prefill processes)."""
    return len(prompt_ids(tokenizer, prompt, system, assistant_prefix))


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its end-of-sequence token (the attention
    mask hides padding, so any real token will do)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a pad token nor an eos token; set one, e.g. "
                     "tokenizer.pad_token = tokenizer.unk_token")


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` (batch, longest) of token-id lists padded on the LEFT with
    ``pad_id`` (mask 0), so that every row's last real token sits at the end."""
    rows = [list(s) for s in sequences]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("left_pad needs at least one sequence, each non-empty")
    if not isinstance(pad_id, int) or isinstance(pad_id, bool):
        raise TypeError(f"pad_id must be an int, got {pad_id!r}; use pad_token_id(tokenizer)")
    longest = max(len(r) for r in rows)
    ids = [[pad_id] * (longest - len(r)) + r for r in rows]
    mask = [[0] * (longest - len(r)) + [1] * len(r) for r in rows]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


@torch.inference_mode()
def greedy_continuations(model: nn.Module, tokenizer, prompts: Sequence[Sequence[int]],
                         max_new_tokens: int = 48, batch_size: int = 8,
                         processor: Callable[[], Callable] | None = None) -> list[str]:
    """Greedy continuations of token-id ``prompts``, in the same order, decoded without special
    tokens (not stripped, so that a caller can put text in front first).

    Prompts are sorted by length so that a batch holds similar lengths, padded on the LEFT
    (:func:`left_pad`, :func:`pad_token_id`) with an attention mask that hides the padding.
    Generation stops at ``max_new_tokens`` or when every row has produced the end-of-sequence token.
    The key/value cache is an :class:`InPlaceCache` (same tokens as ``generate``'s default cache).
    ``processor``, if given, makes a fresh logits processor for each batch (e.g.
    ``lambda: RegexLogitsProcessor(index)`` from :mod:`utils.constrained`), passed to ``generate``.
    """
    check_positive_int("max_new_tokens", max_new_tokens)
    check_positive_int("batch_size", batch_size)
    prompts = [list(p) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if not prompts:
        return []
    pad_id = pad_token_id(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:  # the model's own stopping rule
        eos = model.generation_config.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        input_ids, mask = left_pad([prompts[i] for i in idx], pad_id)
        extra = {} if processor is None else {"logits_processor": [processor()]}
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad_id, eos_token_id=eos,
                             past_key_values=InPlaceCache(), **extra)
        for i, row in zip(idx, out[:, input_ids.shape[1]:]):
            texts[i] = tokenizer.decode(row, skip_special_tokens=True)
    model.train(was_training)
    return texts


def generate_replies(model: nn.Module, tokenizer, prompts: Sequence[str | list[dict]],
                     max_new_tokens: int = 48, batch_size: int = 8, system: str | None = None,
                     assistant_prefix: str = "",
                     processor: Callable[[], Callable] | None = None) -> list[str]:
    """Greedy replies, one per prompt (a user message, or a chat as a list of message dicts), in the
    same order, stripped of surrounding whitespace: :func:`prompt_ids` of each prompt, then
    :func:`greedy_continuations`. With an ``assistant_prefix`` every reply starts with it (the model
    continues the words put in its mouth). ``processor``: see :func:`greedy_continuations`."""
    if isinstance(prompts, (str, dict)) or any(isinstance(p, dict) for p in prompts):
        raise TypeError("prompts is a list of prompts (each a str or a list of message dicts); "
                        "wrap a single chat as [messages]")
    ids = [prompt_ids(tokenizer, p, system, assistant_prefix) for p in prompts]
    return [(assistant_prefix + text).strip()
            for text in greedy_continuations(model, tokenizer, ids, max_new_tokens, batch_size,
                                             processor)]


# ================================================================== a cache that does not copy itself


class _InPlaceLayer(DynamicLayer):
    """One layer of :class:`InPlaceCache`: ``keys``/``values`` are views of the first ``length``
    positions of a buffer with spare room; ``update`` writes the new positions into the room."""

    room = 128  # spare positions allocated each time the buffer grows

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key_states``/``value_states`` after the filled positions; return the views of
        all filled positions. With autograd recording (tensors that need gradients), append by
        concatenation as ``DynamicLayer`` does: an in-place write would overwrite tensors saved
        for the backward pass."""
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.numel() else 0
        new = key_states.shape[-2]
        buffers = getattr(self, "_buffers", None)
        # Reallocate when there is no buffer, no room, or ``keys`` no longer lives in it (transformers'
        # crop keeps the view; batch_repeat_interleave, batch_select_indices, reset make new tensors).
        if (buffers is None or self.keys.data_ptr() != buffers[0].data_ptr()
                or buffers[0].shape[-2] < length + new
                or buffers[0].shape[:-2] != key_states.shape[:-2]):
            shape = (*key_states.shape[:-2], length + new + self.room, key_states.shape[-1])
            buffers = (key_states.new_empty(shape), value_states.new_empty(shape))
            if length:
                buffers[0][..., :length, :] = self.keys
                buffers[1][..., :length, :] = self.values
            self._buffers = buffers
        buffers[0][..., length:length + new, :] = key_states
        buffers[1][..., length:length + new, :] = value_states
        self.keys = buffers[0][..., :length + new, :]
        self.values = buffers[1][..., :length + new, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        # Select rows of the buffer itself, so the spare room survives (one copy, not two).
        buffers = getattr(self, "_buffers", None)
        if buffers is None or self.keys.data_ptr() != buffers[0].data_ptr():
            super().batch_select_indices(indices)
            return
        length = self.keys.shape[-2]
        self._buffers = (buffers[0][indices], buffers[1][indices])
        self.keys = self._buffers[0][..., :length, :]
        self.values = self._buffers[1][..., :length, :]


class InPlaceCache(DynamicCache):
    """``transformers``' ``DynamicCache`` that appends each step's keys and values in place.

    ``DynamicCache`` appends with ``torch.cat``, which copies the whole cache of every layer at every
    decoding step: for ``B`` rows of ``t`` cached tokens that is ``2 * n_layers * B * n_kv_heads * t *
    head_dim`` values moved per generated token, a cost that grows with the prompt and the batch (with
    a long shared system prompt copied into every row it rivals the matrix products on a CPU). Here each
    layer keeps a buffer with room for :attr:`_InPlaceLayer.room` more positions; a step writes only its
    own position, and the buffer is copied once per ``room`` steps. ``keys``/``values`` are views of
    the filled part, so attention reads exactly the same numbers: outputs are identical to
    ``DynamicCache``'s (tested). Pass ``past_key_values=InPlaceCache()`` to ``model(...)`` or
    ``model.generate(...)``; :func:`greedy_continuations` and :class:`ChatGenerator` do.
    """

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=_InPlaceLayer)


# ================================================= attention to a shared prefix, read once per step

SHARED_PREFIX_ATTENTION = "llms_executed_shared_prefix"  # the name transformers knows it by


def shared_prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float | None = None, shared_prefix: Any = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """Attention over ``[shared prefix; each row's own keys]`` with the prefix stored once.

    ``shared_prefix`` is a one-row cache of the prefix (:func:`prefix_cache`); ``key``/``value`` are
    the rows' own (batch, kv heads, S, head dim) and ``attention_mask`` (a boolean mask over them, or
    None for causal) masks only those. The prefix is visible to every query, so at a decoding step
    (one query per row) its scores for all rows come from one matrix product per key/value head,
    reading its keys and values once instead of once per row; one softmax over both parts (a shared
    maximum and a shared sum) makes it the same attention as over the concatenation, up to float
    rounding. (For many queries per row, the rows' prompts, it runs SDPA over the concatenation.)
    For a query with scores
    $s^{pre} = q K_{pre}^\\top$ and $s^{own} = q K_{own}^\\top$ (scaled, own keys masked):

    $$ m = \\max(\\max_j s^{pre}_j, \\max_j s^{own}_j), \\qquad
       o = \\frac{\\sum_j e^{s^{pre}_j - m} v^{pre}_j + \\sum_j e^{s^{own}_j - m} v^{own}_j}
                {\\sum_j e^{s^{pre}_j - m} + \\sum_j e^{s^{own}_j - m}} $$

    Without ``shared_prefix`` it is ``transformers``' SDPA attention.
    """
    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      **kwargs)
    unsupported = [name for name in ("softcap", "sliding_window", "s_aux", "position_bias")
                   if kwargs.get(name) is not None] + (["dropout"] if kwargs.get("dropout") else [])
    if unsupported:
        raise ValueError(f"shared_prefix_attention does not implement {unsupported}; this model "
                         "needs its own attention (ChatGenerator falls back for such models)")
    layer = shared_prefix.layers[module.layer_idx]
    k_pre, v_pre = layer.keys[0], layer.values[0]  # (kv heads, P, head dim)
    rows, heads, q_len, dim = query.shape
    kv_heads, prefix_len, own_len = key.shape[1], k_pre.shape[1], key.shape[2]
    if attention_mask is None:  # causal: query t sees its own keys up to S - q_len + t
        attention_mask = (torch.arange(own_len, device=query.device)[None, :]
                          <= torch.arange(own_len - q_len, own_len,
                                          device=query.device)[:, None])[None, None]
    visible = attention_mask.expand(rows, 1, q_len, own_len)
    if q_len > 1:
        # Many own tokens at once (the rows' prompts): the scores of every query against the
        # prefix are a large tensor that SDPA's fused kernel never builds, so here the prefix is
        # copied into every row once and SDPA runs over the concatenation (measured faster).
        full = [torch.cat([t.expand(rows, -1, -1, -1), own], dim=2)
                for t, own in ((layer.keys, key), (layer.values, value))]
        seen = torch.cat([visible.new_ones(rows, 1, q_len, prefix_len), visible], dim=3)
        return sdpa_attention_forward(module, query, *full, seen, scaling=scaling, **kwargs)
    group = heads // kv_heads  # queries that share one key/value head, per row
    scale = dim ** -0.5 if scaling is None else scaling
    q = (query * scale).reshape(rows, kv_heads, group, dim)
    pre = torch.matmul(q.transpose(0, 1).reshape(kv_heads, rows * group, dim),
                       k_pre.transpose(1, 2))  # (kv heads, rows * group, P)
    pre = pre.view(kv_heads, rows, group, prefix_len).transpose(0, 1)
    own = torch.matmul(q, key.transpose(2, 3))  # (rows, kv heads, group, S)
    own = own.masked_fill(~visible, float("-inf"))  # the mask broadcasts over the group
    pre, own = pre.float(), own.float()  # the softmax in float32 (no copy for float32 models)
    top = torch.maximum(pre.amax(-1, keepdim=True), own.amax(-1, keepdim=True))
    pre, own = pre.sub_(top).exp_(), own.sub_(top).exp_()
    total = pre.sum(-1, keepdim=True) + own.sum(-1, keepdim=True)
    pre, own = pre.div_(total), own.div_(total)  # weights first: no overflow in half precision
    out_pre = torch.matmul(pre.transpose(0, 1).reshape(kv_heads, rows * group, prefix_len),
                           v_pre.float())
    out = out_pre.view(kv_heads, rows, group, dim).transpose(0, 1) + torch.matmul(own,
                                                                                  value.float())
    out = out.to(query.dtype).reshape(rows, heads, 1, dim)
    return out.transpose(1, 2).contiguous(), None


def _splits_attention(model: nn.Module) -> bool:
    """Whether :func:`shared_prefix_attention` can stand in for ``model``'s attention: the model
    calls transformers' attention functions, and every layer attends to all earlier tokens with
    no logit soft-capping (no sliding window, as in Gemma 2 or Mistral's sliding layers)."""
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    full = (all(t == "full_attention" for t in layer_types) if layer_types
            else getattr(config, "sliding_window", None) is None)
    return (bool(getattr(model, "_supports_attention_backend", False)) and full
            and getattr(config, "attn_logit_softcapping", None) is None)


@contextlib.contextmanager
def _attention(model: nn.Module, implementation: str) -> Iterator[None]:
    """``model`` runs its attention with ``implementation`` inside the block (restored after)."""
    before = model.config._attn_implementation
    model.config._attn_implementation = implementation
    try:
        yield
    finally:
        model.config._attn_implementation = before


AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, sdpa_mask)


# ============================================================================ a shared prefix, run once


@torch.inference_mode()
def prefix_cache(model: nn.Module, prefix_ids: Sequence[int]) -> Any:
    """The key/value cache of ``prefix_ids`` (one row) after one forward pass of ``model``.

    Many prompts that start with the same tokens (a system prompt, few-shot examples) need those
    tokens' keys and values only once: copy this cache for each batch (:func:`repeat_cache`) and run
    only each row's own suffix, at positions ``len(prefix_ids), ...``. Only the last position's logits
    are computed (``logits_to_keep=1``).
    """
    prefix = list(prefix_ids)
    if not prefix:
        raise ValueError("prefix_cache needs a non-empty prefix_ids")
    device = next(model.parameters()).device
    ids = torch.tensor([prefix], device=device)
    return model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values


def repeat_cache(cache: Any, rows: int) -> Any:
    """A copy of a one-row ``transformers`` cache with its row repeated ``rows`` times (the original
    is left untouched, so it can be reused for the next batch)."""
    check_positive_int("rows", rows)
    copied = copy.deepcopy(cache)
    copied.batch_repeat_interleave(rows)
    return copied


class ChatGenerator:
    """Replies of a Hugging Face chat model to a batch of chats: ``generate(chats) -> replies``.

    Greedy when ``temperature`` is None, else sampled at that temperature (no top-k or top-p), from
    torch's global generator (seed it once). ``index`` (a :class:`utils.constrained.TokenIndex`)
    constrains every reply to its language. Chats are rendered with the chat template
    (:func:`prompt_ids`); the longest token prefix that all chats of a call share (system prompt,
    examples) is prefilled once (:func:`prefix_cache`), its one-row cache kept for later calls with
    the same prefix and the same weights (a training step or ``load_state_dict`` in between makes it
    run the prefix again). Each batch caches only the rows' own tokens (an :class:`InPlaceCache`);
    the model's attention is switched, for the call, to :data:`SHARED_PREFIX_ATTENTION`, which reads
    the prefix's keys and values once for all rows instead of once per row. Every row's own suffix
    is left-padded (attention mask 0) and numbered from the end of the prefix, so that positions, and
    greedy output up to float rounding, are those of a plain left-padded ``generate``
    (:func:`generate_replies`; tested). Decoding is a loop of our own that does what ``generate``
    does with these settings (the mask, the temperature, the argmax or one sample), with one
    difference: once a quarter of the batch has emitted EOS, the finished rows leave it, so the rows
    still writing do not carry them (``generate`` computes every row until the longest reply ends).
    Settings in the model's ``generation_config`` (a repetition penalty and the like) are not
    applied. :meth:`count_tokens` counts a text's tokens.
    """

    def __init__(self, model: nn.Module, tokenizer, max_new_tokens: int = 40, index=None,
                 temperature: float | None = None, batch_size: int = 16):
        check_positive_int("max_new_tokens", max_new_tokens)
        check_positive_int("batch_size", batch_size)
        if temperature is not None and not (isinstance(temperature, (int, float))
                                            and temperature > 0):
            raise ValueError(f"temperature must be a number > 0 or None (greedy), got "
                             f"{temperature!r}")
        self.model, self.tokenizer, self.index = model, tokenizer, index
        self.max_new_tokens, self.temperature, self.batch_size = (max_new_tokens, temperature,
                                                                  batch_size)
        self._prefix: tuple[tuple, Any] | None = None

    def count_tokens(self, text: str) -> int:
        """The number of tokens of ``text`` (no special tokens added)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _weights_version(self) -> tuple[int, ...]:
        # torch counts in-place changes of every tensor (an optimiser step, load_state_dict), so a
        # kept prefix cache is never reused after the weights it was computed with have changed
        return tuple(p._version for p in self.model.parameters())

    def _prefix_kv(self, prefix: list[int]) -> Any:
        # The prefix's one-row cache, kept while the prefix and the weights stay the same; it is
        # only read (by the shared-prefix attention), never copied or appended to.
        key = (tuple(prefix), self._weights_version())
        if self._prefix is None or self._prefix[0] != key:
            self._prefix = (key, prefix_cache(self.model, prefix))
        return self._prefix[1]

    def _next_tokens(self, logits: torch.Tensor, states: list[int] | None) -> torch.Tensor:
        # What generate does with these settings: the mask (a constraint), the temperature, then
        # the argmax or one sample from the softmax.
        if states is not None:
            from utils.constrained import mask_logits
            masks = torch.stack([self.index.allowed_mask(s, logits.shape[-1]) for s in states])
            logits = mask_logits(logits, masks)
        if self.temperature is None:
            return logits.argmax(dim=-1)
        probs = (logits / float(self.temperature)).softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)

    def _decode(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, past: Any,
                prefix: Any) -> list[list[int]]:
        """New tokens of every row (EOS not included): greedy or sampled, masked by ``index``.

        ``ids`` and ``pos`` are the tokens not yet in the cache ``past`` and their positions,
        ``mask`` the attention mask over the cache and them; ``prefix`` is the shared prefix's
        one-row cache when the shared-prefix attention reads it (else None). A row that has
        emitted EOS is finished: what it computes afterwards is thrown away. Once a quarter of the batch has finished, the finished rows leave it (their cache rows
        dropped: one copy of the rows' cache), so the rows still writing stop carrying them;
        dropping every row the moment it finishes would copy the cache too often."""
        stop = self.tokenizer.eos_token_id
        if stop is None:  # the model's own stopping rule
            stop = self.model.generation_config.eos_token_id
        stop = set(stop) if isinstance(stop, (list, tuple)) else {stop}
        extra = {} if prefix is None else {"shared_prefix": prefix}
        rows = list(range(ids.shape[0]))  # the reply each batch row writes
        done = [False] * len(rows)
        tokens: list[list[int]] = [[] for _ in rows]
        states = None if self.index is None else [0] * len(rows)
        for _ in range(self.max_new_tokens):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                             past_key_values=past, use_cache=True, logits_to_keep=1, **extra)
            chosen = self._next_tokens(out.logits[:, -1].float(), states).tolist()
            for j, token in enumerate(chosen):
                if done[j]:
                    continue
                if token in stop:
                    done[j] = True
                    continue
                tokens[rows[j]].append(token)
                if states is not None:
                    states[j] = self.index.next_state(states[j], token)
            if all(done):
                break
            if sum(done) >= max(1, len(rows) // 4):
                keep = [j for j in range(len(rows)) if not done[j]]
                index = torch.tensor(keep, device=mask.device)
                past.batch_select_indices(index)
                mask, pos = mask[index], pos[index]
                rows, chosen = [rows[j] for j in keep], [chosen[j] for j in keep]
                states = None if states is None else [states[j] for j in keep]
                done = [False] * len(rows)
            ids = torch.tensor([[token] for token in chosen], device=mask.device)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            pos = pos[:, -1:] + 1
        return tokens

    @torch.inference_mode()
    def __call__(self, chats: list[list[dict]]) -> list[str]:
        if not chats:
            return []
        ids = [prompt_ids(self.tokenizer, chat) for chat in chats]
        shared = 0  # the shared prefix, leaving every row at least one token of its own
        while shared < min(map(len, ids)) - 1 and all(r[shared] == ids[0][shared] for r in ids):
            shared += 1
        pad = pad_token_id(self.tokenizer)
        was_training = self.model.training
        self.model.eval()
        try:
            return self._reply(ids, shared, pad)
        finally:
            self.model.train(was_training)

    def _reply(self, ids: list[list[int]], shared: int, pad: int) -> list[str]:
        prefix, device = ids[0][:shared], next(self.model.parameters()).device
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        replies = [""] * len(ids)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            suffixes = [ids[i][shared:] for i in rows]
            width = max(map(len, suffixes))
            input_ids = torch.tensor([prefix + [pad] * (width - len(s)) + s for s in suffixes])
            mask = torch.tensor([[1] * shared + [0] * (width - len(s)) + [1] * len(s)
                                 for s in suffixes])
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate numbers them
            own = [t[:, shared:].to(device) for t in (input_ids, mask, positions)]
            if shared and _splits_attention(self.model):
                with _attention(self.model, SHARED_PREFIX_ATTENTION):
                    new = self._decode(*own, InPlaceCache(), self._prefix_kv(prefix))
            else:  # the prefix's cache copied into every row, the model's own attention
                past = (repeat_cache(self._prefix_kv(prefix), len(rows)) if shared
                        else InPlaceCache())
                new = self._decode(own[0], mask.to(device), own[2], past, None)
            for i, row in zip(rows, new):
                replies[i] = self.tokenizer.decode(row, skip_special_tokens=True).strip()
        return replies
