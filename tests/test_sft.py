"""Tests for utils.sft on a tiny byte-level BPE tokenizer with a ChatML template (as SmolLM2 uses) and
a tiny random LlamaForCausalLM: no downloaded model needed."""
import pytest
import torch
from tiny_chatml import CHATML, chatml_tokenizer, tiny_llama
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from utils.chat import IGNORE_INDEX
from utils.sft import (NEGATIVE_THRESHOLD, POSITIVE_THRESHOLD, build_example, collate, faq_pairs, masked_lm_loss,
                       sentiment_pairs)

CORPUS = ["What is Python? Python is a programming language.", "The movie was great, a positive review.",
          "The film was dull and bad: negative.", "user assistant system You are a helpful assistant."] * 5


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return chatml_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    return tiny_llama(tokenizer, num_hidden_layers=2, max_position_embeddings=256)


def boundary(example: dict) -> int:
    return next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)


def test_prompt_tokens_carry_no_loss_and_response_decodes_back(tokenizer):
    ex = build_example(tokenizer, "What is Python?", "A programming language.")
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is Python?"}],
                                               add_generation_prompt=True, return_dict=True)["input_ids"]
    b = boundary(ex)
    assert b == len(prompt_ids) and ex["input_ids"][:b] == list(prompt_ids)
    assert all(label == IGNORE_INDEX for label in ex["labels"][:b])
    assert ex["labels"][b:] == ex["input_ids"][b:]
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])
    assert tokenizer.decode(ex["input_ids"][:b]) == ("<|im_start|>user\nWhat is Python?<|im_end|>\n"
                                                     "<|im_start|>assistant\n")
    # the response and the template's end of turn are trained, so the model learns to stop
    assert tokenizer.decode(ex["labels"][b:]) == "A programming language.<|im_end|>\n"


def test_system_prompt_and_message_lists(tokenizer):
    ex = build_example(tokenizer, "Hi", "Hello", system="You are a helpful assistant.")
    text = tokenizer.decode(ex["input_ids"][:boundary(ex)])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi")
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Bye"}]
    multi = build_example(tokenizer, turns, "Goodbye")
    assert tokenizer.decode(multi["input_ids"][:boundary(multi)]).count("<|im_start|>") == 4
    assert tokenizer.decode(multi["labels"][boundary(multi):]) == "Goodbye<|im_end|>\n"
    assert turns[0] == {"role": "user", "content": "Hi"}  # the caller's list is not modified
    as_list = build_example(tokenizer, [{"role": "user", "content": "Hi"}], "Hello")
    assert as_list == build_example(tokenizer, "Hi", "Hello")


def test_truncation_keeps_the_prompt_and_cuts_the_response(tokenizer):
    full = build_example(tokenizer, "Hi", "The movie was great, a positive review.")
    b = boundary(full)
    cut = build_example(tokenizer, "Hi", "The movie was great, a positive review.", max_length=b + 3)
    assert len(cut["input_ids"]) == len(cut["labels"]) == len(cut["attention_mask"]) == b + 3
    assert cut["input_ids"] == full["input_ids"][:b + 3] and boundary(cut) == b
    assert build_example(tokenizer, "Hi", "ok", max_length=1000) == build_example(tokenizer, "Hi", "ok")
    with pytest.raises(ValueError, match="prompt alone has .* no room"):
        build_example(tokenizer, "Hi", "Hello", max_length=b)


def test_build_example_errors(tokenizer):
    with pytest.raises(ValueError, match="response is empty"):
        build_example(tokenizer, "Hi", "  ")
    with pytest.raises(TypeError, match="response must be a str"):
        build_example(tokenizer, "Hi", 3)
    with pytest.raises(ValueError, match="prompt is empty"):
        build_example(tokenizer, "", "Hello")
    with pytest.raises(TypeError, match="prompt must be"):
        build_example(tokenizer, 42, "Hello")
    with pytest.raises(TypeError, match="prompt must be"):
        build_example(tokenizer, [], "Hello")
    with pytest.raises(TypeError, match="each message"):
        build_example(tokenizer, [{"role": "user"}], "Hello")
    with pytest.raises(TypeError, match="system must be"):
        build_example(tokenizer, "Hi", "Hello", system=1)
    with pytest.raises(ValueError, match="already starts with a system"):
        build_example(tokenizer, [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
                      "Hello", system="S")
    no_template = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="no chat_template; set one .* or use a chat model"):
        build_example(no_template, "Hi", "Hello")
    # a template whose assistant turn does not start with its generation prompt
    broken = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, chat_template=(
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'A: ' + m['content'] }}{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"))
    with pytest.raises(ValueError, match="not render the prompt .* as a prefix"):
        build_example(broken, "Hi", "Hello")


def test_collate_pads_right_and_left(tokenizer):
    short, long = build_example(tokenizer, "Hi", "ok"), build_example(tokenizer, "Hi", "A much longer answer.")
    n_short, n_long, pad = len(short["input_ids"]), len(long["input_ids"]), tokenizer.pad_token_id
    right = collate([short, long], pad)
    assert set(right) == {"input_ids", "labels", "attention_mask"}
    assert all(t.shape == (2, n_long) and t.dtype == torch.long for t in right.values())
    assert right["input_ids"][0].tolist() == short["input_ids"] + [pad] * (n_long - n_short)
    assert right["labels"][0, n_short:].eq(IGNORE_INDEX).all()
    assert right["attention_mask"].sum(1).tolist() == [n_short, n_long]
    left = collate([short, {k: torch.tensor(v) for k, v in long.items()}], pad, padding_side="left")
    assert left["input_ids"][0].tolist() == [pad] * (n_long - n_short) + short["input_ids"]
    assert left["attention_mask"][0, : n_long - n_short].eq(0).all()
    assert left["labels"][1].tolist() == long["labels"]
    with pytest.raises(ValueError, match="no examples"):
        collate([], pad)
    with pytest.raises(ValueError, match="padding_side"):
        collate([short], pad, padding_side="middle")
    with pytest.raises(TypeError, match="pad_token_id must be an int"):
        collate([short], None)
    with pytest.raises(ValueError, match="labels has 1 entries"):
        collate([dict(short, labels=[1])], pad)


def test_masked_lm_loss_equals_transformers_loss(tokenizer, model):
    batch = collate([build_example(tokenizer, "Hi", "ok", system="Be brief."),
                     build_example(tokenizer, "What is Python?", "A programming language.")],
                    tokenizer.pad_token_id)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    ours = masked_lm_loss(out.logits, batch["labels"])
    assert torch.allclose(ours, out.loss, atol=1e-6)
    # only response positions count: changing a prompt-position logit leaves the loss unchanged
    logits = out.logits.detach().clone()
    logits[:, 0] += 5.0
    assert torch.allclose(masked_lm_loss(logits, batch["labels"]), ours, atol=1e-6)
    with pytest.raises(ValueError, match="need logits"):
        masked_lm_loss(out.logits[0], batch["labels"])
    with pytest.raises(ValueError, match="no token for the loss"):
        masked_lm_loss(out.logits, torch.full_like(batch["labels"], IGNORE_INDEX))


def test_faq_pairs_split():
    train, test = faq_pairs("train"), faq_pairs("test")
    assert len(train) + len(test) == 179 and (len(train), len(test)) == (143, 36)
    assert not {q for q, _ in train} & {q for q, _ in test}
    assert all(isinstance(q, str) and q and isinstance(a, str) and a for q, a in train + test)
    assert faq_pairs("test") == test and faq_pairs("test", seed=1) != test
    assert len(faq_pairs("test", test_fraction=0.5)) in (89, 90)
    with pytest.raises(ValueError, match="split must be"):
        faq_pairs("validation")
    with pytest.raises(ValueError, match="test_fraction"):
        faq_pairs("test", test_fraction=1.0)
    with pytest.raises(ValueError, match="test split is empty"):
        faq_pairs("test", test_fraction=0.001)


def test_sentiment_pairs_split_and_balance():
    train, test = sentiment_pairs("train"), sentiment_pairs("test")
    assert (len(train), len(test)) == (7318, 1830)  # 4,574 reviews per class (one repeated text dropped)
    for pairs in (train, test):
        labels = [label for _, label in pairs]
        assert labels.count("positive") == labels.count("negative") == len(pairs) // 2
        assert labels[:4] == ["positive", "negative", "positive", "negative"]  # prefixes stay balanced
    assert not {p for p, _ in train} & {p for p, _ in test}
    assert "Review: " in test[0][0] and test[0][0].startswith("Is the following movie review")
    assert sentiment_pairs("test") == test and sentiment_pairs("test", seed=1) != test
    assert POSITIVE_THRESHOLD == 1.0 and NEGATIVE_THRESHOLD == -1.0
    with pytest.raises(ValueError, match="split must be"):
        sentiment_pairs("dev")
    with pytest.raises(ValueError, match="train split is empty"):
        sentiment_pairs("train", test_fraction=0.99999)
