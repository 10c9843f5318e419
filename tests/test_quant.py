import pytest
import torch

from utils.quant import (absmax_dequantize, absmax_quantize, bits_per_parameter, dequantize_blockwise,
                         double_dequantize, double_quantize, fake_quantize, nf4_levels, pack_nibbles,
                         quantize_blockwise, unpack_nibbles, zeropoint_dequantize, zeropoint_quantize)

# The NF4 code book as published in bitsandbytes (functional.py, create_normal_map) and the QLoRA paper.
BITSANDBYTES_NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


def weights(rows: int = 16, cols: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_absmax_round_trip_error_is_at_most_half_a_step():
    w = weights()
    q, scale = absmax_quantize(w, bits=8)
    assert q.dtype == torch.int8 and scale.shape == ()
    assert int(q.abs().max()) == 127
    assert (absmax_dequantize(q, scale) - w).abs().max() <= scale / 2 + 1e-7
    q_rows, s_rows = absmax_quantize(w, bits=4, dim=1)
    assert s_rows.shape == (16, 1) and int(q_rows.abs().max()) == 7
    assert (absmax_dequantize(q_rows, s_rows) - w).abs().max() <= s_rows.max() / 2 + 1e-7


def test_zeropoint_uses_the_full_range_and_keeps_zero_exact():
    x = torch.relu(weights())  # all >= 0: absmax would waste the negative half
    q, scale, zero = zeropoint_quantize(x, bits=8)
    assert q.dtype == torch.uint8 and int(q.min()) == 0 and int(q.max()) == 255
    assert zeropoint_dequantize(zero.to(torch.uint8), scale, zero) == 0
    err_zp = (zeropoint_dequantize(q, scale, zero) - x).abs().max()
    err_abs = (absmax_dequantize(*absmax_quantize(x, 8)) - x).abs().max()
    assert err_zp < err_abs
    q_rows, s_rows, z_rows = zeropoint_quantize(weights(), bits=8, dim=1)
    assert s_rows.shape == z_rows.shape == (16, 1)
    assert (zeropoint_dequantize(q_rows, s_rows, z_rows) - weights()).abs().max() <= s_rows.max() / 2 + 1e-6


def test_finer_granularity_never_hurts_with_an_outlier():
    w = weights()
    w[3, 5] = 2.0  # one outlier, as in LLM weights
    errors = {g: (fake_quantize(w, 4, "absmax", g, group_size=32) - w).pow(2).mean().item()
              for g in ("tensor", "channel", "group")}
    assert errors["group"] < errors["channel"] < errors["tensor"]
    assert fake_quantize(w, 8, "zeropoint", "channel").shape == w.shape
    assert fake_quantize(w.half(), 8).dtype == torch.float16


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=1), "bits"), (dict(bits=9), "bits"), (dict(scheme="nf4"), "unknown scheme"),
    (dict(granularity="row"), "unknown granularity"), (dict(granularity="group", group_size=48), "divide"),
    (dict(granularity="group", group_size=0), "positive int"),
])
def test_fake_quantize_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fake_quantize(weights(), **kwargs)


def test_fake_quantize_needs_a_matrix():
    with pytest.raises(ValueError, match="2-D"):
        fake_quantize(torch.randn(8))


def test_nf4_levels_equal_bitsandbytes_code_book():
    levels = nf4_levels()
    torch.testing.assert_close(levels, BITSANDBYTES_NF4, rtol=0, atol=1e-6)
    assert levels[7] == 0 and levels[0] == -1 and levels[-1] == 1
    with pytest.raises(ValueError, match="offset"):
        nf4_levels(0.4)


def test_nf4_levels_spread_normal_weights_more_evenly_than_uniform_levels():
    w = torch.randn(64 * 4096, generator=torch.Generator().manual_seed(1))

    def shares(levels: torch.Tensor) -> torch.Tensor:
        codes, _ = quantize_blockwise(w, levels, block_size=64)
        return torch.bincount(codes.long(), minlength=16).float() / len(codes)

    nf4, uniform = shares(nf4_levels()), shares(torch.linspace(-1, 1, 16))
    assert nf4.std() < 0.6 * uniform.std()  # closer to the ideal 1/16 each
    assert nf4[1:-1].min() > 0.03 and nf4.max() < 0.1  # the ends hold each block's own maximum


def test_blockwise_nf4_round_trip_and_beats_uniform_int4_on_normal_weights():
    w = weights(32, 256)
    levels = nf4_levels()
    codes, absmax = quantize_blockwise(w, levels, block_size=64)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and absmax.shape == (32 * 256 // 64,)
    w_hat = dequantize_blockwise(codes, absmax, levels, w.shape)
    assert w_hat.shape == w.shape
    # every value maps to its nearest level
    normalised = (w.reshape(-1, 64) / absmax[:, None]).reshape(-1)
    nearest = (normalised[:, None] - levels[None]).abs().argmin(dim=1)
    assert torch.equal(codes.long(), nearest)
    uniform = torch.linspace(-1, 1, 16)
    u_hat = dequantize_blockwise(*quantize_blockwise(w, uniform, 64), uniform, w.shape)
    assert (w_hat - w).pow(2).mean() < (u_hat - w).pow(2).mean()


def test_blockwise_rejects_bad_levels_and_blocks():
    with pytest.raises(ValueError, match="increasing"):
        quantize_blockwise(weights(), torch.tensor([0.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        quantize_blockwise(weights(), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="divide"):
        quantize_blockwise(weights(), nf4_levels(), block_size=100)


def test_double_quantization_recovers_scales_closely():
    absmax = weights(1, 1024).abs().reshape(-1) + 0.01
    q, scale, mean = double_quantize(absmax, block_size=256)
    assert q.dtype == torch.int8 and scale.shape == (4,)
    recovered = double_dequantize(q, scale, mean)
    assert (recovered - absmax).abs().max() <= scale.max() / 2 + 1e-7
    with pytest.raises(ValueError, match="divide"):
        double_quantize(absmax[:1000], block_size=256)


def test_pack_and_unpack_nibbles():
    codes = torch.tensor([0, 15, 7, 8, 1, 2], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [0x0F, 0x78, 0x12]
    assert torch.equal(unpack_nibbles(packed), codes)
    with pytest.raises(ValueError, match="even"):
        pack_nibbles(codes[:5])
    with pytest.raises(ValueError, match="4-bit"):
        pack_nibbles(torch.tensor([16, 0], dtype=torch.uint8))


def test_bits_per_parameter():
    assert bits_per_parameter(4, 64, None) == 4.5
    assert bits_per_parameter(4, 64, 256) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    with pytest.raises(ValueError, match="positive"):
        bits_per_parameter(4, 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_quantizers_reject_nan_and_inf_with_a_clear_error(bad):
    x = torch.randn(4, 64)
    x[1, 3] = bad
    with pytest.raises(ValueError, match=r"x holds 1 NaN or infinite value\(s\) out of 256.*nan_to_num"):
        absmax_quantize(x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        zeropoint_quantize(x, dim=1)
    with pytest.raises(ValueError, match="w holds 1 NaN"):
        quantize_blockwise(x, nf4_levels())
