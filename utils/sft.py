"""Supervised fine-tuning (SFT) of a chat model on prompt/response pairs (Part 2).

- :func:`build_example`: one conversation rendered with the tokenizer's chat template, with labels
  that train only the response (every prompt token is masked with ``-100``).
- :func:`collate`: examples -> padded tensors; :func:`masked_lm_loss`: the loss on response tokens.
- :func:`faq_pairs` and :func:`sentiment_pairs`: two small tasks built from the shipped ``data/``,
  each with a fixed, seeded train/test split.

Messages, prompt ids, left padding and batched greedy replies live in :mod:`utils.chat`; the answer
metrics (SQuAD's exact match and token F1, label accuracy) in :mod:`utils.metrics`.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from utils.chat import IGNORE_INDEX, chat_ids, messages
from utils.data import load_movie_reviews, load_python_faq

__all__ = [
    "NEGATIVE_THRESHOLD",
    "POSITIVE_THRESHOLD",
    "SENTIMENT_INSTRUCTION",
    "build_example",
    "collate",
    "faq_pairs",
    "masked_lm_loss",
    "sentiment_pairs",
]

#: Reviews with a mean human rating at or above this are "positive" (ratings run from -4 to 4).
POSITIVE_THRESHOLD = 1.0
#: Reviews with a mean human rating at or below this are "negative"; the middle is dropped as ambiguous.
NEGATIVE_THRESHOLD = -1.0

SENTIMENT_INSTRUCTION = ("Is the following movie review positive or negative? "
                         "Answer with one word: positive or negative.\n\nReview: {review}")


# --- one training example --------------------------------------------------------------------------

def build_example(tokenizer, prompt: str | list[dict], response: str, max_length: int | None = None,
                  system: str | None = None) -> dict[str, list[int]]:
    """Token ids, labels and attention mask of one conversation, trained on the response only.

    The conversation is ``system`` (optional), the prompt (a user message, or a list of messages)
    and ``response`` as the assistant's turn, rendered by ``tokenizer.apply_chat_template``. Its first
    $P$ tokens are the prompt rendered with ``add_generation_prompt=True`` (which ends with the
    assistant header); those get label $-100$, so the loss is
    $-\\frac{1}{N}\\sum_{t \\ge P} \\log p(x_t \\mid x_{<t})$ over the $N$ response tokens, the
    template's end-of-turn token(s) included (so the model learns to stop).
    With ``max_length`` the response is cut to fit; a prompt that leaves no room raises ``ValueError``.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    if not response.strip():
        raise ValueError("response is empty: SFT needs a target answer to learn")
    chat = messages(prompt, system)
    prompt = chat_ids(tokenizer, chat, add_generation_prompt=True)
    ids = chat_ids(tokenizer, chat + [{"role": "assistant", "content": response}],
                   add_generation_prompt=False)
    n_prompt = len(prompt)
    if ids[:n_prompt] != prompt:
        raise ValueError("the chat template does not render the prompt (with add_generation_prompt=True) as a "
                         "prefix of the full conversation, so the response tokens cannot be located; "
                         "use a template whose generation prompt is exactly the start of the assistant turn")
    if max_length is not None:
        if n_prompt >= max_length:
            raise ValueError(f"the prompt alone has {n_prompt} tokens, leaving no room for the response "
                             f"within max_length={max_length}; raise max_length or shorten the prompt")
        ids = ids[:max_length]
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def collate(examples: Sequence[dict], pad_token_id: int,
            padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of :func:`build_example` outputs to one batch of tensors (batch, longest).

    ``input_ids`` are padded with ``pad_token_id``, ``labels`` with $-100$ (no loss on padding) and
    ``attention_mask`` with 0. Right padding suits training; generation needs ``"left"``.
    """
    if not examples:
        raise ValueError("collate got no examples: pass a non-empty list of build_example outputs")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
        raise TypeError(f"pad_token_id must be an int, got {pad_token_id!r}; a tokenizer without a pad token "
                        "can use its eos_token_id (the mask hides padding anyway)")
    longest = max(len(ex["input_ids"]) for ex in examples)
    batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
    for ex in examples:
        for key, fill in (("input_ids", pad_token_id), ("labels", IGNORE_INDEX), ("attention_mask", 0)):
            values = list(ex[key].tolist() if isinstance(ex[key], torch.Tensor) else ex[key])
            if len(values) != len(ex["input_ids"]):
                raise ValueError(f"an example's {key} has {len(values)} entries but its input_ids has "
                                 f"{len(ex['input_ids'])}")
            padding = [fill] * (longest - len(values))
            batch[key].append(padding + values if padding_side == "left" else values + padding)
    return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response) tokens only.

    Position $t$ predicts token $t+1$, so logits and labels are shifted by one; positions whose
    label is $-100$ (prompt and padding) are skipped:
    $\\mathcal{L} = -\\frac{1}{|R|}\\sum_{t \\in R} \\log p_\\theta(y_{t+1} \\mid x_{\\le t})$,
    $R = \\{t : y_{t+1} \\ne -100\\}$. Equals ``LlamaForCausalLM(...)(input_ids, labels=labels).loss``.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"need logits (batch, seq, vocab) and labels (batch, seq), got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    if not (shift_labels != IGNORE_INDEX).any():
        raise ValueError("labels mark no token for the loss (all -100 after the shift); check build_example's "
                         "max_length left room for the response")
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


# --- tasks from the shipped data -------------------------------------------------------------------

def _check_split(split: str, test_fraction: float) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def _nonempty(pairs: list[tuple[str, str]], what: str) -> list[tuple[str, str]]:
    if not pairs:
        raise ValueError(f"the {what} split is empty; choose a test_fraction that leaves examples on both sides")
    return pairs


def faq_pairs(split: str, test_fraction: float = 0.2, seed: int = 0,
              data_dir: Path | None = None) -> list[tuple[str, str]]:
    """(question, answer) pairs from the Python FAQ, for ``split`` ``"train"`` or ``"test"``.

    The distinct questions are shuffled with ``seed`` and the first ``round(test_fraction * n)`` form
    the test split, so a question never appears on both sides (one question, "What is Python?",
    has two answers in the FAQ; both go to the same split).
    """
    _check_split(split, test_fraction)
    rows = load_python_faq(data_dir).to_dict()
    questions = sorted(set(rows["question"]))
    random.Random(seed).shuffle(questions)
    n_test = round(test_fraction * len(questions))
    chosen = set(questions[:n_test] if split == "test" else questions[n_test:])
    pairs = [(q, a) for q, a in zip(rows["question"], rows["answer"]) if q in chosen]
    return _nonempty(pairs, split)


def sentiment_pairs(split: str, test_fraction: float = 0.2, seed: int = 0,
                    data_dir: Path | None = None) -> list[tuple[str, str]]:
    """(instruction, ``"positive"`` or ``"negative"``) pairs from the movie-review ratings.

    A review is positive when its mean human rating is $\\ge$ ``POSITIVE_THRESHOLD`` (1.0) and negative
    when it is $\\le$ ``NEGATIVE_THRESHOLD`` (-1.0), on the -4..4 scale; the ambiguous middle is dropped,
    as are repeated review texts. The larger class is cut to the size of the smaller, each class is
    shuffled with ``seed`` and split, and the split alternates positive, negative, ... so that any
    even-length prefix of it is balanced too.
    """
    _check_split(split, test_fraction)
    reviews = load_movie_reviews(data_dir).to_dict()  # plain lists: much faster to loop over
    seen: set[str] = set()
    classes: dict[str, list[str]] = {"positive": [], "negative": []}
    for text, score in zip(reviews["text"], reviews["score"]):
        if text in seen:
            continue
        seen.add(text)
        if score >= POSITIVE_THRESHOLD:
            classes["positive"].append(text)
        elif score <= NEGATIVE_THRESHOLD:
            classes["negative"].append(text)
    n_per_class = min(len(texts) for texts in classes.values())
    n_test = round(test_fraction * n_per_class)
    parts = {}
    for label, texts in classes.items():
        random.Random(f"{seed}-{label}").shuffle(texts)
        texts = texts[:n_per_class]
        parts[label] = texts[:n_test] if split == "test" else texts[n_test:]
    pairs = [(SENTIMENT_INSTRUCTION.format(review=text), label)
             for pos, neg in zip(parts["positive"], parts["negative"])
             for text, label in ((pos, "positive"), (neg, "negative"))]
    return _nonempty(pairs, split)
