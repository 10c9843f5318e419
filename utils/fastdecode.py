"""Weight-only int8 and int4 decoding through PyTorch's packed CPU kernels (Part 8, "Serving many
requests", Step 5, "Fewer bytes per token for one stream").

Decoding one token at a time reads every weight once per token and does two FLOPs per weight, so it
waits on memory (chapter 4-01). Its speed limit is the roofline's memory bound

$$ \\text{tokens/s} \\le \\frac{\\beta}{B_{\\text{token}}}, \\qquad
   B_{\\text{token}} = \\sum_{\\text{matrices}} \\big(\\text{code bytes} + \\text{scale bytes}\\big)
   + \\text{norms} + (\\text{context} + 1)\\, b_{kv}, $$

with $\\beta$ the memory bandwidth and $b_{kv}$ the key/value bytes one position adds
(:func:`utils.llama.kv_cache_bytes_per_token`); :mod:`utils.roofline` computes it, given the average
stored bytes per weight (:func:`bytes_per_weight`). Storing the weights in fewer bits shrinks
$B_{\\text{token}}$; it only pays where a kernel multiplies in that format directly.

- **int8, per output channel** (:func:`quantize_int8`): $q_{ij} = \\mathrm{round}(w_{ij}/s_i)$,
  $s_i = \\max_j |w_{ij}| / 127$, so $\\hat w_{ij} = s_i q_{ij}$: 1 byte per weight plus one scale per
  row. Kernel: ``torch.ops.aten._weight_int8pack_mm``.
- **int4, group-wise asymmetric** (:func:`quantize_int4`): in each group of ``group_size``
  consecutive input weights of a row, $s = (\\max - \\min)/15$ and the codes $q \\in 0..15$ give
  $\\hat w = (q - 8)\\,s + z$, where $z$ is the value of code 8 (the kernel's convention; the
  textbook zero point is $\\min = z - 8s$). Half a byte per weight plus a scale and a zero per group.
  Kernels: ``torch.ops.aten._convert_weight_to_int4pack_for_cpu`` (packs the codes into the kernel's
  blocked layout) and ``torch.ops.aten._weight_int4pack_mm_for_cpu``.

:class:`Int8WeightOnlyLinear` and :class:`Int4WeightOnlyLinear` replace an ``nn.Linear``;
:func:`quantize_model` swaps every ``nn.Linear`` of a :class:`utils.llama.Llama` (the output head
too) and leaves norms, embeddings, attention and the KV cache in float32.
:func:`reference_linear` is the from-scratch check: dequantize, then an ordinary float32 matmul.

On this book's CPUs (PyTorch 2.x, x86 with AVX-512) both kernels are fast only with **bfloat16
activations** (and bfloat16 scales): float32 activations take another code path, many times slower
(chapter 8-04's Exercise 4 times both). The layers therefore cast each input vector to
``compute_dtype`` (bfloat16 by default), multiply, and cast the output back; the scales and zeros
are rounded to that dtype *before* the codes are chosen, so the stored grid is exactly the one the
kernel computes with. ``compute_dtype=torch.float32`` keeps everything in float32 (exact against the
reference, but slow): use it for checks, not for speed. :func:`kernel_support` says what the
installed torch offers.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from utils.checks import check_positive_int
from utils.llama import Llama, RMSNorm
from utils.roofline import weight_bytes_per_forward


__all__ = [
    "INT4_GROUP_SIZES",
    "COMPUTE_DTYPES",
    "kernel_support",
    "quantize_int8",
    "dequantize_int8",
    "quantize_int4",
    "dequantize_int4",
    "reference_linear",
    "Int8WeightOnlyLinear",
    "Int4WeightOnlyLinear",
    "quantize_model",
    "weight_bytes",
    "bytes_per_weight",
]


INT4_GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes ``_weight_int4pack_mm_for_cpu`` accepts."""
COMPUTE_DTYPES = (torch.bfloat16, torch.float32)
"""Activation dtypes the layers accept: bfloat16 (the fast path) or float32 (exact, slow)."""

_INT8 = "_weight_int8pack_mm"
_INT4_PACK = "_convert_weight_to_int4pack_for_cpu"
_INT4_MM = "_weight_int4pack_mm_for_cpu"


def kernel_support() -> dict[str, bool]:
    """Which of the three packed CPU kernels the installed torch provides, by op name."""
    return {name: hasattr(torch.ops.aten, name) for name in (_INT8, _INT4_PACK, _INT4_MM)}


def _require_kernels(*names: str) -> None:
    missing = [name for name in names if not kernel_support()[name]]
    if missing:
        raise RuntimeError(f"this torch ({torch.__version__}) lacks torch.ops.aten.{missing}: "
                           "weight-only int8/int4 CPU kernels need torch >= 2.5 (int4 on CPU: 2.6)")


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.numel() == 0:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got {shape}")
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got dtype {w.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError("the weight holds NaN or infinite values: a scale computed from them would "
                         "be meaningless; fix the weights first (e.g. torch.nan_to_num)")
    if w.device.type != "cpu":
        raise ValueError(f"these are CPU kernels: move the weight to the CPU first, got {w.device}")


def _check_compute_dtype(dtype: torch.dtype) -> None:
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {dtype}: other dtypes "
                         "take the kernels' slow path (float16) or are not supported")


def _round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` and back to float32 (what the kernel will see)."""
    return x.to(dtype).float()


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel absmax int8: codes (out, in) int8 in -127..127 and one scale per row (out,).

    $s_i = \\max_j |w_{ij}| / 127$, rounded to ``scale_dtype`` first (the kernel's dtype), then
    $q_{ij} = \\mathrm{clamp}(\\mathrm{round}(w_{ij} / s_i), -127, 127)$: every weight is within half
    a step $s_i/2$ of $s_i q_{ij}$ (up to the scale's rounding, a relative $2^{-9}$ in bfloat16).
    """
    _check_weight(w)
    _check_compute_dtype(scale_dtype)
    w = w.float()
    peak = w.abs().amax(dim=1)
    scale = _round_to((peak / 127).clamp_min(torch.finfo(torch.bfloat16).tiny), scale_dtype)
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale.to(scale_dtype)


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """$\\hat w_{ij} = s_i q_{ij}$ in float32, shape (out, in)."""
    return codes.float() * scale.float()[:, None]


def _check_group(group_size: int, in_features: int) -> None:
    check_positive_int("group_size", group_size)
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES} (what the int4 CPU kernel "
                         f"supports), got {group_size}")
    if in_features % group_size:
        fits = [g for g in INT4_GROUP_SIZES if in_features % g == 0]
        raise ValueError(f"group_size ({group_size}) must divide in_features ({in_features}); "
                         f"sizes that divide it: {fits or 'none (pad the input dimension)'}")


def quantize_int4(w: torch.Tensor, group_size: int = 32, scale_dtype: torch.dtype = torch.bfloat16
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4: codes (out, in) uint8 in 0..15, scales and zeros (out, in/group).

    In each group, $s = (\\max - \\min) / 15$ and $z = \\min + 8s$ (the value of code 8, the kernel's
    convention), both rounded to ``scale_dtype``; then $q = \\mathrm{clamp}(\\mathrm{round}((w - z)/s)
    + 8, 0, 15)$ and $\\hat w = (q - 8)s + z$. Like GGUF's ``Q4_1`` (a scale and a minimum per block
    of 32) the range is the group's own minimum to maximum, not forced to include 0.
    """
    _check_weight(w)
    _check_compute_dtype(scale_dtype)
    _check_group(group_size, w.shape[1])
    groups = w.float().reshape(w.shape[0], -1, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = _round_to(((high - low) / 15).clamp_min(torch.finfo(torch.bfloat16).tiny), scale_dtype)
    zero = _round_to(low + 8 * scale, scale_dtype)
    codes = torch.round((groups - zero[..., None]) / scale[..., None]) + 8
    codes = codes.clamp(0, 15).to(torch.uint8).reshape(w.shape)
    return codes, scale.to(scale_dtype), zero.to(scale_dtype)


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """$\\hat w = (q - 8)\\,s + z$ per group, float32 (out, in)."""
    n_groups = scale.shape[1]
    groups = codes.float().reshape(codes.shape[0], n_groups, -1)
    return ((groups - 8) * scale.float()[..., None] + zero.float()[..., None]).reshape(codes.shape)


def reference_linear(x: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """The from-scratch reference: $y = x \\hat W^\\top$ in float32 with dequantized weights."""
    return x.float() @ w_hat.T


def _flatten(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"input's last dimension must be in_features={in_features}, "
                         f"got shape {tuple(x.shape)}")
    return x.reshape(-1, in_features)


class Int8WeightOnlyLinear(nn.Module):
    """``y = x W^T`` with int8 codes and a scale per output row; no bias.

    Buffers: ``codes`` (out, in) int8 and ``scale`` (out,) in ``compute_dtype``. The input is cast
    to ``compute_dtype`` for the kernel and the output cast back to the input's dtype.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        _require_kernels(_INT8)
        _check_compute_dtype(compute_dtype)
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise ValueError(f"codes must be a 2-D int8 tensor, got {codes.dtype} {tuple(codes.shape)}")
        if scale.shape != (codes.shape[0],):
            raise ValueError(f"scale must have shape ({codes.shape[0]},), got {tuple(scale.shape)}")
        if compute_dtype == torch.bfloat16 and codes.shape[1] % 16:
            # the bfloat16 kernel reads 16 inputs at a time and crashes on other widths
            raise ValueError(f"the bfloat16 int8 kernel needs in_features divisible by 16, got "
                             f"{codes.shape[1]}; use compute_dtype=torch.float32 for this layer")
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        self.compute_dtype = compute_dtype
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale.to(compute_dtype).contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16
                    ) -> "Int8WeightOnlyLinear":
        """Quantize an ``nn.Linear`` (without bias) with :func:`quantize_int8`."""
        if not isinstance(linear, nn.Linear) or linear.bias is not None:
            raise ValueError("from_linear takes an nn.Linear without bias (our Llama has none)")
        _check_compute_dtype(compute_dtype)
        return cls(*quantize_int8(linear.weight.detach(), compute_dtype), compute_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the layer computes with, (out, in)."""
        return dequantize_int8(self.codes, self.scale)

    @property
    def nbytes(self) -> int:
        """Bytes one forward pass reads: the codes plus the scales."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = _flatten(x, self.in_features).to(self.compute_dtype)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.codes, self.scale)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"compute_dtype={self.compute_dtype}")


class Int4WeightOnlyLinear(nn.Module):
    """``y = x W^T`` with 4-bit codes and a scale and zero per group of inputs; no bias.

    Buffers: ``packed`` (out, in/2) uint8, two codes per byte in the kernel's blocked layout, and
    ``scales_and_zeros`` (in/group, out, 2) in ``compute_dtype``. The unpacked codes are not kept
    (they would take twice the bytes); :func:`quantize_int4` gives them for checks.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 group_size: int = 32, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        _require_kernels(_INT4_PACK, _INT4_MM)
        _check_compute_dtype(compute_dtype)
        if codes.dim() != 2 or codes.dtype not in (torch.uint8, torch.int32):
            raise ValueError(f"codes must be 2-D uint8 in 0..15, got {codes.dtype} {tuple(codes.shape)}")
        out_features, in_features = codes.shape
        _check_group(group_size, in_features)
        if out_features % 16:
            raise ValueError(f"the int4 kernel packs 16 output rows at a time: out_features "
                             f"({out_features}) must be divisible by 16")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
            raise ValueError("codes must be 4-bit values in 0..15")
        expected = (out_features, in_features // group_size)
        if scale.shape != expected or zero.shape != expected:
            raise ValueError(f"scale and zero must have shape {expected} (out, in/group), got "
                             f"{tuple(scale.shape)} and {tuple(zero.shape)}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.compute_dtype = group_size, compute_dtype
        packed = getattr(torch.ops.aten, _INT4_PACK)(codes.to(torch.int32).contiguous(), 1)
        scales_and_zeros = torch.stack([scale.float().T, zero.float().T], dim=-1)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(compute_dtype).contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "Int4WeightOnlyLinear":
        """Quantize an ``nn.Linear`` (without bias) with :func:`quantize_int4`."""
        if not isinstance(linear, nn.Linear) or linear.bias is not None:
            raise ValueError("from_linear takes an nn.Linear without bias (our Llama has none)")
        _check_compute_dtype(compute_dtype)
        codes, scale, zero = quantize_int4(linear.weight.detach(), group_size, compute_dtype)
        return cls(codes, scale, zero, group_size, compute_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes one forward pass reads: the packed codes plus the scales and zeros."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = _flatten(x, self.in_features).to(self.compute_dtype)
        out = getattr(torch.ops.aten, _INT4_MM)(flat, self.packed, self.group_size,
                                                self.scales_and_zeros)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, compute_dtype={self.compute_dtype}")


def quantize_model(model: Llama, bits: int = 8, group_size: int = 32,
                   compute_dtype: torch.dtype = torch.bfloat16, head_bits: int | None = None) -> Llama:
    """A copy of ``model`` with every ``nn.Linear`` replaced by an int8 or int4 weight-only layer.

    ``bits`` is 8 (per-channel, :class:`Int8WeightOnlyLinear`) or 4 (group-wise,
    :class:`Int4WeightOnlyLinear` with ``group_size``); ``head_bits`` (default: ``bits``) sets the
    output head's format on its own. The tied head is untied: the embedding stays float32 (a lookup
    reads one row per token) while the head is quantized. Everything that is not a quantized matrix
    (embedding, norms) is *shared* with ``model``, not copied, so the copy costs only the codes;
    do not modify either model's shared parameters in place. ``model`` itself is left unchanged.
    """
    if not isinstance(model, Llama):
        raise ValueError(f"quantize_model takes a utils.llama.Llama, got {type(model).__name__}; "
                         "for a transformers model, copy it with utils.llama.from_hf first")
    head_bits = bits if head_bits is None else head_bits
    for name, value in (("bits", bits), ("head_bits", head_bits)):
        if value not in (4, 8):
            raise ValueError(f"{name} must be 8 or 4, got {value!r}")
    _check_compute_dtype(compute_dtype)
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("these are CPU kernels: move the model to the CPU first (model.cpu())")
    memo = {id(p): p for p in model.parameters()}  # share every parameter instead of copying it
    out = copy.deepcopy(model, memo)
    linears = [(name, mod) for name, mod in out.named_modules() if isinstance(mod, nn.Linear)]
    for name, mod in linears:
        parent_name, _, attr = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        b = head_bits if name == "lm_head" else bits
        new = (Int8WeightOnlyLinear.from_linear(mod, compute_dtype) if b == 8
               else Int4WeightOnlyLinear.from_linear(mod, group_size, compute_dtype))
        setattr(parent, attr, new)
    return out.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decoding step reads: every matrix (codes and scales for quantized ones,
    the output head included) and every norm gain. Embedding lookups read one row per token and are
    left out, as :func:`utils.roofline.weight_bytes_per_forward` does; for a float32 :class:`Llama`
    the two agree."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, (Int8WeightOnlyLinear, Int4WeightOnlyLinear)):
            total += mod.nbytes
        elif isinstance(mod, (nn.Linear, RMSNorm)):
            total += mod.weight.numel() * mod.weight.element_size()
    return total


def bytes_per_weight(model: Llama) -> float:
    """Average stored bytes per weight one decoding step reads: :func:`weight_bytes` over the number of
    weights :func:`utils.roofline.weight_bytes_per_forward` counts (every matrix, the output head and
    the norms). Pass it as ``bytes_per_param`` to :mod:`utils.roofline`'s formulas
    (:func:`~utils.roofline.forward_bytes`, :func:`~utils.roofline.decode_bound_tokens_per_s`), with
    ``kv_bytes_per_value=4`` for the float32 KV cache: 4.0 for a float32 :class:`Llama`, a little over
    1 in int8 and over 0.5 in int4 (scales, zeros and the float32 norms add to the codes)."""
    if not isinstance(model, Llama):
        raise ValueError(f"bytes_per_weight takes a utils.llama.Llama, got {type(model).__name__}; "
                         "for a transformers model, copy it with utils.llama.from_hf first")
    return weight_bytes(model) / (weight_bytes_per_forward(model.cfg, 1))
