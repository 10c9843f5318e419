import math

import pytest
import torch

from utils.kvcache import generate
from utils.llama import Llama, LlamaConfig, from_hf
from utils.lora import apply_lora, lora_state_dict, set_adapter_weights, unload_lora
from utils.serving import (MultiLoRALinear, PaddedKVCache, PagedKVCache, Request, RequestResult,
                           attach_multi_lora, contiguous_slots, detach_multi_lora, forward_with_kv,
                           padded_forward, padded_generate, paged_forward, paged_generate, paged_slots,
                           poisson_arrivals, positions_from_mask, serve, set_adapter_ids)

TINY = dict(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=80, rope_theta=10_000.0)
LENGTHS = (3, 7, 5, 1)


def _model(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**TINY)).eval()


def _prompts(lengths=LENGTHS, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist() for n in lengths]


def _alone(model, prompt, n, eos=None) -> list[int]:
    return generate(model, torch.tensor([prompt]), n, eos_token_id=eos)[0, len(prompt):].tolist()


def test_positions_from_mask_start_each_row_at_zero():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3], [0, 0, 1, 2]]
    assert positions_from_mask(mask.bool(), start=torch.tensor([2, 0, 1]))[:, -1].tolist() == [3, 3, 3]


@pytest.mark.parametrize("bad", [torch.tensor([0, 1]), torch.tensor([[0, 2]]), torch.tensor([[0.5, 1.0]])])
def test_positions_from_mask_refuses_bad_masks(bad):
    with pytest.raises(ValueError, match="attention_mask"):
        positions_from_mask(bad)


def test_padded_batch_equals_one_at_a_time():
    model, prompts = _model(), _prompts()
    replies, logits = padded_generate(model, prompts, 10, return_logits=True)
    assert logits.shape == (len(prompts), 10, TINY["vocab_size"])
    for i, p in enumerate(prompts):
        ref = _alone(model, p, 10)
        assert replies[i] == ref
        full = model(torch.tensor([p + ref]))[0, len(p) - 1:-1]
        torch.testing.assert_close(logits[i], full, rtol=1e-5, atol=1e-5)


def test_padded_generate_stops_at_eos_and_cuts_rows():
    model, prompts = _model(), _prompts()
    free = padded_generate(model, prompts, 8)
    eos = free[0][2]
    replies = padded_generate(model, prompts, 8, eos_token_id=eos)
    for p, r in zip(prompts, replies):
        assert r == _alone(model, p, 8, eos=eos)[: len(r)]
        assert r[-1] == eos or len(r) == 8
    cut = free[0].index(eos) + 1
    assert padded_generate(model, prompts[:1], 8, eos_token_id=eos) == [free[0][:cut]]


def test_padded_logits_equal_transformers_with_attention_mask():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**TINY).to_hf()).eval()
    model, prompts = from_hf(hf), _prompts()
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = (torch.arange(longest)[None] >= torch.tensor([longest - len(p) for p in prompts])[:, None]).long()
    ours = padded_forward(model, ids, mask, PaddedKVCache.for_model(model, len(prompts), longest))
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)


def test_padded_cache_errors():
    model = _model()
    cache = PaddedKVCache.for_model(model, 2, 4)
    with pytest.raises(RuntimeError, match="prepare"):
        cache.attend(0, torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8))
    with pytest.raises(ValueError, match="batch of 2"):
        cache.prepare(torch.ones(3, 1))
    with pytest.raises(ValueError, match="larger max_len"):
        cache.prepare(torch.ones(2, 5))
    with pytest.raises(ValueError, match="shape of idx"):
        padded_forward(model, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 2), cache)
    with pytest.raises(ValueError, match="non-empty"):
        padded_generate(model, [[1], []], 3)
    with pytest.raises(TypeError, match="padded_forward"):  # the unmasked path would ignore padding
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)


def test_forward_checks_its_inputs():
    model = _model()
    with pytest.raises(TypeError, match="utils.llama.Llama"):
        forward_with_kv(torch.nn.Linear(2, 2), torch.zeros(1, 1, dtype=torch.long), None, None)
    with pytest.raises(ValueError, match=r"\(batch, n\)"):
        forward_with_kv(model, torch.zeros(3, dtype=torch.long), None, None)
    with pytest.raises(ValueError, match="integer"):
        forward_with_kv(model, torch.zeros(1, 2), None, None)
    with pytest.raises(ValueError, match="another tokenizer"):
        forward_with_kv(model, torch.full((1, 2), 500), None, None)
    with pytest.raises(ValueError, match="shape of idx"):
        forward_with_kv(model, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 3), None)


def test_paged_equals_contiguous_and_frees_blocks():
    model, prompts = _model(), _prompts()
    cache = PagedKVCache.for_model(model, n_blocks=8, block_size=4)
    for p in prompts:
        tokens, logits = paged_generate(model, p, 9, cache, return_logits=True)
        ref = _alone(model, p, 9)
        assert tokens == ref
        full = model(torch.tensor([p + ref]))[0, len(p) - 1:-1]
        torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
        assert cache.used_blocks == 0 and len(cache.free_blocks) == 8
    ref = _alone(model, prompts[1], 9)
    cut = ref.index(ref[1]) + 1
    assert paged_generate(model, prompts[1], 9, cache, eos_token_id=ref[1]) == ref[:cut]


def test_paged_batch_of_interleaved_sequences_shares_the_pool():
    model, prompts = _model(), _prompts((6, 2))
    cache = PagedKVCache.for_model(model, n_blocks=10, block_size=2)
    for sid, p in enumerate(prompts):
        cache.add(sid)
        paged_forward(model, torch.tensor([p]), cache, [sid])
    assert cache.tables == {0: [0, 1, 2], 1: [3]} and cache.used_blocks == 4
    step = paged_forward(model, torch.tensor([[5], [6]]), cache, [0, 1], last_only=True)
    assert step.shape == (2, 1, TINY["vocab_size"])
    assert cache.tables == {0: [0, 1, 2, 4], 1: [3, 5]} and cache.lengths == {0: 7, 1: 3}
    for sid, (p, t) in enumerate(zip(prompts, (5, 6))):
        torch.testing.assert_close(step[sid, -1], model(torch.tensor([p + [t]]))[0, -1], rtol=1e-5, atol=1e-5)


def test_paged_cache_errors():
    model = _model()
    cache = PagedKVCache.for_model(model, n_blocks=2, block_size=2)
    cache.add(0)
    with pytest.raises(ValueError, match="already open"):
        cache.add(0)
    with pytest.raises(KeyError, match="not open"):
        cache.free(7)
    with pytest.raises(RuntimeError, match="free blocks"):
        cache.prepare([0], 5)
    with pytest.raises(ValueError, match="distinct"):
        cache.prepare([0, 0], 1)
    with pytest.raises(RuntimeError, match="prepare"):
        cache.attend(0, torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
    with pytest.raises(ValueError, match="one sequence id per row"):
        paged_forward(model, torch.zeros(2, 1, dtype=torch.long), cache, [0])
    other = Llama(LlamaConfig(**{**TINY, "n_layers": 1}))
    with pytest.raises(ValueError, match="another model"):
        paged_forward(other, torch.zeros(1, 1, dtype=torch.long), cache, [0])


def test_slot_counts():
    assert contiguous_slots([3, 10, 17], 20) == 60
    assert paged_slots([3, 10, 17], 8) == 8 + 16 + 24
    with pytest.raises(ValueError, match="raise max_len"):
        contiguous_slots([30], 20)
    with pytest.raises(ValueError, match="empty"):
        paged_slots([], 4)
    with pytest.raises(ValueError, match="each length"):
        paged_slots([0, 3], 4)


def test_poisson_arrivals_are_seeded_and_have_the_rate():
    a = poisson_arrivals(2000, rate=4.0, seed=3)
    assert a == poisson_arrivals(2000, rate=4.0, seed=3) and a == sorted(a)
    assert abs(len(a) / a[-1] - 4.0) < 0.4
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(3, 0)


def test_request_and_result():
    with pytest.raises(ValueError, match="empty prompt"):
        Request(0, (), 3)
    with pytest.raises(ValueError, match="arrival_s"):
        Request(0, (1,), 3, arrival_s=-1.0)
    r = RequestResult(0, [1, 2, 3], arrival_s=1.0, first_token_s=1.5, finish_s=2.5)
    assert r.ttft_s == 0.5 and r.tpot_s == 0.5
    assert math.isnan(RequestResult(0, [1], 0.0, 1.0, 1.0).tpot_s)


class _FakeClock:
    """Each call moves on by 1 s, so every timed forward pass takes 1 s."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1.0
        return self.t


@pytest.mark.parametrize("policy", ["continuous", "static"])
def test_serve_gives_every_request_its_alone_reply(policy):
    model, prompts = _model(), _prompts((3, 7, 5, 1, 4))
    arrivals = poisson_arrivals(5, rate=2.0, seed=0)
    reqs = [Request(i, tuple(p), 2 + i % 3, a) for i, (p, a) in enumerate(zip(prompts, arrivals))]
    cache = PagedKVCache.for_model(model, n_blocks=6, block_size=4)
    results = serve(model, reqs, policy, max_batch=2, cache=cache, timer=_FakeClock())
    for q, r in zip(reqs, results):
        assert r.rid == q.rid and r.tokens == _alone(model, list(q.prompt), q.max_new_tokens)
        assert r.first_token_s >= q.arrival_s and r.finish_s >= r.first_token_s
    assert cache.used_blocks == 0


def test_continuous_admits_while_static_waits():
    model, prompts = _model(), _prompts((3, 3))
    reqs = [Request(0, tuple(prompts[0]), 6, 0.0), Request(1, tuple(prompts[1]), 1, 1.5)]
    cont = serve(model, reqs, "continuous", timer=_FakeClock())
    stat = serve(model, reqs, "static", timer=_FakeClock())
    assert cont[1].first_token_s == 3.0  # after the first prefill and one decode step
    assert stat[1].first_token_s == stat[0].finish_s + 1 == 7.0  # after request 0 is done
    assert cont[1].tokens == stat[1].tokens and len(cont[1].tokens) == 1


def test_serve_eos_and_errors():
    model, prompts = _model(), _prompts((3,))
    ref = _alone(model, prompts[0], 5)
    res = serve(model, [Request(0, tuple(prompts[0]), 5)], eos_token_id=ref[1], timer=_FakeClock())
    assert res[0].tokens == ref[:ref.index(ref[1]) + 1]
    req = Request(0, tuple(prompts[0]), 5)
    with pytest.raises(ValueError, match="policy"):
        serve(model, [req], policy="fifo")
    with pytest.raises(ValueError, match="distinct rids"):
        serve(model, [req, req])
    with pytest.raises(ValueError, match="make it larger"):
        serve(model, [req], cache=PagedKVCache.for_model(model, 1, 2))


def _random_adapters(model, k: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    apply_lora(model, ["wq", "wv"], rank=4, alpha=8)
    names = lora_state_dict(model)
    unload_lora(model)
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(t.shape, generator=g) * 0.3 for n, t in names.items()} for _ in range(k)]


def test_multi_lora_batch_equals_each_adapter_alone():
    model, prompts = _model(), _prompts((3, 7, 5, 4))
    adapters = _random_adapters(model, 3)
    choice = [0, 2, -1, 1]
    alone = []
    for p, a in zip(prompts, choice):
        if a >= 0:
            apply_lora(model, ["wq", "wv"], rank=4, alpha=8)
            set_adapter_weights(model, adapters[a])
        alone.append(_alone(model, p, 6))
        if a >= 0:
            unload_lora(model)
    names = attach_multi_lora(model, adapters, scaling=8 / 4)
    assert len(names) == 4
    set_adapter_ids(model, choice)
    assert padded_generate(model, prompts, 6) == alone
    assert len({tuple(x) for x in alone}) > 1  # the adapters do change the replies
    detach_multi_lora(model)
    assert not any(isinstance(m, MultiLoRALinear) for m in model.modules())


def test_multi_lora_errors():
    model = _model()
    base = model.layers[0].attn.wq
    with pytest.raises(TypeError, match="nn.Linear"):
        MultiLoRALinear(model.layers[0].attn_norm, torch.zeros(1, 2, 48), torch.zeros(1, 48, 2), 1.0)
    with pytest.raises(ValueError, match=r"\(K, r, in\)"):
        MultiLoRALinear(base, torch.zeros(2, 48), torch.zeros(1, 48, 2), 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        MultiLoRALinear(base, torch.zeros(1, 2, 40), torch.zeros(1, 48, 2), 1.0)
    layer = MultiLoRALinear(base, torch.zeros(2, 2, 48), torch.zeros(2, 48, 2), 1.0)
    with pytest.raises(RuntimeError, match="set_adapter_ids"):
        layer(torch.zeros(1, 1, 48))
    layer.adapter_ids = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="one id per row"):
        layer(torch.zeros(1, 1, 48))
    with pytest.raises(ValueError, match="no MultiLoRALinear"):
        set_adapter_ids(model, [0])
    with pytest.raises(ValueError, match="empty"):
        attach_multi_lora(model, [], 1.0)
    with pytest.raises(ValueError, match="lora_A"):
        attach_multi_lora(model, [{"x": torch.zeros(1)}], 1.0)
    adapters = _random_adapters(model, 2)
    with pytest.raises(ValueError, match="same layers"):
        attach_multi_lora(model, [adapters[0], {k: v for k, v in list(adapters[1].items())[2:]}], 1.0)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        attach_multi_lora(model, [{"layers.0.attn_norm.lora_A": torch.zeros(1),
                                   "layers.0.attn_norm.lora_B": torch.zeros(1)}], 1.0)
    attach_multi_lora(model, adapters, 1.0)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        set_adapter_ids(model, [2])


def test_static_batch_is_formed_from_the_requests_waiting_at_that_moment():
    model, prompts = _model(), _prompts((3, 3))
    reqs = [Request(0, tuple(prompts[0]), 3, 0.0), Request(1, tuple(prompts[1]), 2, 0.5)]
    cont = serve(model, reqs, "continuous", timer=_FakeClock())
    stat = serve(model, reqs, "static", timer=_FakeClock())
    assert cont[1].first_token_s == 2.0  # arrived during request 0's prefill, joined right after it
    assert stat[0].finish_s == 3.0 and stat[1].first_token_s == 4.0  # waited for the next batch
