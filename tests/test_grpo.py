"""Tests for utils.grpo: advantages, the k3 KL, the clipped surrogate and the four loss aggregations
against hand computations, then against trl 1.16.0's GRPOTrainer (and RLOOTrainer) on identical
inputs, and group sampling with a tiny Llama."""
import math

import pytest
import torch

from utils.grpo import (LOSS_TYPES, Group, aggregate_loss, clipped_surrogate, group_advantages, grpo_loss,
                        k3_kl, sample_group, sample_groups)
from utils.llama import Llama, LlamaConfig
from utils.ppo import clipped_policy_loss


def batch(B=6, T=5, seed=0, spread=0.4, dtype=torch.float64):
    """Policy, old and reference log-probabilities (B, T), a right-padded mask with lengths 1..T, and
    one advantage per completion; ``spread`` moves old away from the policy so that clipping happens."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    old = logp + spread * torch.randn(B, T, generator=g, dtype=dtype)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    lengths = torch.tensor([1 + i % T for i in range(B)])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    adv = torch.randn(B, generator=g, dtype=dtype)
    return logp, old, ref, mask, adv


# --- advantages --------------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 5.0, 3.0])
    g1, g2 = r[:4], r[4:]
    s1, s2 = g1.std(), g2.std()  # Bessel's correction, as TRL
    expected = torch.cat([(g1 - 0.5) / (s1 + 1e-4), (g2 - 3.0) / (s2 + 1e-4)])
    torch.testing.assert_close(group_advantages(r, 4), expected)
    torch.testing.assert_close(group_advantages(r, 4, scale="none"), torch.cat([g1 - 0.5, g2 - 3.0]))
    torch.testing.assert_close(group_advantages(r, 4, scale="batch", eps=0.0),
                               torch.cat([g1 - 0.5, g2 - 3.0]) / r.std())


def test_leave_one_out_is_mean_baseline_times_g_over_g_minus_1():
    r = torch.tensor([1.0, 0.0, 4.0, 2.0, 7.0, 1.0])
    loo = group_advantages(r, 3, baseline="leave_one_out", scale="none")
    assert loo[0].item() == pytest.approx(1.0 - (0.0 + 4.0) / 2)
    torch.testing.assert_close(loo, 3 / 2 * group_advantages(r, 3, scale="none"))
    scaled = group_advantages(r, 3, baseline="leave_one_out", scale="group", eps=0.0)
    torch.testing.assert_close(scaled, loo / r.view(2, 3).std(1).repeat_interleave(3))


def test_group_with_equal_rewards_gets_zero_advantage_and_ints_are_accepted():
    adv = group_advantages(torch.tensor([1, 1, 1, 0, 1, 0]), 3)
    torch.testing.assert_close(adv[:3], torch.zeros(3))
    assert adv.dtype == torch.float32 and adv[3:].abs().sum() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(group_size=1), "group_size"),
    (dict(group_size=4), "do not split"),
    (dict(baseline="median"), "baseline"),
    (dict(scale="max"), "scale"),
    (dict(eps=-1.0), "eps"),
    (dict(rewards=torch.zeros(2, 3)), "1-D"),
    (dict(rewards=torch.tensor([1.0, float("nan"), 0.0])), "finite"),
])
def test_group_advantages_errors(kwargs, match):
    args = dict(rewards=torch.zeros(6), group_size=3) | kwargs
    with pytest.raises(ValueError, match=match):
        group_advantages(**args)


# --- k3 and the surrogate ------------------------------------------------------------------------------

def test_k3_is_nonnegative_zero_at_agreement_and_unbiased_for_kl():
    logp, _, ref, _, _ = batch()
    k3 = k3_kl(logp, ref)
    assert (k3 >= 0).all()
    torch.testing.assert_close(k3_kl(logp, logp), torch.zeros_like(logp))
    # its expectation under pi_theta is KL(pi_theta || pi_ref), exactly: sum over a whole vocabulary
    g = torch.Generator().manual_seed(1)
    p = torch.randn(1, 7, generator=g, dtype=torch.float64).log_softmax(-1)
    q = torch.randn(1, 7, generator=g, dtype=torch.float64).log_softmax(-1)
    kl = (p.exp() * (p - q)).sum()
    torch.testing.assert_close((p.exp() * k3_kl(p, q)).sum(), kl)


def test_clipped_surrogate_by_hand_with_clip_higher():
    old = torch.zeros(1, 4, dtype=torch.float64)
    logp = torch.log(torch.tensor([[0.5, 1.1, 1.5, 1.5]], dtype=torch.float64))  # ratios
    A = torch.tensor([[-1.0, 1.0, 1.0, -1.0]], dtype=torch.float64)
    out = clipped_surrogate(logp, old, A, epsilon=0.2, epsilon_high=0.3)
    # rho=0.5, A<0: clip at 0.8 gives -0.8 > -0.5 ... min(-0.5, -0.8) = -0.8 -> loss 0.8
    # rho=1.1 inside; rho=1.5, A>0: clipped to 1.3; rho=1.5, A<0: unclipped -1.5 is the min
    torch.testing.assert_close(out, torch.tensor([[0.8, -1.1, -1.3, 1.5]], dtype=torch.float64))
    with pytest.raises(ValueError, match="epsilon must be < 1"):
        clipped_surrogate(logp, old, A, epsilon=1.0)
    with pytest.raises(ValueError, match="epsilon_high"):
        clipped_surrogate(logp, old, A, epsilon_high=0.0)
    with pytest.raises(ValueError, match="one per completion"):
        clipped_surrogate(logp, old, torch.zeros(3))
    with pytest.raises(TypeError, match="advantages"):
        clipped_surrogate(logp, old, [1.0])


# --- aggregation -------------------------------------------------------------------------------------

def test_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    torch.testing.assert_close(aggregate_loss(loss, mask, "grpo"), torch.tensor((2.0 + 4.0) / 2))
    torch.testing.assert_close(aggregate_loss(loss, mask, "bnpo"), torch.tensor(10.0 / 4))
    torch.testing.assert_close(aggregate_loss(loss, mask, "dapo"), torch.tensor(10.0 / 4))
    torch.testing.assert_close(aggregate_loss(loss, mask, "dapo", num_tokens=8), torch.tensor(10.0 / 8))
    torch.testing.assert_close(aggregate_loss(loss, mask, "dr_grpo"), torch.tensor(10.0 / 6))
    torch.testing.assert_close(aggregate_loss(loss, mask, "dr_grpo", max_completion_length=5),
                               torch.tensor(10.0 / 10))
    # an empty completion adds 0 and still counts in grpo's batch mean (as in TRL)
    empty = torch.tensor([[1, 1, 1], [0, 0, 0]])
    torch.testing.assert_close(aggregate_loss(loss, empty, "grpo"), torch.tensor(2.0 / 2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_type="sum"), "loss_type"),
    (dict(loss_type="dr_grpo", max_completion_length=2), "max_completion_length is 2"),
    (dict(loss_type="dr_grpo", max_completion_length=0), "positive int"),
    (dict(loss_type="dapo", num_tokens=3), "at least"),
    (dict(mask=torch.ones(2, 4)), "shapes differ"),
    (dict(mask=torch.ones(6)), "non-empty"),
])
def test_aggregate_errors(kwargs, match):
    args = dict(per_token_loss=torch.zeros(2, 3), mask=torch.ones(2, 3)) | kwargs
    with pytest.raises(ValueError, match=match):
        aggregate_loss(**args)
    with pytest.raises(TypeError, match="torch.Tensor"):
        aggregate_loss([[0.0]], torch.ones(1, 1))


# --- grpo_loss -----------------------------------------------------------------------------------------

def test_grpo_loss_bnpo_without_kl_is_ppo_clipped_loss():
    logp, old, _, mask, adv = batch()
    ours = grpo_loss(logp, adv, mask, old, loss_type="bnpo", epsilon=0.2)
    ppo, ppo_clip = clipped_policy_loss(logp, old, adv[:, None].expand_as(logp), mask, clip=0.2)
    torch.testing.assert_close(ours.loss, ppo)
    torch.testing.assert_close(ours.clip_fraction, ppo_clip, check_dtype=False)
    assert 0 < ours.clip_fraction < 1 and ours.kl is None


def test_grpo_loss_with_kl_and_default_old():
    logp, _, ref, mask, adv = batch()
    logp = logp.clone().requires_grad_()
    out = grpo_loss(logp, adv, mask, ref_logprobs=ref, beta=0.1, loss_type="grpo")
    # rho = 1 everywhere: the loss is -A plus the KL term, and no token is clipped
    expected = aggregate_loss(-adv[:, None].expand_as(logp) + 0.1 * k3_kl(logp, ref), mask, "grpo")
    torch.testing.assert_close(out.loss, expected)
    assert out.clip_fraction == 0 and out.kl > 0
    out.loss.backward()  # the gradient of rho = exp(logp - logp.detach()) is not 0
    assert logp.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta=0.1), "pass ref_logprobs"),
    (dict(beta=-1.0), "beta"),
    (dict(beta=True), "beta"),
    (dict(old_logprobs=torch.zeros(6, 4)), "shapes differ"),
    (dict(epsilon=0.0), "epsilon"),
])
def test_grpo_loss_errors(kwargs, match):
    logp, _, _, mask, adv = batch()
    with pytest.raises(ValueError, match=match):
        grpo_loss(logp, adv, mask, **kwargs)


# --- sampling a group ----------------------------------------------------------------------------------

def test_sample_group_masks_after_eos_and_scores_each_completion():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=5, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32))
    seen = []

    def verifier(ids):
        seen.append(ids)
        return float(ids.count(3))

    gen = torch.Generator().manual_seed(0)
    g = sample_group(model, [1, 2], 8, 6, verifier, eos_token_id=4, generator=gen)
    assert isinstance(g, Group) and g.tokens.shape[0] == 8 and g.completions.shape == g.mask.shape
    for row, m, ids, r in zip(g.completions, g.mask, seen, g.rewards):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any() and row[:n].tolist() == ids  # real tokens come first
        assert 4 not in ids[:-1] and (n == g.mask.shape[1] or ids[-1] == 4)  # cut after the first EOS
        assert r == ids.count(3)
    assert model.training  # sample_group restores the mode
    no_eos = sample_group(model, [1], 2, 3, lambda ids: len(ids))
    assert no_eos.mask.all() and no_eos.rewards.tolist() == [3.0, 3.0]
    with pytest.raises(ValueError, match="group_size"):
        sample_group(model, [1], 1, 3, len)
    with pytest.raises(ValueError, match="non-empty prompt"):
        sample_group(model, [], 2, 3, len)



def test_sample_groups_batches_prompts_in_group_layout():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=6, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32))
    prompts = [[1, 2], [3, 1], [2, 2]]
    seen = []

    def verifier(i, ids):
        seen.append(i)
        return float(i) + 10 * len(ids)

    g = sample_groups(model, prompts, 4, 5, verifier, eos_token_id=5,
                      generator=torch.Generator().manual_seed(0))
    assert g.tokens.shape[0] == 12 and g.n_prompt == 2 and g.completions.shape == g.mask.shape
    assert seen == [0] * 4 + [1] * 4 + [2] * 4  # rows i*G .. (i+1)*G-1 are prompt i's group
    for row, p in zip(g.tokens, [p for p in prompts for _ in range(4)]):
        assert row[:2].tolist() == p
    torch.testing.assert_close(g.rewards, torch.tensor(seen, dtype=torch.float) + 10 * g.mask.sum(1))
    # one prompt through sample_group equals sample_groups with that prompt alone
    one = sample_group(model, [1, 2], 4, 5, lambda ids: len(ids), eos_token_id=5,
                       generator=torch.Generator().manual_seed(1))
    same = sample_groups(model, [[1, 2]], 4, 5, lambda i, ids: len(ids), eos_token_id=5,
                         generator=torch.Generator().manual_seed(1))
    assert torch.equal(one.tokens, same.tokens) and torch.equal(one.rewards, same.rewards)
    with pytest.raises(ValueError, match="one length"):
        sample_groups(model, [[1, 2], [3]], 2, 3, verifier)
    with pytest.raises(ValueError, match="at least one prompt"):
        sample_groups(model, [], 2, 3, verifier)
    with pytest.raises(ValueError, match="group_size"):
        sample_groups(model, prompts, 1, 3, verifier)

# --- against TRL -------------------------------------------------------------------------------------
# We build a real (tiny) GRPOTrainer offline rather than calling its methods unbound on a
# SimpleNamespace: its __init__ sets every attribute _compute_loss and _generate_and_score_completions
# read, so a new TRL attribute cannot silently go missing. The model is a random 1-layer Llama and the
# tokenizer a BPE trained in memory (tests/tiny_chatml.py), so nothing is downloaded. For the loss,
# the trainer's model call (_get_per_token_logps_and_entropies) is replaced on the instance by one that
# returns our log-probabilities, so TRL and we see the same numbers.

trl = pytest.importorskip("trl")
pytestmark = [  # transformers 5 warns about its own renamed arguments while TRL builds the trainer
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]
TOL = dict(rtol=1e-12, atol=1e-12)  # float64 in both: only summation order may differ


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_chatml import chatml_tokenizer, tiny_llama
    tok = chatml_tokenizer(["two plus two is four", "the cat sat on the mat"], vocab_size=300)
    return tok, tiny_llama(tok, num_hidden_layers=1), tmp_path_factory.mktemp("grpo")


L_MAX = 6  # the generation limit; the loss tests' completions are 4 wide, so dr_grpo's constant shows


def trl_trainer(tiny, cls="GRPO", G=4, **config):
    from datasets import Dataset
    tok, model, out = tiny
    Config, Trainer = getattr(trl, f"{cls}Config"), getattr(trl, f"{cls}Trainer")
    args = Config(output_dir=str(out), per_device_train_batch_size=G, num_generations=G,
                  max_completion_length=L_MAX, report_to="none", use_cpu=True, save_strategy="no", **config)
    ds = Dataset.from_dict({"prompt": ["a b"], "reward": [0.0]})
    trainer = Trainer(model=model, reward_funcs=lambda completions, reward, **kw: reward, args=args,
                      train_dataset=ds, processing_class=tok)
    trainer.model.train()
    return trainer


REWARDS = [1.0, 0.0, 0.0, 1.0,  2.0, 2.0, 2.0, 2.0,  0.3, -1.2, 4.0, 0.5]  # 3 groups of 4


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl_grpo(tiny, scale):
    trainer = trl_trainer(tiny, beta=0.0, scale_rewards=scale)
    inputs = [{"prompt": f"p{i // 4}", "reward": r} for i, r in enumerate(REWARDS)]
    theirs = trainer._generate_and_score_completions(inputs)["advantages"]
    ours = group_advantages(torch.tensor(REWARDS), 4, scale=scale)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)  # float32 rewards in TRL


def test_leave_one_out_advantages_equal_trl_rloo(tiny):
    trainer = trl_trainer(tiny, cls="RLOO", beta=0.0)  # beta=0: no KL in the rewards
    inputs = [{"prompt": f"p{i // 4}", "reward": r} for i, r in enumerate(REWARDS)]
    theirs = trainer._generate_and_score_completions(inputs)["advantages"]
    ours = group_advantages(torch.tensor(REWARDS), 4, baseline="leave_one_out", scale="none")
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def trl_loss(trainer, logp, old, ref, mask, adv, beta, num_items=None):
    """TRL's loss, its gradient with respect to logp, and its logged KL and clip ratio."""
    logp = logp.clone().requires_grad_()
    trainer._get_per_token_logps_and_entropies = lambda *a, **kw: (logp, torch.zeros_like(logp), None)
    trainer.beta = beta  # set after __init__: with beta > 0 it would load a reference model from the hub
    # set by Trainer's training loop, which we skip
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    B, T = mask.shape
    prompt = torch.ones(B, 2, dtype=torch.long)
    inputs = {"prompt_ids": prompt, "prompt_mask": prompt,
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum() if num_items is None else torch.tensor(num_items)}
    trainer._metrics["train"].clear()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    m = trainer._metrics["train"]
    return loss, logp.grad, m["kl"][-1] if beta else None, m["clip_ratio/region_mean"][-1]


@pytest.mark.parametrize("beta, correction", [(0.0, True), (0.04, True), (0.04, False)])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_equals_trl(tiny, loss_type, beta, correction):
    eps_high = 0.28 if loss_type == "dapo" else None  # DAPO's clip-higher
    trainer = trl_trainer(tiny, loss_type=loss_type, epsilon=0.2, epsilon_high=eps_high,
                          use_bias_correction_kl=correction)
    logp, old, ref, mask, adv = batch(B=8, T=4)
    theirs, their_grad, their_kl, their_clip = trl_loss(trainer, logp, old, ref, mask, adv, beta)

    logp = logp.clone().requires_grad_()
    ours = grpo_loss(logp, adv, mask, old, ref, beta=beta, epsilon=0.2, epsilon_high=eps_high,
                     loss_type=loss_type, max_completion_length=L_MAX, use_bias_correction_kl=correction)
    ours.loss.backward()
    torch.testing.assert_close(ours.loss, theirs, **TOL)
    torch.testing.assert_close(logp.grad, their_grad, **TOL)
    assert 0 < ours.clip_fraction < 1  # clipping is active on some tokens, not all
    # TRL logs its metrics in float32 (the clip ratio) or as Python floats
    assert math.isclose(ours.clip_fraction.item(), their_clip, rel_tol=1e-6)
    if beta:
        assert math.isclose(ours.kl.item(), their_kl, rel_tol=1e-6)


def test_dapo_micro_batch_equals_trl_with_gradient_accumulation(tiny):
    # a generation batch of 2 x 8 completions split into two micro-batches: TRL divides each
    # micro-batch's token sum by all 16 completions' token count; we pass that count as num_tokens
    trainer = trl_trainer(tiny, loss_type="dapo", gradient_accumulation_steps=2, beta=0.0)
    assert trainer.args.steps_per_generation == 2
    logp, old, ref, mask, adv = batch(B=8, T=4)
    total = 2 * int(mask.sum()) + 3
    theirs = trl_loss(trainer, logp, old, ref, mask, adv, 0.0, num_items=total)[0]
    ours = grpo_loss(logp, adv, mask, old, loss_type="dapo", num_tokens=total).loss
    torch.testing.assert_close(ours, theirs, **TOL)
