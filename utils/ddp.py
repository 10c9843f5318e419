"""Data parallelism from scratch and with PyTorch's DDP (Part 8, "Data parallelism").

Two halves:

- **Arithmetic, run anywhere** (the parent process, a test): how a ring all-reduce splits a buffer
  into chunks and which chunk each rank sends at each step (:func:`chunk_sizes`,
  :func:`ring_schedule`), how many elements each rank sends (:func:`ring_allreduce_elements`, exact,
  and :func:`ring_allreduce_formula`, the textbook ``2 (p - 1) / p * N``), the same for a naive
  reduce-to-one-then-broadcast (:func:`naive_allreduce_elements`), and the alpha-beta time model
  (:func:`allreduce_seconds`). The single-process references that data parallelism must match also
  live here: :func:`make_model`, :func:`batch_gradients`, :func:`accumulated_gradients`,
  :func:`train_steps`.
- **Workers** for :func:`utils.distributed.launch` (they need an initialised process group):
  :func:`ring_reduce_scatter`, :func:`ring_all_gather` and :func:`ring_all_reduce` built from
  point-to-point ``isend``/``irecv`` (:func:`ring_exchange`), with a :class:`CommCounter` that
  counts the bytes they send; :func:`naive_all_reduce`; and the experiments the chapter
  launches, :func:`collectives_worker` (ours against ``dist.all_reduce``,
  ``reduce_scatter_single`` and ``all_gather_single``), :func:`ddp_worker` (DDP and our own
  data parallelism against one process on the full batch; gradient accumulation with
  ``no_sync``) and :func:`timing_worker` (DDP step times for several bucket sizes, with and
  without overlap, and in every step a timeline of each bucket's all-reduce,
  :class:`BackwardClock`).

The ring, for ``p`` ranks and a buffer cut into ``p`` chunks: in the **reduce-scatter** phase, at
step ``s = 0 .. p-2`` rank ``r`` sends chunk ``(r - s - 1) mod p`` to rank ``r + 1`` and adds the
chunk ``(r - s - 2) mod p`` it receives from rank ``r - 1`` into its own copy; after ``p - 1``
steps rank ``r`` holds chunk ``r`` summed over all ranks (the layout of
``dist.reduce_scatter_single``). In the **all-gather** phase, at step ``s`` rank ``r`` sends chunk
``(r - s) mod p`` and receives chunk ``(r - s - 1) mod p``, overwriting it. Each phase sends
``(p - 1)`` chunks of ``N / p`` elements per rank, so the all-reduce sends

$$2\\,\\frac{p-1}{p}\\,N$$

elements per rank, whatever ``p`` is: the per-rank traffic stays below ``2N`` as the ring grows
(Patarasuk and Yuan, 2009). The worker code is the same on GPUs: under ``nccl`` tensors go to
``utils.distributed.rank_device(rank, backend)`` and DDP gets ``device_ids=[rank]``.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from utils.checks import check_positive_int, check_positive_number
from utils.distributed import rank_device
from utils.llama import Llama, LlamaConfig
from utils.pretrain import lm_loss

__all__ = [
    "chunk_sizes",
    "ring_schedule",
    "ring_allreduce_elements",
    "ring_allreduce_formula",
    "naive_allreduce_elements",
    "allreduce_seconds",
    "CommCounter",
    "ring_exchange",
    "ring_reduce_scatter",
    "ring_all_gather",
    "ring_all_reduce",
    "naive_all_reduce",
    "collectives_worker",
    "make_model",
    "batch_gradients",
    "accumulated_gradients",
    "train_steps",
    "shard",
    "ddp_worker",
    "BackwardClock",
    "timing_worker",
    "sequence_worker",
]


# --------------------------------------------------------------------------- arithmetic


def chunk_sizes(n: int, p: int) -> list[int]:
    """Sizes of the ``p`` chunks a ring cuts ``n`` elements into (``torch.tensor_split``'s rule).

    The first ``n mod p`` chunks get ``ceil(n / p)`` elements, the rest ``floor(n / p)``.
    """
    n = check_positive_int("n", n, minimum=0)
    p = check_positive_int("p", p)
    return [n // p + (1 if i < n % p else 0) for i in range(p)]


def ring_schedule(rank: int, p: int) -> list[tuple[str, int, int, int]]:
    """Rank ``rank``'s steps of a ring all-reduce on ``p`` ranks: ``(phase, step, send, recv)``.

    ``send`` and ``recv`` are chunk indices; the send goes to rank ``(rank + 1) mod p``, the
    receive comes from ``(rank - 1) mod p``. ``2 (p - 1)`` steps: ``p - 1`` of "reduce-scatter"
    (send chunk ``(r - s - 1) mod p``, receive and add chunk ``(r - s - 2) mod p``), then ``p - 1``
    of "all-gather" (send chunk ``(r - s) mod p``, receive chunk ``(r - s - 1) mod p``).
    """
    p = check_positive_int("p", p)
    if not 0 <= rank < p:
        raise ValueError(f"rank must be in [0, p={p}), got {rank}")
    steps = [("reduce-scatter", s, (rank - s - 1) % p, (rank - s - 2) % p) for s in range(p - 1)]
    steps += [("all-gather", s, (rank - s) % p, (rank - s - 1) % p) for s in range(p - 1)]
    return steps


def ring_allreduce_elements(n: int, p: int) -> list[int]:
    """Elements each rank sends in a ring all-reduce of ``n`` elements: a list by rank (exact).

    The sum, over :func:`ring_schedule`'s steps, of the size of the chunk sent. When ``p``
    divides ``n`` every rank sends :func:`ring_allreduce_formula` ``= 2 (p - 1) n / p``; otherwise
    ranks differ by at most ``2 (p - 1)`` elements (a chunk is at most one element larger).
    """
    sizes = chunk_sizes(n, p)
    return [sum(sizes[send] for _, _, send, _ in ring_schedule(r, p)) for r in range(p)]


def ring_allreduce_formula(n: float, p: int) -> float:
    """The textbook per-rank traffic of a ring all-reduce, $2\\,(p-1)\\,n/p$ elements."""
    p = check_positive_int("p", p)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return 2 * (p - 1) * n / p


def naive_allreduce_elements(n: int, p: int) -> list[int]:
    """Elements each rank sends when all ranks send to rank 0, which sums and sends the result back.

    Rank 0 sends ``(p - 1) n`` (the result to every other rank) and receives as much; every other
    rank sends ``n``. The busiest link carries ``(p - 1) n``: it grows with ``p``; the ring's
    does not.
    """
    n = check_positive_int("n", n, minimum=0)
    p = check_positive_int("p", p)
    return [(p - 1) * n] + [n] * (p - 1)


def allreduce_seconds(n_bytes: float, p: int, bandwidth_bytes_per_s: float,
                      latency_s: float = 0.0) -> float:
    """Alpha-beta model of a ring all-reduce: $2(p-1)\\,(\\alpha + \\frac{n}{p\\,B})$ seconds.

    ``2 (p - 1)`` steps, each paying the latency ``alpha`` and sending a chunk of ``n / p`` bytes
    at link bandwidth ``B``. The bandwidth term tends to ``2 n / B`` as ``p`` grows; the latency
    term grows linearly in ``p`` (why large clusters use trees or hierarchical rings for small
    messages).
    """
    p = check_positive_int("p", p)
    bandwidth = check_positive_number("bandwidth_bytes_per_s", bandwidth_bytes_per_s)
    if n_bytes < 0 or latency_s < 0:
        raise ValueError(f"n_bytes and latency_s must be >= 0, got {n_bytes}, {latency_s}")
    return 2 * (p - 1) * (latency_s + n_bytes / (p * bandwidth))


# ------------------------------------------------------------------- point-to-point collectives


@dataclass
class CommCounter:
    """Bytes and messages a rank sent and received through the from-scratch collectives."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0

    def add(self, sent: torch.Tensor, received: torch.Tensor) -> None:
        """Count one exchange: ``sent`` went out, ``received`` came in."""
        self.bytes_sent += sent.numel() * sent.element_size()
        self.bytes_received += received.numel() * received.element_size()
        self.messages += 1


def _world(group: Any = None) -> tuple[int, int]:
    if not dist.is_initialized():
        raise RuntimeError("no process group: run this inside a worker started by "
                           "utils.distributed.launch (or after dist.init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


def ring_exchange(send: torch.Tensor, recv: torch.Tensor, counter: CommCounter | None = None,
                  group: Any = None) -> None:
    """One ring step: send ``send`` to rank ``r + 1`` while receiving ``recv`` from rank ``r - 1``.

    Both are posted as one batch with ``dist.batch_isend_irecv``, whose documentation guarantees
    that the order of a send and a receive within a batch cannot deadlock (with two blocking calls,
    every rank could sit in its send waiting for a receive that nobody has posted). Waits for both
    and counts the bytes in ``counter``.
    """
    rank, p = _world(group)
    to, frm = (rank + 1) % p, (rank - 1) % p
    if group is not None:  # P2POp takes global ranks
        to, frm = dist.get_global_rank(group, to), dist.get_global_rank(group, frm)
    ops = [dist.P2POp(dist.isend, send.contiguous(), to, group),
           dist.P2POp(dist.irecv, recv, frm, group)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    if counter is not None:
        counter.add(send, recv)


def _chunks(tensor: torch.Tensor, p: int) -> list[torch.Tensor]:
    if not tensor.is_contiguous():
        raise ValueError("the ring works on a contiguous tensor in place; pass tensor.contiguous()")
    return list(tensor.view(-1).tensor_split(p))  # views: writing a chunk writes the tensor


def ring_reduce_scatter(tensor: torch.Tensor, counter: CommCounter | None = None,
                        group: Any = None) -> torch.Tensor:
    """Reduce-scatter by a ring of point-to-point messages; returns this rank's summed chunk.

    ``tensor`` (the same shape on every rank) is cut into ``p`` chunks (:func:`chunk_sizes`) and
    used as scratch space. After ``p - 1`` steps of :func:`ring_schedule`, rank ``r``'s chunk ``r``
    holds $\\sum_{q} x_q[\\text{chunk } r]$ -- what ``dist.reduce_scatter_single`` gives when
    ``p`` divides ``numel``. Returns a view of that chunk.
    """
    rank, p = _world(group)
    chunks = _chunks(tensor, p)
    for phase, _, send, recv in ring_schedule(rank, p):
        if phase != "reduce-scatter":
            break
        buffer = torch.empty_like(chunks[recv])
        ring_exchange(chunks[send], buffer, counter, group)
        chunks[recv].add_(buffer)
    return chunks[rank]


def ring_all_gather(tensor: torch.Tensor, counter: CommCounter | None = None,
                    group: Any = None) -> torch.Tensor:
    """All-gather by a ring: chunk ``r`` of ``tensor`` on rank ``r`` is copied to every rank.

    ``tensor`` has the full size on every rank; only chunk ``rank`` is read on each. ``p - 1``
    steps, each passing on the chunk received in the step before. Returns ``tensor``, filled.
    """
    rank, p = _world(group)
    chunks = _chunks(tensor, p)
    for phase, _, send, recv in ring_schedule(rank, p):
        if phase == "all-gather":
            ring_exchange(chunks[send], chunks[recv], counter, group)
    return tensor


def ring_all_reduce(tensor: torch.Tensor, counter: CommCounter | None = None,
                    group: Any = None) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place: reduce-scatter, then all-gather, by a ring.

    Each rank sends ``2 (p - 1)`` chunks, $2\\,\\frac{p-1}{p}\\,N$ elements in all.
    """
    ring_reduce_scatter(tensor, counter, group)
    return ring_all_gather(tensor, counter, group)


def naive_all_reduce(tensor: torch.Tensor, counter: CommCounter | None = None) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place, through rank 0 (the baseline the ring beats).

    Every other rank sends its tensor to rank 0, which adds them up and sends the sum back to each.
    """
    rank, p = _world()
    if rank == 0:
        for src in range(1, p):
            buffer = torch.empty_like(tensor)
            dist.recv(buffer, src)
            tensor.add_(buffer)
            if counter is not None:
                counter.bytes_received += buffer.numel() * buffer.element_size()
        for dst in range(1, p):
            dist.send(tensor, dst)
            if counter is not None:
                counter.bytes_sent += tensor.numel() * tensor.element_size()
                counter.messages += 1
    else:
        dist.send(tensor, 0)
        dist.recv(tensor, 0)
        if counter is not None:
            counter.add(tensor, tensor)
    return tensor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # CUDA work is asynchronous: wait for it before reading the clock
        torch.cuda.synchronize(device)


def _time_calls(fn: Callable[[], Any], repeats: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(repeats):
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def collectives_worker(rank: int, world_size: int, n: int = 10_007, seed: int = 0,
                       time_elements: int = 0, repeats: int = 5) -> dict[str, Any]:
    """Our ring collectives against torch.distributed's, on this rank; results for the parent.

    Each rank draws its own data (seed ``seed + rank``): integer-valued floats (sums exact in any
    order) and normal floats (sums that depend on the order of additions). Returns this rank's
    results of ``ring_all_reduce`` and ``dist.all_reduce`` on both, of ``ring_reduce_scatter`` and
    ``dist.reduce_scatter_single`` and of ``ring_all_gather`` and ``dist.all_gather_single`` (on
    ``world_size * ceil(n / world_size)`` elements so that the library's equal-chunk layout
    applies), the bytes each from-scratch collective sent, and, when ``time_elements > 0``,
    interleaved timings (seconds) of ``ring_all_reduce``, ``naive_all_reduce`` and
    ``dist.all_reduce`` on that many float32 elements.
    """
    device = rank_device(rank, dist.get_backend())
    g = torch.Generator().manual_seed(seed + rank)
    out: dict[str, Any] = {"rank": rank, "n": n}
    data = {"int": torch.randint(-1000, 1000, (n,), generator=g).float(),
            "normal": torch.randn(n, generator=g)}
    for kind, x in data.items():
        ours, ref, counter = x.clone().to(device), x.clone().to(device), CommCounter()
        ring_all_reduce(ours, counter)
        dist.all_reduce(ref)
        out[f"allreduce_{kind}"] = (ours.cpu(), ref.cpu())
        out[f"allreduce_{kind}_bytes"] = counter.bytes_sent
    m = -(-n // world_size) * world_size
    x = torch.randint(-1000, 1000, (m,), generator=g).float().to(device)
    counter, ref = CommCounter(), torch.empty(m // world_size, device=device)
    ours = ring_reduce_scatter(x.clone(), counter).clone()
    dist.reduce_scatter_single(ref, x.clone())
    out["reduce_scatter"] = (ours.cpu(), ref.cpu())
    out["reduce_scatter_bytes"] = counter.bytes_sent
    mine = torch.full((m // world_size,), float(rank + 1), device=device) * torch.arange(
        1, m // world_size + 1, device=device)
    full = torch.zeros(m, device=device)
    full.view(world_size, -1)[rank] = mine
    counter, ref = CommCounter(), torch.empty(m, device=device)
    ring_all_gather(full, counter)
    dist.all_gather_single(ref, mine)
    out["all_gather"] = (full.cpu(), ref.cpu())
    out["all_gather_bytes"] = counter.bytes_sent
    naive_counter = CommCounter()
    naive_all_reduce(data["int"].clone().to(device), naive_counter)
    out["naive_bytes"] = naive_counter.bytes_sent
    if time_elements:
        buf = torch.randn(time_elements, generator=g).to(device)
        ways = {"ring (ours)": lambda: ring_all_reduce(buf.clone()),
                "naive (ours)": lambda: naive_all_reduce(buf.clone()),
                "dist.all_reduce": lambda: dist.all_reduce(buf.clone())}
        times: dict[str, list[float]] = {name: [] for name in ways}
        for fn in ways.values():  # warm-up: connections, allocations
            fn()
        for _ in range(repeats):  # alternating rounds, so that load drift hits all three alike
            for name, fn in ways.items():
                times[name] += _time_calls(fn, 1, device)
        out["times"] = times
    return out


# ------------------------------------------------------------------- single-process references


def make_model(cfg: LlamaConfig, seed: int = 0) -> Llama:
    """A :class:`utils.llama.Llama` with weights drawn from ``seed`` (the same in every process)."""
    torch.manual_seed(seed)
    return Llama(cfg)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters()
            if p.grad is not None}


def batch_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of the mean loss on the whole batch ``(x, y)``, by parameter name (CPU copies)."""
    model.zero_grad(set_to_none=True)
    lm_loss(model, x, y).backward()
    return _grads(model)


def accumulated_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                          micro_batches: int) -> dict[str, torch.Tensor]:
    """Gradient accumulation: ``backward(loss_k / K)`` on ``K`` equal micro-batches, one step.

    With equal micro-batches the mean loss of the batch is the mean of the micro-batch means,
    $\\frac1B\\sum_i \\ell_i = \\frac1K\\sum_k \\frac{K}{B}\\sum_{i \\in k}\\ell_i$, so the
    accumulated gradient equals :func:`batch_gradients` up to float rounding.
    """
    k = check_positive_int("micro_batches", micro_batches)
    if len(x) % k:
        raise ValueError(f"the batch ({len(x)} rows) must split into {k} equal micro-batches: "
                         f"unequal ones would need weights by size, not 1/{k}")
    model.zero_grad(set_to_none=True)
    for xk, yk in zip(x.chunk(k), y.chunk(k)):
        (lm_loss(model, xk, yk) / k).backward()
    return _grads(model)


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
                lr: float = 1e-3) -> dict[str, torch.Tensor]:
    """``steps`` AdamW steps on the same batch; the parameters afterwards, by name (CPU copies)."""
    steps = check_positive_int("steps", steps)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        lm_loss(model, x, y).backward()
        opt.step()
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}


def shard(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s equal share of the batch (rows ``rank * B/p`` to ``(rank + 1) * B/p``)."""
    world_size = check_positive_int("world_size", world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if len(x) % world_size:
        raise ValueError(f"a batch of {len(x)} rows does not split into {world_size} equal shards; "
                         f"with unequal shards the mean of the ranks' means is not the batch mean")
    return x.chunk(world_size)[rank]


# --------------------------------------------------------------------------- DDP workers


def _ddp(model: nn.Module, rank: int, **kwargs: Any) -> nn.parallel.DistributedDataParallel:
    device = rank_device(rank, dist.get_backend())
    model = model.to(device)
    ids = [rank] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **kwargs)


def _ddp_grads(ddp: nn.Module) -> dict[str, torch.Tensor]:
    return {name.removeprefix("module."): g for name, g in _grads(ddp).items()}


def ddp_worker(rank: int, world_size: int, cfg: LlamaConfig, x: torch.Tensor, y: torch.Tensor,
               steps: int = 3, lr: float = 1e-3, micro_batches: int = 2, seed: int = 0,
               ) -> dict[str, Any]:
    """DDP and from-scratch data parallelism on this rank's shard of ``(x, y)``.

    Returns, by parameter name (CPU tensors):

    - ``ddp_grads``: DDP's gradients after one backward on the shard (DDP averages them over
      ranks, so they should equal one process's gradients on the full batch);
    - ``scratch_grads``: the same without DDP: backward on the shard, then
      ``all_reduce(grad) / world_size`` for every parameter;
    - ``ddp_params`` and ``scratch_params``: parameters after ``steps`` AdamW steps of each;
    - ``accum_grads``: DDP with gradient accumulation: the shard cut into ``micro_batches``,
      every micro-batch but the last under ``no_sync()`` (no communication), loss divided by
      ``micro_batches``;
    - ``bytes_scratch``: bytes our all-reduce of the gradients handed to ``dist.all_reduce``.
    """
    device = rank_device(rank, dist.get_backend())
    xs, ys = shard(x, rank, world_size).to(device), shard(y, rank, world_size).to(device)
    out: dict[str, Any] = {"rank": rank, "shard_rows": len(xs)}

    ddp = _ddp(make_model(cfg, seed), rank)
    ddp.zero_grad(set_to_none=True)
    lm_loss(ddp, xs, ys).backward()
    out["ddp_grads"] = _ddp_grads(ddp)

    scratch = make_model(cfg, seed).to(device)
    scratch.zero_grad(set_to_none=True)
    lm_loss(scratch, xs, ys).backward()
    nbytes = 0
    for p in scratch.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world_size
        nbytes += p.grad.numel() * p.grad.element_size()
    out["scratch_grads"] = _grads(scratch)
    out["bytes_scratch"] = nbytes

    ddp = _ddp(make_model(cfg, seed), rank)
    opt = torch.optim.AdamW(ddp.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        lm_loss(ddp, xs, ys).backward()
        opt.step()
    out["ddp_params"] = {n.removeprefix("module."): p.detach().cpu().clone()
                         for n, p in ddp.named_parameters()}

    scratch = make_model(cfg, seed).to(device)
    opt = torch.optim.AdamW(scratch.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        lm_loss(scratch, xs, ys).backward()
        for p in scratch.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world_size
        opt.step()
    out["scratch_params"] = {n: p.detach().cpu().clone() for n, p in scratch.named_parameters()}

    ddp = _ddp(make_model(cfg, seed), rank)
    ddp.zero_grad(set_to_none=True)
    if len(xs) % micro_batches:
        raise ValueError(f"each rank's shard ({len(xs)} rows) must split into {micro_batches} "
                         f"equal micro-batches")
    pieces = list(zip(xs.chunk(micro_batches), ys.chunk(micro_batches)))
    for k, (xk, yk) in enumerate(pieces):
        if k < len(pieces) - 1:
            with ddp.no_sync():  # gradients accumulate locally; no all-reduce
                (lm_loss(ddp, xk, yk) / micro_batches).backward()
        else:  # the last micro-batch's backward all-reduces the accumulated gradients
            (lm_loss(ddp, xk, yk) / micro_batches).backward()
    out["accum_grads"] = _ddp_grads(ddp)
    return out


class BackwardClock:
    """Hooks on a DDP model that put a clock on every backward: when each gradient is ready, when
    each bucket's all-reduce starts and finishes, and when ``backward()`` returns.

    ``BackwardClock(ddp)`` registers, once, a post-accumulate-grad hook on every parameter of
    ``ddp.module`` and a communication hook on ``ddp`` (DDP accepts one per instance, so make one
    clock per DDP). The all-reduce is DDP's own default (``default_hooks.allreduce_hook``: sum,
    divided by the world size); only the clock is added. Under ``no_sync()`` no bucket is
    all-reduced and only the gradients are timed. :meth:`step` runs one forward and backward and
    returns that step's events, in seconds from the start of backward: ``grad_ready`` (one per
    parameter), ``bucket_start`` (with the bucket's size, ``bucket_numel``), ``bucket_end``,
    ``backward_returned``. From them: ``last_grad`` (the last gradient, the compute of backward),
    ``exposed`` (``backward_returned - last_grad``: the communication nothing hid, plus DDP's
    bookkeeping) and ``early`` (all-reduces started before the last gradient). On a GPU these are
    host-side times (when work was queued, when the all-reduce's future completed).
    """

    def __init__(self, ddp: nn.parallel.DistributedDataParallel) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self.ddp = ddp
        self.events: dict[str, Any] = {}
        self._t0 = 0.0
        group = dist.group.WORLD

        def hook(state, bucket):  # no annotations: DDP checks them against its own classes
            self.events["bucket_start"].append(time.perf_counter() - self._t0)
            self.events["bucket_numel"].append(bucket.buffer().numel())
            fut = default_hooks.allreduce_hook(group, bucket)

            def done(f):
                self.events["bucket_end"].append(time.perf_counter() - self._t0)
                return f.value()

            return fut.then(done)

        def ready(p: torch.Tensor) -> None:
            self.events["grad_ready"].append(time.perf_counter() - self._t0)

        ddp.register_comm_hook(None, hook)
        self._handles = [p.register_post_accumulate_grad_hook(ready)
                         for p in ddp.module.parameters()]

    def step(self, xs: torch.Tensor, ys: torch.Tensor) -> dict[str, Any]:
        """Zero the gradients, run forward and backward on ``(xs, ys)``; this step's events."""
        self.ddp.zero_grad(set_to_none=True)
        self.events = {"grad_ready": [], "bucket_start": [], "bucket_end": [], "bucket_numel": []}
        loss = lm_loss(self.ddp, xs, ys)
        self._t0 = time.perf_counter()
        loss.backward()
        events = self.events
        events["backward_returned"] = time.perf_counter() - self._t0
        events["last_grad"] = max(events["grad_ready"])
        events["exposed"] = events["backward_returned"] - events["last_grad"]
        events["early"] = sum(s < events["last_grad"] for s in events["bucket_start"])
        return events


def timing_worker(rank: int, world_size: int, cfg: LlamaConfig, x: torch.Tensor, y: torch.Tensor,
                  bucket_caps_mb: tuple[float | None, ...] = (0.25, None, 1000.0), rounds: int = 7,
                  warmup: int = 2, seed: int = 0) -> dict[str, Any]:
    """Time forward+backward steps of the same model under several gradient-sync settings.

    Settings, timed in alternating rounds (one step of each per round, ``barrier`` before each):

    - ``"no communication"``: DDP under ``no_sync()`` -- the compute alone;
    - one DDP per entry of ``bucket_caps_mb``, keyed by the cap (``None``: DDP's default, 25 MB
      buckets after a first bucket of 1 MB; a cap larger than all gradients: one bucket, whose
      all-reduce can only start when backward has finished -- no overlap).

    Every setting carries a :class:`BackwardClock` (the same hooks for all, so the same small
    overhead), so every timed step also records its backward's events. Returns, by setting and
    one entry per round (this rank's clock): ``times`` (seconds of forward and backward),
    ``last_grad`` (seconds from the start of backward to the last gradient), ``exposed``
    (seconds from the last gradient to the return of ``backward()``) and ``early`` (bucket
    all-reduces started before the last gradient); ``timelines``, each setting's events in the
    last round (:meth:`BackwardClock.step`); and ``grad_bytes``.
    """
    device = rank_device(rank, dist.get_backend())
    xs, ys = shard(x, rank, world_size).to(device), shard(y, rank, world_size).to(device)
    base = make_model(cfg, seed).to(device)
    grad_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    nosync = BackwardClock(_ddp(copy.deepcopy(base), rank))

    def no_comm() -> dict[str, Any]:
        with nosync.ddp.no_sync():
            return nosync.step(xs, ys)

    settings: dict[Any, Callable[[], dict[str, Any]]] = {"no communication": no_comm}
    for cap in bucket_caps_mb:
        clock = BackwardClock(_ddp(copy.deepcopy(base), rank, bucket_cap_mb=cap))
        settings[cap] = lambda clock=clock: clock.step(xs, ys)
    for fn in settings.values():
        for _ in range(warmup):  # DDP rebuilds its buckets in gradient-ready order after step 1
            _time_calls(fn, 1, device)
    out: dict[str, Any] = {"rank": rank, "grad_bytes": grad_bytes, "timelines": {}}
    for key in ["times", "last_grad", "exposed", "early"]:
        out[key] = {name: [] for name in settings}
    for _ in range(rounds):
        for name, fn in settings.items():
            events: list[dict[str, Any]] = []
            out["times"][name] += _time_calls(lambda fn=fn: events.append(fn()), 1, device)
            for key in ["last_grad", "exposed", "early"]:
                out[key][name].append(events[0][key])
            out["timelines"][name] = events[0]
    return out


def sequence_worker(rank: int, world_size: int,
                    jobs: list[tuple[Callable[..., Any], tuple]]) -> list[Any]:
    """Run several workers one after the other in one launch: ``[fn(rank, world_size, *args)]``.

    Each launch pays seconds of process start-up; a chapter that runs several experiments on the
    same number of ranks runs them in one launch with this.
    """
    return [fn(rank, world_size, *args) for fn, args in jobs]
