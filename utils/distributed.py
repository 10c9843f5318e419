"""Run a function on several processes joined by ``torch.distributed``, from a notebook.

Part 8 runs real ``torch.distributed`` code (DDP, FSDP2, DTensor, pipelining, checkpoints) on one
machine: ``world_size`` processes on the loopback interface, each holding a *rank* ``0 ..
world_size - 1``. On a CPU the backend is ``gloo``; on a machine with at least ``world_size`` CUDA GPUs
it is ``nccl`` and rank ``r`` computes on ``cuda:r``. The worker code is the same in both cases.

``launch(worker, world_size, *args)`` is the notebook's ``torchrun``:

1. it picks a free TCP port on ``127.0.0.1`` (or checks the one you pass),
2. starts ``world_size`` fresh Python processes (the ``spawn`` start method: no copied CUDA or
   thread state), each of which calls ``dist.init_process_group`` and then
   ``worker(rank, world_size, *args)``,
3. returns the workers' return values as a list indexed by rank, and
4. always cleans up: a worker that raises, dies (killed, out of memory) or outlives ``timeout_s``
   ends the whole group, and the error names the rank and says what happened.

``worker`` must be importable by name (defined in a module such as ``utils.ddp``, not in a notebook
cell): ``spawn`` starts new interpreters that import it. Return values travel back through
``torch.save``, so tensors, dicts and numbers are all fine; return CPU tensors.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue as queue_lib
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from utils.checks import check_positive_int, check_positive_number
from utils.measure import note_worker_peak, process_peak_rss_bytes

__all__ = ["WorkerError", "PortInUseError", "free_port", "default_backend", "rank_device", "launch"]

HOST = "127.0.0.1"


class WorkerError(RuntimeError):
    """A worker raised, died or timed out. ``rank`` says which; ``exitcode`` is the process's exit code
    (negative: killed by that signal; ``None``: it raised or was still running); ``details`` holds
    the worker's traceback when it raised."""

    def __init__(self, message: str, rank: int, exitcode: int | None = None, details: str = "") -> None:
        super().__init__(message)
        self.rank, self.exitcode, self.details = rank, exitcode, details


class PortInUseError(OSError):
    """The TCP port asked for is taken on the loopback interface."""


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` now (the operating system picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _check_port(port: int, host: str = HOST) -> int:
    port = check_positive_int("port", port)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise PortInUseError(
                f"port {port} on {host} is taken (another job, or workers of an earlier run that "
                f"are still alive); pass port=None to let launch pick a free port, or find the "
                f"owner with `lsof -i :{port}`") from err
    return port


def default_backend(world_size: int) -> str:
    """``"nccl"`` when there are at least ``world_size`` CUDA GPUs, else ``"gloo"`` (CPU)."""
    world_size = check_positive_int("world_size", world_size)
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def rank_device(rank: int, backend: str) -> torch.device:
    """The device rank ``rank`` computes on: ``cuda:rank`` under nccl, the CPU under gloo."""
    return torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")


def _to_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _entry(rank: int, world_size: int, port: int, backend: str, threads: int, timeout_s: float,
           worker: Callable[..., Any], args: tuple, results: Any) -> None:
    """What each spawned process runs: join the group, call the worker, report back, leave."""
    os.environ.update(MASTER_ADDR=HOST, MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    if backend == "gloo" and sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only, never the network
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    try:
        dist.init_process_group(backend, init_method=f"tcp://{HOST}:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
        value = worker(rank, world_size, *args)
        results.put((rank, "ok", _to_bytes(value), process_peak_rss_bytes()))
    except BaseException:  # report everything, KeyboardInterrupt included
        results.put((rank, "error", traceback.format_exc(), process_peak_rss_bytes()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(processes: list) -> None:
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _raise_if_dead(processes: list, finished: dict) -> None:
    for rank, p in enumerate(processes):
        if rank not in finished and not p.is_alive() and p.exitcode not in (0, None):
            how = f"killed by signal {-p.exitcode}" if p.exitcode < 0 else f"exit code {p.exitcode}"
            raise WorkerError(f"rank {rank} of {len(processes)} died ({how}) before it returned; "
                              f"the other ranks were stopped", rank, p.exitcode)


def launch(worker: Callable[..., Any], world_size: int, *args: Any, backend: str | None = None,
           port: int | None = None, timeout_s: float = 300.0, threads_per_rank: int = 1) -> list:
    """Run ``worker(rank, world_size, *args)`` on ``world_size`` processes; their results by rank.

    ``backend`` defaults to :func:`default_backend`. ``timeout_s`` bounds the whole run (and each
    collective). ``threads_per_rank`` sets ``torch.set_num_threads`` in every worker: on a 2-core
    CPU, two ranks with one thread each use the machine without oversubscribing it.

    Raises :class:`WorkerError` (naming the rank) when a worker raises, dies or times out; the other
    workers are stopped first, so no process outlives the call. Raises :class:`PortInUseError` when
    ``port`` is given and taken.
    """
    world_size = check_positive_int("world_size", world_size)
    threads = check_positive_int("threads_per_rank", threads_per_rank)
    timeout_s = check_positive_number("timeout_s", timeout_s)
    if (not callable(worker) or getattr(worker, "__module__", "__main__") == "__main__"
            or "<" in getattr(worker, "__qualname__", "<")):
        raise ValueError(
            "worker must be a function defined in an importable module (e.g. utils.ddp), not in a "
            "notebook cell or script: the spawned processes import it by name")
    backend = backend or default_backend(world_size)
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (CUDA GPUs), got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend 'nccl' needs {world_size} CUDA GPUs, this machine has "
                         f"{torch.cuda.device_count()}; use backend='gloo' to run on the CPU")
    port = free_port() if port is None else _check_port(port)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    processes = [ctx.Process(target=_entry, daemon=True,
                             args=(rank, world_size, port, backend, threads, timeout_s, worker,
                                   args, results))
                 for rank in range(world_size)]
    values: dict[int, Any] = {}
    peaks: dict[int, int] = {}
    deadline = time.monotonic() + timeout_s
    try:
        for p in processes:
            p.start()
        while len(values) < world_size:
            try:
                rank, status, payload, peak = results.get(timeout=0.2)
            except queue_lib.Empty:
                _raise_if_dead(processes, values)
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(values))
                    raise WorkerError(f"ranks {missing} had not finished after {timeout_s:g} s "
                                      f"(a collective that some rank never joined?); raise "
                                      f"timeout_s if the work is just slow", missing[0])
                continue
            if status == "error":
                # A peer's death shows up on the others as "connection closed": blame the dead one.
                time.sleep(1.0)
                _raise_if_dead(processes, values)
                last = payload.strip().splitlines()[-1]
                raise WorkerError(f"rank {rank} of {world_size} raised: {last}\n\n{payload}", rank,
                                  None, payload)
            values[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            peaks[rank] = peak
        for p in processes:
            p.join(timeout=30)
        note_worker_peak(sum(peaks.values()))  # for the chapter's resource card (ChapterClock)
    finally:
        _stop(processes)
        results.close()
    return [values[rank] for rank in range(world_size)]
