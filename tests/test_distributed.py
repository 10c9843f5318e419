"""utils.distributed: the launcher runs real gloo process groups on the loopback interface."""
from __future__ import annotations

import os
import signal
import socket
import time

import pytest
import torch
import torch.distributed as dist

from utils.distributed import (HOST, PortInUseError, WorkerError, default_backend, free_port,
                               launch, rank_device)
from utils.measure import process_peak_rss_bytes


def sum_of_ranks(rank: int, world_size: int, scale: float) -> dict:
    t = torch.tensor([float(rank + 1)]) * scale
    dist.all_reduce(t)
    return {"rank": rank, "sum": t, "world": dist.get_world_size()}


def raise_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ArithmeticError("planted failure")
    return rank


def always_raises(rank: int, world_size: int) -> None:
    raise ArithmeticError("planted failure")


def die_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # rank 0 would wait here for ever without the launcher's clean-up
    return rank


def wait_forever(rank: int, world_size: int) -> None:
    if rank == 0:
        dist.barrier()  # rank 1 never joins
    else:
        time.sleep(120)


def test_launch_returns_results_by_rank():
    before = process_peak_rss_bytes(include_workers=True) - process_peak_rss_bytes()
    out = launch(sum_of_ranks, 2, 2.0, timeout_s=120)
    workers = process_peak_rss_bytes(include_workers=True) - process_peak_rss_bytes()
    assert workers >= before and workers > 2 * 10 * 2**20  # two processes, each with torch loaded
    assert [o["rank"] for o in out] == [0, 1]
    assert all(o["world"] == 2 and torch.equal(o["sum"], torch.tensor([6.0])) for o in out)


def test_worker_exception_names_rank():
    with pytest.raises(WorkerError, match="rank 1 of 2 raised: ArithmeticError") as info:
        launch(raise_on_rank_one, 2, timeout_s=120)
    assert info.value.rank == 1 and "planted failure" in info.value.details


def test_dead_worker_is_reported_and_others_stopped():
    with pytest.raises(WorkerError, match="rank 1 of 2 died \\(killed by signal 9\\)") as info:
        launch(die_on_rank_one, 2, timeout_s=120)
    assert info.value.exitcode == -signal.SIGKILL


def test_timeout_is_reported():
    with pytest.raises(WorkerError, match="had not finished after 8 s"):
        launch(wait_forever, 2, timeout_s=8)


def test_port_in_use_is_a_clear_error():
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        with pytest.raises(PortInUseError, match="taken.*port=None"):
            launch(sum_of_ranks, 2, 1.0, port=s.getsockname()[1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        launch(sum_of_ranks, 0)
    with pytest.raises(ValueError, match="backend"):
        launch(sum_of_ranks, 1, 1.0, backend="mpi")
    with pytest.raises(ValueError, match="importable module"):
        launch(lambda rank, world: rank, 1)

    def local(rank, world):
        return rank

    local.__module__ = "__main__"
    with pytest.raises(ValueError, match="importable module"):
        launch(local, 1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="nccl.*gloo"):
            launch(sum_of_ranks, 2, 1.0, backend="nccl")


def test_small_helpers():
    assert isinstance(free_port(), int)
    assert default_backend(1) in ("gloo", "nccl")
    assert rank_device(3, "gloo") == torch.device("cpu")
    assert rank_device(1, "nccl") == torch.device("cuda:1")


def test_entry_in_this_process(monkeypatch):
    # What every spawned rank runs, here with a group of one so that coverage sees it. _entry sets
    # RANK, WORLD_SIZE, MASTER_* as torchrun would; in this process they must not outlive the test,
    # or a later library that reads them (accelerate, under TRL) waits for a group that is gone.
    import queue

    from utils.distributed import _entry  # noqa: PLC2701 (testing the module's own internals)

    monkeypatch.setattr(os, "environ", dict(os.environ))  # the original comes back after the test
    results = queue.Queue()
    _entry(0, 1, free_port(), "gloo", 1, 30.0, sum_of_ranks, (3.0,), results)
    _entry(0, 1, free_port(), "gloo", 1, 30.0, raise_on_rank_one, (), results)  # rank 0: fine
    _entry(0, 1, free_port(), "gloo", 1, 30.0, always_raises, (), results)
    rank, status, payload, peak = results.get_nowait()
    assert (rank, status) == (0, "ok") and isinstance(payload, bytes) and peak > 10 * 2**20
    assert results.get_nowait()[1] == "ok" and not dist.is_initialized()
    rank, status, details, _ = results.get_nowait()
    assert status == "error" and "planted failure" in details and not dist.is_initialized()
