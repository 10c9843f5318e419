"""Direct preference optimisation on a CPU: response log-probabilities from a cached trunk, held-out
metrics of a policy against its reference, and TRL's DPO loss as a check (Part 3).

- :func:`cached_response_logprobs`: per-sequence $\\sum_t \\log\\pi(y_t \\mid x, y_{<t})$ from hidden
  states cached below the top ``n_top`` layers (:mod:`utils.finetune`), projecting to the vocabulary
  only at response positions. This is what every loss of :mod:`utils.preference` consumes.
- :func:`preference_metrics`: held-out accuracy of the implicit reward
  $\\beta(\\log\\pi - \\log\\pi^{ref})$, its mean margin, and the per-token log-ratio to the reference.
- :func:`trl_dpo_loss`: TRL's own ``DPOTrainer`` loss on given sequence log-probabilities, to check
  :func:`utils.preference.dpo_loss` (and IPO) against the library in a chapter.
- :func:`trl_kto_loss`: the same for TRL's ``KTOTrainer``, including its reference point $z$ estimated
  from a mismatched (KL) batch, to check :func:`utils.preference.kto_loss` in a chapter.
"""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch
from torch import nn

from utils.finetune import top_forward
from utils.preference import response_targets

__all__ = ["cached_response_logprobs", "preference_metrics", "trl_dpo_loss", "trl_kto_loss"]


def cached_response_logprobs(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                             n_top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps, lengths)`` of right-padded cached sequences: the top ``n_top`` layers, the final norm
    and the LM head, with the log-softmax taken only where a response token is predicted.

    ``hidden`` (batch, seq, d) holds the states entering layer $L - k$ and ``labels`` (batch, seq)
    marks response tokens (others $-100$), as :func:`utils.finetune.pad_cached` returns them.
    Equal to :func:`utils.preference.response_logprobs` on the full model.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"need hidden (batch, seq, d) and labels (batch, seq), got "
                         f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
    targets, keep, lengths = response_targets(labels)
    out = top_forward(model, hidden, n_top)[:, :-1]
    logits = model.lm_head(out[keep]).float()  # (response tokens, vocab)
    token_logps = logits.log_softmax(-1).gather(1, targets[keep][:, None]).squeeze(1)
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(keep)[keep]
    logps = torch.zeros(hidden.shape[0], dtype=token_logps.dtype, device=hidden.device)
    return logps.index_add(0, rows, token_logps), lengths


def preference_metrics(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                       ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                       chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
                       beta: float = 0.1) -> dict[str, float]:
    """Held-out metrics of a policy against its reference on preference pairs.

    - ``accuracy``: fraction of pairs whose implicit reward $r = \\beta(\\log\\pi - \\log\\pi^{ref})$ is
      strictly higher for the chosen response;
    - ``margin``: mean $r_c - r_r$;
    - ``logratio_per_token``: mean over all response tokens (chosen and rejected) of
      $\\log\\pi - \\log\\pi^{ref}$. On responses *sampled from* $\\pi$ this would estimate
      $\\mathrm{KL}(\\pi\\,\\|\\,\\pi^{ref})$ per token; on fixed data it measures how far the policy moved
      there, and can be negative;
    - ``logp_per_token_chosen`` / ``_rejected``: mean per-token log-probability under the policy.
    """
    tensors = dict(policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                   ref_rejected=ref_rejected, chosen_lengths=chosen_lengths,
                   rejected_lengths=rejected_lengths)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D tensor")
    if len({t.shape for t in tensors.values()}) > 1:
        raise ValueError(f"shapes differ: { {k: tuple(t.shape) for k, t in tensors.items()} }")
    if (chosen_lengths <= 0).any() or (rejected_lengths <= 0).any():
        raise ValueError("lengths must count >= 1 response token per sequence")
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
        raise ValueError(f"beta must be a number > 0, got {beta!r}")
    r_c = beta * (policy_chosen - ref_chosen)
    r_r = beta * (policy_rejected - ref_rejected)
    n_tokens = (chosen_lengths.sum() + rejected_lengths.sum()).float()
    log_ratio = (policy_chosen - ref_chosen).sum() + (policy_rejected - ref_rejected).sum()
    return {"accuracy": (r_c > r_r).float().mean().item(),
            "margin": (r_c - r_r).mean().item(),
            "logratio_per_token": (log_ratio / n_tokens).item(),
            "logp_per_token_chosen": (policy_chosen.sum() / chosen_lengths.sum()).item(),
            "logp_per_token_rejected": (policy_rejected.sum() / rejected_lengths.sum()).item()}


def trl_dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                 ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
                 chosen_lengths: torch.Tensor | None = None,
                 rejected_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The batch-mean loss of TRL's ``DPOTrainer._compute_loss`` for these sequence log-probabilities.

    TRL computes log-probabilities from a model; here its model call is replaced by per-token
    log-probabilities that sum to the given sequence values (spread evenly over ``*_lengths`` tokens,
    default 4), and its reference log-probabilities are passed as precomputed. ``loss_type`` is TRL's:
    ``"sigmoid"`` (DPO) or ``"ipo"`` (which uses the lengths). Requires ``trl``.
    """
    from trl import DPOTrainer

    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    n = policy_chosen.numel()
    if any(t.shape != (n,) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)) or n == 0:
        raise ValueError("need four non-empty 1-D tensors of one shape (one value per pair)")
    lengths = [torch.full((n,), 4) if x is None else torch.as_tensor(x).long()
               for x in (chosen_lengths, rejected_lengths)]
    lengths = torch.cat(lengths)
    if lengths.shape != (2 * n,) or (lengths < 1).any():
        raise ValueError("lengths must be 1-D, one per pair, each >= 1")
    T = int(lengths.max()) + 1
    mask = torch.zeros(2 * n, T, dtype=torch.long)
    for i, L in enumerate(lengths.tolist()):
        mask[i, T - L:] = 1
    seq = torch.cat([policy_chosen, policy_rejected])
    per_token = seq[:, None] * mask[:, 1:] / mask[:, 1:].sum(1, keepdim=True)
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * n, T - 1),
                              mean_logits=torch.zeros(2 * n, T - 1),
                              is_top1=torch.zeros(2 * n, T - 1, dtype=torch.bool))
    accelerator = SimpleNamespace(device=seq.device, gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
        beta=beta, label_smoothing=0.0, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1, loss_types=[loss_type], loss_weights=[1.0], ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", use_weighting=False)
    inputs = {"input_ids": torch.zeros(2 * n, T, dtype=torch.long), "attention_mask": torch.ones(2 * n, T),
              "completion_mask": mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False)


def trl_kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
                 kl_policy_logps: torch.Tensor, kl_ref_logps: torch.Tensor, beta: float = 0.1,
                 desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """The batch-mean loss of TRL's ``KTOTrainer._compute_loss`` for these sequence log-probabilities.

    ``policy_logps`` and ``ref_logps`` are the batch's (prompt, response) log-probabilities under the
    policy and the reference, ``desirable`` its bool labels. ``kl_policy_logps`` and ``kl_ref_logps`` are
    the log-probabilities of TRL's *mismatched* batch (response $i-1$ after prompt $i$); TRL's reference
    point is the clamped mean log-ratio over that batch,
    $z = \\max(0, \\overline{\\log\\pi - \\log\\pi^{ref}})$, not differentiated. TRL's model call is
    replaced by per-token log-probabilities that sum to ``policy_logps``, and the reference
    log-probabilities are passed as precomputed. Requires ``trl`` (in 1.16 the trainer lives in
    ``trl.trainer.kto_trainer``; ``trl.experimental.kto`` re-exports it with a deprecation warning).
    """
    from trl import KTOTrainer

    n = policy_logps.numel()
    tensors = (policy_logps, ref_logps, desirable, kl_policy_logps, kl_ref_logps)
    if n == 0 or any(t.shape != (n,) for t in tensors):
        raise ValueError("need five non-empty 1-D tensors of one shape (one value per example)")
    if desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be a bool tensor, got {desirable.dtype}")
    T = 5
    per_token = policy_logps[:, None].expand(n, T - 1) / (T - 1)
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(n, T - 1),
                              mean_logits=torch.zeros(n, T - 1))
    accelerator = SimpleNamespace(device=policy_logps.device, gather=lambda t: t,
                                  gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, beta=beta,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        loss_type="kto", precompute_ref_logps=True, calculate_KL=True, desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight, _compute_kl_logps=lambda model, batch: kl_policy_logps)
    inputs = {"input_ids": torch.zeros(n, T, dtype=torch.long), "attention_mask": torch.ones(n, T),
              "completion_mask": torch.ones(n, T, dtype=torch.long), "label": desirable,
              "ref_logps": ref_logps, "ref_KL_logps": kl_ref_logps}
    return KTOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False)
