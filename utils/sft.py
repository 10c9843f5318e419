"""Supervised fine-tuning (SFT) of a chat model on prompt/response pairs (Part 2).

- :func:`build_example`: one conversation rendered with the tokenizer's chat template, with labels
  that train only the response (every prompt token is masked with ``-100``).
- :func:`collate`: examples -> padded tensors; :func:`masked_lm_loss`: the loss on response tokens.
- :func:`faq_pairs` and :func:`sentiment_pairs`: two small tasks built from the shipped ``data/``,
  each with a fixed, seeded train/test split.
- :func:`normalize_answer`, :func:`exact_match`, :func:`token_f1` (on :func:`multiset_f1`), :func:`contains`
  (SQuAD-style answer metrics) and :func:`label_accuracy` (for the sentiment task).
- :func:`generate_responses`: greedy, batched answers to a list of prompts.
"""
from __future__ import annotations

import random
import re
import string
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.data import load_movie_reviews, load_python_faq

IGNORE_INDEX = -100  # label value that cross-entropy (ours and transformers') skips
_PUNCTUATION = frozenset(string.punctuation)

#: Reviews with a mean human rating at or above this are "positive" (ratings run from -4 to 4).
POSITIVE_THRESHOLD = 1.0
#: Reviews with a mean human rating at or below this are "negative"; the middle is dropped as ambiguous.
NEGATIVE_THRESHOLD = -1.0

SENTIMENT_INSTRUCTION = ("Is the following movie review positive or negative? "
                         "Answer with one word: positive or negative.\n\nReview: {review}")


# --- one training example --------------------------------------------------------------------------

def _messages(prompt: str | list[dict], system: str | None) -> list[dict]:
    """The chat messages of a prompt: a bare string becomes one user turn; ``system`` goes first."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("prompt is empty: pass the user's message (a non-empty string)")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        for m in prompt:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise TypeError(f"each message must be a dict with str 'role' and 'content', got {m!r}")
        messages = [dict(m) for m in prompt]
    else:
        raise TypeError("prompt must be a non-empty str or a non-empty list of {'role', 'content'} dicts, "
                        f"got {type(prompt).__name__} {prompt!r:.60}")
    if system is not None:
        if not isinstance(system, str):
            raise TypeError(f"system must be a str or None, got {type(system).__name__}")
        if messages[0]["role"] == "system":
            raise ValueError("the prompt already starts with a system message; pass system=None or drop it")
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat_template; set one (tokenizer.chat_template = '...jinja...') "
                         "or use a chat model such as SmolLM2-135M-Instruct (utils.load_llm())")
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            add_generation_prompt=add_generation_prompt)
    return list(encoded["input_ids"])


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
    messages = _messages(prompt, system)
    prompt_ids = _chat_ids(tokenizer, messages, add_generation_prompt=True)
    ids = _chat_ids(tokenizer, messages + [{"role": "assistant", "content": response}],
                    add_generation_prompt=False)
    n_prompt = len(prompt_ids)
    if ids[:n_prompt] != prompt_ids:
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


# --- metrics ---------------------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower-case, drop punctuation and the articles a/an/the, squeeze spaces."""
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer needs a str, got {type(text).__name__}")
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(pred: str, gold: str) -> float:
    """1.0 if the normalised prediction equals the normalised gold answer, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gold))


def token_f1(pred: str, gold: str) -> float:
    """SQuAD's token F1: harmonic mean of precision and recall of the shared normalised words.

    With $c$ the number of words in common (counting repeats), $p = c/|\\text{pred}|$,
    $r = c/|\\text{gold}|$ and $F_1 = 2pr/(p+r)$; if either side is empty, 1.0 when both are, else 0.0.
    """
    return multiset_f1(normalize_answer(pred).split(), normalize_answer(gold).split())


def multiset_f1(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    """F1 of two token lists compared as multisets (the core of every token-F1 metric in the book);
    1.0 if both are empty, 0.0 if only one is."""
    if not pred_tokens or not gold_tokens:
        return float(len(pred_tokens) == len(gold_tokens))
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def contains(pred: str, gold: str) -> float:
    """1.0 if the normalised gold answer occurs in the normalised prediction as whole words, else 0.0."""
    gold_norm = normalize_answer(gold)
    if not gold_norm:
        raise ValueError(f"gold answer {gold!r} is empty after normalisation, so containment is meaningless")
    return float(f" {gold_norm} " in f" {normalize_answer(pred)} ")


def label_accuracy(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Fraction of predictions whose first normalised word is the normalised gold label."""
    if len(preds) != len(golds):
        raise ValueError(f"got {len(preds)} predictions for {len(golds)} gold labels")
    if not golds:
        raise ValueError("label_accuracy got no examples")
    first_words = [(normalize_answer(p).split() or [""])[0] for p in preds]
    return sum(w == normalize_answer(g) for w, g in zip(first_words, golds)) / len(golds)


# --- generation ------------------------------------------------------------------------------------

@torch.no_grad()
def generate_responses(model: nn.Module, tokenizer, prompts: Sequence[str | list[dict]],
                       max_new_tokens: int = 64, batch_size: int = 8,
                       system: str | None = None) -> list[str]:
    """Greedy answers to ``prompts``, ``batch_size`` at a time, decoded without special tokens.

    Each prompt is rendered like :func:`build_example`'s prompt part (ending with the assistant
    header) and the batch is padded on the LEFT with an attention mask, so that every row's last
    real token sits at the end and its new tokens follow it directly.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    responses: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = [{"input_ids": ids, "labels": ids, "attention_mask": [1] * len(ids)}
                for ids in (_chat_ids(tokenizer, _messages(p, system), add_generation_prompt=True)
                            for p in prompts[start:start + batch_size])]
        batch = collate(rows, pad_id, padding_side="left")
        output = model.generate(input_ids=batch["input_ids"].to(device),
                                attention_mask=batch["attention_mask"].to(device),
                                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        responses += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    model.train(was_training)
    return responses
