"""RLHF with PPO, written from scratch (Part 3, "RLHF with PPO, from scratch").

One PPO iteration for a language model, in the pieces the chapter builds one by one:

1. **Rollouts** (:func:`sample_responses`): sample ``n`` responses to one prompt with the KV cache.
2. **Scores and log-probabilities** (:func:`response_logprobs`, :func:`response_values`): the policy's,
   the frozen reference's, and the value model's numbers for every response token.
3. **Rewards** (:func:`kl_rewards`): a per-token KL penalty $-\\beta(\\log\\pi - \\log\\pi^{ref})$ at
   every token, plus the reward model's score at the last one.
4. **Advantages** (:func:`gae`): generalised advantage estimation,
   $\\hat A_t = \\sum_l (\\gamma\\lambda)^l \\delta_{t+l}$, $\\delta_t = r_t + \\gamma V_{t+1} - V_t$.
5. **Losses** (:func:`clipped_policy_loss`, :func:`clipped_value_loss`) and several epochs of
   minibatch updates on the same rollouts (:func:`ppo_update`).

:func:`make_rollout` runs steps 1-4 (:func:`rollout_from_samples` steps 2-4, for responses
sampled elsewhere, e.g. several prompts at once, cut at an end-of-sequence token); :func:`ppo_update`
step 5. Models are callables from token ids (batch, n) to (batch, n, k) outputs: logits for the
policy and the reference (e.g. :class:`utils.llama.Llama`), one value per position (k = 1) for the
value model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from utils.checks import check_positive_int, check_positive_number
from utils.kvcache import generate


@dataclass
class PPOConfig:
    """Hyper-parameters of one PPO run (defaults are common choices for language models)."""

    beta: float = 0.1  # weight of the per-token KL penalty against the reference
    gamma: float = 1.0  # discount (1: the score at the end counts fully for every token)
    lam: float = 0.95  # GAE lambda: 0 = one-step TD, 1 = Monte Carlo
    clip: float = 0.2  # policy ratio clip range epsilon
    value_clip: float = 0.2  # how far a value prediction may move from the rollout's
    vf_coef: float = 0.5  # weight of the value loss
    epochs: int = 4  # passes over each batch of rollouts
    minibatches: int = 4  # minibatches per pass
    max_grad_norm: float = 1.0
    temperature: float = 1.0  # sampling temperature of the rollouts

    def __post_init__(self) -> None:
        for name in ("beta", "clip", "value_clip", "temperature", "max_grad_norm"):
            check_positive_number(name, getattr(self, name))
        if self.vf_coef < 0:
            raise ValueError(f"vf_coef must be >= 0, got {self.vf_coef!r}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("epochs", "minibatches"):
            check_positive_int(name, getattr(self, name))


@dataclass
class Rollout:
    """A batch of sampled responses and everything PPO computes from them before updating.

    ``tokens`` is (batch, n_prompt + T); every other field is (batch, T), one value per response
    token, except ``scores`` (batch,), the reward model's score of each whole response.
    """

    tokens: torch.Tensor
    n_prompt: int
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    @property
    def kl(self) -> torch.Tensor:
        """(batch,) summed per-token estimate $\\sum_t \\log\\pi(y_t) - \\log\\pi^{ref}(y_t)$."""
        return ((self.logprobs - self.ref_logprobs) * self.mask).sum(1)


# --- checks ----------------------------------------------------------------------------------------

def _check_2d(**tensors: torch.Tensor) -> None:
    """All (batch, T), non-empty and of one shape."""
    shapes = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty (batch, T) tensor, got shape {tuple(t.shape)}")
        shapes[name] = tuple(t.shape)
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes differ: {shapes}; pass one value per response token in each")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1."""
    _check_2d(x=x, mask=mask)
    mask = mask.to(x.dtype)
    if mask.sum() == 0:
        raise ValueError("mask selects no position: nothing to average")
    return (x * mask).sum() / mask.sum()


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``x`` shifted and scaled to mean 0, standard deviation 1 over the masked positions."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


# --- rollouts --------------------------------------------------------------------------------------

def sample_responses(model: nn.Module, prompt_ids: list[int], n: int, max_new_tokens: int,
                     temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, len(prompt) + max_new_tokens) ids: ``n`` sampled continuations of one prompt, in one batch
    with the KV cache of :func:`utils.kvcache.generate`."""
    if not prompt_ids:
        raise ValueError("need a non-empty prompt")
    check_positive_int("n", n, hint="the number of rollouts")
    check_positive_number("temperature", temperature)
    device = next(model.parameters()).device
    idx = torch.tensor([list(prompt_ids)] * n, device=device)
    was_training = model.training
    model.eval()
    out = generate(model, idx, max_new_tokens, temperature=temperature, generator=generator)
    model.train(was_training)
    return out


def response_logprobs(model: Callable, tokens: torch.Tensor, n_prompt: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """(batch, T): $\\log\\pi(y_t \\mid x, y_{<t})$ of each response token (position $t$'s logits
    predict token $t+1$), with the logits divided by the sampling ``temperature``."""
    if tokens.dim() != 2 or not 1 <= n_prompt < tokens.shape[1]:
        raise ValueError(f"need (batch, n) tokens with 1 <= n_prompt < n, got shape "
                         f"{tuple(tokens.shape)} and n_prompt={n_prompt}")
    logits = model(tokens)[:, n_prompt - 1:-1].float() / temperature
    return torch.gather(logits.log_softmax(-1), 2, tokens[:, n_prompt:, None]).squeeze(-1)


def response_values(value_model: Callable, tokens: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """(batch, T): the value model's $V(s_t)$ for the state before each response token."""
    if tokens.dim() != 2 or not 1 <= n_prompt < tokens.shape[1]:
        raise ValueError(f"need (batch, n) tokens with 1 <= n_prompt < n, got shape "
                         f"{tuple(tokens.shape)} and n_prompt={n_prompt}")
    return value_model(tokens)[:, n_prompt - 1:-1, 0].float()


# --- rewards and advantages ------------------------------------------------------------------------

def _check_prefix_mask(mask: torch.Tensor) -> None:
    # The last real token of a row is at mask.sum() - 1 only if the mask is 1s then 0s.
    if not ((mask == 0) | (mask == 1)).all() or (mask[:, 1:] > mask[:, :-1]).any():
        raise ValueError("mask must be 1 on a prefix of each response and 0 after it (padding "
                         "only at the end)")


def kl_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
               mask: torch.Tensor, beta: float) -> torch.Tensor:
    """(batch, T) per-token rewards $r_t = -\\beta(\\log\\pi(y_t) - \\log\\pi^{ref}(y_t))$, plus the
    reward model's ``scores`` (batch,) at each response's last real token (as in InstructGPT).
    ``mask`` must be 1 on a prefix of each row and 0 after it (right padding)."""
    check_positive_number("beta", beta)
    _check_2d(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"need one score per response: {logprobs.shape[0]} responses, "
                         f"scores of shape {tuple(scores.shape)}")
    _check_prefix_mask(mask)
    lengths = mask.sum(1).long()
    if (lengths == 0).any():
        raise ValueError("every response needs at least one real token (a row of mask is all 0)")
    rewards = -beta * (logprobs - ref_logprobs) * mask
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, lengths - 1] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation: ``(advantages, returns)``, each (batch, T).

    $$\\delta_t = r_t + \\gamma V_{t+1} - V_t, \\qquad \\hat A_t = \\delta_t + \\gamma\\lambda \\hat A_{t+1}
    = \\sum_{l \\ge 0} (\\gamma\\lambda)^l \\delta_{t+l}, \\qquad \\hat R_t = \\hat A_t + V_t,$$

    computed backwards; the value after a response's last real token is 0 (the episode ends) and
    masked positions (right padding) get advantage 0.
    """
    _check_2d(rewards=rewards, values=values, mask=mask)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got {gamma!r}, {lam!r}")
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        advantages[:, t] = next_adv
    return advantages, (advantages + values) * mask


# --- losses ----------------------------------------------------------------------------------------

def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, to minimise: ``(loss, clip_fraction)``.

    $$L = -\\,\\mathbb{E}_t\\big[\\min(\\rho_t \\hat A_t,\\ \\mathrm{clip}(\\rho_t, 1-\\epsilon, 1+\\epsilon)
    \\hat A_t)\\big], \\qquad \\rho_t = \\exp(\\log\\pi_\\theta(y_t) - \\log\\pi_{old}(y_t)),$$

    averaged over the masked tokens; ``clip_fraction`` is the share of tokens where the clip was active.
    """
    check_positive_number("clip", clip)
    _check_2d(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped < unclipped).float(), mask)
    return loss, clip_fraction.detach()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float = 0.2) -> torch.Tensor:
    """$\\tfrac12\\,\\mathbb{E}_t \\max\\big((V - \\hat R)^2,\\ (V_{old} + \\mathrm{clip}(V - V_{old},
    -\\epsilon, \\epsilon) - \\hat R)^2\\big)$ over the masked tokens."""
    check_positive_number("clip", clip)
    _check_2d(values=values, old_values=old_values, returns=returns, mask=mask)
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


# --- one PPO iteration -----------------------------------------------------------------------------

@torch.no_grad()
def rollout_from_samples(policy: nn.Module, ref: Callable, value_model: Callable,
                         tokens: torch.Tensor, n_prompt: int, scores: torch.Tensor, cfg: PPOConfig,
                         mask: torch.Tensor | None = None) -> Rollout:
    """Steps 2-4 for responses sampled elsewhere: log-probabilities, values, KL-penalised rewards,
    GAE advantages (whitened) and returns.

    ``tokens`` (batch, n_prompt + T) may hold several prompts of one length (e.g. the groups of
    :func:`utils.grpo.sample_groups`); ``scores`` (batch,) is each response's reward; ``mask``
    (batch, T) marks each response's real tokens, a prefix of every row (1 up to and including its
    end-of-sequence token, 0 on the padding after it; default: every token is real). The score lands
    on the last real token and padding gets no reward, advantage or return.
    """
    if tokens.dim() != 2 or not 1 <= n_prompt < tokens.shape[1]:
        raise ValueError(f"need (batch, n) tokens with 1 <= n_prompt < n, got shape "
                         f"{tuple(tokens.shape)} and n_prompt={n_prompt}")
    shape = (tokens.shape[0], tokens.shape[1] - n_prompt)
    if mask is None:
        mask = torch.ones(shape, device=tokens.device)
    mask = mask.float()
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask must be (batch, T) = {shape}, one entry per response token, got "
                         f"{tuple(mask.shape)}")
    _check_prefix_mask(mask)
    was = [(m, m.training) for m in (policy, value_model) if isinstance(m, nn.Module)]
    for m, _ in was:
        m.eval()
    logprobs = response_logprobs(policy, tokens, n_prompt, cfg.temperature)
    ref_logprobs = response_logprobs(ref, tokens, n_prompt, cfg.temperature)
    values = response_values(value_model, tokens, n_prompt)
    for m, training in was:
        m.train(training)
    scores = scores.float()
    rewards = kl_rewards(scores, logprobs, ref_logprobs, mask, cfg.beta)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    return Rollout(tokens, n_prompt, mask, logprobs, ref_logprobs, values, scores, rewards,
                   whiten(advantages, mask), returns)


@torch.no_grad()
def make_rollout(policy: nn.Module, ref: Callable, value_model: Callable,
                 reward_fn: Callable[[torch.Tensor], torch.Tensor], prompt_ids: list[int], n: int,
                 max_new_tokens: int, cfg: PPOConfig,
                 generator: torch.Generator | None = None) -> Rollout:
    """Sample ``n`` responses, score them with ``reward_fn`` (response ids (n, T) -> (n,)), and compute
    log-probabilities, values, KL-penalised rewards and GAE advantages (whitened) and returns
    (:func:`rollout_from_samples`, every sampled token counted as real)."""
    tokens = sample_responses(policy, prompt_ids, n, max_new_tokens, cfg.temperature, generator)
    n_prompt = len(prompt_ids)
    scores = reward_fn(tokens[:, n_prompt:])
    return rollout_from_samples(policy, ref, value_model, tokens, n_prompt, scores, cfg)


def ppo_update(policy: nn.Module, value_model: nn.Module, optimizer: torch.optim.Optimizer,
               rollout: Rollout, cfg: PPOConfig,
               generator: torch.Generator | None = None) -> dict[str, float]:
    """``cfg.epochs`` passes over the rollout in ``cfg.minibatches`` shuffled minibatches, each one
    AdamW step on policy loss + ``vf_coef`` * value loss. Returns the last pass's mean losses and clip
    fraction. ``optimizer`` must hold the parameters of both models."""
    batch = rollout.tokens.shape[0]
    if batch < cfg.minibatches:
        raise ValueError(f"{batch} rollouts cannot fill {cfg.minibatches} minibatches")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clip_fraction": []}
    policy.train()
    value_model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(batch, generator=generator)
        stats = {k: [] for k in stats}
        for idx in order.chunk(cfg.minibatches):
            tokens, n_prompt, mask = rollout.tokens[idx], rollout.n_prompt, rollout.mask[idx]
            logprobs = response_logprobs(policy, tokens, n_prompt, cfg.temperature)
            values = response_values(value_model, tokens, n_prompt)
            pg_loss, clip_fraction = clipped_policy_loss(logprobs, rollout.logprobs[idx],
                                                         rollout.advantages[idx], mask, cfg.clip)
            vf_loss = clipped_value_loss(values, rollout.values[idx], rollout.returns[idx], mask,
                                         cfg.value_clip)
            optimizer.zero_grad(set_to_none=True)
            (pg_loss + cfg.vf_coef * vf_loss).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            stats["policy_loss"].append(pg_loss.item())
            stats["value_loss"].append(vf_loss.item())
            stats["clip_fraction"].append(clip_fraction.item())
    return {k: sum(v) / len(v) for k, v in stats.items()}


def value_head_model(model: nn.Module) -> nn.Module:
    """A value model from a copy of a :class:`utils.llama.Llama`: the vocabulary head is replaced by
    a zero-initialised (d_model -> 1) linear layer, so it outputs (batch, n, 1) values (0 at first)."""
    if not hasattr(model, "lm_head") or not hasattr(model, "cfg"):
        raise TypeError("value_head_model needs a utils.llama.Llama (with .lm_head and .cfg)")
    value = copy.deepcopy(model)
    value.lm_head = nn.Linear(model.cfg.d_model, 1)
    nn.init.zeros_(value.lm_head.weight)
    nn.init.zeros_(value.lm_head.bias)
    return value


def sft_loss(model: Callable, tokens: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens only (for best-of-N fine-tuning)."""
    return -response_logprobs(model, tokens, n_prompt).mean()


__all__ = ["PPOConfig", "Rollout", "masked_mean", "whiten", "sample_responses", "response_logprobs",
           "response_values", "kl_rewards", "gae", "clipped_policy_loss", "clipped_value_loss",
           "rollout_from_samples", "make_rollout", "ppo_update", "value_head_model", "sft_loss"]
