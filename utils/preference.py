"""Preference data and pairwise losses for alignment (Part 3).

Preference pairs from human ratings
    Every movie-review snippet of :func:`utils.data.load_movie_reviews` carries the mean of at least 20
    human sentiment ratings (-4 = very negative, 4 = very positive). For the prompt
    ``"Write a positive movie review."`` a snippet the panel rated higher is the better answer; for
    ``"Write a negative movie review."`` the lower-rated one is. :func:`split_snippets` first splits the
    snippets (by id, seeded) so that no test snippet is ever seen in training; :func:`build_pairs` then
    draws pairs inside one side of the split whose ratings differ by at least ``min_gap`` (small gaps are
    mostly rater noise) and orders them into ``chosen`` and ``rejected``.

Losses, each returning one value per example (average them yourself)
    - :func:`bradley_terry_loss`: reward-model training, $-\\log\\sigma(r_c - r_r)$.
    - :func:`dpo_loss`, :func:`ipo_loss`, :func:`kto_loss` (reference-model based),
      :func:`orpo_loss`, :func:`simpo_loss` (reference-free), all written from per-sequence
      log-probabilities such as :func:`response_logprobs` returns.

Reward-model helpers: :func:`prefix_trunk_cache` (frozen-trunk hidden states of many responses to one
prompt, computing the shared prompt once), :func:`last_token_rewards` (a scalar head read at each
sequence's last real token) and :func:`pairwise_accuracy`. The top layer at the last token alone is
:func:`utils.hf_llama.last_token_top_layer`.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.checks import check_positive_int
from utils.chat import IGNORE_INDEX
from utils.hf_llama import prefix_trunk_hidden

__all__ = [
    "PAIR_FIELDS",
    "PROMPTS",
    "bradley_terry_loss",
    "build_pairs",
    "dpo_loss",
    "ipo_loss",
    "kto_loss",
    "last_token_rewards",
    "orpo_loss",
    "pairwise_accuracy",
    "preferred",
    "prefix_trunk_cache",
    "response_logprobs",
    "response_targets",
    "simpo_loss",
    "split_snippets",
    "validate_pairs",
]

#: The two instructions the movie-review preference data answers.
PROMPTS: dict[str, str] = {
    "positive": "Write a positive movie review.",
    "negative": "Write a negative movie review.",
}

PAIR_FIELDS = ("prompt", "chosen", "rejected")


# --- preference pairs ------------------------------------------------------------------------------

def _check_rows(rows: Sequence[dict]) -> None:
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(k in row for k in ("id", "score", "text")):
            raise ValueError(f"row {i} must be a dict with 'id', 'score' and 'text' "
                             f"(a load_movie_reviews row), got {row!r:.80}")


def split_snippets(rows: Sequence[dict], test_fraction: float = 0.2,
                   seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Shuffle rated snippets (seeded) and split them into disjoint ``(train, test)`` lists by ``id``.

    Snippets with the same text are kept on the same side, so a test text never appears in training.
    """
    rows = [dict(r) for r in rows]
    if len(rows) < 2:
        raise ValueError(f"need at least two snippets to split, got {len(rows)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    _check_rows(rows)
    texts = sorted({r["text"] for r in rows})
    random.Random(seed).shuffle(texts)
    n_test = min(max(1, round(test_fraction * len(texts))), len(texts) - 1)
    test_texts = set(texts[:n_test])
    train = [r for r in rows if r["text"] not in test_texts]
    test = [r for r in rows if r["text"] in test_texts]
    return train, test


def preferred(a: dict, b: dict, kind: str) -> tuple[dict, dict]:
    """``(chosen, rejected)`` among two rated snippets for the prompt ``kind``."""
    if kind not in PROMPTS:
        raise ValueError(f"unknown prompt kind {kind!r}; expected one of {sorted(PROMPTS)}")
    higher, lower = (a, b) if a["score"] >= b["score"] else (b, a)
    return (higher, lower) if kind == "positive" else (lower, higher)


def build_pairs(rows: Sequence[dict], kind: str, n_pairs: int, min_gap: float = 1.0,
                seed: int = 0, max_tries: int = 100) -> list[dict]:
    """``n_pairs`` preference pairs for the prompt ``kind`` ("positive" or "negative").

    Each pair is two different snippets of ``rows`` (drawn uniformly, seeded) whose mean human ratings
    differ by at least ``min_gap``; ``chosen`` is the higher-rated one for "positive", the lower-rated
    one for "negative". A pair is a dict: ``prompt``, ``kind``, ``chosen``, ``rejected``,
    ``chosen_score``, ``rejected_score``, ``chosen_id``, ``rejected_id``. The same snippet pair is
    not drawn twice.
    """
    if kind not in PROMPTS:
        raise ValueError(f"unknown prompt kind {kind!r}; expected one of {sorted(PROMPTS)}")
    check_positive_int("n_pairs", n_pairs)
    if min_gap < 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap!r}")
    rows = list(rows)
    if len(rows) < 2:
        raise ValueError(f"need at least two snippets to make a pair, got {len(rows)}")
    _check_rows(rows)
    rng = random.Random(seed)
    pairs, seen, misses = [], set(), 0
    while len(pairs) < n_pairs:
        a, b = rng.sample(rows, 2)
        key = frozenset((a["id"], b["id"]))
        if a["text"] == b["text"] or abs(a["score"] - b["score"]) < min_gap or key in seen:
            misses += 1
            if misses > max_tries * n_pairs:
                raise ValueError(f"found only {len(pairs)} of {n_pairs} pairs with a rating gap >= "
                                 f"{min_gap} among {len(rows)} snippets; lower min_gap or n_pairs")
            continue
        seen.add(key)
        chosen, rejected = preferred(a, b, kind)
        pairs.append({"prompt": PROMPTS[kind], "kind": kind,
                      "chosen": chosen["text"], "rejected": rejected["text"],
                      "chosen_score": chosen["score"], "rejected_score": rejected["score"],
                      "chosen_id": chosen["id"], "rejected_id": rejected["id"]})
    return validate_pairs(pairs)


def validate_pairs(pairs: Sequence[dict]) -> list[dict]:
    """Check that every pair has non-empty ``prompt``, ``chosen`` and ``rejected`` strings that differ."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("got no preference pairs (an empty batch)")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, dict):
            raise TypeError(f"pair {i} must be a dict, got {type(pair).__name__}")
        missing = [k for k in PAIR_FIELDS if k not in pair]
        if missing:
            raise ValueError(f"pair {i} is missing field(s) {missing}; a pair needs {list(PAIR_FIELDS)}")
        for k in PAIR_FIELDS:
            if not isinstance(pair[k], str) or not pair[k].strip():
                raise ValueError(f"pair {i}: {k!r} must be a non-empty string, got {pair[k]!r:.60}")
        if pair["chosen"] == pair["rejected"]:
            raise ValueError(f"pair {i}: chosen and rejected are identical ({pair['chosen']!r:.60}); "
                             "a preference needs two different responses")
    return pairs


# --- loss helpers ----------------------------------------------------------------------------------

def _check_beta(beta: float, name: str = "beta") -> None:
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
        raise ValueError(f"{name} must be a number > 0, got {beta!r}")


def _check_same(**tensors: torch.Tensor) -> None:
    """All tensors 1-D, non-empty and of one shape."""
    shapes = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D (one value per sequence), got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty: a loss needs at least one example")
        shapes[name] = tuple(t.shape)
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes differ: {shapes}; pass one value per pair in each tensor")


def _check_lengths(**lengths: torch.Tensor) -> None:
    for name, t in lengths.items():
        if (t <= 0).any():
            raise ValueError(f"{name} must count >= 1 response token per sequence, got {t.tolist()}")


# --- reward model ----------------------------------------------------------------------------------

def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair Bradley-Terry loss $-\\log\\sigma(r_c - r_r - m)$ ($m$ = ``margin``, default 0).

    Under the Bradley-Terry model the probability that a rater prefers $c$ to $r$ is
    $\\sigma(r_c - r_r)$, so this is the negative log-likelihood of the observed preferences.
    """
    _check_same(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        _check_same(chosen_rewards=chosen_rewards, margin=margin)
        diff = diff - margin
    return -F.logsigmoid(diff)


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Fraction of pairs whose chosen response gets the strictly higher reward."""
    _check_same(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    return (chosen_rewards > rejected_rewards).float().mean().item()


def last_token_rewards(hidden: torch.Tensor, lengths: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """(batch,) rewards: ``head`` (d -> 1) applied to each row's last real position ``lengths - 1``.

    ``hidden`` is (batch, seq, d), right-padded; ``lengths`` (batch,) the real lengths. This is how
    ``transformers``' ``*ForSequenceClassification`` models pool a decoder's output.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (batch, seq, d), got shape {tuple(hidden.shape)}")
    lengths = torch.as_tensor(lengths, device=hidden.device)
    if lengths.shape != hidden.shape[:1]:
        raise ValueError(f"need one length per row: hidden has {hidden.shape[0]} rows, "
                         f"lengths has shape {tuple(lengths.shape)}")
    if (lengths < 1).any() or (lengths > hidden.shape[1]).any():
        raise ValueError(f"lengths must be in 1..{hidden.shape[1]}, got {lengths.tolist()}")
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths.long() - 1]
    return head(last).squeeze(-1)


@torch.no_grad()
def prefix_trunk_cache(model: nn.Module, prefix_ids: Sequence[int], continuations: Sequence[Sequence[int]],
                       n_top: int, batch_size: int = 16) -> list[torch.Tensor]:
    """Hidden states entering layer $L - k$ ($k$ = ``n_top``) of ``prefix_ids + c`` for each ``c``.

    Every sequence starts with the same prompt, so the prompt runs through the frozen layers once and
    its key/value cache is reused for each batch of continuations (right-padded;
    :func:`utils.hf_llama.prefix_trunk_hidden`). Returns one
    (len(prefix) + len(c), d) tensor per continuation, equal to :func:`utils.finetune.trunk_cache` on
    the full sequences (up to float rounding) at a fraction of the cost when the prompt is long.
    """
    prefix, parts = prefix_trunk_hidden(model, prefix_ids, continuations, n_top, batch_size)
    return [torch.cat([prefix, h]) for h in parts]


# --- log-probabilities of responses ----------------------------------------------------------------

def response_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(targets, keep, lengths)`` of (batch, seq) ``labels``: the tokens each position predicts
    (``labels[:, 1:]``), which of them are response tokens (not $-100$), and how many per row; a row
    without a response token is an error (its log-probability would be an empty sum)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    lengths = keep.sum(dim=1)
    if (lengths == 0).any():
        raise ValueError("every row needs at least one response token (a label != -100 after the shift)")
    return targets, keep, lengths


def response_logprobs(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps, lengths)``: per row, $\\sum_t \\log p(y_t \\mid y_{<t})$ over the response tokens and
    their count.

    ``labels`` mark the response tokens (every other position is $-100$, as
    :func:`utils.sft.build_example` makes them); position $t$'s logits predict token $t+1$.
    """
    if input_ids.dim() != 2 or labels.shape != input_ids.shape:
        raise ValueError(f"need input_ids and labels of one shape (batch, seq), got "
                         f"{tuple(input_ids.shape)} and {tuple(labels.shape)}")
    targets, keep, lengths = response_targets(labels)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * keep).sum(dim=1), lengths


# --- preference-optimisation losses -----------------------------------------------------------------

def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """DPO: $-\\log\\sigma\\big(\\beta[(\\log\\pi_c - \\log\\pi^{ref}_c) - (\\log\\pi_r - \\log\\pi^{ref}_r)]\\big)$."""
    _check_beta(beta)
    _check_same(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * logits)


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """IPO: $(h - \\frac{1}{2\\beta})^2$ with $h$ the difference of the two log-ratios.

    With ``chosen_lengths`` and ``rejected_lengths`` each log-ratio is divided by its response length
    first (per-token log-ratios, as TRL does); pass both or neither.
    """
    _check_beta(beta)
    _check_same(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is not None:
        _check_same(policy_chosen=policy_chosen, chosen_lengths=chosen_lengths,
                    rejected_lengths=rejected_lengths)
        _check_lengths(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        chosen, rejected = chosen / chosen_lengths, rejected / rejected_lengths
    return (chosen - rejected - 1 / (2 * beta)) ** 2


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl: torch.Tensor | float = 0.0, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO on unpaired examples: $\\lambda_D(1 - \\sigma(\\beta(\\rho - z)))$ for desirable ones and
    $\\lambda_U(1 - \\sigma(\\beta(z - \\rho)))$ for undesirable ones, $\\rho = \\log\\pi - \\log\\pi^{ref}$.

    ``kl`` is the reference point $z$, an estimate of $\\mathrm{KL}(\\pi\\,\\|\\,\\pi^{ref})$ that is
    not differentiated through and is clamped at 0. The losses come back in input order.
    """
    _check_beta(beta)
    _check_beta(desirable_weight, "desirable_weight")
    _check_beta(undesirable_weight, "undesirable_weight")
    _check_same(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    if desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be a bool tensor, got {desirable.dtype}")
    z = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    if z.numel() != 1:
        raise ValueError(f"kl must be a scalar, got shape {tuple(z.shape)}")
    rho = policy_logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (rho - z)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z - rho)))
    return torch.where(desirable, good, bad)


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor,
              rejected_lengths: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """ORPO: $-\\bar\\ell_c - \\beta\\log\\sigma\\big(\\log\\frac{\\mathrm{odds}(c)}{\\mathrm{odds}(r)}\\big)$.

    $\\bar\\ell = \\log p / |y|$ is the mean per-token log-probability, $\\mathrm{odds}(y) =
    e^{\\bar\\ell}/(1 - e^{\\bar\\ell})$; the first term is the SFT loss on the chosen response.
    """
    _check_beta(beta)
    _check_same(chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    _check_lengths(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    c, r = chosen_logps.float() / chosen_lengths, rejected_logps.float() / rejected_lengths
    if (c >= 0).any() or (r >= 0).any():
        raise ValueError("mean log-probabilities must be < 0 (a probability below 1) for the odds to exist")
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    return -c - beta * F.logsigmoid(log_odds)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """$\\log(1 - e^x)$ for $x < 0$, accurate on both sides of $-\\log 2$."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor,
               rejected_lengths: torch.Tensor, beta: float = 2.0, gamma: float = 0.5) -> torch.Tensor:
    """SimPO: $-\\log\\sigma\\big(\\beta(\\bar\\ell_c - \\bar\\ell_r) - \\gamma\\big)$ with mean per-token
    log-probabilities $\\bar\\ell$ and target margin $\\gamma \\ge 0$; no reference model."""
    _check_beta(beta)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    _check_same(chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    _check_lengths(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    return -F.logsigmoid(beta * (chosen_logps / chosen_lengths - rejected_logps / rejected_lengths) - gamma)
