"""Sparse mixture of experts (Part 1, "Mixture of experts, and beyond dense attention").

- :func:`route`: softmax router probabilities -> the top-k experts of each token and their gates.
- :class:`MoE`: a drop-in replacement for a Llama block's SwiGLU ``mlp``: a router and ``n_experts``
  SwiGLU experts (each a :class:`utils.llama.MLP`), of which each token uses ``top_k``.
- :func:`load_balancing_loss` (Switch Transformer / Mixtral) and :func:`router_z_loss` (ST-MoE).
- :func:`expert_load`: the fraction of routing assignments each expert received.
- :func:`upcycle`: an MoE whose experts are copies of a trained dense MLP.
- :func:`gqa_attention_params`, :func:`mla_attention_params` and :func:`moe_parameter_counts`:
  total and active parameters of a (mixture-of-experts) decoder from its published config.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.checks import check_positive_int
from utils.llama import MLP, LlamaConfig


__all__ = [
    "route",
    "MoE",
    "load_balancing_loss",
    "router_z_loss",
    "expert_load",
    "upcycle",
    "gqa_attention_params",
    "mla_attention_params",
    "moe_parameter_counts",
]


def _check_experts(n_experts: int, top_k: int) -> None:
    for name, value in (("n_experts", n_experts), ("top_k", top_k)):
        check_positive_int(name, value)
    if top_k > n_experts:
        raise ValueError(f"top_k ({top_k}) cannot exceed n_experts ({n_experts}): "
                         "a token cannot use more experts than exist")


def route(logits: torch.Tensor, top_k: int,
          renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router probabilities, gates and chosen experts for router ``logits`` of shape (tokens, n_experts).

    $p = \\operatorname{softmax}(\\text{logits})$ (in float32); the top-k experts of each token are
    those with the largest $p$; their gates are $p$ itself or, with ``renormalize``, $p$ divided by
    the sum of the chosen $p$ so that each token's gates add up to 1 (Mixtral's choice).
    Returns ``(probs (T, E), gates (T, k), experts (T, k))``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (tokens, n_experts), got {tuple(logits.shape)}")
    _check_experts(logits.shape[1], top_k)
    probs = logits.float().softmax(dim=-1)
    gates, experts = probs.topk(top_k, dim=-1)  # (T, k) each, largest first
    if renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return probs, gates, experts


class MoE(nn.Module):
    """Sparse mixture of SwiGLU experts: $y = \\sum_{i \\in \\text{top-}k(x)} g_i(x)\\, E_i(x)$.

    Built from a :class:`~utils.llama.LlamaConfig` so that it can replace ``block.mlp`` of a
    :class:`~utils.llama.Llama`; each expert has hidden width ``d_ff_expert`` (default ``cfg.d_ff``).
    After every forward pass ``last_router_logits`` (tokens, n_experts) and ``last_experts``
    (tokens, top_k) hold the routing of the batch, for the balancing loss and for statistics.
    """

    def __init__(self, cfg: LlamaConfig, n_experts: int, top_k: int, d_ff_expert: int | None = None,
                 renormalize: bool = True) -> None:
        super().__init__()
        _check_experts(n_experts, top_k)
        expert_cfg = cfg if d_ff_expert is None else replace(cfg, d_ff=d_ff_expert)
        self.n_experts, self.top_k, self.renormalize = n_experts, top_k, renormalize
        self.router = nn.Linear(cfg.d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(expert_cfg) for _ in range(n_experts))
        self.last_router_logits: torch.Tensor | None = None
        self.last_experts: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, d): every token of the batch, routed independently
        logits = self.router(x)  # (T, E)
        _, gates, experts = route(logits, self.top_k, self.renormalize)
        self.last_router_logits, self.last_experts = logits, experts.detach()
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(experts == e)  # the tokens that chose expert e
            if token_idx.numel() == 0:
                continue
            y = expert(x[token_idx]) * gates[token_idx, slot, None].to(x.dtype)
            out = out.index_add(0, token_idx, y)  # scatter back; a token's k outputs add up
        return out.reshape(shape)


def load_balancing_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss $N \\sum_i f_i P_i$ for logits (tokens, N experts).

    $f_i$ is the fraction of tokens that have expert $i$ among their top-k (so $\\sum_i f_i = k$; no
    gradient flows through it) and $P_i$ the mean router probability of expert $i$. Perfectly even
    routing gives $k$; routing everything to the same k experts gives up to $N$. Equal to
    ``transformers``' ``load_balancing_loss_func`` (which pools the tokens of all layers, so pass
    ``torch.cat`` of the layers' logits to compare).
    """
    probs, _, experts = route(router_logits, top_k)
    n_experts = router_logits.shape[1]
    f = F.one_hot(experts, n_experts).sum(dim=1).float().mean(dim=0)  # (N,), sums to k
    p = probs.mean(dim=0)  # (N,), sums to 1
    return n_experts * (f * p).sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss, $\\frac1T \\sum_t (\\log \\sum_i e^{z_{ti}})^2$: keeps router logits small."""
    if router_logits.dim() != 2:
        raise ValueError("router_logits must have shape (tokens, n_experts), "
                         f"got {tuple(router_logits.shape)}")
    return router_logits.float().logsumexp(dim=-1).pow(2).mean()


def expert_load(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Fraction of the routing assignments in ``experts`` (tokens, k) that went to each expert (sums to 1)."""
    if experts.numel() == 0:
        raise ValueError("expert_load needs at least one routed token")
    if int(experts.min()) < 0 or int(experts.max()) >= n_experts:
        raise ValueError(f"expert ids must lie in 0..{n_experts - 1}")
    counts = torch.bincount(experts.reshape(-1), minlength=n_experts).float()
    return counts / counts.sum()


@torch.no_grad()
def upcycle(mlp: MLP, cfg: LlamaConfig, n_experts: int, top_k: int, router_std: float = 0.02,
            generator: torch.Generator | None = None) -> MoE:
    """An :class:`MoE` whose ``n_experts`` experts are copies of the trained ``mlp`` (sparse upcycling).

    The router is freshly initialised (normal, std ``router_std``). With renormalised gates each
    token's gates sum to 1, so at initialisation the MoE computes exactly the dense ``mlp``'s function.
    """
    d_ff = mlp.w_gate.out_features
    moe = MoE(cfg, n_experts, top_k, d_ff_expert=d_ff, renormalize=True)
    moe.experts = nn.ModuleList(copy.deepcopy(mlp) for _ in range(n_experts))
    weight = torch.randn(moe.router.weight.shape, generator=generator) * router_std
    moe.router.weight.copy_(weight.to(moe.router.weight))
    return moe.to(mlp.w_gate.weight.device)


def gqa_attention_params(d_model: int, n_heads: int, n_kv_heads: int, head_dim: int) -> int:
    """Weights of grouped-query attention.

    $W_Q$ and $W_O$ have $d \\cdot h\\, d_h$ weights each, $W_K$ and $W_V$ $d \\cdot h_{kv} d_h$ each.
    """
    return 2 * d_model * n_heads * head_dim + 2 * d_model * n_kv_heads * head_dim


def mla_attention_params(d_model: int, n_heads: int, q_lora_rank: int, kv_lora_rank: int,
                         qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int) -> int:
    """Weights of DeepSeek's multi-head latent attention (low-rank Q and KV projections, with their norms)."""
    qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
    q = d_model * q_lora_rank + q_lora_rank + q_lora_rank * n_heads * qk_head_dim
    kv = (d_model * (kv_lora_rank + qk_rope_head_dim) + kv_lora_rank
          + kv_lora_rank * n_heads * (qk_nope_head_dim + v_head_dim))
    return q + kv + n_heads * v_head_dim * d_model


def moe_parameter_counts(*, vocab_size: int, d_model: int, n_layers: int, attention_params: int,
                         n_experts: int, top_k: int, d_ff_expert: int, n_shared_experts: int = 0,
                         d_ff_shared: int | None = None, n_dense_layers: int = 0, d_ff_dense: int = 0,
                         tie_embeddings: bool = False) -> dict[str, int]:
    """Total and active (per token) parameters of a decoder whose MLPs are mixtures of SwiGLU experts.

    Per MoE layer: attention + router ($dN$) + $N$ routed experts of $3 d f$ + shared experts (always
    active); a token activates only $k$ of the $N$ routed experts. The first ``n_dense_layers`` layers
    have one dense SwiGLU MLP of width ``d_ff_dense`` instead. Embeddings count once if tied, twice
    otherwise; RMSNorm gains ($2d$ per layer and $d$ at the end) are included.
    """
    for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers),
                        ("d_ff_expert", d_ff_expert)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    _check_experts(n_experts, top_k)
    if not 0 <= n_dense_layers <= n_layers:
        raise ValueError(f"n_dense_layers must be in 0..n_layers ({n_layers}), got {n_dense_layers}")
    if attention_params < 0 or n_shared_experts < 0 or d_ff_dense < 0:
        raise ValueError("attention_params, n_shared_experts and d_ff_dense must be >= 0")
    swiglu = lambda d_ff: 3 * d_model * d_ff  # noqa: E731 -- W_gate, W_up, W_down
    shared = n_shared_experts * swiglu(d_ff_shared or d_ff_expert)
    n_moe = n_layers - n_dense_layers
    common = (n_layers * attention_params + n_dense_layers * swiglu(d_ff_dense)
              + n_moe * (d_model * n_experts + shared)
              + (2 * n_layers + 1) * d_model + vocab_size * d_model * (1 if tie_embeddings else 2))
    return {"total": common + n_moe * n_experts * swiglu(d_ff_expert),
            "active": common + n_moe * top_k * swiglu(d_ff_expert)}
