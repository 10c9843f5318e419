"""Fixtures shared by the unit tests (the repository's root conftest.py holds the nbval hooks)."""
from __future__ import annotations

from datetime import timedelta

import pytest
import torch.distributed as dist

from utils.distributed import free_port


@pytest.fixture(scope="module")
def one_rank_group():
    """A gloo group of one process (this one), on loopback: collectives run and return their input,
    so the worker code that otherwise runs only in spawned processes runs here, under coverage.
    A group that is already open is reused and left open."""
    opened = not dist.is_initialized()
    if opened:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1, timeout=timedelta(seconds=60))
    try:
        yield
    finally:
        if opened:
            dist.destroy_process_group()
