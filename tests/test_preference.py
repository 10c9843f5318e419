"""Tests for utils.preference: pair building, the pairwise losses (checked against TRL's own code on the
same log-probabilities where TRL is installed), and the log-probability / reward helpers."""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from utils.chat import IGNORE_INDEX
from utils.preference import (PROMPTS, bradley_terry_loss, build_pairs, dpo_loss, ipo_loss, kto_loss,
                              last_token_rewards, orpo_loss, pairwise_accuracy, preferred, prefix_trunk_cache,
                              response_logprobs, simpo_loss, split_snippets, validate_pairs)
from tiny_chatml import tiny_random_llama

ROWS = [{"id": str(i), "score": s, "text": f"snippet {i}"}
        for i, s in enumerate([-3.0, -2.5, -1.0, -0.2, 0.0, 0.5, 1.2, 2.0, 2.8, 3.5])]


def logps(n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (2, n), generator=g)
    out = {k: -torch.rand(n, generator=g, dtype=torch.float64) * 3 * lengths[i % 2]
           for i, k in enumerate(["pc", "pr", "rc", "rr"])}
    out["lc"], out["lr"] = lengths[0].double(), lengths[1].double()
    return out


# --- pairs -----------------------------------------------------------------------------------------

def test_split_is_disjoint_deterministic_and_by_text():
    rows = ROWS + [{"id": "dup", "score": 3.5, "text": "snippet 9"}]  # same text as id 9
    train, test = split_snippets(rows, test_fraction=0.3, seed=1)
    assert {r["text"] for r in train}.isdisjoint({r["text"] for r in test})
    assert len(train) + len(test) == len(rows)
    again = split_snippets(rows, test_fraction=0.3, seed=1)
    assert (train, test) == again
    assert split_snippets(rows, 0.3, seed=2) != again


@pytest.mark.parametrize("kind", ["positive", "negative"])
def test_build_pairs_orders_by_rating(kind):
    pairs = build_pairs(ROWS, kind, n_pairs=12, min_gap=1.0, seed=0)
    assert len(pairs) == 12 and pairs == build_pairs(ROWS, kind, 12, 1.0, seed=0)
    assert len({frozenset((p["chosen_id"], p["rejected_id"])) for p in pairs}) == 12
    for p in pairs:
        assert p["prompt"] == PROMPTS[kind] and p["kind"] == kind
        gap = p["chosen_score"] - p["rejected_score"]
        assert abs(gap) >= 1.0 and (gap > 0) == (kind == "positive")


def test_preferred_and_unknown_kind():
    a, b = ROWS[0], ROWS[-1]
    assert preferred(a, b, "positive") == (b, a) and preferred(a, b, "negative") == (a, b)
    with pytest.raises(ValueError, match="unknown prompt kind"):
        preferred(a, b, "neutral")
    with pytest.raises(ValueError, match="unknown prompt kind"):
        build_pairs(ROWS, "neutral", 2)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_pairs": 0}, "n_pairs"), ({"n_pairs": True}, "n_pairs"), ({"min_gap": -1.0}, "min_gap"),
    ({"min_gap": 10.0}, "found only"), ({"n_pairs": 100}, "found only")])
def test_build_pairs_bad_input(kwargs, match):
    args = {"rows": ROWS, "kind": "positive", "n_pairs": 3, "max_tries": 5} | kwargs
    with pytest.raises(ValueError, match=match):
        build_pairs(**args)


def test_rows_validation():
    with pytest.raises(ValueError, match="at least two"):
        build_pairs(ROWS[:1], "positive", 1)
    with pytest.raises(ValueError, match="at least two"):
        split_snippets(ROWS[:1])
    with pytest.raises(ValueError, match="'id', 'score' and 'text'"):
        build_pairs([{"id": "0", "text": "a"}, ROWS[0]], "positive", 1)
    with pytest.raises(ValueError, match="test_fraction"):
        split_snippets(ROWS, test_fraction=1.0)


def test_validate_pairs_errors():
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert validate_pairs([good]) == [good]
    with pytest.raises(ValueError, match="empty batch"):
        validate_pairs([])
    with pytest.raises(TypeError, match="must be a dict"):
        validate_pairs(["x"])
    with pytest.raises(ValueError, match="missing field"):
        validate_pairs([{"prompt": "p", "chosen": "a"}])
    with pytest.raises(ValueError, match="non-empty string"):
        validate_pairs([good | {"rejected": "  "}])
    with pytest.raises(ValueError, match="identical"):
        validate_pairs([good | {"rejected": "a"}])


# --- losses: formulas and validation -----------------------------------------------------------------

def test_bradley_terry_formula_and_margin():
    rc, rr = torch.tensor([2.0, -1.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(bradley_terry_loss(rc, rr), torch.log1p(torch.exp(rr - rc)))
    m = torch.tensor([0.5, 0.5, 0.5])
    torch.testing.assert_close(bradley_terry_loss(rc, rr, m), -F.logsigmoid(rc - rr - m))
    assert pairwise_accuracy(rc, rr) == pytest.approx(1 / 3)


@pytest.mark.parametrize("fn", [
    lambda a, b: bradley_terry_loss(a, b), lambda a, b: pairwise_accuracy(a, b),
    lambda a, b: dpo_loss(a, b, a, b), lambda a, b: ipo_loss(a, b, a, b),
    lambda a, b: simpo_loss(a, b, a.abs() + 1, b.abs() + 1),
    lambda a, b: orpo_loss(-a.abs() - 1, -b.abs() - 1, a.abs() + 1, b.abs() + 1)])
def test_losses_reject_bad_shapes(fn):
    with pytest.raises(ValueError, match="shapes differ"):
        fn(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="1-D"):
        fn(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="empty"):
        fn(torch.zeros(0), torch.zeros(0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        bradley_terry_loss([0.0], torch.zeros(1))


@pytest.mark.parametrize("beta", [0.0, -1.0, True, "0.1"])
def test_losses_reject_bad_beta(beta):
    t = torch.full((2,), -1.0)
    for call in (lambda: dpo_loss(t, t, t, t, beta=beta), lambda: ipo_loss(t, t, t, t, beta=beta),
                 lambda: simpo_loss(t, t, -t, -t, beta=beta), lambda: orpo_loss(t, t, -t, -t, beta=beta),
                 lambda: kto_loss(t, t, torch.tensor([True, False]), beta=beta)):
        with pytest.raises(ValueError, match="beta"):
            call()


def test_loss_specific_errors():
    t, one = torch.full((2,), -1.0), torch.ones(2)
    with pytest.raises(ValueError, match="both chosen_lengths"):
        ipo_loss(t, t, t, t, chosen_lengths=one)
    with pytest.raises(ValueError, match=">= 1 response token"):
        simpo_loss(t, t, torch.tensor([1.0, 0.0]), one)
    with pytest.raises(ValueError, match="gamma"):
        simpo_loss(t, t, one, one, gamma=-0.1)
    with pytest.raises(ValueError, match="< 0"):
        orpo_loss(torch.zeros(2), t, one, one)
    with pytest.raises(TypeError, match="bool"):
        kto_loss(t, t, torch.ones(2))
    with pytest.raises(ValueError, match="scalar"):
        kto_loss(t, t, torch.tensor([True, False]), kl=torch.zeros(2))
    with pytest.raises(ValueError, match="desirable_weight"):
        kto_loss(t, t, torch.tensor([True, False]), desirable_weight=0.0)


def test_dpo_is_bradley_terry_on_implicit_rewards():
    x = logps()
    beta = 0.3
    implicit_c, implicit_r = beta * (x["pc"] - x["rc"]), beta * (x["pr"] - x["rr"])
    torch.testing.assert_close(dpo_loss(x["pc"], x["pr"], x["rc"], x["rr"], beta),
                               bradley_terry_loss(implicit_c, implicit_r))


def test_ipo_without_lengths():
    x = logps()
    h = (x["pc"] - x["rc"]) - (x["pr"] - x["rr"])
    torch.testing.assert_close(ipo_loss(x["pc"], x["pr"], x["rc"], x["rr"], 0.5), (h - 1.0) ** 2)


def test_orpo_near_zero_logps_is_finite():
    c, r = torch.tensor([-1e-6, -5.0]), torch.tensor([-3.0, -1e-7])
    assert torch.isfinite(orpo_loss(c, r, torch.ones(2), torch.ones(2))).all()


# --- losses against TRL -------------------------------------------------------------------------------

trl = pytest.importorskip("trl")


def fake_trainer(**attrs) -> SimpleNamespace:
    """The attributes TRL's loss methods read from ``self``, with no accelerator, model or dataset."""
    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    base = dict(model=SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False, beta=0.1,
                label_smoothing=0.0, _metrics=defaultdict(lambda: defaultdict(list)),
                _total_train_tokens=0, _tp_size=1)
    return SimpleNamespace(**(base | attrs))


def trl_dpo(loss_type: str, beta: float, x: dict) -> torch.Tensor:
    """TRL's DPOTrainer._compute_loss on fake per-token log-probs that sum to x's sequence log-probs."""
    from trl import DPOTrainer
    n, T = len(x["pc"]), 16
    mask = torch.zeros(2 * n, T, dtype=torch.long)
    for i, L in enumerate(torch.cat([x["lc"], x["lr"]]).long()):
        mask[i, T - L:] = 1
    per_token = torch.cat([x["pc"], x["pr"]])[:, None] * mask[:, 1:] / mask[:, 1:].sum(1, keepdim=True)
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * n, T - 1),
                              mean_logits=torch.zeros(2 * n, T - 1),
                              is_top1=torch.zeros(2 * n, T - 1, dtype=torch.bool))
    me = fake_trainer(beta=beta, loss_types=[loss_type], loss_weights=[1.0], ld_alpha=None,
                      precompute_ref_logps=True, f_divergence_type="reverse_kl", use_weighting=False)
    inputs = {"input_ids": torch.zeros(2 * n, T, dtype=torch.long), "attention_mask": torch.ones(2 * n, T),
              "completion_mask": mask, "ref_chosen_logps": x["rc"], "ref_rejected_logps": x["rr"]}
    return DPOTrainer._compute_loss(me, lambda **kw: outputs, inputs, return_outputs=False)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_equals_trl(beta):
    x = logps()
    ours = dpo_loss(x["pc"], x["pr"], x["rc"], x["rr"], beta).mean()
    torch.testing.assert_close(ours, trl_dpo("sigmoid", beta, x))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_equals_trl(beta):
    x = logps(seed=1)
    ours = ipo_loss(x["pc"], x["pr"], x["rc"], x["rr"], beta, x["lc"], x["lr"]).mean()
    torch.testing.assert_close(ours, trl_dpo("ipo", beta, x))


@pytest.mark.parametrize("beta, gamma", [(2.0, 0.5), (2.5, 1.0)])
def test_simpo_equals_trl(beta, gamma):
    from trl.experimental.cpo import CPOTrainer
    x = logps(seed=2)
    me = fake_trainer(beta=beta, loss_type="simpo", simpo_gamma=gamma, alpha=0.0)
    theirs, _, _ = CPOTrainer.cpo_loss(me, x["pc"] / x["lc"], x["pr"] / x["lr"])  # TRL averages per token
    torch.testing.assert_close(simpo_loss(x["pc"], x["pr"], x["lc"], x["lr"], beta, gamma), theirs)


def test_orpo_equals_trl():
    from trl.experimental.orpo import ORPOTrainer
    x = logps(seed=3)
    beta = 0.2
    me = fake_trainer(beta=beta)
    c, r = x["pc"] / x["lc"], x["pr"] / x["lr"]
    ratio_terms = ORPOTrainer.odds_ratio_loss(me, c, r)[0]  # beta * logsigmoid(log odds ratio)
    theirs = -c - ratio_terms  # ORPOTrainer: loss = policy_nll_loss - losses.mean()
    torch.testing.assert_close(orpo_loss(x["pc"], x["pr"], x["lc"], x["lr"], beta), theirs)


@pytest.mark.parametrize("kl", [0.0, 0.7])
def test_kto_equals_trl(kl):
    from trl import KTOTrainer
    x = logps(seed=4)
    n, T = 6, 8
    desirable = torch.tensor([True, False, True, True, False, False])
    policy, ref = x["pc"], x["rc"]
    per_token = torch.cat([policy[:, None] / (T - 1)] * (T - 1), dim=1)
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(n, T - 1),
                              mean_logits=torch.zeros(n, T - 1))
    me = fake_trainer(beta=0.3, loss_type="kto", precompute_ref_logps=True, calculate_KL=True,
                      desirable_weight=1.0, undesirable_weight=1.5,
                      _compute_kl_logps=lambda model, batch: torch.full((n,), kl, dtype=torch.float64))
    inputs = {"input_ids": torch.zeros(n, T, dtype=torch.long), "attention_mask": torch.ones(n, T),
              "completion_mask": torch.ones(n, T, dtype=torch.long), "label": desirable,
              "ref_logps": ref, "ref_KL_logps": torch.zeros(n, dtype=torch.float64)}
    theirs = KTOTrainer._compute_loss(me, lambda **kw: outputs, inputs, return_outputs=False)
    ours = kto_loss(policy, ref, desirable, kl=torch.tensor(kl), beta=0.3, undesirable_weight=1.5)
    torch.testing.assert_close(ours.mean(), theirs)


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_equals_trl_reward_trainer(with_margin):
    from trl import RewardTrainer
    r = torch.randn(8, 1, generator=torch.Generator().manual_seed(5))
    me = fake_trainer(args=SimpleNamespace(center_rewards_coefficient=None))
    inputs = {"input_ids": torch.zeros(8, 4, dtype=torch.long), "attention_mask": torch.ones(8, 4)}
    margin = torch.full((4,), 0.3)
    if with_margin:
        inputs["margin"] = margin
    theirs = RewardTrainer.compute_loss(me, lambda **kw: SimpleNamespace(logits=r), inputs)
    ours = bradley_terry_loss(r[:4, 0], r[4:, 0], margin if with_margin else None).mean()
    torch.testing.assert_close(ours, theirs)


# --- log-probabilities and rewards from a tiny model -------------------------------------------------

@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    return tiny_random_llama(num_hidden_layers=2)


def test_response_logprobs_matches_cross_entropy(tiny):
    ids = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    labels[1, 5:] = IGNORE_INDEX
    total, lengths = response_logprobs(tiny, ids, labels)
    assert lengths.tolist() == [4, 2]
    with torch.no_grad():
        for i in range(2):
            mean_nll = tiny(input_ids=ids[i:i + 1], labels=labels[i:i + 1]).loss
            torch.testing.assert_close(-total[i] / lengths[i], mean_nll, rtol=1e-5, atol=1e-5)


def test_response_logprobs_errors(tiny):
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="one shape"):
        response_logprobs(tiny, ids, ids[:, :4])
    with pytest.raises(ValueError, match="at least one response token"):
        response_logprobs(tiny, ids, torch.full_like(ids, IGNORE_INDEX))


def test_last_token_rewards_match_sequence_classification(tiny):
    cls = LlamaForSequenceClassification(LlamaConfig(**(tiny.config.to_dict() | {"num_labels": 1}))).eval()
    cls.model.load_state_dict(tiny.model.state_dict())
    head = nn.Linear(32, 1, bias=False)
    head.weight.data.copy_(cls.score.weight.data)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])  # right padding with pad id 0
    with torch.no_grad():
        hidden = tiny.model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        ours = last_token_rewards(hidden, torch.tensor([4, 2]), head)
        theirs = cls(input_ids=ids, attention_mask=(ids != 0).long()).logits[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_last_token_rewards_errors():
    head = nn.Linear(4, 1)
    with pytest.raises(ValueError, match="batch, seq, d"):
        last_token_rewards(torch.zeros(2, 4), torch.tensor([1, 1]), head)
    with pytest.raises(ValueError, match="one length per row"):
        last_token_rewards(torch.zeros(2, 3, 4), torch.tensor([1]), head)
    with pytest.raises(ValueError, match="lengths must be in"):
        last_token_rewards(torch.zeros(2, 3, 4), torch.tensor([0, 4]), head)


def test_prefix_trunk_cache_equals_full_trunk(tiny):
    from utils.finetune import trunk_cache
    prefix, conts = [3, 4, 5, 6], [[7, 8], [9, 10, 11, 12, 13], [14]]
    ours = prefix_trunk_cache(tiny, prefix, conts, n_top=1, batch_size=2)
    examples = [{"input_ids": prefix + c, "labels": prefix + c, "attention_mask": [1] * (4 + len(c))}
                for c in conts]
    for h, (ref, _) in zip(ours, trunk_cache(tiny, examples, n_top=1, pad_token_id=0)):
        torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5)


def test_prefix_trunk_cache_errors(tiny):
    with pytest.raises(ValueError, match="n_top"):
        prefix_trunk_cache(tiny, [1], [[2]], n_top=3)
    with pytest.raises(ValueError, match="non-empty prefix"):
        prefix_trunk_cache(tiny, [], [[2]], n_top=1)
    with pytest.raises(ValueError, match="non-empty prefix"):
        prefix_trunk_cache(tiny, [1], [[2], []], n_top=1)
    with pytest.raises(ValueError, match="batch_size"):
        prefix_trunk_cache(tiny, [1], [[2]], n_top=1, batch_size=0)
