"""Evaluating language models: the benchmark arithmetic under the leaderboards (Part 7, "Evaluating
language models").

Multiple choice by log-likelihood (how MMLU, HellaSwag and ARC are scored without generating text)
    Each option is scored by the log-probability of its continuation tokens given the context,
    $\\ell_j = \\sum_{t \\in \\text{cont}_j} \\log p(x_t \\mid x_{<t})$, and the model "chooses" the
    option with the largest score. The tokenization follows lm-evaluation-harness (``lm-eval``
    0.4.13, ``HFLM``) exactly, in :func:`encode_pair`: whitespace at the end of the context moves to
    the front of the continuation; context + continuation is encoded as one string and the
    continuation's tokens are whatever follows the first ``len(encode(context))`` tokens; an empty
    context is replaced by the BOS token (EOS if there is none).
    :func:`continuation_logprobs` scores many (context, continuation) requests in right-padded batches
    (on :func:`utils.sft.collate` and :func:`utils.preference.response_logprobs`);
    :func:`score_choices` scores items of (context, options), the continuation of option $j$ being
    ``delimiter + option_j``. Four ways to pick (``NORMS``), as ``lm-eval`` names them:

    - ``"sum"``: $\\arg\\max_j \\ell_j$ (``acc``);
    - ``"char"``: $\\arg\\max_j \\ell_j / |\\text{option}_j|_{\\text{chars}}$ (``acc_norm``; the
      length counts the option's characters without the delimiter);
    - ``"byte"``: $\\arg\\max_j \\ell_j / |\\text{option}_j|_{\\text{UTF-8 bytes}}$ (``acc_bytes``);
    - ``"token"``: $\\arg\\max_j \\ell_j / |\\text{cont}_j|_{\\text{tokens}}$ (mean per-token
      log-probability; tokenizer-dependent, so not comparable across models).

    :func:`choice_correct` gives 0/1 per item (for :func:`utils.stats.compare_metric`),
    :func:`choice_accuracy` the accuracy with its Wilson interval.

Code generation: :func:`pass_at_k`, the unbiased estimator of Chen et al. (2021), and
:func:`mean_pass_at_k` over problems with a bootstrap interval.

Contamination: :func:`word_ngrams` and :func:`ngram_overlap`, the share of an evaluation item's word
$n$-grams that occur in the training texts.

Agreement of a judge with humans: :func:`cohens_kappa` and :func:`kappa_ci` (bootstrap over items).
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np
import torch
from torch import nn

from utils.chat import IGNORE_INDEX, pad_token_id
from utils.checks import check_positive_int
from utils.preference import response_logprobs
from utils.sft import collate
from utils.stats import LEVEL, N_BOOT, Estimate, mean_ci, proportion_ci

__all__ = [
    "NORMS",
    "ChoiceScores",
    "choice_accuracy",
    "choice_correct",
    "cohens_kappa",
    "continuation_logprobs",
    "encode_pair",
    "kappa_ci",
    "mean_pass_at_k",
    "ngram_overlap",
    "pass_at_k",
    "prefix_token_id",
    "score_choices",
    "splits_cleanly",
    "word_ngrams",
]

#: The ways to turn option log-likelihoods into a choice, with lm-eval's metric name for each.
NORMS: dict[str, str] = {"sum": "acc", "char": "acc_norm", "byte": "acc_bytes", "token": "(none)"}


# --- tokenization at the context/continuation boundary ---------------------------------------------

def prefix_token_id(tokenizer) -> int:
    """The token that stands in for an empty context: BOS, else EOS (lm-eval's ``prefix_token_id``)."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token, so an empty context has "
                     "nothing to condition on; give every request a non-empty context")


def _tok_encode(tokenizer, text: str) -> list[int]:
    """``tokenizer.encode`` with its own special-token default, except that a text which already
    starts with the prefix (BOS) token's string gets no second one (lm-eval's ``tok_encode``)."""
    if text.startswith(tokenizer.decode(prefix_token_id(tokenizer))):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def _check_request(context: object, continuation: object) -> None:
    if not isinstance(context, str) or not isinstance(continuation, str):
        raise TypeError(f"a request is (context: str, continuation: str), got "
                        f"({type(context).__name__}, {type(continuation).__name__})")
    if not continuation:
        raise ValueError(f"the continuation after context {context[-40:]!r} is empty: there is "
                         "nothing to score")
    if context and not context.strip():
        raise ValueError(f"the context {context!r} is only whitespace; pass '' to condition on the "
                         "BOS token alone, or a real context")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` exactly as lm-eval 0.4.13 tokenizes a log-likelihood request.

    1. Trailing whitespace of ``context`` moves to the front of ``continuation``
       (``"Answer: " + "A"`` is scored as ``"Answer:" + " A"``): byte-level BPE tokenizers glue a
       space to the *following* word, so ``" A"`` is one token where ``" " + "A"`` would be two.
    2. ``whole = encode(context + continuation)``, ``ctx = encode(context)`` and the continuation's
       tokens are ``whole[len(ctx):]``. The model then reads ``ctx + whole[len(ctx):]``. When a token
       of ``whole`` straddles the boundary (:func:`splits_cleanly` is False) that is neither
       tokenization of the text; lm-eval does it anyway and so do we (see the tests).
    3. An empty ``context`` becomes ``[prefix_token_id]`` (BOS, else EOS), with the continuation
       encoded without special tokens; if its first token already is that token, it is split off.
    """
    _check_request(context, continuation)
    if not context:
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        prefix = prefix_token_id(tokenizer)
        ctx, cont = ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    else:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = _tok_encode(tokenizer, context + continuation)
        ctx = _tok_encode(tokenizer, context)
        cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"continuation {continuation!r} gets no token of its own after context "
                         f"{context[-40:]!r}: the tokenizer merges it into the context's last token. "
                         "Start the continuation with a delimiter such as a space")
    return ctx, cont


def splits_cleanly(tokenizer, context: str, continuation: str) -> bool:
    """True when ``encode(context + continuation)`` starts with ``encode(context)`` (after moving the
    context's trailing whitespace as :func:`encode_pair` does), i.e. no token straddles the boundary
    and the model reads the text's own tokenization."""
    _check_request(context, continuation)
    stripped = context.rstrip()
    if not stripped:
        return True
    rest = context[len(stripped):] + continuation
    ctx = _tok_encode(tokenizer, stripped)
    return _tok_encode(tokenizer, stripped + rest)[:len(ctx)] == ctx


# --- log-likelihoods of continuations --------------------------------------------------------------

def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def continuation_logprobs(model: nn.Module, tokenizer, requests: Sequence[tuple[str, str]],
                          batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps, n_tokens)``: for each ``(context, continuation)`` request, in order,
    $\\sum_{t \\in \\text{cont}} \\log p(x_t \\mid x_{<t})$ over its continuation tokens and their count.

    Tokens come from :func:`encode_pair` (lm-eval's rules). Requests are sorted longest first and run
    ``batch_size`` at a time, right-padded with an attention mask, so padding never changes a score
    (float32 log-softmax, as lm-eval's default). A request longer than the model's
    ``max_position_embeddings`` is an error: lm-eval would cut the context from the left.
    """
    requests = list(requests)
    if not requests:
        raise ValueError("continuation_logprobs got no requests; pass (context, continuation) pairs")
    check_positive_int("batch_size", batch_size)
    for i, req in enumerate(requests):
        if not isinstance(req, (tuple, list)) or len(req) != 2:
            raise TypeError(f"request {i} must be a (context, continuation) pair, got {req!r:.80}")
    pairs = [encode_pair(tokenizer, c, x) for c, x in requests]
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    for i, (ctx, cont) in enumerate(pairs):
        if limit is not None and len(ctx) + len(cont) > limit:
            raise ValueError(f"request {i} has {len(ctx) + len(cont)} tokens, more than the model's "
                             f"{limit} positions; shorten its context (e.g. fewer few-shot examples)")
    examples = [{"input_ids": ctx + cont, "labels": [IGNORE_INDEX] * len(ctx) + cont,
                 "attention_mask": [1] * (len(ctx) + len(cont))} for ctx, cont in pairs]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    pad, device = pad_token_id(tokenizer), _model_device(model)
    logps = torch.empty(len(examples), dtype=torch.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in rows], pad).items()}
        values, _ = response_logprobs(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        logps[rows] = values.float().cpu()
    n_tokens = torch.tensor([len(cont) for _, cont in pairs], dtype=torch.long)
    return logps, n_tokens


# --- multiple choice -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChoiceScores:
    """The options of one multiple-choice item and their summed log-likelihoods ``logprobs``.

    ``n_tokens`` counts each continuation's tokens (delimiter included), ``n_chars`` and ``n_bytes``
    each option's characters and UTF-8 bytes (delimiter excluded, as lm-eval counts them).
    """

    options: tuple[str, ...]
    logprobs: tuple[float, ...]
    n_tokens: tuple[int, ...]

    @property
    def n_chars(self) -> tuple[int, ...]:
        return tuple(len(o) for o in self.options)

    @property
    def n_bytes(self) -> tuple[int, ...]:
        return tuple(len(o.encode("utf-8")) for o in self.options)

    def scores(self, norm: str = "sum") -> tuple[float, ...]:
        """$\\ell_j$ (``"sum"``) or $\\ell_j$ divided by option $j$'s length in chars, bytes or tokens."""
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
        if norm == "sum":
            return self.logprobs
        lengths = {"char": self.n_chars, "byte": self.n_bytes, "token": self.n_tokens}[norm]
        return tuple(lp / n for lp, n in zip(self.logprobs, lengths))

    def prediction(self, norm: str = "sum") -> int:
        """Index of the chosen option: the largest :meth:`scores` (the first one on a tie, as
        ``np.argmax``)."""
        return int(np.argmax(self.scores(norm)))


def score_choices(model: nn.Module, tokenizer, items: Sequence[tuple[str, Sequence[str]]],
                  delimiter: str = " ", batch_size: int = 16) -> list[ChoiceScores]:
    """Score every option of every ``(context, options)`` item: the request for option $j$ is
    ``(context, delimiter + options[j])``, lm-eval's ``target_delimiter`` (a space by default).

    All options of all items go through :func:`continuation_logprobs` together (one batched pass).
    """
    items = list(items)
    if not items:
        raise ValueError("score_choices got no items; pass (context, options) pairs")
    if not isinstance(delimiter, str):
        raise TypeError(f"delimiter must be a str, got {type(delimiter).__name__}")
    requests, sizes = [], []
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 2 or isinstance(item[1], str):
            raise TypeError(f"item {i} must be (context, options) with options a list of strings, "
                            f"got {item!r:.80}")
        context, options = item
        options = list(options)
        if len(options) < 2:
            raise ValueError(f"item {i} has {len(options)} option(s); a choice needs at least two")
        if any(not isinstance(o, str) or not o for o in options):
            raise ValueError(f"item {i}: every option must be a non-empty string, got {options!r:.80}")
        requests += [(context, delimiter + o) for o in options]
        sizes.append(len(options))
    logps, n_tokens = continuation_logprobs(model, tokenizer, requests, batch_size)
    out, start = [], 0
    for (_, options), size in zip(items, sizes):
        stop = start + size
        out.append(ChoiceScores(tuple(options), tuple(logps[start:stop].tolist()),
                                tuple(n_tokens[start:stop].tolist())))
        start = stop
    return out


def choice_correct(scores: Sequence[ChoiceScores], golds: Sequence[int], norm: str = "sum") -> list[float]:
    """1.0 per item whose :meth:`ChoiceScores.prediction` (under ``norm``) is the gold index, else 0.0."""
    scores, golds = list(scores), list(golds)
    if len(scores) != len(golds):
        raise ValueError(f"got {len(scores)} scored items for {len(golds)} gold answers")
    if not scores:
        raise ValueError("choice_correct got no items")
    out = []
    for i, (s, g) in enumerate(zip(scores, golds)):
        if isinstance(g, bool) or not isinstance(g, numbers.Integral) or not 0 <= g < len(s.options):
            raise ValueError(f"gold answer {i} must be an option index in 0..{len(s.options) - 1}, "
                             f"got {g!r}")
        out.append(float(s.prediction(norm) == g))
    return out


def choice_accuracy(scores: Sequence[ChoiceScores], golds: Sequence[int], norm: str = "sum",
                    level: float = LEVEL) -> Estimate:
    """Accuracy over items, $\\frac{1}{N}\\sum_i [\\hat\\jmath_i = g_i]$, with its Wilson interval
    (:func:`utils.stats.proportion_ci`)."""
    correct = choice_correct(scores, golds, norm)
    return proportion_ci(int(sum(correct)), len(correct), level)


# --- pass@k ----------------------------------------------------------------------------------------

def _check_count(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")
    return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al., 2021):

    $$\\text{pass@}k = 1 - \\binom{n-c}{k} \\Big/ \\binom{n}{k}
                     = 1 - \\prod_{i=n-c+1}^{n} \\left(1 - \\frac{k}{i}\\right),$$

    the chance that $k$ samples drawn without replacement from the $n$ contain a correct one. The
    product form never builds the huge binomials; it is 1 when $n - c < k$.
    """
    n = check_positive_int("n", n, hint="samples drawn per problem")
    c = _check_count("c (correct samples)", c, 0, n)
    k = _check_count("k", k, 1, n)
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(n: int | Sequence[int], c: Sequence[int], k: int, level: float = LEVEL,
                   n_boot: int = N_BOOT, seed: int = 0) -> Estimate:
    """pass@k averaged over problems, $\\frac{1}{P}\\sum_p \\text{pass@}k(n_p, c_p)$, with a bootstrap
    interval over problems (:func:`utils.stats.mean_ci`). ``n`` is one sample count for all
    problems or one per problem; ``c`` the correct counts."""
    c = list(c)
    ns = [n] * len(c) if isinstance(n, numbers.Integral) else list(n)
    if len(ns) != len(c):
        raise ValueError(f"got {len(ns)} sample counts for {len(c)} correct counts; one per problem")
    if not c:
        raise ValueError("mean_pass_at_k got no problems")
    return mean_ci([pass_at_k(ni, ci, k) for ni, ci in zip(ns, c)], level, n_boot, seed)


# --- contamination ---------------------------------------------------------------------------------

_WORD = re.compile(r"\w+")


def _words(text: object, what: str) -> list[str]:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    return _WORD.findall(text.lower())


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The word $n$-grams of ``text`` in order (with repeats). Normalisation: lower-case, and a word
    is a maximal run of letters, digits or ``_`` (``\\w+``), so punctuation and whitespace only
    separate words. A text of fewer than ``n`` words has none."""
    n = check_positive_int("n", n)
    words = _words(text, "text")
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def ngram_overlap(eval_texts: Sequence[str], train_texts: str | Sequence[str], n: int = 13) -> list[float]:
    """Per evaluation item, the share of its word $n$-grams that occur in the training texts:

    $$\\text{overlap}(e) = \\frac{|\\{i : (w_i, \\dots, w_{i+n-1}) \\in G_n(\\text{train})\\}|}
                               {L - n + 1}$$

    over the $L - n + 1$ windows of the item's $L$ normalised words (:func:`word_ngrams`; 13 words
    as in GPT-3's contamination study). $G_n$ holds the $n$-grams of each training text separately,
    so none spans two documents. An item shorter than ``n`` words is one window of its own length
    $L$ (0 or 1: does the whole item occur?). 0 means no shared window, 1 that every window is in
    the training data.
    """
    n = check_positive_int("n", n)
    eval_texts = [eval_texts] if isinstance(eval_texts, str) else list(eval_texts)
    train_texts = [train_texts] if isinstance(train_texts, str) else list(train_texts)
    if not eval_texts:
        raise ValueError("ngram_overlap got no evaluation items")
    train_words = [_words(t, f"training text {i}") for i, t in enumerate(train_texts)]
    grams: dict[int, set[tuple[str, ...]]] = {}
    out = []
    for i, text in enumerate(eval_texts):
        words = _words(text, f"evaluation item {i}")
        if not words:
            raise ValueError(f"evaluation item {i} ({text!r:.40}) has no words to compare")
        size = min(n, len(words))
        if size not in grams:
            grams[size] = {tuple(w[j:j + size]) for w in train_words for j in range(len(w) - size + 1)}
        windows = [tuple(words[j:j + size]) for j in range(len(words) - size + 1)]
        out.append(sum(w in grams[size] for w in windows) / len(windows))
    return out


# --- agreement -------------------------------------------------------------------------------------

def _label_codes(a: Sequence[Hashable], b: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray, int]:
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"the two raters labelled {len(a)} and {len(b)} items; pass one label each "
                         "per item, in the same order")
    if not a:
        raise ValueError("cohens_kappa got no items")
    labels = {x: j for j, x in enumerate(dict.fromkeys(a + b))}
    return np.array([labels[x] for x in a]), np.array([labels[x] for x in b]), len(labels)


def _kappa_from_counts(counts: np.ndarray) -> np.ndarray:
    """Kappa of (..., L, L) confusion counts; NaN where $p_e = 1$."""
    total = counts.sum(axis=(-2, -1))
    p_o = np.trace(counts, axis1=-2, axis2=-1) / total
    p_e = (counts.sum(axis=-1) * counts.sum(axis=-2)).sum(axis=-1) / total ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isclose(p_e, 1.0), np.nan, (p_o - p_e) / (1.0 - p_e))


def cohens_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters' labels on the same items (e.g. a judge's and a human's):

    $$\\kappa = \\frac{p_o - p_e}{1 - p_e},\\quad p_o = \\frac{1}{N}\\sum_i [a_i = b_i],\\quad
      p_e = \\sum_\\ell p_a(\\ell)\\, p_b(\\ell),$$

    observed agreement corrected for the agreement two independent raters with these label
    frequencies would reach by chance: 1 is perfect, 0 chance level, below 0 worse than chance.
    Labels are any hashable values. Undefined (an error) when $p_e = 1$, i.e. both raters gave one
    and the same label to every item.
    """
    codes_a, codes_b, n_labels = _label_codes(a, b)
    counts = np.zeros((n_labels, n_labels))
    np.add.at(counts, (codes_a, codes_b), 1)
    kappa = float(_kappa_from_counts(counts))
    if math.isnan(kappa):
        raise ValueError("kappa is undefined: both raters gave the same single label to every item "
                         "(chance agreement p_e = 1); report the raw agreement instead")
    return kappa


def kappa_ci(a: Sequence[Hashable], b: Sequence[Hashable], level: float = LEVEL, n_boot: int = N_BOOT,
             seed: int = 0) -> Estimate:
    """:func:`cohens_kappa` with a percentile bootstrap interval at ``level``: items are resampled
    with replacement (each item's two labels together) ``n_boot`` times. Resamples in which kappa is
    undefined (one label only) are left out; fewer than half left is an error (too few items)."""
    if not isinstance(level, (int, float)) or isinstance(level, bool) or not 0 < level < 1:
        raise ValueError(f"level must be a number strictly between 0 and 1 (e.g. 0.95), got {level!r}")
    n_boot = check_positive_int("n_boot", n_boot, minimum=100, hint="bootstrap resamples")
    value = cohens_kappa(a, b)
    codes_a, codes_b, n_labels = _label_codes(a, b)
    n = codes_a.size
    rng = np.random.default_rng(seed)
    cells = n_labels * n_labels
    kappas = []
    rows = max(1, 4_000_000 // n)
    for start in range(0, n_boot, rows):
        m = min(rows, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        flat = (np.arange(m)[:, None] * cells + codes_a[idx] * n_labels + codes_b[idx]).ravel()
        counts = np.bincount(flat, minlength=m * cells).reshape(m, n_labels, n_labels)
        kappas.append(_kappa_from_counts(counts))
    kappas = np.concatenate(kappas)
    kappas = kappas[~np.isnan(kappas)]
    if kappas.size < n_boot / 2:
        raise ValueError(f"kappa is undefined in {n_boot - kappas.size} of {n_boot} resamples (one "
                         f"label only): {n} items are too few for an interval")
    alpha = (1 - level) / 2
    lo, hi = np.quantile(kappas, [alpha, 1 - alpha])
    return Estimate(value, float(lo), float(hi), int(n), level)
