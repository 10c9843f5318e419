import dataclasses

import pytest
import torch

from utils.kvcache import KVCache, generate
from utils.llama import Llama, LlamaConfig, from_hf, kv_cache_bytes_per_token

TINY = dict(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=80, rope_theta=10_000.0)


def _model(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**TINY)).eval()


def _ids(batch: int = 2, n: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(seed))


def test_cached_logits_equal_uncached_for_prefill_and_every_decode_step():
    model, ids = _model(), _ids(n=9)
    full = model(ids)
    cache = KVCache.for_model(model, batch_size=2, max_len=9)
    with torch.no_grad():
        pieces = [model(ids[:, :4], cache=cache)]  # prefill 4 tokens, then chunks of 3, 1, 1
        pieces += [model(ids[:, 4:7], cache=cache), model(ids[:, 7:8], cache=cache)]
        pieces.append(model(ids[:, 8:9], cache=cache, last_only=True))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 9


def test_generate_equals_uncached_greedy_and_transformers():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**TINY).to_hf()).eval()
    model, ids = from_hf(hf), _ids(batch=2, n=5)
    theirs = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(generate(model, ids, 12), theirs)
    assert torch.equal(generate(model, ids, 12), generate(model, ids, 12, use_cache=False))
    sampled = [generate(model, ids, 6, temperature=1.0, use_cache=flag,
                        generator=torch.Generator().manual_seed(3)) for flag in (True, False)]
    assert torch.equal(*sampled)


def test_generate_stops_at_eos_and_samples_reproducibly():
    model, ids = _model(), _ids(batch=1, n=4)
    first = int(generate(model, ids, 1)[0, -1])
    assert generate(model, ids, 8, eos_token_id=first).shape == (1, 5)
    a = generate(model, ids, 10, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = generate(model, ids, 10, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (1, 14)


def test_prefix_cache_reused_by_clone_gives_the_same_tokens():
    model, ids = _model(), _ids(batch=1, n=10)
    prefix = KVCache.for_model(model, 1, 20)
    with torch.no_grad():
        model(ids[:, :6], cache=prefix)
    reused = generate(model, ids, 10, cache=prefix.clone())
    assert prefix.length == 6  # the clone advanced, the shared prefix did not
    assert torch.equal(reused, generate(model, ids, 10))


def test_truncate_rolls_back():
    model, ids = _model(), _ids(batch=1, n=8)
    cache = KVCache.for_model(model, 1, 8)
    with torch.no_grad():
        model(ids, cache=cache)
        cache.truncate(5)
        redo = model(ids[:, 5:], cache=cache)
    torch.testing.assert_close(redo, model(ids)[:, 5:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(9)


def test_cache_memory_equals_formula():
    cfg = LlamaConfig(**TINY)
    cache = KVCache(cfg, batch_size=3, max_len=11, dtype=torch.bfloat16)
    assert cache.nbytes == 3 * 11 * kv_cache_bytes_per_token(cfg, bytes_per_value=2)


def test_bad_input_is_refused():
    model, ids = _model(), _ids()
    with pytest.raises(ValueError, match="batch_size"):
        KVCache(model.cfg, 0, 4)
    with pytest.raises(ValueError, match="max_len"):
        KVCache(model.cfg, 1, 2.5)
    other = dataclasses.replace(model.cfg, n_layers=3)
    with pytest.raises(ValueError, match="another model configuration"):
        model(ids, cache=KVCache(other, 2, 10))
    with pytest.raises(ValueError, match="batch of 1"):
        model(ids, cache=KVCache.for_model(model, 1, 10))
    with pytest.raises(ValueError, match="larger max_len"):
        model(ids, cache=KVCache.for_model(model, 2, 5))
    cache = KVCache.for_model(model, 2, 20)
    with torch.no_grad():
        model(ids, cache=cache)
    with pytest.raises(ValueError, match="start_pos"):
        model(ids, start_pos=3, cache=cache)
    with pytest.raises(ValueError, match="at least the prompt's last token"):
        generate(model, ids, 3, cache=cache)
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="max_new_tokens"):
            generate(model, ids, bad)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, ids, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="idx"):
        generate(model, ids[0], 3)
