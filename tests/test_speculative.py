import dataclasses

import pytest
import torch
from scipy.stats import chisquare

from utils.kvcache import generate
from utils.llama import Llama, LlamaConfig
from utils.speculative import (ModelDrafter, PromptLookupDrafter, SpecStats, expected_tokens_per_step,
                               speculative_generate, speculative_sample)

TINY = dict(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=80, rope_theta=10_000.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is much faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed: int = 0, **changes) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**{**TINY, **changes})).eval()


def _ids(n: int = 6, seed: int = 1, vocab: int = TINY["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _sharpen(model: Llama, factor: float = 30.0) -> Llama:
    """Scale the output head so the random model is confident (greedy text then repeats itself)."""
    with torch.no_grad():
        model.norm.weight.mul_(factor)
    return model


@pytest.mark.parametrize("draft_len", [1, 3, 5])
def test_greedy_output_equals_the_targets_own_greedy_output(draft_len):
    target = _model(0)
    drafters = [ModelDrafter(_model(1)), ModelDrafter(target), PromptLookupDrafter(max_ngram=3)]
    for seed in range(4):
        ids = _ids(n=3 + seed, seed=seed)
        reference = generate(target, ids, 15)
        for drafter in drafters:
            out, stats = speculative_generate(target, drafter, ids, 15, draft_len)
            assert torch.equal(out, reference)
            assert stats.generated == 15 and stats.accepted <= stats.drafted


def test_a_perfect_drafter_is_always_accepted_and_stats_add_up():
    target = _model(0)
    out, stats = speculative_generate(target, ModelDrafter(target), _ids(), 13, draft_len=4)
    assert stats.acceptance_rate == 1.0
    assert stats.target_passes == 3 and stats.tokens_per_pass == pytest.approx(13 / 3)
    assert SpecStats().acceptance_rate == 0.0 and SpecStats().tokens_per_pass == 0.0


def test_prompt_lookup_copies_what_followed_the_first_match():
    drafter = PromptLookupDrafter(max_ngram=2)
    seq = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 6, 7]])
    drafts, q = drafter.propose(seq, 3)
    assert drafts.tolist() == [8, 9, 5] and q is None  # bigram (6, 7) first seen at position 1
    assert drafter.propose(seq, 20)[0].tolist() == [8, 9, 5, 6, 7, 1, 2, 6, 7]  # clipped at the end
    assert drafter.propose(torch.tensor([[1, 2, 3, 2]]), 2)[0].tolist() == [3, 2]  # falls back to 1-gram
    assert drafter.propose(torch.tensor([[1, 2, 3, 4]]), 2)[0].numel() == 0  # no match, no draft
    assert drafter.propose(torch.tensor([[4]]), 2)[0].numel() == 0


def test_prompt_lookup_speeds_up_a_repetitive_model_without_changing_it():
    target = _sharpen(_model(0))
    ids = _ids(n=8)
    reference = generate(target, ids, 40)
    out, stats = speculative_generate(target, PromptLookupDrafter(), ids, 40, draft_len=4)
    assert torch.equal(out, reference)
    assert stats.accepted > 0 and stats.target_passes < 40


def test_eos_stops_generation_like_generate():
    target = _sharpen(_model(0))
    ids = _ids(n=8)
    reference = generate(target, ids, 30)
    eos = int(reference[0, 8 + 20])  # a token the greedy text reaches after a while
    expected = generate(target, ids, 30, eos_token_id=eos)
    for drafter in (PromptLookupDrafter(), ModelDrafter(target)):
        out, _ = speculative_generate(target, drafter, ids, 30, draft_len=5, eos_token_id=eos)
        assert torch.equal(out, expected) and int(out[0, -1]) == eos


def test_acceptance_rule_keeps_the_target_distribution_and_a_wrong_rule_fails():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    q = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.2])
    n = 40_000
    draft = torch.multinomial(q, n, replacement=True, generator=g)
    accepted, token = speculative_sample(p.expand(n, -1), q.expand(n, -1), draft, generator=g)
    counts = torch.bincount(token, minlength=5).double()
    assert chisquare(counts.numpy(), (p.double() / p.double().sum() * n).numpy()).pvalue > 1e-3
    assert abs(accepted.double().mean().item() - torch.minimum(p, q).sum().item()) < 0.01
    # the same test rejects "always keep the draft" (its tokens follow q)
    wrong = torch.bincount(draft, minlength=5).double()
    assert chisquare(wrong.numpy(), (p.double() / p.double().sum() * n).numpy()).pvalue < 1e-3
    # p == q: nothing to resample, every draft is accepted
    same, _ = speculative_sample(p.expand(10, -1), p.expand(10, -1), draft[:10], generator=g)
    assert same.all()


@pytest.mark.parametrize("use_model_drafter", [True, False])
def test_speculative_sampling_matches_the_targets_joint_distribution(use_model_drafter):
    """Two sampled tokens over a 5-token vocabulary: 25 outcomes, compared with the exact joint."""
    small = dict(vocab_size=5, d_model=24, n_heads=2, n_kv_heads=1, d_ff=32)
    target, draft_model = _model(0, **small), _model(3, **small)
    ids = torch.tensor([[1, 2, 1, 2]])  # repetitive, so prompt lookup drafts too
    with torch.no_grad():
        p1 = torch.softmax(target(ids)[0, -1], -1)
        p2 = torch.stack([torch.softmax(target(torch.cat([ids, torch.tensor([[t]])], 1))[0, -1], -1)
                          for t in range(5)])
    joint = (p1[:, None] * p2).flatten().double()
    joint = joint / joint.sum()
    drafter = ModelDrafter(draft_model) if use_model_drafter else PromptLookupDrafter()
    g = torch.Generator().manual_seed(1)
    n = 600
    counts = torch.zeros(25, dtype=torch.float64)
    for _ in range(n):
        out, _ = speculative_generate(target, drafter, ids, 2, draft_len=2, temperature=1.0, generator=g)
        counts[out[0, -2] * 5 + out[0, -1]] += 1
    keep = joint * n >= 5  # chi-square needs expected counts of at least ~5: pool the rare cells
    observed = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)])
    expected = torch.cat([joint[keep], joint[~keep].sum(0, keepdim=True)]) * n
    if not (~keep).any():
        observed, expected = observed[:-1], expected[:-1]
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_sampling_with_a_sharp_drafter_accepts_and_stays_reproducible():
    target = _model(0)
    ids = _ids()
    runs = [speculative_generate(target, ModelDrafter(target), ids, 12, 3, temperature=0.7,
                                 generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][0].shape == (1, 18)
    assert runs[0][1].acceptance_rate == 1.0  # identical p and q: every draft kept
    single, _ = speculative_generate(target, PromptLookupDrafter(), _ids(n=1), 4, 2, temperature=1.0)
    assert single.shape == (1, 5)


def test_expected_tokens_per_step():
    assert expected_tokens_per_step(0.0, 4) == 1.0
    assert expected_tokens_per_step(1.0, 4) == 5.0
    assert expected_tokens_per_step(0.5, 2) == pytest.approx(1.75)
    with pytest.raises(ValueError, match="alpha"):
        expected_tokens_per_step(1.5, 2)
    with pytest.raises(ValueError, match="k must"):
        expected_tokens_per_step(0.5, 0)


def test_bad_input_is_refused():
    target, ids = _model(0), _ids()
    lookup = PromptLookupDrafter()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="draft_len"):
            speculative_generate(target, lookup, ids, 5, bad)
        with pytest.raises(ValueError, match="max_new_tokens"):
            speculative_generate(target, lookup, ids, bad, 2)
        with pytest.raises(ValueError, match="max_ngram"):
            PromptLookupDrafter(bad)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target, lookup, ids, 5, 2, temperature=-0.5)
    with pytest.raises(ValueError, match="one prompt"):
        speculative_generate(target, lookup, ids.repeat(2, 1), 5, 2)
    with pytest.raises(ValueError, match="one prompt"):
        speculative_generate(target, lookup, ids[0], 5, 2)
    other = Llama(dataclasses.replace(target.cfg, vocab_size=50))
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, ModelDrafter(other), ids, 5, 2)
    with pytest.raises(TypeError, match="Llama"):
        ModelDrafter(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="shape"):
        speculative_sample(torch.ones(2, 3) / 3, torch.ones(2, 4) / 4, torch.zeros(2, dtype=torch.long))
