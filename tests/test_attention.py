import pytest
import torch
import torch.nn.functional as F

from utils.attention import MultiHeadAttention, causal_mask, padding_mask, scaled_dot_product_attention

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 7, 8, generator=g) for _ in range(3)]


def test_matches_sdpa_without_and_with_masks(qkv):
    q, k, v = qkv
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), **TOL)
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v, causal_mask(7)), F.scaled_dot_product_attention(q, k, v, is_causal=True), **TOL
    )
    pad = padding_mask(torch.tensor([7, 4]), 7)
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v, pad), F.scaled_dot_product_attention(q, k, v, attn_mask=pad), **TOL
    )


def test_weights_are_distributions_and_masked_entries_exactly_zero(qkv):
    q, k, v = qkv
    _, w = scaled_dot_product_attention(q, k, v, causal_mask(7), return_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 7))
    assert w.triu(diagonal=1).eq(0).all()


def test_a_query_with_every_key_masked_gives_zeros_like_sdpa(qkv):
    q, k, v = (t.requires_grad_() for t in qkv)
    mask = torch.ones(7, 7, dtype=torch.bool)
    mask[2] = False  # query 2 may attend to nothing
    ours, w = scaled_dot_product_attention(q, k, v, mask, return_weights=True)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **TOL)
    assert ours[..., 2, :].eq(0).all() and w[..., 2, :].eq(0).all()
    ours.sum().backward()
    assert all(t.grad.isfinite().all() for t in (q, k, v))


def test_sdpa_rejects_mismatched_head_dims_and_non_boolean_masks(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="same head dimension"):
        scaled_dot_product_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="one row per key"):
        scaled_dot_product_attention(q, k, v[..., :5, :])
    additive = torch.zeros(7, 7).masked_fill(~causal_mask(7), float("-inf"))
    with pytest.raises(TypeError, match="mask == 0"):
        scaled_dot_product_attention(q, k, v, additive)
    with pytest.raises(TypeError, match="boolean"):
        scaled_dot_product_attention(q, k, v, causal_mask(7).int())
    # the suggested fixes give the boolean mask's result
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, additive == 0),
                               scaled_dot_product_attention(q, k, v, causal_mask(7)))


def test_causal_mask_for_more_keys_than_queries_aligns_to_the_end():
    # 2 new queries after 3 cached keys: the first sees keys 0..3, the second 0..4
    assert causal_mask(2, 5).int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_padding_mask_shape_and_values():
    mask = padding_mask(torch.tensor([3, 1]), 4)
    assert mask.shape == (2, 1, 1, 4)
    assert mask[:, 0, 0].int().tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize("args", [(0,), (3, 0), (-1, 2)])
def test_causal_mask_rejects_non_positive_sizes(args):
    with pytest.raises(ValueError, match="positive"):
        causal_mask(*args)


def test_padding_mask_rejects_bad_lengths():
    with pytest.raises(ValueError, match="max_len must be positive"):
        padding_mask(torch.tensor([1]), 0)
    with pytest.raises(ValueError, match="lengths must be in"):
        padding_mask(torch.tensor([0, 5]), 4)


def _torch_copy(mha: MultiHeadAttention) -> torch.nn.MultiheadAttention:
    ref = torch.nn.MultiheadAttention(mha.w_q.in_features, mha.n_heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([mha.w_q.weight, mha.w_k.weight, mha.w_v.weight]))
        ref.in_proj_bias.copy_(torch.cat([mha.w_q.bias, mha.w_k.bias, mha.w_v.bias]))
        ref.out_proj.weight.copy_(mha.w_o.weight)
        ref.out_proj.bias.copy_(mha.w_o.bias)
    return ref


def test_multi_head_attention_matches_torch_for_self_and_cross_attention():
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4)
    ref = _torch_copy(mha)
    x, memory = torch.randn(2, 6, 32), torch.randn(2, 9, 32)
    with torch.no_grad():
        out, w = mha(x, return_weights=True)
        ref_out, ref_w = ref(x, x, x, average_attn_weights=False)
        torch.testing.assert_close(out, ref_out, **TOL)
        torch.testing.assert_close(w, ref_w, **TOL)
        cross = mha(x, memory)
        torch.testing.assert_close(cross, ref(x, memory, memory)[0], **TOL)
        assert cross.shape == (2, 6, 32)
        causal = mha(x, mask=causal_mask(6))
        torch.testing.assert_close(causal, ref(x, x, x, attn_mask=~causal_mask(6))[0], **TOL)


@pytest.mark.parametrize("d_model, n_heads", [(30, 4), (0, 1), (8, 0)])
def test_multi_head_attention_rejects_bad_sizes(d_model, n_heads):
    with pytest.raises(ValueError, match="multiple of n_heads"):
        MultiHeadAttention(d_model, n_heads)


@pytest.mark.parametrize("n_q, n_k, causal, block", [
    (100, 100, False, 32), (100, 100, True, 32), (257, 257, True, 64), (64, 300, False, 128),
    (50, 130, True, 16), (7, 7, True, 128),
])
def test_flash_attention_equals_sdpa_and_naive(n_q, n_k, causal, block):
    from utils.attention import flash_attention
    g = torch.Generator().manual_seed(n_q + n_k)
    q = torch.randn(2, 3, n_q, 16, generator=g)
    k = torch.randn(2, 3, n_k, 16, generator=g)
    v = torch.randn(2, 3, n_k, 8, generator=g)
    ours = flash_attention(q, k, v, causal=causal, block_size=block)
    mask = causal_mask(n_q, n_k) if causal else None
    torch.testing.assert_close(ours, scaled_dot_product_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
    if n_q == n_k or not causal:
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(ours, sdpa, rtol=1e-5, atol=1e-5)


def test_flash_attention_rejects_bad_input():
    from utils.attention import flash_attention
    q, k, v = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6, 5)
    with pytest.raises(ValueError, match="block_size"):
        flash_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="shapes do not fit"):
        flash_attention(q, torch.randn(6, 7), v)
    with pytest.raises(ValueError, match="shapes do not fit"):
        flash_attention(q, k, torch.randn(5, 5))
    with pytest.raises(ValueError, match="n_q <= n_k"):
        flash_attention(torch.randn(9, 8), k, v, causal=True)
