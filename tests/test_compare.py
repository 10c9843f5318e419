"""Tests for utils.compare on a tiny ChatML tokenizer and a tiny random LlamaForCausalLM (no download)."""
import copy
import math

import peft
import pytest
import torch
from tiny_chatml import chatml_tokenizer, tiny_llama
from transformers import LlamaForCausalLM

from utils.compare import (METHODS, TaskCache, TopModel, build_task_cache, build_top, evaluate,
                           nf4_round_trip_, run_method, trainable_count)
from utils.finetune import label_logits, label_token_ids, pad_cached, top_forward, trunk_cache
from utils.lora import IA3Linear, lora_parameter_count
from utils.quant import nf4_levels
from utils.sft import build_example

CORPUS = ["The movie was great, a positive review.", "The film was dull and bad: negative.",
          "user assistant system Is this review positive or negative?"] * 5
PAIRS = [("Review: great fun", "positive"), ("Review: dull and bad, a very long and boring film", "negative"),
         ("Review: a great film", "positive"), ("Review: bad", "negative")]
LABELS = ["positive", "negative"]


@pytest.fixture(scope="module")
def tokenizer():
    return chatml_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    return tiny_llama(tokenizer, num_hidden_layers=3, max_position_embeddings=256, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def label_ids(tokenizer) -> list[int]:
    return label_token_ids(tokenizer, PAIRS[0][0], LABELS, system="")


def reference_logits(model, tokenizer, label_ids, n_top):
    """Label logits from utils.finetune's (already tested) split forward on whole sequences."""
    examples = [build_example(tokenizer, p, a, system="") for p, a in PAIRS]
    H, Y = pad_cached(trunk_cache(model, examples, n_top, tokenizer.pad_token_id))
    with torch.no_grad():
        return label_logits(model, top_forward(model, H, n_top), Y, label_ids)


@pytest.mark.parametrize("n_top", [1, 2, 3])
def test_shared_prefix_path_equals_the_split_forward(model, tokenizer, label_ids, n_top):
    task = build_task_cache(model, tokenizer, PAIRS, LABELS, n_top, batch_size=3)
    assert len(task) == len(PAIRS) and task.targets.tolist() == [0, 1, 0, 1]
    full = [build_example(tokenizer, p, a, system="")["labels"].index(label_ids[i]) for (p, a), i
            in zip(PAIRS, task.targets.tolist())]
    assert task.tokens(range(len(PAIRS))) == sum(full)  # prefix + suffix = the prompt's tokens
    top = build_top(model, n_top, label_ids, "zero-shot")
    assert trainable_count(top) == 0
    accuracy, logits = evaluate(top, task, batch_size=3)
    torch.testing.assert_close(logits, reference_logits(model, tokenizer, label_ids, n_top),
                               rtol=1e-5, atol=1e-5)
    assert accuracy == (logits.argmax(1) == task.targets).float().mean().item()


def test_prompt_and_prefix_start_as_the_same_function(model, tokenizer, label_ids):
    task = build_task_cache(model, tokenizer, PAIRS, LABELS, 2)
    prompt = build_top(model, 2, label_ids, "prompt", n_virtual=3, init_hidden=task.prefix)
    prefix = build_top(model, 2, label_ids, "prefix", n_virtual=3, init_hidden=task.prefix)
    assert trainable_count(prompt) == 3 * 32
    assert trainable_count(prefix) == 2 * 2 * 3 * 16  # layers x (k, v) x tokens x kv width
    torch.testing.assert_close(evaluate(prompt, task)[1], evaluate(prefix, task)[1], rtol=1e-5, atol=1e-5)


def test_prefix_equals_peft_prefix_tuning(model, tokenizer, label_ids):
    n_virtual = 3
    task = build_task_cache(model, tokenizer, PAIRS, LABELS, 3)  # every layer on top: trunk = embeddings
    ours = build_top(model, 3, label_ids, "prefix", n_virtual=n_virtual, init_hidden=task.prefix)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual)
    theirs = peft.get_peft_model(copy.deepcopy(model), config).eval()
    table = theirs.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        table.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
        kv = table.view(n_virtual, 2 * 3, 2, 8)  # tokens, (layer, k/v), kv heads, head dim
        for j, p in enumerate(ours.prefix):
            p.copy_(kv[:, j].permute(1, 0, 2))
    examples = [build_example(tokenizer, p, a, system="") for p, a in PAIRS]
    for i, ex in enumerate(examples):
        n = ex["labels"].index(label_ids[int(task.targets[i])])
        with torch.no_grad():
            out = theirs(input_ids=torch.tensor([ex["input_ids"][:n]])).logits[0, -1, label_ids]
        torch.testing.assert_close(evaluate(ours, task)[1][i], out, rtol=1e-4, atol=1e-4)


def test_ia3_equals_peft_ia3(model, tokenizer, label_ids):
    task = build_task_cache(model, tokenizer, PAIRS, LABELS, 3)
    ours = build_top(model, 3, label_ids, "ia3")
    assert trainable_count(ours) == 3 * (16 + 16 + 64)  # k and v outputs, down_proj input
    config = peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                            feedforward_modules=["down_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(model), config).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, module in ours.layers.named_modules():
            if isinstance(module, IA3Linear):
                module.scale.uniform_(0.5, 1.5, generator=gen)
                target = theirs.get_submodule(f"base_model.model.model.layers.{name}")
                target.ia3_l["default"].copy_(module.scale.view_as(target.ia3_l["default"]))
    examples = [build_example(tokenizer, p, a, system="") for p, a in PAIRS]
    for i, ex in enumerate(examples):
        n = ex["labels"].index(label_ids[int(task.targets[i])])
        with torch.no_grad():
            out = theirs(input_ids=torch.tensor([ex["input_ids"][:n]])).logits[0, -1, label_ids]
        torch.testing.assert_close(evaluate(ours, task)[1][i], out, rtol=1e-5, atol=1e-5)


def test_trainable_counts_and_nf4(model, label_ids):
    layer = model.model.layers[0]
    per_layer = sum(p.numel() for p in layer.parameters())
    assert trainable_count(build_top(model, 2, label_ids, "full")) == 2 * per_layer + 32 + 2 * 32
    assert trainable_count(build_top(model, 2, label_ids, "head")) == 32 + 2 * 32
    shapes = [(m.in_features, m.out_features) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    lora = sum(lora_parameter_count(i, o, 2) for i, o in shapes)
    dora = sum(lora_parameter_count(i, o, 2, use_dora=True) for i, o in shapes)
    assert trainable_count(build_top(model, 2, label_ids, "lora", rank=2)) == 2 * lora
    assert trainable_count(build_top(model, 2, label_ids, "dora", rank=2)) == 2 * dora
    qlora = build_top(model, 2, label_ids, "qlora", rank=2)
    assert trainable_count(qlora) == 2 * lora
    base = qlora.layers[0].self_attn.q_proj.base.weight.reshape(-1, 64)
    on_grid = base / base.abs().amax(dim=1, keepdim=True)
    assert torch.isclose(on_grid[..., None], nf4_levels(), atol=1e-6).any(-1).all()
    assert nf4_round_trip_(copy.deepcopy(layer)) == len(shapes)


def test_run_method_trains_and_measures(model, tokenizer, label_ids):
    task = build_task_cache(model, tokenizer, PAIRS, LABELS, 2)
    torch.manual_seed(0)
    top = build_top(model, 2, label_ids, "lora", rank=2)
    before = evaluate(top, task)[1]
    result = run_method(top, task, task, steps=6, batch_size=3, lr=1e-2, seed=0, warmup=1,
                        measure_memory=True)
    assert set(result) == {"accuracy", "trainable", "step_s", "tokens_per_s", "peak_bytes", "loss_first",
                           "loss_last"}
    assert result["peak_bytes"] > 0 and result["step_s"] > 0 and result["tokens_per_s"] > 0
    assert not torch.equal(before, evaluate(top, task)[1])
    one = run_method(build_top(model, 2, label_ids, "head"), task, task, steps=1, batch_size=2, lr=1e-3)
    assert math.isnan(one["peak_bytes"]) and one["loss_first"] == one["loss_last"]


def test_bad_inputs(model, tokenizer, label_ids):
    task = build_task_cache(model, tokenizer, PAIRS, LABELS, 2)
    empty = TaskCache(task.prefix, [], task.targets[:0], LABELS)
    with pytest.raises(ValueError, match="known methods are zero-shot, full"):
        build_top(model, 2, label_ids, "adapter")
    with pytest.raises(ValueError, match="rank"):
        build_top(model, 2, label_ids, "lora", rank=0)
    with pytest.raises(ValueError, match="n_top"):
        build_top(model, 4, label_ids, "full")
    with pytest.raises(ValueError, match="init_hidden"):
        build_top(model, 2, label_ids, "prompt")
    with pytest.raises(ValueError, match="init_hidden"):
        build_top(model, 2, label_ids, "prefix", n_virtual=99, init_hidden=task.prefix)
    with pytest.raises(ValueError, match="two label"):
        TopModel(model, 2, label_ids[:1])
    with pytest.raises(ValueError, match="no suffixes"):
        build_top(model, 2, label_ids, "full")(task.prefix, [])
    with pytest.raises(TypeError, match="nn.Linear"):
        IA3Linear(torch.nn.Conv1d(2, 2, 1))
    top = build_top(model, 2, label_ids, "head")
    for kwargs, match in (({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"), ({"lr": 0.0}, "lr")):
        args = {"steps": 2, "batch_size": 2, "lr": 1e-3, **kwargs}
        with pytest.raises(ValueError, match=match):
            run_method(top, task, task, **args)
    with pytest.raises(ValueError, match="non-empty"):
        run_method(top, empty, task, steps=2, batch_size=2, lr=1e-3)
    with pytest.raises(ValueError, match="no trainable"):
        run_method(build_top(model, 2, label_ids, "zero-shot"), task, task, steps=2, batch_size=2, lr=1e-3)
    with pytest.raises(ValueError, match="empty task"):
        evaluate(top, empty)
    with pytest.raises(ValueError, match="no \\(prompt, label\\) pairs"):
        build_task_cache(model, tokenizer, [], LABELS, 2)
    with pytest.raises(ValueError, match="not among the labels"):
        build_task_cache(model, tokenizer, [("Review: fine", "neutral")], LABELS, 2)
    with pytest.raises(ValueError, match="batch_size"):
        build_task_cache(model, tokenizer, PAIRS, LABELS, 2, batch_size=0)
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="share no first token"):
        build_task_cache(model, plain, [("great fun", "positive"), ("bad", "negative")], LABELS, 2,
                         system=None)
    assert "zero-shot" in METHODS
