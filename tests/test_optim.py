"""Tests for utils.optim: GaLore (projector, optimizer, equal to galore_torch when installed), the 8-bit
Adam state (levels, round trips, closeness to torch's AdamW), memory formulas and every error path."""
import warnings

import pytest
import torch

from utils.optim import (Adam8bit, GaLoreAdamW, GaLoreProjector, adam_state_numbers, dequantize_state,
                         dynamic_levels, optimizer_state_bytes, quantize_state)


def param(shape, seed=0):
    return torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))


def grads(shape, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


# --- GaLoreProjector -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (8, 8)])
def test_projector_shapes_and_round_trip(shape):
    proj = GaLoreProjector(rank=3, update_interval=2, scale=0.5)
    g = grads(shape, 1)[0]
    low = proj.project(g, step=0)
    assert low.shape == ((shape[0], 3) if shape[0] >= shape[1] else (3, shape[1]))
    back = proj.project_back(low)
    assert back.shape == g.shape
    # projecting back a full-rank-r gradient recovers its best rank-r approximation (times scale)
    U, S, Vh = torch.linalg.svd(g, full_matrices=False)
    best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    torch.testing.assert_close(back, 0.5 * best, rtol=1e-4, atol=1e-4)


def test_projector_refreshes_every_interval():
    proj = GaLoreProjector(rank=2, update_interval=3)
    for step, g in enumerate(grads((6, 4), 7)):
        before = None if proj.ortho is None else proj.ortho.clone()
        proj.project(g, step)
        if step % 3 and before is not None:
            assert torch.equal(proj.ortho, before)
    assert proj.refreshes == 3  # steps 0, 3, 6


def test_projector_errors():
    with pytest.raises(ValueError, match="rank"):
        GaLoreProjector(rank=0)
    with pytest.raises(ValueError, match="update_interval"):
        GaLoreProjector(rank=2, update_interval=0)
    with pytest.raises(ValueError, match="scale"):
        GaLoreProjector(rank=2, scale=0)
    with pytest.raises(RuntimeError, match="before project"):
        GaLoreProjector(rank=2).project_back(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="larger than the smaller side"):
        GaLoreProjector(rank=5).project(torch.zeros(4, 8), 0)
    with pytest.raises(ValueError, match="2-D"):
        GaLoreProjector(rank=1).project(torch.zeros(4), 0)


# --- GaLoreAdamW ---------------------------------------------------------------------------------

def test_galore_full_rank_one_step_is_adam_direction():
    """At full rank the projection is orthogonal, so the update is Adam's on the rotated gradient;
    for one step Adam's update is ~sign, so we only check the loss direction and the moments' shapes."""
    p = param((6, 4))
    opt = GaLoreAdamW([p], lr=0.1, rank=4, update_interval=1, scale=1.0)
    w0 = p.detach().clone()
    p.grad = grads((6, 4), 1)[0]
    opt.step()
    assert (p - w0).abs().max() > 0
    assert opt.state[p]["exp_avg"].shape == (6, 4)


def test_galore_plain_group_equals_torch_adamw_without_decay():
    p, q = param((5, 3)), param((5, 3))
    ours = GaLoreAdamW([{"params": [p], "rank": None}], lr=0.01, eps=1e-8)
    ref = torch.optim.AdamW([q], lr=0.01, eps=1e-8, weight_decay=0.0)
    for g in grads((5, 3), 4):
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_galore_closure_weight_decay_and_skips_missing_grads():
    p, unused = param((6, 4)), param((6, 4), seed=3)
    opt = GaLoreAdamW([p, unused], lr=0.01, rank=2, update_interval=2, weight_decay=0.1)
    target = torch.zeros(6, 4)

    def closure():
        opt.zero_grad()
        loss = ((p - target) ** 2).sum()
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(5)]
    assert losses[-1] < losses[0]
    assert unused not in opt.state
    assert opt.state[p]["projector"].refreshes == 3


def test_galore_validation():
    with pytest.raises(ValueError, match="larger than the smaller side"):
        GaLoreAdamW([param((4, 8))], rank=5)
    with pytest.raises(ValueError, match="2-D"):
        GaLoreAdamW([param((4,))], rank=1)
    with pytest.raises(ValueError, match="rank"):
        GaLoreAdamW([param((4, 8))], rank=0)
    with pytest.raises(ValueError, match="update_interval"):
        GaLoreAdamW([param((4, 8))], rank=2, update_interval=0)
    with pytest.raises(ValueError, match="lr"):
        GaLoreAdamW([param((4, 8))], lr=-1.0, rank=2)
    with pytest.raises(ValueError, match="betas"):
        GaLoreAdamW([param((4, 8))], rank=2, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps"):
        GaLoreAdamW([param((4, 8))], rank=2, eps=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        GaLoreAdamW([param((4, 8))], rank=2, weight_decay=-0.1)


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_galore_equals_authors_package(shape):
    galore_torch = pytest.importorskip("galore_torch")
    p, q = param(shape), param(shape)
    ours = GaLoreAdamW([p], lr=0.01, rank=4, update_interval=2, scale=0.25, weight_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = galore_torch.GaLoreAdamW([{"params": [q], "rank": 4, "update_proj_gap": 2, "scale": 0.25,
                                         "proj_type": "std"}], lr=0.01, weight_decay=0.1,
                                       no_deprecation_warning=True)
    for g in grads(shape, 5):
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


# --- 8-bit state ---------------------------------------------------------------------------------

def test_dynamic_levels():
    signed, unsigned = dynamic_levels(True), dynamic_levels(False)
    assert len(signed) == 255 and len(unsigned) == 256
    assert signed[0] == -1 and signed[-1] == 1 and unsigned[0] == 0 and unsigned[-1] == 1
    assert torch.all(signed[1:] > signed[:-1]) and (signed == 0).sum() == 1
    assert len(dynamic_levels(False, bits=4, decades=2)) == 16
    for kwargs, match in (({"bits": 1}, "bits"), ({"bits": 9}, "at most 8"), ({"decades": 0}, "decades")):
        with pytest.raises(ValueError, match=match):
            dynamic_levels(True, **kwargs)


def test_state_round_trip_relative_error_and_padding():
    x = torch.randn(10, 7) * torch.logspace(-3, 0, 7)  # 70 values, not a multiple of the block
    levels = dynamic_levels(True)
    codes, absmax = quantize_state(x, levels, block_size=32)
    assert codes.dtype == torch.uint8 and codes.numel() == 96 and absmax.numel() == 3
    back = dequantize_state(codes, absmax, levels, x.shape)
    assert back.shape == x.shape
    rel = ((back - x).abs() / x.abs()).max()
    assert rel < 0.07  # 7 decades in 126 steps: levels 13.7% apart, rounding errs by < 7%
    with pytest.raises(ValueError, match="block_size"):
        quantize_state(x, levels, block_size=0)


def test_adam8bit_close_to_adamw_and_smaller():
    shape = (64, 40)
    p, q = param(shape), param(shape)
    ours = Adam8bit([p], lr=1e-3, weight_decay=0.01, block_size=128)
    ref = torch.optim.AdamW([q], lr=1e-3, weight_decay=0.01)
    w0 = q.detach().clone()
    g = torch.Generator().manual_seed(2)
    for _ in range(6):
        grad = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 4
        p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    moved = (q - w0).abs().max()
    assert (p - q).abs().max() < 0.15 * moved
    assert optimizer_state_bytes(ours) < 0.3 * optimizer_state_bytes(ref)


def test_adam8bit_closure_skip_and_validation():
    p, unused = param((8, 8)), param((8, 8), seed=4)
    opt = Adam8bit([p, unused], lr=0.05, block_size=16)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(4)]
    assert losses[-1] < losses[0] and unused not in opt.state
    with pytest.raises(ValueError, match="block_size"):
        Adam8bit([param((2, 2))], block_size=0)
    with pytest.raises(ValueError, match="lr"):
        Adam8bit([param((2, 2))], lr="big")


# --- memory --------------------------------------------------------------------------------------

def test_adam_state_numbers_and_measured_bytes():
    assert adam_state_numbers((6, 4)) == 48
    assert adam_state_numbers((6, 4), rank=2) == 2 * 2 * 6 + 2 * 4
    assert adam_state_numbers((4, 6), rank=2) == 2 * 2 * 6 + 2 * 4
    p = param((6, 4))
    opt = GaLoreAdamW([p], rank=2)
    p.grad = torch.ones(6, 4)
    opt.step()
    assert optimizer_state_bytes(opt) == 4 * adam_state_numbers((6, 4), rank=2)
    ref = torch.optim.AdamW([param((6, 4))], foreach=False)
    ref.param_groups[0]["params"][0].grad = torch.ones(6, 4)
    ref.step()
    assert optimizer_state_bytes(ref) == 4 * 48 + 4  # plus the float32 step counter
    with pytest.raises(ValueError, match="shape"):
        adam_state_numbers((6,))
    with pytest.raises(ValueError, match="n must"):
        adam_state_numbers((6, 0))
    with pytest.raises(ValueError, match="larger than"):
        adam_state_numbers((6, 4), rank=5)
