"""Tests for utils.chat on a tiny ChatML tokenizer and a tiny random LlamaForCausalLM (no download)."""
import pytest
import torch
from tiny_chatml import CHATML, chatml_tokenizer, tiny_llama
from transformers import DynamicCache, PreTrainedTokenizerFast

from utils import chat
from utils.constrained import RegexLogitsProcessor, TokenIndex, compile_regex, vocabulary_bytes

CORPUS = ["What is Python? Python is a programming language.", "The movie was great, a positive review.",
          "The film was dull and bad: negative.", "user assistant system You are a helpful assistant.",
          "Sources: [1] [2] Question: Answer According to source [1], the answer is"] * 5


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return chatml_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer, num_hidden_layers=2, max_position_embeddings=256)


# --------------------------------------------------------------------------------------- messages

def test_messages_from_strings_and_chats():
    assert chat.messages("Hi") == [{"role": "user", "content": "Hi"}]
    assert chat.messages("Hi", system="") == [{"role": "system", "content": ""},
                                              {"role": "user", "content": "Hi"}]
    given = [{"role": "user", "content": "Hi"}]
    out = chat.messages(given, system="S")
    assert out[0] == {"role": "system", "content": "S"} and given == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("prompt, system, error, match", [
    ("", None, ValueError, "prompt is empty"),
    ("   ", None, ValueError, "prompt is empty"),
    ([], None, TypeError, "non-empty"),
    (None, None, TypeError, "non-empty str"),
    ([{"content": "x"}], None, TypeError, "'role' and 'content'"),
    ("Hi", 3, TypeError, "system must be a str"),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "u"}], "S2", ValueError,
     "already starts with a system message"),
])
def test_messages_errors(prompt, system, error, match):
    with pytest.raises(error, match=match):
        chat.messages(prompt, system)


# --------------------------------------------------------------------------------------- token ids

def test_prompt_ids_equal_chat_ids_and_render(tokenizer):
    for prompt, system in [("What is Python?", None), ("Hi", ""), ("The film", "You are helpful.")]:
        msgs = chat.messages(prompt, system)
        ids = chat.prompt_ids(tokenizer, prompt, system)
        assert ids == chat.chat_ids(tokenizer, msgs, add_generation_prompt=True)
        assert tokenizer.decode(ids) == chat.render_prompt(tokenizer, prompt, system=system)
        assert chat.prompt_tokens(tokenizer, prompt, system=system) == len(ids)
    text = chat.render_prompt(tokenizer, "Why?")
    assert text == "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    assert chat.render_prompt(tokenizer, "Why?", "Source [") == text + "Source ["
    assert chat.prompt_tokens(tokenizer, "Why?", "Source [") > chat.prompt_tokens(tokenizer, "Why?")
    full = chat.chat_ids(tokenizer, [{"role": "user", "content": "Why?"},
                                     {"role": "assistant", "content": "Because."}], False)
    assert full[:len(chat.prompt_ids(tokenizer, "Why?"))] == chat.prompt_ids(tokenizer, "Why?")


def test_no_chat_template_is_a_clear_error(tokenizer):
    plain = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    for call in (lambda: chat.chat_ids(plain, [{"role": "user", "content": "x"}], True),
                 lambda: chat.prompt_ids(plain, "x"), lambda: chat.render_prompt(plain, "x")):
        with pytest.raises(ValueError, match="no chat_template"):
            call()
    with pytest.raises(TypeError, match="assistant_prefix"):
        chat.render_prompt(tokenizer, "x", None)
    with pytest.raises(ValueError, match="prompt is empty"):
        chat.prompt_ids(tokenizer, "")


# ---------------------------------------------------------------------------------------- padding

def test_pad_token_id_rule(tokenizer):
    assert chat.pad_token_id(tokenizer) == tokenizer.pad_token_id
    eos_only = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>",
                                       chat_template=CHATML)
    assert eos_only.pad_token_id is None and chat.pad_token_id(eos_only) == eos_only.eos_token_id
    neither = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, chat_template=CHATML)
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        chat.pad_token_id(neither)


def test_left_pad():
    ids, mask = chat.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
    with pytest.raises(ValueError, match="each non-empty"):
        chat.left_pad([[1], []], 0)
    with pytest.raises(ValueError, match="at least one"):
        chat.left_pad([], 0)
    with pytest.raises(TypeError, match="pad_id must be an int"):
        chat.left_pad([[1]], None)


# ------------------------------------------------------------------------------------- generation

def _alone(model, tokenizer, prompt, n, prefix=""):
    """One prompt, no padding: the reference for a batched, left-padded run."""
    ids = torch.tensor([chat.prompt_ids(tokenizer, prompt, assistant_prefix=prefix)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return (prefix + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)).strip()


def test_left_padded_batches_equal_unpadded_generation(model, tokenizer):
    prompts = ["What is Python?", "Hi", [{"role": "user", "content": "The film was dull and bad."}]]
    batched = chat.generate_replies(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert len(batched) == 3 and all(isinstance(r, str) and r for r in batched)  # non-empty: a real check
    assert batched == [_alone(model, tokenizer, p, 6) for p in prompts]
    assert chat.generate_replies(model, tokenizer, prompts, max_new_tokens=6, batch_size=2) == batched
    pre = chat.generate_replies(model, tokenizer, prompts[:2], max_new_tokens=4, assistant_prefix="Source [")
    assert all(a.startswith("Source [") for a in pre)
    assert pre == [_alone(model, tokenizer, p, 4, "Source [") for p in prompts[:2]]
    assert chat.generate_replies(model, tokenizer, [], max_new_tokens=4) == []
    ids = [chat.prompt_ids(tokenizer, p) for p in prompts]
    assert [t.strip() for t in chat.greedy_continuations(model, tokenizer, ids, max_new_tokens=6)] == batched


def test_generation_restores_mode_and_needs_no_pad_token(model, tokenizer):
    model.train()
    chat.generate_replies(model, tokenizer, ["Hi"], max_new_tokens=1)
    assert model.training  # the caller's mode is restored
    model.eval()
    eos_only = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>",
                                       chat_template=CHATML)
    (reply,) = chat.generate_replies(model, eos_only, ["Hi"], max_new_tokens=3)
    assert reply == chat.generate_replies(model, tokenizer, ["Hi"], max_new_tokens=3)[0]
    assert eos_only.pad_token is None and eos_only.padding_side == "right"  # the tokenizer is untouched


def test_generation_errors(model, tokenizer):
    msgs = [{"role": "user", "content": "Why?"}]
    with pytest.raises(TypeError, match="wrap a single chat"):
        chat.generate_replies(model, tokenizer, msgs)
    with pytest.raises(TypeError, match="wrap a single chat"):
        chat.generate_replies(model, tokenizer, "Why?")
    with pytest.raises(ValueError, match="max_new_tokens"):
        chat.generate_replies(model, tokenizer, ["Hi"], max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        chat.generate_replies(model, tokenizer, ["Hi"], batch_size=0)
    with pytest.raises(ValueError, match="at least one token"):
        chat.greedy_continuations(model, tokenizer, [[1], []])
    neither = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, chat_template=CHATML)
    with pytest.raises(ValueError, match="neither a pad token nor an eos"):
        chat.generate_replies(model, neither, ["Hi"])


def test_without_an_eos_token_the_model_decides_when_to_stop(model, tokenizer):
    pad_only = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, pad_token="<|im_end|>",
                                       chat_template=CHATML)
    assert pad_only.eos_token_id is None
    ids = [chat.prompt_ids(tokenizer, "Hi")]
    assert chat.greedy_continuations(model, pad_only, ids, 4) == chat.greedy_continuations(model, tokenizer, ids, 4)


def test_a_processor_factory_shapes_every_batch(model, tokenizer):
    forced = tokenizer("Python", add_special_tokens=False).input_ids[0]
    expected = tokenizer.decode([forced] * 3)
    made = []

    def factory():
        def only_forced(input_ids, scores):
            out = torch.full_like(scores, float("-inf"))
            out[:, forced] = 0.0
            return out
        made.append(only_forced)
        return only_forced

    prompts = ["What is Python?", "Hi", "The film was dull and bad."]
    replies = chat.generate_replies(model, tokenizer, prompts, max_new_tokens=3, batch_size=2,
                                    processor=factory)
    assert len(made) == 2  # one fresh processor per batch
    assert expected.strip() and replies == [expected.strip()] * 3, replies


# --------------------------------------------------------------------- a shared prefix, run once

SYSTEM = [{"role": "system", "content": "You are a helpful assistant."}]


def test_prefix_cache_and_repeat_cache(model, tokenizer):
    ids = chat.prompt_ids(tokenizer, "What is Python?")
    cache = chat.prefix_cache(model, ids[:5])
    two = chat.repeat_cache(cache, 2)
    assert two.get_seq_length() == 5 and cache.get_seq_length() == 5
    rest = torch.tensor([ids[5:]] * 2)
    with torch.no_grad():
        split = model(input_ids=rest, past_key_values=two).logits[:, -1]
        whole = model(input_ids=torch.tensor([ids])).logits[:, -1]
    torch.testing.assert_close(split, whole.expand(2, -1))
    with pytest.raises(ValueError, match="non-empty prefix_ids"):
        chat.prefix_cache(model, [])
    with pytest.raises(ValueError, match="rows"):
        chat.repeat_cache(cache, 0)


def test_chat_generator_greedy_equals_generate_replies(model, tokenizer):
    chats = [[*SYSTEM, {"role": "user", "content": q}]
             for q in ["What is Python?", "a positive review", "bad"]]
    gen = chat.ChatGenerator(model, tokenizer, max_new_tokens=6, batch_size=2)
    want = chat.generate_replies(model, tokenizer, chats, max_new_tokens=6, batch_size=3)
    assert gen(chats) == want
    assert gen(chats) == want  # the kept prefix cache is copied, not consumed
    assert gen([]) == []
    assert gen.count_tokens("What is") == len(tokenizer("What is")["input_ids"])
    one = chat.ChatGenerator(model, tokenizer, max_new_tokens=6)
    assert one(chats[:1]) == want[:1]  # one chat: all but its last token shared
    model.train()
    gen(chats[:1])
    assert model.training  # the mode is restored
    model.eval()


def test_chat_generator_runs_the_prefix_again_after_the_weights_change(tokenizer):
    model = tiny_llama(tokenizer, num_hidden_layers=2, max_position_embeddings=256)
    chats = [[*SYSTEM, {"role": "user", "content": q}] for q in ["What is Python?", "bad"]]
    gen = chat.ChatGenerator(model, tokenizer, max_new_tokens=5)
    before = gen(chats)
    with torch.no_grad():
        for p in model.model.layers[0].parameters():
            p.mul_(-3.0)  # an in-place change, as an optimiser step makes
    after = gen(chats)
    assert after == chat.generate_replies(model, tokenizer, chats, max_new_tokens=5)
    assert after != before


def test_chat_generator_constrained_and_sampled(model, tokenizer):
    index = TokenIndex(compile_regex("yes|no"), vocabulary_bytes(tokenizer), tokenizer.eos_token_id)
    chats = [[*SYSTEM, {"role": "user", "content": q}] for q in ["What is Python?", "bad"]]
    assert set(chat.ChatGenerator(model, tokenizer, 4, index=index)(chats)) <= {"yes", "no"}
    torch.manual_seed(0)
    sampled = chat.ChatGenerator(model, tokenizer, 4, index=index, temperature=1.5)(chats * 4)
    assert set(sampled) <= {"yes", "no"}
    with pytest.raises(ValueError, match="temperature"):
        chat.ChatGenerator(model, tokenizer, temperature=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        chat.ChatGenerator(model, tokenizer, max_new_tokens=0)


# ------------------------------------------------------------------ a cache that does not copy itself

def test_in_place_cache_equals_dynamic_cache(model, tokenizer, monkeypatch):
    monkeypatch.setattr(chat._InPlaceLayer, "room", 3)  # the buffer grows several times below
    ids, mask = chat.left_pad([chat.prompt_ids(tokenizer, q) for q in ["What is Python?", "bad"]],
                              chat.pad_token_id(tokenizer))
    runs = {}
    for name, cache in [("dynamic", DynamicCache()), ("in place", chat.InPlaceCache())]:
        runs[name] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12,
                                    min_new_tokens=12, do_sample=False, past_key_values=cache,
                                    pad_token_id=0, output_scores=True,
                                    return_dict_in_generate=True)
    assert torch.equal(runs["in place"].sequences, runs["dynamic"].sequences)
    for ours, theirs in zip(runs["in place"].scores, runs["dynamic"].scores):
        assert torch.equal(ours, theirs)
    layer = runs["in place"].past_key_values.layers[0]
    assert isinstance(layer, chat._InPlaceLayer)
    assert layer.keys.shape[-2] == ids.shape[1] + 11  # the last token is never fed back


def test_in_place_cache_crop_select_repeat_and_copy(model):
    x = torch.randint(3, 60, (2, 7))
    cache = chat.InPlaceCache()
    with torch.no_grad():
        model(input_ids=x[:, :5], past_key_values=cache)
        kept = chat.repeat_cache(cache, 1)  # a deep copy: later appends leave it alone
        cache.crop(-2)  # back to 3 positions, then 4 new ones written into the same buffer
        model(input_ids=x[:, 3:], past_key_values=cache)
        reference = DynamicCache()
        model(input_ids=x, past_key_values=reference)
    torch.testing.assert_close(cache.layers[1].keys, reference.layers[1].keys)
    assert kept.get_seq_length() == 5
    torch.testing.assert_close(kept.layers[1].values, reference.layers[1].values[..., :5, :])
    for c in (cache, reference):
        c.batch_select_indices(torch.tensor([1]))  # rows of the buffer, room kept
        c.batch_repeat_interleave(3)  # a new tensor: the next update makes a new buffer
        c.batch_select_indices(torch.tensor([0, 1, 2]))  # (before that update) plain indexing
    nxt = torch.randint(3, 60, (3, 1))
    with torch.no_grad():
        ours = model(input_ids=nxt, past_key_values=cache).logits
        theirs = model(input_ids=nxt, past_key_values=reference).logits
    torch.testing.assert_close(ours, theirs)
    assert cache.get_seq_length() == 8 and cache.layers[0].keys.shape[0] == 3


@pytest.mark.parametrize("pattern", ["(yes|no)( yes| no){0,3}", "[a-z ]{0,12}"])
def test_chat_generator_drops_finished_rows_and_still_equals_generate(model, tokenizer, pattern,
                                                                      monkeypatch):
    index = TokenIndex(compile_regex(pattern), vocabulary_bytes(tokenizer), tokenizer.eos_token_id)
    chats = [[*SYSTEM, {"role": "user", "content": q}]
             for q in ["What is Python?", "a positive review", "bad", "The movie was great",
                       "dull film", "Sources", "Answer", "negative"]]
    sizes = []
    select = chat._InPlaceLayer.batch_select_indices
    monkeypatch.setattr(chat._InPlaceLayer, "batch_select_indices",
                        lambda self, rows: sizes.append(len(rows)) or select(self, rows))
    ours = chat.ChatGenerator(model, tokenizer, 10, index=index, batch_size=8)(chats)
    theirs = chat.generate_replies(model, tokenizer, chats, max_new_tokens=10, batch_size=8,
                                   processor=lambda: RegexLogitsProcessor(index))
    assert ours == theirs
    assert sizes and min(sizes) < 8  # the batch did shrink
    lengths = {len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in ours}
    assert len(lengths) > 1  # rows finished at different steps: the batch shrank on the way


@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_shared_prefix_attention_equals_attention_over_the_concatenation(q_len, masked):
    gen = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, dim, prefix_len, own_len = 3, 6, 2, 8, 5, 7
    query = torch.randn(rows, heads, q_len, dim, generator=gen)
    key, value = (torch.randn(rows, kv_heads, own_len, dim, generator=gen) for _ in range(2))
    prefix = DynamicCache()
    prefix.update(*(torch.randn(1, kv_heads, prefix_len, dim, generator=gen) for _ in range(2)), 0)
    causal = torch.ones(q_len, own_len, dtype=torch.bool).tril(own_len - q_len)
    visible = causal[None, None].repeat(rows, 1, 1, 1)
    if masked:
        visible[0, :, :, :2] = False  # row 0's first two own keys are padding
    module = torch.nn.Module()
    module.layer_idx, module.num_key_value_groups = 0, heads // kv_heads
    ours, _ = chat.shared_prefix_attention(module, query, key, value,
                                            visible if masked else None, scaling=0.3,
                                            shared_prefix=prefix)
    full_k = torch.cat([prefix.layers[0].keys.expand(rows, -1, -1, -1), key], dim=2)
    full_v = torch.cat([prefix.layers[0].values.expand(rows, -1, -1, -1), value], dim=2)
    full_mask = torch.cat([torch.ones(rows, 1, q_len, prefix_len, dtype=torch.bool), visible], 3)
    theirs = torch.nn.functional.scaled_dot_product_attention(
        query, full_k.repeat_interleave(heads // kv_heads, 1),
        full_v.repeat_interleave(heads // kv_heads, 1), attn_mask=full_mask, scale=0.3)
    torch.testing.assert_close(ours, theirs.transpose(1, 2))
    plain, _ = chat.shared_prefix_attention(module, query, key, value, visible, scaling=0.3)
    reference = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1), attn_mask=visible,
        scale=0.3)
    torch.testing.assert_close(plain, reference.transpose(1, 2))  # no prefix: SDPA itself


def test_chat_generator_falls_back_where_its_attention_does_not_fit(tokenizer):
    model = tiny_llama(tokenizer, num_hidden_layers=2, max_position_embeddings=256)
    chats = [[*SYSTEM, {"role": "user", "content": q}] for q in ["What is Python?", "bad"]]
    model.config.attn_logit_softcapping = 50.0  # as Gemma 2 reports it (Llama's code ignores it)
    want = chat.generate_replies(model, tokenizer, chats, max_new_tokens=5)
    assert chat.ChatGenerator(model, tokenizer, max_new_tokens=5)(chats) == want  # copied prefix
    assert model.config._attn_implementation != chat.SHARED_PREFIX_ATTENTION
    prefix = DynamicCache()
    prefix.update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), 0)
    module = torch.nn.Module()
    module.layer_idx = 0
    with pytest.raises(ValueError, match="softcap"):
        chat.shared_prefix_attention(module, torch.zeros(1, 2, 1, 4), torch.zeros(1, 1, 1, 4),
                                     torch.zeros(1, 1, 1, 4), None, shared_prefix=prefix,
                                     softcap=30.0)


def test_shared_prefix_attention_in_half_precision_does_not_overflow():
    rows, prefix_len = 2, 8000
    module = torch.nn.Module()
    module.layer_idx = 0
    prefix = DynamicCache()
    prefix.update(torch.zeros(1, 1, prefix_len, 4, dtype=torch.float16),
                  torch.full((1, 1, prefix_len, 4), 30.0, dtype=torch.float16), 0)
    out, _ = chat.shared_prefix_attention(
        module, torch.zeros(rows, 2, 1, 4, dtype=torch.float16),
        torch.zeros(rows, 1, 3, 4, dtype=torch.float16),
        torch.full((rows, 1, 3, 4), 30.0, dtype=torch.float16), None, shared_prefix=prefix)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), torch.full_like(out.float(), 30.0))


def test_in_place_cache_concatenates_while_autograd_records(model):
    x = torch.randint(3, 60, (1, 6))
    cache = chat.InPlaceCache()
    loss = sum(model(input_ids=x[:, i:i + 3], past_key_values=cache).logits.sum() for i in (0, 3))
    loss.backward()  # no "modified by an inplace operation"
    assert cache.get_seq_length() == 6
    model.zero_grad()
