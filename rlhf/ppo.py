"""PPO against a reward source, from the SFT policy, with a frozen reference (Ziegler et al. 2019).

    rlhf ppo --config recipes/demo.yaml ppo.kl.beta=0.05

PPO is the one RL loop (rlhf/rl.py) with a critic: per-token rewards are the score on the last
token minus beta times the KL to the reference on every token, advantages come from GAE over the
critic's values, and the loss is the clipped surrogate plus the clipped value loss (checklist
items 11-15). The critic is a separate value network initialised from the reward model
(default, checklist item 8) or a value head on the policy trunk. Writes what rl.train writes,
plus `output_dir/value` (the value network).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf import ops, rl, training
from rlhf.config import NonNegative, Positive, UnitInterval
from rlhf.models import add_lora, check_model_path, dropout_off, load_value_model
from rlhf.rollout import Rollout


@dataclass
class ValueConfig:
    model: str = ""
    """Model to initialise the value network from; empty: the reward model (kind model), else the policy."""
    head_on_policy: bool = False
    """Put the value head on the policy trunk instead of a separate network (less memory)."""


@dataclass
class PPOAlgoConfig(rl.AlgoConfig):
    gamma: UnitInterval = 1.0
    """Discount in GAE."""
    lam: UnitInterval = 0.95
    """GAE lambda."""
    value_clip: Positive = 0.2
    """Value clipping range around the rollout values."""
    vf_coef: NonNegative = 0.1
    """Weight of the value loss in the combined objective."""
    whiten_rewards: bool = False
    """Scale per-token rewards to unit variance per batch (their mean is kept)."""


@dataclass
class PPOConfig(rl.RLConfig):
    output_dir: str = "runs/ppo"
    """Where the policy, value model, checkpoints, metrics and samples go."""
    value: ValueConfig = field(default_factory=ValueConfig)
    algo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)


class PPO:
    """The critic, GAE advantages and the clipped policy + value loss, for rl.train."""

    name, group_size = "ppo", 1

    def __init__(self, config: PPOConfig):
        self.config = config

    def critic(self, policy, tokenizer):
        config = self.config
        if config.value.head_on_policy:
            head = torch.nn.Linear(policy.config.get_text_config().hidden_size, 1)
            torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
            return None, head
        source = config.value.model or (config.reward.path if config.reward.kind == "model" else config.policy)
        value_model = load_value_model(source, tokenizer)
        if config.lora.enabled:
            value_model = add_lora(value_model, config.lora, "SEQ_CLS")
        dropout_off(value_model)
        if config.gradient_checkpointing:
            training.enable_gradient_checkpointing(value_model)
        return value_model, None

    def advantages(self, batch: Rollout, beta: float, reduce) -> None:
        """KL-shaped rewards, optional reward whitening, GAE, and advantage whitening, in place.

        Whitening uses the moments of the whole batch, over every data-parallel process."""
        algo, mask = self.config.algo, batch.mask
        batch.rewards, batch.kl = ops.kl_shaped_rewards(batch.scores, batch.logprobs, batch.ref_logprobs, mask, beta, self.config.kl.estimator)
        if algo.whiten_rewards:
            batch.rewards = ops.masked_whiten(batch.rewards, mask, False, 1e-8, *ops.moments(batch.rewards, mask, reduce)) * mask
        advantages, batch.returns = ops.gae(batch.rewards, batch.values, mask, algo.gamma, algo.lam)
        batch.advantages = ops.masked_whiten(advantages, mask, True, 1e-8, *ops.moments(advantages, mask, reduce)) * mask

    def loss(self, logprobs, values, batch: Rollout, rows, num_tokens, beta: float):
        """L_policy + c1 L_value (the loop subtracts c2 entropy): the PPO paper's objective."""
        algo, mask = self.config.algo, batch.mask[rows]
        pg_loss, pg_stats = ops.policy_loss(logprobs, batch.logprobs[rows], batch.advantages[rows], mask, algo.clip, num_tokens, batch.importance(rows))
        vf_loss, vf_stats = ops.value_loss(values, batch.values[rows], batch.returns[rows], mask, algo.value_clip, num_tokens)
        stats = {
            "loss/policy": pg_loss, "loss/value": vf_loss, "policy/clipfrac": pg_stats["clipfrac"],
            "policy/approx_kl": pg_stats["approx_kl"], "value/clipfrac": vf_stats["value_clipfrac"],
        }
        return pg_loss + algo.vf_coef * vf_loss, stats


def check_config(config: PPOConfig, num_processes: int) -> None:
    rl.check_config(config, num_processes, "ppo")


def validate(config: PPOConfig, num_processes: int) -> None:
    rl.validate(config, num_processes, "ppo")
    if config.value.model:
        check_model_path("ppo.value.model", config.value.model)


def train(config: PPOConfig) -> Path:
    """Run PPO; returns the path of the saved policy."""
    validate(config, training.num_processes())
    return rl.train(config, PPO(config))
