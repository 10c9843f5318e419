"""Position information for attention (taught in Part 1, "Positions").

Attention alone is blind to order. Three ways to tell it where each token is:

- absolute sinusoidal encodings, added to the token embeddings (Vaswani et al., 2017);
- rotary position embeddings (RoPE), which rotate queries and keys so that
  $q_m \\cdot k_n$ depends only on $m - n$ (Su et al., 2024);
- ALiBi, a per-head linear penalty $-s_h\\,|i - j|$ added to the attention scores (Press et al., 2022).
"""
from __future__ import annotations

import math

import torch

from utils.checks import check_positive_int


def _check_base(base: float) -> None:
    if not base > 1:
        raise ValueError(f"base must be > 1, got {base!r}")


def sinusoidal_encoding(n_positions: int, d_model: int, base: float = 10_000.0) -> torch.Tensor:
    """The sinusoidal table of shape ``(n_positions, d_model)``:

    $$ PE_{p, 2i} = \\sin(p\\,\\omega_i), \\quad PE_{p, 2i+1} = \\cos(p\\,\\omega_i), \\quad
       \\omega_i = \\text{base}^{-2i/d_{\\text{model}}} . $$
    """
    check_positive_int("n_positions", n_positions)
    check_positive_int("d_model", d_model)
    if d_model % 2:
        raise ValueError(f"d_model must be even (sin/cos pairs), got {d_model}")
    _check_base(base)
    omega = base ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (d/2,)
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * omega  # (n, d/2)
    table = torch.stack([angles.sin(), angles.cos()], dim=-1)  # (n, d/2, 2): sin, cos interleaved
    return table.flatten(1).float()


def rope_frequencies(head_dim: int, base: float = 10_000.0) -> torch.Tensor:
    """RoPE's rotation speeds $\\theta_i = \\text{base}^{-2i/d}$, $i = 0, \\dots, d/2 - 1$ (float32).

    Computed exactly as Llama does (``1 / base ** (arange(0, d, 2) / d)`` in float32), so that the
    angles, and hence the rotated vectors, match its implementation bit for bit.
    """
    check_positive_int("head_dim", head_dim)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (RoPE rotates pairs of dimensions), got {head_dim}")
    _check_base(base)
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def apply_rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    base: float = 10_000.0,
    interleaved: bool = False,
) -> torch.Tensor:
    """Rotate each pair of dimensions of ``x`` (shape ``(..., seq, head_dim)``) by ``position * theta_i``.

    $$ \\begin{pmatrix} x'_a \\\\ x'_b \\end{pmatrix} =
       \\begin{pmatrix} \\cos p\\theta_i & -\\sin p\\theta_i \\\\ \\sin p\\theta_i & \\cos p\\theta_i \\end{pmatrix}
       \\begin{pmatrix} x_a \\\\ x_b \\end{pmatrix} $$

    ``positions`` holds one integer position per sequence element, shape ``(seq,)`` or any shape that
    broadcasts against ``x.shape[:-1]``. Pairs are ``(i, i + d/2)`` as in Llama/Hugging Face
    (``interleaved=False``) or ``(2i, 2i + 1)`` as in the RoFormer paper (``interleaved=True``); the two
    layouts differ only by a fixed permutation of the dimensions.
    """
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., seq, head_dim), got {tuple(x.shape)}")
    if positions.is_floating_point() or positions.is_complex():
        raise ValueError(f"positions must be integers, got dtype {positions.dtype}")
    if positions.numel() and positions.min() < 0:
        raise ValueError("positions must be non-negative")
    theta = rope_frequencies(x.shape[-1], base).to(x.device)  # (d/2,)
    angles = positions.to(x.device, torch.float32)[..., None] * theta  # (..., seq, d/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    if interleaved:
        x_a, x_b = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x_a, x_b = x[..., :half], x[..., half:]
    out_a = x_a * cos - x_b * sin
    out_b = x_a * sin + x_b * cos
    if interleaved:
        return torch.stack([out_a, out_b], dim=-1).flatten(-2)
    return torch.cat([out_a, out_b], dim=-1)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes: a geometric sequence starting at $2^{-8/h}$ with the same ratio.

    For a number of heads that is not a power of two, Press et al. take the slopes of the next lower
    power of two and fill up with every other slope of twice that many heads; we do the same.
    """
    check_positive_int("n_heads", n_heads)

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        lower = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(lower) + power_of_two(2 * lower)[0::2][: n_heads - lower]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(n_heads: int, n: int) -> torch.Tensor:
    """Additive attention bias of shape ``(n_heads, n, n)``: $B_{h,i,j} = -s_h\\,|i - j|$.

    Add it to the scores $QK^\\top/\\sqrt{d_k}$ before the softmax. A causal model also masks
    $j > i$, so only the part $j \\le i$, a penalty growing with distance into the past, matters.
    """
    check_positive_int("n", n)
    slopes = alibi_slopes(n_heads)
    pos = torch.arange(n)
    distance = (pos[:, None] - pos[None, :]).abs().float()  # (n, n)
    return -slopes[:, None, None] * distance
