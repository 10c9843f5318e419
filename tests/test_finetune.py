"""Tests for utils.finetune on a tiny ChatML tokenizer and a tiny random LlamaForCausalLM (no download)."""
import pytest
import torch
from tiny_chatml import chatml_tokenizer, tiny_llama
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from utils.finetune import (answer_positions, label_logits, label_token_ids, pad_cached, response_loss,
                            score_labels, top_forward, top_parameters, train_top_layers,
                            trunk_cache)
from utils.chat import IGNORE_INDEX
from utils.sft import build_example, collate, masked_lm_loss

CORPUS = ["The movie was great, a positive review.", "The film was dull and bad: negative.",
          "user assistant system Is this review positive or negative?"] * 5
PAIRS = [("Review: great fun", "positive"), ("Review: dull and bad, a very long and boring film", "negative"),
         ("Review: a great film", "positive")]
LABELS = ["positive", "negative"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return chatml_tokenizer(CORPUS)


def llama(tokenizer, attn: str) -> LlamaForCausalLM:
    return tiny_llama(tokenizer, num_hidden_layers=3, max_position_embeddings=256, attn_implementation=attn)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tokenizer) -> LlamaForCausalLM:
    return llama(tokenizer, request.param)


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[dict]:
    return [build_example(tokenizer, p, a) for p, a in PAIRS]


@pytest.mark.parametrize("n_top", [1, 2, 3])
def test_split_forward_equals_the_whole_model(model, tokenizer, examples, n_top):
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        full = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
        H, Y = pad_cached(trunk_cache(model, examples, n_top, tokenizer.pad_token_id, batch_size=2))
        ours = model.lm_head(top_forward(model, H, n_top))
    assert torch.equal(Y, batch["labels"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], full[real], rtol=1e-5, atol=1e-5)


def test_response_loss_equals_masked_lm_loss_and_the_models_own(model, tokenizer, examples):
    batch = collate(examples, tokenizer.pad_token_id)
    out = model(**batch, output_hidden_states=True)
    expected = masked_lm_loss(out.logits, batch["labels"])
    torch.testing.assert_close(response_loss(model, out.hidden_states[-1], batch["labels"]), expected)
    torch.testing.assert_close(out.loss, expected)


def test_gradients_reach_only_the_top(tokenizer, examples):
    model = llama(tokenizer, "sdpa")
    H, Y = pad_cached(trunk_cache(model, examples, 1, tokenizer.pad_token_id))
    assert not H.requires_grad and model.training is False
    response_loss(model, top_forward(model, H, 1), Y).backward()
    assert model.model.layers[2].mlp.up_proj.weight.grad is not None
    assert model.model.layers[0].mlp.up_proj.weight.grad is None


def test_label_scores_from_cache_equal_whole_model_scores(model, tokenizer, examples):
    ids = label_token_ids(tokenizer, PAIRS[0][0], LABELS)
    assert ids == [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.tokenize("positive")[:1]] + \
        [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.tokenize("negative")[:1]]
    with torch.no_grad():
        H, Y = pad_cached(trunk_cache(model, examples, 2, tokenizer.pad_token_id))
        cached = label_logits(model, top_forward(model, H, 2), Y, ids)
    model.train()
    whole = score_labels(model, tokenizer, [p for p, _ in PAIRS], LABELS, batch_size=2)
    assert model.training  # restored
    model.eval()
    assert whole.shape == (len(PAIRS), 2)
    torch.testing.assert_close(cached, whole, rtol=1e-4, atol=1e-4)


def test_answer_positions(tokenizer, examples):
    Y = collate(examples, tokenizer.pad_token_id)["labels"]
    first = [ex["labels"].index(ex["input_ids"][next(i for i, y in enumerate(ex["labels"]) if y != -100)])
             for ex in examples]
    assert answer_positions(Y).tolist() == [f - 1 for f in first]


def test_bad_inputs(model, tokenizer, examples):
    with pytest.raises(ValueError, match="n_top"):
        trunk_cache(model, examples, 0, tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="n_top"):
        top_forward(model, torch.zeros(1, 2, 32), 4)
    with pytest.raises(TypeError, match="model.model.layers"):
        top_forward(torch.nn.Linear(2, 2), torch.zeros(1, 2, 32), 1)
    with pytest.raises(ValueError, match="no examples"):
        trunk_cache(model, [], 1, tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="batch_size"):
        trunk_cache(model, examples, 1, tokenizer.pad_token_id, batch_size=0)
    with pytest.raises(ValueError, match="no items"):
        pad_cached([])
    with pytest.raises(ValueError, match="positions"):
        pad_cached([(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))])
    with pytest.raises(ValueError, match="batch, seq, d"):
        top_forward(model, torch.zeros(2, 32), 1)
    with pytest.raises(ValueError, match="need hidden"):
        response_loss(model, torch.zeros(1, 3, 32), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="no token"):
        response_loss(model, torch.zeros(1, 3, 32), torch.full((1, 3), IGNORE_INDEX))
    with pytest.raises(ValueError, match="batch, seq"):
        answer_positions(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="response"):
        answer_positions(torch.full((1, 3), IGNORE_INDEX))
    with pytest.raises(ValueError, match="at least two"):
        label_token_ids(tokenizer, "Review: fun", ["positive"])
    with pytest.raises(ValueError, match="same token"):
        label_token_ids(tokenizer, "Review: fun", ["positive", "positively"])
    with pytest.raises(ValueError, match="no prompts"):
        score_labels(model, tokenizer, [], LABELS)
    with pytest.raises(ValueError, match="batch_size"):
        score_labels(model, tokenizer, ["Review: fun"], LABELS, batch_size=0)


def test_train_top_layers_trains_only_the_top_and_lowers_the_loss(tokenizer, examples):
    model = llama(tokenizer, "sdpa")
    items = trunk_cache(model, examples, 1, tokenizer.pad_token_id)
    bottom = [p.detach().clone() for p in model.model.layers[0].parameters()]
    top = [p.detach().clone() for p in top_parameters(model, 1)]
    seen = []
    losses = train_top_layers(model, items, 1, steps=12, batch_size=3, lr=1e-2, warmup=2,
                              progress=lambda steps: (seen.append(1) or steps))
    assert len(losses) == 12 and seen == [1] and losses[-1] < losses[0]
    assert all(torch.equal(p, q) for p, q in zip(bottom, model.model.layers[0].parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(top, top_parameters(model, 1)))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    again = llama(tokenizer, "sdpa")  # the same seed gives the same run
    assert train_top_layers(again, trunk_cache(again, examples, 1, tokenizer.pad_token_id), 1,
                            steps=12, batch_size=3, lr=1e-2, warmup=2) == losses


def test_train_top_layers_errors(model, tokenizer, examples):
    items = trunk_cache(model, examples, 1, tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="at least one cached item"):
        train_top_layers(model, [], 1, steps=1, batch_size=1, lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        train_top_layers(model, items, 1, steps=1, batch_size=1, lr=0)
    with pytest.raises(ValueError, match="steps"):
        train_top_layers(model, items, 1, steps=0, batch_size=1, lr=1e-3)
