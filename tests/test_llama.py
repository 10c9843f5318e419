import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from utils.llama import (
    Llama,
    LlamaConfig,
    RMSNorm,
    forward_flops_per_token,
    from_hf,
    hf_name_to_ours,
    kv_cache_bytes_per_token,
    parameter_breakdown,
)
from utils.kvcache import generate
from utils.positions import rope_cos_sin, rope_rotate
from utils.measure import count_parameters

TINY = dict(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=80, rope_theta=10_000.0)


def _reference(tie: bool = True):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY, tie_embeddings=tie)
    hf = LlamaForCausalLM(cfg.to_hf()).eval()
    with torch.no_grad():  # random gains, so that a norm applied with the wrong weight would show
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return cfg, hf


@pytest.mark.parametrize("tie", [True, False])
def test_logits_equal_transformers(tie):
    cfg, hf = _reference(tie)
    ours = from_hf(hf)
    assert ours.cfg == cfg
    ids = torch.randint(0, cfg.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    assert count_parameters(ours) == count_parameters(hf) == sum(parameter_breakdown(cfg).values())
    assert (ours.lm_head.weight is ours.tok_emb.weight) == tie


def test_greedy_generation_equals_transformers_and_stops_at_eos():
    cfg, hf = _reference()
    ours = from_hf(hf)
    ids = torch.tensor([[5, 17, 42, 3]])
    theirs = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(generate(ours, ids, 8, use_cache=False), theirs)
    first_new = int(theirs[0, 4])
    stopped = generate(ours, ids, 8, eos_token_id=first_new, use_cache=False)
    assert stopped.shape == (1, 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(ours, ids, 0, use_cache=False)
    with pytest.raises(ValueError, match="without a cache"):
        generate(ours, ids, 2, cache=object(), use_cache=False)


def test_forward_rejects_ids_outside_the_vocabulary_and_float_ids():
    model = Llama(LlamaConfig(**TINY)).eval()
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=97\)"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token ids must be in"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.tensor([[1.0, 2.0]]))


def test_rmsnorm_has_unit_rms_and_keeps_dtype():
    norm = RMSNorm(16, eps=1e-6)
    x = torch.randn(4, 16) * 7
    y = norm(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4), rtol=1e-4, atol=1e-4)
    assert norm(x.bfloat16()).dtype == torch.float32  # float32 gain times bf16 promotes, as in transformers


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(64, generator=g), torch.randn(64, generator=g)

    def score(m: int, n: int) -> torch.Tensor:
        cos, sin = rope_cos_sin(torch.tensor([m, n]), 64, 10_000.0)
        rq, rk = rope_rotate(torch.stack([q, k]), cos, sin)
        return rq @ rk

    torch.testing.assert_close(score(3, 1), score(103, 101), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(score(7, 7), q @ k, rtol=1e-4, atol=1e-4)  # same position: no change
    cos, sin = rope_cos_sin(torch.arange(5), 64, 10_000.0)
    rotated = rope_rotate(q.expand(5, 64), cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm().expand(5))  # a rotation keeps lengths


def test_start_pos_shift_is_invisible_to_full_self_attention():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**TINY)).eval()
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        assert model(ids).shape == (1, 6, 97)
        # RoPE only sees relative positions: shifting every token by 5 leaves self-attention unchanged
        torch.testing.assert_close(model(ids), model(ids, start_pos=5), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="start_pos"):
        model(ids, start_pos=-1)
    with pytest.raises(ValueError, match="shape"):
        model(ids[0])
    with pytest.raises(ValueError, match="shape"):
        model(ids[:, :0])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(d_model=50), "must divide d_model"),
        (dict(n_kv_heads=4), "divisible by n_kv_heads"),
        (dict(n_layers=0), "positive int"),
        (dict(vocab_size=9.5), "positive int"),
        (dict(d_ff=True), "positive int"),
        (dict(d_model=18, n_heads=6, n_kv_heads=2), "must be even"),
        (dict(rope_theta=0.0), "must be positive"),
        (dict(norm_eps=-1.0), "must be positive"),
    ],
)
def test_config_validation(change, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**{**TINY, **change})


def test_config_defaults_are_smollm2_135m():
    cfg = LlamaConfig()
    assert (cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers) == (64, 9, 3, 30)
    assert sum(parameter_breakdown(cfg).values()) == 134_515_008


@pytest.mark.parametrize(
    "change", [dict(hidden_act="gelu"), dict(attention_bias=True), dict(mlp_bias=True), dict(head_dim=16)]
)
def test_from_hf_refuses_unimplemented_settings(change):
    hf_config = LlamaConfig(**TINY).to_hf()
    for key, value in change.items():
        setattr(hf_config, key, value)
    with pytest.raises(ValueError, match="does not implement"):
        LlamaConfig.from_hf(hf_config)


def test_from_hf_refuses_other_rope_types():
    hf_config = LlamaConfig(**TINY).to_hf()
    hf_config.rope_parameters = {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="rope_type"):
        LlamaConfig.from_hf(hf_config)


def test_hf_names_map_to_ours():
    assert hf_name_to_ours("model.layers.3.self_attn.q_proj.weight") == "layers.3.attn.wq.weight"
    assert hf_name_to_ours("model.layers.0.post_attention_layernorm.weight") == "layers.0.mlp_norm.weight"
    assert hf_name_to_ours("model.norm.weight") == "norm.weight"


def test_memory_and_flop_formulas():
    cfg = LlamaConfig(**TINY)
    assert kv_cache_bytes_per_token(cfg, 2) == 2 * 2 * 2 * 8 * 2
    torch.manual_seed(0)
    model = Llama(cfg).eval()
    n = 9
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 97, (1, n)))
    # our attention computes the full n x n score matrix, so every token "attends" to n keys
    assert counter.get_total_flops() == n * forward_flops_per_token(cfg, context=n)
    untied = LlamaConfig(**TINY, tie_embeddings=False)
    assert parameter_breakdown(untied)["output head"] == 97 * 48
