"""A readable Llama (the architecture of SmolLM2), written once for the book (Part 1, "A real Llama
from scratch") and reused by later chapters.

Pieces, each a few lines: :class:`RMSNorm`, rotary position embeddings (the tables of
:func:`utils.positions.rope_cos_sin` and the rotation :func:`utils.positions.rope_rotate`),
grouped-query :class:`Attention`, the SwiGLU :class:`MLP`, a pre-norm :class:`Block`, and the whole
:class:`Llama` with a tied output head. :func:`from_hf` copies the
weights of a transformers ``LlamaForCausalLM`` (such as the one ``utils.load_llm()`` returns) into it.
The formulas for parameters, memory and FLOPs live here too, so any config can be costed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from utils.attention import causal_mask, scaled_dot_product_attention
from utils.checks import check_positive_int
from utils.positions import rope_cos_sin, rope_rotate

if TYPE_CHECKING:  # pragma: no cover
    from utils.kvcache import KVCache


__all__ = [
    "LlamaConfig",
    "RMSNorm",
    "Attention",
    "MLP",
    "Block",
    "Llama",
    "HF_TO_OURS",
    "hf_name_to_ours",
    "from_hf",
    "parameter_breakdown",
    "kv_cache_bytes_per_token",
    "forward_flops_per_token",
]


@dataclass(frozen=True)
class LlamaConfig:
    """The numbers that define a Llama. Defaults are SmolLM2-135M's."""

    vocab_size: int = 49152
    d_model: int = 576  # the width of the residual stream
    n_layers: int = 30
    n_heads: int = 9  # query heads
    n_kv_heads: int = 3  # key/value heads, shared by n_heads // n_kv_heads query heads each
    d_ff: int = 1536  # hidden width of the SwiGLU MLP
    rope_theta: float = 100_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # the output head reuses the token-embedding matrix

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            check_positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"RoPE rotates pairs of dimensions: head_dim ({self.head_dim}) must be even")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError(f"rope_theta and norm_eps must be positive, got {self.rope_theta}, {self.norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_hf(cls, hf_config) -> "LlamaConfig":
        """Our config from a ``transformers.LlamaConfig``; refuses features we did not implement."""
        rope = getattr(hf_config, "rope_parameters", None) or {}
        unsupported = {
            "hidden_act": hf_config.hidden_act != "silu",
            "attention_bias": hf_config.attention_bias,
            "mlp_bias": hf_config.mlp_bias,
            "rope_type": rope.get("rope_type", "default") != "default",
            "head_dim": getattr(hf_config, "head_dim", None)
            not in (None, hf_config.hidden_size // hf_config.num_attention_heads),
        }
        if any(unsupported.values()):
            bad = [name for name, is_bad in unsupported.items() if is_bad]
            raise ValueError(f"this Llama does not implement these settings of the config: {bad}")
        return cls(
            vocab_size=hf_config.vocab_size, d_model=hf_config.hidden_size,
            n_layers=hf_config.num_hidden_layers, n_heads=hf_config.num_attention_heads,
            n_kv_heads=hf_config.num_key_value_heads, d_ff=hf_config.intermediate_size,
            rope_theta=float(rope.get("rope_theta", 10_000.0)), norm_eps=hf_config.rms_norm_eps,
            tie_embeddings=hf_config.tie_word_embeddings,
        )

    def to_hf(self):
        """The equivalent ``transformers.LlamaConfig`` (to build a reference model)."""
        from transformers import LlamaConfig as HFLlamaConfig

        return HFLlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.d_model, num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
            intermediate_size=self.d_ff, head_dim=self.head_dim, rms_norm_eps=self.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=self.tie_embeddings, hidden_act="silu",
        )


class RMSNorm(nn.Module):
    """$y = x / \\sqrt{\\operatorname{mean}(x^2) + \\epsilon} \\cdot g$ (computed in float32)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # the gain g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention with rotary positions."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: "KVCache | None" = None, layer: int = 0) -> torch.Tensor:
        b, n, _ = x.shape  # (batch, tokens, d_model)
        q = self.wq(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)  # (b, H, n, hd)
        k = self.wk(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (b, KV, n, hd)
        v = self.wv(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope_rotate(q, cos, sin), rope_rotate(k, cos, sin)
        group = self.n_heads // self.n_kv_heads  # query heads per KV head
        if cache is not None:  # Part 4: keys/values of earlier tokens come from the cache
            k, v = cache.write(layer, k, v)  # (b, KV, past + n, hd)
            # Fold each KV head's `group` query heads into the query axis: no copies of the cache
            # (a single new token may attend to every cached one: decoding needs no mask)
            mask = None if n == 1 else causal_mask(n, k.shape[2], device=x.device).repeat(group, 1)
            out = scaled_dot_product_attention(q.reshape(b, self.n_kv_heads, group * n, -1), k, v, mask)
            out = out.reshape(b, self.n_heads, n, self.head_dim)
        else:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (b, H, n, hd)
            out = scaled_dot_product_attention(q, k, v, causal_mask(n, device=x.device))
        return self.wo(out.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: $W_{down}\\,(\\operatorname{SiLU}(x W_{gate}) \\odot x W_{up})$."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """One decoder layer: pre-norm attention and pre-norm MLP, each added to the residual stream."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.d_model, cfg.norm_eps), Attention(cfg)
        self.mlp_norm, self.mlp = RMSNorm(cfg.d_model, cfg.norm_eps), MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: "KVCache | None" = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Token embeddings -> n_layers blocks -> final RMSNorm -> output head (logits)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one matrix, used twice
        # Recompute each block's activations in the backward pass instead of storing them (training only)
        self.gradient_checkpointing = False

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor, start_pos: int = 0, cache: "KVCache | None" = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (batch, n, vocab) for token ids (batch, n) at positions start_pos, ..., start_pos+n-1.

        With a :class:`utils.kvcache.KVCache` the tokens continue the ones already cached: positions
        start at ``cache.length``, their keys and values are appended, and attention also reads the
        cached ones. ``last_only`` computes the output head for the last position only, shape
        (batch, 1, vocab): that is all a generation step needs.
        """
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must have shape (batch, n) with n >= 1, got {tuple(idx.shape)}")
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise ValueError(f"idx must hold integer token ids (torch.long), got dtype {idx.dtype}; "
                             "use the tokenizer's input_ids, or idx.long() if they are whole numbers")
        if idx.min() < 0 or idx.max() >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, vocab_size={self.cfg.vocab_size}), got ids from "
                             f"{idx.min().item()} to {idx.max().item()}; were they made by another tokenizer?")
        if start_pos < 0:
            raise ValueError(f"start_pos must be >= 0, got {start_pos}")
        if cache is not None:
            cache.check(self.cfg, idx.shape[0], idx.shape[1])
            if start_pos not in (0, cache.length):
                raise ValueError(f"with a cache, positions continue at cache.length={cache.length}; "
                                 f"got start_pos={start_pos} (leave it out)")
            start_pos = cache.length
        positions = torch.arange(start_pos, start_pos + idx.shape[1], device=idx.device)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.tok_emb(idx)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, i)
        if cache is not None:
            cache.advance(idx.shape[1])
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))


# transformers' parameter names -> ours (applied in order, as substring replacements)
HF_TO_OURS = [
    ("model.embed_tokens.", "tok_emb."), ("model.layers.", "layers."), ("model.norm.", "norm."),
    ("self_attn.q_proj.", "attn.wq."), ("self_attn.k_proj.", "attn.wk."),
    ("self_attn.v_proj.", "attn.wv."), ("self_attn.o_proj.", "attn.wo."),
    ("mlp.gate_proj.", "mlp.w_gate."), ("mlp.up_proj.", "mlp.w_up."), ("mlp.down_proj.", "mlp.w_down."),
    ("input_layernorm.", "attn_norm."), ("post_attention_layernorm.", "mlp_norm."),
]


def hf_name_to_ours(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'layers.3.attn.wq.weight'."""
    for old, new in HF_TO_OURS:
        name = name.replace(old, new)
    return name


def from_hf(hf_model: nn.Module) -> Llama:
    """A :class:`Llama` holding a copy of a transformers ``LlamaForCausalLM``'s weights (same dtype/device)."""
    cfg = LlamaConfig.from_hf(hf_model.config)
    state = {hf_name_to_ours(k): v.detach().clone() for k, v in hf_model.state_dict().items()}
    with torch.device("meta"):  # no memory spent on random initial weights
        model = Llama(cfg)
    model.load_state_dict(state, strict=True, assign=True)  # raises on missing or unknown names
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight  # tie again: assign=True replaced both
    return model


def parameter_breakdown(cfg: LlamaConfig) -> dict[str, int]:
    """Parameters per component, from the config alone (a tied head is counted once, in embeddings)."""
    d, hd = cfg.d_model, cfg.head_dim
    attention = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2  # wq, wo + wk, wv
    return {
        "embeddings": cfg.vocab_size * d,
        "attention": cfg.n_layers * attention,
        "MLP": cfg.n_layers * 3 * d * cfg.d_ff,
        "norms": (2 * cfg.n_layers + 1) * d,
        "output head": 0 if cfg.tie_embeddings else cfg.vocab_size * d,
    }


def kv_cache_bytes_per_token(cfg: LlamaConfig, bytes_per_value: float = 2) -> float:
    """Keys and values kept for one token: 2 * layers * kv_heads * head_dim * bytes."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * bytes_per_value


def forward_flops_per_token(cfg: LlamaConfig, context: int) -> int:
    """FLOPs to process one token that attends to ``context`` tokens (2 per multiply-add).

    Every weight matrix costs 2 FLOPs per parameter (the embedding lookup costs none, the output head
    does); attention adds 2 * context * head_dim per head for $QK^\\top$ and as much for $AV$.
    """
    parts = parameter_breakdown(cfg)
    matmul_params = parts["attention"] + parts["MLP"] + cfg.vocab_size * cfg.d_model
    return 2 * matmul_params + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * context
