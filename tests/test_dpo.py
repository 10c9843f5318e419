"""Tests for utils.dpo: cached-trunk response log-probabilities (equal to the full model), held-out
preference metrics, and the TRL DPO-loss wrapper (equal to utils.preference's DPO and IPO losses)."""
import pytest
import torch
from transformers import LlamaForCausalLM

from utils.dpo import cached_response_logprobs, preference_metrics, trl_dpo_loss, trl_kto_loss
from utils.finetune import pad_cached, trunk_cache
from utils.chat import IGNORE_INDEX
from utils.preference import dpo_loss, ipo_loss, kto_loss, response_logprobs
from tiny_chatml import tiny_random_llama


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    return tiny_random_llama(num_hidden_layers=3)


def examples() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n, n_prompt in ((7, 3), (5, 2), (9, 4)):
        ids = torch.randint(1, 50, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:],
                    "attention_mask": [1] * n})
    return out


@pytest.mark.parametrize("n_top", [1, 2])
def test_cached_logprobs_equal_full_model(tiny, n_top):
    ex = examples()
    H, Y = pad_cached(trunk_cache(tiny, ex, n_top, pad_token_id=0))
    with torch.no_grad():
        ours, lengths = cached_response_logprobs(tiny, H, Y, n_top)
    for i, e in enumerate(ex):
        full, n = response_logprobs(tiny, torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]]))
        torch.testing.assert_close(ours[i], full[0], rtol=1e-5, atol=1e-5)
        assert lengths[i] == n[0]


def test_cached_logprobs_have_gradients(tiny):
    H, Y = pad_cached(trunk_cache(tiny, examples(), 1, pad_token_id=0))
    layer = tiny.model.layers[-1]
    layer.requires_grad_(True)
    logps, _ = cached_response_logprobs(tiny, H, Y, 1)
    logps.sum().backward()
    assert layer.mlp.down_proj.weight.grad is not None
    layer.zero_grad()


def test_cached_logprobs_errors(tiny):
    H = torch.zeros(2, 4, 32)
    with pytest.raises(ValueError, match="need hidden"):
        cached_response_logprobs(tiny, H, torch.zeros(2, 3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="at least one response token"):
        cached_response_logprobs(tiny, H, torch.full((2, 4), IGNORE_INDEX), 1)


def metrics_inputs():
    return dict(policy_chosen=torch.tensor([-5.0, -6.0]), policy_rejected=torch.tensor([-7.0, -5.0]),
                ref_chosen=torch.tensor([-6.0, -6.0]), ref_rejected=torch.tensor([-6.0, -6.0]),
                chosen_lengths=torch.tensor([2, 3]), rejected_lengths=torch.tensor([4, 1]))


def test_preference_metrics_values():
    m = preference_metrics(**metrics_inputs(), beta=0.5)
    # implicit rewards: chosen 0.5*[1, 0], rejected 0.5*[-1, 1] -> margins [1, -0.5]
    assert m["accuracy"] == 0.5
    assert m["margin"] == pytest.approx(0.25)
    assert m["logratio_per_token"] == pytest.approx((1 + 0 - 1 + 1) / 10)
    assert m["logp_per_token_chosen"] == pytest.approx(-11 / 5)
    assert m["logp_per_token_rejected"] == pytest.approx(-12 / 5)


@pytest.mark.parametrize("change, match", [
    (dict(policy_chosen=torch.tensor([1.0])), "shapes differ"),
    (dict(ref_rejected=torch.zeros(2, 1)), "1-D"),
    (dict(chosen_lengths=torch.tensor([0, 3])), "lengths"),
    (dict(beta=0.0), "beta"),
    (dict(beta=True), "beta"),
])
def test_preference_metrics_errors(change, match):
    kwargs = metrics_inputs() | change
    with pytest.raises(ValueError, match=match):
        preference_metrics(**kwargs)


trl = pytest.importorskip("trl")


def logps(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(n, generator=g, dtype=torch.float64) * 20 for _ in range(4)]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_trl_dpo_loss_equals_ours(beta):
    x = logps()
    torch.testing.assert_close(trl_dpo_loss(*x, beta=beta), dpo_loss(*x, beta=beta).mean())


def test_trl_ipo_loss_equals_ours():
    x = logps(seed=1)
    lc, lr = torch.tensor([3, 4, 5, 6, 7]), torch.tensor([2, 9, 4, 1, 5])
    theirs = trl_dpo_loss(*x, beta=0.2, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)
    ours = ipo_loss(*x, beta=0.2, chosen_lengths=lc.double(), rejected_lengths=lr.double()).mean()
    torch.testing.assert_close(theirs, ours)


def test_trl_dpo_loss_errors():
    x = logps()
    with pytest.raises(ValueError, match="loss_type"):
        trl_dpo_loss(*x, loss_type="hinge")
    with pytest.raises(ValueError, match="four non-empty"):
        trl_dpo_loss(x[0][:3], *x[1:])
    with pytest.raises(ValueError, match="lengths"):
        trl_dpo_loss(*x, chosen_lengths=torch.zeros(5))


@pytest.mark.parametrize("shift", [0.0, 4.0, -4.0])
def test_trl_kto_loss_equals_ours(shift):
    g = torch.Generator().manual_seed(7)
    ref = -torch.rand(6, generator=g) * 20
    pol = ref + torch.randn(6, generator=g) * 3
    desirable = torch.tensor([True, False, True, True, False, False])
    kl_pol, kl_ref = pol.roll(1) + shift, ref.roll(1)  # TRL's mismatched batch for a single prompt
    z = (kl_pol - kl_ref).mean()
    ours = kto_loss(pol, ref, desirable, kl=z, beta=0.3, undesirable_weight=1.5).mean()
    theirs = trl_kto_loss(pol, ref, desirable, kl_pol, kl_ref, beta=0.3, undesirable_weight=1.5)
    torch.testing.assert_close(ours, theirs)


def test_trl_kto_loss_errors():
    t, d = torch.zeros(3), torch.tensor([True, False, True])
    with pytest.raises(ValueError, match="five non-empty"):
        trl_kto_loss(t, t, d, t, torch.zeros(2))
    with pytest.raises(TypeError, match="bool"):
        trl_kto_loss(t, t, torch.ones(3), t, t)
