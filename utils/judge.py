"""A language model as a pairwise judge, and preference labels from AI feedback (Part 3).

A pairwise judge reads a question and two answers, numbered 1 and 2, and is asked which is better.
Instead of sampling its reply we read the logits of the two verdict tokens ``"1"`` and ``"2"`` at the
position where the verdict is due, and turn them into $P(\\text{"1"}) = \\sigma(z_1 - z_2)$.

- :data:`JUDGE_STYLES`, :func:`judge_messages`, :func:`judge_ids`: the chat prompt, in a "direct"
  style (verdict first) or a "reason_first" style (a short comparison, then ``Answer: <digit>``).
- :func:`verdict_token_ids`, :func:`judge_probs`: $P(\\text{"1"})$ for many prompts, batched, no sampling.
- :func:`generate_reasons`: a few greedy tokens of reasoning for the reason-first style.
- :func:`swap_stats`, :func:`debiased_prob`: position bias measured by swapping the two answers, and
  the judge that averages both orders.
- :func:`relabel_pairs`: preference pairs whose chosen/rejected come from a judge instead of humans.
- :func:`cached_sequence_logprobs`: per-sequence response log-probabilities from a cached frozen
  trunk and the top layers (:mod:`utils.finetune`), for DPO on a CPU.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from utils.chat import greedy_continuations, left_pad, prompt_ids
from utils.checks import check_positive_int
from utils.dpo import cached_response_logprobs
from utils.finetune import pad_cached

__all__ = [
    "ANSWER_CUE",
    "JUDGE_STYLES",
    "cached_sequence_logprobs",
    "debiased_prob",
    "generate_reasons",
    "judge_ids",
    "judge_messages",
    "judge_probs",
    "relabel_pairs",
    "swap_stats",
    "verdict_token_ids",
]

#: User-message templates; ``{question}``, ``{answer_1}`` and ``{answer_2}`` are filled in.
JUDGE_STYLES: dict[str, str] = {
    "direct": ("{question}\n\nReview 1: {answer_1}\n\nReview 2: {answer_2}\n\n"
               "Reply with one digit only: 1 or 2."),
    "reason_first": ("{question}\n\nReview 1: {answer_1}\n\nReview 2: {answer_2}\n\n"
                     "First compare the two reviews in one short sentence, then give your verdict "
                     "on a new line as 'Answer: 1' or 'Answer: 2'."),
    "rubric": ("{question}\n\nRubric: judge only the feeling the reviewer expresses about the film. "
               "Ignore length, detail and writing quality; a short review can be the more "
               "positive one.\n\nReview 1: {answer_1}\n\nReview 2: {answer_2}\n\n"
               "Reply with one digit only: 1 or 2."),
}

#: What the assistant's turn holds before the verdict token in the reason-first style.
ANSWER_CUE = "\nAnswer: "


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r:.60}")


def judge_messages(question: str, answer_1: str, answer_2: str, style: str = "direct") -> list[dict]:
    """The chat messages (one user turn) asking which of two answers is better."""
    if style not in JUDGE_STYLES:
        raise ValueError(f"unknown judge style {style!r}; known styles: {sorted(JUDGE_STYLES)}")
    for name, value in (("question", question), ("answer_1", answer_1), ("answer_2", answer_2)):
        _check_text(name, value)
    if answer_1 == answer_2:
        raise ValueError("answer_1 and answer_2 are identical; a judge needs two different answers")
    content = JUDGE_STYLES[style].format(question=question, answer_1=answer_1, answer_2=answer_2)
    return [{"role": "user", "content": content}]


def judge_ids(tokenizer, question: str, answer_1: str, answer_2: str, style: str = "direct",
              assistant_prefix: str = "", system: str | None = None) -> list[int]:
    """Token ids of the judge prompt up to the position whose next token is the verdict.

    The chat template renders the user turn and the assistant header; ``assistant_prefix`` (for
    example a reason followed by :data:`ANSWER_CUE`) is appended as the start of the assistant's reply.
    """
    if not isinstance(assistant_prefix, str):
        raise TypeError(f"assistant_prefix must be a str, got {type(assistant_prefix).__name__}")
    ids = prompt_ids(tokenizer, judge_messages(question, answer_1, answer_2, style), system)
    if assistant_prefix:
        ids += tokenizer.encode(assistant_prefix, add_special_tokens=False)
    return ids


def verdict_token_ids(tokenizer, labels: Sequence[str] = ("1", "2")) -> list[int]:
    """The token id of each verdict label; every label must be exactly one token, all different."""
    labels = list(labels)
    if len(labels) != 2:
        raise ValueError(f"a pairwise judge needs exactly two labels, got {labels!r}")
    ids = []
    for label in labels:
        encoded = tokenizer.encode(label, add_special_tokens=False) if isinstance(label, str) else []
        if len(encoded) != 1:
            raise ValueError(f"label {label!r} is not a single token (got ids {encoded}); "
                             "choose labels the tokenizer keeps whole, such as '1' and '2'")
        ids.append(encoded[0])
    if ids[0] == ids[1]:
        raise ValueError(f"labels {labels!r} map to the same token {ids[0]}")
    return ids


@torch.no_grad()
def judge_probs(model: nn.Module, prompts: Sequence[Sequence[int]], label_ids: Sequence[int],
                pad_token_id: int, batch_size: int = 16) -> torch.Tensor:
    """(n,) $P(\\text{label 0}) = \\sigma(z_0 - z_1)$: softmax over the two verdict logits only.

    ``prompts`` are token-id lists (such as :func:`judge_ids` returns); they are left-padded so the
    verdict position is the last one, and only its logits are computed.
    """
    prompts = [list(p) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("judge_probs needs at least one prompt, each non-empty")
    if len(label_ids) != 2:
        raise ValueError(f"need exactly two label ids, got {list(label_ids)!r}")
    check_positive_int("batch_size", batch_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        input_ids, mask = left_pad(prompts[start:start + batch_size], pad_token_id)
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                       logits_to_keep=1).logits
        z = logits[:, -1, list(label_ids)].float()
        out.append(torch.softmax(z, dim=-1)[:, 0])
    model.train(was_training)
    return torch.cat(out).cpu()


@torch.no_grad()
def generate_reasons(model: nn.Module, tokenizer, prompts: Sequence[Sequence[int]],
                     max_new_tokens: int = 16) -> list[str]:
    """Greedy continuations (decoded, up to ``max_new_tokens`` tokens, stopping at end of turn) of
    each prompt, generated as one left-padded batch."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_reasons needs at least one prompt, each non-empty")
    replies = greedy_continuations(model, tokenizer, prompts, max_new_tokens, batch_size=len(prompts))
    return [reply.split("Answer")[0].strip() for reply in replies]


def _check_probs(**probs: torch.Tensor) -> None:
    shapes = set()
    for name, p in probs.items():
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D tensor of probabilities")
        if ((p < 0) | (p > 1)).any():
            raise ValueError(f"{name} must hold probabilities in [0, 1]")
        shapes.add(p.numel())
    if len(shapes) > 1:
        raise ValueError(f"need one probability per pair in each tensor, got lengths {sorted(shapes)}")


def debiased_prob(p_ab: torch.Tensor, p_ba: torch.Tensor) -> torch.Tensor:
    """$P(A \\succ B)$ averaged over both orders: $\\tfrac12[P(\\text{"1"}\\mid A,B) + 1 -
    P(\\text{"1"}\\mid B,A)]$. A judge that only ever says "1" gets exactly 0.5."""
    _check_probs(p_ab=p_ab, p_ba=p_ba)
    return (p_ab + 1 - p_ba) / 2


def swap_stats(p_ab: torch.Tensor, p_ba: torch.Tensor) -> dict[str, float]:
    """Position bias of a judge from $P(\\text{"1"})$ with $A$ shown first (``p_ab``) and second (``p_ba``).

    Returns ``mean_p_first`` (the average $P(\\text{"1"})$ over both orders; 0.5 for an unbiased
    judge), ``flip_rate`` (fraction of pairs whose winner changes when the order is swapped, i.e. the
    same *position* wins both times) and ``first_wins`` (fraction of all verdicts that pick slot 1).
    """
    _check_probs(p_ab=p_ab, p_ba=p_ba)
    a_wins_ab, a_wins_ba = p_ab > 0.5, p_ba < 0.5
    both = torch.cat([p_ab, p_ba])
    return {"mean_p_first": both.mean().item(),
            "flip_rate": (a_wins_ab != a_wins_ba).float().mean().item(),
            "first_wins": (both > 0.5).float().mean().item()}


def relabel_pairs(pairs: Sequence[dict], prob_chosen: torch.Tensor) -> list[dict]:
    """Copies of ``pairs`` with chosen/rejected (and their scores and ids) swapped wherever the judge's
    probability that ``chosen`` is better is below 0.5; each copy records it under ``"judge_p"``."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("relabel_pairs got no pairs")
    _check_probs(prob_chosen=prob_chosen)
    if prob_chosen.numel() != len(pairs):
        raise ValueError(f"need one probability per pair: {len(pairs)} pairs, {prob_chosen.numel()} probs")
    out = []
    for pair, p in zip(pairs, prob_chosen.tolist()):
        new = dict(pair, judge_p=p)
        if p < 0.5:
            for a, b in (("chosen", "rejected"), ("chosen_score", "rejected_score"),
                         ("chosen_id", "rejected_id")):
                if a in pair and b in pair:
                    new[a], new[b] = pair[b], pair[a]
        out.append(new)
    return out


def cached_sequence_logprobs(model: nn.Module, items: Sequence[tuple[torch.Tensor, torch.Tensor]],
                             n_top: int) -> torch.Tensor:
    """(n,) $\\sum_t \\log p(y_t \\mid y_{<t})$ over each sequence's response tokens, computed by the top
    ``n_top`` layers from cached trunk states (:func:`utils.finetune.trunk_cache` items).

    Equal to :func:`utils.preference.response_logprobs` on the whole model; differentiable with respect
    to the top layers' parameters. (:func:`utils.dpo.cached_response_logprobs` on :func:`pad_cached` items.)
    """
    if not items:
        raise ValueError("cached_sequence_logprobs got no items")
    return cached_response_logprobs(model, *pad_cached(items), n_top)[0]
