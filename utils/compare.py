"""One task, one budget, many fine-tuning methods: the top of a cached model, adapted eight ways (Part 2).

The model is split as in :mod:`utils.finetune`: a frozen trunk (embeddings and the bottom $L - k$
layers) runs once per example, and every method adapts only a copy of the top $k$ layers, the final
norm and a label head. Every prompt of a classification task starts with the same tokens (chat
header and instruction), so the trunk and the top are run on that shared prefix once, and on each
example's own suffix attending to it (a shared key/value cache): the same numbers, fewer tokens.

- :func:`build_task_cache`: the cached trunk output of a set of (prompt, label) pairs.
- :class:`TopModel`: the trainable top, with optional deep prompt (virtual tokens at layer $L - k$)
  and prefix (trainable keys and values in every top layer).
- (IA)$^3$'s layer is :class:`utils.lora.IA3Linear`, beside LoRA and DoRA.
- :func:`build_top`: a :class:`TopModel` prepared for one method of :data:`METHODS`.
- :func:`run_method`: train it for a fixed number of steps and measure accuracy, memory and speed.
- :func:`evaluate`: held-out accuracy (and predictions) of a top.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.chat import prompt_ids
from utils.checks import check_positive_int
from utils.finetune import label_token_ids
from utils.hf_llama import check_n_top, prefix_trunk_hidden, run_layers
from utils.lora import IA3Linear, apply_lora
from utils.measure import peak_memory_bytes
from utils.pretrain import lr_at
from utils.quant import dequantize_blockwise, nf4_levels, quantize_blockwise

__all__ = [
    "IA3_FEEDFORWARD",
    "IA3_TARGETS",
    "LINEAR_TARGETS",
    "METHODS",
    "TaskCache",
    "TopModel",
    "build_task_cache",
    "build_top",
    "evaluate",
    "nf4_round_trip_",
    "run_method",
    "trainable_count",
]

#: The methods :func:`build_top` knows.
METHODS = ("zero-shot", "full", "head", "lora", "dora", "qlora", "prompt", "prefix", "ia3")
#: Every linear layer of a Llama block: the LoRA, DoRA and QLoRA targets.
LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: (IA)^3's targets for Llama in ``peft``: keys and values are rescaled, and the input of ``down_proj``.
IA3_TARGETS = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)  # the targets whose input, not output, is rescaled


# --- the cached trunk -------------------------------------------------------------------------------

@dataclass
class TaskCache:
    """The trunk's output for a classification task, split at the tokens all prompts share.

    ``prefix`` (p, d): hidden states of the shared prompt prefix entering layer $L - k$;
    ``suffixes``: per example (s_i, d), its own tokens up to and including the answer position;
    ``targets`` (n,): the index of each example's gold label in ``labels``.
    """

    prefix: torch.Tensor
    suffixes: list[torch.Tensor]
    targets: torch.Tensor
    labels: list[str]

    def __len__(self) -> int:
        return len(self.suffixes)

    def tokens(self, index: Sequence[int]) -> int:
        """Tokens of these examples counted in full (shared prefix + own suffix each)."""
        return sum(len(self.prefix) + len(self.suffixes[i]) for i in index)


@torch.no_grad()
def build_task_cache(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], labels: Sequence[str],
                     n_top: int, system: str | None = "", batch_size: int = 16) -> TaskCache:
    """Run the frozen trunk (all but the top ``n_top`` layers) over ``pairs`` once, sharing the prefix.

    Each prompt is rendered up to the assistant header, so its last token is the answer position.
    The longest token prefix common to all prompts (at least one token is left to each example) is
    run once with ``use_cache``; each batch of suffixes then attends to that key/value cache.
    Answers must be in ``labels``, whose first tokens must differ (:func:`label_token_ids`).
    """
    check_n_top(model, n_top)
    if not pairs:
        raise ValueError("build_task_cache got no (prompt, label) pairs")
    check_positive_int("batch_size", batch_size)
    label_token_ids(tokenizer, pairs[0][0], labels, system=system)  # checks the labels are scoreable
    unknown = sorted({a for _, a in pairs} - set(labels))
    if unknown:
        raise ValueError(f"answers {unknown} are not among the labels {list(labels)}")
    ids = [prompt_ids(tokenizer, p, system) for p, _ in pairs]
    shared = min(len(x) for x in ids) - 1
    for x in ids[1:]:
        shared = next((i for i in range(shared) if x[i] != ids[0][i]), shared)
    if shared < 1:
        raise ValueError("the prompts share no first token; build_task_cache needs a common prefix "
                         "(such as the chat template's header)")
    prefix, suffixes = prefix_trunk_hidden(model, ids[0][:shared], [x[shared:] for x in ids], n_top,
                                           batch_size)
    targets = torch.tensor([list(labels).index(a) for _, a in pairs], device=prefix.device)
    return TaskCache(prefix, suffixes, targets, list(labels))


# --- the trainable top ------------------------------------------------------------------------------

class _SharedKV:
    """Duck-typed key/value cache for the top layers: learned prefixes, then the shared prompt prefix.

    While ``recording`` each layer's keys and values are appended to what the layer already holds;
    afterwards every batch reads them (expanded to its size) in front of its own keys and values.
    """

    def __init__(self, start: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.kv = dict(start)
        self.recording = True

    def past(self) -> int:
        return next(iter(self.kv.values()))[0].shape[2] if self.kv else 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx in self.kv:
            old_k, old_v = (t.expand(key.shape[0], -1, -1, -1) for t in self.kv[layer_idx])
            key, value = torch.cat([old_k, key], dim=2), torch.cat([old_v, value], dim=2)
        if self.recording:
            self.kv[layer_idx] = (key, value)
        return key, value


class TopModel(nn.Module):
    """A copy of the top ``n_top`` layers, the final norm and a label head: the part that trains.

    The head's rows start as the language model head's rows of the labels' first tokens, so before
    training its logits are exactly :func:`utils.finetune.label_logits`. Two optional additions:

    - ``prompt`` (m, d): virtual tokens inserted in front of the input of layer $L - k$ (a deep prompt);
    - ``prefix``: per top layer, trainable keys and values (kv_heads, m, head_dim) that every token
      attends to, as ``peft``'s prefix tuning stores them (keys without rotary embedding).

    With either, the real tokens sit at positions $m, m+1, \\dots$, as with ``peft``.
    """

    def __init__(self, model: nn.Module, n_top: int, label_ids: Sequence[int]) -> None:
        super().__init__()
        n_layers = check_n_top(model, n_top)
        if len(label_ids) < 2:
            raise ValueError(f"need at least two label token ids, got {list(label_ids)!r}")
        self.layers = copy.deepcopy(model.model.layers[n_layers - n_top:])
        self.norm = copy.deepcopy(model.model.norm)
        self.rotary = model.model.rotary_emb
        weight = model.lm_head.weight[list(label_ids)].detach().clone()
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device,
                              dtype=weight.dtype)
        self.head.weight = nn.Parameter(weight)
        self.prompt: nn.Parameter | None = None
        self.prefix: nn.ParameterList | None = None

    def _run(self, hidden: torch.Tensor, cache: _SharedKV, start: int) -> torch.Tensor:
        return run_layers(self.layers, self.rotary, hidden, start, cache, cache.past())

    def shared_kv(self, prefix: torch.Tensor) -> tuple[_SharedKV, int]:
        """Run the shared prefix (p, d), after the learned prompt or prefix if any; its cache and length."""
        layer_ids = [layer.self_attn.layer_idx for layer in self.layers]
        start = {}
        if self.prefix is not None:
            start = {i: (self.prefix[2 * j][None], self.prefix[2 * j + 1][None])
                     for j, i in enumerate(layer_ids)}
        cache = _SharedKV(start)
        shared = prefix[None]
        if self.prompt is not None:
            shared = torch.cat([self.prompt[None], shared], dim=1)
        self._run(shared, cache, cache.past())
        cache.recording = False
        return cache, cache.past()

    def forward(self, prefix: torch.Tensor, suffixes: Sequence[torch.Tensor]) -> torch.Tensor:
        """(batch, n_labels) label logits at each suffix's last token (its answer position)."""
        if not suffixes:
            raise ValueError("TopModel got no suffixes")
        cache, past = self.shared_kv(prefix)
        lengths = torch.tensor([len(s) for s in suffixes], device=prefix.device)
        padded = prefix.new_zeros(len(suffixes), int(lengths.max()), prefix.shape[-1])
        for i, s in enumerate(suffixes):
            padded[i, :len(s)] = s
        hidden = self._run(padded, cache, past)
        last = hidden[torch.arange(len(suffixes), device=prefix.device), lengths - 1]
        return self.head(self.norm(last))

    @torch.no_grad()
    def record_kv(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Keys and values (per layer: k, v of shape (kv_heads, m, head_dim)) of tokens (m, d) at 0..m-1."""
        cache = _SharedKV({})
        self._run(hidden[None], cache, 0)
        return [t[0].clone() for i in sorted(cache.kv) for t in cache.kv[i]]


# --- one method ---------------------------------------------------------------------------------------

@torch.no_grad()
def nf4_round_trip_(module: nn.Module, block_size: int = 64) -> int:
    """Replace every ``nn.Linear`` weight in ``module`` by its NF4 block-wise round trip (in place).

    QLoRA stores these weights in 4 bits and dequantizes them for each matmul; the values the matmul
    sees are exactly this round trip, so training on it is QLoRA's arithmetic in float32 storage.
    Returns how many layers were quantized.
    """
    levels, count = nf4_levels(), 0
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            w = layer.weight
            codes, absmax = quantize_blockwise(w, levels, block_size)
            w.copy_(dequantize_blockwise(codes, absmax, levels, w.shape).to(w.dtype))
            count += 1
    return count


def build_top(model: nn.Module, n_top: int, label_ids: Sequence[int], method: str, *, rank: int = 4,
              n_virtual: int = 8, init_hidden: torch.Tensor | None = None) -> TopModel:
    """A :class:`TopModel` with exactly the parameters of ``method`` trainable.

    - ``zero-shot``: nothing trains (the baseline); ``full``: every parameter of the top;
    - ``head``: the final norm and the label head only;
    - ``lora`` / ``dora`` / ``qlora``: rank-``rank`` adapters (alpha = 2 rank) on every linear layer of the
      top; ``qlora`` first replaces the frozen weights by their NF4 round trip;
    - ``prompt``: ``n_virtual`` virtual tokens in front of layer $L - k$, started at ``init_hidden``
      (m >= n_virtual, d), e.g. the trunk's hidden states of real tokens;
    - ``prefix``: ``n_virtual`` trainable keys and values per top layer, started at the keys and values
      those same tokens produce;
    - ``ia3``: learned vectors rescaling keys, values and the input of ``down_proj``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; the known methods are {', '.join(METHODS)}")
    check_positive_int("rank", rank)
    check_positive_int("n_virtual", n_virtual)
    top = TopModel(model, n_top, label_ids)
    top.requires_grad_(method == "full")
    if method == "head":
        top.norm.requires_grad_(True)
        top.head.requires_grad_(True)
    elif method in ("lora", "dora", "qlora"):
        if method == "qlora":
            nf4_round_trip_(top.layers)
        apply_lora(top.layers, LINEAR_TARGETS, rank=rank, alpha=2 * rank, use_dora=method == "dora")
    elif method in ("prompt", "prefix"):
        if init_hidden is None or init_hidden.dim() != 2 or init_hidden.shape[0] < n_virtual:
            raise ValueError(f"{method} needs init_hidden of shape (m >= n_virtual={n_virtual}, d): "
                             "hidden states of real tokens entering the top layers")
        start = init_hidden[:n_virtual].detach().clone()
        if method == "prompt":
            top.prompt = nn.Parameter(start)
        else:
            top.prefix = nn.ParameterList([nn.Parameter(t) for t in top.record_kv(start)])
    elif method == "ia3":
        for name, layer in list(top.layers.named_modules()):
            if name.rpartition(".")[2] in IA3_TARGETS:
                top.layers.set_submodule(name, IA3Linear(layer, name.endswith(IA3_FEEDFORWARD)))
    return top


def trainable_count(top: nn.Module) -> int:
    """Trainable numbers of ``top``."""
    return sum(p.numel() for p in top.parameters() if p.requires_grad)


@torch.no_grad()
def evaluate(top: TopModel, task: TaskCache, batch_size: int = 32) -> tuple[float, torch.Tensor]:
    """Accuracy of ``top`` on ``task`` and its (n, n_labels) label logits."""
    if len(task) == 0:
        raise ValueError("evaluate got an empty task")
    check_positive_int("batch_size", batch_size)
    was_training = top.training
    top.eval()
    logits = torch.cat([top(task.prefix, task.suffixes[i:i + batch_size])
                        for i in range(0, len(task), batch_size)])
    top.train(was_training)
    return (logits.argmax(dim=1) == task.targets).float().mean().item(), logits


def run_method(top: TopModel, train: TaskCache, test: TaskCache, steps: int, batch_size: int, lr: float,
               seed: int = 0, warmup: int = 0, measure_memory: bool = False) -> dict[str, float]:
    """Train ``top``'s trainable parameters for ``steps`` steps and measure it.

    AdamW (no weight decay) with a linear warm-up and cosine decay (:func:`utils.pretrain.lr_at`),
    gradient clipping at norm 1, and the cross-entropy of the label logits. Batches are drawn without
    replacement, with a fresh seeded shuffle each epoch. Returns held-out ``accuracy``, ``trainable``
    numbers, ``step_s`` (median seconds per step, the first step excluded), ``tokens_per_s`` (example
    tokens counted in full, over the median step), ``peak_bytes`` (tensor memory of the first step,
    optimizer state included; only with ``measure_memory``, else NaN) and ``loss_first``/``loss_last``.
    """
    if len(train) == 0 or len(test) == 0:
        raise ValueError("run_method needs non-empty train and test tasks")
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    params = [p for p in top.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the top has no trainable parameters (method 'zero-shot' trains nothing)")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    times, losses, tokens = [], [], []
    top.train()

    def step(index: list[int], i: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(i, lr, warmup, steps)
        logits = top(train.prefix, [train.suffixes[j] for j in index])
        loss = F.cross_entropy(logits.float(), train.targets[index])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    peak = float("nan")
    for i in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(train), generator=gen).tolist()
        index, order = order[:batch_size], order[batch_size:]
        start = time.perf_counter()
        if i == 0 and measure_memory:
            peak = float(peak_memory_bytes(lambda: step(index, i)))
        else:
            step(index, i)
        times.append(time.perf_counter() - start)
        tokens.append(train.tokens(index))
    top.eval()
    timed = times[1:] or times
    step_s = statistics.median(timed)
    accuracy, _ = evaluate(top, test)
    return {"accuracy": accuracy, "trainable": float(trainable_count(top)), "step_s": step_s,
            "tokens_per_s": statistics.median(tokens[1:] or tokens) / step_s, "peak_bytes": peak,
            "loss_first": losses[0], "loss_last": losses[-1]}
