"""The tensor math of RLHF: tensors and floats in, tensors out; no config objects, no I/O.

Shapes: B sequences, T response tokens. `mask` is 1 on response tokens up to and including the
first EOS and 0 after it (and on padding).

References
    [Z19]  Ziegler et al. 2019, Fine-Tuning Language Models from Human Preferences
           (openai/lm-human-preferences).
    [S17]  Schulman et al. 2017, Proximal Policy Optimization Algorithms.
    [S16]  Schulman et al. 2016, High-Dimensional Continuous Control Using GAE.
    [O22]  Ouyang et al. 2022, Training language models to follow instructions (InstructGPT).
    [H24]  Huang et al. 2024, The N+ Implementation Details of RLHF with PPO.
    [Sch20] Schulman 2020, Approximating KL Divergence (the k1 and k3 estimators).
    [Sh24]  Shao et al. 2024, DeepSeekMath (GRPO: group-normalised advantages, k3 KL in the loss).
    [L25]   Liu et al. 2025, Understanding R1-Zero-Like Training (Dr. GRPO: no std division).
    [A24]   Ahmadian et al. 2024, Back to Basics: REINFORCE-style optimisation (RLOO).
    [Hu25]  Hu et al. 2025, REINFORCE++ (batch-normalised returns, token-level KL).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1 (over all of them, or along `dim`)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    center: bool = True,
    eps: float = 1e-8,
    mean: torch.Tensor | None = None,
    var: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scale `x` to unit variance over the mask; subtract its mean too when `center` [Z19 whiten].

    `center=False` keeps the mean of `x` (used for rewards: checklist item 13). `mean` and `var`,
    when given, are moments of a larger batch this one is a shard of (all data-parallel ranks).
    """
    mean = masked_mean(x, mask) if mean is None else mean
    var = masked_var(x, mask) if var is None else var
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if center else whitened + mean


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) log-probabilities of `tokens` (B, T) under `logits` (B, T, V) / temperature.

    Dividing by the sampling temperature here, for policy and reference alike, keeps the
    log-probs of training equal to those of sampling (checklist item 10).
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.gather(logits.log_softmax(-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of `tokens`, entropy), both (B, T), from one log-softmax of `logits` (B, T, V) /
    temperature: the log-probs `logprobs_from_logits` gives and the entropy, the logits scaled and
    normalised once. With `entropy_grad` False the entropy carries no gradient (it is logged only)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = logits.log_softmax(-1)
    logprobs = torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)
    if not entropy_grad:
        logp = logp.detach()
    return logprobs, -(logp.exp() * logp).sum(-1)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """(B, T) per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi [Sch20].

    k1 = log pi - log pi_ref (unbiased, can be negative per token);
    k3 = (r - 1) - log r with r = pi_ref / pi (unbiased, never negative, lower variance).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last 1 in each row of a (B, T) mask that is 1 on a prefix."""
    return (mask.sum(-1).long() - 1).clamp(min=0)


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards -beta * KL_t, plus the sequence score on its last token [Z19, H24].

    scores (B,), logprobs/ref_logprobs/mask (B, T). Returns (rewards, kl), both (B, T) and 0
    where `mask` is 0.
    """
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * mask
    rewards = -beta * kl
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards * mask, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation [S16], as in [Z19]; returns (advantages, returns), (B, T).

    values[:, t] is V(s_t), the value of the state before response token t. The state after
    the last masked token is terminal: its value is 0, whatever sits in `values` there.

        for t in reversed(range(T)):
            delta = r[t] + gamma * V[t+1] - V[t]          (V[T] = 0)
            A[t] = delta + gamma * lam * A[t+1]
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    num_tokens: float | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective [S17], as a loss to minimise, averaged over masked tokens.

    `num_tokens` is the count the mean divides by (default: the mask's own). Passing the token
    count of a whole minibatch makes the losses of its shards (micro-batches, processes) sum to
    the loss of the minibatch. `weights` (B, T), where given, scale each token's term: the
    truncated importance weights of samples drawn by another engine (`rollout.importance_weights`).
    Returns (loss, stats) with stats: clipfrac (share of tokens whose ratio was clipped) and
    approx_kl (the k3 estimate of KL(old || new) [Sch20]).
    """
    n = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    loss = masked_sum(per_token if weights is None else per_token * weights, mask) / n
    with torch.no_grad():
        stats = {
            "clipfrac": masked_sum((clipped > unclipped).float(), mask) / n,
            "approx_kl": masked_sum(ratio - 1 - log_ratio, mask) / n,
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2) [Z19, H24], averaged over masked tokens.

    V_clip = V_old + clip(V - V_old, -clip, clip); `num_tokens` as in `policy_loss`.
    """
    n = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_sum(torch.maximum(unclipped_loss, clipped_loss), mask) / n
    with torch.no_grad():
        stats = {"value_clipfrac": masked_sum((clipped_loss > unclipped_loss).float(), mask) / n}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over masked tokens: 1 is a perfect value function, <= 0 is none."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


def moments(x: torch.Tensor, mask: torch.Tensor, reduce=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of `x` over the mask. `reduce` sums a tensor over every
    data-parallel process (identity when None), so the moments are those of the whole batch."""
    totals = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()])
    total, squares, n = totals if reduce is None else reduce(totals)
    mean = total / n
    return mean, (squares / n - mean**2) * n / (n - 1).clamp(min=1)


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage [Sh24]: each score minus its group's mean, divided by the group's std when
    `scale` (Dr. GRPO [L25] keeps the difference unscaled). scores (B,), prompt-major: rows
    k*K .. k*K+K-1 answer prompt k. Returns (B,), one advantage per sequence.

        for each group g:  A_i = (r_i - mean(g)) / (std(g) + eps)      (std unbiased, as TRL's)
    """
    groups = scores.view(-1, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantage [A24]: each score minus the mean of the other K-1 scores of its group.
    scores (B,), prompt-major as in `group_advantages`; returns (B,).

        A_i = r_i - (sum(g) - r_i) / (K - 1)
    """
    groups = scores.view(-1, group_size)
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """(B, T) discounted sums of the rewards from each token to the end of its response: the
    REINFORCE return of every token [Hu25], 0 where `mask` is 0.

        G[t] = r[t] + gamma * G[t+1]      (G[T] = 0)
    """
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def kl_loss(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, num_tokens: float | torch.Tensor | None = None
) -> torch.Tensor:
    """The KL to the reference as a loss term [Sh24]: the k3 estimate per token [Sch20], averaged
    over masked tokens (`num_tokens` as in `policy_loss`). Its gradient pulls the policy back
    towards the reference; GRPO adds it times beta instead of putting the KL in the reward."""
    n = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    return masked_sum(kl_penalty(logprobs, ref_logprobs, "k3"), mask) / n


def ranking_pairs(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expand rankings into all their pairs [O22]: (better, worse, group), each (P,).

    `sizes` are the lengths K of rankings whose completions, best first, are concatenated in
    one flat batch; a ranking of K gives K(K-1)/2 (better, worse) index pairs into that batch,
    and `group` says which ranking each pair came from. A pairwise preference is a ranking of 2.
    """
    better, worse, group, offset = [], [], [], 0
    for g, k in enumerate(sizes):
        for i in range(k):
            for j in range(i + 1, k):
                better.append(offset + i)
                worse.append(offset + j)
                group.append(g)
        offset += k
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return as_tensor(better), as_tensor(worse), as_tensor(group)


def pairwise_loss(
    better: torch.Tensor, worse: torch.Tensor, margin: torch.Tensor | None = None, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """-log sigmoid(r_better - r_worse - margin), averaged with `weight` (defaults to a plain mean).

    better, worse, margin, weight: (P,) one entry per pair. A ranking of K gives K(K-1)/2 pairs;
    weighting each of them 1 / (pairs in its ranking * rankings in the batch) makes every ranking
    count once, as in [O22].
    """
    diff = better - worse
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    return losses.mean() if weight is None else (losses * weight).sum()


class FixedKLController:
    """beta stays where it was set."""

    def __init__(self, beta: float):
        self.beta = beta

    def update(self, kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Adaptive beta of [Z19] (section 2.2): beta moves to keep the KL near `target`.

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon)
    """

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon


# --- DPO ---
#   [R23]  Rafailov et al. 2023, Direct Preference Optimization.
#   [A23]  Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human
#          Preferences (IPO).
#   [M24]  Meng et al. 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward.


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    variant: str = "sigmoid",
    gamma: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses of direct preference optimisation and the implicit rewards, each (P,).

    Inputs (P,): log pi(y|x) of the chosen and rejected completions under the policy, summed over
    their tokens, and the same under the reference. The implicit reward of a completion is
    beta * (log pi(y|x) - log pi_ref(y|x)) [R23]; with
    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)),

        sigmoid [R23]   -log sigmoid(beta * h)
        ipo     [A23]   (h - 1 / (2 * beta))^2
        simpo   [M24]   -log sigmoid(beta * h - gamma)

    SimPO's reward is reference-free and length-normalised: pass log-probs averaged over each
    completion's tokens and reference log-probs of 0, and h is the difference of the averages.
    Returns (losses, chosen_rewards, rejected_rewards).
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if variant == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif variant == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif variant == "simpo":
        losses = -F.logsigmoid(beta * h - gamma)
    else:
        raise ValueError(f"unknown DPO variant {variant!r} (sigmoid, ipo or simpo)")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
