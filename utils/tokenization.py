"""Byte-level byte-pair encoding (BPE), as taught in Part 1, "Tokens and embeddings".

The tokenizer of GPT-2, Llama 3, SmolLM2 and most current LLMs works in three stages:

1. **pre-tokenize**: a regular expression cuts the text into word-like pieces (a word keeps its
   leading space), and each piece's UTF-8 bytes are written as 256 printable characters;
2. **BPE** (Sennrich et al., 2016): starting from single bytes, repeatedly merge the most frequent
   adjacent pair of symbols into a new symbol, until the vocabulary has the requested size;
3. **encode**: replay the learned merges on new text, lowest rank (earliest learned) first.

:func:`train_bpe` reproduces the trainer of the Hugging Face ``tokenizers`` library
(``models.BPE`` + ``trainers.BpeTrainer`` with the ``ByteLevel`` pre-tokenizer and
``initial_alphabet=ByteLevel.alphabet()``) merge for merge, including how it breaks ties between
pairs of equal count: the pair of *smaller token ids* wins, compared first on the left id. It is
written for reading, in plain Python, and is far slower than the library's Rust.
"""
from __future__ import annotations

import heapq
import itertools
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Sequence

import regex


__all__ = [
    "GPT2_SPLIT_PATTERN",
    "Pair",
    "bytes_to_unicode",
    "byte_alphabet",
    "pretokenize",
    "merge_word",
    "BPETokenizer",
    "pretoken_counts",
    "train_bpe",
]


# GPT-2's pre-tokenizer pattern, also used by ``tokenizers.pre_tokenizers.ByteLevel(use_regex=True)``:
# contractions, letters with an optional leading space, digits, other symbols, then whitespace.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_SPLIT = regex.compile(GPT2_SPLIT_PATTERN)

Pair = tuple[int, int]


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to 256 printable characters.

    Printable bytes map to themselves; the others (control characters, space, ...) are shifted to
    code points from 256 on, so that a space becomes ``Ġ`` and a newline ``Ċ``.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping, shift = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def byte_alphabet() -> list[str]:
    """The 256 byte characters in code-point order: the order ``BpeTrainer`` gives them ids."""
    return sorted(bytes_to_unicode().values())


def _check_text(text: object, name: str = "text") -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}; "
                        "decode bytes first (e.g. data.decode('utf-8'))")
    return text


def pretokenize(text: str) -> list[str]:
    """Split ``text`` with the GPT-2 pattern and write each piece's UTF-8 bytes as byte characters.

    >>> pretokenize("Hello world!")
    ['Hello', 'Ġworld', '!']
    """
    _check_text(text)
    table = bytes_to_unicode()
    return ["".join(table[b] for b in piece.encode("utf-8")) for piece in _SPLIT.findall(text)]


def merge_word(word: list[int], a: int, b: int, new: int) -> list[tuple[Pair, int]]:
    """Replace every non-overlapping ``(a, b)`` in ``word`` (in place, left to right) by ``new``.

    Returns how the counts of the neighbouring pairs change, exactly as ``tokenizers`` reports them
    (the merged pair itself is not reported: it has just been merged everywhere it was queued).
    """
    changes: list[tuple[Pair, int]] = []
    i = 0
    while i < len(word) - 1:
        if word[i] == a and word[i + 1] == b:
            if i > 0:
                changes += [((word[i - 1], a), -1), ((word[i - 1], new), 1)]
            word[i:i + 2] = [new]
            if i < len(word) - 1:
                changes += [((b, word[i + 1]), -1), ((new, word[i + 1]), 1)]
        i += 1
    return changes


@dataclass
class BPETokenizer:
    """A byte-level BPE tokenizer: a vocabulary, an ordered list of merges and special tokens.

    ``vocab`` maps each token string (in byte characters, see :func:`bytes_to_unicode`) to its id;
    ``merges[r]`` is the pair of token strings merged at rank ``r``. Special tokens are matched
    verbatim in the input before pre-tokenization and are never split.
    """

    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    special_tokens: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        needed = [*self.special_tokens, *itertools.chain(*self.merges)]
        missing = [t for t in needed if t not in self.vocab]
        if missing:
            raise ValueError(f"tokens missing from the vocabulary: {missing[:5]}")
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        # (left id, right id) -> (rank, merged id); a later duplicate overrides, as in the library
        self.ranks: dict[Pair, tuple[int, int]] = {
            (self.vocab[a], self.vocab[b]): (rank, self.vocab[a + b])
            for rank, (a, b) in enumerate(self.merges)
        }
        self._special_ids = {t: self.vocab[t] for t in self.special_tokens}
        longest_first = sorted(self.special_tokens, key=len, reverse=True)
        self._special_split = (
            re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if longest_first else None
        )
        self._word_cache: dict[str, list[int]] = {}
        self._byte_of = {c: b for b, c in bytes_to_unicode().items()}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode_word(self, word: str) -> list[int]:
        """BPE on one pre-token (byte characters): apply the lowest-ranked merge present, repeat."""
        if word in self._word_cache:
            return self._word_cache[word]
        ids = [self.vocab[c] for c in word]
        while len(ids) > 1:
            candidates = [self.ranks.get(pair, (float("inf"), -1)) for pair in zip(ids, ids[1:])]
            rank, new = min(candidates)
            if new < 0:  # no pair of this word was ever merged
                break
            a, b = next(pair for pair, c in zip(zip(ids, ids[1:]), candidates) if c[0] == rank)
            merge_word(ids, a, b, new)
        self._word_cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: special tokens verbatim, the rest pre-tokenized and BPE-merged."""
        _check_text(text)
        pieces = self._special_split.split(text) if self._special_split else [text]
        ids: list[int] = []
        for piece in pieces:
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            elif piece:
                for word in pretokenize(piece):
                    ids.extend(self.encode_word(word))
        return ids

    def tokens(self, text: str) -> list[str]:
        """The token strings of ``text`` (byte characters: ``Ġ`` is a space)."""
        return [self.id_to_token[i] for i in self.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a list of ids; bytes that are not valid UTF-8 become U+FFFD, as in the library."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TypeError(f"ids must be a sequence of ints, got {type(ids).__name__}")
        out, buffer = [], bytearray()
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"ids must be ints, got {type(i).__name__}")
            if i not in self.id_to_token:
                raise ValueError(f"id {i} is outside this vocabulary (0..{self.vocab_size - 1}): "
                                 "ids from another tokenizer cannot be decoded by this one")
            token = self.id_to_token[i]
            if token in self._special_ids:
                out.append(buffer.decode("utf-8", errors="replace") + token)
                buffer = bytearray()
            else:
                buffer.extend(self._byte_of[c] for c in token)
        return "".join(out) + buffer.decode("utf-8", errors="replace")

    def truncated(self, vocab_size: int) -> "BPETokenizer":
        """The tokenizer that training with a smaller ``vocab_size`` gives: a prefix of the merges."""
        n_base = len(self.special_tokens) + 256
        if not n_base <= vocab_size <= self.vocab_size:
            raise ValueError(
                f"vocab_size must be between {n_base} and {self.vocab_size}, got {vocab_size}")
        merges = []
        for a, b in self.merges:
            if self.vocab[a + b] >= vocab_size:
                break
            merges.append((a, b))
        vocab = {t: i for t, i in self.vocab.items() if i < vocab_size}
        return BPETokenizer(vocab, merges, list(self.special_tokens))


def pretoken_counts(texts: Iterable[str]) -> Counter[str]:
    """How often each pre-token occurs in ``texts`` (the trainer only ever sees these counts)."""
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings (e.g. a list of lines), not one str")
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(pretokenize(_check_text(text, "every item of texts")))
    return counts


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    min_frequency: int = 0,
) -> BPETokenizer:
    """Learn byte-level BPE merges from ``texts`` until the vocabulary has ``vocab_size`` tokens.

    Ids: special tokens first, then the 256 byte characters in code-point order, then one id per
    new merged token. Each step merges the most frequent adjacent pair (counted over all word
    occurrences); on equal counts the pair of smaller ids wins. Counts are updated incrementally
    with a lazy priority queue, the algorithm of ``tokenizers.trainers.BpeTrainer``. Training stops
    early if no pair occurs at least ``max(min_frequency, 1)`` times.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    special_tokens = list(dict.fromkeys(special_tokens))
    n_base = len(special_tokens) + 256
    if vocab_size < n_base:
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the {n_base} tokens every byte-level "
            f"vocabulary starts with (256 bytes + {len(special_tokens)} special tokens); use "
            f"vocab_size >= {n_base}, typically a few thousand for a small corpus")
    if not isinstance(min_frequency, int) or min_frequency < 0:
        raise ValueError(f"min_frequency must be an int >= 0, got {min_frequency!r}")

    id_to_token = [*special_tokens, *byte_alphabet()]
    vocab = {t: i for i, t in enumerate(id_to_token)}
    counted = pretoken_counts(texts)
    words = [[vocab[c] for c in w] for w in counted]
    counts = list(counted.values())

    pair_counts: Counter[Pair] = Counter()
    where: dict[Pair, set[int]] = {}
    for iw, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[iw]
            where.setdefault(pair, set()).add(iw)
    tie = itertools.count()  # entries with equal count and pair: first pushed, first popped
    queue = [(-pair_counts[p], p, next(tie), pos) for p, pos in where.items() if pair_counts[p] > 0]
    heapq.heapify(queue)  # a min-heap on (-count, pair): most frequent first, then smallest ids

    merges: list[Pair] = []
    while len(vocab) < vocab_size and queue:
        neg_count, pair, _, pos = heapq.heappop(queue)
        if -neg_count != pair_counts[pair]:  # stale entry: re-queue with the current count
            heapq.heappush(queue, (-pair_counts[pair], pair, next(tie), pos))
            continue
        if -neg_count < max(min_frequency, 1):
            break
        new_token = id_to_token[pair[0]] + id_to_token[pair[1]]
        if new_token not in vocab:
            vocab[new_token] = len(id_to_token)
            id_to_token.append(new_token)
        new = vocab[new_token]
        merges.append(pair)
        where = {}
        for iw in pos:
            for changed, delta in merge_word(words[iw], pair[0], pair[1], new):
                pair_counts[changed] += delta * counts[iw]
                if delta > 0:
                    where.setdefault(changed, set()).add(iw)
        for p, p_pos in where.items():
            if pair_counts[p] > 0:
                heapq.heappush(queue, (-pair_counts[p], p, next(tie), p_pos))

    # A pair merged twice keeps its last rank (the library stores merges in a dict keyed by pair).
    last_rank = {pair: rank for rank, pair in enumerate(merges)}
    ordered = [pair for rank, pair in enumerate(merges) if last_rank[pair] == rank]
    return BPETokenizer(vocab, [(id_to_token[a], id_to_token[b]) for a, b in ordered], special_tokens)
