"""Tests for utils.ppo: GAE against a hand computation, the clipped losses against direct formulas,
argument validation, and a few PPO updates on a toy problem raising the reward."""
import copy

import pytest
import torch

from utils.llama import Llama, LlamaConfig
from utils.ppo import (PPOConfig, Rollout, clipped_policy_loss, clipped_value_loss, gae, kl_rewards,
                       make_rollout, masked_mean, ppo_update, response_logprobs, response_values,
                       rollout_from_samples, sample_responses, sft_loss, value_head_model, whiten)

CFG = LlamaConfig(vocab_size=4, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return Llama(CFG)


# --- GAE ---------------------------------------------------------------------------------------------

def test_gae_matches_hand_computation():
    r = torch.tensor([[1.0, 0.0, 2.0]])
    v = torch.tensor([[0.5, 1.0, 1.5]])
    m = torch.ones(1, 3)
    g, lam = 0.9, 0.8
    d2 = 2.0 - 1.5  # last step: next value is 0
    d1 = 0.0 + g * 1.5 - 1.0
    d0 = 1.0 + g * 1.0 - 0.5
    expected = torch.tensor([[d0 + g * lam * d1 + (g * lam) ** 2 * d2, d1 + g * lam * d2, d2]])
    adv, ret = gae(r, v, m, gamma=g, lam=lam)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + v)


def test_gae_lambda_one_gamma_one_is_monte_carlo_minus_value():
    r = torch.tensor([[0.1, -0.2, 0.3, 1.0]])
    v = torch.tensor([[0.3, 0.1, 0.2, 0.4]])
    adv, ret = gae(r, v, torch.ones(1, 4), gamma=1.0, lam=1.0)
    mc = r.flip(1).cumsum(1).flip(1)  # reward-to-go
    torch.testing.assert_close(ret, mc)
    torch.testing.assert_close(adv, mc - v)


def test_gae_masks_padding_and_ends_episode_at_last_real_token():
    r = torch.tensor([[1.0, 2.0, 99.0]])
    v = torch.tensor([[0.0, 0.0, 50.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[3.0, 2.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[3.0, 2.0, 0.0]]))


def test_gae_rejects_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        gae(x, x, x, gamma=1.5)
    with pytest.raises(ValueError, match="shapes differ"):
        gae(x, torch.zeros(2, 4), x)
    with pytest.raises(ValueError, match="non-empty"):
        gae(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="non-empty"):
        gae(torch.zeros(3), torch.zeros(3), torch.zeros(3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        gae([[1.0]], x, x)


# --- rewards -----------------------------------------------------------------------------------------

def test_kl_rewards_penalise_every_token_and_add_score_at_the_end():
    lp = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-2.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scores = torch.tensor([2.0, -1.0])
    out = kl_rewards(scores, lp, ref, mask, beta=0.5)
    expected = -0.5 * (lp - ref) * mask
    expected[0, 2] += 2.0
    expected[1, 1] += -1.0
    torch.testing.assert_close(out, expected)


def test_kl_rewards_reject_bad_input():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    for beta in (0, -0.1, True, "1"):
        with pytest.raises(ValueError, match="beta"):
            kl_rewards(torch.zeros(2), x, x, m, beta)
    with pytest.raises(ValueError, match="one score per response"):
        kl_rewards(torch.zeros(3), x, x, m, 0.1)
    with pytest.raises(ValueError, match="at least one real token"):
        kl_rewards(torch.zeros(2), x, x, torch.tensor([[1.0, 1, 1], [0, 0, 0]]), 0.1)
    with pytest.raises(ValueError, match="shapes differ"):
        kl_rewards(torch.zeros(2), x, torch.zeros(2, 2), m, 0.1)
    with pytest.raises(ValueError, match="prefix"):  # a hole: the score would land on padding
        kl_rewards(torch.zeros(2), x, x, torch.tensor([[1.0, 0, 1], [1, 1, 1]]), 0.1)


# --- losses ------------------------------------------------------------------------------------------

def test_clipped_policy_loss_equals_direct_formula():
    torch.manual_seed(0)
    old = torch.randn(3, 5)
    new = old + 0.5 * torch.randn(3, 5)
    adv = torch.randn(3, 5)
    mask = torch.ones(3, 5)
    mask[2, 3:] = 0
    eps = 0.2
    loss, frac = clipped_policy_loss(new, old, adv, mask, clip=eps)
    terms, clipped_count = [], 0
    for i in range(3):
        for t in range(5):
            if mask[i, t]:
                rho = float(torch.exp(new[i, t] - old[i, t]))
                a = float(adv[i, t])
                c = min(max(rho, 1 - eps), 1 + eps)
                terms.append(min(rho * a, c * a))
                clipped_count += c * a < rho * a
    torch.testing.assert_close(loss, torch.tensor(-sum(terms) / len(terms)))
    torch.testing.assert_close(frac, torch.tensor(clipped_count / len(terms)))


def test_clipped_policy_loss_has_no_gradient_beyond_the_clip():
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.5, -0.5]], requires_grad=True)  # ratios e^0.5 and e^-0.5: both outside 1 +- 0.2
    adv = torch.tensor([[1.0, -1.0]])  # improving further in both: clipped
    loss, frac = clipped_policy_loss(new, old, adv, torch.ones(1, 2), clip=0.2)
    loss.backward()
    assert frac.item() == 1.0
    torch.testing.assert_close(new.grad, torch.zeros(1, 2))


def test_clipped_value_loss_equals_direct_formula():
    v = torch.tensor([[1.0, 0.0, 2.0]])
    old = torch.tensor([[0.0, 0.0, 1.9]])
    ret = torch.tensor([[2.0, 1.0, 2.0]])
    loss = clipped_value_loss(v, old, ret, torch.ones(1, 3), clip=0.5)
    # position 0: unclipped (1-2)^2 = 1, clipped 0.5 -> (0.5-2)^2 = 2.25 -> max 2.25
    # position 1: both (0-1)^2 = 1; position 2: unclipped 0, clipped 2.0 -> 0 -> 0
    torch.testing.assert_close(loss, torch.tensor(0.5 * (2.25 + 1.0 + 0.0) / 3))


def test_losses_reject_bad_clip_and_shapes():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    for clip in (0, -0.2):
        with pytest.raises(ValueError, match="clip"):
            clipped_policy_loss(x, x, x, m, clip)
        with pytest.raises(ValueError, match="clip"):
            clipped_value_loss(x, x, x, m, clip)
    with pytest.raises(ValueError, match="shapes differ"):
        clipped_policy_loss(x, torch.zeros(3, 2), x, m)
    with pytest.raises(ValueError, match="no position"):
        clipped_policy_loss(x, x, x, torch.zeros(2, 3))


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 5.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    torch.testing.assert_close(masked_mean(x, m), torch.tensor(3.0))
    w = whiten(x, m)
    assert w[1, 1] == 0
    torch.testing.assert_close(masked_mean(w, m), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(masked_mean(w ** 2, m), torch.tensor(1.0), atol=1e-5, rtol=0)


# --- config ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"beta": 0}, "beta"), ({"beta": -1.0}, "beta"), ({"clip": 0}, "clip"),
    ({"value_clip": -0.1}, "value_clip"), ({"gamma": 1.1}, "gamma"), ({"lam": -0.1}, "lam"),
    ({"epochs": 0}, "epochs"), ({"minibatches": 1.5}, "minibatches"), ({"vf_coef": -1}, "vf_coef"),
    ({"temperature": 0}, "temperature"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**kwargs)


# --- models ------------------------------------------------------------------------------------------

def test_response_logprobs_and_values_shapes_and_checks():
    model = tiny_llama()
    tokens = torch.tensor([[0, 1, 2, 3], [0, 3, 3, 1]])
    lp = response_logprobs(model, tokens, 2)
    assert lp.shape == (2, 2) and (lp < 0).all()
    logits = model(tokens)[:, 1:3].log_softmax(-1)
    torch.testing.assert_close(lp[0, 0], logits[0, 0, 2])
    torch.testing.assert_close(sft_loss(model, tokens, 2), -lp.mean())
    value = value_head_model(model)
    torch.testing.assert_close(response_values(value, tokens, 1), torch.zeros(2, 3))
    for fn in (response_logprobs, response_values):
        with pytest.raises(ValueError, match="n_prompt"):
            fn(model, tokens, 4)
        with pytest.raises(ValueError, match="n_prompt"):
            fn(model, tokens, 0)
    with pytest.raises(TypeError, match="Llama"):
        value_head_model(torch.nn.Linear(2, 2))


def test_sample_responses_is_seeded_and_checks_input():
    model = tiny_llama()
    a = sample_responses(model, [0, 1], 3, 5, generator=torch.Generator().manual_seed(1))
    b = sample_responses(model, [0, 1], 3, 5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 7) and torch.equal(a, b) and model.training
    with pytest.raises(ValueError, match="non-empty prompt"):
        sample_responses(model, [], 3, 5)
    with pytest.raises(ValueError, match="n must be"):
        sample_responses(model, [0], 0, 5)
    with pytest.raises(ValueError, match="temperature"):
        sample_responses(model, [0], 2, 5, temperature=0)


# --- PPO on a toy problem -----------------------------------------------------------------------------

def count_reward(response: torch.Tensor) -> torch.Tensor:
    """Toy reward: the share of response tokens equal to 3."""
    return (response == 3).float().mean(1)


def test_ppo_updates_raise_the_reward_on_a_toy_problem():
    policy = tiny_llama(0)
    ref = copy.deepcopy(policy).requires_grad_(False)
    value = value_head_model(policy)
    cfg = PPOConfig(beta=0.01, epochs=2, minibatches=2)
    opt = torch.optim.Adam([*policy.parameters(), *value.parameters()], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = make_rollout(policy, ref, value, count_reward, [0], 32, 8, cfg, g)
    assert isinstance(first, Rollout) and first.kl.abs().max() < 1e-4  # policy == reference
    for _ in range(12):
        rollout = make_rollout(policy, ref, value, count_reward, [0], 32, 8, cfg, g)
        stats = ppo_update(policy, value, opt, rollout, cfg, g)
    assert set(stats) == {"policy_loss", "value_loss", "clip_fraction"}
    last = make_rollout(policy, ref, value, count_reward, [0], 64, 8, cfg, g)
    assert last.scores.mean() > first.scores.mean() + 0.2
    assert last.kl.mean() > 0  # moved away from the reference


def test_ppo_update_rejects_too_few_rollouts():
    policy = tiny_llama()
    value = value_head_model(policy)
    cfg = PPOConfig(minibatches=4)
    rollout = make_rollout(policy, copy.deepcopy(policy), value, count_reward, [0], 2, 3, cfg)
    opt = torch.optim.Adam(policy.parameters())
    with pytest.raises(ValueError, match="minibatches"):
        ppo_update(policy, value, opt, rollout, cfg)


# --- rollouts sampled elsewhere, cut at an end-of-sequence token ------------------------------------

ROLLOUT_FIELDS = ("tokens", "mask", "logprobs", "ref_logprobs", "values", "scores", "rewards",
                  "advantages", "returns")


def test_rollout_from_samples_equals_make_rollout_without_a_mask():
    policy, ref = tiny_llama(0), tiny_llama(1)
    value = value_head_model(policy)
    with torch.no_grad():
        value.lm_head.weight.normal_(generator=torch.Generator().manual_seed(2))
    cfg = PPOConfig(beta=0.1)
    full = make_rollout(policy, ref, value, count_reward, [0, 1], 6, 5, cfg,
                        torch.Generator().manual_seed(0))
    again = rollout_from_samples(policy, ref, value, full.tokens, 2, full.scores, cfg)
    for name in ROLLOUT_FIELDS:
        torch.testing.assert_close(getattr(again, name), getattr(full, name), rtol=0, atol=0)


def test_rollout_from_samples_puts_the_score_at_the_last_real_token_and_ignores_padding():
    policy, ref = tiny_llama(0), tiny_llama(1)
    value = value_head_model(policy)
    with torch.no_grad():
        value.lm_head.weight.normal_(generator=torch.Generator().manual_seed(2))
    cfg = PPOConfig(beta=0.1)
    tokens = torch.randint(0, 4, (5, 7), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([5, 1, 3, 2, 4])  # real response tokens per row (T = 5)
    mask = (torch.arange(5)[None, :] < lengths[:, None]).float()
    scores = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0])
    ro = rollout_from_samples(policy, ref, value, tokens, 2, scores, cfg, mask)
    pad = mask == 0
    for name in ("rewards", "advantages", "returns"):
        assert (getattr(ro, name)[pad] == 0).all(), name
    rows, last = torch.arange(5), lengths - 1
    kl = -cfg.beta * (ro.logprobs - ro.ref_logprobs)
    torch.testing.assert_close(ro.rewards[rows, last], scores + kl[rows, last])
    # what the padding holds cannot change anything at the real tokens (the models are causal)
    other = tokens.clone()
    other[:, 2:][pad] = (other[:, 2:][pad] + 1) % 4
    ro2 = rollout_from_samples(policy, ref, value, other, 2, scores, cfg, mask)
    for name in ("logprobs", "values", "rewards", "advantages", "returns"):
        torch.testing.assert_close(getattr(ro2, name)[~pad], getattr(ro, name)[~pad])
    # and PPO updates on it run, on every real token only
    opt = torch.optim.Adam([*policy.parameters(), *value.parameters()], lr=1e-3)
    stats = ppo_update(policy, value, opt, ro, PPOConfig(minibatches=1, epochs=1))
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())


def test_rollout_from_samples_rejects_bad_masks_and_shapes():
    policy = tiny_llama()
    value = value_head_model(policy)
    tokens = torch.zeros(2, 5, dtype=torch.long)
    scores, cfg = torch.zeros(2), PPOConfig()
    with pytest.raises(ValueError, match="mask must be"):
        rollout_from_samples(policy, policy, value, tokens, 2, scores, cfg, torch.ones(2, 4))
    with pytest.raises(ValueError, match="prefix"):
        rollout_from_samples(policy, policy, value, tokens, 2, scores, cfg,
                             torch.tensor([[1.0, 0, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match="prefix"):
        rollout_from_samples(policy, policy, value, tokens, 2, scores, cfg, torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="at least one real token"):
        rollout_from_samples(policy, policy, value, tokens, 2, scores, cfg,
                             torch.tensor([[0.0, 0, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="n_prompt"):
        rollout_from_samples(policy, policy, value, tokens, 5, scores, cfg)
    with pytest.raises(ValueError, match="one score per response"):
        rollout_from_samples(policy, policy, value, tokens, 2, torch.zeros(3), cfg)
