"""Weight quantization from scratch: absmax and zero-point integers at tensor, channel or group
granularity, and QLoRA's 4-bit NormalFloat (NF4) with block-wise scales and double quantization.

Written once for Part 2 (QLoRA) and Part 4 (quantization), where chapters show these functions and
measure their error on SmolLM2's real weights. Everything here is plain PyTorch and runs on a CPU.
"""
from __future__ import annotations

import torch

from utils.checks import check_positive_int


__all__ = [
    "SCHEMES",
    "GRANULARITIES",
    "absmax_quantize",
    "absmax_dequantize",
    "zeropoint_quantize",
    "zeropoint_dequantize",
    "fake_quantize",
    "nf4_levels",
    "quantize_blockwise",
    "dequantize_blockwise",
    "double_quantize",
    "double_dequantize",
    "pack_nibbles",
    "unpack_nibbles",
    "bits_per_parameter",
]


SCHEMES = ("absmax", "zeropoint")
GRANULARITIES = ("tensor", "channel", "group")


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int from 2 to 8, got {bits!r}")


def _check_finite(x: torch.Tensor, name: str = "x") -> None:
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} holds {bad} NaN or infinite value(s) out of {x.numel()}: a scale computed "
                         "from them would be meaningless. Find where they come from (e.g. a diverged "
                         "training step), or replace them first (torch.nan_to_num)")


def _check_block(name: str, size: int, numel: int) -> None:
    check_positive_int(name, size)
    if numel % size:
        raise ValueError(f"{name} ({size}) must divide the number of values ({numel}); "
                         f"pick a size that divides it (e.g. a power of two that divides the row width)")


def absmax_quantize(x: torch.Tensor, bits: int = 8, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization: $q = \\mathrm{round}(x / s)$ with $s = \\max|x| / (2^{b-1}-1)$.

    ``dim=None`` uses one scale for the whole tensor; ``dim=d`` one scale per slice along ``d``
    (reduced over ``d``). Returns integer codes (int8) and the float scale(s), broadcastable to ``x``.
    """
    _check_bits(bits)
    _check_finite(x)
    qmax = 2 ** (bits - 1) - 1
    peak = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    scale = (peak / qmax).clamp_min(torch.finfo(torch.float32).tiny).float()
    q = torch.round(x.float() / scale).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """$\\hat x = q \\cdot s$."""
    return q.float() * scale


def zeropoint_quantize(x: torch.Tensor, bits: int = 8, dim: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization onto $0 \\dots 2^b - 1$: $q = \\mathrm{round}(x/s) + z$,
    $s = (\\max x - \\min x) / (2^b - 1)$, $z = \\mathrm{round}(-\\min x / s)$.

    Uses all $2^b$ codes even when ``x`` is not centred on zero (e.g. after a ReLU).
    Returns codes (uint8), scale(s) and zero point(s).
    """
    _check_bits(bits)
    _check_finite(x)
    qmax = 2 ** bits - 1
    low = x.amin() if dim is None else x.amin(dim=dim, keepdim=True)
    high = x.amax() if dim is None else x.amax(dim=dim, keepdim=True)
    low, high = low.float().clamp(max=0), high.float().clamp(min=0)  # keep 0 exactly representable
    scale = ((high - low) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.round(-low / scale)
    q = (torch.round(x.float() / scale) + zero).clamp(0, qmax).to(torch.uint8)
    return q, scale, zero


def zeropoint_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """$\\hat x = (q - z) \\cdot s$."""
    return (q.float() - zero) * scale


def fake_quantize(w: torch.Tensor, bits: int = 8, scheme: str = "absmax", granularity: str = "tensor",
                  group_size: int = 128) -> torch.Tensor:
    """Quantize then dequantize a weight matrix (out, in): what the model computes with.

    ``granularity``: one scale per ``"tensor"``, per output ``"channel"`` (row), or per ``"group"`` of
    ``group_size`` consecutive input weights within a row.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")
    if w.dim() != 2:
        raise ValueError(f"fake_quantize expects a 2-D weight (out, in), got shape {tuple(w.shape)}")
    x = w
    if granularity == "group":
        _check_block("group_size", group_size, w.shape[1])
        x = w.reshape(w.shape[0], w.shape[1] // group_size, group_size)
    dim = None if granularity == "tensor" else -1
    if scheme == "absmax":
        out = absmax_dequantize(*absmax_quantize(x, bits, dim))
    else:
        out = zeropoint_dequantize(*zeropoint_quantize(x, bits, dim))
    return out.reshape(w.shape).to(w.dtype)


def nf4_levels(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NormalFloat-4 levels of QLoRA: quantiles of a standard normal, scaled to [-1, 1].

    8 positive levels are the normal quantiles at probabilities evenly spaced from ``offset`` down to
    1/2, 7 negative ones likewise, plus an exact zero; dividing by the largest makes the ends ±1.
    Each level then covers about the same share of normally distributed weights.
    """
    if not 0.5 < offset < 1:
        raise ValueError(f"offset must be in (0.5, 1), got {offset}")
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (levels / levels.abs().max()).float()


def _check_levels(levels: torch.Tensor) -> None:
    if levels.dim() != 1 or len(levels) > 256 or len(levels) < 2:
        raise ValueError(f"levels must be a 1-D tensor of 2..256 values, got shape {tuple(levels.shape)}")
    if not torch.all(levels[1:] > levels[:-1]):
        raise ValueError("levels must be strictly increasing")


def quantize_blockwise(w: torch.Tensor, levels: torch.Tensor, block_size: int = 64
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook quantization with one absmax scale per block of ``block_size`` consecutive values.

    Each value is divided by its block's $\\max|w|$ and replaced by the index of the nearest level.
    Returns codes (uint8, flattened) and the per-block absmax (float32).
    """
    _check_levels(levels)
    _check_block("block_size", block_size, w.numel())
    _check_finite(w, "w")
    blocks = w.float().reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    normalised = (blocks / absmax[:, None]).reshape(-1)
    midpoints = (levels[1:] + levels[:-1]) / 2  # nearest level = number of midpoints below the value
    codes = torch.bucketize(normalised, midpoints.to(normalised.device)).to(torch.uint8)
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor,
                         shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """$\\hat w = \\mathrm{levels}[q] \\cdot \\mathrm{absmax}_{block}$, reshaped to ``shape``."""
    block_size = codes.numel() // absmax.numel()
    values = levels.to(codes.device)[codes.long()].reshape(-1, block_size) * absmax[:, None]
    return values.reshape(shape)


def double_quantize(absmax: torch.Tensor, block_size: int = 256
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the float32 block scales themselves to 8 bits (QLoRA's double quantization).

    The scales are all positive, so their mean is subtracted first and the centred values are absmax-
    quantized to int8 in blocks of ``block_size``. (bitsandbytes uses an 8-bit float code for this
    step; linear int8 is the same idea in its simplest form.) Returns codes, second-level scales, mean.
    """
    _check_block("block_size", block_size, absmax.numel())
    mean = absmax.mean()
    q, scale = absmax_quantize((absmax - mean).reshape(-1, block_size), bits=8, dim=1)
    return q.reshape(-1), scale.reshape(-1), mean


def double_dequantize(q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The block scales recovered from :func:`double_quantize`."""
    return (q.float().reshape(len(scale), -1) * scale[:, None]).reshape(-1) + mean


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte (first code in the high nibble): half the bytes of one code per byte."""
    if codes.numel() % 2:
        raise ValueError(f"need an even number of codes to pack pairs, got {codes.numel()}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("codes must be 4-bit (0..15) to pack two per byte")
    pairs = codes.to(torch.uint8).reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)


def bits_per_parameter(code_bits: int = 4, block_size: int = 64, double_quant_block: int | None = 256) -> float:
    """Storage per weight: the code plus the share of its block's scale.

    Without double quantization each block carries a 32-bit scale: $4 + 32/64 = 4.5$ bits. With it,
    an 8-bit scale per block plus a 32-bit scale per ``double_quant_block`` blocks:
    $4 + 8/64 + 32/(64 \\cdot 256) \\approx 4.127$ bits.
    """
    if code_bits < 1 or block_size < 1 or (double_quant_block is not None and double_quant_block < 1):
        raise ValueError("code_bits, block_size and double_quant_block must be positive")
    if double_quant_block is None:
        return code_bits + 32 / block_size
    return code_bits + 8 / block_size + 32 / (block_size * double_quant_block)
