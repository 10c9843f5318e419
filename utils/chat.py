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
  key/value cache; :func:`repeat_cache` copies it for a batch of rows. :class:`ChatGenerator` uses
  both to reply to many chats that share a system prompt or examples (greedy or sampled, optionally
  under a token mask); :mod:`utils.prompting` and :mod:`utils.hf_llama` use them to score or encode
  many suffixes after one prefix.
- :data:`IGNORE_INDEX`: the label that cross-entropy (ours and transformers') skips.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from utils.checks import check_positive_int

__all__ = [
    "IGNORE_INDEX",
    "ChatGenerator",
    "InPlaceCache",
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


# ============================================================================ a shared prefix, run once


@torch.inference_mode()
def prefix_cache(model: nn.Module, prefix_ids: Sequence[int], in_place: bool = False) -> Any:
    """The key/value cache of ``prefix_ids`` (one row) after one forward pass of ``model``.

    Many prompts that start with the same tokens (a system prompt, few-shot examples) need those
    tokens' keys and values only once: copy this cache for each batch (:func:`repeat_cache`) and run
    only each row's own suffix, at positions ``len(prefix_ids), ...``. Only the last position's logits
    are computed (``logits_to_keep=1``). ``in_place=True`` makes it an :class:`InPlaceCache`, for
    generating many tokens after the prefix; for one forward pass over the suffixes (scoring) the
    default ``DynamicCache`` is as fast and holds no spare room.
    """
    prefix = list(prefix_ids)
    if not prefix:
        raise ValueError("prefix_cache needs a non-empty prefix_ids")
    device = next(model.parameters()).device
    ids = torch.tensor([prefix], device=device)
    cache = InPlaceCache() if in_place else DynamicCache()
    return model(input_ids=ids, use_cache=True, past_key_values=cache,
                 logits_to_keep=1).past_key_values


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
    examples) is prefilled once (:func:`prefix_cache`), its cache kept for later calls with the same
    prefix and the same weights (a training step or ``load_state_dict`` in between makes it run the
    prefix again) and copied for each batch (:func:`repeat_cache`); every row's own suffix is padded in
    the middle (attention mask 0), so that positions and greedy output are those of a plain
    left-padded ``generate`` (:func:`generate_replies`). :meth:`count_tokens` counts a text's tokens.
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

    def _cache(self, prefix: list[int], rows: int) -> Any:
        key = (tuple(prefix), self._weights_version())
        if self._prefix is None or self._prefix[0] != key:
            self._prefix = (key, prefix_cache(self.model, prefix, in_place=True))
        return repeat_cache(self._prefix[1], rows)

    def _options(self) -> dict:
        if self.temperature is None:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": float(self.temperature), "top_k": 0,
                "top_p": 1.0}

    @torch.inference_mode()
    def __call__(self, chats: list[list[dict]]) -> list[str]:
        if not chats:
            return []
        ids = [prompt_ids(self.tokenizer, chat) for chat in chats]
        shared = 0  # the shared prefix, leaving every row at least one token of its own
        while shared < min(map(len, ids)) - 1 and all(r[shared] == ids[0][shared] for r in ids):
            shared += 1
        prefix, pad = ids[0][:shared], pad_token_id(self.tokenizer)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        replies = [""] * len(ids)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            suffixes = [ids[i][shared:] for i in rows]
            width = max(map(len, suffixes))
            input_ids = torch.tensor([prefix + [pad] * (width - len(s)) + s for s in suffixes])
            mask = torch.tensor([[1] * shared + [0] * (width - len(s)) + [1] * len(s)
                                 for s in suffixes])
            extra = {"past_key_values": self._cache(prefix, len(rows)) if shared else InPlaceCache()}
            if self.index is not None:
                from utils.constrained import RegexLogitsProcessor
                extra["logits_processor"] = [RegexLogitsProcessor(self.index)]
            out = self.model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                      max_new_tokens=self.max_new_tokens, num_beams=1,
                                      pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id,
                                      **self._options(), **extra)
            for i, row in zip(rows, out[:, input_ids.shape[1]:]):
                replies[i] = self.tokenizer.decode(row, skip_special_tokens=True).strip()
        self.model.train(was_training)
        return replies
