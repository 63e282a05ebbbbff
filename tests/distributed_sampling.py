"""One PPO step over two processes whose prompts are all the same: each process saves the
completions it sampled, which must differ (a sampling stream per process).

    torchrun --nproc_per_node 2 tests/distributed_sampling.py MODEL PROMPTS OUT
"""

import os
import sys

import torch

import rlhf  # noqa: F401  (sets the OpenMP wait policy before torch does work)
from rlhf import ppo, rl
from rlhf.sampling import SamplingConfig
from rlhf.scoring import RewardSourceConfig

model_dir, prompts, out = sys.argv[1:]
sampled = []
rollout = rl.rollout


def recording_rollout(*args, **kwargs):
    batch, info = rollout(*args, **kwargs)
    sampled.append(batch.responses)
    return batch, info


rl.rollout = recording_rollout
ppo.train(
    ppo.PPOConfig(
        policy=model_dir,
        output_dir=out,
        prompts=rl.PromptData(train=[prompts]),
        reward=RewardSourceConfig(kind="function", path="conftest:length_reward"),
        generation=SamplingConfig(temperature=1.0, max_new_tokens=8),
        algo=ppo.PPOAlgoConfig(batch_size=8, minibatch_size=8, micro_batch_size=2, epochs=1),
        stop=rl.StopConfig(max_steps=1),
        precision="fp32",
    )
)
torch.save(sampled[0], os.path.join(out, f"responses-{os.environ.get('RANK', '0')}.pt"))
