"""Model parallelism from scratch: tensor, pipeline and expert parallelism (Part 8, "Model
parallelism: tensor, pipeline, expert").

Data parallelism copies the whole model to every rank; the three ways here cut the *model* instead.

- **Tensor parallelism** (Megatron-LM, Shoeybi et al. 2019). A linear layer $Y = X W^\\top$ with
  $W \\in \\mathbb{R}^{d_{out} \\times d_{in}}$ is split across $t$ ranks in one of two ways.
  :class:`ColumnParallelLinear` gives rank $r$ the rows $W_r$ of $W$ (a block of *output* features,
  the columns of $W^\\top$): $Y_r = X W_r^\\top$ needs the whole input and yields a slice of the
  output, which is gathered or kept sharded. :class:`RowParallelLinear` gives rank $r$ the columns
  $W_{:,r}$ (a block of *input* features): from the matching input slice it computes a partial sum
  $X_r W_{:,r}^\\top$, and $Y = \\sum_r X_r W_{:,r}^\\top$ is an all-reduce. A column layer
  followed by a row layer (attention's Q/K/V then O, the MLP's gate/up then down) needs one
  all-reduce in the forward pass (Megatron's $g$) and one in the backward pass (its $f$, the
  gradient of the replicated input): :func:`copy_to_tp`, :func:`reduce_from_tp`,
  :func:`gather_from_tp`. :class:`TensorParallelBlock` is a :class:`utils.llama.Block` cut this
  way (heads split across ranks, grouped-query KV heads too): 2 all-reduces per block forward.
  :class:`CommLog` counts every collective and its bytes.
- **Pipeline parallelism** (GPipe, Huang et al. 2019; 1F1B, Narayanan et al. 2021): consecutive
  layers on different ranks, a batch cut into $m$ microbatches that flow through the $p$ stages.
  :class:`LlamaStage` and :func:`split_llama` cut a :class:`utils.llama.Llama` into stages for
  ``torch.distributed.pipelining``; :func:`bubble_fraction` is the idle share $(p-1)/(m+p-1)$,
  :func:`idle_fractions` measures it from timestamps.
- **Expert parallelism** (GShard, Lepikhin et al. 2021; Switch, Fedus et al. 2022): the experts of
  a :class:`utils.moe.MoE` live on different ranks and tokens travel to them and back with two
  all-to-alls (:class:`ExpertParallelMoE`).
- Arithmetic for large models (:func:`utils.ddp.ring_allreduce_formula`, :func:`tp_bytes_per_layer`,
  :func:`pp_bytes_per_boundary`, :func:`ep_bytes_per_layer`) and the three workers the chapter runs
  with :func:`utils.distributed.launch` (:func:`tensor_parallel_worker`, :func:`pipeline_worker`,
  :func:`expert_parallel_worker`).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from utils.attention import causal_mask, scaled_dot_product_attention
from utils.checks import check_positive_int
from utils.ddp import ring_allreduce_formula
from utils.distributed import rank_device
from utils.llama import Block, Llama, LlamaConfig, RMSNorm
from utils.moe import MoE, route
from utils.positions import rope_cos_sin, rope_rotate
from utils.pretrain import next_token_loss

__all__ = [
    "CommLog",
    "shard_range",
    "copy_to_tp",
    "reduce_from_tp",
    "gather_from_tp",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "TensorParallelAttention",
    "TensorParallelMLP",
    "TensorParallelBlock",
    "LlamaStage",
    "split_llama",
    "bubble_fraction",
    "idle_fractions",
    "peak_in_flight",
    "expert_owner",
    "ExpertParallelMoE",
    "tp_bytes_per_layer",
    "pp_bytes_per_boundary",
    "ep_bytes_per_layer",
    "tensor_parallel_worker",
    "pipeline_worker",
    "expert_parallel_worker",
]


# --------------------------------------------------------------------------- bookkeeping


@dataclass
class CommLog:
    """Every collective a tensor- or expert-parallel layer issued: ``(op, phase, bytes)`` each.

    ``bytes`` is the size of the tensor handed to the collective on this rank (what an all-reduce
    reduces, what an all-gather contributes, what an all-to-all sends), not the wire traffic of a
    particular algorithm: :func:`utils.ddp.ring_allreduce_formula` turns the former into the latter.
    """

    events: list[tuple[str, str, int]] = field(default_factory=list)

    def add(self, op: str, phase: str, tensor: torch.Tensor) -> None:
        self.events.append((op, phase, tensor.numel() * tensor.element_size()))

    def count(self, op: str | None = None, phase: str | None = None) -> int:
        """How many collectives matched ``op`` ("all_reduce", ...) and ``phase`` ("forward")."""
        return sum(1 for o, p, _ in self.events if op in (None, o) and phase in (None, p))

    def bytes(self, op: str | None = None, phase: str | None = None) -> int:
        """Their total size in bytes."""
        return sum(b for o, p, b in self.events if op in (None, o) and phase in (None, p))

    def clear(self) -> None:
        self.events.clear()


def shard_range(size: int, rank: int, world_size: int, what: str = "size") -> slice:
    """The slice ``[rank * size / t, (rank + 1) * size / t)`` that rank ``rank`` of ``t`` owns.

    Raises when ``world_size`` does not divide ``size`` (Megatron makes the same demand: uneven
    shards would need padding) or ``rank`` is out of range.
    """
    world_size = check_positive_int("world_size", world_size)
    check_positive_int("size", size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in 0..{world_size - 1}, got {rank}")
    if size % world_size:
        raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel degree "
                         f"({world_size}); pick a degree that divides it")
    step = size // world_size
    return slice(rank * step, (rank + 1) * step)


def _group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group)


def _group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group)


# --------------------------------------------------------------------------- Megatron's f and g


class _CopyToTP(torch.autograd.Function):
    """Megatron's $f$: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group, log):  # type: ignore[override]
        ctx.group, ctx.log = group, log
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = grad.contiguous().clone()
        if ctx.log is not None:
            ctx.log.add("all_reduce", "backward", grad)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None, None


class _ReduceFromTP(torch.autograd.Function):
    """Megatron's $g$: all-reduce (sum) forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group, log):  # type: ignore[override]
        x = x.contiguous().clone()
        if log is not None:
            log.add("all_reduce", "forward", x)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather along the last dimension forward; this rank's slice of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group, log):  # type: ignore[override]
        ctx.group = group
        x = x.contiguous()
        if log is not None:
            log.add("all_gather", "forward", x)
        parts = [torch.empty_like(x) for _ in range(_group_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        t, r = _group_size(ctx.group), _group_rank(ctx.group)
        return grad[..., shard_range(grad.shape[-1], r, t, "the gathered width")], None, None


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup | None = None,
               log: CommLog | None = None) -> torch.Tensor:
    """$f$: ``x`` unchanged; in the backward pass its gradient is summed over ``group``.

    Put it where a replicated activation enters column-parallel layers: each rank's layers give a
    gradient for their own output slice only, and the input's true gradient is the sum of them.
    """
    return _CopyToTP.apply(x, group, log)


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup | None = None,
                   log: CommLog | None = None) -> torch.Tensor:
    """$g$: the sum of ``x`` over the ranks of ``group`` (all-reduce); gradient passed through."""
    return _ReduceFromTP.apply(x, group, log)


def gather_from_tp(x: torch.Tensor, group: dist.ProcessGroup | None = None,
                   log: CommLog | None = None) -> torch.Tensor:
    """The ranks' slices of the last dimension concatenated in rank order (all-gather)."""
    return _GatherFromTP.apply(x, group, log)


# --------------------------------------------------------------------------- tensor-parallel layers


class ColumnParallelLinear(nn.Module):
    """Rank $r$'s share of ``nn.Linear(d_in, d_out)``: output features ``shard_range(d_out, r, t)``.

    $Y_r = X W_r^\\top + b_r$ with $W_r$ the rows of $W$ this rank owns. ``gather_output`` returns
    the whole $Y$ (all-gather); otherwise the output stays sharded for a following
    :class:`RowParallelLinear`. ``copy_input`` applies :func:`copy_to_tp` to the input (turn it off
    when several column layers share one input that was copied once, as Q, K and V do).
    """

    def __init__(self, dense: nn.Linear, rank: int, world_size: int, gather_output: bool = False,
                 copy_input: bool = True, group: dist.ProcessGroup | None = None,
                 log: CommLog | None = None) -> None:
        super().__init__()
        rows = shard_range(dense.out_features, rank, world_size, "out_features")
        self.weight = nn.Parameter(dense.weight.detach()[rows].clone())
        self.bias = None if dense.bias is None else nn.Parameter(dense.bias.detach()[rows].clone())
        self.rows, self.gather_output, self.copy_input = rows, gather_output, copy_input
        self.group, self.log = group, log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:
            x = copy_to_tp(x, self.group, self.log)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tp(y, self.group, self.log) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Rank $r$'s share of ``nn.Linear(d_in, d_out)``: input features ``shard_range(d_in, r, t)``.

    The input is this rank's slice $X_r$ of the features (``input_is_parallel``, the output of a
    :class:`ColumnParallelLinear`); otherwise the layer slices a replicated input itself. The
    output $Y = \\sum_r X_r W_{:,r}^\\top + b$ is one all-reduce; the bias is added once, after it.
    """

    def __init__(self, dense: nn.Linear, rank: int, world_size: int, input_is_parallel: bool = True,
                 group: dist.ProcessGroup | None = None, log: CommLog | None = None) -> None:
        super().__init__()
        cols = shard_range(dense.in_features, rank, world_size, "in_features")
        self.weight = nn.Parameter(dense.weight.detach()[:, cols].clone())
        self.bias = None if dense.bias is None else nn.Parameter(dense.bias.detach().clone())
        self.cols, self.input_is_parallel = cols, input_is_parallel
        self.group, self.log = group, log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            if x.shape[-1] != self.weight.shape[1] * _group_size(self.group):
                raise ValueError(f"a replicated input needs {self.weight.shape[1]} x world_size "
                                 f"features, got {x.shape[-1]}")
            x = x[..., self.cols]
        elif x.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"this rank's input slice must have {self.weight.shape[1]} features, "
                             f"got {x.shape[-1]}; pass input_is_parallel=False for a whole input")
        y = reduce_from_tp(F.linear(x, self.weight), self.group, self.log)
        return y if self.bias is None else y + self.bias


class TensorParallelAttention(nn.Module):
    """Rank $r$'s heads of a :class:`utils.llama.Attention`.

    $W_Q$, $W_K$, $W_V$ are column-parallel by whole heads: $h/t$ query heads and $h_{kv}/t$ KV
    heads per rank (both must divide by $t$; query head $i$ reads KV head $i // (h/h_{kv})$, and a
    contiguous block of query heads lands with its own KV heads). Attention runs on the local heads
    with no communication; $W_O$ is row-parallel and ends in the one forward all-reduce.
    """

    def __init__(self, dense: nn.Module, rank: int, world_size: int,
                 group: dist.ProcessGroup | None = None, log: CommLog | None = None) -> None:
        super().__init__()
        if dense.n_kv_heads % world_size or dense.n_heads % world_size:
            raise ValueError(
                f"{dense.n_heads} query heads and {dense.n_kv_heads} KV heads cannot be split "
                f"evenly over {world_size} ranks; pick a degree that divides both (or replicate "
                f"KV heads, which this layer does not do)")
        self.n_heads, self.n_kv_heads = dense.n_heads // world_size, dense.n_kv_heads // world_size
        self.head_dim, self.group, self.log = dense.head_dim, group, log
        kw = dict(rank=rank, world_size=world_size, copy_input=False, group=group, log=log)
        self.wq = ColumnParallelLinear(dense.wq, **kw)
        self.wk = ColumnParallelLinear(dense.wk, **kw)
        self.wv = ColumnParallelLinear(dense.wv, **kw)
        self.wo = RowParallelLinear(dense.wo, rank, world_size, group=group, log=log)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = copy_to_tp(x, self.group, self.log)  # one f for Q, K and V together
        q = self.wq(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope_rotate(q, cos, sin), rope_rotate(k, cos, sin)
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = scaled_dot_product_attention(q, k, v, causal_mask(n, device=x.device))
        return self.wo(out.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))


class TensorParallelMLP(nn.Module):
    """Rank $r$'s share of the SwiGLU MLP: $W_{gate}$, $W_{up}$ column-parallel (the SiLU and the
    product act elementwise on this rank's slice), $W_{down}$ row-parallel (one all-reduce)."""

    def __init__(self, dense: nn.Module, rank: int, world_size: int,
                 group: dist.ProcessGroup | None = None, log: CommLog | None = None) -> None:
        super().__init__()
        self.group, self.log = group, log
        kw = dict(rank=rank, world_size=world_size, copy_input=False, group=group, log=log)
        self.w_gate = ColumnParallelLinear(dense.w_gate, **kw)
        self.w_up = ColumnParallelLinear(dense.w_up, **kw)
        self.w_down = RowParallelLinear(dense.w_down, rank, world_size, group=group, log=log)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tp(x, self.group, self.log)
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class TensorParallelBlock(nn.Module):
    """A :class:`utils.llama.Block` cut over ``world_size`` ranks; this is rank ``rank``'s part.

    The RMSNorm gains are replicated (every rank normalises the whole residual stream); attention
    and MLP are :class:`TensorParallelAttention` and :class:`TensorParallelMLP`. Forward: 2
    all-reduces of a (batch, tokens, d_model) tensor; backward: 2 more.
    """

    def __init__(self, dense: Block, rank: int, world_size: int,
                 group: dist.ProcessGroup | None = None, log: CommLog | None = None) -> None:
        super().__init__()
        self.attn_norm = copy.deepcopy(dense.attn_norm)
        self.mlp_norm = copy.deepcopy(dense.mlp_norm)
        self.attn = TensorParallelAttention(dense.attn, rank, world_size, group, log)
        self.mlp = TensorParallelMLP(dense.mlp, rank, world_size, group, log)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


# --------------------------------------------------------------------------- pipeline stages


class LlamaStage(nn.Module):
    """Layers ``first .. last - 1`` of a :class:`utils.llama.Llama`, as one pipeline stage.

    The first stage also holds the token embedding (input: token ids), the last one the final norm
    and the output head (output: logits); the others map hidden states to hidden states. Rotary
    tables are recomputed from the sequence length in every stage (positions start at 0). The
    modules are the model's own (no copy): split a deep copy if the whole model is still needed.
    """

    def __init__(self, model: Llama, first: int, last: int) -> None:
        super().__init__()
        n_layers = len(model.layers)
        if not 0 <= first < last <= n_layers:
            raise ValueError(f"a stage needs 0 <= first < last <= n_layers ({n_layers}), got "
                             f"first={first}, last={last}")
        self.cfg, self.first, self.last = model.cfg, first, last
        self.tok_emb = model.tok_emb if first == 0 else None
        self.layers = nn.ModuleList(model.layers[first:last])
        is_last = last == n_layers
        self.norm = model.norm if is_last else None
        self.lm_head = model.lm_head if is_last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tok_emb is not None:
            x = self.tok_emb(x)
        positions = torch.arange(x.shape[1], device=x.device)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        for layer in self.layers:
            x = layer(x, cos, sin)
        if self.lm_head is not None:
            x = self.lm_head(self.norm(x))
        return x


def split_llama(model: Llama, n_stages: int) -> list[LlamaStage]:
    """``n_stages`` :class:`LlamaStage` of (as nearly as possible) equal numbers of layers.

    Raises for a tied output head: the embedding (first stage) and the head (last stage) would be
    one matrix on two ranks, whose gradients Megatron all-reduces between them; untie it first.
    """
    n_stages = check_positive_int("n_stages", n_stages)
    n_layers = len(model.layers)
    if n_stages > n_layers:
        raise ValueError(f"cannot cut {n_layers} layers into {n_stages} stages of at least one "
                         f"layer")
    if n_stages > 1 and model.lm_head.weight is model.tok_emb.weight:
        raise ValueError("the output head is tied to the token embedding; build the model with "
                         "LlamaConfig(tie_embeddings=False) to split it into pipeline stages")
    bounds = [round(i * n_layers / n_stages) for i in range(n_stages + 1)]
    return [LlamaStage(model, bounds[i], bounds[i + 1]) for i in range(n_stages)]


def bubble_fraction(n_stages: int, n_microbatches: int) -> float:
    """GPipe's idle share of each stage, $(p - 1) / (m + p - 1)$.

    With $p$ stages, $m$ microbatches and equal forward (and backward) times per stage, a step
    lasts $m + p - 1$ slots of which each stage is busy for $m$: the first stage waits $p-1$ slots
    for the last one to finish the forward of microbatch 1 ... and so on. 1F1B has the same bubble
    (it reorders work, it does not remove the fill and drain); it keeps fewer microbatches in
    flight.
    """
    p = check_positive_int("n_stages", n_stages)
    m = check_positive_int("n_microbatches", n_microbatches)
    return (p - 1) / (m + p - 1)


def idle_fractions(events_by_rank: list[list[tuple[str, int, float, float]]]) -> list[float]:
    """Measured idle share of each rank during one pipeline step.

    ``events_by_rank[r]`` lists rank ``r``'s compute as ``(kind, microbatch, start, end)`` in
    seconds of one clock shared by the ranks (``time.perf_counter`` is system-wide on Linux). The
    step lasts from the earliest start to the latest end over all ranks; a rank's idle share is
    ``1 - (its busy time) / (the step)``.
    """
    if not events_by_rank or any(not ev for ev in events_by_rank):
        raise ValueError("every rank needs at least one recorded (kind, microbatch, start, end)")
    start = min(s for ev in events_by_rank for _, _, s, _ in ev)
    end = max(e for ev in events_by_rank for _, _, _, e in ev)
    if end <= start:
        raise ValueError("the events span no time: were start and end swapped?")
    return [1 - sum(e - s for _, _, s, e in ev) / (end - start) for ev in events_by_rank]


def peak_in_flight(events: list[tuple[str, int, float, float]]) -> int:
    """Most microbatches whose forward had finished but whose backward had not, on one rank: how
    many microbatches' activations the stage held at once (GPipe: all $m$; 1F1B: at most $p$)."""
    held, peak = 0, 0
    for kind, _, _, _ in sorted(events, key=lambda e: e[2]):
        if kind not in ("forward", "backward"):
            raise ValueError(f"event kinds are 'forward' and 'backward', got {kind!r}")
        held += 1 if kind == "forward" else -1
        peak = max(peak, held)
    return peak


# --------------------------------------------------------------------------- expert parallelism


def expert_owner(expert: torch.Tensor, n_experts: int, world_size: int) -> torch.Tensor:
    """The rank that holds each expert id: experts are placed in contiguous blocks of $E/t$."""
    shard_range(n_experts, 0, world_size, "n_experts")  # checks divisibility
    return torch.div(expert, n_experts // world_size, rounding_mode="floor")


class _AllToAll(torch.autograd.Function):
    """All-to-all with split sizes forward; the reverse all-to-all of the gradient backward."""

    @staticmethod
    def forward(ctx, x, send, recv, group):  # type: ignore[override]
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


class ExpertParallelMoE(nn.Module):
    """Rank $r$'s part of a :class:`utils.moe.MoE`: the router, experts ``shard_range(E, r, t)``.

    Each rank routes *its own* tokens, then (1) sorts the (token, expert) assignments by the rank
    that owns the expert, (2) exchanges how many it will send to each rank (an all-to-all of
    counts), (3) sends the token vectors and local expert ids (all-to-all with those split sizes),
    (4) runs its experts on what it received, (5) sends the results back along the reverse split
    and (6) adds them up weighted by the gates, as the dense layer does. Dropless: no capacity
    limit, so the result equals the single-process MoE on the same tokens.
    """

    def __init__(self, dense: MoE, rank: int, world_size: int,
                 group: dist.ProcessGroup | None = None, log: CommLog | None = None) -> None:
        super().__init__()
        mine = shard_range(dense.n_experts, rank, world_size, "n_experts")
        self.n_experts, self.top_k = dense.n_experts, dense.top_k
        self.renormalize = dense.renormalize
        self.world_size, self.first_expert = world_size, mine.start
        self.router = copy.deepcopy(dense.router)
        self.experts = nn.ModuleList(copy.deepcopy(dense.experts[e])
                                     for e in range(mine.start, mine.stop))
        self.group, self.log = group, log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        _, gates, experts = route(self.router(x), self.top_k, self.renormalize)
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)
        slot = torch.arange(self.top_k, device=x.device).repeat(x.shape[0])
        expert = experts.reshape(-1)
        owner = expert_owner(expert, self.n_experts, self.world_size)
        order = torch.argsort(owner, stable=True)  # assignments grouped by destination rank
        token, slot, expert = token[order], slot[order], expert[order]
        send_counts = torch.bincount(owner, minlength=self.world_size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # (2) the counts
        send, recv = send_counts.tolist(), recv_counts.tolist()
        recv_id = torch.empty(sum(recv), dtype=expert.dtype, device=x.device)  # expert per row
        dist.all_to_all_single(recv_id, expert.contiguous(), recv, send, group=self.group)
        outgoing = x[token].contiguous()
        if self.log is not None:
            self.log.add("all_to_all", "dispatch", outgoing)
        incoming = _AllToAll.apply(outgoing, send, recv, self.group)  # (3) the tokens
        results = torch.zeros_like(incoming)
        for i, expert_module in enumerate(self.experts):  # (4) this rank's experts
            rows = torch.where(recv_id == self.first_expert + i)[0]
            if rows.numel():
                results = results.index_put((rows,), expert_module(incoming[rows]))
        if self.log is not None:
            self.log.add("all_to_all", "combine", results)
        back = _AllToAll.apply(results, recv, send, self.group)  # (5) results, in our order
        weighted = back * gates[token, slot, None].to(x.dtype)
        return torch.zeros_like(x).index_add(0, token, weighted).reshape(shape)  # (6)


# --------------------------------------------------------------------------- arithmetic


def tp_bytes_per_layer(d_model: int, tokens: int, tp: int, bytes_per_value: float = 2,
                       training: bool = True) -> dict[str, float]:
    """Tensor-parallel communication of one transformer layer (Megatron's attention + MLP split).

    Forward: 2 all-reduces of the activations, ``tokens x d_model`` values each; a training step
    adds 2 in the backward pass. Returns the count, the size of one all-reduce, and the bytes each
    rank sends (ring all-reduce), per layer.
    """
    for name, value in (("d_model", d_model), ("tokens", tokens), ("tp", tp)):
        check_positive_int(name, value)
    count = 4 if training else 2
    size = tokens * d_model * bytes_per_value
    return {"all_reduces": count, "bytes_per_all_reduce": size,
            "sent_per_rank": count * ring_allreduce_formula(size, tp)}


def pp_bytes_per_boundary(d_model: int, tokens: int, bytes_per_value: float = 2,
                          training: bool = True) -> float:
    """Bytes crossing one pipeline boundary for ``tokens`` tokens: the hidden states forward
    (``tokens x d_model`` values) and, when training, their gradient backward (as much again)."""
    for name, value in (("d_model", d_model), ("tokens", tokens)):
        check_positive_int(name, value)
    return (2 if training else 1) * tokens * d_model * bytes_per_value


def ep_bytes_per_layer(d_model: int, tokens: int, top_k: int, ep: int,
                       bytes_per_value: float = 2, training: bool = True) -> float:
    """Bytes one rank sends in an expert-parallel MoE layer, for ``tokens`` tokens of its own.

    Each token goes to ``top_k`` experts; with routing spread evenly over ``ep`` ranks a share
    $(t-1)/t$ of those copies leave the rank, in the dispatch all-to-all and again in the combine;
    a training step repeats both for the gradients.
    """
    for name, value in (("d_model", d_model), ("tokens", tokens), ("top_k", top_k), ("ep", ep)):
        check_positive_int(name, value)
    one_way = tokens * top_k * (ep - 1) / ep * d_model * bytes_per_value
    return (4 if training else 2) * one_way


# --------------------------------------------------------------------------- workers


def _state_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().cpu().clone() for name, p in module.named_parameters()
            if p.grad is not None}


def _cpu(value: Any) -> Any:
    """``value`` with every tensor in it (dicts, lists, tuples) detached and moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


def tensor_parallel_worker(rank: int, world_size: int, cfg: LlamaConfig, block_state: dict,
                           linear_state: dict, x_block: torch.Tensor,
                           x_linear: torch.Tensor) -> dict[str, Any]:
    """Run on every rank by :func:`utils.distributed.launch`: our TP layers next to DTensor's.

    1. One linear layer (weights ``linear_state`` of ``nn.Linear``) column-parallel with gathered
       output and row-parallel, ours and ``torch.distributed.tensor.parallel``'s
       (``ColwiseParallel`` / ``RowwiseParallel`` on a 1-D ``DeviceMesh``), forward and backward
       of ``sum(y * y)``.
    2. The Llama block ``block_state`` as :class:`TensorParallelBlock` and as the same block after
       ``parallelize_module``, forward and backward of ``sum(y * y)``, counting our collectives.

    Returns this rank's outputs, its gradient shards (ours and DTensor's local shards) and the
    :class:`CommLog` counts; the parent compares them with the dense layers.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    device = rank_device(rank, dist.get_backend())
    mesh = init_device_mesh(device.type, (world_size,))
    x_block, x_linear = x_block.to(device), x_linear.to(device)
    out: dict[str, Any] = {}

    def run(module, x, *args):
        x = x.clone().requires_grad_(True)
        y = module(x, *args)
        (y * y).sum().backward()
        return y.detach(), x.grad.detach()

    dense = nn.Linear(linear_state["weight"].shape[1], linear_state["weight"].shape[0], bias=True)
    dense.load_state_dict(linear_state)
    dense.to(device)
    # 1a. column-parallel, output gathered
    log = CommLog()
    col = ColumnParallelLinear(dense, rank, world_size, gather_output=True, log=log)
    out["col_y"], out["col_dx"] = run(col, x_linear)
    out["col_dw"], out["col_db"] = col.weight.grad.clone(), col.bias.grad.clone()
    theirs = parallelize_module(copy.deepcopy(dense), mesh,
                                ColwiseParallel(output_layouts=Replicate()))
    out["dt_col_y"], out["dt_col_dx"] = run(theirs, x_linear)
    out["dt_col_dw"] = theirs.weight.grad.to_local().clone()
    # 1b. row-parallel: the input arrives sharded (each rank holds its slice of the features)
    row = RowParallelLinear(dense, rank, world_size, input_is_parallel=True, log=log)
    x_local = x_linear[..., row.cols]
    out["row_y"], out["row_dx"] = run(row, x_local)
    out["row_dw"], out["row_db"] = row.weight.grad.clone(), row.bias.grad.clone()
    theirs = parallelize_module(copy.deepcopy(dense), mesh, RowwiseParallel())
    out["dt_row_y"], out["dt_row_dx"] = run(theirs, x_local)
    out["dt_row_dw"] = theirs.weight.grad.to_local().clone()
    out["linear_log"] = list(log.events)

    # 2. a Llama block
    block = Block(cfg)
    block.load_state_dict(block_state)
    block.to(device)
    cos, sin = rope_cos_sin(torch.arange(x_block.shape[1], device=device), cfg.head_dim,
                            cfg.rope_theta)
    log = CommLog()
    tp = TensorParallelBlock(block, rank, world_size, log=log)
    out["block_y"], out["block_dx"] = run(tp, x_block, cos, sin)
    out["block_grads"] = _state_grads(tp)
    out["block_log"] = list(log.events)
    theirs = copy.deepcopy(block)
    plan = {"attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(),
            "attn.wv": ColwiseParallel(), "attn.wo": RowwiseParallel(),
            "mlp.w_gate": ColwiseParallel(), "mlp.w_up": ColwiseParallel(),
            "mlp.w_down": RowwiseParallel()}
    parallelize_module(theirs, mesh, plan)
    theirs.attn.n_heads //= world_size  # our Attention reshapes by its head counts: local ones
    theirs.attn.n_kv_heads //= world_size
    out["dt_block_y"], out["dt_block_dx"] = run(theirs, x_block, cos, sin)
    out["dt_block_grads"] = {
        name: (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).detach().clone()
        for name, p in theirs.named_parameters()}
    return _cpu(out)


class _Timed:
    """Wraps a PipelineStage's forward_one_chunk / backward_one_chunk to record timestamps."""

    def __init__(self, stage: Any) -> None:
        self.events: list[tuple[str, int, float, float]] = []
        for kind, name in (("forward", "forward_one_chunk"), ("backward", "backward_one_chunk")):
            setattr(stage, name, self._wrap(kind, getattr(stage, name)))

    def _wrap(self, kind: str, fn: Callable) -> Callable:
        def timed(chunk_id, *args, **kwargs):
            start = time.perf_counter()
            result = fn(chunk_id, *args, **kwargs)
            self.events.append((kind, int(chunk_id), start, time.perf_counter()))
            return result
        return timed


def pipeline_worker(rank: int, world_size: int, cfg: LlamaConfig, model_state: dict,
                    idx: torch.Tensor, targets: torch.Tensor, microbatches: list[int],
                    repeats: int = 3) -> dict[str, Any]:
    """Run on every rank: rank ``r`` is stage ``r`` of :func:`split_llama` (one stage per rank).

    1. Correctness: a forward-only step (``schedule.eval``) and one training step with
       ``ScheduleGPipe`` and with ``Schedule1F1B`` (``microbatches[-1]`` microbatches); the last
       stage returns logits and per-microbatch losses, every stage its gradients.
    2. Timing: every (schedule, ``m``) setting for ``m`` in ``microbatches`` (1F1B only where
       ``m >= world_size``: torch's ``Schedule1F1B`` needs a microbatch per stage) is built and
       warmed up once; then ``repeats`` rounds each time one training step of every setting, in
       alternating rounds (round ``r`` starts ``r`` settings further down the list), so that a
       change in the machine's load spreads over all settings instead of landing on one block.
       Each timed step records every stage's (kind, microbatch, start, end) timestamps; the
       ``"repeat"`` of a timing is its round.
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    schedules = {"GPipe": ScheduleGPipe, "1F1B": Schedule1F1B}
    device = rank_device(rank, dist.get_backend())

    def build(schedule_cls, m):
        model = Llama(cfg)
        model.load_state_dict(model_state)
        stage_module = split_llama(model, world_size)[rank].to(device)
        stage = PipelineStage(stage_module, rank, world_size, device)
        timer = _Timed(stage)
        return stage_module, schedule_cls(stage, n_microbatches=m, loss_fn=next_token_loss), timer

    def step(schedule, train=True):
        losses: list = []
        is_first, is_last = rank == 0, rank == world_size - 1
        args = (idx.to(device),) if is_first else ()
        kwargs = {"target": targets.to(device), "losses": losses} if is_last else {}
        y = schedule.step(*args, **kwargs) if train else schedule.eval(*args, **kwargs)
        return _cpu(y), [loss.detach().cpu() for loss in losses]

    out: dict[str, Any] = {"stage_layers": None, "check": {}, "timings": []}
    m_check = microbatches[-1]
    for name, cls in schedules.items():
        module, schedule, _ = build(cls, m_check)
        out["stage_layers"] = (module.first, module.last)
        with torch.no_grad():
            y_eval, _ = step(schedule, train=False)
        y_train, losses = step(schedule)
        out["check"][name] = {"eval_logits": y_eval, "train_logits": y_train, "losses": losses,
                              "grads": _state_grads(module)}
    settings = []
    for m in microbatches:
        for name, cls in schedules.items():
            if name == "1F1B" and m < world_size:
                continue  # 1F1B needs at least one microbatch per stage
            module, schedule, timer = build(cls, m)
            step(schedule)  # warm-up: shapes, buffers, first-call costs
            settings.append((name, m, module, schedule, timer))
    for r in range(repeats):  # the same order on every rank: the stages must step together
        shift = r % len(settings)
        for name, m, module, schedule, timer in settings[shift:] + settings[:shift]:
            timer.events.clear()
            dist.barrier()
            module.zero_grad()
            step(schedule)
            out["timings"].append({"schedule": name, "m": m, "repeat": r,
                                   "events": list(timer.events)})
    return out


def expert_parallel_worker(rank: int, world_size: int, cfg: LlamaConfig, n_experts: int,
                           top_k: int, moe_state: dict, x_by_rank: list[torch.Tensor]
                           ) -> dict[str, Any]:
    """Run on every rank: :class:`ExpertParallelMoE` on this rank's tokens ``x_by_rank[rank]``.

    Forward, then backward of ``sum(y * y)``; returns the output, the input's gradient, the
    gradients of the router (this rank's tokens only: summing over ranks gives the dense one) and
    of this rank's experts, the experts it holds and the :class:`CommLog`.
    """
    device = rank_device(rank, dist.get_backend())
    dense = MoE(cfg, n_experts, top_k)
    dense.load_state_dict(moe_state)
    log = CommLog()
    layer = ExpertParallelMoE(dense.to(device), rank, world_size, log=log)
    x = x_by_rank[rank].to(device).requires_grad_(True)
    y = layer(x)
    (y * y).sum().backward()
    first = layer.first_expert
    return _cpu({"y": y, "dx": x.grad, "router_grad": layer.router.weight.grad,
                 "expert_grads": {f"experts.{first + i}.{name}": p.grad
                                  for i, e in enumerate(layer.experts)
                                  for name, p in e.named_parameters()},
                 "experts": list(range(first, first + len(layer.experts))),
                 "log": list(log.events)})
