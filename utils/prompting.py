"""Prompting, measured (Part 6, "Prompting, measured"): few-shot prompts, label scores read from
next-token log-probabilities with a cached prompt prefix, contextual calibration, sampled reasoning
paths and self-consistency.

- :data:`FORMATS`, :func:`few_shot_prompt`: a few-shot prompt as a shared *prefix* (instruction and
  exemplars) and one *suffix* per query, in a plain-text or a chat format.
- :func:`split_ids`: the prefix and suffixes as token ids, checked to tokenize exactly as the joined text.
- :func:`answer_token_ids`: the one token of each answer word (distinct, one token each).
- :func:`next_token_logprobs`: log-probabilities of chosen next tokens after ``prefix + suffix`` for
  many suffixes, the prefix run once and its key/value cache shared (no generation).
- :func:`label_probs`, :func:`calibrate`: the label distribution renormalised over the labels, and
  contextual calibration (Zhao et al., 2021) with ``W = diag(p_cf)^-1``.
- :func:`sample_paths`: greedy or sampled continuations of ``prefix + suffix`` for many suffixes of one
  length, ``n`` per suffix, from one shared prefix cache.
- :func:`last_number`, :func:`majority_vote`, :func:`self_consistency`: reading an answer, voting over
  sampled paths, and accuracy against the number of paths.
- :func:`addition_items`: deterministic addition questions whose prompts all have one token length.
- :func:`best_on_dev`: the candidate with the best mean dev score (choices are made on dev, never test).
"""
from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from utils.chat import prefix_cache, repeat_cache
from utils.checks import check_positive_int, check_positive_number
from utils.decoding import process_logits

__all__ = [
    "FORMATS",
    "FewShotPrompt",
    "addition_items",
    "answer_token_ids",
    "best_on_dev",
    "calibrate",
    "few_shot_prompt",
    "label_probs",
    "last_number",
    "majority_vote",
    "next_token_logprobs",
    "sample_paths",
    "self_consistency",
    "split_ids",
]

FORMATS = ("plain", "chat")
"""Few-shot formats: ``"plain"`` text (``Review: ...\\nSentiment: positive``, the answer word after a
space) and ``"chat"`` (the instruction as the system message, each exemplar a user turn and an
assistant turn, the answer word opening the assistant's reply)."""


@dataclass(frozen=True)
class FewShotPrompt:
    """A few-shot prompt: ``prefix + suffixes[i]`` is the full prompt for query ``i``; the answer
    comes next, as ``answer_words``' one token each."""

    prefix: str
    suffixes: list[str]
    answer_words: list[str]
    fmt: str


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def few_shot_prompt(tokenizer, instruction: str, exemplars: Sequence[tuple[str, str]],
                    queries: Sequence[str], labels: Sequence[str], fmt: str = "plain",
                    field: str = "Review", answer_field: str = "Sentiment") -> FewShotPrompt:
    """The few-shot prompt of ``queries`` with ``exemplars`` (``(text, label)`` pairs, in order).

    ``"plain"``: the instruction, then ``{field}: text`` / ``{answer_field}: label`` blocks separated
    by blank lines; each suffix is ``\\n\\n{field}: query\\n{answer_field}:``. ``"chat"``: the
    instruction is the system message, each exemplar a user turn ``{field}: text`` answered by the
    label; each suffix is the query's user turn and the opened assistant turn. ``labels`` are the
    answer words (e.g. ``["positive", "negative"]``); ``answer_words`` are them as they follow the
    prompt (after a space in the plain format).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    _check_text("instruction", instruction)
    if not queries:
        raise ValueError("few_shot_prompt needs at least one query")
    if len(labels) < 2:
        raise ValueError(f"need at least two labels to choose between, got {list(labels)!r}")
    for text, label in exemplars:
        _check_text("an exemplar's text", text)
        if label not in labels:
            raise ValueError(f"exemplar label {label!r} is not one of the labels {list(labels)!r}")
    if fmt == "plain":
        blocks = [instruction] + [f"{field}: {t}\n{answer_field}: {y}" for t, y in exemplars]
        suffixes = [f"\n\n{field}: {_check_text('a query', q)}\n{answer_field}:" for q in queries]
        return FewShotPrompt("\n\n".join(blocks), suffixes, [" " + y for y in labels], fmt)
    chat = [{"role": "system", "content": instruction}]
    for text, label in exemplars:
        chat += [{"role": "user", "content": f"{field}: {text}"},
                 {"role": "assistant", "content": label}]
    prefix = tokenizer.apply_chat_template(chat, tokenize=False)
    suffixes = []
    for query in queries:
        turn = {"role": "user", "content": f"{field}: {_check_text('a query', query)}"}
        full = tokenizer.apply_chat_template(chat + [turn], tokenize=False,
                                             add_generation_prompt=True)
        if not full.startswith(prefix):
            raise ValueError("the chat template renders the exemplars differently once a query "
                             "follows; use fmt='plain' with this tokenizer")
        suffixes.append(full[len(prefix):])
    return FewShotPrompt(prefix, suffixes, list(labels), fmt)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def split_ids(tokenizer, prefix: str, suffixes: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """``(prefix_ids, suffix_ids)``: token ids of the shared prefix and of each suffix after it.

    Each ``prefix + suffix`` is tokenized whole and must start with the prefix's own tokens, so the
    split never changes what the model reads (a split inside a word, or between two whitespace
    characters that merge, is refused with the fix).
    """
    _check_text("prefix", prefix)
    if not prefix or not suffixes:
        raise ValueError("need a non-empty prefix and at least one suffix")
    prefix_ids = _ids(tokenizer, prefix)
    parts = []
    for suffix in suffixes:
        whole = _ids(tokenizer, prefix + _check_text("a suffix", suffix))
        if whole[:len(prefix_ids)] != prefix_ids or len(whole) == len(prefix_ids):
            raise ValueError(f"prefix + suffix does not tokenize as prefix, then suffix (at "
                             f"{suffix[:30]!r}); end the prefix after a word or a special token "
                             "and start the suffix with its own non-empty text")
        parts.append(whole[len(prefix_ids):])
    return prefix_ids, parts


def answer_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """The token id of each answer word; each must be exactly one token, and all distinct."""
    if len(words) < 2:
        raise ValueError(f"need at least two answer words, got {list(words)!r}")
    ids = []
    for word in words:
        tokens = _ids(tokenizer, _check_text("an answer word", word))
        if len(tokens) != 1:
            raise ValueError(f"answer word {word!r} is {len(tokens)} tokens {tokens}; choose words "
                             "that are one token each (mind the leading space)")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"answer words {list(words)!r} share a token id {ids}")
    return ids


@torch.no_grad()
def next_token_logprobs(model: nn.Module, prefix_ids: Sequence[int],
                        suffixes: Sequence[Sequence[int]], token_ids: Sequence[int] | None = None,
                        batch_size: int = 16) -> torch.Tensor:
    """(n_suffixes, n_tokens) log-probabilities (over the whole vocabulary) of ``token_ids`` as the
    next token after ``prefix_ids + suffix``; all tokens when ``token_ids`` is None.

    The prefix runs once; its key/value cache is copied for each batch of suffixes, which are
    right-padded (so no real token sees padding, and positions continue the prefix exactly), and
    each row is read at its own last real token. Equal to running every full prompt alone, up to
    float rounding.
    """
    check_positive_int("batch_size", batch_size)
    if not prefix_ids or not suffixes or any(len(s) == 0 for s in suffixes):
        raise ValueError("need a non-empty prefix and at least one suffix, each non-empty")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    cache = prefix_cache(model, prefix_ids)
    n_prefix = len(prefix_ids)
    order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
    out = torch.empty(len(suffixes), model.config.vocab_size if token_ids is None
                      else len(token_ids))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        chunk = [list(suffixes[i]) for i in idx]
        longest = max(len(c) for c in chunk)
        ids = torch.tensor([c + [c[-1]] * (longest - len(c)) for c in chunk], device=device)
        mask = torch.tensor([[1] * (n_prefix + len(c)) + [0] * (longest - len(c)) for c in chunk],
                            device=device)
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=True,
                                     past_key_values=repeat_cache(cache, len(chunk))).last_hidden_state
        last = torch.tensor([len(c) - 1 for c in chunk], device=device)
        logits = model.get_output_embeddings()(hidden[torch.arange(len(chunk)), last]).float()
        logprobs = torch.log_softmax(logits, dim=-1)
        if token_ids is not None:
            logprobs = logprobs[:, list(token_ids)]
        out[idx] = logprobs.cpu()
    model.train(was_training)
    return out


def label_probs(logprobs: torch.Tensor) -> torch.Tensor:
    """(n, labels) probabilities renormalised over the labels: ``softmax`` of their log-probs."""
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() != 2 or logprobs.shape[1] < 2:
        raise ValueError("logprobs must be a (n, labels) tensor with at least two labels, e.g. "
                         "next_token_logprobs(..., token_ids=answer_token_ids(...))")
    return torch.softmax(logprobs.float(), dim=-1)


def calibrate(probs: torch.Tensor, content_free: torch.Tensor) -> torch.Tensor:
    """Contextual calibration (Zhao et al., 2021): ``softmax``-free rescaling of label probabilities.

    ``content_free`` holds the label probabilities of content-free inputs (``"N/A"``, ``""``,
    ``"[MASK]"``: one row each, or one row already averaged); their mean ``p_cf`` is the prompt's
    bias. Each row ``p`` becomes ``W p / sum(W p)`` with ``W = diag(p_cf)^-1``, so a content-free
    input maps to the uniform distribution.
    """
    for name, value in (("probs", probs), ("content_free", content_free)):
        if not isinstance(value, torch.Tensor) or value.dim() not in (1, 2):
            raise ValueError(f"{name} must be a (labels,) or (n, labels) tensor of probabilities")
    p_cf = content_free.float().reshape(-1, content_free.shape[-1]).mean(dim=0)
    if p_cf.shape[0] != probs.shape[-1]:
        raise ValueError(f"probs has {probs.shape[-1]} labels but content_free has {p_cf.shape[0]}")
    if not (p_cf > 0).all():
        raise ValueError(f"content-free probabilities must be positive to invert, got {p_cf.tolist()}")
    scaled = probs.float() / p_cf
    return scaled / scaled.sum(dim=-1, keepdim=True)


@torch.no_grad()
def sample_paths(model: nn.Module, prefix_ids: Sequence[int], suffixes: Sequence[Sequence[int]],
                 n: int = 1, max_new_tokens: int = 32, temperature: float | None = None,
                 top_p: float = 1.0, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None, batch_size: int = 64,
                 ) -> list[list[list[int]]]:
    """``paths[i][j]``: the ``j``-th of ``n`` continuations (token ids, cut before end-of-sequence)
    of ``prefix_ids + suffixes[i]``.

    ``temperature=None`` is greedy (argmax; ``n`` copies would be identical, so use ``n=1``); a
    number samples each token from ``softmax(process_logits(z, temperature, top_p=top_p))`` with
    ``generator``. The prefix runs once and its cache is shared; all suffixes must have one length
    (no padding is needed then). A row that emits ``eos_token_id`` leaves the batch (its cache rows
    are dropped), so a few long paths do not make every row pay for their length. ``batch_size``
    counts rows (suffixes times ``n``).
    """
    n = check_positive_int("n", n)
    check_positive_int("max_new_tokens", max_new_tokens)
    check_positive_int("batch_size", batch_size)
    if temperature is not None:
        check_positive_number("temperature", temperature)
    elif n > 1:
        raise ValueError("greedy decoding (temperature=None) gives n identical paths; use n=1 or "
                         "set a temperature")
    if not prefix_ids or not suffixes or len({len(s) for s in suffixes}) != 1 or not suffixes[0]:
        raise ValueError("need a non-empty prefix and non-empty suffixes that all have the same "
                         "number of tokens (group them by length first)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    cache = prefix_cache(model, prefix_ids)
    rows = [i for i in range(len(suffixes)) for _ in range(n)]
    paths: list[list[list[int]]] = [[] for _ in suffixes]
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size]
        ids = torch.tensor([list(suffixes[i]) for i in idx], device=device)
        past = repeat_cache(cache, len(idx))
        tokens: list[list[int]] = [[] for _ in idx]
        alive = list(range(len(idx)))  # rows still generating; finished rows leave the batch
        for _ in range(max_new_tokens):
            out = model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1)
            logits, past = out.logits[:, -1].float(), out.past_key_values
            if temperature is None:
                ids = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = process_logits(logits, temperature, None, top_p).softmax(dim=-1)
                ids = torch.multinomial(probs, 1, generator=generator)
            keep = []
            for j, (row, token) in enumerate(zip(alive, ids[:, 0].tolist())):
                if token == eos_token_id:
                    continue
                tokens[row].append(token)
                keep.append(j)
            if not keep:
                break
            if len(keep) < len(alive):
                past.batch_select_indices(torch.tensor(keep, device=device))
                ids, alive = ids[keep], [alive[j] for j in keep]
        for i, row in zip(idx, tokens):
            paths[i].append(row)
    model.train(was_training)
    return paths


def last_number(text: str) -> int | None:
    """The last integer written in ``text`` (commas between digit groups allowed), or None."""
    found = re.findall(r"-?\d[\d,]*", _check_text("text", text))
    if not found:
        return None
    return int(found[-1].rstrip(",").replace(",", ""))


def majority_vote(answers: Sequence[Hashable | None],
                  same: Callable[[Any, Any], bool] | None = None) -> Hashable | None:
    """The most frequent answer that is not None; a tie goes to the answer seen first. None if
    there is none.

    ``same`` (optional) decides which answers count as one, e.g. ``utils.agent.answers_match`` so
    that ``"52"`` and ``"52.0"`` are one vote; two answers are one when ``same`` holds both ways.
    The answer returned is the first seen of the winning group. Without ``same``, answers are equal
    when ``==`` says so.
    """
    if same is None:
        counts = Counter(a for a in answers if a is not None)
        if not counts:
            return None
        top = max(counts.values())
        return next(a for a in answers if a is not None and counts[a] == top)
    groups: list[list[Any]] = []
    for answer in answers:
        if answer is None:
            continue
        for group in groups:
            if same(answer, group[0]) and same(group[0], answer):
                group.append(answer)
                break
        else:
            groups.append([answer])
    if not groups:
        return None
    return max(groups, key=len)[0]  # max keeps the first of equal lengths


def self_consistency(answers: Sequence[Sequence[Hashable | None]], gold: Sequence[Hashable],
                     ns: Sequence[int]) -> dict[int, list[int]]:
    """For each ``n`` in ``ns``: per item, 1 if the majority vote over its first ``n`` answers is
    ``gold`` (0 otherwise). ``answers[i]`` lists item ``i``'s answers, one per sampled path."""
    if len(answers) != len(gold) or not answers:
        raise ValueError(f"answers and gold must be non-empty and of one length, got "
                         f"{len(answers)} and {len(gold)}")
    most = min(len(a) for a in answers)
    result = {}
    for n in ns:
        check_positive_int("n", n)
        if n > most:
            raise ValueError(f"n = {n} needs {n} paths per item, but an item has only {most}")
        result[n] = [int(majority_vote(a[:n]) == g) for a, g in zip(answers, gold)]
    return result


def addition_items(n: int, digits: tuple[int, int] = (2, 1), seed: int = 0) -> list[dict]:
    """``n`` distinct questions ``{"a", "b", "question", "answer"}`` adding an ``digits[0]``-digit
    to a ``digits[1]``-digit number (each without a leading zero), drawn with ``seed``.

    All questions of one ``digits`` have the same characters count and, with a tokenizer that
    splits numbers into digits (SmolLM2's does), the same number of tokens.
    """
    n = check_positive_int("n", n)
    if len(digits) != 2:
        raise ValueError(f"digits must be two digit counts such as (2, 1), got {digits!r}")
    lows = [10 ** (check_positive_int("digits", d) - 1) for d in digits]
    lows = [2 if low == 1 else low for low in lows]  # single digits from 2: no "+ 1", no "+ 0"
    highs = [10 ** d - 1 for d in digits]
    space = (highs[0] - lows[0] + 1) * (highs[1] - lows[1] + 1)
    if n > space:
        raise ValueError(f"only {space} distinct {digits} questions exist, asked for {n}")
    rng = random.Random(f"addition-{digits}-{seed}")
    seen, items = set(), []
    while len(items) < n:
        a, b = rng.randint(lows[0], highs[0]), rng.randint(lows[1], highs[1])
        if (a, b) in seen:
            continue
        seen.add((a, b))
        items.append({"a": a, "b": b, "question": f"What is {a} + {b}?", "answer": a + b})
    return items


def best_on_dev(scores: Mapping[Hashable, Sequence[float]]) -> Hashable:
    """The candidate whose dev scores have the highest mean (ties: the first in ``scores``)."""
    if not scores:
        raise ValueError("best_on_dev got no candidates")
    means = {}
    for name, values in scores.items():
        values = list(values)
        if not values:
            raise ValueError(f"candidate {name!r} has no dev scores")
        means[name] = sum(values) / len(values)
    top = max(means.values())
    return next(name for name, m in means.items() if m == top)
