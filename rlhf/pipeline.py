"""The whole loop from one recipe: SFT, reward model, PPO and evaluation, in that order.

    rlhf pipeline recipes/demo.yaml

A recipe is one YAML file with a section per stage; each stage command (`rlhf sft`,
`rlhf reward`, ...) reads its own section of the same file. `rlhf dpo` reads its section too,
but is not part of the pipeline: it replaces the reward model and PPO, it does not follow them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from rlhf import evaluation, ppo, reward, sft, training
from rlhf.cai import CAIConfig
from rlhf.compare import CompareConfig
from rlhf.dpo import DPOConfig
from rlhf.evaluation import EvalConfig
from rlhf.grpo import GRPOConfig
from rlhf.judge import JudgeConfig
from rlhf.loop import LoopConfig
from rlhf.personal import PersonalizeConfig
from rlhf.ppo import PPOConfig
from rlhf.reward import RewardConfig
from rlhf.sft import SFTConfig

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    data_dir: str = ""
    """Build the embedded demo data set here when it is missing (empty: not a demo recipe)."""
    seed: int = 0
    """Seed of the demo data generator."""


@dataclass
class Recipe:
    demo: DemoConfig = field(default_factory=DemoConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    cai: CAIConfig = field(default_factory=CAIConfig)


STAGES = ("sft", "reward", "ppo", "eval")


def prepare(recipe: Recipe) -> None:
    """Build what the recipe needs before any stage runs (the demo data set)."""
    if recipe.demo.data_dir and not (Path(recipe.demo.data_dir) / "sft.jsonl").exists():
        from rlhf.demo.build import build

        log.info("building the demo data set in %s", recipe.demo.data_dir)
        build(recipe.demo.data_dir, recipe.demo.seed)


def run_stage(recipe: Recipe, stage: str) -> Path:
    prepare(recipe)
    if stage == "sft":
        from rlhf import sft

        return sft.train(recipe.sft)
    if stage == "reward":
        from rlhf import reward

        return reward.train(recipe.reward)
    if stage == "ppo":
        from rlhf import ppo

        return ppo.train(recipe.ppo)
    if stage == "grpo":
        from rlhf import grpo

        return grpo.train(recipe.grpo)
    if stage == "dpo":
        from rlhf import dpo

        return dpo.train(recipe.dpo)
    if stage == "eval":
        from rlhf import evaluation

        return evaluation.evaluate(recipe.eval)
    raise ValueError(f"unknown stage {stage!r}")


def run(recipe: Recipe) -> Path:
    """Run every stage of the recipe in order; returns the evaluation report.

    What the recipe alone decides (ranges, required keys, sizes, reward functions) is checked for
    every stage before the first one starts; each stage checks its models' paths when it starts,
    since earlier stages write them."""
    processes = training.num_processes()
    for stage, module in zip(STAGES, (sft, reward, ppo, evaluation)):
        module.check_config(getattr(recipe, stage), processes)
    for stage in STAGES:
        path = run_stage(recipe, stage)
        log.info("%s done: %s", stage, path)
    return path
