"""GRPO and its variants from scratch (Part 7, "RL with verifiable rewards: GRPO from scratch").

PPO (:mod:`utils.ppo`) needs a value model to say how good a state is. GRPO (Shao et al. 2024,
DeepSeekMath) drops it: it samples a *group* of $G$ completions for each prompt, scores each with a
verifier (is the answer right?), and uses the group itself as the baseline. The pieces, in the order
the chapter builds them:

1. **A group and its rewards** (:func:`sample_group`): $G$ completions of one prompt from our Llama,
   the mask of their real tokens, and one reward per completion from a verifier function
   (:func:`sample_groups`: the groups of several prompts of one length in one batch).
2. **Advantages** (:func:`group_advantages`): each completion's reward against its group's,
   $A_i = (r_i - \\mathrm{mean}(r)) / (\\mathrm{std}(r) + \\varepsilon)$ (GRPO); without the division
   (Dr. GRPO, Liu et al. 2025); or against the mean of the *other* $G-1$ rewards (RLOO, Ahmadian et al.
   2024). Every token of completion $i$ gets $A_i$.
3. **The per-token loss** (:func:`clipped_surrogate`, :func:`k3_kl`): PPO's clipped surrogate with
   DAPO's separate upper clip, plus $\\beta$ times the k3 estimate of the KL to the reference policy
   (weighted by the policy ratio, as TRL does by default).
4. **One number** (:func:`aggregate_loss`): how the per-token losses are averaged is what the
   variants disagree about, ``loss_type`` names them as TRL does (``"grpo"``, ``"bnpo"``,
   ``"dr_grpo"``, ``"dapo"``).

:func:`grpo_loss` runs steps 3-4 and reports the KL and the share of clipped tokens. The tests check
the advantages and every loss type (with and without the KL term, with clipping active) against
``trl.GRPOTrainer`` (trl 1.16.0) on identical inputs. TRL's other loss types (``cispo``, ``sapo``,
``luspo``, ``vespo``), sequence-level ratios (GSPO) and two-sided clipping (``delta``) are not here.
Log-probabilities come from :func:`utils.ppo.response_logprobs`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from utils.checks import check_positive_int, check_positive_number
from utils.kvcache import generate

__all__ = [
    "LOSS_TYPES",
    "Group",
    "GRPOLoss",
    "sample_group",
    "sample_groups",
    "group_advantages",
    "k3_kl",
    "clipped_surrogate",
    "aggregate_loss",
    "grpo_loss",
]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # TRL's names for the four ways to average


# --- checks ----------------------------------------------------------------------------------------

def _check_2d(**tensors: torch.Tensor | None) -> None:
    """All given tensors (None is skipped) are non-empty (batch, T) tensors of one shape."""
    shapes = {}
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty (batch, T) tensor with one value per "
                             f"completion token, got shape {tuple(t.shape)}")
        shapes[name] = tuple(t.shape)
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes differ: {shapes}; pass one value per completion token in each")


def _check_epsilons(epsilon: float, epsilon_high: float | None) -> tuple[float, float]:
    low = check_positive_number("epsilon", epsilon)
    high = low if epsilon_high is None else check_positive_number("epsilon_high", epsilon_high)
    if low >= 1:
        raise ValueError(f"epsilon must be < 1 (the ratio is clipped below at 1 - epsilon), got {epsilon!r}")
    return low, high


# --- 1. a group of completions and their rewards -----------------------------------------------------

@dataclass
class Group:
    """``G`` sampled completions of one prompt.

    ``tokens`` is (G, n_prompt + T): prompt then completion; ``mask`` (G, T) is 1 on each completion's
    real tokens (up to and including its first end-of-sequence token, as in TRL) and 0 after;
    ``rewards`` (G,) is the verifier's score of each completion.
    """

    tokens: torch.Tensor
    n_prompt: int
    mask: torch.Tensor
    rewards: torch.Tensor

    @property
    def completions(self) -> torch.Tensor:
        """(G, T) completion ids (tokens after the mask's end are padding)."""
        return self.tokens[:, self.n_prompt:]


@torch.no_grad()
def sample_groups(model: nn.Module, prompts: Sequence[Sequence[int]], group_size: int,
                  max_new_tokens: int, verifier: Callable[[int, list[int]], float],
                  eos_token_id: int | None = None, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> Group:
    """Sample ``group_size`` completions of each of several prompts in one batch and score each.

    ``prompts`` must all have the same length (our :class:`utils.llama.Llama` and
    :func:`utils.kvcache.generate` have no padding mask); rows ``i * group_size`` to
    ``(i + 1) * group_size - 1`` of the result are prompt ``i``'s group, the layout
    :func:`group_advantages` expects. ``verifier(i, ids)`` gets the prompt's index and one
    completion's ids, cut after its first ``eos_token_id``, and returns its reward.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("need at least one prompt, each non-empty")
    lengths = {len(p) for p in prompts}
    if len(lengths) > 1:
        raise ValueError(f"prompts have lengths {sorted(lengths)}: give them one length (e.g. pad "
                         f"numbers with zeros), or call sample_group once per prompt")
    check_positive_int("group_size", group_size, minimum=2, hint="GRPO compares completions in a group")
    check_positive_number("temperature", temperature)
    device = next(model.parameters()).device
    n_prompt = lengths.pop()
    idx = torch.tensor([list(p) for p in prompts for _ in range(group_size)], device=device)
    was_training = model.training
    model.eval()
    tokens = generate(model, idx, max_new_tokens, eos_token_id=eos_token_id, temperature=temperature,
                      generator=generator)
    model.train(was_training)
    completions = tokens[:, n_prompt:]
    T = completions.shape[1]
    # first EOS position (T if none); mask_t = 1 for t <= that position
    if eos_token_id is None:
        is_eos = torch.zeros_like(completions, dtype=torch.bool)
    else:
        is_eos = completions == eos_token_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(completions[:, 0], T))
    mask = (torch.arange(T, device=device)[None, :] <= first_eos[:, None]).float()
    n_real = mask.sum(1).long().tolist()
    rewards = [float(verifier(row // group_size, ids[:n]))
               for row, (ids, n) in enumerate(zip(completions.tolist(), n_real))]
    return Group(tokens, n_prompt, mask, torch.tensor(rewards, device=device))


@torch.no_grad()
def sample_group(model: nn.Module, prompt_ids: list[int], group_size: int, max_new_tokens: int,
                 verifier: Callable[[list[int]], float], eos_token_id: int | None = None,
                 temperature: float = 1.0, generator: torch.Generator | None = None) -> Group:
    """Sample ``group_size`` completions of one prompt from a :class:`utils.llama.Llama` (one batch, KV
    cache of :func:`utils.kvcache.generate`) and score each with ``verifier``.

    ``verifier`` gets one completion's ids, cut after its first ``eos_token_id``, and returns its reward
    (e.g. 1.0 if the decoded answer is right, else 0.0). :func:`sample_groups` samples several
    prompts at once.
    """
    if not prompt_ids:
        raise ValueError("need a non-empty prompt")
    return sample_groups(model, [prompt_ids], group_size, max_new_tokens, lambda i, ids: verifier(ids),
                         eos_token_id, temperature, generator)


# --- 2. advantages ---------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, baseline: str = "mean", scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """One advantage per completion from its reward and its group's (no value model).

    ``rewards`` is 1-D, the ``group_size`` completions of each prompt next to each other (the layout of
    :func:`sample_group` and of TRL). With $r_{1..G}$ one group's rewards, $\\bar r$ their mean and
    $s$ their standard deviation (with Bessel's correction, divisor $G-1$, as TRL computes it):

    $$A_i = \\frac{r_i - b_i}{\\sigma + \\varepsilon}, \\qquad
    b_i = \\begin{cases} \\bar r & \\texttt{mean} \\text{ (GRPO, Dr. GRPO)} \\\\
    \\frac{1}{G-1}\\sum_{j \\ne i} r_j & \\texttt{leave\\_one\\_out} \\text{ (RLOO)} \\end{cases},
    \\qquad \\sigma = \\begin{cases} s & \\texttt{group} \\text{ (GRPO)} \\\\
    s \\text{ of the whole batch} & \\texttt{batch} \\\\
    \\text{no division} & \\texttt{none} \\text{ (Dr. GRPO, RLOO)} \\end{cases}$$

    ``eps`` = 1e-4 is TRL's. A group whose rewards are all equal gets advantage 0 (nothing to learn
    from it). The leave-one-out advantage is the mean one times $G/(G-1)$:
    $r_i - \\frac{G\\bar r - r_i}{G-1} = \\frac{G}{G-1}(r_i - \\bar r)$.
    """
    G = check_positive_int("group_size", group_size, minimum=2, hint="GRPO compares completions in a group")
    if baseline not in ("mean", "leave_one_out"):
        raise ValueError(f"baseline must be 'mean' (GRPO) or 'leave_one_out' (RLOO), got {baseline!r}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group' (GRPO), 'batch' or 'none' (Dr. GRPO), got {scale!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError("rewards must be a non-empty 1-D tensor, one reward per completion")
    if rewards.numel() % G:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {G}: pass the "
                         f"group_size completions of each prompt next to each other")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite: score unscorable completions (e.g. 0) before this")
    r = rewards.float() if not rewards.is_floating_point() else rewards
    grouped = r.reshape(-1, G)                                            # (prompts, G)
    if baseline == "mean":
        b = grouped.mean(1, keepdim=True).expand_as(grouped)              # b_i = mean_j r_j
    else:
        b = (grouped.sum(1, keepdim=True) - grouped) / (G - 1)            # b_i = sum_{j != i} r_j / (G-1)
    advantages = (grouped - b).reshape(-1)                                # r_i - b_i
    if scale == "group":
        sigma = grouped.std(1).repeat_interleave(G)                       # s of each group, divisor G-1
        advantages = advantages / (sigma + eps)
    elif scale == "batch":
        advantages = advantages / (r.std() + eps)                         # one s over every reward
    return advantages


# --- 3. the per-token loss -------------------------------------------------------------------------

def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate (Schulman 2020) of $\\mathrm{KL}(\\pi_\\theta \\| \\pi_{ref})$, as GRPO uses:

    $$k_3 = \\frac{\\pi_{ref}}{\\pi_\\theta} - \\log\\frac{\\pi_{ref}}{\\pi_\\theta} - 1
    = e^{\\,\\log\\pi_{ref} - \\log\\pi_\\theta} - (\\log\\pi_{ref} - \\log\\pi_\\theta) - 1 \\ \\ge 0,$$

    unbiased for tokens sampled from $\\pi_\\theta$, never negative (unlike $\\log\\pi_\\theta -
    \\log\\pi_{ref}$, the estimate :func:`utils.ppo.kl_rewards` uses), 0 where the policies agree.
    """
    _check_2d(logprobs=logprobs, ref_logprobs=ref_logprobs)
    d = ref_logprobs - logprobs                                           # log(pi_ref / pi_theta)
    return torch.exp(d) - d - 1


def _per_token_advantages(advantages: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """(batch,) or (batch, T) advantages as something that broadcasts against (batch, T)."""
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if advantages.dim() == 1 and advantages.shape[0] == logprobs.shape[0]:
        return advantages[:, None]                                        # A_i for every token t
    if advantages.shape == logprobs.shape:
        return advantages
    raise ValueError(f"advantages must be (batch,) = ({logprobs.shape[0]},), one per completion, or "
                     f"{tuple(logprobs.shape)}, one per token; got {tuple(advantages.shape)}")


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      epsilon: float = 0.2, epsilon_high: float | None = None) -> torch.Tensor:
    """(batch, T) per-token clipped surrogate, to minimise (padding not yet masked):

    $$\\ell_{i,t} = -\\min\\big(\\rho_{i,t} A_i,\\ \\mathrm{clip}(\\rho_{i,t}, 1-\\epsilon,
    1+\\epsilon_{high}) A_i\\big), \\qquad \\rho_{i,t} = \\exp(\\log\\pi_\\theta - \\log\\pi_{old}),$$

    PPO's objective (:func:`utils.ppo.clipped_policy_loss`) per token, with DAPO's "clip-higher":
    ``epsilon_high`` (default ``epsilon``) may be larger, so that unlikely tokens with a positive
    advantage can grow further. ``advantages`` is (batch,) (one per completion) or (batch, T).
    """
    _check_2d(logprobs=logprobs, old_logprobs=old_logprobs)
    low, high = _check_epsilons(epsilon, epsilon_high)
    A = _per_token_advantages(advantages, logprobs)
    ratio = torch.exp(logprobs - old_logprobs)                            # rho = pi_theta / pi_old
    clipped = ratio.clamp(1 - low, 1 + high)                              # clip(rho, 1-eps, 1+eps_high)
    return -torch.minimum(ratio * A, clipped * A)                         # -min(rho A, clip(rho) A)


# --- 4. one number ---------------------------------------------------------------------------------

def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str = "dapo",
                   max_completion_length: int | None = None,
                   num_tokens: int | float | torch.Tensor | None = None) -> torch.Tensor:
    """Average the per-token losses $\\ell_{i,t}$ of $B$ completions of lengths $|o_i|$ (``mask``'s
    row sums) into one loss, the way TRL's ``loss_type`` does:

    - ``"grpo"`` (the paper): each completion's mean, then the batch mean,
      $\\frac{1}{B}\\sum_i \\frac{1}{|o_i|}\\sum_t \\ell_{i,t}$. A token of a long completion weighs less
      than one of a short completion: long wrong answers are punished less per token.
    - ``"bnpo"``: every token of this batch alike, $\\sum_{i,t} \\ell_{i,t} / \\sum_i |o_i|$.
    - ``"dapo"`` (TRL's default): the same, divided by ``num_tokens``, the number of completion
      tokens in the *whole* batch when it is split into micro-batches for gradient accumulation
      (default: this batch's, which makes it ``"bnpo"``), so that every token of the batch weighs alike.
    - ``"dr_grpo"``: a constant divisor, $\\sum_{i,t} \\ell_{i,t} / (B \\cdot L_{max})$ with
      $L_{max}$ = ``max_completion_length``, the generation limit (default: ``mask``'s width).

    A completion with no real token contributes 0 (and still counts in ``"grpo"``'s $B$), as in TRL.
    Unlike TRL this does not divide by the number of gradient-accumulation steps: that belongs to the
    training loop.
    """
    _check_2d(per_token_loss=per_token_loss, mask=mask)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES} (TRL's names), got {loss_type!r}")
    mask = mask.to(per_token_loss.dtype)
    total = (per_token_loss * mask).sum()                                 # sum_{i,t} l_{i,t}
    if loss_type == "grpo":
        lengths = mask.sum(1).clamp(min=1)                                # |o_i|
        return ((per_token_loss * mask).sum(1) / lengths).mean()          # 1/B sum_i 1/|o_i| sum_t l
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1)                            # / sum_i |o_i|
    if loss_type == "dr_grpo":
        T = mask.shape[1]
        L = T if max_completion_length is None else check_positive_int(
            "max_completion_length", max_completion_length, hint="the generation limit")
        if L < T:
            raise ValueError(f"completions are {T} tokens wide but max_completion_length is {L}: pass "
                             f"the generation limit they were sampled with")
        return total / (mask.shape[0] * L)                                # / (B * L_max)
    here = mask.sum()
    n = here if num_tokens is None else torch.as_tensor(num_tokens, dtype=mask.dtype, device=mask.device)
    if n < here:
        raise ValueError(f"num_tokens ({float(n):g}) counts the completion tokens of the whole batch, so "
                         f"at least this micro-batch's {float(here):g}")
    return total / n.clamp(min=1)                                         # / tokens in the whole batch


@dataclass
class GRPOLoss:
    """:func:`grpo_loss`'s result: the ``loss`` to minimise, and two detached diagnostics, means over
    the real tokens (TRL logs both): ``kl``, the KL estimate $w\\,k_3$ of the loss (None without
    reference log-probabilities), and ``clip_fraction``, the share of tokens whose gradient the clip
    removed."""

    loss: torch.Tensor
    kl: torch.Tensor | None
    clip_fraction: torch.Tensor


def grpo_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              old_logprobs: torch.Tensor | None = None, ref_logprobs: torch.Tensor | None = None,
              beta: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None,
              loss_type: str = "dapo", max_completion_length: int | None = None,
              num_tokens: int | float | torch.Tensor | None = None,
              use_bias_correction_kl: bool = True) -> GRPOLoss:
    """The GRPO loss of a batch of completions: per token

    $$\\ell_{i,t} = -\\min\\big(\\rho_{i,t} A_i,\\ \\mathrm{clip}(\\rho_{i,t}, 1-\\epsilon,
    1+\\epsilon_{high}) A_i\\big) + \\beta\\, w_{i,t}\\, k_3(\\pi_\\theta, \\pi_{ref})_{i,t}, \\qquad
    w_{i,t} = \\begin{cases} \\rho_{i,t} & \\texttt{use\\_bias\\_correction\\_kl} \\text{ (TRL)} \\\\
    1 & \\text{otherwise (the GRPO paper)} \\end{cases}$$

    (:func:`clipped_surrogate`, :func:`k3_kl`), averaged over the real tokens as ``loss_type`` says
    (:func:`aggregate_loss`, which also explains ``max_completion_length`` and ``num_tokens``).
    The tokens were sampled from $\\pi_{old}$, not $\\pi_\\theta$, so the k3 average estimates the KL
    with a bias once the policy has moved; weighing each token by $\\rho$ (DeepSeek-V3.2, TRL's
    ``use_bias_correction_kl=True``, the default in trl 1.16) removes it. $\\rho$ keeps its gradient,
    so the KL gradient changes even on the first update, where $\\rho = 1$.

    ``logprobs`` (batch, T) are the policy's, with gradients; ``old_logprobs`` those of the policy that
    sampled the completions (default: ``logprobs`` detached, i.e. one update per batch, so $\\rho = 1$
    but its gradient is not 0); ``ref_logprobs`` the frozen reference's, needed when ``beta`` > 0.
    ``advantages`` is (batch,) (e.g. from :func:`group_advantages`) or (batch, T). The defaults are
    trl 1.16's (``GRPOConfig``); ``loss_type="grpo"``, ``use_bias_correction_kl=False`` is the paper.
    """
    _check_2d(logprobs=logprobs, mask=mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0 or math.isinf(beta):
        raise ValueError(f"beta must be a number >= 0 (0: no KL term), got {beta!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} weighs a KL to the reference policy: pass ref_logprobs "
                         f"(or beta=0)")
    low, high = _check_epsilons(epsilon, epsilon_high)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    per_token = clipped_surrogate(logprobs, old, advantages, low, high)
    kl = None if ref_logprobs is None else k3_kl(logprobs, ref_logprobs)
    if kl is not None and use_bias_correction_kl:
        kl = kl * torch.exp(logprobs - old)                               # w = rho, with its gradient
    if beta > 0:
        per_token = per_token + beta * kl                                 # + beta * w * k3
    loss = aggregate_loss(per_token, mask, loss_type, max_completion_length, num_tokens)
    with torch.no_grad():
        m = mask.to(logprobs.dtype)
        n = m.sum().clamp(min=1)
        A = _per_token_advantages(advantages, logprobs)
        ratio = torch.exp(logprobs - old)
        # the clip removes the gradient where rho < 1-eps and A < 0, or rho > 1+eps_high and A > 0
        clipped = ((ratio < 1 - low) & (A < 0)) | ((ratio > 1 + high) & (A > 0))
        clip_fraction = (clipped.to(m.dtype) * m).sum() / n
        kl_mean = None if kl is None else (kl * m).sum() / n
    return GRPOLoss(loss, kl_mean, clip_fraction)
