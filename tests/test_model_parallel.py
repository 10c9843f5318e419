"""utils.model_parallel: tensor-, pipeline- and expert-parallel layers equal the dense ones.

Most tests run in this process on a one-rank gloo group (every collective is then the identity,
and every line of the layers and workers runs, so coverage sees it); the two-rank tests use
``utils.distributed.launch`` and compare with the dense layers computed here.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from utils.ddp import ring_allreduce_formula
from utils.distributed import launch
from utils.llama import Block, Llama, LlamaConfig
from utils.model_parallel import (ColumnParallelLinear, CommLog, ExpertParallelMoE, LlamaStage,
                                  RowParallelLinear, TensorParallelAttention, TensorParallelBlock,
                                  bubble_fraction, copy_to_tp, ep_bytes_per_layer,
                                  expert_owner, expert_parallel_worker, gather_from_tp,
                                  idle_fractions, peak_in_flight, pipeline_worker,
                                  pp_bytes_per_boundary, reduce_from_tp, shard_range, split_llama,
                                  tensor_parallel_worker, tp_bytes_per_layer)
from utils.moe import MoE
from utils.positions import rope_cos_sin
from utils.pretrain import next_token_loss

CFG = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  tie_embeddings=False)


def _block(seed: int = 0) -> Block:
    torch.manual_seed(seed)
    block = Block(CFG)
    for p in block.parameters():
        nn.init.normal_(p, std=0.1)
    return block


def _near(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding: 1e-5 of the largest entry (sums run in another order)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5,
                               atol=1e-5 * expected.abs().max().item())


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in module.named_parameters()}


# --------------------------------------------------------------------------- pure functions


def test_shard_range_and_errors():
    assert shard_range(12, 1, 3) == slice(4, 8)
    with pytest.raises(ValueError, match="not divisible by the tensor-parallel degree"):
        shard_range(10, 0, 3, "out_features")
    with pytest.raises(ValueError, match="rank must lie in 0..1"):
        shard_range(10, 2, 2)


def test_comm_log_counts_and_bytes():
    log = CommLog()
    log.add("all_reduce", "forward", torch.zeros(2, 3))
    log.add("all_reduce", "backward", torch.zeros(4, dtype=torch.float64))
    log.add("all_gather", "forward", torch.zeros(1))
    assert log.count() == 3 and log.count("all_reduce") == 2 and log.count(phase="forward") == 2
    assert log.bytes("all_reduce") == 24 + 32 and log.bytes("all_gather", "forward") == 4
    log.clear()
    assert log.count() == 0


def test_bubble_fraction_and_idle_fractions():
    assert bubble_fraction(2, 1) == 0.5 and bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(1, 8) == 0
    with pytest.raises(ValueError):
        bubble_fraction(2, 0)
    # Two stages, two microbatches, unit forward and backward: GPipe's textbook timeline
    stage0 = [("forward", 0, 0, 1), ("forward", 1, 1, 2), ("backward", 1, 4, 5),
              ("backward", 0, 5, 6)]
    stage1 = [("forward", 0, 1, 2), ("forward", 1, 2, 3), ("backward", 1, 3, 4),
              ("backward", 0, 4, 5)]
    idle = idle_fractions([stage0, stage1])
    assert idle == pytest.approx([2 / 6, 2 / 6])
    assert idle[0] == pytest.approx(bubble_fraction(2, 2))
    assert peak_in_flight(stage0) == 2
    assert peak_in_flight([("forward", 0, 0, 1), ("backward", 0, 1, 2),
                           ("forward", 1, 2, 3), ("backward", 1, 3, 4)]) == 1
    with pytest.raises(ValueError, match="at least one recorded"):
        idle_fractions([stage0, []])
    with pytest.raises(ValueError, match="span no time"):
        idle_fractions([[("forward", 0, 1, 1)]])
    with pytest.raises(ValueError, match="event kinds"):
        peak_in_flight([("recv", 0, 0, 1)])


def test_communication_arithmetic():
    assert ring_allreduce_formula(800, 8) == 2 * 7 / 8 * 800
    assert ring_allreduce_formula(800, 1) == 0
    with pytest.raises(ValueError, match=">= 0"):
        ring_allreduce_formula(-1, 2)
    tp = tp_bytes_per_layer(8192, 4096, 8)
    assert tp["all_reduces"] == 4 and tp["bytes_per_all_reduce"] == 4096 * 8192 * 2
    assert tp["sent_per_rank"] == 4 * 2 * 7 / 8 * 4096 * 8192 * 2
    assert tp_bytes_per_layer(16, 4, 2, training=False)["all_reduces"] == 2
    assert pp_bytes_per_boundary(16, 4) == 2 * 16 * 4 * 2
    assert pp_bytes_per_boundary(16, 4, 4, training=False) == 16 * 4 * 4
    assert ep_bytes_per_layer(16, 4, 2, 4, training=False) == 2 * 4 * 2 * 0.75 * 16 * 2
    assert ep_bytes_per_layer(16, 4, 2, 1) == 0
    with pytest.raises(ValueError):
        tp_bytes_per_layer(0, 1, 1)


def test_expert_owner():
    assert expert_owner(torch.tensor([0, 1, 2, 3, 7]), 8, 4).tolist() == [0, 0, 1, 1, 3]
    with pytest.raises(ValueError, match="n_experts"):
        expert_owner(torch.tensor([0]), 6, 4)


def test_split_llama_equals_the_whole_model():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                              d_ff=64, tie_embeddings=False))
    idx = torch.randint(0, 64, (2, 7))
    stages = split_llama(model, 2)
    assert [(s.first, s.last) for s in stages] == [(0, 2), (2, 3)]
    assert stages[0].lm_head is None and stages[1].tok_emb is None
    x = idx
    for stage in stages:
        x = stage(x)
    torch.testing.assert_close(x, model(idx), rtol=0, atol=0)
    assert split_llama(model, 1)[0](idx).shape == (2, 7, 64)
    with pytest.raises(ValueError, match="cannot cut 3 layers into 4"):
        split_llama(model, 4)
    with pytest.raises(ValueError, match="first < last"):
        LlamaStage(model, 2, 2)
    tied = Llama(LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                             d_ff=64))
    with pytest.raises(ValueError, match="tie_embeddings=False"):
        split_llama(tied, 2)


def test_next_token_loss_is_mean_cross_entropy():
    logits, targets = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    expected = nn.functional.cross_entropy(logits.reshape(6, 5), targets.reshape(6))
    torch.testing.assert_close(next_token_loss(logits, targets), expected)


# --------------------------------------------------------------------------- one rank, in process


def test_primitives_on_one_rank(one_rank_group):
    x = torch.randn(3, 4, requires_grad=True)
    log = CommLog()
    y = reduce_from_tp(copy_to_tp(x, log=log), log=log)
    z = gather_from_tp(y, log=log)
    z.sum().backward()
    torch.testing.assert_close(z, x)
    torch.testing.assert_close(x.grad, torch.ones(3, 4))
    assert [e[:2] for e in log.events] == [("all_reduce", "forward"), ("all_gather", "forward"),
                                          ("all_reduce", "backward")]


def test_linear_layers_on_one_rank_equal_dense(one_rank_group):
    dense = nn.Linear(6, 4)
    x = torch.randn(2, 6)
    for layer in (ColumnParallelLinear(dense, 0, 1, gather_output=True),
                  RowParallelLinear(dense, 0, 1), RowParallelLinear(dense, 0, 1, False)):
        torch.testing.assert_close(layer(x), dense(x))
    with pytest.raises(ValueError, match="input_is_parallel=False"):
        RowParallelLinear(dense, 0, 1)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="replicated input needs"):
        RowParallelLinear(dense, 0, 1, input_is_parallel=False)(torch.randn(2, 5))


def test_block_on_one_rank_equals_dense(one_rank_group):
    block = _block()
    log = CommLog()
    tp = TensorParallelBlock(block, 0, 1, log=log)
    x = torch.randn(2, 5, CFG.d_model)
    cos, sin = rope_cos_sin(torch.arange(5), CFG.head_dim, CFG.rope_theta)
    torch.testing.assert_close(tp(x, cos, sin), block(x, cos, sin))
    assert log.count("all_reduce", "forward") == 2


def test_attention_refuses_uneven_heads():
    smol = LlamaConfig(vocab_size=64, d_model=72, n_layers=1, n_heads=9, n_kv_heads=3, d_ff=64)
    with pytest.raises(ValueError, match="cannot be split evenly over 2 ranks"):
        TensorParallelAttention(Block(smol).attn, 0, 2)


def test_workers_run_on_one_rank(one_rank_group):
    block, dense = _block(), nn.Linear(8, 6)
    x_block, x_lin = torch.randn(1, 4, CFG.d_model), torch.randn(1, 4, 8)
    out = tensor_parallel_worker(0, 1, CFG, block.state_dict(), dense.state_dict(), x_block, x_lin)
    torch.testing.assert_close(out["col_y"], dense(x_lin))
    torch.testing.assert_close(out["dt_block_y"], out["block_y"])
    assert len(out["block_log"]) == 4

    torch.manual_seed(0)
    model = Llama(CFG)
    idx, targets = torch.randint(0, 64, (2, 6)), torch.randint(0, 64, (2, 6))
    out = pipeline_worker(0, 1, CFG, model.state_dict(), idx, targets, [1, 2], repeats=2)
    torch.testing.assert_close(out["check"]["GPipe"]["eval_logits"], model(idx))
    # alternating rounds: every setting once per round, round 1 starting one setting later
    order = [(t["repeat"], t["schedule"], t["m"]) for t in out["timings"]]
    settings = [("GPipe", 1), ("1F1B", 1), ("GPipe", 2), ("1F1B", 2)]
    assert order == [(0, *s) for s in settings] + [(1, *s) for s in settings[1:] + settings[:1]]
    assert all(t["events"] for t in out["timings"])

    moe = MoE(CFG, 4, 2)
    x = torch.randn(2, 3, CFG.d_model)
    out = expert_parallel_worker(0, 1, CFG, 4, 2, moe.state_dict(), [x])
    torch.testing.assert_close(out["y"], moe(x))
    assert out["experts"] == [0, 1, 2, 3]


# --------------------------------------------------------------------------- two ranks


def test_two_rank_block_and_moe_equal_dense():
    block = _block(1)
    dense = nn.Linear(8, 6)
    x_block, x_lin = torch.randn(2, 5, CFG.d_model), torch.randn(2, 5, 8)
    outs = launch(tensor_parallel_worker, 2, CFG, block.state_dict(), dense.state_dict(),
                  x_block, x_lin, timeout_s=240)
    cos, sin = rope_cos_sin(torch.arange(5), CFG.head_dim, CFG.rope_theta)
    x = x_block.clone().requires_grad_(True)
    y = block(x, cos, sin)
    (y * y).sum().backward()
    grads = _grads(block)
    for rank, out in enumerate(outs):
        _near(out["block_y"], y.detach())
        _near(out["block_dx"], x.grad)
        _near(out["dt_block_y"], out["block_y"])
        wq_rows = shard_range(CFG.d_model, rank, 2)
        _near(out["block_grads"]["attn.wq.weight"], grads["attn.wq.weight"][wq_rows])
        _near(out["block_grads"]["mlp.w_down.weight"],
              grads["mlp.w_down.weight"][:, shard_range(CFG.d_ff, rank, 2)])
        assert [e[:2] for e in out["block_log"]].count(("all_reduce", "forward")) == 2

    moe = MoE(CFG, 4, 2)
    xs = [torch.randn(2, 3, CFG.d_model), torch.randn(2, 3, CFG.d_model)]
    outs = launch(expert_parallel_worker, 2, CFG, 4, 2, moe.state_dict(), xs, timeout_s=240)
    x = torch.cat(xs)
    _near(torch.cat([o["y"] for o in outs]), moe(x).detach())
    assert [o["experts"] for o in outs] == [[0, 1], [2, 3]]


def test_expert_parallel_moe_keeps_its_experts_only(one_rank_group):
    moe = MoE(CFG, 4, 2)
    layer = ExpertParallelMoE(copy.deepcopy(moe), 0, 1)
    assert len(layer.experts) == 4 and layer.first_expert == 0


def test_two_stage_pipeline_equals_the_whole_model():
    torch.manual_seed(0)
    model = Llama(CFG)
    idx, targets = torch.randint(0, 64, (4, 6)), torch.randint(0, 64, (4, 6))
    outs = launch(pipeline_worker, 2, CFG, model.state_dict(), idx, targets, [2], 1,
                  timeout_s=240)
    logits = model(idx)
    next_token_loss(logits, targets).backward()
    for name in ("GPipe", "1F1B"):
        check = outs[1]["check"][name]
        _near(check["train_logits"], logits.detach())
        _near(torch.stack(check["losses"]).mean(), next_token_loss(logits, targets).detach())
        _near(outs[0]["check"][name]["grads"]["tok_emb.weight"], model.tok_emb.weight.grad)
        _near(check["grads"]["lm_head.weight"], model.lm_head.weight.grad)
    assert outs[0]["check"]["GPipe"]["eval_logits"] is None  # only the last stage has logits
    assert {(t["schedule"], t["m"]) for t in outs[0]["timings"]} == {("GPipe", 2), ("1F1B", 2)}
