"""utils.sharding: ZeRO arithmetic against the paper, FSDP2 shard sizes, and the workers (run in
this process on a one-rank gloo group for coverage, and on two spawned ranks with a crash)."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from utils.distributed import WorkerError, launch
from utils.llama import LlamaConfig
from utils.sharding import (BYTES_PER_PARAM, ZERO_STAGES, RunSpec, batch_at, build_model,
                            checkpoint_dir, checkpoint_worker, full_parameters, latest_checkpoint,
                            load_checkpoint_single, local_numel, padded_numel, read_log,
                            shard_rows, state_bytes, train_single, zero_bytes_per_rank,
                            zero_comm_volume, zero_table, zero_worker)

CFG = LlamaConfig(vocab_size=13, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=24)


def spec(steps: int = 4) -> RunSpec:
    data = torch.arange(400) % CFG.vocab_size
    return RunSpec(CFG, data, steps=steps, batch_size=4, context=8)


# ----------------------------------------------------------------------------- arithmetic


def test_zero_formula_reproduces_the_papers_figure_1():
    # Rajbhandari et al. (2020), Figure 1: 7.5B parameters, 64 devices, K = 12.
    got = [zero_bytes_per_rank(7.5e9, s, 64)["total"] / 1e9 for s in range(4)]
    assert got == pytest.approx([120, 31.4, 16.6, 1.9], abs=0.06)


def test_zero_terms_and_fp32_accounting():
    m = zero_bytes_per_rank(100, 2, 4, precision="fp32")
    assert m == {"parameters": 400, "gradients": 100, "optimizer": 200, "total": 700}
    assert sum(BYTES_PER_PARAM["fp32"].values()) == sum(BYTES_PER_PARAM["mixed"].values()) == 16
    assert ZERO_STAGES[3] == ("optimizer", "gradients", "parameters")
    assert zero_bytes_per_rank(100, 0, 8)["total"] == 1600


@pytest.mark.parametrize("bad", [dict(stage=4), dict(stage=True), dict(precision="fp8"),
                                 dict(world_size=0), dict(n_params=-1)])
def test_zero_bytes_refuses_bad_arguments(bad):
    kwargs = dict(n_params=10, stage=1, world_size=2, precision="mixed") | bad
    with pytest.raises(ValueError):
        zero_bytes_per_rank(**kwargs)


def test_comm_volume_and_table():
    assert [zero_comm_volume(10, s) for s in range(4)] == [20, 20, 20, 30]
    table = zero_table({"7B": 7e9, "70B": 70e9}, [8, 64])
    assert list(table.columns) == ["parameters", "stage 0", "stage 1", "stage 2", "stage 3"]
    assert table.loc[("7B", 8), "stage 0"] == pytest.approx(112)
    assert table.loc[("70B", 8), "stage 3"] == pytest.approx(140)
    with pytest.raises(ValueError, match="at least one"):
        zero_table({}, [8])


def test_shard_rows_follow_torch_chunk():
    for dim0 in (1, 5, 10, 13, 64):
        for n in (1, 2, 3, 4, 8):
            expected = [c.shape[0] for c in torch.arange(dim0).chunk(n)]
            expected += [0] * (n - len(expected))
            assert [shard_rows(dim0, n, r) for r in range(n)] == expected
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        shard_rows(4, 2, 2)


def test_local_and_padded_numel():
    shapes = [(13, 16), (16,), (24, 16)]
    total = 13 * 16 + 16 + 24 * 16
    assert sum(local_numel(shapes, 4, r) for r in range(4)) == total
    assert padded_numel(shapes, 4) == 4 * 16 + 4 + 6 * 16
    assert 0 <= padded_numel(shapes, 4) - total / 4 < 16 + 1 + 16  # < one row per parameter
    with pytest.raises(ValueError, match="non-empty"):
        padded_numel([], 2)
    with pytest.raises(ValueError, match="non-empty"):
        local_numel([()], 2, 0)


# ----------------------------------------------------------------------------- one process


def test_runspec_and_batches():
    s = spec()
    x, y = batch_at(s, 3)
    assert x.shape == (4, 8) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(batch_at(s, 3)[0], x) and not torch.equal(batch_at(s, 4)[0], x)
    halves = [batch_at(s, 3, r, 2)[0] for r in range(2)]
    assert torch.equal(torch.cat(halves), x)
    with pytest.raises(ValueError, match="not divisible"):
        batch_at(s, 0, 0, 3)
    for bad in [dict(steps=0), dict(lr=0.0), dict(weight_decay=-1.0), dict(data=torch.ones(2, 2)),
                dict(data=torch.arange(5))]:
        with pytest.raises(ValueError):
            RunSpec(**(dict(cfg=CFG, data=torch.arange(400) % 13, context=8) | bad))


def test_train_single_memory_is_zero_stage_0():
    s = spec()
    out = train_single(s)
    n = sum(p.numel() for p in out["model"].parameters())
    assert len(out["losses"]) == 4 and out["losses"][-1] < out["losses"][0]
    mem = out["memory"]
    assert mem["parameters"] == mem["parameters_unpadded"] == mem["gradients"] == 4 * n
    assert mem["optimizer"] == 8 * n
    assert mem["step_counters"] == 4 * len(list(out["model"].parameters()))
    # Continuing a run equals running it through.
    first = train_single(s, stop=2)
    rest = train_single(s, start=2, model=first["model"], optimizer=first["optimizer"])
    assert first["losses"] + rest["losses"] == out["losses"]
    with pytest.raises(ValueError, match="start < stop"):
        train_single(s, start=4)
    with pytest.raises(ValueError, match="both model and optimizer"):
        train_single(s, model=first["model"])


def test_checkpoint_helpers(tmp_path):
    assert checkpoint_dir(tmp_path, 8).name == "step_0008"
    assert latest_checkpoint(tmp_path) is None
    for step in (4, 8):
        checkpoint_dir(tmp_path, step).mkdir()
    (checkpoint_dir(tmp_path, 4) / ".metadata").write_text("")
    assert latest_checkpoint(tmp_path) == (4, checkpoint_dir(tmp_path, 4))  # 8 is incomplete
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": l}) + "\n"
                           for s, l in [(0, 3.0), (1, 2.0), (1, 2.5)]))
    assert read_log(log) == {0: 3.0, 1: 2.5}
    with pytest.raises(FileNotFoundError, match="no training log"):
        read_log(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="not a complete dcp checkpoint"):
        load_checkpoint_single(spec(), checkpoint_dir(tmp_path, 8))


# ----------------------------------------------------------------------------- workers, one rank


def test_workers_on_one_rank_equal_the_single_process(one_rank_group, tmp_path):
    s = spec()
    ref = train_single(s)
    out = zero_worker(0, 1, s, 3)
    for stage in ("zero1", "fsdp"):
        assert out[stage]["losses"] == pytest.approx(ref["losses"], abs=1e-6)
        for name, p in ref["parameters"].items():
            torch.testing.assert_close(out[stage]["parameters"][name], p, atol=1e-6, rtol=0)
    n = sum(p.numel() for p in build_model(s).parameters())
    assert out["zero1"]["partition_numel"] == n
    assert out["fsdp"]["memory"]["parameters"] == 4 * padded_numel(out["fsdp"]["shapes"], 1)
    # While it computes, a rank holds the root unit (embedding, final norm) and one block whole.
    model = build_model(s)
    root = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("layers."))
    block = sum(p.numel() for p in model.layers[0].parameters())
    assert out["fsdp"]["working_peak"]["parameters"] == 4 * (root + block)
    peak = out["fsdp"]["working_peak"]
    assert 4 * block <= peak["gradients"] <= 4 * (root + block)
    assert max(peak["parameters"], peak["gradients"]) <= peak["both"] <= 8 * (root + block)
    assert len(out["fsdp"]["timing"]["fsdp"]) == len(out["fsdp"]["timing"]["single"]) == 3
    assert "timing" not in zero_worker(0, 1, spec(steps=1))["fsdp"]
    with pytest.raises(ValueError, match="timing_rounds"):
        zero_worker(0, 1, s, -1)

    log = tmp_path / "log.jsonl"
    run = checkpoint_worker(0, 1, s, str(tmp_path), 2, None, None, kill_at=3, kill_rank=1,
                            log_path=str(log))  # kill_rank 1 does not exist: no crash
    assert run["start"] == 0 and run["loaded"] is None
    assert sorted(read_log(log)) == [0, 1, 2, 3]
    step, path = latest_checkpoint(tmp_path)
    assert step == 4
    resumed = checkpoint_worker(0, 1, s, None, None, str(checkpoint_dir(tmp_path, 2)))
    assert resumed["start"] == 2 and resumed["losses"] == run["losses"][2:]
    for name, p in run["parameters"].items():
        assert torch.equal(resumed["parameters"][name], p)
    with pytest.raises(ValueError, match="step_XXXX"):
        checkpoint_worker(0, 1, s, resume_from=str(tmp_path))

    model, optimizer, step = load_checkpoint_single(s, checkpoint_dir(tmp_path, 2))
    assert step == 2
    for name, p in full_parameters(model).items():
        assert torch.equal(p, resumed["loaded"][name])
    cont = train_single(s, start=2, model=model, optimizer=optimizer)
    assert cont["losses"] == pytest.approx(run["losses"][2:], abs=1e-6)


# ----------------------------------------------------------------------------- two ranks, a crash


def test_crash_then_resume_on_two_ranks(tmp_path):
    s = spec(steps=6)
    log = tmp_path / "crash.jsonl"
    with pytest.raises(WorkerError, match="rank 1 of 2 died") as info:
        launch(checkpoint_worker, 2, s, str(tmp_path), 2, None, None, 5, 1, str(log),
               backend="gloo", timeout_s=240)
    assert info.value.exitcode == -signal.SIGKILL
    assert sorted(read_log(log)) == [0, 1, 2, 3, 4]
    step, path = latest_checkpoint(tmp_path)
    assert step == 4
    out = launch(checkpoint_worker, 2, s, None, None, str(path), backend="gloo", timeout_s=240)
    assert out[0]["start"] == 4 and len(out[0]["losses"]) == 2
    assert out[0]["losses"] == out[1]["losses"]
    assert out[0]["losses"][0] == read_log(log)[4]  # same ranks, same data: bit for bit
    assert os.path.exists(path / ".metadata")


def test_mixed_precision_policy_keeps_fp32_shards(one_rank_group):
    """The chapter's GPU section: with bf16 compute, the shards stay fp32 (16 bytes/param)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    s = spec(steps=1)
    model = build_model(s)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mesh = init_device_mesh("cpu", (1,))
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = batch_at(s, 0)
    logits = model(x)
    assert logits.dtype == torch.bfloat16  # computed in bf16
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
    opt.step()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    mem = state_bytes(model, opt)
    assert mem["parameters"] + mem["gradients"] + mem["optimizer"] == 16 * n


def test_workers_refuse_a_gpu_group(monkeypatch):
    import utils.sharding as sharding

    monkeypatch.setattr(sharding.dist, "get_backend", lambda *a, **k: "nccl")
    with pytest.raises(RuntimeError, match="backend='gloo'"):
        sharding.zero_worker(0, 1, spec(steps=1))
