import math

import pytest
import torch

from utils.positions import (
    alibi_bias,
    alibi_slopes,
    apply_rope,
    rope_cos_sin,
    rope_frequencies,
    rope_rotate,
    rotate_half,
    sinusoidal_encoding,
)


def test_sinusoidal_encoding_matches_the_formula():
    pe = sinusoidal_encoding(50, 16)
    assert pe.shape == (50, 16) and pe.dtype == torch.float32
    p, i = 7, 3
    omega = 10_000 ** (-2 * i / 16)
    assert pe[p, 2 * i].item() == pytest.approx(math.sin(p * omega), abs=1e-6)
    assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(p * omega), abs=1e-6)
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 1.0] * 8))


def test_sinusoidal_dot_product_depends_only_on_offset():
    pe = sinusoidal_encoding(200, 32).double()
    offsets = [pe[p] @ pe[p + 5] for p in (0, 40, 150)]
    torch.testing.assert_close(torch.stack(offsets), offsets[0].expand(3), rtol=1e-5, atol=1e-5)


def test_rope_frequencies_values():
    theta = rope_frequencies(8, base=100.0)
    torch.testing.assert_close(theta, torch.tensor([1.0, 100 ** -0.25, 100 ** -0.5, 100 ** -0.75]))


def _hf_rotary(head_dim: int, base: float, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, rope_theta=base)
    cos, sin = LlamaRotaryEmbedding(config)(q, pos[None])
    return apply_rotary_pos_emb(q, k, cos, sin)


def test_apply_rope_matches_transformers_llama():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 3, 40, 64, generator=g), torch.randn(1, 3, 40, 64, generator=g)
    pos = torch.arange(100, 140)
    q_ref, k_ref = _hf_rotary(64, 100_000.0, q, k, pos)
    torch.testing.assert_close(apply_rope(q, pos, base=100_000.0), q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(apply_rope(k, pos, base=100_000.0), k_ref, rtol=1e-6, atol=1e-6)


def test_rope_preserves_norm_and_position_zero_is_identity():
    x = torch.randn(2, 10, 16)
    pos = torch.arange(10)
    torch.testing.assert_close(apply_rope(x, pos).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(apply_rope(x[:, :1], pos[:1]), x[:, :1], rtol=0, atol=0)


def test_rope_scores_depend_only_on_offset():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)

    def score(m: int, n: int) -> torch.Tensor:
        return apply_rope(q[None], torch.tensor([m])) @ apply_rope(k[None], torch.tensor([n]))[0]

    scores = torch.stack([score(m, m - 3) for m in (3, 10, 50, 300)])
    torch.testing.assert_close(scores, scores[0].expand_as(scores), rtol=1e-4, atol=1e-4)


def test_interleaved_layout_is_a_permutation_of_the_half_layout():
    x = torch.randn(5, 12)
    pos = torch.arange(5)
    perm = torch.tensor([0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11])  # half layout -> interleaved
    torch.testing.assert_close(apply_rope(x[:, perm], pos, interleaved=True), apply_rope(x, pos)[:, perm])


def test_rope_with_batched_positions_broadcasts():
    x = torch.randn(2, 4, 8)
    pos = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    out = apply_rope(x, pos)
    torch.testing.assert_close(out[1], apply_rope(x[1], torch.arange(5, 9)))


@pytest.mark.parametrize("head_dim", [0, -4, 7, 2.0])
def test_rope_frequencies_rejects_bad_head_dim(head_dim):
    with pytest.raises(ValueError, match="head_dim"):
        rope_frequencies(head_dim)


def test_rope_rejects_bad_base_input_and_positions():
    with pytest.raises(ValueError, match="base"):
        rope_frequencies(8, base=1.0)
    with pytest.raises(ValueError, match="head_dim must be even"):
        apply_rope(torch.randn(3, 5), torch.arange(3))
    with pytest.raises(ValueError, match="shape"):
        apply_rope(torch.randn(8), torch.arange(1))
    with pytest.raises(ValueError, match="integers"):
        apply_rope(torch.randn(3, 8), torch.arange(3.0))
    with pytest.raises(ValueError, match="non-negative"):
        apply_rope(torch.randn(3, 8), torch.tensor([-1, 0, 1]))


def test_rope_rejects_positions_of_the_wrong_length():
    with pytest.raises(TypeError, match="positions must be a tensor"):
        apply_rope(torch.randn(3, 8), [0, 1, 2])
    with pytest.raises(ValueError, match=r"one position per sequence element, e.g. torch.arange\(3\)"):
        apply_rope(torch.randn(2, 3, 8), torch.arange(5))
    with pytest.raises(ValueError, match="do not fit"):
        apply_rope(torch.randn(3, 8), torch.arange(4)[:, None].expand(4, 3))  # would broadcast x up
    cos, sin = rope_cos_sin(torch.arange(5), 8)
    with pytest.raises(ValueError, match="one row per sequence position"):
        rope_rotate(torch.randn(2, 3, 8), cos, sin)
    with pytest.raises(ValueError, match="head_dim=16"):
        rope_rotate(torch.randn(5, 16), cos, sin)


@pytest.mark.parametrize("interleaved", [False, True])
def test_tables_and_rotation_equal_apply_rope_and_the_llama_formula(interleaved):
    g = torch.Generator().manual_seed(1)
    x, pos = torch.randn(2, 6, 8, generator=g), torch.arange(3, 9)
    cos, sin = rope_cos_sin(pos, 8, 500.0, interleaved)
    assert cos.shape == sin.shape == (6, 8)
    assert torch.equal(rope_rotate(x, cos, sin, interleaved), apply_rope(x, pos, 500.0, interleaved))
    # per pair: (a, b) -> (a cos - b sin, b cos + a sin)
    theta = rope_frequencies(8, 500.0)
    ang = pos[:, None].float() * theta
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :4], x[..., 4:])
    out = rope_rotate(x, cos, sin, interleaved)
    out_a, out_b = (out[..., 0::2], out[..., 1::2]) if interleaved else (out[..., :4], out[..., 4:])
    torch.testing.assert_close(out_a, a * ang.cos() - b * ang.sin())
    torch.testing.assert_close(out_b, b * ang.cos() + a * ang.sin())


def test_rotate_half_layouts():
    x = torch.arange(4.0)
    assert rotate_half(x).tolist() == [-2.0, -3.0, 0.0, 1.0]
    assert rotate_half(x, interleaved=True).tolist() == [-1.0, 0.0, -3.0, 2.0]


@pytest.mark.parametrize("args", [(0, 8), (4, 0), (4, 7), (True, 8)])
def test_sinusoidal_rejects_bad_sizes(args):
    with pytest.raises(ValueError):
        sinusoidal_encoding(*args)


def test_alibi_slopes_power_of_two_and_not():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 12 heads: the 8 slopes of 8 heads, then every other slope of 16 heads
    expected = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 * (i + 1)) for i in range(16)][0::2][:4]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected))
    assert alibi_slopes(1).tolist() == [2.0 ** -8]


def test_alibi_bias_values():
    bias = alibi_bias(2, 4)
    assert bias.shape == (2, 4, 4)
    slope = alibi_slopes(2)[1].item()
    assert bias[1, 3, 0].item() == pytest.approx(-3 * slope)
    assert bias[:, range(4), range(4)].eq(0).all()
    torch.testing.assert_close(bias, bias.transpose(-1, -2))


@pytest.mark.parametrize("args", [(0, 4), (-2, 4), (4, 0), (4, 2.5)])
def test_alibi_rejects_non_positive_sizes(args):
    with pytest.raises(ValueError, match="positive"):
        alibi_bias(*args)
