"""The critic-free family: GRPO, Dr. GRPO, RLOO, REINFORCE++ and REINFORCE++-baseline, one config.

    rlhf grpo --config recipes/demo.yaml                                  (GRPO)
    rlhf grpo --config recipes/demo.yaml grpo.algo.estimator=rloo         (RLOO; likewise dr_grpo,
                                                                          reinforce_pp, reinforce_pp_baseline)

Each step samples `group_size` responses to each of `batch_size` prompts and scores them with
any reward source (reward model, classifier, function). No value network: the baseline comes
from the other responses to the same prompt, or from the batch.

- `grpo` (Shao et al. 2024): a response's advantage is its score minus its group's mean, over the
  group's std; `dr_grpo` (Liu et al. 2025) leaves out the std division.
- `rloo` (Ahmadian et al. 2024): its score minus the mean of the group's other K-1 scores.
- `reinforce_pp` (Hu et al. 2025): per-token rewards with the KL penalty on every token and the
  score on the last, the return from each token on, whitened over the whole batch;
  `reinforce_pp_baseline` subtracts the group's mean score first (OpenRLHF's recommended form).

The policy loss is PPO's clipped surrogate at token level, averaged over the minibatch's tokens.
This is RLHF, not training on verifiable rewards: the KL to the frozen reference is on by default
(beta > 0), in the loss as a k3 term for GRPO and Dr. GRPO (as their papers do), in the reward for
RLOO and REINFORCE++ (`kl.placement` chooses otherwise). A learned reward model is a proxy that
the policy can exploit; beta = 0 is for rewards that cannot be gamed. Writes what rl.train
writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from rlhf import ops, rl, training
from rlhf.config import ConfigError, PositiveInt
from rlhf.rollout import Rollout

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
KL_IN_LOSS = ("grpo", "dr_grpo")
"""The estimators whose papers put the KL in the loss; the others put it in the reward."""


@dataclass
class GroupAlgoConfig(rl.AlgoConfig):
    batch_size: PositiveInt = 16
    """Prompts per step, over all processes; each gets `group_size` responses."""
    estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "grpo"
    """Advantage estimator: grpo (group mean and std), dr_grpo (group mean), rloo (leave-one-out mean), reinforce_pp (batch-whitened returns), reinforce_pp_baseline (group mean, then as reinforce_pp)."""
    group_size: PositiveInt = 4
    """Responses sampled per prompt (K); at least 2 for every estimator but reinforce_pp."""


@dataclass
class GroupKLConfig(rl.KLConfig):
    placement: Literal["auto", "loss", "reward"] = "auto"
    """Where the KL to the reference goes: loss (beta * k3 per token, GRPO's), reward (minus beta * KL, RLOO's and REINFORCE++'s), or auto (the estimator's own)."""


@dataclass
class GRPOConfig(rl.RLConfig):
    output_dir: str = "runs/grpo"
    """Where the policy, checkpoints, metrics and samples go."""
    kl: GroupKLConfig = field(default_factory=GroupKLConfig)
    algo: GroupAlgoConfig = field(default_factory=GroupAlgoConfig)


class GroupAlgorithm:
    """A critic-free estimator and the clipped surrogate (plus the KL term where it is in the loss), for rl.train."""

    def __init__(self, config: GRPOConfig):
        algo, placement = config.algo, config.kl.placement
        self.name, self.group_size, self.estimator = algo.estimator, algo.group_size, algo.estimator
        self.clip, self.kl_estimator = algo.clip, config.kl.estimator
        self.kl_in_loss = placement == "loss" or (placement == "auto" and algo.estimator in KL_IN_LOSS)

    def critic(self, policy, tokenizer):
        return None, None

    def advantages(self, batch: Rollout, beta: float, reduce) -> None:
        mask, K = batch.mask, self.group_size
        reward_beta = 0.0 if self.kl_in_loss else beta
        if self.estimator.startswith("reinforce_pp"):
            scores = batch.scores
            if self.estimator == "reinforce_pp_baseline":
                scores = ops.group_advantages(scores, K, scale=False)
            batch.rewards, _ = ops.kl_shaped_rewards(scores, batch.logprobs, batch.ref_logprobs, mask, reward_beta, self.kl_estimator)
            returns = ops.returns_to_go(batch.rewards, mask)
            batch.advantages = ops.masked_whiten(returns, mask, True, 1e-8, *ops.moments(returns, mask, reduce)) * mask
            return
        rewards = batch.scores - reward_beta * batch.kl.sum(-1)  # (B,) one per sequence
        if self.estimator == "rloo":
            advantages = ops.leave_one_out_advantages(rewards, K)
        else:
            advantages = ops.group_advantages(rewards, K, scale=self.estimator == "grpo")
        batch.rewards = torch.zeros_like(batch.kl)
        batch.rewards[torch.arange(len(rewards)), ops.last_token_index(mask)] = rewards
        batch.rewards *= mask
        batch.advantages = advantages[:, None] * mask

    def loss(self, logprobs, values, batch: Rollout, rows, num_tokens, beta: float):
        mask = batch.mask[rows]
        pg_loss, pg_stats = ops.policy_loss(logprobs, batch.logprobs[rows], batch.advantages[rows], mask, self.clip, num_tokens, batch.importance(rows))
        stats = {"loss/policy": pg_loss, "policy/clipfrac": pg_stats["clipfrac"], "policy/approx_kl": pg_stats["approx_kl"]}
        if not self.kl_in_loss:
            return pg_loss, stats
        kl = ops.kl_loss(logprobs, batch.ref_logprobs[rows], mask, num_tokens)
        return pg_loss + beta * kl, {**stats, "loss/kl": kl}


def check_config(config: GRPOConfig, num_processes: int) -> None:
    algo = config.algo
    rl.check_config(config, num_processes, "grpo", algo.group_size)
    if algo.group_size < 2 and algo.estimator != "reinforce_pp":
        raise ConfigError(f"grpo.algo.group_size: must be >= 2 for estimator {algo.estimator} (its baseline is the other responses to the prompt), got {algo.group_size}")


def train(config: GRPOConfig) -> Path:
    """Run the configured estimator; returns the path of the saved policy."""
    check_config(config, training.num_processes())
    rl.validate(config, training.num_processes(), "grpo", config.algo.group_size)
    return rl.train(config, GroupAlgorithm(config))
