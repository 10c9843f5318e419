"""Tests for utils.lora: LoRA and DoRA layers against peft's (forward, dropout, merge), whole models,
training, parameter counts, every error path, and adapters saved, loaded, refused and swapped.
A tiny random Llama keeps the file fast; no checkpoint is loaded."""
import copy
import json
import math

import pytest
import torch
from torch import nn

from utils.lora import (DoRALinear, LoRALinear, apply_lora, copy_lora_to_peft, load_adapter, lora_layers,
                        lora_parameter_count, lora_state_dict, merge_lora, save_adapter, set_adapter_weights,
                        trainable_parameter_report, unload_lora)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=100)
TARGETS = ["q_proj", "v_proj"]
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(TINY["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0))


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B (and a magnitude away from the norm) so that the adapter actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def peft_layer(linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_dora: bool = False):
    """peft's LoRA layer on a copy of ``linear`` (the same way get_peft_model builds one)."""
    from peft.tuners.lora import Linear as PeftLinear
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, use_dora=use_dora)
    return PeftLinear(copy.deepcopy(linear), "default", r=rank, lora_alpha=alpha, lora_dropout=dropout,
                      use_dora=use_dora, config=config)


def peft_model(model: nn.Module, rank: int, alpha: float, use_dora: bool = False, targets=TARGETS):
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), use_dora=use_dora)
    return peft.get_peft_model(copy.deepcopy(model), config).eval()


def copy_layer_to_peft(ours: LoRALinear, theirs) -> None:
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
        if isinstance(ours, DoRALinear):
            theirs.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)


# --- one layer ---------------------------------------------------------------------------------------------

def test_init_is_peft_like_and_starts_as_the_base():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = LoRALinear(linear, rank=4, alpha=8)
    assert layer.lora_A.shape == (4, 64) and layer.lora_B.shape == (48, 4) and layer.scaling == 2.0
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(64) and layer.lora_A.std() > 0.5 / math.sqrt(3 * 64)
    assert torch.all(layer.lora_B == 0) and not linear.weight.requires_grad
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), linear(x))
    assert "rank=4, alpha=8, dropout=0.0" in repr(layer)
    dora = DoRALinear(nn.Linear(64, 48), rank=4, alpha=8)
    torch.testing.assert_close(dora.magnitude, dora.base.weight.norm(dim=1))
    torch.testing.assert_close(dora(x), dora.base(x))


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_equals_peft(use_dora, bias):
    torch.manual_seed(0)
    cls = DoRALinear if use_dora else LoRALinear
    ours = cls(nn.Linear(24, 40, bias=bias), rank=3, alpha=7, dropout=0.3).eval()
    randomize(ours)
    theirs = peft_layer(ours.base, rank=3, alpha=7, dropout=0.3, use_dora=use_dora).eval()
    copy_layer_to_peft(ours, theirs)
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)  # eval: dropout is off
        ours.train(), theirs.train()
        torch.manual_seed(3)
        y_ours = ours(x)
        torch.manual_seed(3)  # the same dropout mask
        torch.testing.assert_close(y_ours, theirs(x), rtol=0, atol=1e-6)
        assert not torch.allclose(y_ours, ours.eval()(x))  # dropout did something
    for layer in (ours, theirs):  # the same gradients: peft detaches the DoRA norm, so do we
        layer.eval()(x).pow(2).sum().backward()
    names = ["lora_A", "lora_B"] + (["lora_magnitude_vector"] if use_dora else [])
    for ours_p, name in zip((ours.lora_A, ours.lora_B, getattr(ours, "magnitude", None)), names):
        torch.testing.assert_close(ours_p.grad, getattr(theirs, name)["default"].weight.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        theirs.merge()
        torch.testing.assert_close(ours.merged_weight(), theirs.get_base_layer().weight, rtol=0, atol=1e-6)
        merged = ours.merge()
        assert isinstance(merged, nn.Linear) and not merged.weight.requires_grad
        torch.testing.assert_close(merged(x), ours(x), rtol=0, atol=1e-6)


def test_dora_norm_is_per_output_row_and_detached():
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(16, 8), rank=2, alpha=4)
    randomize(layer)
    w = layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(layer.weight_norm(), w.norm(dim=1))
    torch.testing.assert_close(layer.merged_weight().norm(dim=1), layer.magnitude.detach())  # W' rows have norm m
    layer(torch.randn(4, 16)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.lora_A, layer.lora_B, layer.magnitude))


# --- whole models ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_dora", [False, True])
def test_model_logits_and_merge_equal_peft(base, ids, use_dora):
    model = copy.deepcopy(base)
    names = apply_lora(model, TARGETS, rank=4, alpha=8, use_dora=use_dora)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert all(type(m) is (DoRALinear if use_dora else LoRALinear) for m in lora_layers(model).values())
    assert not any(m.training for m in lora_layers(model).values())  # the mode of the layers they replace
    randomize(model)
    theirs = peft_model(base, rank=4, alpha=8, use_dora=use_dora)
    copy_lora_to_peft(model, theirs)
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, theirs(ids).logits, rtol=0, atol=1e-5)
        assert not torch.allclose(logits, base(ids).logits, atol=1e-3)  # the adapter matters
        assert merge_lora(model) is model and not lora_layers(model)
        unloaded = theirs.merge_and_unload()
        for name, param in unloaded.named_parameters():
            torch.testing.assert_close(model.get_parameter(name), param, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(ids).logits, unloaded(ids).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_training_changes_only_the_adapter(base, ids, use_dora):
    model = copy.deepcopy(base).train()
    apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], rank=4, alpha=8, dropout=0.1, use_dora=use_dora)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=2e-2)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for name, p in model.named_parameters():
        is_adapter = name.rsplit(".", 1)[1] in ("lora_A", "lora_B", "magnitude")
        assert p.requires_grad == is_adapter
        assert torch.equal(p, before[name]) != is_adapter, name  # adapters moved, nothing else did


def test_parameter_counts(base):
    assert lora_parameter_count(576, 576, 8) == 8 * 1152
    assert lora_parameter_count(576, 192, 8, use_dora=True) == 8 * 768 + 192
    model = copy.deepcopy(base)
    total = sum(p.numel() for p in base.parameters())
    assert trainable_parameter_report(model)["trainable"] == total
    apply_lora(model, TARGETS, rank=4, alpha=8)
    expected = 2 * (lora_parameter_count(32, 32, 4) + lora_parameter_count(32, 16, 4))  # q 32->32, v 32->16
    report = trainable_parameter_report(model)
    assert report == {"trainable": expected, "total": total + expected, "fraction": expected / (total + expected)}
    theirs = peft_model(base, rank=4, alpha=8)
    assert theirs.get_nb_trainable_parameters() == (expected, total + expected)
    assert trainable_parameter_report(nn.Module())["fraction"] == 0.0
    with pytest.raises(ValueError, match="rank must be a positive int"):
        lora_parameter_count(8, 8, 0)


def test_unload_restores_the_base(base, ids):
    model = copy.deepcopy(base)
    apply_lora(model, TARGETS, rank=2, alpha=2)
    randomize(model)
    assert unload_lora(model) is model and not lora_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits)


# --- errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0, alpha=1), "rank 0 is invalid"),
    (dict(rank=9, alpha=1), r"\[1, 8\] for a 16 -> 8 layer"),
    (dict(rank=2.0, alpha=1), "rank 2.0"),
    (dict(rank=True, alpha=1), "rank True"),
    (dict(rank=2, alpha=0), "alpha must be a number > 0"),
    (dict(rank=2, alpha=-1.5), "alpha must be a number > 0"),
    (dict(rank=2, alpha=1, dropout=1.0), r"dropout must be a probability in \[0, 1\)"),
    (dict(rank=2, alpha=1, dropout=-0.1), "dropout must be"),
])
def test_layer_argument_errors(kwargs, message):
    for cls in (LoRALinear, DoRALinear):
        with pytest.raises(ValueError, match=message):
            cls(nn.Linear(16, 8), **kwargs)


def test_base_must_be_linear():
    with pytest.raises(TypeError, match="wraps an nn.Linear, got Conv1d"):
        LoRALinear(nn.Conv1d(4, 4, 1), rank=1, alpha=1)
    with pytest.raises(TypeError, match="got LoRALinear"):
        LoRALinear(LoRALinear(nn.Linear(4, 4), rank=1, alpha=1), rank=1, alpha=1)


def test_apply_lora_errors(base):
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"no linear layer matches target\(s\) \['query'\]") as err:
        apply_lora(model, ["q_proj", "query"], rank=2, alpha=2)
    assert ("['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"
            in str(err.value))
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.v_proj': rank 17 is invalid"):
        apply_lora(model, TARGETS, rank=17, alpha=2)  # v_proj is 32 -> 16
    with pytest.raises(ValueError, match="alpha must be"):
        apply_lora(model, TARGETS, rank=2, alpha=0)
    for bad in ("q_proj", []):
        with pytest.raises(ValueError, match="non-empty list of names"):
            apply_lora(model, bad, rank=2, alpha=2)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # untouched
    apply_lora(model, TARGETS, rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model, ["k_proj"], rank=2, alpha=2)
    with pytest.raises(ValueError, match="no LoRA layers to merge"):
        merge_lora(copy.deepcopy(base))
    with pytest.raises(ValueError, match="no LoRA layers to save"):
        save_adapter(copy.deepcopy(base), "unused")


def test_copy_to_peft_errors(base):
    model = copy.deepcopy(base)
    apply_lora(model, TARGETS, rank=4, alpha=8)
    with pytest.raises(ValueError, match="same target_modules"):
        copy_lora_to_peft(model, peft_model(base, rank=4, alpha=8, targets=["q_proj"]))
    with pytest.raises(ValueError, match="peft has r=4, scaling=1.0"):
        copy_lora_to_peft(model, peft_model(base, rank=4, alpha=4))


# --- adapters ----------------------------------------------------------------------------------------------

def adapted(base, seed, **kwargs) -> nn.Module:
    model = copy.deepcopy(base)
    apply_lora(model, **{"target_modules": TARGETS, "rank": 4, "alpha": 8, **kwargs})
    randomize(model, seed)
    return model


def test_save_load_round_trip_and_swap(base, ids, tmp_path):
    first = adapted(base, seed=1)
    second = adapted(base, seed=2, target_modules=["o_proj", "down_proj"], rank=2, alpha=4, use_dora=True)
    save_adapter(first, tmp_path / "first")
    save_adapter(second, tmp_path / "second")
    meta = json.loads((tmp_path / "second" / "adapter.json").read_text())
    assert meta["rank"] == 2 and meta["use_dora"] and meta["target_modules"] == ["down_proj", "o_proj"]
    assert meta["base"]["config"]["hidden_size"] == 32 and len(meta["fingerprint"]) == 16
    assert meta["base"]["layers"]["model.layers.1.mlp.down_proj"] == [32, 64]
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "second" / "adapter.safetensors")
    assert set(saved) == set(lora_state_dict(second)) and all("base" not in key for key in saved)
    with torch.no_grad():
        expected = {"first": first(ids).logits, "second": second(ids).logits}
        served = copy.deepcopy(base)
        for name in ("first", "second", "first"):  # one base, adapters swapped in place
            load_adapter(served, tmp_path / name)
            torch.testing.assert_close(served(ids).logits, expected[name], rtol=0, atol=0)
        assert not any(p.requires_grad for name, p in served.named_parameters() if "lora" not in name)


def test_load_refuses_a_base_that_does_not_fit(base, tmp_path):
    save_adapter(adapted(base, seed=1), tmp_path)
    with pytest.raises(ValueError, match=r"does not fit this model: config: .*'hidden_size': 32.*'hidden_size': 48"):
        load_adapter(tiny_llama(hidden_size=48), tmp_path)
    with pytest.raises(ValueError, match=r"layer model.layers.0.self_attn.q_proj: adapter \(out, in\) = \[32, 32\]"):
        load_adapter(tiny_llama(hidden_size=48), tmp_path)
    with pytest.raises(ValueError, match=r"model lacks: \['model.layers.1.self_attn.q_proj'"):
        load_adapter(tiny_llama(num_hidden_layers=1), tmp_path)
    with pytest.raises(ValueError, match="model_class: adapter 'LlamaForCausalLM', model 'LlamaModel'"):
        load_adapter(tiny_llama().model, tmp_path)
    (tmp_path / "adapter.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an adapter written by utils.lora.save_adapter"):
        load_adapter(copy.deepcopy(base), tmp_path)


def test_set_adapter_weights_checks_names_and_shapes(base, ids):
    model = adapted(base, seed=1)
    tensors = {k: v.clone() for k, v in lora_state_dict(model).items()}
    other = adapted(base, seed=2)
    set_adapter_weights(other, tensors)
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=0, atol=0)
    key = "model.layers.0.self_attn.q_proj.lora_A"
    with pytest.raises(ValueError, match=rf"missing \['{key}'\], unexpected \['typo'\]"):
        set_adapter_weights(other, {**{k: v for k, v in tensors.items() if k != key}, "typo": tensors[key]})
    with pytest.raises(ValueError, match=rf"{key}: adapter tensor has shape \(4, 31\)"):
        set_adapter_weights(other, {**tensors, key: torch.zeros(4, 31)})


def test_save_needs_one_setting(base, tmp_path):
    model = adapted(base, seed=1)
    model.model.layers[0].self_attn.q_proj = LoRALinear(nn.Linear(32, 32), rank=2, alpha=8)
    with pytest.raises(ValueError, match="one rank/alpha/dropout/DoRA setting"):
        save_adapter(model, tmp_path)
