"""Tests for utils.prompting on a tiny ChatML tokenizer and a tiny random Llama (no download)."""
import pytest
import torch
from tiny_chatml import chatml_tokenizer, tiny_llama

from utils.prompting import (FORMATS, addition_items, answer_token_ids, best_on_dev, calibrate,
                             few_shot_prompt, label_probs, last_number, majority_vote,
                             next_token_logprobs, sample_paths, self_consistency, split_ids)

CORPUS = ["Review: a great film.\nSentiment: positive", "Review: dull and bad.\nSentiment: negative",
          "Classify the sentiment of each movie review as positive or negative.",
          "What is 23 + 19? The answer is 42."] * 5
LABELS = ["positive", "negative"]
EXEMPLARS = [("a great film", "positive"), ("dull and bad", "negative")]


@pytest.fixture(scope="module")
def tokenizer():
    return chatml_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer, num_hidden_layers=2, max_position_embeddings=512)


def test_plain_prompt_layout(tokenizer):
    prompt = few_shot_prompt(tokenizer, "Classify.", EXEMPLARS, ["so great"], LABELS)
    assert prompt.prefix == ("Classify.\n\nReview: a great film\nSentiment: positive\n\n"
                             "Review: dull and bad\nSentiment: negative")
    assert prompt.suffixes == ["\n\nReview: so great\nSentiment:"]
    assert prompt.answer_words == [" positive", " negative"] and prompt.fmt == "plain"


def test_chat_prompt_is_the_chat_template_split_in_two(tokenizer):
    prompt = few_shot_prompt(tokenizer, "Classify.", EXEMPLARS, ["so great", "bad"], LABELS, "chat")
    chat = [{"role": "system", "content": "Classify."},
            {"role": "user", "content": "Review: a great film"},
            {"role": "assistant", "content": "positive"},
            {"role": "user", "content": "Review: dull and bad"},
            {"role": "assistant", "content": "negative"},
            {"role": "user", "content": "Review: bad"}]
    whole = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt.prefix + prompt.suffixes[1] == whole
    assert prompt.answer_words == LABELS and set(FORMATS) == {"plain", "chat"}


@pytest.mark.parametrize("kwargs, error", [
    ({"fmt": "xml"}, ValueError), ({"queries": []}, ValueError), ({"labels": ["positive"]}, ValueError),
    ({"exemplars": [("x", "neutral")]}, ValueError), ({"instruction": 3}, TypeError),
    ({"queries": [None]}, TypeError)])
def test_few_shot_prompt_errors(tokenizer, kwargs, error):
    args = {"instruction": "Classify.", "exemplars": EXEMPLARS, "queries": ["q"], "labels": LABELS}
    with pytest.raises(error):
        few_shot_prompt(tokenizer, **(args | kwargs))


def test_split_ids_matches_whole_tokenization_and_refuses_a_split_word(tokenizer):
    prefix, parts = split_ids(tokenizer, "Review: a great film", ["\nSentiment:", " and bad"])
    for part, suffix in zip(parts, ["\nSentiment:", " and bad"]):
        whole = tokenizer("Review: a great film" + suffix, add_special_tokens=False)["input_ids"]
        assert prefix + part == whole
    with pytest.raises(ValueError, match="does not tokenize"):
        split_ids(tokenizer, "Senti", ["ment"])
    with pytest.raises(ValueError, match="does not tokenize"):
        split_ids(tokenizer, "Review:", [""])
    with pytest.raises(ValueError):
        split_ids(tokenizer, "", ["x"])
    with pytest.raises(TypeError):
        split_ids(tokenizer, "Review:", [3])


def test_answer_token_ids(tokenizer):
    ids = answer_token_ids(tokenizer, ["a", "b"])
    assert ids == [tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids("b")]
    with pytest.raises(ValueError, match="one token"):
        answer_token_ids(tokenizer, ["a", "zqxjv"])
    with pytest.raises(ValueError, match="share"):
        answer_token_ids(tokenizer, ["a", "a"])
    with pytest.raises(ValueError, match="at least two"):
        answer_token_ids(tokenizer, ["a"])


def _full_logprobs(model, prefix, suffix):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prefix + suffix])).logits[0, -1]
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_next_token_logprobs_equals_whole_prompts(model, tokenizer, batch_size):
    prompt = few_shot_prompt(tokenizer, "Classify.", EXEMPLARS,
                             ["so great", "dull and a very bad film", "bad", ""], LABELS)
    prefix, suffixes = split_ids(tokenizer, prompt.prefix, prompt.suffixes)
    ids = answer_token_ids(tokenizer, prompt.answer_words)
    ours = next_token_logprobs(model, prefix, suffixes, ids, batch_size=batch_size)
    every = next_token_logprobs(model, prefix, suffixes, batch_size=batch_size)
    theirs = torch.stack([_full_logprobs(model, prefix, s) for s in suffixes])
    torch.testing.assert_close(ours, theirs[:, ids], atol=1e-5, rtol=0)
    torch.testing.assert_close(every, theirs, atol=1e-5, rtol=0)
    assert not model.training


def test_next_token_logprobs_errors(model):
    with pytest.raises(ValueError):
        next_token_logprobs(model, [], [[1]])
    with pytest.raises(ValueError):
        next_token_logprobs(model, [1], [[]])
    with pytest.raises(ValueError):
        next_token_logprobs(model, [1], [[2]], batch_size=0)


def test_label_probs_and_calibration():
    logprobs = torch.log(torch.tensor([[0.6, 0.2], [0.1, 0.1]]))
    probs = label_probs(logprobs)
    torch.testing.assert_close(probs, torch.tensor([[0.75, 0.25], [0.5, 0.5]]))
    content_free = torch.tensor([[0.8, 0.2], [0.6, 0.4]])  # mean (0.7, 0.3)
    calibrated = calibrate(probs, content_free)
    expected = torch.tensor([[0.75 / 0.7, 0.25 / 0.3], [0.5 / 0.7, 0.5 / 0.3]])
    torch.testing.assert_close(calibrated, expected / expected.sum(-1, keepdim=True))
    torch.testing.assert_close(calibrate(torch.tensor([0.7, 0.3]), content_free),
                               torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(calibrate(probs, content_free.mean(0)), calibrated)


def test_label_probs_and_calibration_errors():
    with pytest.raises(ValueError):
        label_probs(torch.zeros(3))
    with pytest.raises(ValueError):
        calibrate([0.5, 0.5], torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="labels"):
        calibrate(torch.rand(2, 3), torch.rand(2, 2))
    with pytest.raises(ValueError, match="positive"):
        calibrate(torch.rand(2, 2), torch.tensor([1.0, 0.0]))


def _same_length_suffixes(tokenizer):
    prefix, suffixes = split_ids(tokenizer, "What is 23 + 19? The answer is 42.",
                                 ["\nWhat is 11 + 27?", "\nWhat is 35 + 48?"])
    assert len(suffixes[0]) == len(suffixes[1])
    return prefix, suffixes


def test_greedy_paths_equal_generate(model, tokenizer):
    prefix, suffixes = _same_length_suffixes(tokenizer)
    paths = sample_paths(model, prefix, suffixes, max_new_tokens=6, batch_size=1)
    reference = model.generate(input_ids=torch.tensor([prefix + s for s in suffixes]),
                               attention_mask=torch.ones(2, len(prefix) + len(suffixes[0]),
                                                         dtype=torch.long),
                               max_new_tokens=6, do_sample=False, eos_token_id=None,
                               pad_token_id=tokenizer.pad_token_id)
    assert [p[0] for p in paths] == reference[:, len(prefix) + len(suffixes[0]):].tolist()
    first = paths[0][0][0]  # stop at the first greedy token: an empty path
    stopped = sample_paths(model, prefix, suffixes[:1], max_new_tokens=6, eos_token_id=first)
    assert stopped == [[[]]]


def test_finished_rows_leave_the_batch(model, tokenizer):
    prefix, suffixes = _same_length_suffixes(tokenizer)
    free = sample_paths(model, prefix, suffixes, max_new_tokens=8)
    eos = free[0][0][2]  # row 0 stops after two tokens; row 1 goes on until it meets eos, if ever
    stopped = sample_paths(model, prefix, suffixes, max_new_tokens=8, eos_token_id=eos)
    expected = [p[0][:p[0].index(eos)] if eos in p[0] else p[0] for p in free]
    assert [p[0] for p in stopped] == expected


def test_sampled_paths_are_reproducible(model, tokenizer):
    prefix, suffixes = _same_length_suffixes(tokenizer)

    def draw():
        return sample_paths(model, prefix, suffixes, n=3, max_new_tokens=4, temperature=0.8,
                            top_p=0.9, eos_token_id=tokenizer.eos_token_id, batch_size=4,
                            generator=torch.Generator().manual_seed(0))

    paths = draw()
    assert paths == draw()
    assert [len(p) for p in paths] == [3, 3]
    assert all(len(path) <= 4 for p in paths for path in p)


def test_sample_paths_errors(model, tokenizer):
    prefix, suffixes = _same_length_suffixes(tokenizer)
    with pytest.raises(ValueError, match="identical"):
        sample_paths(model, prefix, suffixes, n=2)
    with pytest.raises(ValueError, match="same number"):
        sample_paths(model, prefix, [suffixes[0], suffixes[0][:-1]])
    with pytest.raises(ValueError):
        sample_paths(model, prefix, suffixes, temperature=0.0)
    with pytest.raises(ValueError):
        sample_paths(model, prefix, suffixes, n=0)


def test_reading_and_voting():
    assert last_number("23 + 19 = 42. The answer is 42.") == 42
    assert last_number("about 1,234, maybe -5") == -5
    assert last_number("it is 1,234.") == 1234
    assert last_number("no digits") is None
    with pytest.raises(TypeError):
        last_number(42)
    assert majority_vote([3, 5, 5, None, 3]) == 3  # tie: the first seen
    assert majority_vote([None, 7, 8, 8]) == 8
    assert majority_vote([None, None]) is None


def test_self_consistency():
    answers = [[1, 2, 2], [5, 5, 1], [None, 3, 3]]
    result = self_consistency(answers, [2, 5, 3], [1, 3])
    assert result == {1: [0, 1, 0], 3: [1, 1, 1]}
    with pytest.raises(ValueError, match="only 3"):
        self_consistency(answers, [2, 5, 3], [5])
    with pytest.raises(ValueError, match="one length"):
        self_consistency(answers, [2], [1])
    with pytest.raises(ValueError):
        self_consistency(answers, [2, 5, 3], [0])


def test_addition_items():
    items = addition_items(30, (2, 1), seed=3)
    assert items == addition_items(30, (2, 1), seed=3)
    assert len({(i["a"], i["b"]) for i in items}) == 30
    assert all(10 <= i["a"] <= 99 and 2 <= i["b"] <= 9 and i["answer"] == i["a"] + i["b"]
               for i in items)
    assert len({len(i["question"]) for i in items}) == 1
    assert len(addition_items(64, (1, 1))) == 64
    with pytest.raises(ValueError, match="distinct"):
        addition_items(65, (1, 1))
    with pytest.raises(ValueError):
        addition_items(3, (1, 1, 1))
    with pytest.raises(ValueError):
        addition_items(0)


def test_best_on_dev():
    assert best_on_dev({"hand": [1, 0, 1], "auto": [1, 1, 0], "other": [0, 0, 1]}) == "hand"
    assert best_on_dev({"hand": [0, 0], "auto": [1, 0]}) == "auto"
    with pytest.raises(ValueError):
        best_on_dev({})
    with pytest.raises(ValueError, match="no dev scores"):
        best_on_dev({"a": []})
