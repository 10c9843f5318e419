"""Speculative decoding for our Llama (Part 4, "Speculative decoding and prefix caching").

A cheap *drafter* proposes ``k`` tokens; the *target* model scores all of them in one forward pass and
keeps the longest prefix it agrees with, plus one token of its own. The output is the target's:

- greedy (``temperature == 0``): a draft token is kept only if it is the target's argmax, so the text
  is token for token what the target alone would write;
- sampling: draft token $d \\sim q$ is kept with probability $\\min(1, p(d)/q(d))$, otherwise a token is
  drawn from $\\operatorname{norm}(\\max(0, p - q))$ (:func:`speculative_sample`); every emitted token is
  then distributed exactly as $p$ (Leviathan et al. 2023; Chen et al. 2023).

Drafters: :class:`ModelDrafter` (a smaller model with the same vocabulary and its own
:class:`~utils.kvcache.KVCache`) and :class:`PromptLookupDrafter` (copy the tokens that followed the
last n-gram's earlier occurrence in the context; no model at all). The target's KV cache is rolled back
with :meth:`KVCache.truncate` after a rejection. :func:`speculative_generate` returns the tokens and
:class:`SpecStats` (drafted / accepted counts).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.checks import check_positive_int
from utils.kvcache import KVCache
from utils.llama import Llama

__all__ = [
    "ModelDrafter",
    "PromptLookupDrafter",
    "SpecStats",
    "expected_tokens_per_step",
    "speculative_generate",
    "speculative_sample",
]


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / temperature) in float32 (temperature > 0)."""
    return torch.softmax(logits.float() / temperature, dim=-1)


def expected_tokens_per_step(alpha: float, k: int) -> float:
    """$(1 - \\alpha^{k+1}) / (1 - \\alpha)$: tokens one target pass emits when each of ``k`` drafts is
    accepted independently with probability ``alpha`` (the accepted prefix plus the target's own token)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    check_positive_int("k", k)
    if alpha == 1:
        return float(k + 1)
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def speculative_sample(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The acceptance rule, for a batch of independent positions.

    ``p`` and ``q`` are (N, V) target and drafter probabilities, ``draft`` (N,) tokens drawn from ``q``.
    Returns ``(accepted, token)``, both (N,): ``accepted[i]`` is True with probability
    $\\min(1, p_i(d_i)/q_i(d_i))$ and then ``token[i] = draft[i]``; otherwise ``token[i]`` is drawn from
    $\\operatorname{norm}(\\max(0, p_i - q_i))$.
    """
    if p.dim() != 2 or p.shape != q.shape or draft.shape != p.shape[:1]:
        raise ValueError(f"need p, q of shape (N, V) and draft of shape (N,), got "
                         f"{tuple(p.shape)}, {tuple(q.shape)}, {tuple(draft.shape)}")
    rows = torch.arange(p.shape[0], device=p.device)
    p_d, q_d = p[rows, draft], q[rows, draft]
    u = torch.rand(p.shape[0], generator=generator, device=p.device)
    accepted = u * q_d < p_d  # u < p/q without dividing by a zero q
    residual = (p - q).clamp(min=0)
    # If p == q there is no residual mass, but then every draft is accepted: any valid row will do
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    resampled = torch.multinomial(residual, 1, generator=generator).squeeze(1)
    return accepted, torch.where(accepted, draft, resampled)


class PromptLookupDrafter:
    """Draft by copying from the context (prompt lookup decoding, Saxena 2023).

    Take the last ``n`` tokens (``n = max_ngram`` down to 1), find their first earlier occurrence in the
    sequence and propose the up-to-``k`` tokens that followed it. Nothing found: no draft (the target then
    decodes one token as usual). Deterministic, so in sampling mode $q$ is a point mass on the draft.
    The search is that of transformers' ``prompt_lookup_num_tokens`` (first match, longest n-gram first).
    """

    vocab_size = None  # works with any tokenizer

    def __init__(self, max_ngram: int = 2) -> None:
        check_positive_int("max_ngram", max_ngram)
        self.max_ngram = max_ngram

    def start(self, idx: torch.Tensor, max_len: int) -> None:
        """Nothing to prepare: the drafter has no state."""

    def confirm(self, length: int) -> None:
        """Nothing to roll back."""

    def propose(self, seq: torch.Tensor, k: int, temperature: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Up to ``k`` draft tokens (m,) for ``seq`` (1, n), and ``None`` (no drafter distribution)."""
        tokens = seq[0]
        n = tokens.shape[0]
        for size in range(min(self.max_ngram, n - 1), 0, -1):
            windows = tokens.unfold(0, size, 1)  # (n - size + 1, size): every n-gram, in order
            hits = (windows == tokens[-size:]).all(dim=1).nonzero().flatten()
            for start in hits.tolist():
                begin, end = start + size, min(start + size + k, n)
                if begin < end:  # the last n-gram matches itself, with nothing after it: skip
                    return tokens[begin:end], None
        return tokens[:0], None


class ModelDrafter:
    """Draft with a smaller :class:`~utils.llama.Llama` that shares the target's tokenizer.

    It keeps its own KV cache over the confirmed tokens; :meth:`propose` first feeds whatever it has not
    seen yet (the previous step's last accepted draft and the target's token), then one token at a time.
    """

    def __init__(self, model: Llama) -> None:
        if not isinstance(model, Llama):
            raise TypeError(f"ModelDrafter needs a utils.llama.Llama, got {type(model).__name__}")
        self.model = model
        self.vocab_size = model.cfg.vocab_size
        self.cache: KVCache | None = None

    def start(self, idx: torch.Tensor, max_len: int) -> None:
        """A fresh cache for one generation of at most ``max_len`` tokens."""
        self.cache = KVCache.for_model(self.model, 1, max_len)

    def confirm(self, length: int) -> None:
        """Only the first ``length`` tokens of the sequence stand: forget cached positions after them."""
        self.cache.truncate(min(length, self.cache.length))

    @torch.no_grad()
    def propose(self, seq: torch.Tensor, k: int, temperature: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``k`` draft tokens (k,) continuing ``seq`` (1, n); with sampling also their distributions
        $q$ (k, V) at ``temperature``, else ``None``."""
        logits = self.model(seq[:, self.cache.length:], cache=self.cache, last_only=True)[0, -1]
        drafts, dists = [], []
        for i in range(k):
            if temperature == 0:
                token = logits.argmax().view(1)
            else:
                q = _probs(logits, temperature)
                token = torch.multinomial(q, 1, generator=generator)
                dists.append(q)
            drafts.append(token)
            if i < k - 1:
                logits = self.model(token.view(1, 1), cache=self.cache, last_only=True)[0, -1]
        return torch.cat(drafts), (torch.stack(dists) if dists else None)


@dataclass
class SpecStats:
    """What one speculative generation did."""

    target_passes: int = 0  # target forward passes after the prefill (each verifies one draft)
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the target kept
    generated: int = 0  # new tokens emitted

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """New tokens per target forward pass (1 for plain decoding)."""
        return self.generated / self.target_passes if self.target_passes else 0.0


@torch.no_grad()
def speculative_generate(target: Llama, drafter: ModelDrafter | PromptLookupDrafter, idx: torch.Tensor,
                         max_new_tokens: int, draft_len: int, temperature: float = 0.0,
                         generator: torch.Generator | None = None,
                         eos_token_id: int | None = None) -> tuple[torch.Tensor, SpecStats]:
    """Prompt ids (1, n) -> (prompt + up to ``max_new_tokens`` new ids, :class:`SpecStats`).

    Each step: the drafter proposes up to ``draft_len`` tokens; the target scores the last token and the
    drafts in one pass with its KV cache; the accepted drafts and one target token are appended and the
    cache is truncated to them. Greedy (``temperature == 0``) returns exactly
    ``utils.kvcache.generate(target, idx, max_new_tokens)``; sampling returns a sample of the target's
    distribution at ``temperature``. Stops after ``eos_token_id`` as ``generate`` does.
    """
    check_positive_int("max_new_tokens", max_new_tokens)
    check_positive_int("draft_len", draft_len)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if idx.dim() != 2 or idx.shape[0] != 1 or idx.shape[1] == 0:
        raise ValueError(f"idx must have shape (1, n) with n >= 1 (one prompt), got {tuple(idx.shape)}")
    if drafter.vocab_size is not None and drafter.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"the drafter's vocabulary ({drafter.vocab_size} tokens) differs from the "
                         f"target's ({target.cfg.vocab_size}): they must share one tokenizer")
    n_prompt = idx.shape[1]
    max_len = n_prompt + max_new_tokens + draft_len
    cache = KVCache.for_model(target, 1, max_len)  # holds every token but the last one
    drafter.start(idx, max_len)
    if n_prompt > 1:
        target(idx[:, :-1], cache=cache, last_only=True)  # prefill
    seq, stats = idx, SpecStats()
    while stats.generated < max_new_tokens:
        k = min(draft_len, max_new_tokens - stats.generated - 1)  # room for the drafts + 1 token
        drafts, q = drafter.propose(seq, k, temperature, generator) if k > 0 else (seq[0, :0], None)
        m = drafts.shape[0]
        logits = target(torch.cat([seq[:, -1:], drafts[None]], dim=1), cache=cache)[0]  # (m + 1, V)
        stats.target_passes += 1
        stats.drafted += m
        if temperature == 0:
            choice = logits.argmax(dim=-1)  # the target's token at each of the m + 1 positions
            agree = (choice[:m] == drafts).long()
            n_ok = int(agree.cumprod(0).sum())  # length of the agreeing prefix
            new = torch.cat([drafts[:n_ok], choice[n_ok:n_ok + 1]])
        else:
            p = _probs(logits, temperature)
            n_ok, new = m, None
            if m:
                q_rows = q if q is not None else torch.nn.functional.one_hot(drafts, p.shape[1]).float()
                accepted, token = speculative_sample(p[:m], q_rows, drafts, generator)
                rejected = (~accepted).nonzero()
                if len(rejected):
                    n_ok = int(rejected[0])
                    new = torch.cat([drafts[:n_ok], token[n_ok:n_ok + 1]])
            if new is None:  # every draft kept: one more token from the target's last distribution
                new = torch.cat([drafts, torch.multinomial(p[m], 1, generator=generator)])
        stats.accepted += n_ok
        if eos_token_id is not None and (new == eos_token_id).any():
            new = new[: int((new == eos_token_id).nonzero()[0]) + 1]
        seq = torch.cat([seq, new[None]], dim=1)
        stats.generated += new.shape[0]
        cache.truncate(seq.shape[1] - 1)  # forget the rejected drafts
        drafter.confirm(seq.shape[1] - 1)
        if eos_token_id is not None and int(new[-1]) == eos_token_id:
            break
    return seq, stats
