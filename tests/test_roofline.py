import pytest
import torch

from utils.llama import Llama, LlamaConfig, forward_flops_per_token, kv_cache_bytes_per_token
from utils.measure import count_parameters
from utils.roofline import (
    arithmetic_intensity,
    attainable_flops,
    decode_bound_tokens_per_s,
    forward_bytes,
    forward_flops,
    forward_time_bound_s,
    matmul_flops,
    memory_bandwidth,
    prefill_bound_tokens_per_s,
    weight_bytes_per_forward,
)

TINY = dict(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=80, rope_theta=10_000.0)
CFG = LlamaConfig(**TINY)


def test_microbenchmarks_return_positive_rates():
    assert memory_bandwidth(n_bytes=1 << 20, repeats=2, warmup=0) > 0
    assert matmul_flops(n=32, repeats=2, warmup=0) > 0
    assert matmul_flops(n=16, repeats=1, dtype=torch.bfloat16) > 0


def test_weight_bytes_are_every_parameter_once_when_tied():
    model = Llama(CFG)  # tied: the embedding matrix is the output head, counted once
    assert weight_bytes_per_forward(CFG, 4) == count_parameters(model) * 4
    untied = LlamaConfig(**TINY, tie_embeddings=False)  # the input embedding is looked up, not read
    assert weight_bytes_per_forward(untied, 2) == (count_parameters(Llama(untied)) - 97 * 48) * 2


def test_forward_flops_is_the_sum_over_tokens():
    for n, past in [(1, 0), (5, 0), (3, 7)]:
        expected = sum(forward_flops_per_token(CFG, past + i) for i in range(1, n + 1))
        assert forward_flops(CFG, n, past) == expected


def test_bytes_intensity_and_bounds_follow_the_formulas():
    weights = weight_bytes_per_forward(CFG, 4)
    assert forward_bytes(CFG, 3, past=5) == weights + 8 * kv_cache_bytes_per_token(CFG, 4)
    assert forward_bytes(CFG, 1, kv_bytes_per_value=1) == weights + kv_cache_bytes_per_token(CFG, 1)
    assert arithmetic_intensity(CFG, 4, past=2) == forward_flops(CFG, 4, 2) / forward_bytes(CFG, 4, 2)
    assert arithmetic_intensity(CFG, 64) > arithmetic_intensity(CFG, 1)  # weights reused across tokens
    assert attainable_flops(0.5, 1e9, 1e9) == 0.5e9  # memory-bound side of the roof
    assert attainable_flops(10.0, 1e9, 1e9) == 1e9  # compute-bound side
    bw, peak = 1e10, 1e11
    assert decode_bound_tokens_per_s(CFG, 4, bw) == bw / forward_bytes(CFG, 1)
    assert decode_bound_tokens_per_s(CFG, 4, bw, context=100) < decode_bound_tokens_per_s(CFG, 4, bw)
    assert prefill_bound_tokens_per_s(CFG, 16, peak) == 16 * peak / forward_flops(CFG, 16)
    t = forward_time_bound_s(CFG, 16, peak, bw, past=4, bytes_per_param=2)
    assert t == max(forward_flops(CFG, 16, 4) / peak, forward_bytes(CFG, 16, 4, 2) / bw)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="n_bytes"):
        memory_bandwidth(n_bytes=2)
    with pytest.raises(ValueError, match="n must"):
        matmul_flops(n=0)
    with pytest.raises(ValueError, match="bytes_per_param"):
        weight_bytes_per_forward(CFG, 0)
    with pytest.raises(ValueError, match="n_tokens"):
        forward_flops(CFG, 0)
    with pytest.raises(ValueError, match="past"):
        forward_bytes(CFG, 1, past=-1)
    with pytest.raises(ValueError, match="n_tokens"):
        forward_bytes(CFG, 1.5)
    with pytest.raises(ValueError, match="bandwidth"):
        attainable_flops(1.0, 1e9, -1.0)
    with pytest.raises(ValueError, match="intensity"):
        attainable_flops(True, 1e9, 1e9)
    with pytest.raises(ValueError, match="peak_flops"):
        forward_time_bound_s(CFG, 1, 0, 1e9)
    with pytest.raises(ValueError, match="bandwidth"):
        forward_time_bound_s(CFG, 1, 1e9, "fast")
    with pytest.raises(ValueError, match="bandwidth"):
        decode_bound_tokens_per_s(CFG, 4, 0)
    with pytest.raises(ValueError, match="peak_flops"):
        prefill_bound_tokens_per_s(CFG, 4, -3.0)
