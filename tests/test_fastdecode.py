import pytest
import torch
from torch import nn

from utils.fastdecode import (COMPUTE_DTYPES, INT4_GROUP_SIZES, Int4WeightOnlyLinear,
                              Int8WeightOnlyLinear, bytes_per_weight, dequantize_int4, dequantize_int8, kernel_support, quantize_int4,
                              quantize_int8, quantize_model, reference_linear, weight_bytes)
from utils.kvcache import generate
from utils.llama import Llama, LlamaConfig, kv_cache_bytes_per_token
from utils.roofline import decode_bound_tokens_per_s, forward_bytes, weight_bytes_per_forward

# widths the kernels accept: in_features a multiple of 32 (int4 groups, int8 bf16), out a multiple of 16
CFG = LlamaConfig(vocab_size=112, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                  rope_theta=10_000.0)


def weight(rows: int = 48, cols: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def inputs(n: int = 5, cols: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, cols, generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def tiny_llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(CFG).eval()


def test_this_torch_has_the_kernels():
    assert kernel_support() == {"_weight_int8pack_mm": True,
                                "_convert_weight_to_int4pack_for_cpu": True,
                                "_weight_int4pack_mm_for_cpu": True}


@pytest.mark.parametrize("dtype", COMPUTE_DTYPES)
def test_int8_codes_are_within_half_a_step(dtype):
    w = weight()
    codes, scale = quantize_int8(w, dtype)
    assert codes.dtype == torch.int8 and scale.dtype == dtype and scale.shape == (48,)
    assert int(codes.abs().max()) <= 127
    err = (dequantize_int8(codes, scale) - w).abs()
    assert (err <= scale.float()[:, None] * 0.51).all()


@pytest.mark.parametrize("dtype", COMPUTE_DTYPES)
def test_int4_codes_are_within_half_a_step_of_the_group_range(dtype):
    w = weight(cols=128)
    codes, scale, zero = quantize_int4(w, 32, dtype)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape and int(codes.max()) <= 15
    assert scale.shape == zero.shape == (48, 4) and scale.dtype == zero.dtype == dtype
    err = (dequantize_int4(codes, scale, zero) - w).abs().reshape(48, 4, 32)
    # half a step, plus the rounding of scale and zero to the kernel's dtype (bfloat16: 2^-8)
    slack = 0.5 + (0.05 if dtype == torch.bfloat16 else 1e-4)
    assert (err <= scale.float()[..., None] * slack).all()


def test_int4_reproduces_a_weight_already_on_a_q4_1_grid():
    # Q4_1: w = d * q + m per block of 32, q in 0..15 and every block uses codes 0 and 15
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (32, 4, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    d = torch.rand(32, 4, 1, generator=g) * 0.01 + 1e-3
    m = -torch.rand(32, 4, 1, generator=g) * 0.1
    w = (d * q + m).reshape(32, 128)
    exact = dequantize_int4(*quantize_int4(w, 32, torch.float32))
    assert rel(exact, w) < 1e-6  # float32 scales: the grid is recovered
    rounded = dequantize_int4(*quantize_int4(w, 32, torch.bfloat16))
    assert 0 < rel(rounded, w) < 0.01  # bfloat16 scales move the grid slightly


def test_int8_kernel_equals_the_reference():
    w, x = weight(), inputs()
    linear = nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    exact = Int8WeightOnlyLinear.from_linear(linear, torch.float32)
    ref = reference_linear(x, exact.dequantized_weight())
    assert torch.allclose(exact(x), ref, rtol=1e-5, atol=1e-5)
    fast = Int8WeightOnlyLinear.from_linear(linear)  # bfloat16 activations: rounding of x only
    assert rel(fast(x), reference_linear(x, fast.dequantized_weight())) < 1e-2
    assert rel(fast(x), linear(x).detach()) < 2e-2
    assert fast(x.reshape(5, 1, 64)).shape == (5, 1, 48) and fast(x).dtype == torch.float32
    assert fast.nbytes == 48 * 64 + 48 * 2 and "bfloat16" in repr(fast)


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_kernel_equals_the_reference(group_size):
    w, x = weight(cols=128), inputs(cols=128)
    codes, scale, zero = quantize_int4(w, group_size, torch.float32)
    ref = reference_linear(x, dequantize_int4(codes, scale, zero))
    exact = Int4WeightOnlyLinear(codes, scale, zero, group_size, torch.float32)
    assert torch.allclose(exact(x), ref, rtol=1e-5, atol=1e-5)
    linear = nn.Linear(128, 48, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    fast = Int4WeightOnlyLinear.from_linear(linear, group_size)
    fast_ref = reference_linear(x, dequantize_int4(*quantize_int4(w, group_size)))
    assert rel(fast(x), fast_ref) < 1e-2
    assert fast.nbytes == 48 * 64 + (128 // group_size) * 48 * 2 * 2
    assert f"group_size={group_size}" in repr(fast)


def test_bad_input_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="must divide in_features"):
        quantize_int4(weight(cols=96), 64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_int4(weight(), 16)
    with pytest.raises(ValueError, match="2-D weight"):
        quantize_int8(torch.ones(4))
    with pytest.raises(ValueError, match="floating-point"):
        quantize_int8(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN"):
        quantize_int8(torch.full((4, 4), float("nan")))
    with pytest.raises(ValueError, match="compute_dtype"):
        quantize_int8(weight(), torch.float16)
    with pytest.raises(ValueError, match="divisible by 16"):
        Int8WeightOnlyLinear(*quantize_int8(weight(cols=40)))
    with pytest.raises(ValueError, match="divisible by 16"):
        Int4WeightOnlyLinear(*quantize_int4(weight(rows=40), 32))
    with pytest.raises(ValueError, match="int8"):
        Int8WeightOnlyLinear(torch.zeros(4, 16), torch.ones(4))
    with pytest.raises(ValueError, match="scale must have shape"):
        Int8WeightOnlyLinear(torch.zeros(4, 16, dtype=torch.int8), torch.ones(3))
    codes, scale, zero = quantize_int4(weight(), 32)
    with pytest.raises(ValueError, match="0..15"):
        Int4WeightOnlyLinear(codes * 0 + 16, scale, zero)
    with pytest.raises(ValueError, match="scale and zero must have shape"):
        Int4WeightOnlyLinear(codes, scale[:, :1], zero)
    with pytest.raises(ValueError, match="2-D uint8"):
        Int4WeightOnlyLinear(codes.float(), scale, zero)
    with pytest.raises(ValueError, match="without bias"):
        Int8WeightOnlyLinear.from_linear(nn.Linear(16, 16))
    with pytest.raises(ValueError, match="without bias"):
        Int4WeightOnlyLinear.from_linear(nn.Linear(32, 16))
    with pytest.raises(ValueError, match="in_features=64"):
        Int8WeightOnlyLinear(*quantize_int8(weight()))(torch.ones(2, 32))
    model = tiny_llama()
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize_model(model, bits=3)
    with pytest.raises(ValueError, match="head_bits"):
        quantize_model(model, bits=8, head_bits=2)
    with pytest.raises(ValueError, match="utils.llama.Llama"):
        quantize_model(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="from_hf"):
        bytes_per_weight(nn.Linear(4, 4))


def test_missing_kernels_are_named(monkeypatch):
    import utils.fastdecode as fd

    monkeypatch.setattr(fd, "kernel_support", lambda: {"_weight_int8pack_mm": False})
    with pytest.raises(RuntimeError, match="lacks"):
        Int8WeightOnlyLinear(*quantize_int8(weight()))


def test_quantize_model_swaps_every_linear_and_shares_the_rest():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q8, q4 = quantize_model(model, 8), quantize_model(model, 4, group_size=32, head_bits=8)
    for q, kind in ((q8, Int8WeightOnlyLinear), (q4, Int4WeightOnlyLinear)):
        assert not any(isinstance(m, nn.Linear) for m in q.modules())
        assert isinstance(q.layers[0].mlp.w_down, kind)
        assert q.tok_emb.weight is model.tok_emb.weight  # shared, not copied
    assert isinstance(q4.lm_head, Int8WeightOnlyLinear)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # unchanged
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.tok_emb.weight


def test_bytes_per_weight_feeds_the_roofline_for_float32_and_quantized_models():
    model = tiny_llama()
    assert bytes_per_weight(model) == 4.0  # float32: the roofline's own count, to the byte
    assert weight_bytes(model) == weight_bytes_per_forward(CFG, 4)
    q8, q4 = quantize_model(model, 8), quantize_model(model, 4)
    assert weight_bytes(q4) < weight_bytes(q8) < weight_bytes(model) / 3
    kv = 8 * kv_cache_bytes_per_token(CFG, 4)
    for q in (q8, q4):
        b = bytes_per_weight(q)
        per_token = forward_bytes(CFG, 1, past=7, bytes_per_param=b, kv_bytes_per_value=4)
        assert per_token == pytest.approx(weight_bytes(q) + kv, rel=1e-12)
        bound = decode_bound_tokens_per_s(CFG, b, 1e10, context=7, kv_bytes_per_value=4)
        assert bound == pytest.approx(1e10 / (weight_bytes(q) + kv), rel=1e-12)
    assert 0.5 < bytes_per_weight(q4) < 1 < bytes_per_weight(q8) < 1.1


def test_int8_greedy_tokens_match_the_dequantized_reference_model():
    model = tiny_llama()
    prompt = torch.tensor([[3, 17, 42, 5]])
    exact = quantize_model(model, 8, compute_dtype=torch.float32)
    # the reference: the same model with each matrix replaced by its dequantized float32 weight
    reference = quantize_model(model, 8, compute_dtype=torch.float32)
    for name, mod in list(reference.named_modules()):
        if isinstance(mod, Int8WeightOnlyLinear):
            linear = nn.Linear(mod.in_features, mod.out_features, bias=False)
            linear.weight = nn.Parameter(mod.dequantized_weight())
            parent, _, attr = name.rpartition(".")
            setattr(reference.get_submodule(parent) if parent else reference, attr, linear)
    assert torch.equal(generate(exact, prompt, 12), generate(reference, prompt, 12))
    with torch.no_grad():
        logits, ref_logits = quantize_model(model, 8)(prompt), model(prompt)
    assert rel(logits, ref_logits) < 0.05


def test_greedy_tokens_of_the_fast_paths_against_float32_are_measured():
    model = tiny_llama()
    prompt = torch.tensor([[3, 17, 42, 5]])
    base = generate(model, prompt, 16)[0, 4:]
    for q in (quantize_model(model, 8), quantize_model(model, 4)):
        out = generate(q, prompt, 16)[0, 4:]
        assert out.shape == base.shape
        assert out[0] == base[0]  # the first token (one forward pass over the prompt) agrees
    assert INT4_GROUP_SIZES == (32, 64, 128, 256)
