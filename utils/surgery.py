"""Model surgery and distillation: pruning whole layers, measuring what they do, and teaching a student.

Used by Part 2, "Model surgery and distillation":

- :func:`layer_inputs` collects the hidden state entering every decoder layer (and the final norm);
- :func:`angular_distance` and :func:`block_distances` measure how much a block of ``n`` layers
  turns that state (Gromov et al. 2024);
- :func:`remove_layers` deletes a block of layers from a Hugging Face Llama in place, and
  :func:`layers_removed` does the same temporarily, without copying weights;
- :func:`token_nll`, :func:`distillation_loss` and :func:`proxy_logits` are the losses and the
  decode-time arithmetic of the chapter.

The layer functions expect a decoder-only model in the Hugging Face layout: ``model.model.layers``
(an ``nn.ModuleList``), ``model.model.norm`` and ``model.config.num_hidden_layers``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.hf_llama import decoder_layers

__all__ = [
    "angular_distance",
    "best_block",
    "block_distances",
    "distillation_loss",
    "layer_inputs",
    "layers_removed",
    "proxy_logits",
    "remove_layers",
    "token_nll",
]


def _check_block(num_layers: int, start: int, n: int) -> None:
    if n < 1:
        raise ValueError(f"block size n must be at least 1, got {n}")
    if start < 0 or start + n > num_layers:
        raise ValueError(f"layers [{start}, {start + n}) are not inside the model's {num_layers} layers")


@torch.no_grad()
def layer_inputs(model: nn.Module, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden states entering each decoder layer and the final norm: shape ``(L + 1, B, T, d)``.

    Entry ``l`` is the input of layer ``l`` (entry 0 is the token embeddings); entry ``L`` is the
    last layer's output, *before* the final RMSNorm. Collected with forward pre-hooks, so it does not
    depend on how a library version defines ``output_hidden_states``.
    """
    layers = decoder_layers(model)
    states: list[torch.Tensor] = []

    def grab(_module, args, kwargs):
        states.append((args[0] if args else kwargs["hidden_states"]).detach())

    modules = [*layers, model.model.norm]
    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in modules]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(states)


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``arccos(cos(a, b)) / pi`` along the last dimension: 0 for parallel, 1 for opposite vectors."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    cos = F.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1.0, 1.0)
    return (torch.arccos(cos) / math.pi).to(a.dtype)


def block_distances(states: torch.Tensor, max_block: int | None = None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean angular distance between the inputs of layer ``l`` and layer ``l + n``.

    ``states`` is :func:`layer_inputs`' output ``(L + 1, B, T, d)``; ``mask`` (``(B, T)``, bool)
    selects the tokens to average over (all by default). Returns ``D`` of shape ``(L, max_block)``
    with ``D[l, n - 1]`` the distance for the block of ``n`` layers starting at ``l``, and NaN where
    the block would run past the last layer.
    """
    if states.dim() != 4:
        raise ValueError(f"states must be (L + 1, B, T, d), got shape {tuple(states.shape)}")
    num_layers = states.shape[0] - 1
    max_block = num_layers if max_block is None else max_block
    if not 1 <= max_block <= num_layers:
        raise ValueError(f"max_block must be in [1, {num_layers}], got {max_block}")
    if mask is None:
        mask = torch.ones(states.shape[1:3], dtype=torch.bool, device=states.device)
    if mask.shape != states.shape[1:3]:
        raise ValueError(f"mask must have shape {tuple(states.shape[1:3])}, got {tuple(mask.shape)}")
    flat = states[:, mask]  # (L + 1, N, d): the selected tokens only
    out = torch.full((num_layers, max_block), float("nan"))
    for n in range(1, max_block + 1):
        for start in range(num_layers - n + 1):
            out[start, n - 1] = angular_distance(flat[start], flat[start + n]).mean()
    return out


def best_block(distances: torch.Tensor, n: int) -> int:
    """The first layer of the ``n``-layer block with the smallest distance in ``distances``."""
    if not 1 <= n <= distances.shape[1]:
        raise ValueError(f"n must be in [1, {distances.shape[1]}], got {n}")
    column = distances[: distances.shape[0] - n + 1, n - 1]
    return int(torch.argmin(column))


def _set_layers(model: nn.Module, layers: list[nn.Module]) -> None:
    model.model.layers = nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)
    for idx, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = idx  # the KV cache is indexed by it


def remove_layers(model: nn.Module, start: int, n: int) -> nn.Module:
    """Delete layers ``start .. start + n - 1`` of ``model`` in place and return it.

    Fixes what the forward pass and the KV cache rely on: ``config.num_hidden_layers``, each
    remaining attention's ``layer_idx`` and, where present, ``config.layer_types``.
    """
    layers = decoder_layers(model)
    _check_block(len(layers), start, n)
    kept = [layer for i, layer in enumerate(layers) if not start <= i < start + n]
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types is not None and len(layer_types) == len(layers):
        model.config.layer_types = [t for i, t in enumerate(layer_types) if not start <= i < start + n]
    _set_layers(model, kept)
    return model


@contextmanager
def layers_removed(model: nn.Module, start: int, n: int) -> Iterator[nn.Module]:
    """Run ``model`` without layers ``start .. start + n - 1`` inside a ``with`` block; restore after.

    No weights are copied, so trying many cuts costs no memory.
    """
    layers = list(decoder_layers(model))
    config_layers = model.config.num_hidden_layers
    layer_types = getattr(model.config, "layer_types", None)
    remove_layers(model, start, n)
    try:
        yield model
    finally:
        _set_layers(model, layers)
        model.config.num_hidden_layers = config_layers
        if layer_types is not None:
            model.config.layer_types = layer_types


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood per position: ``(B, T, V), (B, T) -> (B, T - 1)`` in nats."""
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    log_probs = logits[:, :-1].float().log_softmax(dim=-1)
    return -log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Hinton et al.'s soft-target loss: ``T**2 * KL(p_teacher^T || p_student^T)``, mean over positions.

    Both tensors are ``(..., V)``; every leading position counts once. With ``T = 1`` this is the
    plain KL divergence from the teacher's next-token distribution to the student's.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"shapes differ: student {tuple(student_logits.shape)}, "
                         f"teacher {tuple(teacher_logits.shape)}")
    log_p_student = (student_logits.float() / temperature).log_softmax(dim=-1)
    log_p_teacher = (teacher_logits.float() / temperature).log_softmax(dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)
    return kl.mean() * temperature**2


def proxy_logits(base: torch.Tensor, expert: torch.Tensor, antiexpert: torch.Tensor,
                 alpha: float = 1.0) -> torch.Tensor:
    """Proxy-tuning (Liu et al. 2024): ``base + alpha * (expert - antiexpert)``, then softmax as usual."""
    if not base.shape == expert.shape == antiexpert.shape:
        raise ValueError(f"shapes differ: base {tuple(base.shape)}, expert {tuple(expert.shape)}, "
                         f"antiexpert {tuple(antiexpert.shape)}")
    return base + alpha * (expert - antiexpert)
