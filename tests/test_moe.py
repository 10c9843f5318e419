"""Tests for utils.moe: routing, the sparse MoE layer against dense references and transformers'
Mixtral block, the balancing and z losses, upcycling, and the parameter arithmetic."""
import copy

import pytest
import torch
import torch.nn.functional as F

from utils.llama import MLP, Llama, LlamaConfig
from utils.moe import (MoE, expert_load, gqa_attention_params, load_balancing_loss,
                       mla_attention_params, moe_parameter_counts, route, router_z_loss, upcycle)

CFG = LlamaConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=24)


def dense_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """All experts on all tokens, weighted by a (tokens, experts) gate matrix that is 0 off the top-k."""
    flat = x.reshape(-1, x.shape[-1])
    _, gates, experts = route(moe.router(flat), moe.top_k, moe.renormalize)
    gate_matrix = torch.zeros(flat.shape[0], moe.n_experts).scatter(1, experts, gates)
    outs = torch.stack([expert(flat) for expert in moe.experts], dim=1)  # (T, E, d)
    return (gate_matrix[..., None] * outs).sum(1).reshape(x.shape)


def test_route_gates_and_experts():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    probs, gates, experts = route(logits, top_k=2)
    torch.testing.assert_close(probs, logits.softmax(-1))
    assert experts[0].tolist() == [1, 2] and experts[1, 0] == 0  # row 1 has a tie for second
    torch.testing.assert_close(gates.sum(-1), torch.ones(2))
    _, raw, _ = route(logits, top_k=2, renormalize=False)
    torch.testing.assert_close(raw, probs.gather(1, experts))


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_equals_dense_reference(top_k, renormalize):
    torch.manual_seed(0)
    moe = MoE(CFG, n_experts=4, top_k=top_k, d_ff_expert=8, renormalize=renormalize)
    x = torch.randn(3, 5, CFG.d_model)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense_reference(moe, x), rtol=1e-5, atol=1e-6)
    assert moe.last_router_logits.shape == (15, 4) and moe.last_experts.shape == (15, top_k)


def test_unused_expert_is_skipped():
    torch.manual_seed(0)
    moe = MoE(CFG, n_experts=3, top_k=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] = 0  # all logits equal: topk picks expert 0 for every token
    x = torch.randn(4, CFG.d_model)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), moe.experts[0](x))
    assert set(moe.last_experts.flatten().tolist()) == {0}


def test_all_experts_equal_gives_the_mlp():
    torch.manual_seed(0)
    mlp = MLP(CFG)
    moe = upcycle(mlp, CFG, n_experts=4, top_k=2, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 7, CFG.d_model)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), mlp(x), rtol=1e-5, atol=1e-6)
    assert moe.experts[0] is not moe.experts[1]  # copies, free to diverge
    assert moe.experts[0].w_gate.weight.data_ptr() != mlp.w_gate.weight.data_ptr()


def test_moe_in_llama_trains():
    torch.manual_seed(0)
    model = Llama(CFG)
    for block in model.layers:
        block.mlp = MoE(CFG, n_experts=4, top_k=2, d_ff_expert=12)
    idx = torch.randint(CFG.vocab_size, (2, 6))
    loss = F.cross_entropy(model(idx).reshape(-1, CFG.vocab_size), idx.reshape(-1))
    aux = sum(load_balancing_loss(b.mlp.last_router_logits, 2) for b in model.layers)
    (loss + 0.01 * aux).backward()
    assert model.layers[0].mlp.router.weight.grad.abs().sum() > 0


def test_matches_transformers_mixtral_block():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    moe = MoE(CFG, n_experts=4, top_k=2, d_ff_expert=8)
    hf_cfg = transformers.MixtralConfig(hidden_size=CFG.d_model, intermediate_size=8,
                                        num_local_experts=4, num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        for e, expert in enumerate(moe.experts):
            block.experts.gate_up_proj[e].copy_(torch.cat([expert.w_gate.weight, expert.w_up.weight]))
            block.experts.down_proj[e].copy_(expert.w_down.weight)
        x = torch.randn(2, 5, CFG.d_model)
        torch.testing.assert_close(moe(x), block(x), rtol=1e-5, atol=1e-6)


def test_balancing_loss_matches_transformers_and_bounds():
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    layers = [torch.randn(20, 4), torch.randn(20, 4)]
    ours = load_balancing_loss(torch.cat(layers), top_k=2)
    torch.testing.assert_close(ours, load_balancing_loss_func(tuple(layers), 4, 2))
    uniform = torch.zeros(8, 4)  # equal probabilities; topk ties still pick the same experts
    collapsed = torch.tensor([[9.0, 9.0, 0.0, 0.0]]).repeat(8, 1)
    assert load_balancing_loss(collapsed, 2) > 1.9
    assert load_balancing_loss(uniform, 2).item() == pytest.approx(2.0)


def test_router_z_loss():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected = ((torch.log(torch.tensor(2.0))) ** 2 + (1 + torch.log(torch.tensor(2.0))) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), expected)
    with pytest.raises(ValueError, match="tokens, n_experts"):
        router_z_loss(torch.zeros(3))


def test_expert_load():
    load = expert_load(torch.tensor([[0, 1], [0, 2]]), n_experts=4)
    torch.testing.assert_close(load, torch.tensor([0.5, 0.25, 0.25, 0.0]))
    with pytest.raises(ValueError, match="at least one"):
        expert_load(torch.zeros(0, 2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="0..3"):
        expert_load(torch.tensor([[4]]), 4)


@pytest.mark.parametrize("n_experts, top_k, message", [
    (4, 5, "cannot exceed"), (4, 0, "top_k"), (0, 1, "n_experts"), (4, 1.5, "top_k"), (True, 1, "n_experts"),
])
def test_bad_expert_settings(n_experts, top_k, message):
    with pytest.raises(ValueError, match=message):
        MoE(CFG, n_experts=n_experts, top_k=top_k)


def test_route_bad_inputs():
    with pytest.raises(ValueError, match="tokens, n_experts"):
        route(torch.zeros(2, 3, 4), top_k=1)
    with pytest.raises(ValueError, match="cannot exceed"):
        route(torch.zeros(2, 3), top_k=4)


def test_attention_parameter_formulas():
    cfg = LlamaConfig()  # SmolLM2-135M: the Llama chapter's breakdown is the reference
    from utils.llama import parameter_breakdown

    per_layer = parameter_breakdown(cfg)["attention"] // cfg.n_layers
    assert gqa_attention_params(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == per_layer
    # MLA with tiny numbers, written out by hand
    q_part, kv_part, out_part = 4 * 3 + 3 + 3 * 2 * 2, 4 * 3 + 2 + 2 * 2 * 2, 2 * 4
    assert mla_attention_params(4, 2, 3, 2, 1, 1, 1) == q_part + kv_part + out_part


def test_moe_parameter_counts_small_model():
    """The formula agrees with counting the parameters of a real MoE Llama."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=11, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=20)
    model = Llama(cfg)
    for block in list(model.layers)[1:]:
        block.mlp = MoE(cfg, n_experts=4, top_k=2, d_ff_expert=6)
    counts = moe_parameter_counts(vocab_size=11, d_model=16, n_layers=3,
                                  attention_params=gqa_attention_params(16, 2, 1, 8),
                                  n_experts=4, top_k=2, d_ff_expert=6, n_dense_layers=1,
                                  d_ff_dense=20, tie_embeddings=True)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] - counts["active"] == 2 * 2 * 3 * 16 * 6  # 2 layers x 2 idle experts
    untied = moe_parameter_counts(vocab_size=11, d_model=16, n_layers=3, attention_params=0,
                                  n_experts=4, top_k=4, d_ff_expert=6, n_shared_experts=1)
    assert untied["total"] == untied["active"]


@pytest.mark.parametrize("kwargs, message", [
    ({"vocab_size": 0}, "vocab_size"), ({"n_dense_layers": 5}, "n_dense_layers"),
    ({"attention_params": -1}, ">= 0"), ({"top_k": 9}, "cannot exceed"),
])
def test_moe_parameter_counts_bad_inputs(kwargs, message):
    base = dict(vocab_size=10, d_model=4, n_layers=2, attention_params=1, n_experts=8, top_k=2,
                d_ff_expert=3)
    with pytest.raises(ValueError, match=message):
        moe_parameter_counts(**{**base, **kwargs})


def test_upcycle_router_and_copy_independence():
    torch.manual_seed(0)
    mlp = MLP(CFG)
    moe = upcycle(mlp, CFG, n_experts=2, top_k=1, router_std=0.5)
    assert 0.2 < moe.router.weight.std().item() < 1.0
    before = copy.deepcopy(mlp.w_up.weight)
    with torch.no_grad():
        moe.experts[0].w_up.weight.add_(1.0)
    torch.testing.assert_close(mlp.w_up.weight, before)
