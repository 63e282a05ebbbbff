"""Recipes: YAML plus dotted overrides; unknown keys and wrong types are errors; help from docstrings."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from rlhf.config import ConfigError, describe, load_recipe
from rlhf.pipeline import Recipe
from rlhf.sft import SFTConfig


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("sft:\n  model: base\n  optim:\n    lr: 1e-4\n    epochs: 2\n")
    recipe = load_recipe(Recipe, path, ["sft.optim.lr=3e-5", "sft.lora.enabled=true", "sft.data.train=[a.jsonl, b.jsonl]"])
    assert recipe.sft.model == "base"
    assert recipe.sft.optim.lr == 3e-5 and recipe.sft.optim.epochs == 2
    assert recipe.sft.lora.enabled is True
    assert recipe.sft.data.train == ["a.jsonl", "b.jsonl"]
    assert recipe.reward.optim.lr == 5e-5  # untouched sections keep their defaults


def test_setting_one_key_keeps_the_stage_defaults_of_the_others():
    recipe = load_recipe(Recipe, None, ["sft.optim.lr=1e-4"])
    assert dataclasses.asdict(recipe.sft.optim) == {
        "lr": 1e-4, "weight_decay": 0.0, "warmup_steps": 0, "schedule": "cosine", "grad_clip": 1.0,
        "batch_size": 32, "micro_batch_size": 32, "epochs": 2, "max_steps": 0,
    }
    recipe = load_recipe(Recipe, None, ["reward.data.train=[a.jsonl]"])
    assert dataclasses.asdict(recipe.reward.data) == {
        "train": ["a.jsonl"], "eval": [], "eval_fraction": 0.1, "max_length": 512, "skip_invalid": False,
    }


def test_a_section_in_the_file_keeps_the_stage_defaults_and_overrides_keep_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("reward:\n  optim:\n    epochs: 3\n")
    recipe = load_recipe(Recipe, path, ["reward.optim.lr=1e-3", "reward.optim={warmup_steps: 4}"])
    optim = recipe.reward.optim
    assert (optim.lr, optim.epochs, optim.warmup_steps, optim.batch_size, optim.micro_batch_size) == (1e-3, 3, 4, 32, 16)


@dataclass
class Leaf:
    x: int = 0
    y: int = 0


@dataclass
class Middle:
    leaf: Leaf = field(default_factory=Leaf)
    z: int = 0


@dataclass
class Top:
    middle: Middle = field(default_factory=lambda: Middle(Leaf(x=1, y=2), z=3))


def test_defaults_survive_at_any_depth():
    assert load_recipe(Top, None, ["middle.leaf.x=7"]) == Top(Middle(Leaf(x=7, y=2), z=3))
    assert load_recipe(Top, None, ["middle.z=0"]) == Top(Middle(Leaf(x=1, y=2), z=0))


def help_lines(stage: str) -> dict[str, str]:
    """The key lines of `rlhf STAGE --help`, by key."""
    result = subprocess.run([sys.executable, "-m", "rlhf", stage, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith(f"  {stage}.")}


def test_help_shows_the_defaults_the_stage_uses():
    sft = help_lines("sft")
    assert "(default 0.0003, must be > 0)" in sft["sft.optim.lr"]
    assert "(default 2" in sft["sft.optim.epochs"]
    assert "(default 0.1" in help_lines("reward")["reward.data.eval_fraction"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("sft.optim.lrr=1", "unknown key 'sft.optim.lrr'"),
        ("sfft.model=x", "unknown key 'sfft'"),
        ("sft.optim.epochs=two", "sft.optim.epochs: expected an integer, got 'two'"),
        ("sft.lora.enabled=maybe", "sft.lora.enabled: expected true or false"),
        ("sft.precision=fp8", "sft.precision: 'fp8' is not one of"),
        ("sft.optim=3", "sft.optim: expected a mapping"),
        ("sft.model", "must look like section.key=value"),
    ],
)
def test_bad_keys_and_values_are_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_recipe(Recipe, None, [override])


@pytest.mark.parametrize(
    "override,message",
    [
        ("sft.optim.lr=-0.001", "sft.optim.lr: must be > 0, got -0.001"),
        ("sft.optim.lr=0", "sft.optim.lr: must be > 0, got 0.0"),
        ("sft.optim.epochs=0", "sft.optim.epochs: must be >= 1, got 0"),
        ("sft.optim.batch_size=0", "sft.optim.batch_size: must be >= 1, got 0"),
        ("sft.optim.micro_batch_size=0", "sft.optim.micro_batch_size: must be >= 1, got 0"),
        ("sft.optim.warmup_steps=-1", "sft.optim.warmup_steps: must be >= 0, got -1"),
        ("sft.optim.grad_clip=-1", "sft.optim.grad_clip: must be >= 0, got -1.0"),
        ("sft.save_every=0", "sft.save_every: must be >= 1, got 0"),
        ("sft.eval_every=0", "sft.eval_every: must be >= 1, got 0"),
        ("sft.log_every=0", "sft.log_every: must be >= 1, got 0"),
        ("sft.lora.r=0", "sft.lora.r: must be >= 1, got 0"),
        ("sft.lora.alpha=0", "sft.lora.alpha: must be >= 1, got 0"),
        ("sft.data.max_length=0", "sft.data.max_length: must be >= 1, got 0"),
        ("reward.data.eval_fraction=0", r"reward.data.eval_fraction: must be in \(0, 1\), got 0.0"),
        ("reward.data.eval_fraction=1", r"reward.data.eval_fraction: must be in \(0, 1\), got 1.0"),
        ("reward.optim.micro_batch_size=0", "reward.optim.micro_batch_size: must be >= 1, got 0"),
        ("reward.normalize.num_samples=0", "reward.normalize.num_samples: must be >= 1, got 0"),
        ("reward.normalize.sampling.temperature=-1", "reward.normalize.sampling.temperature: must be >= 0, got -1.0"),
        ("ppo.generation.temperature=-0.5", "ppo.generation.temperature: must be >= 0, got -0.5"),
        ("ppo.generation.top_p=0", r"ppo.generation.top_p: must be in \(0, 1\], got 0.0"),
        ("ppo.generation.top_p=1.5", r"ppo.generation.top_p: must be in \(0, 1\], got 1.5"),
        ("ppo.generation.top_k=-1", "ppo.generation.top_k: must be >= 0, got -1"),
        ("ppo.generation.max_new_tokens=0", "ppo.generation.max_new_tokens: must be >= 1, got 0"),
        ("ppo.kl.beta=-0.5", "ppo.kl.beta: must be >= 0, got -0.5"),
        ("ppo.kl.target=0", "ppo.kl.target: must be > 0, got 0.0"),
        ("ppo.kl.horizon=0", "ppo.kl.horizon: must be >= 1, got 0"),
        ("ppo.algo.clip=0", "ppo.algo.clip: must be > 0, got 0.0"),
        ("ppo.algo.value_clip=-0.2", "ppo.algo.value_clip: must be > 0, got -0.2"),
        ("ppo.algo.gamma=1.1", r"ppo.algo.gamma: must be in \[0, 1\], got 1.1"),
        ("ppo.algo.lam=-0.1", r"ppo.algo.lam: must be in \[0, 1\], got -0.1"),
        ("ppo.algo.epochs=0", "ppo.algo.epochs: must be >= 1, got 0"),
        ("ppo.algo.minibatch_size=0", "ppo.algo.minibatch_size: must be >= 1, got 0"),
        ("ppo.optim.lr=-1e-5", "ppo.optim.lr: must be > 0, got -1e-05"),
        ("ppo.reward.batch_size=0", "ppo.reward.batch_size: must be >= 1, got 0"),
        ("ppo.stop.max_steps=0", "ppo.stop.max_steps: must be >= 1, got 0"),
        ("ppo.stop.window=0", "ppo.stop.window: must be >= 1, got 0"),
        ("ppo.stop.kl_budget=0", "ppo.stop.kl_budget: must be > 0, got 0.0"),
        ("eval.batch_size=0", "eval.batch_size: must be >= 1, got 0"),
        ("eval.generation.top_p=0", r"eval.generation.top_p: must be in \(0, 1\], got 0.0"),
    ],
)
def test_values_out_of_range_name_the_key_and_the_range(override, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        load_recipe(Recipe, None, [override])


def test_a_value_out_of_range_in_the_file_names_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("ppo:\n  kl: {beta: -1}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: ppo.kl.beta: must be >= 0, got -1.0$"):
        load_recipe(Recipe, path)


def test_greedy_and_unset_values_at_the_edge_of_a_range_are_kept():
    recipe = load_recipe(Recipe, None, ["ppo.generation.temperature=0", "ppo.generation.top_p=1", "ppo.kl.beta=0", "ppo.stop.kl_budget=null"])
    assert (recipe.ppo.generation.temperature, recipe.ppo.generation.top_p, recipe.ppo.kl.beta, recipe.ppo.stop.kl_budget) == (0.0, 1.0, 0.0, None)


def test_a_config_built_in_python_is_checked_too():
    from rlhf.config import check_ranges
    from rlhf.training import OptimConfig

    with pytest.raises(ConfigError, match=r"^sft.optim.lr: must be > 0, got -1$"):
        check_ranges(SFTConfig(optim=OptimConfig(lr=-1)), "sft")


def test_unknown_key_in_the_file_names_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("sft:\n  modle: base\n")
    with pytest.raises(ConfigError, match=rf"^{path}: unknown key 'sft.modle'"):
        load_recipe(Recipe, path)


def test_help_comes_from_field_docstrings():
    rows = {key: (default, allowed, doc) for key, default, allowed, doc in describe(SFTConfig(), "sft.")}
    assert rows["sft.optim.lr"] == ("0.0003", "> 0", "Peak learning rate (AdamW).")
    assert rows["sft.lora.r"] == ("16", ">= 1", "Adapter rank.")
    assert all(doc for *_, doc in rows.values()), [k for k, (*_, d) in rows.items() if not d]


def test_cli_reports_errors_without_a_traceback(tmp_path):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n')
    result = subprocess.run(
        [sys.executable, "-m", "rlhf", "reward", "reward.model=unused", f"reward.data.train={bad}"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert f"error: {bad}:1: field 'rejected': missing" in result.stderr
    assert "Traceback" not in result.stderr


# Checks at the start of a stage, before any data or model loads


def test_a_micro_batch_that_does_not_divide_the_batch_is_refused():
    from rlhf import sft

    config = sft.SFTConfig(model="unused", data=sft.DataConfig(train=["unused.jsonl"]), optim=sft.OptimConfig(batch_size=32, micro_batch_size=7))
    with pytest.raises(ConfigError, match=r"^sft.optim.micro_batch_size: must divide the 32 examples per process \(sft.optim.batch_size=32 over 1 process\(es\)\), got 7$"):
        sft.train(config)


def test_a_minibatch_that_does_not_divide_the_rollout_batch_is_refused():
    from rlhf import ppo, rl

    config = ppo.PPOConfig(policy="unused", prompts=rl.PromptData(train=["unused.jsonl"]), algo=ppo.PPOAlgoConfig(batch_size=64, minibatch_size=24))
    with pytest.raises(ConfigError, match=r"^ppo.algo.minibatch_size: must divide ppo.algo.batch_size=64, got 24$"):
        ppo.validate(config, 1)


@pytest.mark.parametrize(
    "name,local",
    [("gpt2", False), ("Qwen/Qwen2.5-0.5B", False), ("./model", True), ("../model", True), ("/abs/model", True),
     ("~/model", True), ("a/b/c", True), ("runs/model", True), ("nothere/model", False)],
)
def test_local_paths_and_hub_ids_are_told_apart(name, local, tmp_path, monkeypatch):
    from rlhf.models import is_local_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert is_local_path(name) is local


def test_a_local_model_path_that_does_not_exist_fails_fast_naming_it(tmp_path):
    from rlhf import sft

    # Refused by the stage itself, before transformers could take the name for a hub id.
    missing = tmp_path / "no" / "such" / "model"
    config = sft.SFTConfig(model=str(missing), data=sft.DataConfig(train=["unused.jsonl"]))
    with pytest.raises(ConfigError, match=rf"^sft.model: {missing} does not exist"):
        sft.train(config)


def ppo_config(policy, **kwargs):
    """A PPO config that passes `validate` on the tiny model (64 positions) unless kwargs break it."""
    from rlhf import ppo, rl
    from rlhf.sampling import SamplingConfig
    from rlhf.scoring import RewardSourceConfig

    kwargs.setdefault("reward", RewardSourceConfig(kind="function", path="conftest:length_reward"))
    kwargs.setdefault("generation", SamplingConfig(max_new_tokens=16))
    return ppo.PPOConfig(policy=str(policy), prompts=rl.PromptData(train=["unused.jsonl"]), **kwargs)


def test_max_new_tokens_must_leave_room_for_a_prompt(tiny_model_dir):
    from rlhf import ppo, rl
    from rlhf.sampling import SamplingConfig

    ppo.validate(ppo_config(tiny_model_dir, generation=SamplingConfig(max_new_tokens=63)), 1)
    with pytest.raises(ConfigError, match=rf"^ppo.generation.max_new_tokens: must be between 1 and 63 for a model of 64 positions \({tiny_model_dir}\), got 64$"):
        ppo.validate(ppo_config(tiny_model_dir, generation=SamplingConfig(max_new_tokens=64)), 1)


@pytest.mark.parametrize(
    "path,message",
    [
        ("no_such_module:score", "ppo.reward.path: cannot import 'no_such_module' of 'no_such_module:score': ModuleNotFoundError: No module named 'no_such_module'"),
        ("conftest:no_such_function", "ppo.reward.path: module 'conftest' has no function 'no_such_function'"),
        ("conftest", "ppo.reward.path: must look like module:function, got 'conftest'"),
    ],
)
def test_a_reward_function_that_cannot_be_imported_is_named(tiny_model_dir, path, message):
    from rlhf import ppo, rl
    from rlhf.scoring import RewardSourceConfig

    with pytest.raises(ConfigError, match=f"^{message}$"):
        ppo.validate(ppo_config(tiny_model_dir, reward=RewardSourceConfig(kind="function", path=path)), 1)


def test_a_reward_model_path_that_does_not_exist_is_named(tiny_model_dir, tmp_path):
    from rlhf import ppo, rl
    from rlhf.scoring import RewardSourceConfig

    with pytest.raises(ConfigError, match=rf"^ppo.reward.path: {tmp_path}/reward does not exist"):
        ppo.validate(ppo_config(tiny_model_dir, reward=RewardSourceConfig(path=str(tmp_path / "reward"))), 1)


def test_reward_normalisation_checks_its_policy_before_training(tiny_model_dir):
    from rlhf import reward
    from rlhf.sampling import SamplingConfig

    normalize = reward.NormalizeConfig(policy=str(tiny_model_dir), prompts=["unused.jsonl"], sampling=SamplingConfig(max_new_tokens=100))
    config = reward.RewardConfig(model=str(tiny_model_dir), data=reward.DataConfig(train=["unused.jsonl"]), normalize=normalize)
    with pytest.raises(ConfigError, match=r"^reward.normalize.sampling.max_new_tokens: must be between 1 and 63 for a model of 64 positions"):
        reward.train(config)


def test_evaluation_names_the_policy_that_does_not_exist(tiny_model_dir, tmp_path):
    from rlhf.evaluation import EvalConfig, evaluate
    from rlhf.sampling import SamplingConfig

    policies = [str(tiny_model_dir), str(tmp_path / "ppo" / "model")]
    config = EvalConfig(reference=str(tiny_model_dir), policies=policies, prompts=["unused.jsonl"], generation=SamplingConfig(max_new_tokens=16))
    with pytest.raises(ConfigError, match=rf"^eval.policies\[1\]: {tmp_path}/ppo/model does not exist"):
        evaluate(config)


def test_the_demo_recipe_loads_before_the_models_it_names_exist():
    recipe = load_recipe(Recipe, "recipes/demo.yaml")
    assert recipe.ppo.policy == "runs/demo/sft/model"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ([], r"^ppo.kl.beta: must be >= 0, got -1$"),  # set in Python below, where nothing checks it on the way in
        (["ppo.algo.minibatch_size=24"], r"^ppo.algo.minibatch_size: must divide ppo.algo.batch_size=64, got 24$"),
        (["ppo.reward.kind=function", "ppo.reward.path=no_such_module:score"], r"^ppo.reward.path: cannot import 'no_such_module'"),
        (["eval.oracle=rlhf.demo.gold:nope"], r"^eval.oracle: module 'rlhf.demo.gold' has no function 'nope'$"),
    ],
)
def test_the_pipeline_checks_what_the_recipe_decides_for_every_stage_before_the_first(overrides, message, tmp_path):
    from rlhf import pipeline

    recipe = load_recipe(Recipe, "recipes/demo.yaml", [f"demo.data_dir={tmp_path / 'data'}", *overrides])
    if not overrides:
        recipe.ppo.kl.beta = -1
    with pytest.raises(ConfigError, match=message):
        pipeline.run(recipe)
    assert not (tmp_path / "data").exists()  # the demo data set, the first thing SFT needs, was not built


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf", *args], capture_output=True, text=True)


def test_cli_refuses_a_bad_value_with_exit_code_2_and_no_traceback():
    result = run_cli("sft", "--config", "recipes/demo.yaml", "sft.optim.lr=-0.001")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: sft.optim.lr: must be > 0, got -0.001"
    assert "Traceback" not in result.stderr


def test_cli_options_of_generate_are_checked_like_recipe_values(tmp_path):
    result = run_cli("generate", "--model", "unused", "--prompts", "unused.jsonl", "--out", str(tmp_path / "out.jsonl"), "--top-p", "0")
    assert result.returncode == 2
    assert "argument --top-p: must be in (0, 1], got 0.0" in result.stderr
    assert "Traceback" not in result.stderr
