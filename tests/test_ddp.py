"""utils.ddp: ring arithmetic in-process; the collectives and DDP workers on real gloo groups."""
from __future__ import annotations

import math

import pytest
import torch

from utils.ddp import (CommCounter, accumulated_gradients, allreduce_seconds, batch_gradients,
                       chunk_sizes, collectives_worker, ddp_worker, make_model,
                       naive_allreduce_elements, ring_all_reduce, ring_allreduce_elements,
                       ring_allreduce_formula, ring_schedule, sequence_worker, shard, timing_worker,
                       train_steps)
from utils.distributed import launch
from utils.llama import LlamaConfig
from utils.pretrain import lm_loss as loss_fn

TINY = LlamaConfig(vocab_size=31, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   rope_theta=10_000.0)


def _batch(rows: int = 8, context: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(0, TINY.vocab_size, (rows, context + 1),
                         generator=torch.Generator().manual_seed(seed))
    return data[:, :-1], data[:, 1:]


def _simulate_ring(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run ring_schedule on p in-process copies: every send lands in the next rank's chunk."""
    p = len(xs)
    bufs = [x.clone() for x in xs]
    chunks = [list(b.tensor_split(p)) for b in bufs]
    for step in range(2 * (p - 1)):
        moves = [ring_schedule(r, p)[step] for r in range(p)]
        sent = [chunks[r][moves[r][2]].clone() for r in range(p)]
        for r in range(p):
            phase, _, _, recv = moves[r]
            incoming = sent[(r - 1) % p]
            assert moves[(r - 1) % p][2] == recv, "the previous rank must send what we receive"
            if phase == "reduce-scatter":
                chunks[r][recv].add_(incoming)
            else:
                chunks[r][recv].copy_(incoming)
    return bufs


@pytest.mark.parametrize("p", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("n", [0, 1, 5, 12, 13])
def test_schedule_sums_everything(p, n):
    xs = [torch.randint(-9, 9, (n,), generator=torch.Generator().manual_seed(r)).float()
          for r in range(p)]
    total = torch.stack(xs).sum(0) if n else torch.zeros(0)
    for out in _simulate_ring(xs):
        assert torch.equal(out, total)


def test_schedule_shape_and_errors():
    steps = ring_schedule(1, 4)
    assert len(steps) == 6 and [s[0] for s in steps] == ["reduce-scatter"] * 3 + ["all-gather"] * 3
    assert steps[2][3] == 1  # the last reduce-scatter step completes chunk `rank`
    assert steps[3][2] == 1  # and the all-gather starts by sending it
    with pytest.raises(ValueError, match="rank must be in"):
        ring_schedule(4, 4)
    with pytest.raises(ValueError):
        ring_schedule(0, 0)


def test_chunk_sizes_follow_tensor_split():
    for n, p in [(10, 3), (3, 5), (12, 4), (0, 2)]:
        assert chunk_sizes(n, p) == [len(c) for c in torch.arange(n).tensor_split(p)]
    with pytest.raises(ValueError):
        chunk_sizes(-1, 2)


def test_bytes_formula_and_exact_counts():
    for p in [1, 2, 4, 8]:
        assert ring_allreduce_elements(64, p) == [ring_allreduce_formula(64, p)] * p
    uneven = ring_allreduce_elements(10, 4)
    assert all(abs(e - ring_allreduce_formula(10, 4)) <= 2 * 3 for e in uneven)
    assert ring_allreduce_formula(1e6, 1024) < 2e6
    assert naive_allreduce_elements(5, 4) == [15, 5, 5, 5]
    with pytest.raises(ValueError, match="n must be >= 0"):
        ring_allreduce_formula(-1, 2)


def test_alpha_beta_model():
    assert allreduce_seconds(1e9, 1, 1e9, 1e-5) == 0
    assert math.isclose(allreduce_seconds(1e9, 4, 1e9), 2 * 3 / 4)
    assert math.isclose(allreduce_seconds(0, 8, 1e9, 1e-5), 14e-5)
    with pytest.raises(ValueError):
        allreduce_seconds(-1, 2, 1e9)
    with pytest.raises(ValueError):
        allreduce_seconds(1, 2, 0)


def test_counter_and_no_process_group():
    c = CommCounter()
    c.add(torch.zeros(3), torch.zeros(2, dtype=torch.float64))
    assert (c.bytes_sent, c.bytes_received, c.messages) == (12, 16, 1)
    with pytest.raises(RuntimeError, match="no process group"):
        ring_all_reduce(torch.zeros(4))


def test_references_in_one_process():
    x, y = _batch()
    a, b = make_model(TINY, seed=3), make_model(TINY, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    full = batch_gradients(a, x, y)
    acc = accumulated_gradients(b, x, y, 4)
    assert full.keys() == acc.keys()
    for name in full:
        torch.testing.assert_close(acc[name], full[name], rtol=1e-5, atol=1e-7)
    before = loss_fn(make_model(TINY, seed=3), x, y).item()
    params = train_steps(a, x, y, steps=3, lr=1e-2)
    assert loss_fn(a, x, y).item() < before and set(params) == set(full)
    with pytest.raises(ValueError, match="equal micro-batches"):
        accumulated_gradients(b, x, y, 3)


def test_shard():
    x = torch.arange(12).view(6, 2)
    assert torch.equal(torch.cat([shard(x, r, 3) for r in range(3)]), x)
    with pytest.raises(ValueError, match="equal shards"):
        shard(x, 0, 4)
    with pytest.raises(ValueError, match="rank must be in"):
        shard(x, 3, 3)


def _close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol)


def test_workers_on_two_ranks():
    """One launch: the collectives, DDP's equivalences and the timing worker (smoke)."""
    x, y = _batch(rows=8)
    jobs = [(collectives_worker, (101, 0, 4096, 2)),
            (ddp_worker, (TINY, x, y, 2, 1e-3, 2, 0)),
            (timing_worker, (TINY, x, y, (0.01, None), 1, 1, 0))]
    out = launch(sequence_worker, 2, jobs, timeout_s=240)
    full = batch_gradients(make_model(TINY), x, y)
    params = train_steps(make_model(TINY), x, y, steps=2, lr=1e-3)
    for rank, (coll, ddp, timing) in enumerate(out):
        for key in ["allreduce_int", "allreduce_normal", "reduce_scatter", "all_gather"]:
            ours, ref = coll[key]
            assert torch.equal(ours, ref), key  # two ranks: a + b == b + a exactly
        assert coll["allreduce_int_bytes"] == 4 * ring_allreduce_elements(101, 2)[rank]
        assert set(coll["times"]) == {"ring (ours)", "naive (ours)", "dist.all_reduce"}
        _close(ddp["ddp_grads"], full, rtol=1e-5, atol=1e-7)
        _close(ddp["accum_grads"], full, rtol=1e-5, atol=1e-7)
        _close(ddp["ddp_params"], params, rtol=1e-5, atol=1e-6)
        _close(ddp["scratch_grads"], ddp["ddp_grads"], rtol=0, atol=0)
        _close(ddp["scratch_params"], ddp["ddp_params"], rtol=0, atol=0)
        settings = {"no communication", 0.01, None}
        for key in ["times", "last_grad", "exposed", "early", "timelines"]:
            assert set(timing[key]) == settings, key
        assert all(len(timing[key][s]) == 1 for key in ["times", "exposed"] for s in settings)
        assert len(timing["timelines"][0.01]["bucket_start"]) > 1
        assert timing["early"]["no communication"] == [0]  # no_sync: no bucket is all-reduced
        assert timing["early"][0.01][0] > 0  # small buckets start before backward is done
        assert timing["grad_bytes"] == 4 * sum(p.numel() for p in make_model(TINY).parameters())


def test_collectives_on_three_ranks():
    """Uneven chunks (n = 10 on 3 ranks) and sums whose order matters."""
    out = launch(collectives_worker, 3, 10, 7, timeout_s=240)
    for rank, res in enumerate(out):
        ours, ref = res["allreduce_int"]
        assert torch.equal(ours, ref)
        ours, ref = res["allreduce_normal"]
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        for key in ["reduce_scatter", "all_gather"]:
            assert torch.equal(*res[key])
        assert res["allreduce_int_bytes"] == 4 * ring_allreduce_elements(10, 3)[rank]
        assert res["naive_bytes"] == 4 * naive_allreduce_elements(10, 3)[rank]


def test_workers_in_this_process(one_rank_group):
    x, y = _batch(rows=4)
    coll = collectives_worker(0, 1, 9, 0, 64, 1)
    assert all(torch.equal(*coll[k]) for k in ["allreduce_normal", "reduce_scatter", "all_gather"])
    assert coll["allreduce_normal_bytes"] == 0 and coll["naive_bytes"] == 0
    [ddp] = sequence_worker(0, 1, [(ddp_worker, (TINY, x, y, 1, 1e-3, 2, 0))])
    _close(ddp["ddp_grads"], batch_gradients(make_model(TINY), x, y), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="equal micro-batches"):
        ddp_worker(0, 1, TINY, x, y, 1, 1e-3, 3, 0)
    with pytest.raises(ValueError, match="contiguous"):
        ring_all_reduce(torch.zeros(4, 3).t())
    timing = timing_worker(0, 1, TINY, x, y, (0.01, 1000.0), 2, 1, 0)
    assert all(len(v) == 2 for key in ["times", "exposed"] for v in timing[key].values())
    timeline = timing["timelines"][0.01]
    assert len(timeline["bucket_start"]) == len(timeline["bucket_end"]) > 1
    assert len(timeline["grad_ready"]) == len(list(make_model(TINY).parameters()))
    assert timeline["backward_returned"] >= max(timeline["bucket_end"])
    assert timeline["last_grad"] == max(timeline["grad_ready"])
    assert timeline["exposed"] == timeline["backward_returned"] - timeline["last_grad"] >= 0
    one = timing["timelines"][1000.0]
    assert len(one["bucket_start"]) == 1 and timing["early"][1000.0] == [0, 0]
    assert timing["timelines"]["no communication"]["bucket_start"] == []
