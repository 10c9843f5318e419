"""Serving many requests at once with our Llama (Part 8, "Serving many requests").

Four ideas, each small, all on :class:`utils.llama.Llama` without changing it:

- **Ragged batches.** Prompts of different lengths are padded on the left; an attention mask
  $m_{b,j} \\in \\{0, 1\\}$ hides the padding and every row numbers its own positions from its first
  real token, $p_{b,i} = \\sum_{j \\le i} m_{b,j} - 1$ (:func:`positions_from_mask`), so RoPE sees
  the same positions as when the row runs alone. :class:`PaddedKVCache` and :func:`padded_generate`.
- **A paged KV cache** (vLLM's PagedAttention, Kwon et al. 2023). Keys and values live in one pool of
  fixed-size blocks of $B$ token slots; a sequence owns a *block table*, the list of its blocks, and
  its token $t$ sits in block ``table[t // B]`` at offset ``t % B``. Attention gathers a sequence's
  slots through its table. A sequence of $\\ell$ tokens holds $\\lceil \\ell / B \\rceil B$ slots
  instead of a preallocated maximum (:func:`paged_slots`, :func:`contiguous_slots`).
  :class:`PagedKVCache` and :func:`paged_forward`.
- **Continuous batching** (iteration-level scheduling, Orca, Yu et al. 2022). :func:`serve` admits
  waiting requests and retires finished ones at every decoding step; ``policy="static"`` admits only
  when the running batch has emptied. Arrivals come from :func:`poisson_arrivals`; each request's
  time to first token and time per output token come back in a :class:`RequestResult`.
- **Many LoRA adapters in one batch** (as S-LoRA and Punica serve them). :class:`MultiLoRALinear`
  keeps every adapter's $A_k, B_k$ stacked and applies row $b$'s own,
  $y_b = W x_b + s\\, B_{a_b} A_{a_b} x_b$ (:func:`attach_multi_lora`, :func:`set_adapter_ids`).

Every cache here has the same step protocol, so one forward pass (:func:`forward_with_kv`) serves
them all: ``attend(layer, k, v)`` stores the new keys/values and returns all keys/values each row may
read with a boolean mask (batch, n_new, n_keys); ``finish()`` moves the cache on after the last layer.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from utils.attention import scaled_dot_product_attention
from utils.checks import check_positive_int, check_positive_number
from utils.kvcache import KVCache
from utils.llama import Attention, Llama, LlamaConfig
from utils.positions import rope_cos_sin, rope_rotate

__all__ = [
    "positions_from_mask",
    "masked_attention",
    "forward_with_kv",
    "PaddedKVCache",
    "padded_forward",
    "padded_generate",
    "PagedKVCache",
    "paged_forward",
    "paged_generate",
    "contiguous_slots",
    "paged_slots",
    "Request",
    "RequestResult",
    "poisson_arrivals",
    "serve",
    "MultiLoRALinear",
    "attach_multi_lora",
    "set_adapter_ids",
    "detach_multi_lora",
]

# attend(layer, k_new, v_new) -> (keys, values, mask): the step protocol of every cache below
AttendFn = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _check_mask(mask: torch.Tensor, name: str = "attention_mask") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"{name} must be a (batch, n) tensor of 0/1 or booleans, got "
                         f"{getattr(mask, 'shape', type(mask).__name__)}")
    if mask.dtype != torch.bool:
        if mask.is_complex() or ((mask != 0) & (mask != 1)).any():
            raise ValueError(f"{name} must hold only 0 and 1 (or booleans): 1 = real token, 0 = padding")
        mask = mask.bool()
    return mask


def positions_from_mask(mask: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's own positions: $p_{b,i} = s_b + \\sum_{j \\le i} m_{b,j} - 1$, 0 at padding before
    the first real token.

    ``mask`` (batch, n) is 1 at real tokens; ``start`` (batch,) how many real tokens each row already
    has (0 for a fresh prompt). A left-padded row therefore starts at position 0 on its first real
    token, exactly as it would alone; what a padding slot gets does not matter, it is masked out.
    """
    mask = _check_mask(mask)
    positions = mask.long().cumsum(dim=-1) - 1
    if start is not None:
        positions = positions + start.to(positions.device).long()[:, None]
    return positions.clamp(min=0)


def masked_attention(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     attend: AttendFn, layer: int) -> torch.Tensor:
    """Grouped-query attention of :class:`utils.llama.Attention` with per-row positions and a mask.

    ``cos``/``sin`` are (batch, 1, n, head_dim), one row of RoPE angles per sequence. ``attend`` stores
    the new keys/values and returns what each row may read, keys (batch, n_kv_heads, T, head_dim) and
    a boolean mask (batch, n, T). As in the model's own attention, the ``group`` query heads of a KV
    head are folded into the query axis, so the cache is never copied per query head:

    $$ o = \\operatorname{softmax}\\!\\left(\\frac{q K^\\top}{\\sqrt{d_h}} + M\\right) V,
       \\qquad M_{b,i,j} = 0 \\text{ if row } b\\text{'s query } i \\text{ may read key } j,
       \\ -\\infty \\text{ otherwise}. $$
    """
    b, n, _ = x.shape
    h, kv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.wq(x).view(b, n, h, hd).transpose(1, 2)  # (b, H, n, hd)
    k = attn.wk(x).view(b, n, kv, hd).transpose(1, 2)  # (b, KV, n, hd)
    v = attn.wv(x).view(b, n, kv, hd).transpose(1, 2)
    q, k = rope_rotate(q, cos, sin), rope_rotate(k, cos, sin)
    keys, values, mask = attend(layer, k, v)
    group = h // kv
    mask = mask[:, None].repeat(1, 1, group, 1)  # (b, 1, group * n, T): rows ordered like q's fold
    out = scaled_dot_product_attention(q.reshape(b, kv, group * n, hd), keys, values, mask)
    return attn.wo(out.reshape(b, h, n, hd).transpose(1, 2).reshape(b, n, h * hd))


def _check_ids(model: Llama, idx: torch.Tensor) -> None:
    if not isinstance(model, Llama):
        raise TypeError(f"model must be a utils.llama.Llama (use utils.llama.from_hf), got "
                        f"{type(model).__name__}")
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be a (batch, n) tensor of token ids with n >= 1, got "
                         f"{getattr(idx, 'shape', type(idx).__name__)}")
    if idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(f"idx must hold integer token ids, got dtype {idx.dtype}")
    if idx.min() < 0 or idx.max() >= model.cfg.vocab_size:
        raise ValueError(f"token ids must be in [0, {model.cfg.vocab_size}), got {idx.min().item()} to "
                         f"{idx.max().item()}; were they made by another tokenizer?")


def forward_with_kv(model: Llama, idx: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                    last_only: bool = False) -> torch.Tensor:
    """Logits of :class:`utils.llama.Llama` for ``idx`` (batch, n) at per-row ``positions`` (batch, n),
    with keys and values kept by ``attend`` (the step protocol of the caches in this module).

    The same blocks as ``Llama.forward`` (pre-norm attention and MLP on the residual stream, final
    norm, tied head); only the attention reads a mask and per-row RoPE angles. ``last_only`` keeps
    the last position of each row: (batch, 1, vocab).
    """
    _check_ids(model, idx)
    if positions.shape != idx.shape:
        raise ValueError(f"positions {tuple(positions.shape)} must have the shape of idx {tuple(idx.shape)}")
    cos, sin = rope_cos_sin(positions, model.cfg.head_dim, model.cfg.rope_theta)
    cos, sin = cos[:, None], sin[:, None]  # (b, 1, n, hd): the same angles for every head
    x = model.tok_emb(idx)
    for i, block in enumerate(model.layers):
        x = x + masked_attention(block.attn, block.attn_norm(x), cos, sin, attend, i)
        x = x + block.mlp(block.mlp_norm(x))
    if last_only:
        x = x[:, -1:]
    return model.lm_head(model.norm(x))


# --------------------------------------------------------------------------- a padded, contiguous cache


class PaddedKVCache(KVCache):
    """A contiguous KV cache for a left-padded batch: :class:`utils.kvcache.KVCache` (one slot axis
    shared by every row) plus a mask of the slots that hold real tokens.

    ``k``/``v`` have shape (n_layers, batch, n_kv_heads, max_len, head_dim); ``valid`` (batch,
    max_len) marks real tokens, ``seen`` (batch,) counts each row's real tokens (its next position).
    Query $i$ in slot $s_i$ may read slot $j$ when $j \\le s_i$ and slot $j$ is valid.
    """

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(cfg, batch_size, max_len, dtype, device)  # length: slots used, padding too
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._mask: torch.Tensor | None = None
        self._n = 0

    def check(self, cfg: LlamaConfig, batch_size: int, n_new: int) -> None:
        """Refuse the unmasked path: ``Llama.forward(idx, cache=...)`` would ignore the padding."""
        raise TypeError("a PaddedKVCache needs its padding mask at every step: decode with "
                        "utils.serving.padded_forward (or padded_generate), not model(idx, cache=...)")

    def prepare(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Get ready for n new tokens per row (``new_mask`` (batch, n), 0 at padding); returns their
        positions (batch, n)."""
        new_mask = _check_mask(new_mask, "new_mask")
        b, n = new_mask.shape
        KVCache.check(self, self.cfg, b, n)  # the batch size and the room left
        positions = positions_from_mask(new_mask, start=self.seen)
        end = self.length + n
        self.valid[:, self.length:end] = new_mask.to(self.valid.device)
        slots = torch.arange(end, device=self.valid.device)
        causal = slots[None, :] <= slots[self.length:end, None]  # (n, end)
        self._mask = causal[None] & self.valid[:, None, :end]  # (b, n, end)
        self._n = n
        self.seen += new_mask.sum(dim=1).to(self.seen.device)
        return positions

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store a layer's new keys/values and return all of them with the step's mask."""
        if self._mask is None:
            raise RuntimeError("call prepare(new_mask) before the forward pass (padded_forward does)")
        return (*self.write(layer, k, v), self._mask)

    def finish(self) -> None:
        """Move on by the step's slots (after the last layer)."""
        self.advance(self._n)
        self._mask, self._n = None, 0


@torch.no_grad()
def padded_forward(model: Llama, idx: torch.Tensor, attention_mask: torch.Tensor, cache: PaddedKVCache,
                   last_only: bool = False) -> torch.Tensor:
    """Logits for a left-padded step (batch, n) that continues what ``cache`` holds."""
    _check_ids(model, idx)
    if attention_mask.shape != idx.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have the shape of idx "
                         f"{tuple(idx.shape)}")
    positions = cache.prepare(attention_mask)
    logits = forward_with_kv(model, idx, positions, cache.attend, last_only)
    cache.finish()
    return logits


@torch.no_grad()
def padded_generate(model: Llama, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int = 0,
                    eos_token_id: int | None = None, return_logits: bool = False
                    ) -> list[list[int]] | tuple[list[list[int]], torch.Tensor]:
    """Greedy replies to prompts of different lengths, decoded together in one left-padded batch.

    Returns each row's new tokens (cut after its ``eos_token_id``); with ``return_logits`` also the
    logits of every step, (batch, steps, vocab), the ones the tokens were chosen from. Rows that have
    finished keep decoding (their extra tokens are dropped) until every row has.
    """
    check_positive_int("max_new_tokens", max_new_tokens)
    rows = [list(p) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    longest = max(len(r) for r in rows)
    device = model.tok_emb.weight.device
    ids = torch.tensor([[pad_id] * (longest - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], device=device)
    cache = PaddedKVCache.for_model(model, len(rows), longest + max_new_tokens)
    logits = padded_forward(model, ids, mask, cache, last_only=True)[:, -1]
    steps, tokens = [logits], []
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        nxt = logits.argmax(dim=-1, keepdim=True)
        tokens.append(nxt)
        if eos_token_id is not None:
            done |= nxt[:, 0] == eos_token_id
        if step == max_new_tokens - 1 or done.all():
            break
        logits = padded_forward(model, nxt, torch.ones_like(nxt), cache, last_only=True)[:, -1]
        steps.append(logits)
    out = torch.cat(tokens, dim=1).tolist()
    replies = [_cut_at_eos(r, eos_token_id) for r in out]
    return (replies, torch.stack(steps, dim=1)) if return_logits else replies


def _cut_at_eos(tokens: list[int], eos_token_id: int | None) -> list[int]:
    if eos_token_id is not None and eos_token_id in tokens:
        return tokens[:tokens.index(eos_token_id) + 1]
    return tokens


# --------------------------------------------------------------------------- the paged cache


class PagedKVCache:
    """Keys and values in a shared pool of fixed-size blocks, found through per-sequence block tables.

    ``k``/``v`` have shape (n_layers, n_blocks * block_size, n_kv_heads, head_dim): block $i$ holds
    slots $iB, \\dots, iB + B - 1$. :meth:`add` opens a sequence, blocks are taken from the free list
    as it grows, :meth:`free` gives them back. A sequence's token $t$ lives in slot
    ``table[t // B] * B + t % B``; attention gathers the first ``length`` slots of each sequence
    through that formula (slots past the length are masked).
    """

    def __init__(self, cfg: LlamaConfig, n_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        check_positive_int("n_blocks", n_blocks)
        check_positive_int("block_size", block_size)
        shape = (cfg.n_layers, n_blocks * block_size, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.cfg, self.n_blocks, self.block_size = cfg, n_blocks, block_size
        self.free_blocks: deque[int] = deque(range(n_blocks))
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self._step: tuple | None = None

    @classmethod
    def for_model(cls, model: Llama, n_blocks: int, block_size: int = 16) -> "PagedKVCache":
        """A pool with the model's config, dtype and device."""
        w = model.tok_emb.weight
        return cls(model.cfg, n_blocks, block_size, dtype=w.dtype, device=w.device)

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks that hold ``n_tokens`` tokens: $\\lceil n / B \\rceil$."""
        return math.ceil(n_tokens / self.block_size)

    @property
    def used_blocks(self) -> int:
        """Blocks held by open sequences."""
        return self.n_blocks - len(self.free_blocks)

    def add(self, seq_id: int) -> None:
        """Open an empty sequence (no blocks yet)."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} is already open: free it first or use a new id")
        self.tables[seq_id], self.lengths[seq_id] = [], 0

    def free(self, seq_id: int) -> None:
        """Close a sequence and return its blocks to the pool."""
        self._check_open(seq_id)
        self.free_blocks.extend(self.tables.pop(seq_id))
        del self.lengths[seq_id]

    def _check_open(self, seq_id: int) -> None:
        if seq_id not in self.tables:
            raise KeyError(f"sequence {seq_id} is not open: call add({seq_id}) first "
                           f"(open: {sorted(self.tables)})")

    def prepare(self, seq_ids: Sequence[int], n_new: int) -> torch.Tensor:
        """Reserve slots for ``n_new`` tokens in each listed sequence (taking blocks as needed), build
        the step's write and read indices and mask; returns the new tokens' positions (batch, n_new)."""
        check_positive_int("n_new", n_new)
        if not seq_ids or len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids must be a non-empty list of distinct open sequences, got {seq_ids}")
        for s in seq_ids:
            self._check_open(s)
        need = sum(self.blocks_for(self.lengths[s] + n_new) - len(self.tables[s]) for s in seq_ids)
        if need > len(self.free_blocks):
            raise RuntimeError(f"the pool has {len(self.free_blocks)} free blocks and this step needs {need}: "
                               "make the pool larger (n_blocks) or run fewer sequences at once")
        for s in seq_ids:
            while len(self.tables[s]) < self.blocks_for(self.lengths[s] + n_new):
                self.tables[s].append(self.free_blocks.popleft())
        device, bs = self.k.device, self.block_size
        starts = torch.tensor([self.lengths[s] for s in seq_ids], device=device)
        positions = starts[:, None] + torch.arange(n_new, device=device)  # (b, n)
        ends = starts + n_new
        n_keys = int(ends.max())
        width = self.blocks_for(n_keys)
        table = torch.tensor([t + [t[0]] * (width - len(t)) for t in (self.tables[s] for s in seq_ids)],
                             device=device)  # (b, width), short tables padded with a real block
        key_pos = torch.arange(n_keys, device=device)
        read = table[:, key_pos // bs] * bs + key_pos % bs  # (b, n_keys) slots in the pool
        write = read.gather(1, positions).reshape(-1)  # (b * n,)
        mask = key_pos[None, None, :] <= positions[:, :, None]  # causal: (b, n, n_keys)
        self._step = (list(seq_ids), n_new, read, write, mask)
        return positions

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scatter the new keys/values into their slots, then gather each sequence's slots."""
        if self._step is None:
            raise RuntimeError("call prepare(seq_ids, n_new) before the forward pass (paged_forward does)")
        _, _, read, write, mask = self._step
        b, kv, n, hd = k.shape
        self.k[layer, write] = k.transpose(1, 2).reshape(b * n, kv, hd)
        self.v[layer, write] = v.transpose(1, 2).reshape(b * n, kv, hd)
        keys = self.k[layer, read].transpose(1, 2)  # (b, KV, n_keys, hd)
        values = self.v[layer, read].transpose(1, 2)
        return keys, values, mask

    def finish(self) -> None:
        """Count the step's tokens as stored (after the last layer)."""
        seq_ids, n_new, *_ = self._step
        for s in seq_ids:
            self.lengths[s] += n_new
        self._step = None


@torch.no_grad()
def paged_forward(model: Llama, idx: torch.Tensor, cache: PagedKVCache, seq_ids: Sequence[int],
                  last_only: bool = False) -> torch.Tensor:
    """Logits for ``idx`` (batch, n): row $b$ continues open sequence ``seq_ids[b]`` of ``cache``.

    Every row brings the same number of new tokens (a prompt alone, or one token per row when
    decoding), so no padding is ever stored in the pool.
    """
    _check_ids(model, idx)
    if len(seq_ids) != idx.shape[0]:
        raise ValueError(f"one sequence id per row: got {len(seq_ids)} ids for {idx.shape[0]} rows")
    if cache.cfg != model.cfg:
        raise ValueError("this pool was made for another model configuration: use "
                         "PagedKVCache.for_model(model, n_blocks)")
    positions = cache.prepare(seq_ids, idx.shape[1])
    logits = forward_with_kv(model, idx, positions, cache.attend, last_only)
    cache.finish()
    return logits


@torch.no_grad()
def paged_generate(model: Llama, prompt: Sequence[int], max_new_tokens: int, cache: PagedKVCache,
                   seq_id: int = 0, eos_token_id: int | None = None, return_logits: bool = False
                   ) -> list[int] | tuple[list[int], torch.Tensor]:
    """Greedy reply to one prompt through the paged cache (the sequence is freed afterwards)."""
    check_positive_int("max_new_tokens", max_new_tokens)
    device = model.tok_emb.weight.device
    cache.add(seq_id)
    try:
        logits = paged_forward(model, torch.tensor([list(prompt)], device=device), cache, [seq_id],
                               last_only=True)[:, -1]
        tokens, steps = [], [logits]
        for step in range(max_new_tokens):
            tokens.append(int(logits.argmax(dim=-1)))
            if step == max_new_tokens - 1 or tokens[-1] == eos_token_id:
                break
            logits = paged_forward(model, torch.tensor([[tokens[-1]]], device=device), cache, [seq_id],
                                   last_only=True)[:, -1]
            steps.append(logits)
    finally:
        cache.free(seq_id)
    return (tokens, torch.cat(steps)) if return_logits else tokens


def _check_lengths(lengths: Sequence[int]) -> list[int]:
    values = [check_positive_int("each length", x) for x in lengths]
    if not values:
        raise ValueError("lengths is empty: pass the token count of every request")
    return values


def contiguous_slots(lengths: Sequence[int], max_len: int) -> int:
    """Token slots a contiguous cache reserves: every request gets ``max_len``, $N \\cdot L_{max}$."""
    values = _check_lengths(lengths)
    check_positive_int("max_len", max_len)
    if max(values) > max_len:
        raise ValueError(f"a request of {max(values)} tokens does not fit max_len={max_len}: raise max_len")
    return len(values) * max_len


def paged_slots(lengths: Sequence[int], block_size: int) -> int:
    """Token slots a paged cache holds: $\\sum_r \\lceil \\ell_r / B \\rceil B$ (waste < B per request)."""
    check_positive_int("block_size", block_size)
    return sum(math.ceil(x / block_size) * block_size for x in _check_lengths(lengths))


# --------------------------------------------------------------------------- continuous batching


@dataclass(frozen=True)
class Request:
    """One client request: prompt token ids, how many tokens it may get, when it arrives (seconds)."""

    rid: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    arrival_s: float = 0.0

    def __post_init__(self) -> None:
        check_positive_int("max_new_tokens", self.max_new_tokens)
        if not self.prompt:
            raise ValueError(f"request {self.rid} has an empty prompt")
        if not self.arrival_s >= 0:
            raise ValueError(f"arrival_s must be >= 0, got {self.arrival_s}")


@dataclass
class RequestResult:
    """What the server did with one request (times in seconds on the server's clock)."""

    rid: int
    tokens: list[int]
    arrival_s: float
    first_token_s: float = math.nan
    finish_s: float = math.nan

    @property
    def ttft_s(self) -> float:
        """Time to first token: queueing plus prefill, $t_{first} - t_{arrival}$."""
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first, $(t_{finish} - t_{first}) / (n - 1)$ (NaN if n = 1)."""
        n = len(self.tokens)
        return (self.finish_s - self.first_token_s) / (n - 1) if n > 1 else math.nan


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Arrival times of ``n`` requests from a Poisson process of ``rate`` requests per second:
    exponential gaps with mean $1/\\lambda$, cumulated; the first arrives after one gap."""
    check_positive_int("n", n)
    check_positive_number("rate", rate)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return np.cumsum(gaps).tolist()


@dataclass
class _Running:
    request: Request
    result: RequestResult
    last: int = 0
    extra_blocks: int = 0  # blocks it may still take before it finishes


@torch.no_grad()
def serve(model: Llama, requests: Sequence[Request], policy: str = "continuous", max_batch: int = 8,
          cache: PagedKVCache | None = None, eos_token_id: int | None = None,
          timer: Callable[[], float] = time.perf_counter) -> list[RequestResult]:
    """Serve ``requests`` greedily on a paged cache; returns one :class:`RequestResult` per request.

    The clock is simulated around real compute: it starts at 0, jumps to the next arrival when the
    server is idle, and moves on by the measured time of every forward pass. Each iteration:

    1. **Admit.** ``"continuous"``: every waiting request that has arrived joins while fewer than
       ``max_batch`` run and the pool can hold its worst case (prompt + ``max_new_tokens``) next to
       the others' worst cases, so no request is ever evicted (requests that arrive during these
       prefills may join too). ``"static"``: only when nothing is running, the requests waiting at
       that moment form a batch, which runs until its longest request is done. A joining request's
       prompt is prefilled alone; its first token comes out of that pass.
    2. **Decode.** One forward pass with one token per running request.
    3. **Retire.** Requests that reached ``max_new_tokens`` or ``eos_token_id`` leave; their blocks go
       back to the pool.
    """
    if policy not in ("continuous", "static"):
        raise ValueError(f"policy must be 'continuous' or 'static', got {policy!r}")
    check_positive_int("max_batch", max_batch)
    if not requests or len({r.rid for r in requests}) != len(requests):
        raise ValueError("requests must be a non-empty list with distinct rids")
    if cache is None:
        longest = max(len(r.prompt) + r.max_new_tokens for r in requests)
        cache = PagedKVCache.for_model(model, max_batch * math.ceil(longest / 16), 16)
    worst = max(cache.blocks_for(len(r.prompt) + r.max_new_tokens) for r in requests)
    if worst > cache.n_blocks:
        raise ValueError(f"a request needs up to {worst} blocks but the pool has {cache.n_blocks}: "
                         "make it larger")
    device = model.tok_emb.weight.device
    waiting = deque(sorted(requests, key=lambda r: (r.arrival_s, r.rid)))
    running: dict[int, _Running] = {}
    results: dict[int, RequestResult] = {}
    now = 0.0

    def timed(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        nonlocal now
        start = timer()
        out = fn()
        now += timer() - start
        return out

    def done(state: _Running) -> bool:
        tokens = state.result.tokens
        return len(tokens) >= state.request.max_new_tokens or tokens[-1] == eos_token_id

    def retire(rid: int) -> None:
        state = running.pop(rid)
        state.result.finish_s = now
        cache.free(rid)
        results[rid] = state.result

    while waiting or running:
        if not running and waiting[0].arrival_s > now:
            now = waiting[0].arrival_s  # idle until the next request comes
        may_admit = policy == "continuous" or not running
        cutoff = now  # a static batch is formed from the requests waiting at this moment
        while (may_admit and waiting and len(running) < max_batch
               and waiting[0].arrival_s <= (now if policy == "continuous" else cutoff)):
            req = waiting[0]
            blocks = cache.blocks_for(len(req.prompt) + req.max_new_tokens)
            if blocks > len(cache.free_blocks) - sum(s.extra_blocks for s in running.values()):
                break  # wait until running requests give blocks back
            waiting.popleft()
            cache.add(req.rid)
            ids = torch.tensor([list(req.prompt)], device=device)
            logits = timed(lambda: paged_forward(model, ids, cache, [req.rid], last_only=True))
            state = _Running(req, RequestResult(req.rid, [int(logits[0, -1].argmax())], req.arrival_s))
            state.result.first_token_s = now
            state.last = state.result.tokens[0]
            state.extra_blocks = blocks - len(cache.tables[req.rid])
            running[req.rid] = state
            if done(state):
                retire(req.rid)
        if not running:
            continue
        rids = list(running)
        ids = torch.tensor([[running[r].last] for r in rids], device=device)
        logits = timed(lambda: paged_forward(model, ids, cache, rids, last_only=True))
        for rid, token in zip(rids, logits[:, -1].argmax(dim=-1).tolist()):
            state = running[rid]
            state.result.tokens.append(token)
            state.last = token
            held = len(cache.tables[rid])
            state.extra_blocks = cache.blocks_for(len(state.request.prompt) + state.request.max_new_tokens) - held
            if done(state):
                retire(rid)
    return [results[r.rid] for r in requests]


# --------------------------------------------------------------------------- many LoRA adapters


class MultiLoRALinear(nn.Module):
    """A frozen linear layer plus $K$ LoRA adapters, one chosen per batch row:

    $$ y_b = W x_b + s\\, B_{a_b} (A_{a_b} x_b), \\qquad a_b \\in \\{0, \\dots, K - 1\\}
       \\text{ or } -1 \\text{ (the base model alone)}. $$

    ``A`` is (K, r, in), ``B`` (K, out, r); the rows' $A_{a_b}$ and $B_{a_b}$ are gathered and applied
    with two batched matrix products (what S-LoRA and Punica do with custom kernels on a GPU), so
    one forward pass serves a batch whose rows use different adapters.
    """

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MultiLoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
            raise ValueError(f"A must be (K, r, in) and B (K, out, r) with the same K and r, got "
                             f"{tuple(A.shape)} and {tuple(B.shape)}")
        if A.shape[2] != base.in_features or B.shape[1] != base.out_features:
            raise ValueError(f"adapters of shape A {tuple(A.shape)}, B {tuple(B.shape)} do not fit a "
                             f"{base.in_features} -> {base.out_features} layer")
        self.base = base.requires_grad_(False)
        self.register_buffer("A", A.detach().to(base.weight), persistent=False)
        self.register_buffer("B", B.detach().to(base.weight), persistent=False)
        self.scaling = float(scaling)
        self.adapter_ids: torch.Tensor | None = None

    @property
    def n_adapters(self) -> int:
        return self.A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_ids is None:
            raise RuntimeError("no adapter chosen: call set_adapter_ids(model, ids) with one id per row")
        ids = self.adapter_ids
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"{ids.shape[0]} adapter ids for a batch of {x.shape[0]} rows: call "
                             "set_adapter_ids(model, ids) with one id per row")
        use = (ids >= 0).to(x.dtype)[:, None, None]  # -1: the base model alone
        a, b = self.A[ids.clamp(min=0)], self.B[ids.clamp(min=0)]  # (batch, r, in), (batch, out, r)
        low = torch.bmm(x, a.transpose(1, 2))  # (batch, n, r)
        return self.base(x) + torch.bmm(low, b.transpose(1, 2)) * (self.scaling * use)


def attach_multi_lora(model: nn.Module, adapters: Sequence[dict[str, torch.Tensor]], scaling: float
                      ) -> list[str]:
    """Wrap every layer the adapters touch in a :class:`MultiLoRALinear` (in place).

    ``adapters`` are state dicts as :func:`utils.lora.lora_state_dict` names them
    (``"{layer}.lora_A"``, ``"{layer}.lora_B"``); all must touch the same layers with the same rank.
    ``scaling`` is $\\alpha / r$. Returns the wrapped layers' names.
    """
    if not adapters:
        raise ValueError("adapters is empty: pass one lora_state_dict per adapter")
    names = sorted({k[: -len(".lora_A")] for k in adapters[0] if k.endswith(".lora_A")})
    if not names:
        raise ValueError("no '<layer>.lora_A' tensors found: pass utils.lora.lora_state_dict(model) dicts")
    expected = {f"{n}.lora_{p}" for n in names for p in "AB"}
    for i, ad in enumerate(adapters):
        if set(ad) != expected:
            raise ValueError(f"adapter {i} does not touch the same layers as adapter 0: "
                             f"{sorted(set(ad) ^ expected)[:4]} differ")
    modules = dict(model.named_modules())
    for n in names:
        if not isinstance(modules.get(n), nn.Linear):
            raise ValueError(f"{n!r} is not an nn.Linear of this model (unload other adapters first)")
    for n in names:
        A = torch.stack([ad[f"{n}.lora_A"] for ad in adapters])
        B = torch.stack([ad[f"{n}.lora_B"] for ad in adapters])
        model.set_submodule(n, MultiLoRALinear(modules[n], A, B, scaling))
    return names


def set_adapter_ids(model: nn.Module, ids: Sequence[int] | torch.Tensor) -> None:
    """Choose each batch row's adapter (-1 = none) in every :class:`MultiLoRALinear` of ``model``."""
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    if not layers:
        raise ValueError("the model has no MultiLoRALinear layers: call attach_multi_lora first")
    ids = torch.as_tensor(ids, dtype=torch.long, device=layers[0].A.device)
    k = layers[0].n_adapters
    if ids.dim() != 1 or (ids < -1).any() or (ids >= k).any():
        raise ValueError(f"ids must be one adapter index per row in [-1, {k - 1}], got {ids.tolist()}")
    for m in layers:
        m.adapter_ids = ids


def detach_multi_lora(model: nn.Module) -> nn.Module:
    """Put each wrapped layer's base ``nn.Linear`` back (in place; returns ``model``)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, MultiLoRALinear):
            model.set_submodule(name, m.base)
    return model
