import random

import numpy as np
import pytest
import torch

from utils.repro import get_device, seed_everything


def test_seed_everything_makes_all_generators_repeat():
    seed_everything(123)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(123)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True])
def test_seed_must_be_a_non_negative_int(bad):
    with pytest.raises(ValueError, match="non-negative int"):
        seed_everything(bad)


def test_default_device_is_cuda_only_when_present():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert get_device().type == expected
    assert get_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "tpu:0", "cuda:x"])
def test_unknown_device_string_names_the_choices(bad):
    with pytest.raises(ValueError, match="cpu, cuda, mps"):
        get_device(bad)


def test_unsupported_device_type():
    with pytest.raises(ValueError, match="Unsupported device"):
        get_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="machine has CUDA")
def test_cuda_requested_without_gpu_says_what_to_do():
    with pytest.raises(RuntimeError, match="device='cpu'"):
        get_device("cuda")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="machine has MPS")
def test_mps_requested_without_mps():
    with pytest.raises(RuntimeError, match="MPS is not available"):
        get_device("mps")
