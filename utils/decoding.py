"""Decoding strategies for causal language models, written from scratch (Part 1, "Decoding").

Logit processors (each maps a ``(batch, vocab)`` tensor of logits to one of the same shape):

- :func:`apply_temperature`  divide by a temperature ``T > 0``
- :func:`top_k_filter`       keep the ``k`` largest logits, set the rest to ``-inf``
- :func:`top_p_filter`       keep the smallest set of tokens whose probability reaches ``p`` (nucleus)

Decoding loops (all reuse the model's KV cache, so each step feeds one new token per sequence):

- :func:`greedy_decode`   argmax at every step
- :func:`sample_decode`   sample from the processed distribution
- :func:`beam_search`     keep the ``num_beams`` best partial sequences (transformers' semantics)
- :func:`best_of_n`       sample ``n`` continuations, return the one with the highest mean log-probability

The loops follow ``model.generate`` step for step (same operations, same random draws), so with the
same settings and seed they return the same tokens; the chapter checks that.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


__all__ = [
    "NEG_INF",
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "process_logits",
    "greedy_decode",
    "sample_decode",
    "Hypothesis",
    "beam_search",
    "sequence_logprobs",
    "BestOfN",
    "best_of_n",
]


NEG_INF = float("-inf")

from utils.checks import check_positive_int


# ----------------------------------------------------------------------------- validation
def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError("logits must be a floating-point tensor of shape (..., vocab)")


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(
            f"temperature must be a number > 0, got {temperature!r} "
            "(for the T -> 0 limit use greedy_decode)"
        )


def _check_top_k(top_k: int) -> None:
    check_positive_int("top_k", top_k, hint="use None to disable top-k")


def _check_top_p(top_p: float) -> None:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r} (1 keeps every token)")


def _check_input_ids(input_ids: torch.Tensor) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError("input_ids must be a (batch, prompt_length) tensor with prompt_length >= 1")


# ----------------------------------------------------------------------------- processors
def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""Scale logits by ``1 / temperature``: $p_i \propto \exp(z_i / T)$.

    ``T < 1`` sharpens the distribution, ``T > 1`` flattens it; ``T = 1`` leaves it unchanged.
    """
    _check_logits(logits)
    _check_temperature(temperature)
    return logits / temperature


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits in each row (ties with the k-th are kept), the rest -> ``-inf``."""
    _check_logits(logits)
    _check_top_k(top_k)
    k = min(top_k, logits.shape[-1])
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, NEG_INF)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    r"""Nucleus filter: keep the smallest set of most probable tokens whose total probability is >= ``top_p``.

    Sorted from least to most probable, a token is dropped when the probability mass up to and
    including it is still <= 1 - p (so everything above it already holds >= p). The most probable
    token is always kept.
    """
    _check_logits(logits)
    _check_top_p(top_p)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    mass_from_bottom = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = mass_from_bottom <= 1 - top_p
    drop_sorted[..., -1] = False  # the most probable token always survives
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, NEG_INF)


def process_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Temperature, then top-k, then top-p: the order ``model.generate`` applies them in."""
    _check_temperature(temperature)
    if top_k is not None:
        _check_top_k(top_k)
    _check_top_p(top_p)
    if temperature != 1.0:
        logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return logits


# ----------------------------------------------------------------------------- model steps
@torch.no_grad()
def _step(model, input_ids: torch.Tensor, cache):
    """One forward pass; returns the last position's logits (float32) and the updated cache."""
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    return out.logits[:, -1, :].float(), out.past_key_values


def _decode(model, input_ids, max_new_tokens, choose, eos_token_id, pad_token_id) -> torch.Tensor:
    """Shared loop of greedy and sampling decoding: prefill once, then one token per step."""
    _check_input_ids(input_ids)
    check_positive_int("max_new_tokens", max_new_tokens)
    if eos_token_id is not None and pad_token_id is None:
        pad_token_id = eos_token_id
    logits, cache = _step(model, input_ids, None)  # prefill: the whole prompt at once
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    for step in range(max_new_tokens):
        next_tokens = choose(logits)
        if eos_token_id is not None:  # finished rows only receive padding
            next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
            unfinished = unfinished & (next_tokens != eos_token_id).long()
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if step == max_new_tokens - 1 or not unfinished.any():
            break
        logits, cache = _step(model, next_tokens[:, None], cache)  # one new token per row
    return input_ids


def greedy_decode(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Append the most probable token ``max_new_tokens`` times (or until every row emitted EOS).

    Returns ``(batch, prompt + generated)`` token ids; rows that finished early are padded.
    """
    return _decode(model, input_ids, max_new_tokens, lambda z: z.argmax(dim=-1), eos_token_id, pad_token_id)


def sample_decode(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample each token from ``softmax(process_logits(z))``; one ``torch.multinomial`` draw per step.

    With ``generator=None`` the global torch generator is used, exactly as ``model.generate`` does.
    """
    process_logits(torch.zeros(1, 2), temperature, top_k, top_p)  # validate before any model call

    def choose(logits: torch.Tensor) -> torch.Tensor:
        probs = process_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)

    return _decode(model, input_ids, max_new_tokens, choose, eos_token_id, pad_token_id)


# ----------------------------------------------------------------------------- beam search
@dataclass
class Hypothesis:
    """A finished beam: generated token ids (prompt excluded) and its length-normalised score."""

    tokens: torch.Tensor
    score: float


@torch.no_grad()
def beam_search(
    model,
    input_ids: torch.Tensor,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_token_id: int | None = None,
) -> list[Hypothesis]:
    r"""Beam search for one prompt, with the semantics of transformers' ``generate(num_beams=...)``.

    - Every step scores all ``num_beams x vocab`` extensions by their summed log-probability and keeps
      the best ``2 * num_beams`` candidates. Among the first ``num_beams`` of them, those ending in EOS
      (or reaching ``max_new_tokens``) become finished hypotheses with score
      $\sum_t \log p_t / L^{\alpha}$ ($L$ generated tokens, EOS included; $\alpha$ = ``length_penalty``);
      the best ``num_beams`` candidates that did not end keep running.
    - At most ``num_beams`` finished hypotheses are kept (the best ones).
    - Stop when ``early_stopping is True`` and ``num_beams`` hypotheses are finished; otherwise stop when
      the best running beam, normalised by its current length (``early_stopping=False``) or by the
      longest possible length (``"never"`` with ``length_penalty > 0``), can no longer beat the worst
      finished hypothesis.

    Returns the finished hypotheses, best first.
    """
    _check_input_ids(input_ids)
    if input_ids.shape[0] != 1:
        raise ValueError(f"beam_search decodes one prompt at a time; got a batch of {input_ids.shape[0]}")
    check_positive_int("num_beams", num_beams)
    check_positive_int("max_new_tokens", max_new_tokens)
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    keep = 2 * num_beams  # enough candidates that num_beams survive even if num_beams of them end
    running = input_ids.expand(num_beams, -1)  # all beams start as the prompt...
    logits, cache = _step(model, running, None)
    running_scores = torch.full((num_beams,), -1e9, device=input_ids.device)
    running_scores[0] = 0.0  # ...but only the first may expand at step 0 (no duplicate beams)
    finished: list[Hypothesis] = []
    improvable = True
    prompt_len = input_ids.shape[1]
    for step in range(max_new_tokens):
        vocab = logits.shape[-1]
        scores = F.log_softmax(logits, dim=-1) + running_scores[:, None]  # (beams, vocab)
        top_scores, flat = torch.topk(scores.reshape(-1), keep)
        source_beam, token = flat // vocab, flat % vocab
        candidates = torch.cat([running[source_beam], token[:, None]], dim=-1)
        ended = (token == eos_token_id) if eos_token_id is not None else torch.zeros_like(token, dtype=torch.bool)
        if step == max_new_tokens - 1:
            ended = torch.ones_like(ended)  # the length limit ends every candidate
        # finished hypotheses: only the top num_beams candidates may enter
        full = len(finished) == num_beams and early_stopping is True
        if improvable and not full:
            length = (step + 1) ** length_penalty
            for i in range(num_beams):
                if ended[i]:
                    finished.append(Hypothesis(candidates[i, prompt_len:], (top_scores[i] / length).item()))
            finished = sorted(finished, key=lambda h: -h.score)[:num_beams]  # stable: older first on ties
        if ended.all() or step == max_new_tokens - 1:
            break
        # running beams: the best num_beams candidates that did not end
        alive_scores = top_scores + ended.float() * -1e9
        chosen = torch.topk(alive_scores, num_beams).indices
        running, running_scores = candidates[chosen], alive_scores[chosen]
        cache.reorder_cache(source_beam[chosen])  # each beam's cache follows its parent
        # can a running beam still beat the worst finished hypothesis?
        if early_stopping == "never" and length_penalty > 0.0:
            best_length = max_new_tokens
        else:
            best_length = step + 1
        best_possible = (running_scores[0] / best_length**length_penalty).item()  # float32 as in transformers
        if len(finished) == num_beams and best_possible <= min(h.score for h in finished):
            improvable = False
        if not improvable or (early_stopping is True and len(finished) == num_beams):
            break
        logits, cache = _step(model, running[:, -1:], cache)
    return finished


# ----------------------------------------------------------------------------- best-of-N
@torch.no_grad()
def sequence_logprobs(
    model, sequences: torch.Tensor, prompt_len: int, eos_token_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the generated part of ``sequences`` under the model (T = 1).

    Returns ``(logprobs, mask)``, both ``(batch, generated)``; ``mask`` is False after a row's first EOS,
    whose own log-probability is counted.
    """
    _check_input_ids(sequences)
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or not 1 <= prompt_len < sequences.shape[1]:
        raise ValueError(f"prompt_len must be an int in [1, {sequences.shape[1] - 1}], got {prompt_len!r}")
    logits = model(input_ids=sequences).logits[:, prompt_len - 1 : -1].float()
    targets = sequences[:, prompt_len:]
    logprobs = F.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    mask = torch.ones_like(targets, dtype=torch.bool)
    if eos_token_id is not None:
        is_eos = (targets == eos_token_id).long()
        mask = (is_eos.cumsum(dim=-1) - is_eos) == 0  # up to and including the first EOS
    return logprobs, mask


@dataclass
class BestOfN:
    """The result of :func:`best_of_n`: every sample, its score, and the index of the best."""

    samples: torch.Tensor  # (n, prompt + generated)
    scores: torch.Tensor  # (n,) mean log-probability of the generated tokens
    best_index: int

    @property
    def best(self) -> torch.Tensor:
        return self.samples[self.best_index]


def best_of_n(
    model,
    input_ids: torch.Tensor,
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> BestOfN:
    r"""Sample ``n`` continuations of one prompt and keep the one with the highest mean log-probability
    $\frac{1}{L}\sum_{t=1}^{L} \log p(y_t \mid y_{<t}, x)$ under the unmodified model."""
    _check_input_ids(input_ids)
    if input_ids.shape[0] != 1:
        raise ValueError(f"best_of_n takes one prompt; got a batch of {input_ids.shape[0]}")
    check_positive_int("n", n)
    samples = sample_decode(
        model, input_ids.expand(n, -1), max_new_tokens, temperature, top_k, top_p,
        eos_token_id=eos_token_id, generator=generator,
    )
    logprobs, mask = sequence_logprobs(model, samples, input_ids.shape[1], eos_token_id)
    scores = (logprobs * mask).sum(-1) / mask.sum(-1)
    return BestOfN(samples, scores, int(scores.argmax()))
