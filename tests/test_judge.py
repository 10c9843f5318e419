"""Tests for utils.judge on a tiny ChatML tokenizer and a tiny random LlamaForCausalLM (no download)."""
import pytest
import torch
from tiny_chatml import chatml_tokenizer, tiny_llama

from utils.finetune import trunk_cache
from utils.judge import (ANSWER_CUE, JUDGE_STYLES, cached_sequence_logprobs, debiased_prob,
                         generate_reasons, judge_ids, judge_messages, judge_probs, relabel_pairs,
                         swap_stats, verdict_token_ids)
from utils.preference import response_logprobs
from utils.sft import build_example, collate

CORPUS = ["Which review is more positive? Review 1: great fun. Review 2: dull and bad.",
          "Reply with one digit only: 1 or 2. Answer: 1 Answer: 2",
          "user assistant system First compare the two reviews in one short sentence"] * 5
Q = "Which review is more positive?"


@pytest.fixture(scope="module")
def tokenizer():
    return chatml_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer, num_hidden_layers=3, max_position_embeddings=512)


def test_messages_and_ids(tokenizer):
    for style in JUDGE_STYLES:
        (msg,) = judge_messages(Q, "great fun", "dull", style)
        assert msg["role"] == "user" and msg["content"].startswith(Q)
        assert msg["content"].index("great fun") < msg["content"].index("dull")
    plain = judge_ids(tokenizer, Q, "great fun", "dull")
    cued = judge_ids(tokenizer, Q, "great fun", "dull", "reason_first", "Let's compare them." + ANSWER_CUE)
    assert tokenizer.decode(plain).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(cued).endswith("Let's compare them.\nAnswer: ")
    with_system = judge_ids(tokenizer, Q, "great fun", "dull", system="Be fair.")
    assert len(with_system) > len(plain)


def test_bad_inputs(tokenizer):
    with pytest.raises(ValueError, match="known styles: \\['direct', 'reason_first', 'rubric'\\]"):
        judge_messages(Q, "a", "b", "pointwise")
    with pytest.raises(ValueError, match="identical"):
        judge_messages(Q, "same", "same")
    with pytest.raises(ValueError, match="answer_2 must be a non-empty"):
        judge_messages(Q, "a", "  ")
    with pytest.raises(ValueError, match="question must be a non-empty"):
        judge_messages(None, "a", "b")
    with pytest.raises(TypeError, match="assistant_prefix"):
        judge_ids(tokenizer, Q, "a", "b", assistant_prefix=None)
    with pytest.raises(ValueError, match="exactly two labels"):
        verdict_token_ids(tokenizer, ["1"])
    with pytest.raises(ValueError, match="single token"):
        verdict_token_ids(tokenizer, ["1", "not one token at all"])
    with pytest.raises(ValueError, match="single token"):
        verdict_token_ids(tokenizer, ["1", 2])
    with pytest.raises(ValueError, match="same token"):
        verdict_token_ids(tokenizer, ["1", "1"])


def test_judge_probs_equal_unpadded_forward(model, tokenizer):
    ids = verdict_token_ids(tokenizer)
    assert ids == [tokenizer.convert_tokens_to_ids("1"), tokenizer.convert_tokens_to_ids("2")]
    prompts = [judge_ids(tokenizer, Q, "great fun", "dull and bad, a very long and boring film"),
               judge_ids(tokenizer, Q, "dull", "great fun", "reason_first", "ok" + ANSWER_CUE)]
    probs = judge_probs(model, prompts, ids, tokenizer.pad_token_id, batch_size=2)
    for p, prompt in zip(probs, prompts):
        z = model(input_ids=torch.tensor([prompt])).logits[0, -1, ids]
        torch.testing.assert_close(p, torch.softmax(z, -1)[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(judge_probs(model, prompts, ids, tokenizer.pad_token_id, batch_size=1),
                               probs, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="at least one prompt"):
        judge_probs(model, [], ids, 0)
    with pytest.raises(ValueError, match="at least one prompt"):
        judge_probs(model, [[]], ids, 0)
    with pytest.raises(ValueError, match="two label ids"):
        judge_probs(model, prompts, ids[:1], 0)
    with pytest.raises(ValueError, match="batch_size"):
        judge_probs(model, prompts, ids, 0, batch_size=0)


def test_generate_reasons(model, tokenizer):
    prompts = [judge_ids(tokenizer, Q, "great fun", "dull", "reason_first"),
               judge_ids(tokenizer, Q, "dull", "great fun and more", "reason_first")]
    reasons = generate_reasons(model, tokenizer, prompts, max_new_tokens=4)
    assert len(reasons) == 2 and all(isinstance(r, str) for r in reasons)
    assert reasons == generate_reasons(model, tokenizer, prompts, max_new_tokens=4)  # greedy
    with pytest.raises(ValueError, match="at least one prompt"):
        generate_reasons(model, tokenizer, [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_reasons(model, tokenizer, prompts, max_new_tokens=0)


def test_swap_stats_and_debiasing():
    always_first = torch.tensor([0.9, 0.8, 0.7])
    stats = swap_stats(always_first, always_first)
    assert stats == pytest.approx({"mean_p_first": 0.8, "flip_rate": 1.0, "first_wins": 1.0})
    torch.testing.assert_close(debiased_prob(always_first, always_first), torch.full((3,), 0.5))
    consistent = swap_stats(torch.tensor([0.9, 0.2]), torch.tensor([0.1, 0.7]))
    assert consistent == pytest.approx({"mean_p_first": 0.475, "flip_rate": 0.0, "first_wins": 0.5})
    torch.testing.assert_close(debiased_prob(torch.tensor([0.9, 0.2]), torch.tensor([0.1, 0.7])),
                               torch.tensor([0.9, 0.25]))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        swap_stats(torch.tensor([]), torch.tensor([]))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        debiased_prob([0.5], torch.tensor([0.5]))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        debiased_prob(torch.tensor([1.5]), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="one probability per pair"):
        swap_stats(torch.tensor([0.5, 0.5]), torch.tensor([0.5]))


def test_relabel_pairs():
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": 2.0, "rejected_score": 1.0,
              "chosen_id": "1", "rejected_id": "2"}, {"prompt": "p", "chosen": "c", "rejected": "d"}]
    out = relabel_pairs(pairs, torch.tensor([0.3, 0.6]))
    assert out[0]["chosen"] == "b" and out[0]["rejected_score"] == 2.0 and out[0]["chosen_id"] == "2"
    assert out[1]["chosen"] == "c" and out[1]["judge_p"] == pytest.approx(0.6)
    assert pairs[0]["chosen"] == "a"  # inputs are not modified
    with pytest.raises(ValueError, match="no pairs"):
        relabel_pairs([], torch.tensor([0.5]))
    with pytest.raises(ValueError, match="one probability per pair"):
        relabel_pairs(pairs, torch.tensor([0.5]))


@pytest.mark.parametrize("n_top", [1, 3])
def test_cached_logprobs_equal_sequence_logprobs(model, tokenizer, n_top):
    examples = [build_example(tokenizer, "Write a positive movie review.", text)
                for text in ("great fun", "a very long and boring film, dull and bad")]
    items = trunk_cache(model, examples, n_top, tokenizer.pad_token_id)
    ours = cached_sequence_logprobs(model, items, n_top)
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        ref, _ = response_logprobs(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no items"):
        cached_sequence_logprobs(model, [], n_top)
    no_response = [(items[0][0], torch.full_like(items[0][1], -100))]
    with pytest.raises(ValueError, match="at least one response token"):
        cached_sequence_logprobs(model, no_response, n_top)
