"""The roofline model for LLM inference (Part 4, "Inference arithmetic and the KV cache").

A forward pass over ``n`` tokens does $F$ floating-point operations and reads $B$ bytes (the weights once,
plus the KV cache). On a machine with peak throughput $\\pi$ (FLOP/s) and memory bandwidth $\\beta$
(bytes/s) it cannot take less than

$$ t \\ge \\max\\!\\left(\\frac{F}{\\pi},\\; \\frac{B}{\\beta}\\right), $$

so its attainable throughput is $\\min(\\pi,\\; I\\beta)$ with arithmetic intensity $I = F/B$ (FLOPs per
byte) (Williams, Waterman and Patterson, 2009). Decoding one token at a time has $I \\approx 1/2$ FLOP per byte in
float32 and is memory-bound; prefilling many tokens reuses every weight $n$ times and becomes compute-bound.

Two microbenchmarks measure $\\beta$ (:func:`memory_bandwidth`, summing a large tensor: every byte is read
once) and $\\pi$ (:func:`matmul_flops`, a large square matrix product); the other functions turn a
:class:`utils.llama.LlamaConfig` into FLOPs, bytes and bounds.
"""
from __future__ import annotations

import torch

from utils.checks import check_positive_int, check_positive_number
from utils.llama import LlamaConfig, forward_flops_per_token, kv_cache_bytes_per_token, parameter_breakdown
from utils.measure import benchmark


__all__ = [
    "memory_bandwidth",
    "matmul_flops",
    "weight_bytes_per_forward",
    "forward_flops",
    "forward_bytes",
    "arithmetic_intensity",
    "attainable_flops",
    "forward_time_bound_s",
    "decode_bound_tokens_per_s",
    "prefill_bound_tokens_per_s",
]


def memory_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 5, warmup: int = 1) -> float:
    """Read bandwidth of this machine's memory in bytes/s: ``n_bytes`` of float32 summed, median of repeats.

    Summing reads every byte once and writes nothing, like a decoding step reading the weights. Choose
    ``n_bytes`` well above the CPU caches (hundreds of MiB) or you measure the cache instead.
    """
    check_positive_int("n_bytes", n_bytes, minimum=4)
    data = torch.ones(n_bytes // 4, dtype=torch.float32)
    timing = benchmark(data.sum, repeats=repeats, warmup=warmup)
    return data.numel() * 4 / timing.median_s


def matmul_flops(n: int = 1024, repeats: int = 5, warmup: int = 1,
                 dtype: torch.dtype = torch.float32) -> float:
    """Throughput of an (n, n) @ (n, n) matrix product in FLOP/s ($2n^3$ FLOPs each), median of repeats."""
    check_positive_int("n", n)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(dtype)
    b = torch.randn(n, n, generator=generator).to(dtype)
    timing = benchmark(lambda: a @ b, repeats=repeats, warmup=warmup)
    return 2 * n**3 / timing.median_s


def weight_bytes_per_forward(cfg: LlamaConfig, bytes_per_param: float = 4) -> float:
    """Bytes of weights one forward pass reads: every matrix once (the output head's too), the norms.

    The embedding lookup reads only the rows of the tokens it embeds (negligible); with tied embeddings
    the same matrix is read in full as the output head.
    """
    check_positive_number("bytes_per_param", bytes_per_param)
    parts = parameter_breakdown(cfg)
    params = parts["attention"] + parts["MLP"] + parts["norms"] + cfg.vocab_size * cfg.d_model
    return params * bytes_per_param


def forward_flops(cfg: LlamaConfig, n_tokens: int, past: int = 0) -> int:
    """FLOPs of one forward pass over ``n_tokens`` new tokens after ``past`` cached ones.

    Token $i$ (1-based) attends to $past + i$ tokens, so this is
    $\\sum_{i=1}^{n}$ ``forward_flops_per_token(cfg, past + i)``, in closed form.
    """
    check_positive_int("n_tokens", n_tokens)
    check_positive_int("past", past, minimum=0)
    per_context = forward_flops_per_token(cfg, 1) - forward_flops_per_token(cfg, 0)
    contexts = n_tokens * past + n_tokens * (n_tokens + 1) // 2  # sum of past + i over i = 1..n
    return n_tokens * forward_flops_per_token(cfg, 0) + per_context * contexts


def forward_bytes(cfg: LlamaConfig, n_tokens: int, past: int = 0, bytes_per_param: float = 4,
                  kv_bytes_per_value: float | None = None) -> float:
    """Bytes one forward pass moves: the weights once, plus the keys/values of all ``past + n_tokens``
    positions (the cache dtype defaults to the weights' one). Activations are ignored (they are small
    and stay in the CPU caches)."""
    check_positive_int("n_tokens", n_tokens)
    check_positive_int("past", past, minimum=0)
    kv_bytes = bytes_per_param if kv_bytes_per_value is None else kv_bytes_per_value
    kv = (past + n_tokens) * kv_cache_bytes_per_token(cfg, kv_bytes)
    return weight_bytes_per_forward(cfg, bytes_per_param) + kv


def arithmetic_intensity(cfg: LlamaConfig, n_tokens: int, past: int = 0,
                         bytes_per_param: float = 4) -> float:
    """FLOPs per byte moved by a forward pass over ``n_tokens`` (about ``n_tokens / bytes_per_param * 2``)."""
    return forward_flops(cfg, n_tokens, past) / forward_bytes(cfg, n_tokens, past, bytes_per_param)


def attainable_flops(intensity: float, peak_flops: float, bandwidth: float) -> float:
    """The roofline: $\\min(\\pi, I\\beta)$ FLOP/s at arithmetic intensity $I$."""
    for name, value in (("intensity", intensity), ("peak_flops", peak_flops), ("bandwidth", bandwidth)):
        check_positive_number(name, value)
    return min(peak_flops, intensity * bandwidth)


def forward_time_bound_s(cfg: LlamaConfig, n_tokens: int, peak_flops: float, bandwidth: float,
                         past: int = 0, bytes_per_param: float = 4) -> float:
    """The least time a forward pass over ``n_tokens`` can take: $\\max(F/\\pi, B/\\beta)$ seconds."""
    check_positive_number("peak_flops", peak_flops)
    check_positive_number("bandwidth", bandwidth)
    flops = forward_flops(cfg, n_tokens, past)
    moved = forward_bytes(cfg, n_tokens, past, bytes_per_param)
    return max(flops / peak_flops, moved / bandwidth)


def decode_bound_tokens_per_s(cfg: LlamaConfig, bytes_per_param: float, bandwidth: float,
                              context: int = 0, kv_bytes_per_value: float | None = None) -> float:
    """Upper bound on decoding speed (batch 1): bandwidth / bytes read per token, weights + KV cache.

    ``context`` is the number of positions already cached when the token is decoded; the cache's
    dtype defaults to the weights' one (``kv_bytes_per_value`` sets it apart, e.g. int8 weights
    beside a float32 cache). For quantized weights with scales, pass their average stored bytes per
    weight (:func:`utils.fastdecode.bytes_per_weight`).
    """
    check_positive_number("bandwidth", bandwidth)
    return bandwidth / forward_bytes(cfg, 1, context, bytes_per_param, kv_bytes_per_value)


def prefill_bound_tokens_per_s(cfg: LlamaConfig, n_tokens: int, peak_flops: float) -> float:
    """Upper bound on prefill speed: a prompt of ``n_tokens`` cannot go faster than peak FLOP/s allows."""
    check_positive_number("peak_flops", peak_flops)
    return n_tokens * peak_flops / forward_flops(cfg, n_tokens)
