"""Tests for utils.evaluation on a tiny ChatML tokenizer and a tiny random LlamaForCausalLM (no download).

Log-likelihoods are checked against a plain unbatched forward pass and, where ``lm_eval`` is installed,
against lm-eval's own ``HFLM.loglikelihood`` (also with SmolLM2's real tokenizer when its converted
copy is cached); pass@k against enumeration of all k-subsets; Cohen's kappa against scikit-learn.
"""
import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from tiny_chatml import chatml_tokenizer, tiny_llama
from tokenizers import processors

from utils.evaluation import (NORMS, ChoiceScores, choice_accuracy, choice_correct, cohens_kappa,
                              continuation_logprobs, encode_pair, kappa_ci, mean_pass_at_k,
                              ngram_overlap, pass_at_k, prefix_token_id, score_choices,
                              splits_cleanly, word_ngrams)

CORPUS = ["The cat sat on the mat.", "A dog ran in the park!", "Paris is the capital of France.",
          "Question: What is the capital of France? Answer: Paris", "Héllo wörld, ünïcode café."] * 4
Q = "Question: What is the capital of France?\nAnswer:"
OPTIONS = ["Paris", "Berlin", "a dog in the park", "café"]
# (context, continuation) requests covering every tokenization rule of encode_pair
REQUESTS = [
    ("The cat sat on the", " mat."),               # plain: delimiter on the continuation
    ("The cat sat on the ", "mat."),               # trailing space moves to the continuation
    ("Paris is the capital of France.\n\n", "The cat"),  # trailing newlines move too
    ("", "Paris"),                                 # empty context: BOS stands in
    ("The cat sat on the m", "at. A dog ran"),     # a token straddles the boundary
    ("hel", "lo world"),                           # straddles, but ctx is a prefix of whole
    ("<|im_start|>Hi", " there"),                  # context already starts with BOS
    ("Héllo", " wörld ünïcode café"),              # non-ASCII bytes
    ("A dog", " ran in the park! A dog ran in the park!"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return chatml_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def bos_tokenizer():
    """The same tokenizer, but ``encode`` adds a BOS token (as Llama-2's does)."""
    tok = chatml_tokenizer(CORPUS)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", tok.bos_token_id)])
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer, num_hidden_layers=2, max_position_embeddings=128)


def _reference_logprob(model, ctx, cont):
    """log p(cont | ctx) from one unpadded forward pass, written out independently."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


# --- tokenization ----------------------------------------------------------------------------------

def test_encode_pair_rules(tokenizer, bos_tokenizer):
    enc = tokenizer.encode
    ctx, cont = encode_pair(tokenizer, "The cat sat on the", " mat.")
    assert ctx == enc("The cat sat on the") and ctx + cont == enc("The cat sat on the mat.")
    assert encode_pair(tokenizer, "The cat sat on the ", "mat.") == (ctx, cont)  # the space moves
    assert encode_pair(tokenizer, "", "Paris") == ([tokenizer.bos_token_id], enc("Paris"))
    assert encode_pair(tokenizer, "", "<|im_start|>Paris") == ([tokenizer.bos_token_id], enc("Paris"))
    # a token straddling the boundary: the model reads encode(ctx) + whole[len(encode(ctx)):]
    ctx, cont = encode_pair(tokenizer, "The cat sat on the m", "at. A dog ran")
    whole = enc("The cat sat on the mat. A dog ran")
    assert ctx == enc("The cat sat on the m") and cont == whole[len(ctx):]
    assert not splits_cleanly(tokenizer, "The cat sat on the m", "at. A dog ran")
    assert splits_cleanly(tokenizer, "The cat sat on the ", "mat.") and splits_cleanly(tokenizer, "", "x")
    # a tokenizer that adds BOS: once, also when the context already starts with it
    ctx, _ = encode_pair(bos_tokenizer, "The cat", " sat")
    assert ctx[0] == bos_tokenizer.bos_token_id and ctx[1] != bos_tokenizer.bos_token_id
    assert encode_pair(bos_tokenizer, "<|im_start|>The cat", " sat") == encode_pair(bos_tokenizer, "The cat", " sat")


def test_encode_pair_errors(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        encode_pair(tokenizer, "The cat", "")
    with pytest.raises(ValueError, match="only whitespace"):
        encode_pair(tokenizer, "  \n", "cat")
    with pytest.raises(TypeError, match="context: str"):
        encode_pair(tokenizer, None, "cat")
    with pytest.raises(ValueError, match="merges it into the context"):
        encode_pair(tokenizer, "The cat sat on the ma", "t.")
    with pytest.raises(ValueError, match="no token of its own"):
        encode_pair(tokenizer, "", "<|im_start|>")

    class NoSpecials:
        bos_token_id = eos_token_id = None
    with pytest.raises(ValueError, match="neither a BOS nor an EOS"):
        prefix_token_id(NoSpecials())
    assert prefix_token_id(tokenizer) == tokenizer.bos_token_id


# --- log-likelihoods -------------------------------------------------------------------------------

def test_continuation_logprobs_equal_an_unbatched_forward(model, tokenizer):
    logps, n_tokens = continuation_logprobs(model, tokenizer, REQUESTS, batch_size=3)
    for (c, x), lp, n in zip(REQUESTS, logps, n_tokens):
        ctx, cont = encode_pair(tokenizer, c, x)
        assert n == len(cont)
        assert lp.item() == pytest.approx(_reference_logprob(model, ctx, cont), abs=1e-4)
    one_by_one, _ = continuation_logprobs(model, tokenizer, REQUESTS, batch_size=1)
    torch.testing.assert_close(logps, one_by_one, atol=1e-4, rtol=0)
    assert (logps < 0).all()


def test_continuation_logprobs_errors(model, tokenizer):
    with pytest.raises(ValueError, match="no requests"):
        continuation_logprobs(model, tokenizer, [])
    with pytest.raises(TypeError, match="request 0"):
        continuation_logprobs(model, tokenizer, ["just a string"])
    with pytest.raises(ValueError, match="batch_size"):
        continuation_logprobs(model, tokenizer, REQUESTS, batch_size=0)
    with pytest.raises(ValueError, match="more than the model's 128 positions"):
        continuation_logprobs(model, tokenizer, [("The cat sat. " * 40, " mat")])


# --- multiple choice -------------------------------------------------------------------------------

def test_choice_scores_norms():
    s = ChoiceScores(options=("ab", "abcdef", "é"), logprobs=(-4.0, -6.0, -3.0), n_tokens=(1, 3, 2))
    assert s.n_chars == (2, 6, 1) and s.n_bytes == (2, 6, 2)
    assert s.scores("sum") == s.logprobs and s.prediction() == 2
    assert s.scores("char") == (-2.0, -1.0, -3.0) and s.prediction("char") == 1
    assert s.scores("byte") == (-2.0, -1.0, -1.5) and s.prediction("byte") == 1
    assert s.scores("token") == (-4.0, -2.0, -1.5) and s.prediction("token") == 2
    assert ChoiceScores(("a", "b"), (-1.0, -1.0), (1, 1)).prediction() == 0  # first on a tie
    assert set(NORMS) == {"sum", "char", "byte", "token"}
    with pytest.raises(ValueError, match="norm must be one of"):
        s.scores("chars")


def test_score_choices_and_accuracy(model, tokenizer):
    items = [(Q, OPTIONS), ("The cat sat on the", ["mat.", "park!", "capital"])]
    scores = score_choices(model, tokenizer, items, batch_size=4)
    logps, n_tokens = continuation_logprobs(model, tokenizer, [(Q, " " + o) for o in OPTIONS])
    assert scores[0].options == tuple(OPTIONS) and scores[0].n_tokens == tuple(n_tokens.tolist())
    np.testing.assert_allclose(scores[0].logprobs, logps.numpy(), atol=1e-5)
    newline = score_choices(model, tokenizer, items[:1], delimiter="\n")[0]
    assert newline.logprobs != scores[0].logprobs
    golds = [scores[0].prediction(), (scores[1].prediction() + 1) % 3]
    assert choice_correct(scores, golds) == [1.0, 0.0]
    acc = choice_accuracy(scores, golds)
    assert acc.value == 0.5 and acc.n == 2 and 0 < acc.lo < 0.5 < acc.hi < 1
    assert choice_correct(scores, [s.prediction("char") for s in scores], norm="char") == [1.0, 1.0]


def test_score_choices_errors(model, tokenizer):
    with pytest.raises(ValueError, match="no items"):
        score_choices(model, tokenizer, [])
    with pytest.raises(TypeError, match="options a list of strings"):
        score_choices(model, tokenizer, [(Q, "Paris")])
    with pytest.raises(ValueError, match="at least two"):
        score_choices(model, tokenizer, [(Q, ["Paris"])])
    with pytest.raises(ValueError, match="non-empty string"):
        score_choices(model, tokenizer, [(Q, ["Paris", ""])])
    with pytest.raises(TypeError, match="delimiter"):
        score_choices(model, tokenizer, [(Q, OPTIONS)], delimiter=None)
    s = [ChoiceScores(("a", "b"), (-1.0, -2.0), (1, 1))]
    with pytest.raises(ValueError, match="1 scored items for 2 gold"):
        choice_correct(s, [0, 1])
    with pytest.raises(ValueError, match="no items"):
        choice_correct([], [])
    for bad in (2, -1, True, 0.0):
        with pytest.raises(ValueError, match="option index in 0..1"):
            choice_correct(s, [bad])


# --- against lm-eval -------------------------------------------------------------------------------

def _lm_eval_loglikelihoods(model, tokenizer, requests, batch_size=4):
    hf = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance
    lm = hf.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
                 for i, r in enumerate(requests)]
    return lm, torch.tensor([ll for ll, _ in lm.loglikelihood(instances, disable_tqdm=True)])


LM_EVAL_ATOL = 1e-4  # float32 sums of a few log-probabilities; observed differences are below 2e-5


def test_equal_to_lm_eval_hflm(model, tokenizer, bos_tokenizer):
    """Our per-request log-likelihoods and choices are lm-eval 0.4.13's HFLM.loglikelihood ones."""
    lm, ref = _lm_eval_loglikelihoods(model, tokenizer, REQUESTS)
    ours, _ = continuation_logprobs(model, tokenizer, REQUESTS, batch_size=2)
    torch.testing.assert_close(ours, ref, atol=LM_EVAL_ATOL, rtol=0)
    for c, x in REQUESTS:
        if c:
            assert encode_pair(tokenizer, c, x) == tuple(lm._encode_pair(c, x))
    # multiple choice: lm-eval's requests are (context, target_delimiter + choice); acc picks the
    # largest log-likelihood, acc_norm divides by len(choice), acc_bytes by its UTF-8 bytes
    items = [(Q, OPTIONS), ("The cat sat on the", ["mat.", "park!", "capital", "ünïcode"])]
    scores = score_choices(model, tokenizer, items)
    for (ctx, options), s in zip(items, scores):
        _, lls = _lm_eval_loglikelihoods(model, tokenizer, [(ctx, " " + o) for o in options])
        np.testing.assert_allclose(s.logprobs, lls.numpy(), atol=LM_EVAL_ATOL, rtol=0)
        lls = lls.numpy()
        assert s.prediction("sum") == np.argmax(lls)
        assert s.prediction("char") == np.argmax(lls / np.array([float(len(o)) for o in options]))
        assert s.prediction("byte") == np.argmax(lls / np.array([float(len(o.encode())) for o in options]))
    # a tokenizer that adds BOS itself
    model_bos = tiny_llama(bos_tokenizer, num_hidden_layers=2, max_position_embeddings=128)
    _, ref = _lm_eval_loglikelihoods(model_bos, bos_tokenizer, REQUESTS)
    ours, _ = continuation_logprobs(model_bos, bos_tokenizer, REQUESTS)
    torch.testing.assert_close(ours, ref, atol=LM_EVAL_ATOL, rtol=0)


def test_equal_to_lm_eval_with_smollm2_tokenizer():
    """SmolLM2's real byte-level BPE tokenizer (no BOS added; BOS = <|im_start|>) on a tiny random
    Llama of its vocabulary: the boundary handling is what matters here, not the weights."""
    pytest.importorskip("lm_eval.models.huggingface")
    from transformers import AutoTokenizer

    from utils.models import converted_model_dir, is_converted
    if not is_converted():
        pytest.skip("SmolLM2's converted copy is not cached (utils.models.load_llm makes it)")
    tok = AutoTokenizer.from_pretrained(converted_model_dir())
    model = tiny_llama(tok, num_hidden_layers=1, max_position_embeddings=256)
    requests = REQUESTS + [(Q + "\nA. Paris\nB. Berlin\nAnswer:", f" {o}") for o in "AB"] + [
        ("Answer:", " 1999"), ("x = 12", "34"), ("I saw", "\n\nthe")]
    _, ref = _lm_eval_loglikelihoods(model, tok, requests)
    ours, _ = continuation_logprobs(model, tok, requests)
    torch.testing.assert_close(ours, ref, atol=LM_EVAL_ATOL, rtol=0)


# --- pass@k ----------------------------------------------------------------------------------------

def test_pass_at_k_equals_enumerating_all_k_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200)
    for n, c, k in [(2000, 3, 100), (1000, 0, 10), (500, 499, 1), (5000, 17, 250)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-10)
    assert pass_at_k(10, 8, 3) == 1.0  # n - c < k: every 3-subset holds a correct sample


def test_pass_at_k_errors_and_mean():
    for args, msg in [((0, 0, 1), "n must be"), ((5, 6, 1), "c \\(correct samples\\)"),
                      ((5, -1, 1), "c \\(correct"), ((5, 1, 0), "k must be"), ((5, 1, 6), "k must be"),
                      ((5, True, 1), "c \\(correct"), ((5.0, 1, 1), "n must be")]:
        with pytest.raises(ValueError, match=msg):
            pass_at_k(*args)
    est = mean_pass_at_k(10, [0, 1, 5, 10, 2, 3], k=2, n_boot=200)
    values = [pass_at_k(10, c, 2) for c in [0, 1, 5, 10, 2, 3]]
    assert est.value == pytest.approx(np.mean(values)) and est.n == 6 and est.lo <= est.value <= est.hi
    assert mean_pass_at_k([10, 20], [1, 2], k=1).value == pytest.approx(0.1)
    with pytest.raises(ValueError, match="2 sample counts for 3"):
        mean_pass_at_k([10, 10], [1, 2, 3], k=1)
    with pytest.raises(ValueError, match="no problems"):
        mean_pass_at_k(10, [], k=1)


# --- contamination ---------------------------------------------------------------------------------

TRAIN = ["The quick brown fox jumps over the lazy dog near the old river bank today.",
         "Reading documentation carefully saves hours of debugging later on in any project."]
LEAK = ("Which planet is known as the red planet because of the iron oxide dust that covers "
        "its surface and rocks")


def test_word_ngrams():
    assert word_ngrams("The cat, the HAT!", 2) == [("the", "cat"), ("cat", "the"), ("the", "hat")]
    assert word_ngrams("one two", 3) == []
    with pytest.raises(ValueError, match="n must be"):
        word_ngrams("a b", 0)
    with pytest.raises(TypeError, match="text must be a str"):
        word_ngrams(None, 2)


def test_ngram_overlap_catches_a_planted_leak():
    clean = ["What is the boiling point of water at sea level in degrees Celsius on a normal day",
             "Name the author who wrote the novel about a whale and a captain obsessed with revenge"]
    # the leak sits in the training data with other casing and punctuation
    train = TRAIN + ["Trivia dump: " + LEAK.upper().replace(" the ", ", the ") + " -- answer: Mars."]
    overlap = ngram_overlap(clean + [LEAK], train, n=13)
    assert overlap == [0.0, 0.0, 1.0]
    # half of an item leaked: the share of its windows found in training
    words = LEAK.split()
    half = " ".join(words[:13]) + " " + " ".join(f"fresh{i}" for i in range(13))
    (share,) = ngram_overlap([half], train, n=13)
    assert share == pytest.approx(1 / len(word_ngrams(half, 13)))
    (share,) = ngram_overlap([half], train, n=4)
    assert share == pytest.approx(10 / 23)
    # an item shorter than n is compared whole; n-grams never span two training documents
    assert ngram_overlap(["Lazy dog near", "bank today reading"], TRAIN, n=13) == [1.0, 0.0]
    assert ngram_overlap("lazy dog", "the lazy dog", n=2) == [1.0]


def test_ngram_overlap_errors():
    with pytest.raises(ValueError, match="no evaluation items"):
        ngram_overlap([], TRAIN)
    with pytest.raises(ValueError, match="item 1 .* has no words"):
        ngram_overlap(["a b", "?!"], TRAIN)
    with pytest.raises(TypeError, match="training text 1 must be a str"):
        ngram_overlap(["a b"], ["ok", 3])
    with pytest.raises(ValueError, match="n must be"):
        ngram_overlap(["a b"], TRAIN, n=0)


# --- Cohen's kappa ---------------------------------------------------------------------------------

def test_cohens_kappa_equals_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for n, labels in [(30, ["1", "2"]), (50, ["1", "2", "tie"]), (7, [0, 1, 2, 3])]:
        a = [rng.choice(labels) for _ in range(n)]
        b = [x if rng.random() < 0.6 else rng.choice(labels) for x in a]
        assert cohens_kappa(a, b) == pytest.approx(metrics.cohen_kappa_score(a, b), abs=1e-12)
    assert cohens_kappa(["a", "b", "a"], ["a", "b", "a"]) == 1.0
    assert cohens_kappa(["a", "a", "b", "b"], ["b", "b", "a", "a"]) == -1.0
    assert cohens_kappa(["a", "a", "a", "a"], ["a", "a", "a", "b"]) == 0.0  # only chance agreement


def test_kappa_ci_is_a_bootstrap_of_items():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(1)
    a = [rng.choice("xyz") for _ in range(40)]
    b = [x if rng.random() < 0.7 else rng.choice("xyz") for x in a]
    est = kappa_ci(a, b, n_boot=300, seed=3)
    assert est.value == cohens_kappa(a, b) and est.n == 40 and est.lo < est.value < est.hi
    # the same resamples, scored one by one with scikit-learn
    idx = np.random.default_rng(3).integers(0, 40, size=(300, 40))
    A, B = np.array(a), np.array(b)
    kappas = [metrics.cohen_kappa_score(A[i], B[i]) for i in idx]
    lo, hi = np.quantile(kappas, [0.025, 0.975])
    assert (est.lo, est.hi) == pytest.approx((lo, hi), abs=1e-12)
    assert kappa_ci(a, b, n_boot=300, seed=3) == est
    assert kappa_ci(a, b, level=0.5, n_boot=300).width < est.width


def test_kappa_errors_and_edge_cases():
    with pytest.raises(ValueError, match="undefined: both raters"):
        cohens_kappa(["a", "a"], ["a", "a"])
    with pytest.raises(ValueError, match="labelled 2 and 1 items"):
        cohens_kappa(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no items"):
        cohens_kappa([], [])
    with pytest.raises(ValueError, match="level"):
        kappa_ci(["a", "b"], ["a", "b"], level=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        kappa_ci(["a", "b"], ["a", "b"], n_boot=10)
    # two items: half the resamples repeat one item and have one label only (more than half here)
    with pytest.raises(ValueError, match="too few for an interval"):
        kappa_ci(["a", "b"], ["a", "b"], n_boot=100, seed=0)
    # resamples with one label only are dropped, the rest give the interval
    est = kappa_ci(list("aabbab"), list("aabbba"), n_boot=400)
    assert -1 <= est.lo <= est.hi <= 1
