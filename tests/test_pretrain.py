import math

import pytest
import torch

from utils.llama import Llama, LlamaConfig
from utils.pretrain import (CharTokenizer, TrainConfig, evaluate, get_batch, lm_loss, lr_at, pack, sample,
                            split_train_val, train_lm)

TEXT = "the cat sat on the mat. the dog sat on the log.\n" * 20


def tiny_model(vocab: int) -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                             rope_theta=10_000.0))


def test_char_tokenizer_round_trip_and_errors():
    tok = CharTokenizer(TEXT)
    assert tok.vocab_size == len(set(TEXT))
    assert tok.alphabet == sorted(tok.alphabet)
    assert tok.decode(tok.encode("the cat")) == "the cat"
    assert tok.decode(torch.tensor(tok.encode("dog"))) == "dog"
    with pytest.raises(ValueError, match="non-empty string"):
        CharTokenizer("")
    with pytest.raises(TypeError, match="needs a str"):
        tok.encode(["the"])
    with pytest.raises(ValueError, match="not in the alphabet"):
        tok.encode("zebra")
    with pytest.raises(ValueError, match="ids outside"):
        tok.decode([0, 999])


def test_pack_and_split():
    tok = CharTokenizer(TEXT)
    stream = pack(["the cat", "the dog"], tok)
    assert tok.decode(stream) == "the cat\nthe dog"
    with pytest.raises(ValueError, match="no text"):
        pack([], tok)
    train, val = split_train_val(torch.arange(100), 0.1)
    assert len(train) == 90 and len(val) == 10 and val[0] == 90
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(torch.arange(10), 1.0)
    with pytest.raises(ValueError, match="1-D"):
        split_train_val(torch.zeros(2, 5), 0.5)


def test_get_batch_targets_are_shifted_inputs():
    data = torch.arange(50)
    x, y = get_batch(data, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(y, x + 1)
    with pytest.raises(ValueError, match=">= 1"):
        get_batch(data, 0, 8)
    with pytest.raises(ValueError, match="context \\+ 1"):
        get_batch(torch.arange(5), 2, 8)


def test_lr_schedule_warms_up_then_decays_to_min():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(5, 1.0, 0, 10, 0.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_at(0, 1.0, 20, 10)


def test_train_config_validation():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="max_lr"):
        TrainConfig(max_lr=0)
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=10, warmup_steps=20)


def test_lm_loss_at_init_is_near_log_vocab_and_training_lowers_it():
    tok = CharTokenizer(TEXT)
    stream = pack([TEXT], tok)
    train, val = split_train_val(stream, 0.2)
    model = tiny_model(tok.vocab_size)
    before = evaluate(model, val, 4, 16, n_batches=2)
    assert before == pytest.approx(math.log(tok.vocab_size), abs=0.3)
    cfg = TrainConfig(steps=60, batch_size=8, context=16, max_lr=1e-2, warmup_steps=5, eval_every=30,
                      eval_batches=2)
    history = train_lm(model, train, cfg, val_data={"a": val, "b": train}, progress=lambda it, desc: it)
    assert history.val_steps == [30, 60]
    assert set(history.val_loss) == {"a", "b"}
    assert history.val_loss["a"][-1] < before - 1.0
    assert len(history.train_loss) == len(history.lr) == len(history.grad_norm) == 60
    assert model.training


def test_train_lm_single_val_stream_extra_loss_autocast_and_no_clip():
    tok = CharTokenizer(TEXT)
    stream = pack([TEXT], tok)
    model = tiny_model(tok.vocab_size)
    calls = []

    def extra(m):
        calls.append(1)
        return torch.zeros(())

    cfg = TrainConfig(steps=3, batch_size=2, context=8, warmup_steps=1, eval_every=2, eval_batches=1,
                      grad_clip=None, autocast_dtype=torch.bfloat16)
    history = train_lm(model, stream, cfg, val_data=stream, extra_loss=extra)
    assert list(history.val_loss) == ["val"] and history.val_steps == [2, 3]
    assert len(calls) == 3
    no_val = train_lm(model, stream, TrainConfig(steps=2, batch_size=2, context=8, warmup_steps=1))
    assert no_val.val_loss == {} and no_val.seconds > 0


def test_lm_loss_is_mean_negative_log_likelihood():
    model = tiny_model(10)
    x = torch.randint(10, (2, 5))
    y = torch.randint(10, (2, 5))
    logp = torch.log_softmax(model(x), dim=-1)
    manual = -logp.gather(-1, y[..., None]).mean()
    torch.testing.assert_close(lm_loss(model, x, y), manual)


def test_sample_is_reproducible_and_validates():
    tok = CharTokenizer(TEXT)
    model = tiny_model(tok.vocab_size)
    a = sample(model, tok, "the ", 20, context=8, seed=1)
    b = sample(model, tok, "the ", 20, context=8, seed=1)
    assert a == b and len(a) == 20
    assert sample(model, tok, "the ", 0) == ""
    with pytest.raises(ValueError, match="temperature"):
        sample(model, tok, "the ", 5, temperature=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(12)
    x = torch.randint(12, (2, 6))
    y = torch.randint(12, (2, 6))
    lm_loss(model, x, y).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    lm_loss(model, x, y).backward()
    for g, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, g)
