"""Sharding the training state across ranks: ZeRO's arithmetic and PyTorch's FSDP2 (Part 8,
"Sharding: ZeRO and FSDP").

**The memory of data-parallel training.** A model of $\\Psi$ parameters trained with Adam keeps, on
every rank of plain data parallelism, the parameters ($b_p \\Psi$ bytes), their gradients
($b_g \\Psi$) and the optimizer states ($K \\Psi$). Rajbhandari et al. (2020, ZeRO) count mixed
precision as $b_p = b_g = 2$ (fp16/bf16) and $K = 12$ (an fp32 master copy, Adam's $m$ and $v$):
16 bytes per parameter. This module's CPU runs train in fp32: $b_p = b_g = 4$ and $K = 8$ ($m$ and
$v$; the parameters are their own master copy), again 16 bytes per parameter
(:data:`BYTES_PER_PARAM`). ZeRO's stages divide these terms by the number of ranks $N$:

$$M_0 = (b_p + b_g + K)\\Psi,\\quad M_1 = (b_p + b_g)\\Psi + \\tfrac{K\\Psi}{N},\\quad
M_2 = b_p\\Psi + \\tfrac{(b_g + K)\\Psi}{N},\\quad M_3 = \\tfrac{(b_p + b_g + K)\\Psi}{N}$$

(:func:`zero_bytes_per_rank`, :func:`zero_table`). Stages 1 and 2 communicate what data parallelism
does ($2\\Psi$ per step: a reduce-scatter and an all-gather); stage 3 gathers the parameters once in
the forward and once in the backward pass, $3\\Psi$ (:func:`zero_comm_volume`).

**FSDP2's shards.** ``torch.distributed.fsdp.fully_shard`` (Zhao et al. 2023) is ZeRO stage 3: each
parameter becomes a DTensor cut along its first dimension into $N$ chunks of
$\\lceil d_0 / N \\rceil$ rows (``torch.chunk``: the last ranks get fewer, maybe none;
:func:`shard_rows`, :func:`local_numel`). Parameters and gradients live in buffers padded to whole
chunks, so every rank holds $\\sum_p \\lceil d_0/N \\rceil r_p$ elements of each
(:func:`padded_numel`, $r_p$ the elements per row), within one row per parameter of $\\Psi/N$;
Adam's states are allocated like the unpadded local shards. :func:`state_bytes` measures all of
this from the tensors' storage.

**Workers** for :func:`utils.distributed.launch` (module-level so that spawned processes import
them): :func:`zero_worker` trains with ZeRO-1 (``ZeroRedundancyOptimizer`` under DDP) and with
``fully_shard``, measures each rank's state at rest and the unsharded parameters it holds while
it computes, and times sharded and one-process steps in alternating rounds;
:func:`checkpoint_worker` trains with ``fully_shard``, saves ``torch.distributed.checkpoint``
checkpoints every few steps, can kill its own rank at a planted step, and resumes (on any number
of ranks) from a checkpoint. In this process, :func:`train_single` is the one-process reference
and :func:`load_checkpoint_single` loads a sharded checkpoint into a plain model. The data of
step $t$ depends on $t$ only (:func:`batch_at`), so a resumed run sees exactly the batches an
uninterrupted one sees.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from utils.checks import check_positive_int, check_positive_number
from utils.llama import Llama, LlamaConfig
from utils.ddp import make_model
from utils.distributed import rank_device
from utils.pretrain import get_batch, lm_loss

__all__ = [
    "BYTES_PER_PARAM",
    "ZERO_STAGES",
    "zero_bytes_per_rank",
    "zero_comm_volume",
    "zero_table",
    "shard_rows",
    "local_numel",
    "padded_numel",
    "state_bytes",
    "RunSpec",
    "batch_at",
    "build_model",
    "train_single",
    "full_parameters",
    "checkpoint_dir",
    "latest_checkpoint",
    "read_log",
    "load_checkpoint_single",
    "zero_worker",
    "checkpoint_worker",
]

BYTES_PER_PARAM: dict[str, dict[str, int]] = {
    "mixed": {"parameters": 2, "gradients": 2, "optimizer": 12},  # ZeRO's accounting (K = 12)
    "fp32": {"parameters": 4, "gradients": 4, "optimizer": 8},  # this chapter's CPU runs (K = 8)
}
"""Bytes per parameter for each term: ``"mixed"`` as Rajbhandari et al. (2020) count it (bf16/fp16
parameters and gradients; fp32 master copy, momentum and variance), ``"fp32"`` as trained here."""

ZERO_STAGES: dict[int, tuple[str, ...]] = {
    0: (),
    1: ("optimizer",),
    2: ("optimizer", "gradients"),
    3: ("optimizer", "gradients", "parameters"),
}
"""Which terms each ZeRO stage shards (stage 0 is plain data parallelism)."""

_TERMS = ("parameters", "gradients", "optimizer")


def _check_stage(stage: int) -> int:
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise ValueError(f"stage must be 0, 1, 2 or 3 (ZeRO stages; 0 = plain data parallel), "
                         f"got {stage!r}")
    return int(stage)


def _check_precision(precision: str) -> dict[str, int]:
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"precision must be one of {sorted(BYTES_PER_PARAM)}, got {precision!r}")
    return BYTES_PER_PARAM[precision]


def zero_bytes_per_rank(n_params: float, stage: int, world_size: int,
                        precision: str = "mixed") -> dict[str, float]:
    """Bytes of model state one rank holds under ZeRO ``stage`` on ``world_size`` ranks.

    Each term is $b\\Psi$, divided by $N$ when the stage shards it (:data:`ZERO_STAGES`); the result
    has ``parameters``, ``gradients``, ``optimizer`` and ``total``. Activations, temporary buffers
    and fragmentation are not model state and are not counted (Rajbhandari et al. 2020, Sec. 3).
    """
    n_params = check_positive_number("n_params", n_params)
    stage, world_size = _check_stage(stage), check_positive_int("world_size", world_size)
    per_param = _check_precision(precision)
    out = {term: per_param[term] * n_params / (world_size if term in ZERO_STAGES[stage] else 1)
           for term in _TERMS}
    out["total"] = sum(out.values())
    return out


def zero_comm_volume(n_params: float, stage: int) -> float:
    """Elements each rank sends and receives per training step, in ZeRO's accounting (Sec. 7).

    Data parallelism all-reduces the gradients: a reduce-scatter and an all-gather, $2\\Psi$.
    Stages 1 and 2 do the same two collectives on the same data ($2\\Psi$); stage 3 all-gathers the
    parameters in the forward and again in the backward pass and reduce-scatters the gradients,
    $3\\Psi$ (1.5 times data parallelism).
    """
    n_params = check_positive_number("n_params", n_params)
    return (3.0 if _check_stage(stage) == 3 else 2.0) * n_params


def zero_table(models: Mapping[str, float], devices: Sequence[int], precision: str = "mixed",
               unit: float = 1e9) -> pd.DataFrame:
    """Per-device model-state memory for each model and device count, stages 0-3, in ``unit`` bytes.

    ``models`` maps a name to a parameter count, e.g. ``{"7B": 7e9}``; the default unit is the
    decimal GB (1e9 bytes) the ZeRO paper uses. One row per (model, devices) pair.
    """
    if not models or not devices:
        raise ValueError("zero_table needs at least one model and one device count")
    unit = check_positive_number("unit", unit)
    rows = []
    for name, n_params in models.items():
        for n in devices:
            row: dict[str, Any] = {"model": name, "parameters": n_params, "devices": n}
            for stage in ZERO_STAGES:
                total = zero_bytes_per_rank(n_params, stage, n, precision)["total"]
                row[f"stage {stage}"] = total / unit
            rows.append(row)
    return pd.DataFrame(rows).set_index(["model", "devices"])


def shard_rows(dim0: int, world_size: int, rank: int) -> int:
    """Rows of a first dimension of size ``dim0`` that ``rank`` holds under FSDP2 (``torch.chunk``).

    Chunks have $c = \\lceil d_0/N \\rceil$ rows; rank $r$ gets $\\max(0, \\min(c, d_0 - rc))$.
    """
    dim0 = check_positive_int("dim0", dim0)
    world_size = check_positive_int("world_size", world_size)
    rank = check_positive_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    chunk = math.ceil(dim0 / world_size)
    return max(0, min(chunk, dim0 - rank * chunk))


def _shapes(shapes: Iterable[Sequence[int]]) -> list[tuple[int, ...]]:
    out = [tuple(int(d) for d in s) for s in shapes]
    if not out or any(len(s) == 0 for s in out):
        raise ValueError("shapes must be a non-empty list of parameter shapes with >= 1 dimension")
    return out


def local_numel(shapes: Iterable[Sequence[int]], world_size: int, rank: int) -> int:
    """Elements of all parameters with ``shapes`` that ``rank`` holds (unpadded local shards)."""
    return sum(shard_rows(s[0], world_size, rank) * math.prod(s[1:]) for s in _shapes(shapes))


def padded_numel(shapes: Iterable[Sequence[int]], world_size: int) -> int:
    """Elements every rank allocates for parameters (or gradients) with ``shapes``: whole chunks.

    $\\sum_p \\lceil d_{0,p}/N \\rceil r_p$, which exceeds $\\Psi/N$ by less than one row $r_p$ per
    parameter.
    """
    world_size = check_positive_int("world_size", world_size)
    return sum(math.ceil(s[0] / world_size) * math.prod(s[1:]) for s in _shapes(shapes))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = _local(t).untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What this rank holds of the training state, in bytes, read from the tensors themselves.

    ``parameters`` and ``gradients``: the storages behind the local tensors (DTensor shards via
    ``to_local()``; a buffer shared by several views counted once, padding included);
    ``parameters_unpadded``: elements times element size of the local shards; ``optimizer``:
    Adam's ``exp_avg`` and ``exp_avg_sq`` held by this rank (for ``ZeroRedundancyOptimizer``, the
    states of its own partition); ``step_counters``: Adam's per-parameter ``step`` scalars, reported
    apart because no formula counts them.
    """
    params = list(model.parameters())
    inner = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
    moments, steps = [], []
    for state in inner.state.values():
        moments += [state[k] for k in ("exp_avg", "exp_avg_sq") if k in state]
        steps += [state["step"]] if "step" in state else []
    return {
        "parameters": _storage_bytes(params),
        "parameters_unpadded": sum(_local(p).numel() * p.element_size() for p in params),
        "gradients": _storage_bytes(p.grad for p in params if p.grad is not None),
        "optimizer": sum(_local(t).numel() * t.element_size() for t in moments),
        "step_counters": sum(t.numel() * t.element_size() for t in steps),
    }


@dataclass(frozen=True)
class RunSpec:
    """One training run: model config, token stream, steps, global batch and AdamW settings.

    The global batch of ``batch_size`` windows is the same whatever the number of ranks; rank $r$
    of $N$ takes rows $[rB/N, (r+1)B/N)$, so ``batch_size`` must be divisible by every world size
    used with the spec.
    """

    cfg: LlamaConfig
    data: torch.Tensor
    steps: int = 10
    batch_size: int = 8
    context: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "context"):
            check_positive_int(name, getattr(self, name))
        check_positive_number("lr", self.lr)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not isinstance(self.data, torch.Tensor) or self.data.dim() != 1:
            raise ValueError("data must be a 1-D tensor of token ids (utils.pretrain.pack)")
        if len(self.data) < self.context + 1:
            raise ValueError(f"data has {len(self.data)} tokens; a window needs {self.context + 1}")


def batch_at(spec: RunSpec, step: int, rank: int = 0,
             world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of training step ``step`` for ``rank`` of ``world_size``.

    The global batch is drawn from a generator seeded with ``(seed, step)`` only, so the data
    order depends on the step and nothing else: a run resumed at step $t$ sees what an
    uninterrupted run sees, on any number of ranks.
    """
    step = check_positive_int("step", step, minimum=0)
    world_size = check_positive_int("world_size", world_size)
    if spec.batch_size % world_size:
        raise ValueError(f"batch_size {spec.batch_size} is not divisible by world_size "
                         f"{world_size}: every rank must get the same number of windows")
    g = torch.Generator().manual_seed(spec.seed * 1_000_003 + step)
    x, y = get_batch(spec.data, spec.batch_size, spec.context, generator=g)
    per = spec.batch_size // world_size
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def build_model(spec: RunSpec) -> Llama:
    """The run's :class:`utils.llama.Llama`, initialised from ``spec.seed`` (same on every rank)."""
    return make_model(spec.cfg, spec.seed)


def _optimizer(spec: RunSpec, params: Iterable[torch.Tensor]) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full CPU tensor (DTensor shards all-gathered: every rank must call)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = t.detach().cpu().clone()
    return out


def _single_step(spec: RunSpec, model: nn.Module, optimizer: torch.optim.Optimizer,
                 step: int) -> tuple[float, float]:
    """One AdamW step of one process on the whole global batch: ``(loss, seconds)``."""
    tic = time.perf_counter()
    x, y = batch_at(spec, step)
    optimizer.zero_grad(set_to_none=True)
    loss = lm_loss(model, x, y)
    loss.backward()
    optimizer.step()
    return loss.item(), time.perf_counter() - tic


def train_single(spec: RunSpec, start: int = 0, stop: int | None = None,
                 model: nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """The one-process reference: AdamW on the whole global batch for steps ``start .. stop - 1``.

    Returns ``losses`` (one per step, before its update), ``seconds`` (wall time of each step),
    ``parameters`` (full, after the last step), ``model``, ``optimizer`` and ``memory``
    (:func:`state_bytes`, gradients still held: the state of ZeRO stage 0). Pass ``model`` and
    ``optimizer`` to continue a loaded run.
    """
    stop = spec.steps if stop is None else stop
    if not 0 <= start < stop:
        raise ValueError(f"need 0 <= start < stop, got start={start}, stop={stop}")
    if (model is None) != (optimizer is None):
        raise ValueError("pass both model and optimizer (a loaded run) or neither (a fresh one)")
    if model is None:
        model = build_model(spec)
        optimizer = _optimizer(spec, model.parameters())
    losses, seconds = [], []
    for step in range(start, stop):
        loss, dt = _single_step(spec, model, optimizer, step)
        losses.append(loss)
        seconds.append(dt)
    return {"losses": losses, "seconds": seconds, "parameters": full_parameters(model),
            "model": model, "optimizer": optimizer, "memory": state_bytes(model, optimizer)}


def _fsdp_model(spec: RunSpec, world_size: int, reshard_after_forward: bool = True) -> Llama:
    """The run's model wrapped with FSDP2: each block its own unit, then the root (embeddings,
    final norm and the tied head)."""
    mesh = init_device_mesh("cpu", (world_size,))
    model = build_model(spec)
    for block in model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def _global_loss(loss: torch.Tensor, world_size: int) -> float:
    """The mean of the ranks' losses (each a mean over equally many tokens): the full batch's."""
    value = loss.detach().clone()
    dist.all_reduce(value)
    return value.item() / world_size


def _train_fsdp(spec: RunSpec, model: nn.Module, optimizer: torch.optim.Optimizer, start: int,
                stop: int, rank: int, world_size: int,
                hooks: Any = None) -> tuple[list[float], list[float]]:
    losses, seconds = [], []
    for step in range(start, stop):
        if hooks is not None:
            hooks.before(step)
        tic = time.perf_counter()
        x, y = batch_at(spec, step, rank, world_size)
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model, x, y)
        loss.backward()  # FSDP2 reduce-scatters the gradients: each rank keeps its shard's mean
        optimizer.step()  # on the local shards only
        losses.append(_global_loss(loss, world_size))
        seconds.append(time.perf_counter() - tic)
        if hooks is not None:
            hooks.after(step, losses[-1], model, optimizer)
    return losses, seconds


def _unsharded_peak(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
    """The most bytes of *unsharded* parameters and gradients this rank held during one forward
    and backward pass of an FSDP2 model (no optimizer step; the gradients are dropped after):
    ``parameters``, ``gradients`` and ``both`` (the largest sum at one moment).

    FSDP2 swaps a module's registered parameters for plain (unsharded) tensors while the unit is
    gathered and back to DTensor shards when it reshards, so the plain parameters registered in
    the model are exactly those gathered at that moment. They are counted (distinct storages) before
    and after every leaf module's forward, when the gradient of every leaf's output arrives and
    after every gradient is accumulated into an unsharded parameter; the sharded state at rest,
    activations and the transient all-gather and reduce-scatter buffers are not counted.
    """
    peak = {"parameters": 0, "gradients": 0, "both": 0}
    handles: list[Any] = []
    hooked: set[int] = set()

    def sample(*_: Any) -> None:
        plain = [p for p in model.parameters() if not isinstance(p, DTensor)]
        params = _storage_bytes(plain)
        grads = _storage_bytes(p.grad for p in plain if p.grad is not None)
        for key, value in (("parameters", params), ("gradients", grads), ("both", params + grads)):
            peak[key] = max(peak[key], value)
        for p in plain:  # catch each gradient as it lands in the unsharded parameter
            if id(p) not in hooked and p.requires_grad:
                hooked.add(id(p))
                handles.append(p.register_post_accumulate_grad_hook(sample))

    def after_forward(module: nn.Module, args: Any, output: Any) -> None:
        sample()
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(sample)  # runs in backward, before this module's own backward

    for module in model.modules():
        if next(module.children(), None) is None:  # leaves compute; containers only call them
            handles.append(module.register_forward_pre_hook(sample))
            handles.append(module.register_forward_hook(after_forward))
    try:
        for p in model.parameters():
            p.grad = None
        lm_loss(model, x, y).backward()
        sample()
    finally:
        for handle in handles:
            handle.remove()
        for p in model.parameters():
            p.grad = None
    return peak


def _interleaved_times(spec: RunSpec, model: nn.Module, optimizer: torch.optim.Optimizer,
                       rank: int, world_size: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of the sharded run and of one process, measured in alternating rounds.

    Each round times one step of ``model`` (all ranks) and one step of a fresh one-process model
    on the whole global batch (rank 0 alone; the other ranks wait at a barrier), the sharded step
    first in even rounds and second in odd ones, so that drifts of a shared machine fall on both.
    The steps continue the data order after ``spec.steps``. Returns ``fsdp`` (this rank's
    seconds) and ``single`` (rank 0's; empty on the other ranks); round 0 includes warm-up.
    """
    single = build_model(spec) if rank == 0 else None
    single_opt = _optimizer(spec, single.parameters()) if single is not None else None
    out: dict[str, list[float]] = {"fsdp": [], "single": []}
    for r in range(rounds):
        step = spec.steps + r
        for which in (("fsdp", "single") if r % 2 == 0 else ("single", "fsdp")):
            dist.barrier()
            if which == "fsdp":
                out["fsdp"] += _train_fsdp(spec, model, optimizer, step, step + 1, rank,
                                           world_size)[1]
            elif single is not None:
                out["single"].append(_single_step(spec, single, single_opt, step)[1])
    dist.barrier()
    return out


def _require_cpu_group(rank: int) -> None:
    """These workers keep the model and batches on the CPU: refuse a GPU (nccl) group clearly."""
    if rank_device(rank, dist.get_backend()).type != "cpu":
        raise RuntimeError("utils.sharding's workers run on the CPU only: launch them with "
                           "backend='gloo' (on a GPU machine, launch picks nccl by default)")


def zero_worker(rank: int, world_size: int, spec: RunSpec,
                timing_rounds: int = 0) -> dict[str, Any]:
    """Train ``spec.steps`` steps twice on this rank: ZeRO-1, then ZeRO-3 with ``fully_shard``.

    ZeRO-1 is PyTorch's ``ZeroRedundancyOptimizer`` (each rank keeps Adam states for a greedy
    partition of whole parameters) under ``DistributedDataParallel`` (which all-reduces the
    gradients). Returns per stage ``losses``, ``memory`` (:func:`state_bytes` after the last step,
    gradients still held), ``seconds`` per step, ``shapes`` of the parameters and, from rank 0,
    the final full ``parameters``; for ZeRO-1 also ``partition_numel``, the elements of this
    rank's partition. For ``fully_shard`` also ``working_peak``: the most bytes of unsharded
    parameters and gradients held during one more forward and backward pass (no update), on top
    of ``memory``; and, with ``timing_rounds`` > 0, ``timing``: that many alternating rounds of
    one sharded step and one one-process step on the whole batch (``fsdp`` and ``single``
    seconds), timed after the training run in this same launch.
    """
    _require_cpu_group(rank)
    timing_rounds = check_positive_int("timing_rounds", timing_rounds, minimum=0)
    out: dict[str, Any] = {}
    # ZeRO-1: replicated parameters and gradients, partitioned optimizer states.
    ddp = DistributedDataParallel(build_model(spec))
    opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.AdamW,
                                  lr=spec.lr, weight_decay=spec.weight_decay)
    losses, seconds = [], []
    for step in range(spec.steps):
        tic = time.perf_counter()
        x, y = batch_at(spec, step, rank, world_size)
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(ddp, x, y)
        loss.backward()  # DDP all-reduces (averages) the gradients
        opt.step()  # updates this rank's partition, then broadcasts it to the others
        losses.append(_global_loss(loss, world_size))
        seconds.append(time.perf_counter() - tic)
    model = ddp.module
    out["zero1"] = {
        "losses": losses, "seconds": seconds, "memory": state_bytes(model, opt),
        "partition_numel": sum(p.numel() for g in opt.optim.param_groups for p in g["params"]),
        "parameters": full_parameters(model) if rank == 0 else None,
    }
    del ddp, opt, model
    # ZeRO-3: FSDP2 shards parameters, gradients and optimizer states.
    model = _fsdp_model(spec, world_size)
    opt = _optimizer(spec, model.parameters())
    losses, seconds = _train_fsdp(spec, model, opt, 0, spec.steps, rank, world_size)
    params = full_parameters(model)
    out["fsdp"] = {
        "losses": losses, "seconds": seconds, "memory": state_bytes(model, opt),
        "shapes": [tuple(p.shape) for p in model.parameters()],
        "parameters": params if rank == 0 else None,
        "working_peak": _unsharded_peak(model, *batch_at(spec, spec.steps, rank, world_size)),
    }
    if timing_rounds:
        out["fsdp"]["timing"] = _interleaved_times(spec, model, opt, rank, world_size,
                                                   timing_rounds)
    return out


def checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint taken after ``step`` completed steps lives: ``root/step_0008``."""
    return Path(root) / f"step_{check_positive_int('step', step, minimum=0):04d}"


def latest_checkpoint(root: str | os.PathLike) -> tuple[int, Path] | None:
    """The newest *complete* checkpoint under ``root`` as ``(step, path)``, or None.

    ``dcp.save`` writes the ``.metadata`` file after every rank's data is written, so a folder
    without it is a checkpoint a crash interrupted, and it is skipped.
    """
    found = []
    for path in Path(root).glob("step_*"):
        if (path / ".metadata").exists() and path.name[5:].isdigit():
            found.append((int(path.name[5:]), path))
    return max(found) if found else None


def read_log(path: str | os.PathLike) -> dict[int, float]:
    """The ``{step: loss}`` records a run's rank 0 appended to a JSON-lines log (last one wins)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no training log at {path}: did the run start, with log_path set?")
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            out[int(record["step"])] = float(record["loss"])
    return out


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _load(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Fill ``model`` and ``optimizer`` from a dcp checkpoint; each rank reads its shards."""
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])


class _CheckpointHooks:
    """Planted failure before a step; log, and save every ``save_every`` steps, after one."""

    def __init__(self, rank: int, root: str | None, save_every: int | None, kill_at: int | None,
                 kill_rank: int, log_path: str | None) -> None:
        self.rank, self.root, self.save_every = rank, root, save_every
        self.kill_at, self.kill_rank, self.log_path = kill_at, kill_rank, log_path

    def before(self, step: int) -> None:
        if step == self.kill_at and self.rank == self.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash: no clean-up, no message

    def after(self, step: int, loss: float, model: nn.Module,
              optimizer: torch.optim.Optimizer) -> None:
        if self.rank == 0 and self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss}) + "\n")
        done = step + 1
        if self.save_every and self.root and done % self.save_every == 0:
            dcp.save(_state(model, optimizer), checkpoint_id=str(checkpoint_dir(self.root, done)))


def checkpoint_worker(rank: int, world_size: int, spec: RunSpec, root: str | None = None,
                      save_every: int | None = None, resume_from: str | None = None,
                      stop: int | None = None, kill_at: int | None = None, kill_rank: int = 1,
                      log_path: str | None = None) -> dict[str, Any]:
    """Train with ``fully_shard`` from step 0 (or a checkpoint) to ``stop``; checkpoint on the way.

    - ``resume_from``: a checkpoint folder (:func:`latest_checkpoint`); its step is read from the
      folder name and the run continues there. The checkpoint may come from any number of ranks:
      ``dcp.load`` reads each saved shard into whichever rank's shard overlaps it.
    - ``save_every``: ``dcp.save`` model and optimizer state dicts (``get_state_dict``) into
      ``root/step_XXXX`` after every ``save_every``-th step.
    - ``kill_at``: rank ``kill_rank`` sends itself SIGKILL before step ``kill_at`` (a planted crash;
      :func:`utils.distributed.launch` then raises ``WorkerError`` naming it).
    - ``log_path``: rank 0 appends ``{"step", "loss"}`` per step (survives a crash).

    Returns ``start``, ``losses``, ``seconds`` (per step), ``memory`` (:func:`state_bytes`) and,
    from rank 0, ``loaded`` (full parameters right after loading, or None) and ``parameters``
    (full, at the end).
    """
    _require_cpu_group(rank)
    model = _fsdp_model(spec, world_size)
    optimizer = _optimizer(spec, model.parameters())
    start, loaded = 0, None
    if resume_from is not None:
        name = Path(resume_from).name
        if not name.startswith("step_") or not name[5:].isdigit():
            raise ValueError(f"resume_from must be a folder named step_XXXX, got {resume_from!r}")
        start = int(name[5:])
        _load(model, optimizer, resume_from)
        loaded = full_parameters(model)
    stop = spec.steps if stop is None else stop
    hooks = _CheckpointHooks(rank, root, save_every, kill_at, kill_rank, log_path)
    losses, seconds = _train_fsdp(spec, model, optimizer, start, stop, rank, world_size, hooks)
    params = full_parameters(model)
    return {"start": start, "losses": losses, "seconds": seconds,
            "memory": state_bytes(model, optimizer), "loaded": loaded if rank == 0 else None,
            "parameters": params if rank == 0 else None}


def load_checkpoint_single(spec: RunSpec, path: str | os.PathLike) -> tuple[nn.Module,
                                                                            torch.optim.Optimizer,
                                                                            int]:
    """Load a (sharded, any-rank) dcp checkpoint into one plain model and AdamW in this process.

    No process group is needed: ``dcp.load`` then reads every shard into full tensors. Returns
    ``(model, optimizer, step)``; continue with ``train_single(spec, start=step, ...)``.
    """
    path = Path(path)
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"{path} is not a complete dcp checkpoint (no .metadata file)")
    model = build_model(spec)
    optimizer = _optimizer(spec, model.parameters())
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message=".*single process.*")
        warnings.filterwarnings("ignore", message=".*torch.distributed is .*")
        _load(model, optimizer, path)
    return model, optimizer, int(path.name[5:])
