"""Memory-lean optimizers from scratch (Part 2, beyond LoRA): GaLore and an 8-bit Adam.

- :class:`GaLoreProjector` and :class:`GaLoreAdamW`: gradient low-rank projection
  (Zhao et al., 2024). Each matrix's gradient is projected onto the top-$r$ singular vectors of
  its smaller side (refreshed every ``update_interval`` steps), Adam's moments live in that
  $r$-dimensional space, and the normalised update is projected back. Written to equal the authors'
  ``galore_torch.GaLoreAdamW`` (``proj_type="std"``) step for step.
- :func:`dynamic_levels`, :func:`quantize_state`, :func:`dequantize_state` and :class:`Adam8bit`:
  AdamW whose two moments are stored as 8-bit codes with one absmax scale per block
  (Dettmers et al., 2022), built on :mod:`utils.quant`'s block-wise codebook quantization.
- :func:`adam_state_numbers` and :func:`optimizer_state_bytes`: optimizer memory by formula and by
  counting the tensors an optimizer actually holds.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch

from utils.checks import check_positive_int
from utils.quant import dequantize_blockwise, quantize_blockwise


# --- validation ----------------------------------------------------------------------------------


__all__ = [
    "GaLoreProjector",
    "GaLoreAdamW",
    "dynamic_levels",
    "quantize_state",
    "dequantize_state",
    "Adam8bit",
    "adam_state_numbers",
    "optimizer_state_bytes",
]


def _check_adam(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr < 0:
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")


def _check_rank(rank: int, shape: tuple[int, ...]) -> None:
    check_positive_int("rank", rank)
    if len(shape) != 2:
        raise ValueError(f"GaLore projects 2-D weight matrices, got a parameter of shape {tuple(shape)}; "
                         "put it in a parameter group with rank=None (plain AdamW)")
    if rank > min(shape):
        raise ValueError(f"rank {rank} is larger than the smaller side of a {shape[0]}x{shape[1]} matrix "
                         f"(at most {min(shape)}): the projection would not be low-rank")


# --- the loop every optimizer's step shares ----------------------------------------------------

def _closure_loss(closure) -> torch.Tensor | None:
    """The loss ``closure`` recomputes (with gradients on), as ``torch.optim`` optimizers do; or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _params_with_grad(optimizer: torch.optim.Optimizer) -> Iterator[tuple[dict, torch.Tensor, dict]]:
    """(parameter group, parameter, its state) for every parameter that has a gradient."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                yield group, p, optimizer.state[p]


# --- GaLore --------------------------------------------------------------------------------------

class GaLoreProjector:
    """Projects a gradient $G \\in \\mathbb{R}^{m \\times n}$ onto a rank-$r$ subspace, and back.

    With $G = U \\Sigma V^\\top$: if $m \\ge n$ the projector is $Q = V_{:, :r}^\\top$ ($r \\times n$)
    and $R = G Q^\\top$ is $m \\times r$; otherwise $P = U_{:, :r}$ ($m \\times r$) and $R = P^\\top G$
    is $r \\times n$. The smaller side is always the one projected, so $R$ has $r \\cdot \\max(m, n)$
    numbers. The subspace is recomputed from the current gradient at steps $0, T, 2T, \\dots$
    ($T$ = ``update_interval``); :meth:`project_back` maps an update back and multiplies it by ``scale``.
    """

    def __init__(self, rank: int, update_interval: int = 200, scale: float = 1.0) -> None:
        check_positive_int("rank", rank)
        check_positive_int("update_interval", update_interval)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale must be a number > 0, got {scale!r}")
        self.rank, self.update_interval, self.scale = rank, update_interval, scale
        self.ortho: torch.Tensor | None = None
        self.right = True  # project from the right (m >= n) or from the left
        self.refreshes = 0

    def project(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        """$R$, the gradient in the subspace; ``step`` counts from 0 and triggers the refreshes."""
        _check_rank(self.rank, tuple(grad.shape))
        right = self.right = grad.shape[0] >= grad.shape[1]
        if self.ortho is None or step % self.update_interval == 0:
            U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
            ortho = Vh[:self.rank] if right else U[:, :self.rank]
            self.ortho = ortho.to(grad.dtype)
            self.refreshes += 1
        return grad @ self.ortho.T if right else self.ortho.T @ grad

    def project_back(self, low_rank: torch.Tensor) -> torch.Tensor:
        """The full-size update: $N Q$ or $P N$, times ``scale``."""
        if self.ortho is None:
            raise RuntimeError("project_back called before project: there is no subspace yet")
        full = low_rank @ self.ortho if self.right else self.ortho @ low_rank
        return full * self.scale


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore: Adam's moments are kept for the projected gradient $R$, not for $G$.

    Per step, for a matrix in a group with ``rank`` set: $R_t = \\mathrm{project}(G_t)$,
    $M_t = \\beta_1 M_{t-1} + (1-\\beta_1) R_t$, $V_t = \\beta_2 V_{t-1} + (1-\\beta_2) R_t^2$,
    $W \\leftarrow W - \\eta \\frac{\\sqrt{1-\\beta_2^t}}{1-\\beta_1^t}\\,
    \\mathrm{project\\_back}\\big(M_t / (\\sqrt{V_t} + \\epsilon)\\big)$, then decoupled weight decay
    $W \\leftarrow W - \\eta\\lambda W$. Groups with ``rank=None`` (biases, norms, or anything you do not
    want projected) get the same update without projection. The moments are *not* reset when the
    subspace is refreshed, as in the authors' code. ``eps`` defaults to their $10^{-6}$.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, rank: int | None = 128,
                 update_interval: int = 200, scale: float = 0.25,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0) -> None:
        _check_adam(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, rank=rank, update_interval=update_interval, scale=scale, betas=betas,
                        eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["rank"] is None:
                continue
            GaLoreProjector(group["rank"], group["update_interval"], group["scale"])  # validates
            for p in group["params"]:
                _check_rank(group["rank"], tuple(p.shape))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 -- the class docstring has the formula
        loss = _closure_loss(closure)
        for group, p, state in _params_with_grad(self):
            beta1, beta2 = group["betas"]
            if "step" not in state:
                state["step"] = 0
                if group["rank"] is not None:
                    state["projector"] = GaLoreProjector(group["rank"], group["update_interval"],
                                                         group["scale"])
            projector = state.get("projector")
            grad = p.grad if projector is None else projector.project(p.grad, state["step"])
            if projector is not None:
                state["ortho"] = projector.ortho  # kept in the state so that it is counted
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            state["step"] += 1
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
            update = m / v.sqrt().add_(group["eps"])
            if projector is not None:
                update = projector.project_back(update)
            p.add_(update, alpha=-step_size)
            if group["weight_decay"] > 0:
                p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


# --- 8-bit optimizer state -----------------------------------------------------------------------

def dynamic_levels(signed: bool, bits: int = 8, decades: float = 7.0) -> torch.Tensor:
    """A codebook for optimizer state: zero plus magnitudes spaced evenly in $\\log_{10}$ from
    $10^{-\\text{decades}}$ to 1 (and their negatives if ``signed``).

    Adam's moments span many orders of magnitude inside one block, so evenly spaced (linear) levels
    would round most of them to zero; log spacing keeps a constant *relative* error instead. (This is
    the idea behind bitsandbytes' dynamic tree quantization, in its simplest form.) Signed: $2^b - 1$
    levels; unsigned: $2^b$.
    """
    check_positive_int("bits", bits, 2)
    if bits > 8:
        raise ValueError(f"bits must be at most 8 (codes are stored as uint8), got {bits}")
    if isinstance(decades, bool) or not isinstance(decades, (int, float)) or not decades > 0:
        raise ValueError(f"decades must be a number > 0, got {decades!r}")
    n_magnitudes = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    magnitudes = torch.logspace(-decades, 0, n_magnitudes, dtype=torch.float64)
    parts = [-magnitudes.flip(0), torch.zeros(1, dtype=torch.float64), magnitudes] if signed else \
        [torch.zeros(1, dtype=torch.float64), magnitudes]
    return torch.cat(parts).float()


def quantize_state(x: torch.Tensor, levels: torch.Tensor, block_size: int = 256
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise codebook quantization of any tensor (zero-padded to a whole number of blocks).

    Returns uint8 codes (flattened, padded) and one float32 absmax per block; see
    :func:`utils.quant.quantize_blockwise`.
    """
    check_positive_int("block_size", block_size)
    flat = x.detach().reshape(-1).float()
    padding = (-flat.numel()) % block_size
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    return quantize_blockwise(flat, levels, block_size)


def dequantize_state(codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor,
                     shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor of ``shape`` that :func:`quantize_state`'s codes stand for."""
    flat = dequantize_blockwise(codes, absmax, levels, (codes.numel(),))
    return flat[:math.prod(shape)].reshape(shape)


class Adam8bit(torch.optim.Optimizer):
    """AdamW (``torch.optim.AdamW``'s update) with both moments stored in 8 bits, block-wise.

    Each step dequantizes $m$ and $v$, updates them in float32 exactly as AdamW does, and quantizes
    them again: $m$ with signed :func:`dynamic_levels` over 7 decades and $v$ (a square, so twice the
    range) with unsigned ones over 14, one absmax per ``block_size`` values. State per parameter: 2 bytes of codes plus $2 \\cdot 4 / \\text{block\\_size}$
    bytes of scales, against AdamW's 8 bytes.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, block_size: int = 256) -> None:
        _check_adam(lr, betas, eps, weight_decay)
        check_positive_int("block_size", block_size)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      block_size=block_size))
        # v is a square, so it spans twice the orders of magnitude of m: twice the decades
        self.signed_levels, self.unsigned_levels = dynamic_levels(True, 8, 7), dynamic_levels(False, 8, 14)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 -- the class docstring says what changes from AdamW
        loss = _closure_loss(closure)
        for group, p, state in _params_with_grad(self):
            beta1, beta2 = group["betas"]
            if not state:
                state["step"] = 0
                m, v = torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32)
            else:
                m = dequantize_state(state["m_codes"], state["m_absmax"], self.signed_levels, p.shape)
                v = dequantize_state(state["v_codes"], state["v_absmax"], self.unsigned_levels, p.shape)
            state["step"] += 1
            t = state["step"]
            p.mul_(1 - group["lr"] * group["weight_decay"])
            grad = p.grad.float()
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
            p.add_((m / denom).to(p.dtype), alpha=-group["lr"] / (1 - beta1 ** t))
            state["m_codes"], state["m_absmax"] = quantize_state(m, self.signed_levels, group["block_size"])
            state["v_codes"], state["v_absmax"] = quantize_state(v, self.unsigned_levels, group["block_size"])
        return loss


# --- memory --------------------------------------------------------------------------------------

def adam_state_numbers(shape: tuple[int, int], rank: int | None = None) -> int:
    """Numbers Adam keeps for one $m \\times n$ matrix: $2mn$; with GaLore at rank $r$,
    $2r\\max(m, n)$ for the two moments plus $r\\min(m, n)$ for the projector."""
    if len(shape) != 2:
        raise ValueError(f"shape must be (m, n), got {shape!r}")
    for name, value in zip(("m", "n"), shape):
        check_positive_int(name, value)
    m, n = shape
    if rank is None:
        return 2 * m * n
    _check_rank(rank, tuple(shape))
    return 2 * rank * max(m, n) + rank * min(m, n)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor an optimizer holds in its state (moments, codes, scales, projectors)."""
    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen.add(id(value))
                total += value.numel() * value.element_size()
    return total
