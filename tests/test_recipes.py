"""Every recipe under recipes/ loads and passes each stage's recipe checks, offline.

`check_config` is what the recipe alone decides (ranges, required keys, sizes that divide, a
reward function that imports); `validate` also reads model paths and configs, which for a hub
recipe needs the network, so it is not run here.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from rlhf import compare, dpo, evaluation, grpo, personal, ppo, reward, sft
from rlhf.config import load_recipe
from rlhf.judge import check_judge
from rlhf.pipeline import STAGES, Recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
CHECKS = dict(zip(STAGES, (sft.check_config, reward.check_config, ppo.check_config, evaluation.check_config)))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a recipe check tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= {"demo.yaml", "qwen2.5-0.5b-instruct.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_every_stage_passes_its_checks(path, no_network):
    recipe = load_recipe(Recipe, path)
    for stage in STAGES:
        CHECKS[stage](getattr(recipe, stage), 1)
    # the stages outside the pipeline, where the recipe gives them (the demo gives them all)
    for section, check in ((recipe.grpo, grpo.check_config), (recipe.dpo, dpo.check_config)):
        if section.policy:
            check(section, 1)
    if recipe.grpo.policy and recipe.dpo.policy:
        compare.check_config(recipe)
    if recipe.personalize.feedback:
        personal.check_config(recipe)
    if recipe.judge.model:
        check_judge(recipe.judge)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_opens_with_its_command_and_the_machine(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    text = "\n".join(line for line in lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))])
    assert f"rlhf pipeline recipes/{path.name}" in text
    assert "Tested on:" in text


def test_the_qwen_recipe_is_lora_chat_on_hub_data():
    recipe = load_recipe(Recipe, RECIPES[0].parent / "qwen2.5-0.5b-instruct.yaml")
    assert recipe.sft.model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert all(section.lora.enabled for section in (recipe.sft, recipe.reward, recipe.ppo))
    assert all(section.chat_template == "auto" for section in (recipe.sft, recipe.reward, recipe.ppo, recipe.eval))
    # the stages chain: each reads what the one before writes
    sft_model = f"{recipe.sft.output_dir}/model"
    assert recipe.reward.model == recipe.ppo.policy == recipe.eval.reference == sft_model
    assert recipe.ppo.reward.path == recipe.eval.reward.path == f"{recipe.reward.output_dir}/model"
    assert recipe.eval.policies == [f"{recipe.ppo.output_dir}/model"]
    # PPO samples as the reward model's reference completions and the evaluation do
    assert recipe.reward.normalize.sampling == recipe.ppo.generation == recipe.eval.generation
