import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from utils.tokenization import (BPETokenizer, byte_alphabet, bytes_to_unicode, merge_word, pretoken_counts,
                                pretokenize, train_bpe)

SPECIAL = ["<|endoftext|>"]
TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good: and God divided the light from the darkness.",
    "It's 12:30 -- we'll see 3.14159 and naïve café, 日本語 🙂   spaces\n\tand tabs",
]


def hf_bpe(texts, vocab_size, special_tokens=(), min_frequency=0):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def hf_model(tok):
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert all(c.isprintable() for c in table.values())
    assert byte_alphabet() == sorted(table.values())


def test_pretokenize_matches_the_library():
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for text in TEXTS:
        assert pretokenize(text) == [w for w, _ in pre.pre_tokenize_str(text)]
    assert pretokenize("") == []


def test_merge_word_reports_neighbour_changes():
    word = [0, 1, 2, 2, 3]  # h e l l o
    changes = merge_word(word, 2, 2, 4)
    assert word == [0, 1, 4, 3]
    assert changes == [((1, 2), -1), ((1, 4), 1), ((2, 3), -1), ((4, 3), 1)]
    run = [7, 7, 7, 7]  # merged left to right, without overlap
    merge_word(run, 7, 7, 8)
    assert run == [8, 8]


@pytest.mark.parametrize("vocab_size", [257, 300, 400])
def test_train_bpe_equals_the_library(vocab_size):
    ours = train_bpe(TEXTS * 3, vocab_size, SPECIAL)
    vocab, merges = hf_model(hf_bpe(TEXTS * 3, vocab_size, SPECIAL))
    assert ours.merges == merges
    assert ours.vocab == vocab
    assert ours.vocab_size == vocab_size


def test_ties_go_to_the_smaller_ids_not_the_smaller_strings():
    ours = train_bpe(["aaz aaz bc bc"], 256 + 3)
    assert ours.merges == [("a", "a"), ("b", "c"), ("Ġ", "bc")]
    assert hf_model(hf_bpe(["aaz aaz bc bc"], 256 + 3))[1] == ours.merges


def test_random_corpora_equal_the_library_including_repeated_tokens():
    rng = random.Random(0)
    for _ in range(5):
        texts = [" ".join("".join(rng.choice("abc") for _ in range(rng.randint(1, 8)))
                          for _ in range(rng.randint(1, 6))) for _ in range(40)]
        ours = train_bpe(texts, 256 + 60)
        vocab, merges = hf_model(hf_bpe(texts, 256 + 60))
        assert ours.merges == merges and ours.vocab == vocab


def test_training_stops_when_no_pair_is_left_or_too_rare():
    ours = train_bpe(["ab"], 1000)  # one merge possible
    assert ours.merges == [("a", "b")] and ours.vocab_size == 257
    rare = train_bpe(TEXTS, 1000, min_frequency=3)
    vocab, merges = hf_model(hf_bpe(TEXTS, 1000, min_frequency=3))
    assert rare.merges == merges and rare.vocab == vocab


def test_encode_decode_equal_the_library_and_round_trip():
    ours = train_bpe(TEXTS * 2, 350, SPECIAL)
    theirs = hf_bpe(TEXTS * 2, 350, SPECIAL)
    text = "And God called the light Day<|endoftext|>and the darkness he called Night. 🙂 naïve"
    ids = ours.encode(text)
    assert ids == theirs.encode(text).ids
    assert ours.decode(ids) == text
    assert ours.tokens("the light") == theirs.encode("the light").tokens
    assert ours.encode("") == []
    assert ours.encode_word("Ġlight") == ours.encode_word("Ġlight")  # cached


def test_decode_replaces_invalid_utf8_like_the_library():
    ours = train_bpe(TEXTS, 300)
    emoji_bytes = ours.encode("🙂")
    assert ours.decode(emoji_bytes[:1]) == "\ufffd" == Tokenizer.decode(hf_bpe(TEXTS, 300), emoji_bytes[:1])


def test_tokenizer_without_special_tokens_and_from_vocab():
    ours = train_bpe(TEXTS, 300)
    copy = BPETokenizer(dict(ours.vocab), list(ours.merges))
    assert copy.encode(TEXTS[0]) == ours.encode(TEXTS[0])
    assert copy.decode(copy.encode("<|endoftext|>")) == "<|endoftext|>"  # plain text here


def test_truncated_equals_training_with_a_smaller_vocabulary():
    big = train_bpe(TEXTS * 3, 400, SPECIAL)
    small = big.truncated(300)
    reference = train_bpe(TEXTS * 3, 300, SPECIAL)
    assert small.merges == reference.merges and small.vocab == reference.vocab
    assert big.truncated(400).merges == big.merges
    with pytest.raises(ValueError, match="between 257 and 400"):
        big.truncated(200)
    with pytest.raises(ValueError, match="between"):
        big.truncated(401)


def test_bad_inputs_raise_clear_errors():
    ours = train_bpe(TEXTS, 300, SPECIAL)
    with pytest.raises(TypeError, match="must be a str"):
        ours.encode(b"bytes")
    with pytest.raises(TypeError, match="must be a str"):
        pretokenize(42)
    with pytest.raises(TypeError, match="sequence of ints"):
        ours.decode("abc")
    with pytest.raises(TypeError, match="sequence of ints"):
        ours.decode(5)
    with pytest.raises(TypeError, match="must be ints"):
        ours.decode([1.5])
    with pytest.raises(TypeError, match="must be ints"):
        ours.decode([True])
    with pytest.raises(ValueError, match="outside this vocabulary"):
        ours.decode([10_000])
    with pytest.raises(ValueError, match=r"vocab_size >= 257"):
        train_bpe(TEXTS, 100, SPECIAL)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        train_bpe(TEXTS, 300.0)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        train_bpe(TEXTS, True)
    with pytest.raises(ValueError, match="min_frequency"):
        train_bpe(TEXTS, 300, min_frequency=-1)
    with pytest.raises(TypeError, match="iterable of strings"):
        train_bpe("just one string", 300)
    with pytest.raises(TypeError, match="every item of texts"):
        pretoken_counts(["ok", 3])
    with pytest.raises(ValueError, match="missing from the vocabulary"):
        BPETokenizer({"a": 0}, [("a", "b")])


def test_count_words_counts_pretokens():
    counts = pretoken_counts(["the cat the", "the"])
    assert counts == {"the": 2, "Ġcat": 1, "Ġthe": 1}
