"""Tests for utils.hf_llama on a tiny random LlamaForCausalLM (no download)."""
import pytest
import torch
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM

from utils.finetune import top_forward
from utils.hf_llama import (causal_mask, check_n_top, decoder_layers, last_token_top_layer,
                            prefix_trunk_hidden, run_layers, trunk_hidden)
from tiny_chatml import tiny_random_llama


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    return tiny_random_llama(num_hidden_layers=3)


def test_decoder_layers_and_check_n_top(tiny):
    assert decoder_layers(tiny) is tiny.model.layers
    with pytest.raises(TypeError, match="model.model.layers"):
        decoder_layers(nn.Linear(2, 2))
    assert check_n_top(tiny, 1) == 3 and check_n_top(tiny, 3) == 3
    for bad in (0, 4, 1.0, True):
        with pytest.raises(ValueError, match="n_top must be an int in 1..3"):
            check_n_top(tiny, bad)


def test_trunk_hidden_is_the_input_of_layer_l_minus_k(tiny):
    ids = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = tiny(input_ids=ids, output_hidden_states=True).hidden_states
    for k in (1, 2, 3):
        torch.testing.assert_close(trunk_hidden(tiny, k, input_ids=ids), states[3 - k])


def test_causal_mask():
    like = torch.zeros(1)
    m = causal_mask(2, 3, like)
    assert m.shape == (1, 1, 2, 5)
    assert (m[0, 0, :, :4] == 0).all() and m[0, 0, 0, 4] == torch.finfo(like.dtype).min and m[0, 0, 1, 4] == 0
    assert (causal_mask(3, 0, like)[0, 0] != 0).tolist() == [[False, True, True], [False, False, True],
                                                            [False, False, False]]


@pytest.mark.parametrize("k", [1, 2])
def test_run_layers_on_cached_states_equals_the_full_model(tiny, k):
    ids = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = tiny.model(input_ids=ids).last_hidden_state
        ours = top_forward(tiny, trunk_hidden(tiny, k, input_ids=ids), k)
        torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
        # split the top's input at position 4: the first part fills a cache, the rest attends to it
        hidden = trunk_hidden(tiny, k, input_ids=ids)
        top, cache = decoder_layers(tiny)[3 - k:], DynamicCache()
        run_layers(top, tiny.model.rotary_emb, hidden[:, :4], 0, cache, 0)
        rest = run_layers(top, tiny.model.rotary_emb, hidden[:, 4:], 4, cache, 4)
        torch.testing.assert_close(tiny.model.norm(rest), full[:, 4:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch, seq, d"):
        run_layers(top, tiny.model.rotary_emb, torch.zeros(3, 32))


def test_prefix_trunk_hidden_equals_full_sequences(tiny):
    prefix, conts = [3, 4, 5, 6], [[7, 8], [9, 10, 11, 12, 13], [14]]
    tiny.train()
    head, parts = prefix_trunk_hidden(tiny, prefix, conts, n_top=2, batch_size=2)
    assert tiny.training  # the caller's mode is restored
    tiny.eval()
    assert head.shape == (4, 32) and [p.shape[0] for p in parts] == [2, 5, 1]
    for c, part in zip(conts, parts):
        ref = trunk_hidden(tiny, 2, input_ids=torch.tensor([prefix + c]))[0]
        torch.testing.assert_close(torch.cat([head, part]), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="non-empty prefix"):
        prefix_trunk_hidden(tiny, [], [[2]], n_top=1)
    with pytest.raises(ValueError, match="batch_size"):
        prefix_trunk_hidden(tiny, [1], [[2]], n_top=1, batch_size=0)


def test_last_token_top_layer_equals_top_forward(tiny):
    hidden = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([6, 2, 4])
    for i, L in enumerate(lengths):
        hidden[i, L:] = 0.0  # right padding, as utils.finetune.pad_cached makes it
    with torch.no_grad():
        ours = last_token_top_layer(tiny, hidden, lengths)
        full = top_forward(tiny, hidden, 1)
    torch.testing.assert_close(ours, full[torch.arange(3), lengths - 1], rtol=1e-5, atol=1e-5)


def test_last_token_top_layer_errors(tiny):
    with pytest.raises(ValueError, match="batch, seq, d"):
        last_token_top_layer(tiny, torch.zeros(2, 32), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="one length"):
        last_token_top_layer(tiny, torch.zeros(2, 3, 32), torch.tensor([1, 4]))
