"""`rlhf pipeline`: SFT, reward model, PPO and evaluation from one recipe, on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_pipeline_runs_every_stage_from_one_recipe(tiny_model_dir, tiny_data, tiny_prompts, tmp_path):
    runs = tmp_path / "runs"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
sft:
  model: {tiny_model_dir}
  output_dir: {runs}/sft
  data: {{train: [{tiny_data['sft']}]}}
  optim: {{lr: 3e-3, batch_size: 16, micro_batch_size: 16, epochs: 2}}
  precision: fp32
reward:
  model: {runs}/sft/model
  output_dir: {runs}/reward
  data: {{train: [{tiny_data['prefs']}]}}
  optim: {{lr: 2e-3, batch_size: 16, micro_batch_size: 16, epochs: 1}}
  precision: fp32
ppo:
  policy: {runs}/sft/model
  output_dir: {runs}/ppo
  prompts: {{train: [{tiny_prompts}]}}
  reward: {{kind: model, path: {runs}/reward/model}}
  generation: {{max_new_tokens: 8}}
  algo: {{batch_size: 8, minibatch_size: 8, micro_batch_size: 8, epochs: 1}}
  stop: {{max_steps: 2}}
  precision: fp32
eval:
  reference: {runs}/sft/model
  policies: [{runs}/ppo/model]
  prompts: [{tiny_prompts}]
  num_prompts: 8
  reward: {{kind: model, path: {runs}/reward/model}}
  oracle: conftest:polite_reward
  generation: {{max_new_tokens: 8}}
  runs: [{runs}/ppo]
  output_dir: {runs}/eval
""")
    result = subprocess.run([sys.executable, "-m", "rlhf", "pipeline", str(recipe)], capture_output=True, text=True, cwd=HERE, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"report: {runs}/eval/report.md" in result.stdout
    for path in ("sft/model/config.json", "reward/model/config.json", "ppo/model/config.json", "ppo/stop_reason.txt", "eval/report.md"):
        assert (runs / path).exists(), path
    summary = json.loads((runs / "eval" / "results.json").read_text())
    assert [row["policy"] for row in summary] == [f"{runs}/sft/model", f"{runs}/ppo/model"]
    assert {"score", "gold", "win_rate_gold", "kl", "eos_fraction"} <= set(summary[1])
