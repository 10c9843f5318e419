import json
import random
import re

import pytest
import torch
from outlines_core import Index, Vocabulary

from utils.constrained import (
    UTF8_ROWS,
    RegexLogitsProcessor,
    TokenIndex,
    compile_regex,
    mask_logits,
    parse_regex,
    regex_literal,
    schema_to_regex,
    vocabulary_bytes,
)
from utils.tokenization import bytes_to_unicode

SCHEMA = {"type": "object", "properties": {
    "sentiment": {"enum": ["positive", "negative"]},
    "score": {"type": "integer"},
    "ok": {"type": "boolean"},
    "why": {"type": "string", "maxLength": 5},
}}


@pytest.mark.parametrize("pattern", [
    r"a+b", r"(ab|cd)*e?", r"[a-c0-9_]{2,4}", r"x{3}", r"x{2,}", r"\d+\.\d{1,2}", r"[^ab]*",
    r"(?:hi|ho)\s\w+", r"-?(0|[1-9][0-9]*)", r'"([^"\\]|\\["\\n])*"', r"\{a\}|\[b\]",
])
def test_dfa_accepts_exactly_what_python_re_accepts(pattern):
    dfa = compile_regex(pattern)
    rng = random.Random(0)
    alphabet = list("abcde0129_ -.\\\"{}[]x\n") + ["é", "日"]
    strings = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 7)))
               for _ in range(3000)]
    # and strings that match, from a few handpicked ones
    strings += ["ab", "aaab", "e", "abcde", "12.5", "0", "-12", '"a\\"b"', "{a}", "[b]", "hi x",
                "xxx", "xxxx", "ab_9", "日本"]
    for s in strings:
        assert dfa.matches(s) == bool(re.fullmatch(pattern, s)), (pattern, s)


def test_negation_and_dot_match_every_valid_utf8_character_but_no_stray_byte():
    dfa = compile_regex(r"[^a]")
    for ch in ["b", "é", "日", "😀", "\x7f", "\n"]:
        assert dfa.matches(ch)
    assert not dfa.matches("a")
    for bad in [b"\x80", b"\xc0\x80", b"\xed\xa0\x80", b"\xf5\x80\x80\x80", "é".encode()[:1]]:
        assert not dfa.matches(bad)
    assert compile_regex(".").matches("é") and not compile_regex(".").matches("\n")
    assert len(UTF8_ROWS) == 8  # plus the ASCII row: RFC 3629's table


def test_non_ascii_literals_are_their_utf8_bytes():
    dfa = compile_regex("café|日本")
    assert dfa.matches("café") and dfa.matches("日本") and not dfa.matches("cafe")
    assert dfa.step(0, "caf".encode() + "é".encode()[:1]) >= 0  # half a character is alive


@pytest.mark.parametrize("pattern, message", [
    ("a{", "repetition"), ("a{3,1}", "m <= n"), ("*a", "nothing to repeat"), ("(a", "missing"),
    ("a)", "unexpected"), ("[a", "missing"), ("[z-a]", "a <= z"), ("\\p", "unsupported escape"),
    ("a\\", "backslash"), ("[é]", "non-ASCII"), ("(?=a)", "non-capturing"), ("a*?", "lazy"),
    ("\\xZZ", "hex"), ("\\xff", "above"),
])
def test_unsupported_or_broken_patterns_say_what_and_where(pattern, message):
    with pytest.raises(ValueError, match=message):
        compile_regex(pattern)


def test_exploding_patterns_and_non_strings_are_refused():
    assert compile_regex("[]]").matches("]")  # a ']' first in a class is a member
    with pytest.raises(ValueError, match="DFA states"):
        compile_regex("(a|b)*a(a|b){12}", max_states=500)
    with pytest.raises(TypeError):
        parse_regex(b"ab")


def test_schema_to_regex_accepts_the_json_it_describes_and_rejects_the_rest():
    dfa = compile_regex(schema_to_regex(SCHEMA))
    good = {"sentiment": "negative", "score": -3, "ok": True, "why": 'a"b'}
    assert dfa.matches(json.dumps(good))
    assert dfa.matches(json.dumps(good, separators=(",", ":")))
    assert not dfa.matches(json.dumps({**good, "why": "too long"}))
    assert not dfa.matches(json.dumps({**good, "sentiment": "neutral"}))
    assert not dfa.matches(json.dumps({**good, "score": 1.5}))
    assert not dfa.matches(json.dumps(dict(reversed(list(good.items())))))
    nested = {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "string"}}}}}
    assert compile_regex(schema_to_regex(nested)).matches('{"a": {"b": "x"}}')


@pytest.mark.parametrize("schema, message", [
    ({"type": "array"}, "top level"), ({"type": "object"}, "properties"),
    ({"type": "object", "properties": {"x": {"type": "array"}}}, r"schema\.x"),
    ({"type": "object", "properties": {"x": {"enum": []}}}, "enum"),
])
def test_schema_to_regex_names_what_it_cannot_do(schema, message):
    with pytest.raises(ValueError, match=message):
        schema_to_regex(schema)


def test_schema_to_regex_numbers_dates_and_empty_objects():
    schema = {"type": "object", "properties": {"x": {"type": "number"},
                                               "d": {"type": "string", "format": "date"},
                                               "e": {"enum": [0.5, "é"]}}}
    dfa = compile_regex(schema_to_regex(schema))
    assert dfa.matches('{"x": -3.25, "d": "2024-03-01", "e": 0.5}')
    assert dfa.matches('{"x": 7, "d": "2024-03-01", "e": "é"}')
    assert not dfa.matches('{"x": 1e5, "d": "2024-03-01", "e": 0.5}')
    assert not dfa.matches('{"x": 1, "d": "March 1", "e": 0.5}')
    empty = {"type": "object", "properties": {}}
    assert compile_regex(schema_to_regex(empty, allow_empty=True)).matches("{}")
    with pytest.raises(ValueError, match="properties"):
        schema_to_regex(empty)
    assert regex_literal("a.b{1}") == "a\\.b\\{1\\}"


TINY = {1: b"{", 2: b'"', 3: b'{"', 4: b"a", 5: b"ab", 6: b'b"', 7: b"}", 8: b'"}', 9: b"x",
        10: "é".encode()[:1], 11: "é".encode()[1:], 12: "é".encode()}
EOS = 0


def test_token_index_allows_tokens_that_cross_or_split_symbols():
    index = TokenIndex(compile_regex(r'\{"(a|b|é)+"\}'), TINY, EOS)
    assert index.allowed(0) == [1, 3]  # "{" and '{"' (which crosses into the string)
    s = index.next_state(0, 3)
    assert index.allowed(s) == [4, 5, 6, 10, 12]  # not '"' alone: the string needs a character
    s = index.next_state(s, 10)  # half of "é"
    assert index.allowed(s) == [11]
    s = index.next_state(s, 11)
    assert 8 in index.allowed(s) and 6 in index.allowed(s)
    end = index.next_state(s, 8)
    assert index.allowed(end) == [EOS] and index.next_state(end, EOS) == end
    assert index.next_state(0, 9) == -1 and index.next_state(0, EOS) == -1


def test_token_index_equals_outlines_core_on_a_tiny_vocabulary():
    pattern = r'\{"(a|b|é)+"\}'
    index = TokenIndex(compile_regex(pattern), TINY, EOS)
    theirs = Index(pattern, Vocabulary(EOS, {v: [k] for k, v in TINY.items()}))
    rng = random.Random(1)
    for _ in range(50):
        mine, other = 0, theirs.get_initial_state()
        for _ in range(12):
            allowed = index.allowed(mine)
            assert allowed == sorted(theirs.get_allowed_tokens(other))
            token = rng.choice(allowed)
            if token == EOS:
                assert theirs.is_final_state(other)
                break
            mine, other = index.next_state(mine, token), theirs.get_next_state(other, token)


def test_token_index_checks_its_inputs():
    dfa = compile_regex("a")
    with pytest.raises(ValueError, match="empty"):
        TokenIndex(dfa, {}, EOS)
    with pytest.raises(ValueError, match="also an ordinary token"):
        TokenIndex(dfa, {0: b"a"}, 0)
    with pytest.raises(ValueError, match="no bytes"):
        TokenIndex(dfa, {1: b""}, EOS)
    index = TokenIndex(dfa, {1: b"a"}, EOS)
    with pytest.raises(ValueError, match="live state"):
        index.allowed(-1)
    with pytest.raises(ValueError, match="not in this index"):
        index.next_state(0, 99)


class _Tok:
    added_tokens_decoder = {0: "<eos>"}

    def get_vocab(self):
        u = bytes_to_unicode()
        return {"<eos>": 0, "a": 1, u[0x20] + "b": 2, "".join(u[b] for b in "é".encode()): 3}


def test_vocabulary_bytes_maps_byte_characters_back_and_drops_special_tokens():
    assert vocabulary_bytes(_Tok()) == {1: b"a", 2: b" b", 3: "é".encode()}

    class Bad(_Tok):
        def get_vocab(self):
            return {"\u4e00": 5}
    with pytest.raises(ValueError, match="byte alphabet"):
        vocabulary_bytes(Bad())


def test_mask_logits_keeps_only_allowed_tokens():
    logits = torch.arange(6.0).repeat(2, 1)
    out = mask_logits(logits, [1, 4])
    assert torch.equal(out[0].isfinite(), torch.tensor([False, True, False, False, True, False]))
    assert out[1, 4] == 4.0 and logits.isfinite().all()
    with pytest.raises(ValueError, match="no token is allowed"):
        mask_logits(logits, [])
    index = TokenIndex(compile_regex("a|b"), {1: b"a", 4: b"b", 5: b"c"}, EOS)
    mask = index.allowed_mask(0, 6)
    assert mask.tolist() == [False, True, False, False, True, False]
    assert index.allowed_mask(0, 6) is mask  # built once per state
    assert torch.equal(mask_logits(logits, mask), out)
    with pytest.raises(ValueError, match="width"):
        mask_logits(logits, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not fit"):
        index.allowed_mask(0, 3)
    with pytest.raises(ValueError, match="no token is allowed"):
        mask_logits(logits, torch.zeros(6, dtype=torch.bool))


def test_logits_processor_keeps_a_greedy_loop_in_the_language():
    index = TokenIndex(compile_regex(r'\{"(a|b|é)+"\}'), TINY, EOS)
    processor = RegexLogitsProcessor(index)
    torch.manual_seed(0)
    ids = torch.full((3, 2), 9)  # a shared prompt length of 2
    finished = [False] * 3
    for _ in range(10):
        scores = processor(ids, torch.randn(3, 13))
        nxt = scores.argmax(-1)
        nxt = torch.where(torch.tensor(finished), torch.tensor(EOS), nxt)
        finished = [f or t == EOS for f, t in zip(finished, nxt.tolist())]
        ids = torch.cat([ids, nxt[:, None]], 1)
    for row in ids[:, 2:].tolist():
        text = b"".join(TINY[t] for t in row if t != EOS).decode()
        assert re.fullmatch(r'\{"(a|b|é)+"\}', text), text
    with pytest.raises(RuntimeError, match="new RegexLogitsProcessor"):
        processor(torch.full((3, 2), 9), torch.randn(3, 13))
