"""`rlhf compare`: every algorithm at PPO's budget, each run in its own process, one report, and a
rerun that trains nothing again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf import compare
from rlhf.config import ConfigError, load_recipe
from rlhf.pipeline import Recipe

HERE = Path(__file__).parent


def write_recipe(path: Path, sft: Path, prompts: Path, prefs: Path, out: Path, algorithms: list[str]) -> Path:
    reward = {"kind": "function", "path": "conftest:polite_reward"}
    generation = {"temperature": 1.0, "max_new_tokens": 8}
    rl = {"policy": str(sft), "prompts": {"train": [str(prompts)]}, "reward": reward, "generation": generation, "precision": "fp32"}
    recipe = {
        "reward": {"data": {"train": [str(prefs)]}},
        "ppo": {**rl, "algo": {"batch_size": 8, "minibatch_size": 8, "micro_batch_size": 8, "epochs": 1}, "stop": {"max_steps": 3}, "optim": {"lr": 1e-3}},
        "grpo": {**rl, "algo": {"group_size": 4, "batch_size": 5, "minibatch_size": 8, "micro_batch_size": 8, "epochs": 1}, "stop": {"max_steps": 9}},
        "dpo": {"policy": str(sft), "optim": {"batch_size": 8, "micro_batch_size": 8, "epochs": 1}, "precision": "fp32"},
        "eval": {"reference": str(sft), "prompts": [str(prompts)], "num_prompts": 8, "reward": reward, "oracle": "conftest:polite_reward", "generation": generation},
        "compare": {"algorithms": algorithms, "seeds": [0], "output_dir": str(out)},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_compare(recipe: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(HERE), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rlhf", "compare", str(recipe)], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


def test_compare_runs_each_algorithm_at_ppos_budget_and_reports_them_all(tiny_sft_dir, tiny_prompts, tiny_data, tmp_path):
    out = tmp_path / "compare"
    algorithms = ["ppo", "rloo", "dpo"]
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_sft_dir, tiny_prompts, tiny_data["prefs"], out, algorithms)
    result = run_compare(recipe, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    # the budget: RLOO samples PPO's 8 responses a step (2 prompts x 4) for PPO's 3 steps; DPO the reward model's labels
    rloo = yaml.safe_load((out / "rloo-s0" / "recipe.yaml").read_text())["grpo"]
    assert (rloo["algo"]["estimator"], rloo["algo"]["batch_size"], rloo["stop"]["max_steps"]) == ("rloo", 2, 3)
    assert yaml.safe_load((out / "dpo-s0" / "recipe.yaml").read_text())["dpo"]["data"]["train"] == [str(tiny_data["prefs"])]
    for algorithm in algorithms:
        run = json.loads((out / f"{algorithm}-s0" / "run.json").read_text())
        assert run["wall_s"] > 0 and 0.05 < run["peak_rss_gb"] < 20
    assert len([line for line in (out / "ppo-s0" / "metrics.jsonl").read_text().splitlines() if '"gold/mean"' in line]) == 3

    report = (out / "report.md").read_text()
    for algorithm in algorithms:
        assert f"\n| {algorithm} | " in report
    assert "![over-optimisation](overoptimisation.png)" in report and (out / "overoptimisation.png").stat().st_size > 10_000
    results = json.loads((out / "results.json").read_text())["runs"]
    assert {(r["algorithm"], r["seed"]) for r in results} == {(a, 0) for a in algorithms}
    assert all(0.0 <= r["win_rate_gold"] <= 1.0 for r in results)

    # a rerun trains nothing again: the runs keep their models and their timings
    before = {p: p.stat().st_mtime for p in out.glob("*-s*/run.json")}
    again = run_compare(recipe, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in out.glob("*-s*/run.json")} == before


def test_compare_refuses_an_unknown_algorithm_and_a_group_that_does_not_divide_ppos_batch():
    recipe = load_recipe(Recipe, None, ["eval.oracle=m:f", "compare.algorithms=[ppo,sac]"])
    with pytest.raises(ConfigError, match=r"^compare.algorithms: each must be one of ppo, grpo, .*got \['sac'\]$"):
        compare.check_config(recipe)
    recipe = load_recipe(Recipe, None, ["eval.oracle=m:f", "compare.algorithms=[ppo,grpo]", "grpo.algo.group_size=5"])
    with pytest.raises(ConfigError, match=r"^grpo.algo.group_size: must divide ppo.algo.batch_size=64 .*got 5$"):
        compare.check_config(recipe)


def test_the_gold_peak_of_a_run_is_read_from_its_smoothed_curve():
    # gold rises to 1.0 and falls to 0.0 while the proxy keeps rising: over-optimisation
    gold = [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    metrics = [{"gold/mean": g, "score/mean": float(i)} for i, g in enumerate(gold)]
    peak, last, proxy_rise = compare.gold_peak(metrics)
    # 5-step trailing means: gold first reaches 1.0 at step 5 (steps 1-5), the proxy there is 3 and at the end 8
    assert peak == pytest.approx(1.0) and last == pytest.approx(0.0) and proxy_rise == pytest.approx(8 - 3)
    assert compare.smooth([1.0, 3.0, 5.0], window=2) == [1.0, 2.0, 4.0]
