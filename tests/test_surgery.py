"""Tests for utils.surgery on a tiny random Llama (no downloads)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from utils.hf_llama import decoder_layers
from utils.surgery import (angular_distance, best_block, block_distances,
                           distillation_loss, layer_inputs, layers_removed, proxy_logits,
                           remove_layers, token_nll)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def ids():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def test_decoder_layers_rejects_other_modules():
    with pytest.raises(TypeError, match="model.layers"):
        decoder_layers(nn.Linear(2, 2))


def test_layer_inputs_match_hidden_states(tiny, ids):
    states = layer_inputs(tiny, ids)
    assert states.shape == (6, 2, 7, 32)
    with torch.no_grad():
        out = tiny(ids, output_hidden_states=True)
    for i in range(5):  # HF's hidden_states[i] is the input of layer i
        torch.testing.assert_close(states[i], out.hidden_states[i])
    torch.testing.assert_close(tiny.model.norm(states[-1]), out.hidden_states[-1])
    assert not any(m._forward_pre_hooks for m in tiny.modules())  # hooks removed


def test_layer_inputs_keyword_call():
    class Layer(nn.Module):
        def forward(self, hidden_states):
            return hidden_states + 1

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer(), Layer()])
            self.norm = nn.Identity()

        def forward(self, input_ids, **_):
            h = input_ids.float()[..., None]
            for layer in self.layers:
                h = layer(hidden_states=h)
            return self.norm(h)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return self.model(input_ids)

    states = layer_inputs(Outer(), torch.zeros(1, 3, dtype=torch.long))
    assert states[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]


def test_angular_distance_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    torch.testing.assert_close(angular_distance(a, b), torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="shapes differ"):
        angular_distance(a, b[:2])


def test_block_distances_and_best_block(tiny, ids):
    states = layer_inputs(tiny, ids)
    d = block_distances(states)
    assert d.shape == (5, 5)
    assert torch.isnan(d[1, 4]) and not torch.isnan(d[0, 4])
    manual = angular_distance(states[1], states[3]).mean()
    torch.testing.assert_close(d[1, 1], manual)
    start = best_block(d, 2)
    assert d[start, 1] == d[:4, 1].min()
    assert best_block(d, 5) == 0
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, :3] = True
    dm = block_distances(states, max_block=2, mask=mask)
    assert dm.shape == (5, 2)
    torch.testing.assert_close(dm[0, 0], angular_distance(states[0, 0, :3], states[1, 0, :3]).mean())


def test_block_distances_bad_inputs(tiny, ids):
    states = layer_inputs(tiny, ids)
    with pytest.raises(ValueError, match="L \\+ 1, B, T, d"):
        block_distances(states[0])
    with pytest.raises(ValueError, match="max_block"):
        block_distances(states, max_block=6)
    with pytest.raises(ValueError, match="max_block"):
        block_distances(states, max_block=0)
    with pytest.raises(ValueError, match="mask"):
        block_distances(states, mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="n must be"):
        best_block(block_distances(states, max_block=2), 3)


def test_remove_layers_forward_and_generate(tiny, ids):
    with torch.no_grad():
        states = layer_inputs(tiny, ids)
        keep = list(tiny.model.layers)
        remove_layers(tiny, 1, 2)
        assert len(tiny.model.layers) == 3 and tiny.config.num_hidden_layers == 3
        assert tiny.model.layers[1] is keep[3]
        assert [layer.self_attn.layer_idx for layer in tiny.model.layers] == [0, 1, 2]
        pruned = layer_inputs(tiny, ids)
        torch.testing.assert_close(pruned[1], states[1])  # layer 0 is untouched
        out = tiny.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 11)
        # cached generation equals recomputing from scratch
        logits = tiny(out[:, :-1]).logits
        assert torch.equal(logits[0, -4:].argmax(-1), out[0, -4:])


def test_remove_layers_layer_types(tiny):
    tiny.config.layer_types = ["full_attention"] * 5
    remove_layers(tiny, 3, 2)
    assert tiny.config.layer_types == ["full_attention"] * 3


@pytest.mark.parametrize("start,n", [(-1, 1), (0, 0), (4, 2), (5, 1)])
def test_remove_layers_bad_ranges(tiny, start, n):
    with pytest.raises(ValueError):
        remove_layers(tiny, start, n)
    assert len(tiny.model.layers) == 5


def test_layers_removed_is_temporary(tiny, ids):
    tiny.config.layer_types = ["full_attention"] * 5
    with torch.no_grad():
        before = tiny(ids).logits
        with layers_removed(tiny, 2, 3) as m:
            assert len(m.model.layers) == 2 and m.config.layer_types == ["full_attention"] * 2
            inside = tiny(ids).logits
        after = tiny(ids).logits
    assert not torch.allclose(before, inside)
    torch.testing.assert_close(before, after)
    assert tiny.config.num_hidden_layers == 5 and tiny.config.layer_types == ["full_attention"] * 5
    assert [layer.self_attn.layer_idx for layer in tiny.model.layers] == list(range(5))


def test_layers_removed_without_layer_types(tiny, ids):
    if hasattr(tiny.config, "layer_types"):
        tiny.config.layer_types = None
    with layers_removed(tiny, 0, 5):  # no layers at all: embeddings -> norm -> head
        assert len(tiny.model.layers) == 0
        with torch.no_grad():
            logits = tiny(ids).logits
    expected = tiny.lm_head(tiny.model.norm(tiny.model.embed_tokens(ids)))
    torch.testing.assert_close(logits, expected)
    assert len(tiny.model.layers) == 5


def test_token_nll():
    logits = torch.zeros(1, 3, 4)
    ids = torch.tensor([[0, 1, 2]])
    torch.testing.assert_close(token_nll(logits, ids), torch.full((1, 2), math.log(4)))
    with pytest.raises(ValueError, match="do not match"):
        token_nll(logits, ids[:, :2])


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
def test_distillation_loss_equals_kl_div(T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ours = distillation_loss(s, t, T)
    ref = F.kl_div((s / T).log_softmax(-1).reshape(-1, 11), (t / T).log_softmax(-1).reshape(-1, 11),
                   log_target=True, reduction="batchmean") * T**2
    torch.testing.assert_close(ours, ref)
    assert distillation_loss(t, t, T).abs() < 1e-6


def test_distillation_loss_bad_inputs():
    s = torch.zeros(2, 3)
    for T in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            distillation_loss(s, s, T)
    with pytest.raises(ValueError, match="shapes differ"):
        distillation_loss(s, torch.zeros(2, 4))


def test_proxy_logits():
    base, exp, anti = torch.zeros(3), torch.tensor([1.0, 2, 3]), torch.ones(3)
    torch.testing.assert_close(proxy_logits(base, exp, anti), torch.tensor([0.0, 1, 2]))
    torch.testing.assert_close(proxy_logits(base, exp, anti, alpha=0.5), torch.tensor([0.0, 0.5, 1]))
    with pytest.raises(ValueError, match="shapes differ"):
        proxy_logits(base, exp, torch.ones(2))
