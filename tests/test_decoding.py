"""Tests for utils.decoding: filters against transformers' warpers, decode loops against generate()
on a tiny random Llama (no download, a few milliseconds per call)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from utils.decoding import (
    BestOfN,
    apply_temperature,
    beam_search,
    best_of_n,
    greedy_decode,
    process_logits,
    sample_decode,
    sequence_logprobs,
    top_k_filter,
    top_p_filter,
)

EOS = 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=EOS, pad_token_id=EOS,
    )
    m = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharpen the random model so EOS and ties behave like a real one
        m.lm_head.weight.mul_(8)
    return m


@pytest.fixture
def logits():
    return torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3


def test_temperature_matches_transformers(logits):
    for t in (0.3, 1.0, 2.5):
        torch.testing.assert_close(apply_temperature(logits, t), TemperatureLogitsWarper(t)(None, logits))


@pytest.mark.parametrize("k", [1, 5, 49, 50, 80])
def test_top_k_matches_transformers(logits, k):
    assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits))
    assert (top_k_filter(logits, k) > float("-inf")).sum(-1).tolist() == [min(k, 50)] * 4


def test_top_k_keeps_ties():
    z = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert top_k_filter(z, 2).isfinite().tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999, 1.0])
def test_top_p_matches_transformers(logits, p):
    assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits))


def test_top_p_keeps_smallest_set_reaching_p():
    z = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert top_p_filter(z, 0.75).isfinite().tolist() == [[True, True, False, False]]
    assert top_p_filter(z, 0.8).isfinite().tolist() == [[True, True, False, False]]
    assert top_p_filter(z, 0.81).isfinite().tolist() == [[True, True, True, False]]
    assert top_p_filter(z, 0.01).isfinite().tolist() == [[True, False, False, False]]


def test_process_logits_order_matches_generate_warpers(logits):
    ref = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(10)(None, TemperatureLogitsWarper(0.7)(None, logits)))
    assert torch.equal(process_logits(logits, 0.7, 10, 0.8), ref)
    assert torch.equal(process_logits(logits), logits)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda z: apply_temperature(z, 0), "temperature"),
        (lambda z: apply_temperature(z, -1.0), "temperature"),
        (lambda z: apply_temperature(z, True), "temperature"),
        (lambda z: top_k_filter(z, 0), "top_k"),
        (lambda z: top_k_filter(z, 2.0), "top_k"),
        (lambda z: top_p_filter(z, 0.0), "top_p"),
        (lambda z: top_p_filter(z, 1.5), "top_p"),
        (lambda z: top_p_filter(z, "0.5"), "top_p"),
        (lambda z: top_k_filter(z.long(), 2), "floating-point"),
        (lambda z: process_logits(z, top_k=-3), "top_k"),
    ],
)
def test_bad_arguments_raise_clear_errors(logits, call, message):
    with pytest.raises(ValueError, match=message):
        call(logits)


def _generate(model, ids, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=EOS, eos_token_id=EOS, **kw)


def test_greedy_matches_generate_and_pads_finished_rows(model):
    ids = torch.randint(4, 32, (3, 5), generator=torch.Generator().manual_seed(1))
    ours = greedy_decode(model, ids, 12, eos_token_id=EOS)
    assert torch.equal(ours, _generate(model, ids, max_new_tokens=12, do_sample=False))
    no_eos = greedy_decode(model, ids, 7)
    assert no_eos.shape == (3, 12)


def test_greedy_stops_when_all_rows_end(model):
    # find a prompt whose greedy continuation hits EOS early, then check we stop there
    for seed in range(200):
        ids = torch.randint(4, 32, (1, 4), generator=torch.Generator().manual_seed(seed))
        out = greedy_decode(model, ids, 20, eos_token_id=EOS)
        if out.shape[1] < 24:
            assert out[0, -1] == EOS
            return
    pytest.skip("no prompt reached EOS")  # pragma: no cover


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.6), dict(top_k=5), dict(top_p=0.7, temperature=1.4)])
def test_sampling_equals_generate_with_same_seed(model, kw):
    ids = torch.randint(4, 32, (4, 6), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    ours = sample_decode(model, ids, 10, eos_token_id=EOS, **kw)
    torch.manual_seed(7)
    ref = _generate(model, ids, max_new_tokens=10, do_sample=True, temperature=kw.get("temperature", 1.0),
                    top_k=kw.get("top_k", 0), top_p=kw.get("top_p", 1.0))
    assert torch.equal(ours, ref)


def test_sampling_with_own_generator_is_reproducible(model):
    ids = torch.tensor([[5, 6, 7]])
    a = sample_decode(model, ids, 8, generator=torch.Generator().manual_seed(3))
    b = sample_decode(model, ids, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (1, 11)


def test_sampling_validates_before_running(model):
    with pytest.raises(ValueError, match="temperature"):
        sample_decode(model, torch.tensor([[5]]), 3, temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(model, torch.tensor([[5]]), 0)
    with pytest.raises(ValueError, match="input_ids"):
        greedy_decode(model, torch.tensor([5, 6]), 3)


@pytest.mark.parametrize(
    "num_beams, length_penalty, early_stopping",
    [(3, 1.0, False), (4, 0.5, True), (4, 2.0, "never"), (2, -1.0, False), (3, 1.0, "never")],
)
def test_beam_search_matches_generate(model, num_beams, length_penalty, early_stopping):
    for seed in range(6):
        ids = torch.randint(4, 32, (1, 5), generator=torch.Generator().manual_seed(seed))
        hyps = beam_search(model, ids, num_beams, 12, length_penalty, early_stopping, eos_token_id=EOS)
        ref = _generate(model, ids, max_new_tokens=12, do_sample=False, num_beams=num_beams,
                        length_penalty=length_penalty, early_stopping=early_stopping,
                        output_scores=True, return_dict_in_generate=True)
        assert torch.equal(hyps[0].tokens, ref.sequences[0, 5:])
        assert hyps[0].score == pytest.approx(ref.sequences_scores[0].item(), abs=1e-5)
        assert len(hyps) <= num_beams and [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


def test_beam_search_without_eos_runs_to_the_limit(model):
    hyps = beam_search(model, torch.tensor([[5, 6]]), 3, 6)
    assert len(hyps) == 3 and all(len(h.tokens) == 6 for h in hyps)


def test_one_beam_is_greedy(model):
    ids = torch.tensor([[9, 4, 11]])
    assert torch.equal(beam_search(model, ids, 1, 8)[0].tokens, greedy_decode(model, ids, 8)[0, 3:])


def test_beam_search_bad_arguments(model):
    ids = torch.tensor([[5, 6]])
    with pytest.raises(ValueError, match="one prompt"):
        beam_search(model, ids.expand(2, -1), 2, 4)
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(model, ids, 0, 4)
    with pytest.raises(ValueError, match="early_stopping"):
        beam_search(model, ids, 2, 4, early_stopping="sometimes")


def test_sequence_logprobs_masks_after_eos(model):
    seqs = torch.tensor([[5, 6, 7, EOS, EOS], [5, 6, 8, 9, 10]])
    logprobs, mask = sequence_logprobs(model, seqs, 2, EOS)
    assert logprobs.shape == (2, 3) and (logprobs <= 0).all()
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    assert sequence_logprobs(model, seqs, 2)[1].all()
    full = torch.log_softmax(model(seqs).logits, -1)
    torch.testing.assert_close(logprobs[1, 0], full[1, 1, 8])
    with pytest.raises(ValueError, match="prompt_len"):
        sequence_logprobs(model, seqs, 5)


def test_best_of_n_picks_highest_mean_logprob(model):
    ids = torch.tensor([[5, 6, 7]])
    result = best_of_n(model, ids, 6, 8, temperature=1.2, eos_token_id=EOS, generator=torch.Generator().manual_seed(0))
    assert isinstance(result, BestOfN) and result.samples.shape[0] == 6
    assert result.scores[result.best_index] == result.scores.max()
    assert torch.equal(result.best, result.samples[result.best_index])
    logprobs, mask = sequence_logprobs(model, result.samples, 3, EOS)
    torch.testing.assert_close(result.scores, (logprobs * mask).sum(-1) / mask.sum(-1))
    with pytest.raises(ValueError, match="one prompt"):
        best_of_n(model, ids.expand(2, -1), 2, 4)
    with pytest.raises(ValueError, match="n must"):
        best_of_n(model, ids, 0, 4)


@pytest.fixture(scope="module")
def eos_prone_model(model):
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():  # make EOS likely, so beams finish early and the stopping rules matter
        m.lm_head.weight[EOS] = m.lm_head.weight.mean(0) + 0.2 * m.lm_head.weight[EOS]
        m.lm_head.weight[EOS] += m.model.norm(torch.ones(16)).sign() * 0.5
    return m


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_beam_search_early_stopping_matches_generate(eos_prone_model, early_stopping):
    lengths = []
    for seed in range(8):
        ids = torch.randint(4, 32, (1, 5), generator=torch.Generator().manual_seed(seed))
        hyps = beam_search(eos_prone_model, ids, 2, 15, 1.0, early_stopping, eos_token_id=EOS)
        ref = _generate(eos_prone_model, ids, max_new_tokens=15, do_sample=False, num_beams=2,
                        length_penalty=1.0, early_stopping=early_stopping)
        assert torch.equal(hyps[0].tokens, ref[0, 5:])
        lengths.append(len(hyps[0].tokens))
    assert min(lengths) < 15  # some beams really ended early
