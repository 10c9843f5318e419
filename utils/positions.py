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


__all__ = [
    "sinusoidal_encoding",
    "rope_frequencies",
    "rope_cos_sin",
    "rotate_half",
    "rope_rotate",
    "apply_rope",
    "alibi_slopes",
    "alibi_bias",
]


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


def _check_positions(positions: torch.Tensor) -> None:
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a tensor of integer positions, got {type(positions).__name__}")
    if positions.is_floating_point() or positions.is_complex():
        raise ValueError(f"positions must be integers (e.g. torch.arange(seq)), got dtype {positions.dtype}")
    if positions.numel() and positions.min() < 0:
        raise ValueError("positions must be non-negative")


def rope_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    base: float = 10_000.0,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables RoPE rotates with: cos and sin of $p\\,\\theta_i$, shape ``positions.shape + (head_dim,)``.

    Each angle appears twice, once for each dimension of its pair: at $i$ and $i + d/2$ (the layout of
    Llama and Hugging Face) or at $2i$ and $2i + 1$ (``interleaved=True``, the RoFormer paper's). Compute
    them once per forward pass and share them across layers and heads (:class:`utils.llama.Llama` does).
    """
    _check_positions(positions)
    theta = rope_frequencies(head_dim, base).to(positions.device)  # (d/2,)
    angles = positions.float()[..., None] * theta  # (..., seq, d/2)
    if interleaved:
        angles = angles.repeat_interleave(2, dim=-1)  # (..., seq, d): theta_0, theta_0, theta_1, ...
    else:
        angles = torch.cat([angles, angles], dim=-1)  # (..., seq, d): theta_0, ..., theta_0, ...
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Each dimension's partner, with the sign the rotation needs: $(x_a, x_b) \\to (-x_b, x_a)$ per pair.

    Pairs are the two halves of the last dimension, $(x_i, x_{i+d/2})$, or neighbours $(x_{2i}, x_{2i+1})$
    with ``interleaved=True``.
    """
    if interleaved:
        return torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """The RoPE rotation with precomputed tables:
    $x \\odot \\cos + \\operatorname{rotate\\_half}(x) \\odot \\sin$.

    Per pair that is the 2x2 rotation of :func:`apply_rope`: $x'_a = x_a\\cos - x_b\\sin$,
    $x'_b = x_b\\cos + x_a\\sin$. ``cos`` and ``sin`` come from :func:`rope_cos_sin` with the same
    ``interleaved`` and must broadcast against ``x`` (..., seq, head_dim).
    """
    if cos.shape != sin.shape or cos.shape[-1:] != x.shape[-1:]:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape ending in "
                         f"head_dim={x.shape[-1]}; build them with rope_cos_sin(positions, head_dim)")
    try:
        torch.broadcast_shapes(cos.shape, x.shape)
    except RuntimeError:
        raise ValueError(f"cos/sin of shape {tuple(cos.shape)} do not fit x of shape {tuple(x.shape)}: "
                         "they need one row per sequence position of x") from None
    return x * cos.to(x.dtype) + rotate_half(x, interleaved) * sin.to(x.dtype)


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
    layouts differ only by a fixed permutation of the dimensions. The two steps, building the tables
    (:func:`rope_cos_sin`) and rotating (:func:`rope_rotate`), are separate functions so that a model can
    build the tables once per forward pass and rotate every layer's queries and keys with them.
    """
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., seq, head_dim), got {tuple(x.shape)}")
    _check_positions(positions)
    try:
        fits = torch.broadcast_shapes(positions.shape, x.shape[:-1]) == x.shape[:-1]
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"positions of shape {tuple(positions.shape)} do not fit x of shape "
                         f"{tuple(x.shape)}: "
                         f"give one position per sequence element, e.g. torch.arange({x.shape[-2]})")
    cos, sin = rope_cos_sin(positions.to(x.device), x.shape[-1], base, interleaved)
    return rope_rotate(x, cos, sin, interleaved)


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
