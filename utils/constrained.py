"""Constrained decoding from scratch: a regular expression (or a small JSON schema) compiled to a
byte-level automaton, and the set of allowed tokens of a real vocabulary in every state.

Conventions, stated once:

- **Bytes, not characters.** Text is matched as its UTF-8 bytes, because a byte-level BPE token
  (SmolLM2's, GPT-2's) is a byte string that may end in the middle of a character. The automaton is
  a DFA over the 256 byte values; ``-1`` is the dead state (no match can follow).
- **The regex subset** (:func:`parse_regex`): literal characters (any Unicode), escapes
  ``\\\\ \\" \\. \\/ \\n \\t \\r \\xHH`` and any escaped punctuation, ``\\d \\w \\s`` (ASCII, unlike
  Rust's Unicode-aware ones), classes ``[a-z0-9_]`` with ranges and ``[^...]`` negation (ASCII
  members only), ``.`` (any character but newline), groups ``(...)``, alternation ``|`` and the
  quantifiers ``* + ? {m} {m,} {m,n}``. The whole string must match (no anchors needed). Anything
  else raises ``ValueError`` naming the construct.
- **Negation and ``.`` are Unicode-correct**: "any character except ..." is every *valid* UTF-8
  encoding of such a character (the nine byte-range rows of RFC 3629 table 3-7), so a token made of a
  stray continuation byte is never allowed, and half of "é" is allowed only where "é" is.
- **A token is allowed in state s** when walking its bytes from s never reaches the dead state. It
  may stop inside a grammar symbol (``"sent`` of ``"sentiment"``), cross several (``":"``), or end
  inside a multi-byte character. End-of-sequence is allowed exactly in accepting states. This is the
  rule ``outlines-core``'s ``Index`` implements; chapter 6-02 asserts the two give identical sets.

:class:`TokenIndex` computes the allowed set of a state lazily by walking a byte trie of the
vocabulary alongside the DFA (each shared prefix is stepped once, one trie depth at a time in array
operations; a dead prefix rules out every token below it), and caches it. :class:`RegexLogitsProcessor` applies it as a logits mask inside ``model.generate``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from utils.tokenization import bytes_to_unicode

__all__ = [
    "UTF8_ROWS",
    "parse_regex",
    "compile_regex",
    "ByteDFA",
    "regex_literal",
    "schema_to_regex",
    "vocabulary_bytes",
    "TokenIndex",
    "mask_logits",
    "RegexLogitsProcessor",
]

Path_ = tuple[tuple[int, int], ...]  # one byte range per byte of an encoded character

UTF8_ROWS: tuple[Path_, ...] = (
    ((0xC2, 0xDF), (0x80, 0xBF)),
    ((0xE0, 0xE0), (0xA0, 0xBF), (0x80, 0xBF)),
    ((0xE1, 0xEC), (0x80, 0xBF), (0x80, 0xBF)),
    ((0xED, 0xED), (0x80, 0x9F), (0x80, 0xBF)),
    ((0xEE, 0xEF), (0x80, 0xBF), (0x80, 0xBF)),
    ((0xF0, 0xF0), (0x90, 0xBF), (0x80, 0xBF), (0x80, 0xBF)),
    ((0xF1, 0xF3), (0x80, 0xBF), (0x80, 0xBF), (0x80, 0xBF)),
    ((0xF4, 0xF4), (0x80, 0x8F), (0x80, 0xBF), (0x80, 0xBF)),
)
"""Every valid multi-byte UTF-8 sequence, as byte ranges (RFC 3629; surrogates and overlong forms
excluded). With the ASCII row ``[00-7F]`` they are exactly the encodings of all characters."""

_CLASSES = {"d": [(0x30, 0x39)], "w": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
            "s": [(0x09, 0x0D), (0x20, 0x20)]}
_CONTROL = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B}


# --------------------------------------------------------------------------- parsing
# The tree: ("chars", [paths]) | ("seq", [nodes]) | ("alt", [nodes]) | ("rep", node, lo, hi|None)

def _literal(ch: str) -> tuple:
    data = ch.encode("utf-8")
    return ("chars", [tuple((b, b) for b in data)])


def _ascii_ranges(ranges: list[tuple[int, int]], negate: bool) -> tuple:
    members = sorted(ranges)
    if negate:
        allowed, start = [], 0
        for lo, hi in members:
            if lo > start:
                allowed.append((start, lo - 1))
            start = max(start, hi + 1)
        if start <= 0x7F:
            allowed.append((start, 0x7F))
        paths = [((lo, hi),) for lo, hi in allowed] + list(UTF8_ROWS)
    else:
        paths = [((lo, hi),) for lo, hi in members]
    return ("chars", paths)


class _Parser:
    def __init__(self, pattern: str):
        if not isinstance(pattern, str):
            raise TypeError(f"a regex must be a str, got {type(pattern).__name__}")
        self.p, self.i = pattern, 0

    def error(self, what: str) -> ValueError:
        return ValueError(f"regex {self.p!r} at position {self.i}: {what}. Supported: literals, "
                          "escapes, [classes], [^negated ASCII classes], ., (groups), |, * + ? {m,n}")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        ch = self.p[self.i]
        self.i += 1
        return ch

    def parse(self) -> tuple:
        node = self.alternation()
        if self.i != len(self.p):
            raise self.error(f"unexpected {self.p[self.i]!r}")
        return node

    def alternation(self) -> tuple:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.take()
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self) -> tuple:
        items = []
        while self.peek() not in (None, "|", ")"):
            items.append(self.quantified(self.atom()))
        return ("seq", items)

    def number(self) -> int | None:
        start = self.i
        while self.peek() is not None and self.peek().isdigit():
            self.take()
        return int(self.p[start:self.i]) if self.i > start else None

    def quantified(self, node: tuple) -> tuple:
        while self.peek() in ("*", "+", "?", "{"):
            ch = self.take()
            if ch == "{":
                lo = self.number()
                if lo is None:
                    raise self.error("'{' must start a {m}, {m,} or {m,n} repetition")
                hi: int | None = lo
                if self.peek() == ",":
                    self.take()
                    hi = self.number()
                if self.peek() != "}" or (hi is not None and hi < lo):
                    raise self.error("a repetition must read {m}, {m,} or {m,n} with m <= n")
                self.take()
            else:
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
            if self.peek() == "?":
                raise self.error("lazy quantifiers change matching order, not the language; "
                                 "drop the '?'")
            node = ("rep", node, lo, hi)
        return node

    def escape(self) -> int | str:
        """The escaped byte value (int), or a class letter (str) for \\d \\w \\s."""
        if self.peek() is None:
            raise self.error("a trailing backslash escapes nothing")
        ch = self.take()
        if ch in _CLASSES:
            return ch
        if ch in _CONTROL:
            return _CONTROL[ch]
        if ch == "x":
            digits = self.p[self.i:self.i + 2]
            if len(digits) != 2 or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise self.error("\\x needs two hex digits")
            self.i += 2
            value = int(digits, 16)
            if value > 0x7F:
                raise self.error("\\x escapes above \\x7f are not supported; write the character")
            return value
        if ch.isalnum():
            raise self.error(f"unsupported escape \\{ch}")
        return ord(ch) if ord(ch) < 0x80 else ch.encode("utf-8")[0]

    def atom(self) -> tuple:
        ch = self.take()
        if ch == "(":
            if self.peek() == "?":
                if self.p[self.i:self.i + 2] != "?:":
                    raise self.error("only non-capturing groups (?:...) are supported")
                self.i += 2
            node = self.alternation()
            if self.peek() != ")":
                raise self.error("missing ')'")
            self.take()
            return node
        if ch in "*+?{":
            raise self.error(f"{ch!r} has nothing to repeat")
        if ch == ")":
            raise self.error("unbalanced ')'")
        if ch == ".":
            return _ascii_ranges([(0x0A, 0x0A)], True)
        if ch == "[":
            return self.char_class()
        if ch == "\\":
            value = self.escape()
            if isinstance(value, str):
                return ("chars", [((lo, hi),) for lo, hi in _CLASSES[value]])
            return ("chars", [((value, value),)])
        return _literal(ch)

    def class_member(self) -> int | str:
        ch = self.take()
        if ch == "\\":
            return self.escape()
        if ord(ch) > 0x7F:
            raise self.error(f"non-ASCII character {ch!r} inside [...] is not supported; "
                             "use an alternation (a|é) instead")
        return ord(ch)

    def char_class(self) -> tuple:
        negate = self.peek() == "^"
        if negate:
            self.take()
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            if self.peek() is None:
                raise self.error("missing ']'")
            if self.peek() == "]" and not first:
                self.take()
                break
            first = False
            lo = self.class_member()
            if isinstance(lo, str):
                ranges.extend(_CLASSES[lo])
                continue
            if self.peek() == "-" and self.p[self.i + 1:self.i + 2] not in ("]", ""):
                self.take()
                hi = self.class_member()
                if isinstance(hi, str) or hi < lo:
                    raise self.error("a class range must read a-z with a <= z")
                ranges.append((lo, hi))
            else:
                ranges.append((lo, lo))
        return _ascii_ranges(ranges, negate)


def parse_regex(pattern: str) -> tuple:
    """Parse ``pattern`` (the subset in the module docstring) into a small tree of tuples."""
    return _Parser(pattern).parse()


# --------------------------------------------------------------------------- automata


class _NFA:
    """Thompson's construction: each tree node becomes a fragment (start, end) of states joined by
    byte-range edges and empty (epsilon) edges."""

    def __init__(self):
        self.edges: list[list[tuple[int, int, int]]] = []
        self.eps: list[list[int]] = []

    def state(self) -> int:
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def build(self, node: tuple) -> tuple[int, int]:
        kind = node[0]
        if kind == "chars":
            start, end = self.state(), self.state()
            for path in node[1]:
                current = start
                for k, (lo, hi) in enumerate(path):
                    nxt = end if k == len(path) - 1 else self.state()
                    self.edges[current].append((lo, hi, nxt))
                    current = nxt
            return start, end
        if kind == "seq":
            start = end = self.state()
            for child in node[1]:
                s, e = self.build(child)
                self.eps[end].append(s)
                end = e
            return start, end
        if kind == "alt":
            start, end = self.state(), self.state()
            for child in node[1]:
                s, e = self.build(child)
                self.eps[start].append(s)
                self.eps[e].append(end)
            return start, end
        _, child, lo, hi = node  # "rep": lo copies, then (hi - lo) optional ones or a loop
        start = end = self.state()
        for _ in range(lo):
            s, e = self.build(child)
            self.eps[end].append(s)
            end = e
        if hi is None:
            s, e = self.build(child)
            self.eps[end].append(s)
            self.eps[e].append(s)  # loop back for another copy
            loop_exit = self.state()
            self.eps[end].append(loop_exit)
            self.eps[e].append(loop_exit)
            return start, loop_exit
        final = self.state()
        self.eps[end].append(final)
        for _ in range(hi - lo):
            s, e = self.build(child)
            self.eps[end].append(s)
            self.eps[e].append(final)
            end = e
        return start, final

    def closure(self, states: Iterable[int]) -> frozenset[int]:
        stack, seen = list(states), set(states)
        while stack:
            for t in self.eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(seen)


@dataclass
class ByteDFA:
    """A deterministic automaton over bytes: ``transitions[s][b]`` is the next state (-1: dead),
    state 0 is the start, ``accepting`` the states where the whole input matches."""

    pattern: str
    transitions: list[list[int]]
    accepting: frozenset[int]

    @property
    def n_states(self) -> int:
        return len(self.transitions)

    def step(self, state: int, data: bytes) -> int:
        """The state after reading ``data`` from ``state`` (-1 once dead)."""
        for b in data:
            if state < 0:
                return -1
            state = self.transitions[state][b]
        return state

    def matches(self, text: str | bytes) -> bool:
        """True when the whole of ``text`` matches the pattern."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        return self.step(0, data) in self.accepting


def compile_regex(pattern: str, max_states: int = 20_000) -> ByteDFA:
    """``pattern`` -> :class:`ByteDFA` by Thompson's construction and the subset construction.

    Each DFA state is the set of NFA states the input so far can be in; a byte moves every member
    along its edges, then through empty edges. ``max_states`` guards against a pattern whose DFA
    explodes (e.g. ``(a|b)*a(a|b){20}``): the error names it instead of running out of memory.
    """
    nfa = _NFA()
    start, end = nfa.build(parse_regex(pattern))
    first = nfa.closure([start])
    ids, order = {first: 0}, [first]
    transitions: list[list[int]] = []
    while len(transitions) < len(order):
        members = order[len(transitions)]
        row = [-1] * 256
        targets: dict[int, set[int]] = {}
        for s in members:
            for lo, hi, t in nfa.edges[s]:
                for b in range(lo, hi + 1):
                    targets.setdefault(b, set()).add(t)
        for b, nxt in targets.items():
            key = nfa.closure(nxt)
            if key not in ids:
                if len(order) >= max_states:
                    raise ValueError(f"regex {pattern!r} needs more than {max_states} DFA states; "
                                     "bound its repetitions or raise max_states")
                ids[key] = len(order)
                order.append(key)
            row[b] = ids[key]
        transitions.append(row)
    accepting = frozenset(i for i, members in enumerate(order) if end in members)
    return ByteDFA(pattern, transitions, accepting)


# --------------------------------------------------------------------------- JSON schema


_SPECIAL = set("\\.^$|?*+()[]{}/\"")
_JSON_CHAR = r'([^"\\\x00-\x1f]|\\["\\/bfnrt])'
_INTEGER = r"-?(0|[1-9][0-9]{0,15})"
_NUMBER = r"-?(0|[1-9][0-9]{0,15})(\.[0-9]{1,6})?"
_DATE = r'"[0-9]{4}-[0-9]{2}-[0-9]{2}"'


def regex_literal(text: str) -> str:
    """``text`` as a literal in this module's regex subset (its special characters escaped)."""
    return "".join("\\" + c if c in _SPECIAL else c for c in text)


def _value_regex(schema: dict, where: str) -> str:
    if "enum" in schema:
        values = schema["enum"]
        if not values or not all(isinstance(v, (str, int, float, bool)) for v in values):
            raise ValueError(f"{where}: enum must list strings, numbers or booleans")
        return "(" + "|".join(regex_literal(json.dumps(v, ensure_ascii=False)) for v in values) + ")"
    kind = schema.get("type")
    if kind == "string":
        if schema.get("format") == "date":
            return _DATE
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        repeat = f"{{{lo},{hi}}}" if hi is not None else ("*" if lo == 0 else f"{{{lo},}}")
        return f'"{_JSON_CHAR}{repeat}"'
    if kind == "integer":
        return _INTEGER
    if kind == "number":
        return _NUMBER
    if kind == "boolean":
        return "(true|false)"
    if kind == "object":
        return schema_to_regex(schema, where)
    raise ValueError(f"{where}: type {kind!r} is not supported (string, integer, number, boolean, "
                     "enum, object)")


def schema_to_regex(schema: dict, where: str = "schema", allow_empty: bool = False) -> str:
    """A JSON schema (an object of string / integer / number / boolean / enum / object properties)
    -> regex.

    Properties appear in the schema's order and all are required (the usual setting for
    extraction); a space after ``:`` and ``,`` is optional, no other whitespace is allowed. Strings
    follow JSON's escapes; ``maxLength`` bounds them, and ``"format": "date"`` makes them
    ``"YYYY-MM-DD"``. Numbers are decimals with up to 16 integer and 6 fraction digits (no
    exponent). An object without properties is an error unless ``allow_empty`` (then ``{}``; a tool
    that takes no arguments). Anything else raises a ``ValueError`` that names the property.
    """
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise ValueError(f"{where}: the top level must be {{'type': 'object', 'properties': ...}}")
    properties = schema.get("properties", {} if allow_empty else None)
    if allow_empty and properties == {}:
        return r"\{\}"
    if not isinstance(properties, dict) or not properties:
        raise ValueError(f"{where}: an object needs a non-empty 'properties' dict")
    parts = [regex_literal(json.dumps(name, ensure_ascii=False)) + ": ?"
             + _value_regex(sub, f"{where}.{name}") for name, sub in properties.items()]
    return r"\{" + ", ?".join(parts) + r"\}"


# --------------------------------------------------------------------------- tokens


def vocabulary_bytes(tokenizer) -> dict[int, bytes]:
    """Every ordinary token id of a byte-level BPE ``tokenizer`` -> the bytes it stands for.

    Special and added tokens (``<|im_start|>``, EOS ...) are left out: they are not text, and the
    index allows EOS separately. The byte characters of GPT-2's alphabet are mapped back with
    :func:`utils.tokenization.bytes_to_unicode`.
    """
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    out = {}
    for token, i in tokenizer.get_vocab().items():
        if i in added:
            continue
        try:
            out[i] = bytes(byte_of[c] for c in token)
        except KeyError as err:
            raise ValueError(f"token {token!r} (id {i}) is not in GPT-2's byte alphabet: this "
                             "index needs a byte-level BPE tokenizer") from err
    return out


@dataclass(frozen=True)
class _TrieLevel:
    """The trie nodes of one depth d >= 1, as arrays: node k is its parent's prefix (a node of
    depth d - 1, at position ``parent[k]``) followed by the byte ``byte[k]``; the tokens whose bytes
    end at depth d are ``token_id``, each at node ``token_node``."""
    parent: np.ndarray
    byte: np.ndarray
    token_node: np.ndarray
    token_id: np.ndarray


def _trie_levels(vocab: dict[int, bytes]) -> list[_TrieLevel]:
    """The byte trie of ``vocab``, one :class:`_TrieLevel` per depth (every distinct prefix of a
    token is one node)."""
    position: list[dict[bytes, int]] = [{b"": 0}]  # per depth: prefix -> its node's position
    for i, data in vocab.items():
        if not data:
            raise ValueError(f"token id {i} stands for no bytes; leave it out of vocab")
        for d in range(1, len(data) + 1):
            if d == len(position):
                position.append({})
            position[d].setdefault(data[:d], len(position[d]))
    levels = []
    for d in range(1, len(position)):
        prefixes = sorted(position[d], key=position[d].__getitem__)
        ends = [(position[d][data], i) for i, data in vocab.items() if len(data) == d]
        levels.append(_TrieLevel(
            parent=np.array([position[d - 1][p[:-1]] for p in prefixes], dtype=np.int64),
            byte=np.array([p[-1] for p in prefixes], dtype=np.int64),
            token_node=np.array([k for k, _ in ends], dtype=np.int64),
            token_id=np.array([i for _, i in ends], dtype=np.int64)))
    return levels


class TokenIndex:
    """Allowed tokens of a vocabulary in each state of a :class:`ByteDFA` (the rule in the module
    docstring), computed on first use and cached.

    ``vocab`` maps token id -> bytes (:func:`vocabulary_bytes`); ``eos_token_id`` is allowed in
    accepting states. ``allowed(state)`` is a sorted list of ids; ``next_state(state, id)`` follows
    one token.
    """

    def __init__(self, dfa: ByteDFA, vocab: dict[int, bytes], eos_token_id: int):
        if not vocab:
            raise ValueError("vocab is empty: pass vocabulary_bytes(tokenizer)")
        if eos_token_id in vocab:
            raise ValueError(f"eos_token_id {eos_token_id} is also an ordinary token of vocab; "
                             "leave special tokens out (vocabulary_bytes does)")
        self.dfa, self.vocab, self.eos_token_id = dfa, vocab, eos_token_id
        self._levels = _trie_levels(vocab)
        self._dead = dfa.n_states  # the dead state as a row of the table: every byte keeps it dead
        table = np.array(dfa.transitions + [[-1] * 256], dtype=np.int64).reshape(-1, 256)
        self._table = np.where(table < 0, self._dead, table)
        self._cache: dict[int, list[int]] = {}
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    def allowed(self, state: int) -> list[int]:
        """Sorted ids of the tokens that keep a match possible from ``state`` (plus EOS when
        ``state`` accepts)."""
        if not 0 <= state < self.dfa.n_states:
            raise ValueError(f"state {state} is not a live state of this automaton "
                             f"(0..{self.dfa.n_states - 1}); did the text already fail to match?")
        if state not in self._cache:
            # Walk the trie and the DFA together, one depth at a time, every node of a depth in one
            # array operation: a node's state is its parent's state stepped by the node's byte. The
            # dead state stays dead, so a prefix that dies takes every token below it along.
            states = np.array([state])
            found = [np.array([self.eos_token_id])] if state in self.dfa.accepting else []
            for level in self._levels:
                states = self._table[states[level.parent], level.byte]
                found.append(level.token_id[states[level.token_node] != self._dead])
            self._cache[state] = np.sort(np.concatenate(found)).tolist()
        return self._cache[state]

    def allowed_mask(self, state: int, size: int) -> torch.Tensor:
        """:meth:`allowed` as a boolean tensor of length ``size`` (the model's logits width),
        built once per state: masking with it costs one ``masked_fill``, not a list conversion."""
        key = (state, size)
        if key not in self._masks:
            allowed = self.allowed(state)
            if allowed[-1] >= size:
                raise ValueError(f"token id {allowed[-1]} does not fit logits of width {size}; "
                                 "pass the model's vocabulary size (logits.shape[-1])")
            mask = torch.zeros(size, dtype=torch.bool)
            mask[allowed] = True
            self._masks[key] = mask
        return self._masks[key]

    def next_state(self, state: int, token_id: int) -> int:
        """The state after ``token_id`` (-1 if it was not allowed; EOS keeps the state)."""
        if token_id == self.eos_token_id:
            return state if state in self.dfa.accepting else -1
        if token_id not in self.vocab:
            raise ValueError(f"token id {token_id} is not in this index's vocabulary")
        return self.dfa.step(state, self.vocab[token_id])


def mask_logits(logits: torch.Tensor, allowed: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``logits`` with every token outside ``allowed`` set to -inf (a new tensor; last dim = vocab).

    ``allowed`` is a list of token ids, or a boolean tensor over the vocabulary
    (:meth:`TokenIndex.allowed_mask`), which broadcasts over the rows of ``logits``.
    """
    if isinstance(allowed, torch.Tensor) and allowed.dtype == torch.bool:
        if allowed.shape[-1] != logits.shape[-1]:
            raise ValueError(f"a boolean mask of width {allowed.shape[-1]} cannot mask logits of "
                             f"width {logits.shape[-1]}")
        keep = allowed.to(logits.device)
    else:
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[torch.as_tensor(list(allowed), dtype=torch.long, device=logits.device)] = True
    if not keep.any(dim=-1).all():
        raise ValueError("no token is allowed: the constraint cannot be satisfied from here")
    return logits.masked_fill(~keep, float("-inf"))


class RegexLogitsProcessor:
    """A ``model.generate`` logits processor that keeps every row of a batch inside ``index``'s
    language: it follows each row's generated tokens through the DFA and masks the rest.

    Rows must share one prompt length (left padding, as :func:`utils.chat.greedy_continuations`
    does); the first call records it, so use a new processor for every ``generate`` call. A row
    that has emitted EOS is left alone (``generate`` pads it).
    """

    def __init__(self, index: TokenIndex):
        self.index = index
        self.prompt_len: int | None = None
        self.states: list[int] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prompt_len is None:
            self.prompt_len, self.states = input_ids.shape[1], [0] * input_ids.shape[0]
        elif len(self.states) != input_ids.shape[0] or input_ids.shape[1] <= self.prompt_len:
            raise RuntimeError("this processor already served another generate call; make a new "
                               "RegexLogitsProcessor(index) for each call")
        else:
            last = input_ids[:, -1].tolist()
            for row, token in enumerate(last):
                if self.states[row] >= 0:
                    done = token == self.index.eos_token_id
                    self.states[row] = -2 if done else self.index.next_state(self.states[row],
                                                                             token)
        masks = torch.ones_like(scores, dtype=torch.bool)
        for row, state in enumerate(self.states):
            if state == -1:
                raise RuntimeError(f"row {row} left the grammar: was the processor reused across "
                                   "generate calls with different prompts?")
            if state >= 0:
                masks[row] = self.index.allowed_mask(state, scores.shape[-1])
        return mask_logits(scores, masks)
